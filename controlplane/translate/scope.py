"""The scoped `egress` of Delta sidecars: virtual hosts served one by one over VHDS.

A Delta sidecar's `egress` route config names no host; it asks for them over VHDS. It gets
the hosts of its role's scope (model/scope.py) up front, and any other host on demand: its
`on_demand` filter (templates/sidecar.yaml) holds a request whose host matches none, asks for
`egress/<authority>`, and resumes it when the answer comes (xds/stream.py answers with the
host under that alias). A service joins the role's scope (sync.py), so its clusters and
endpoints come first, make-before-break. A host outside the mesh joins the role's
`egress/outside_mesh` host, which treats it as the outbound traffic policy says: there is no
`*` host here, since a host matching `*` would never be asked for on demand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from envoy.config.route.v3 import route_pb2 as route_config_pb2

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet
from controlplane.translate.common import ads_source
from controlplane.translate.egress import outside_mesh_host
from controlplane.xds import wire
from controlplane.xds.names import EGRESS_ROUTE
from controlplane.xds.snapshot import Resource
from controlplane.xds.types import VIRTUAL_HOST

# An outside-mesh host must name a domain; before any is asked for, it names one that never
# resolves (RFC 2606). It also keeps the first VHDS answer from being empty, which Envoy
# would never deliver (envoy#23095): the sidecar would wait for its routes forever.
_NO_OUTSIDE_HOST = "outside-mesh.tasklane.invalid"
OUTSIDE_MESH_HOST = f"{EGRESS_ROUTE}/@outside_mesh"
# Hosts outside the mesh that a role's sidecars may ask for on demand (see Asked.ask).
MAX_OUTSIDE_HOSTS = 1000


@dataclass(frozen=True)
class Scopes:
    """What the rules alone do not say about the roles' scopes: the translator's input."""

    # role -> services its sidecars called (on demand, learned)
    sighted: Mapping[GroupKey, frozenset[str]] = field(default_factory=dict)
    # role -> hosts outside the mesh its sidecars asked for on demand, oldest first
    outside: Mapping[GroupKey, tuple[str, ...]] = field(default_factory=dict)
    # roles with state-of-the-world sidecars, which get the full view (xds/names.full_view)
    full: frozenset[GroupKey] = frozenset()


class Answer(NamedTuple):
    comes: bool  # a host for the authority will be in a build
    changed: bool  # the scopes changed: build again
    joined: str | None = None  # the service that joined the role's scope


class Asked:
    """What the connected sidecars asked for on demand, per role. Each host stays in its
    role's scope while a sidecar that asked for it is connected: Envoy asks for a host once
    per xDS stream, so one taken away would stay out of that sidecar's reach until it
    reconnects (seen with Envoy 1.40). A service asked for is also stored as a sighting,
    which keeps it in scope for the role's other sidecars until it expires."""

    def __init__(self) -> None:
        self.services: dict[GroupKey, dict[str, set[str]]] = {}  # role -> callee -> nodes
        self.outside: dict[GroupKey, dict[str, set[str]]] = {}  # role -> authority -> nodes
        self._nodes: dict[str, GroupKey] = {}  # node -> its role, for the nodes that asked

    def ask(self, rules: RuleSet, node: str, role: str, authority: str) -> Answer:
        """A service joins the role's scope, another host its outside-mesh host. Nothing
        comes for a role the rules do not define (its sidecars are told it is missing), nor
        for more than MAX_OUTSIDE_HOSTS outside hosts of one role (a flood of random names
        must not grow memory without bound: Envoy answers those 404)."""
        key = GroupKey.parse(role)
        service = rules.services.get(key.service)
        if service is None or service.group(key.group) is None:
            return Answer(False, False)
        authority = authority.lower()
        host, _, port = authority.rpartition(":")
        if not host or not port.isdigit():
            host = authority
        if host in rules.services:
            table, name, joined = self.services, host, host
        else:
            table, name, joined = self.outside, authority, None
        hosts = table.setdefault(key, {})
        if name not in hosts and table is self.outside and len(hosts) >= MAX_OUTSIDE_HOSTS:
            return Answer(False, False)
        self._nodes[node] = key
        nodes = hosts.get(name)
        if nodes is not None:
            nodes.add(node)
            return Answer(True, False)
        hosts[name] = {node}
        return Answer(True, True, joined)

    def gone(self, node: str) -> bool:
        """A sidecar's stream ended: what only it asked for leaves; whether anything did."""
        role = self._nodes.pop(node, None)
        changed = False
        for table in (self.services, self.outside):
            hosts = table.get(role, {})
            for name in [n for n, nodes in hosts.items() if node in nodes]:
                hosts[name].discard(node)
                if not hosts[name]:
                    del hosts[name]
                    changed = True
            if not hosts:
                table.pop(role, None)
        return changed

    def scopes(
        self, sighted: Mapping[GroupKey, Iterable[str]] = {}, full: Iterable[GroupKey] = ()
    ) -> Scopes:
        """The translator's input (copies: a build runs in another thread): `sighted` (from
        etcd) with the services asked for here, and the outside hosts."""
        merged = {role: set(callees) for role, callees in sighted.items()}
        for role, asked in self.services.items():
            merged.setdefault(role, set()).update(asked)
        return Scopes(
            sighted={role: frozenset(callees) for role, callees in merged.items()},
            outside={role: tuple(hosts) for role, hosts in self.outside.items()},
            full=frozenset(full),
        )


def vhds_route_config() -> Resource:
    """`egress` of a Delta sidecar: no hosts of its own, VHDS for all of them."""
    return Resource.of(
        route_config_pb2.RouteConfiguration(
            name=EGRESS_ROUTE, vhds=route_config_pb2.Vhds(config_source=ads_source())
        )
    )


def vhds_name(host: str) -> str:
    """A host's VHDS resource name: the route config's name and the host's, behind an `@`,
    which no authority has, so that no resource is ever named like what Envoy asks for on
    demand (`egress/<authority>`), which is answered by alias."""
    return f"{EGRESS_ROUTE}/@{host}"


def vhds_host(name: str, content: bytes, clusters: frozenset[str]) -> Resource:
    """A service's virtual host (`content`, serialised deterministically, so its name, field
    1, comes first) as a VHDS resource: Envoy names (and removes) it by the route config's
    name and the host's. `clusters`: what its routes name."""
    payload = wire.text(1, vhds_name(name)) + content[len(wire.text(1, name)) :]
    return Resource.encoded(VIRTUAL_HOST, vhds_name(name), payload, clusters)


def outside_host(policy: str, authorities: Sequence[str]) -> Resource:
    """The role's host for the outside-mesh authorities its sidecars asked for."""
    domains = list(authorities) or [_NO_OUTSIDE_HOST]
    return Resource.of(outside_mesh_host(policy, domains, OUTSIDE_MESH_HOST))
