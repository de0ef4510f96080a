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

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.config.route.v3 import route_pb2 as route_config_pb2

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet
from controlplane.translate.common import ads_source
from controlplane.translate.egress import outside_mesh_host
from controlplane.xds.names import EGRESS_ROUTE
from controlplane.xds.snapshot import Resource

# An outside-mesh host must name a domain; before any is asked for, it names one that never
# resolves (RFC 2606). It also keeps the first VHDS answer from being empty, which Envoy
# would never deliver (envoy#23095): the sidecar would wait for its routes forever.
_NO_OUTSIDE_HOST = "outside-mesh.tasklane.invalid"
OUTSIDE_MESH_HOST = f"{EGRESS_ROUTE}/outside_mesh"
# Hosts outside the mesh a role's sidecars asked for on demand, kept per role (the oldest
# asked is forgotten first: a flood of random names must not grow memory without bound).
MAX_OUTSIDE_HOSTS = 256


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
    """What the sidecars of each role asked for on demand: services until the etcd sightings
    hold them (then those decide, and expire), hosts outside the mesh for this process."""

    def __init__(self) -> None:
        self.services: dict[GroupKey, set[str]] = {}
        self.outside: dict[GroupKey, OrderedDict[str, None]] = {}

    def ask(self, rules: RuleSet, role: str, authority: str) -> Answer:
        """A service joins the role's scope, another host its outside-mesh host. Nothing
        comes for a role the rules do not define (its sidecars are told it is missing)."""
        key = GroupKey.parse(role)
        service = rules.services.get(key.service)
        if service is None or service.group(key.group) is None:
            return Answer(False, False)
        authority = authority.lower()
        host, _, port = authority.rpartition(":")
        if not host or not port.isdigit():
            host = authority
        if host in rules.services:
            asked = self.services.setdefault(key, set())
            if host in asked:
                return Answer(True, False)
            asked.add(host)
            return Answer(True, True, host)
        outside = self.outside.setdefault(key, OrderedDict())
        if authority in outside:
            outside.move_to_end(authority)
            return Answer(True, False)
        outside[authority] = None
        if len(outside) > MAX_OUTSIDE_HOSTS:
            outside.popitem(last=False)
        return Answer(True, True)

    def settle(self, sighted: Mapping[GroupKey, Iterable[str]]) -> None:
        """Forget the services etcd's sightings now hold: they leave with their sighting."""
        for role, callees in sighted.items():
            asked = self.services.get(role)
            if asked:
                asked.difference_update(callees)

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


def vhds_host(host: route_pb2.VirtualHost) -> Resource:
    """A service's virtual host as a VHDS resource: Envoy names (and removes) it by the
    route config's name and the host's."""
    scoped = route_pb2.VirtualHost()
    scoped.CopyFrom(host)
    scoped.name = f"{EGRESS_ROUTE}/{host.name}"
    return Resource.of(scoped)


def outside_host(policy: str, authorities: Sequence[str]) -> Resource:
    """The role's host for the outside-mesh authorities its sidecars asked for."""
    domains = list(authorities) or [_NO_OUTSIDE_HOST]
    return Resource.of(outside_mesh_host(policy, domains, OUTSIDE_MESH_HOST))
