"""The memoising translator: every role's snapshot from the rules, the registered instances
and the roles' scopes, rebuilding only the pieces whose inputs changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TypeVar

from envoy.config.route.v3 import route_components_pb2 as route_pb2

from controlplane.model.group import DEFAULT_GROUP, GroupKey
from controlplane.model.rules import RuleSet, Service
from controlplane.model.scope import rule_scopes
from controlplane.translate.clusters import group_cluster, load_assignment, loose_cluster
from controlplane.translate.common import Address, ChainHop, Endpoints
from controlplane.translate.egress import egress_virtual_host, outside_mesh_host
from controlplane.translate.gateway import DyeNames, dye_filter
from controlplane.translate.inbound import inbound_route
from controlplane.translate.scope import Scopes, outside_host, vhds_host, vhds_route_config
from controlplane.xds import wire
from controlplane.xds.names import (
    ALLOW_ANY,
    EGRESS_ROUTE,
    GATEWAY_ROLE,
    cluster_name,
    full_view,
    loose_cluster_name,
    role_name,
)
from controlplane.xds.snapshot import Resource, ResourceMap, Snapshot, references
from controlplane.xds.types import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    ROUTE,
    VIRTUAL_HOST,
)

T = TypeVar("T")


_EMPTY = ResourceMap()


def hops_by_service(rules: RuleSet) -> dict[str, tuple[ChainHop, ...]]:
    """service -> the chains with a hop on it, in chain-name order."""
    out: dict[str, list[ChainHop]] = {}
    for name in sorted(rules.chains):
        chain_ = rules.chains[name]
        for hop in chain_.hops:
            out.setdefault(hop.service, []).append(ChainHop(chain_, hop))
    return {service: tuple(entries) for service, entries in out.items()}


class _Memo:
    """Last (key, value) per name: a piece is rebuilt only when its inputs changed. Names not
    asked for during a build are forgotten at its end (`sweep`)."""

    def __init__(self) -> None:
        self._entries: dict[object, tuple[object, object]] = {}
        self._used: set[object] = set()

    def get(self, name: object, key: object, build: Callable[..., T], *args: object) -> T:
        """The value built last time for `name` if `key` is unchanged, else build(*args)."""
        self._used.add(name)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        value = build(*args)
        self._entries[name] = (key, value)
        return value

    def sweep(self) -> None:
        for name in self._entries.keys() - self._used:
            del self._entries[name]
        self._used = set()


@dataclass(frozen=True)
class _EncodedHost:
    field: bytes  # RouteConfiguration.virtual_hosts entry, already framed
    cluster_refs: frozenset[str]


@dataclass(frozen=True)
class _Pieces:
    """What one destination service contributes to the sidecars that may call it."""

    clusters: tuple[Resource, ...]
    endpoints: tuple[Resource, ...]
    inline_host: _EncodedHost  # in a full `egress`
    vhds_host: Resource  # over VHDS, in a scoped one


class Translator:
    """Builds every role's snapshot; keeps the pieces of the last build to reuse them.

    `outbound_policy` says what sidecars do with hosts outside the mesh (ALLOW_ANY or
    REGISTRY_ONLY, as Istio's `outboundTrafficPolicy.mode`)."""

    def __init__(self, outbound_policy: str = ALLOW_ANY) -> None:
        self.outbound_policy = outbound_policy
        self._outside = _encode(outside_mesh_host(outbound_policy))
        self._vhds_egress = vhds_route_config()
        self._memo = _Memo()  # every piece, by a name that says what it is
        self._stripped = DyeNames.of(())
        self._rules: tuple[RuleSet, dict, dict] | None = None

    def build(
        self, rules: RuleSet, endpoints: Endpoints, scopes: Scopes | None = None
    ) -> dict[str, Snapshot]:
        """{snapshot key: snapshot}: every (service, group) of the rules' scoped view, the
        full views `scopes.full` asks for, and the gateway's."""
        scopes = scopes or Scopes()
        memo = self._memo
        hops, static_scopes = self._from_rules(rules)
        pieces = {
            name: self._pieces(rules.services[name], hops.get(name, ()), endpoints)
            for name in sorted(rules.services)
        }
        every = tuple(pieces.values())
        ids = _ids(every, "inline_host")
        cds = memo.get(CLUSTER, _ids(every, "clusters"), _map_of, every, "clusters")
        eds = memo.get(ENDPOINT, _ids(every, "endpoints"), _map_of, every, "endpoints")

        by_group: dict[GroupKey, list[ChainHop]] = {}
        for service_hops in hops.values():
            for entry in service_hops:
                by_group.setdefault(GroupKey(entry.hop.service, entry.hop.group), []).append(entry)
        snapshots: dict[str, Snapshot] = {}
        for name in pieces:
            service = rules.services[name]
            declared = static_scopes.get(name, {}).keys()
            for group in service.groups:
                key = GroupKey(name, group.name)
                role = role_name(name, group.name)
                mine = tuple(by_group.get(key, ()))
                count = len(endpoints.get(key, ()))
                inbound = memo.get(
                    ("inbound", role),
                    (service, mine, count),
                    _inbound_resource,
                    service,
                    group.name,
                    mine,
                    count,
                )
                callees = tuple(
                    sorted(c for c in {*declared, *scopes.sighted.get(key, ())} if c in pieces)
                )
                snapshots[role] = self._scoped(
                    role, callees, pieces, inbound, scopes.outside.get(key, ())
                )
                if key in scopes.full:
                    egress = memo.get(EGRESS_ROUTE, ids, self._full_egress, every, True)
                    routes = memo.get(
                        ("routes", full_view(role)),
                        (id(egress), id(inbound)),
                        ResourceMap,
                        (egress, inbound),
                    )
                    snapshots[full_view(role)] = memo.get(
                        ("snapshot", full_view(role)),
                        (id(cds), id(eds), id(routes)),
                        _snapshot,
                        cds,
                        eds,
                        routes,
                        _EMPTY,
                    )
        gateway = snapshots[GATEWAY_ROLE] = self._gateway(rules, every, ids, cds, eds)
        if GroupKey.parse(GATEWAY_ROLE) in scopes.full:  # the gateway holds the mesh either way
            snapshots[full_view(GATEWAY_ROLE)] = gateway
        memo.sweep()
        return snapshots

    # --- pieces ------------------------------------------------------------------------------

    def _from_rules(self, rules: RuleSet) -> tuple[dict, dict]:
        """What depends on the rules alone, once per RuleSet (instances change more often)."""
        if self._rules is None or self._rules[0] is not rules:
            self._rules = (rules, hops_by_service(rules), rule_scopes(rules))
        return self._rules[1], self._rules[2]

    def _pieces(
        self, service: Service, hops: tuple[ChainHop, ...], endpoints: Endpoints
    ) -> _Pieces:
        memo, name = self._memo, service.name
        clusters = []
        for group in service.groups:
            cname = cluster_name(name, group.name)
            clusters.append(
                memo.get(cname, None, _cluster_resource, group_cluster, name, group.name)
            )
        loose = sorted(
            {
                e.hop.group
                for e in hops
                if e.chain.fallback == "loose" and e.hop.group != DEFAULT_GROUP
            }
        )
        for group_name in loose:
            clusters.append(
                memo.get(
                    loose_cluster_name(name, group_name),
                    None,
                    _cluster_resource,
                    loose_cluster,
                    name,
                    group_name,
                )
            )
        assignments = []
        for group in service.groups:
            addresses = tuple(sorted(endpoints.get(GroupKey(name, group.name), ())))
            assignments.append(
                memo.get(
                    ("endpoints", name, group.name),
                    addresses,
                    _assignment_resource,
                    name,
                    group.name,
                    addresses,
                )
            )
        host = memo.get(("host", name), (service, hops), egress_virtual_host, service, hops)
        # The tuples are memoised too: maps keyed on them survive a change of the host alone.
        clusters_t = memo.get(("clusters", name), tuple(map(id, clusters)), tuple, clusters)
        assignments_t = memo.get(
            ("assignments", name), tuple(map(id, assignments)), tuple, assignments
        )
        inline = memo.get(("inline", name), id(host), _encode, host)
        scoped = memo.get(("vhds", name), id(host), vhds_host, host)
        return _Pieces(clusters_t, assignments_t, inline, scoped)

    def _scoped(
        self,
        role: str,
        callees: tuple[str, ...],
        pieces: Mapping[str, _Pieces],
        inbound: Resource,
        outside: tuple[str, ...],
    ) -> Snapshot:
        """A Delta sidecar's snapshot: its scope's clusters, endpoints and hosts. Maps are
        memoised by scope, so the roles that call the same services share them."""
        memo = self._memo
        mine = tuple(pieces[c] for c in callees)
        cds = memo.get(("cds", callees), _ids(mine, "clusters"), _map_of, mine, "clusters")
        eds = memo.get(("eds", callees), _ids(mine, "endpoints"), _map_of, mine, "endpoints")
        outside_res = memo.get(
            ("outside", outside), None, outside_host, self.outbound_policy, outside
        )
        hosts = memo.get(
            ("vhds", callees, outside),
            (_ids(mine, "vhds_host"), id(outside_res)),
            lambda: ResourceMap([*(p.vhds_host for p in mine), outside_res]),
        )
        routes = memo.get(("routes", role), id(inbound), ResourceMap, (self._vhds_egress, inbound))
        return memo.get(
            ("snapshot", role),
            (id(cds), id(eds), id(routes), id(hosts)),
            _snapshot,
            cds,
            eds,
            routes,
            hosts,
        )

    def _full_egress(self, every: Sequence[_Pieces], outside: bool) -> Resource:
        """`egress` with every service's host inline (SotW sidecars, the gateway); the
        sidecars' ends with the outside-mesh host, the gateway's does not: callers from
        outside must not reach past the mesh through it."""
        hosts = [p.inline_host for p in every] + ([self._outside] if outside else [])
        payload = wire.text(1, EGRESS_ROUTE) + b"".join(h.field for h in hosts)
        refs = frozenset().union(*(h.cluster_refs for h in hosts))
        return Resource.encoded(ROUTE, EGRESS_ROUTE, payload, refs)

    def _gateway(
        self,
        rules: RuleSet,
        every: tuple[_Pieces, ...],
        ids: tuple[int, ...],
        cds: ResourceMap,
        eds: ResourceMap,
    ) -> Snapshot:
        memo = self._memo
        egress = memo.get(("egress", GATEWAY_ROLE), ids, self._full_egress, every, False)
        routes = memo.get(("routes", GATEWAY_ROLE), id(egress), ResourceMap, (egress,))
        # The filter strips every carrier a chain has used while this process ran (each replica
        # keeps its own), not only the current ones: it goes out before the routes
        # (make-before-break), so a deleted chain's header would otherwise reach routes that
        # still honour it for a round trip.
        names = self._stripped = self._stripped.union(DyeNames.of(rules.chains.values()))
        filters = memo.get(EXTENSION_CONFIG, names, _gateway_filters, names)
        return memo.get(
            ("snapshot", GATEWAY_ROLE),
            (id(cds), id(eds), id(routes), id(filters)),
            lambda: Snapshot(
                {
                    CLUSTER: cds,
                    ENDPOINT: eds,
                    LISTENER: _EMPTY,
                    ROUTE: routes,
                    EXTENSION_CONFIG: filters,
                }
            ),
        )


def _ids(pieces: Sequence[_Pieces], kind: str) -> tuple[int, ...]:
    """A memo key: the identities of one kind of piece (rebuilt pieces are new objects)."""
    return tuple(id(getattr(p, kind)) for p in pieces)


def _map_of(pieces: Sequence[_Pieces], kind: str) -> ResourceMap:
    return ResourceMap(chain.from_iterable(getattr(p, kind) for p in pieces))


def _snapshot(
    cds: ResourceMap, eds: ResourceMap, routes: ResourceMap, hosts: ResourceMap
) -> Snapshot:
    return Snapshot(
        {CLUSTER: cds, ENDPOINT: eds, LISTENER: _EMPTY, ROUTE: routes, VIRTUAL_HOST: hosts}
    )


def _cluster_resource(build: Callable, service: str, group: str) -> Resource:
    return Resource.of(build(service, group))


def _gateway_filters(names: DyeNames) -> ResourceMap:
    return ResourceMap([dye_filter(names)])


def _assignment_resource(service: str, group: str, addresses: Sequence[Address]) -> Resource:
    return Resource.of(load_assignment(service, group, addresses))


def _inbound_resource(service: Service, group: str, hops: Sequence[ChainHop], n: int) -> Resource:
    return Resource.of(inbound_route(service, group, hops, n))


def _encode(host: route_pb2.VirtualHost) -> _EncodedHost:
    clusters, _ = references(host)
    return _EncodedHost(wire.field(2, host.SerializeToString(deterministic=True)), clusters)
