"""The memoising translator: every role's snapshot from the rules, the registered instances
and the roles' scopes, rebuilding only the pieces whose inputs changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import TypeVar

from envoy.config.route.v3 import route_components_pb2 as route_pb2

from controlplane.model.group import DEFAULT_GROUP, SEPARATOR, GroupKey
from controlplane.model.rules import RuleSet, Service
from controlplane.model.scope import chain_callees
from controlplane.translate.clusters import (
    group_cluster_bytes,
    load_assignment_bytes,
    loose_cluster,
)
from controlplane.translate.common import Address, ChainHop, Endpoints
from controlplane.translate.egress import egress_virtual_host, host_clusters, outside_mesh_host
from controlplane.translate.gateway import DyeNames, dye_filter
from controlplane.translate.inbound import inbound_route
from controlplane.translate.scope import Scopes, outside_host, vhds_host, vhds_route_config
from controlplane.xds import wire
from controlplane.xds.names import (
    ALLOW_ANY,
    EGRESS_ROUTE,
    GATEWAY_ROLE,
    LOCAL_APP_CLUSTER,
    cluster_name,
    full_view,
    loose_cluster_name,
    role_name,
    view_role,
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
_KINDS = ("clusters", "endpoints", "inline_host", "vhds_host")  # the fields of _Pieces
# References of the pieces whose shape says them (Resource.of walks the others).
_TO_APP = (frozenset({LOCAL_APP_CLUSTER}), frozenset())
# Rules changed beyond this many (chains + services) are derived afresh, not service by service.
_INCREMENTAL_LIMIT = 64
# Pieces of services, roles and scopes that are gone are forgotten when the services change,
# and every this many builds (scopes also change with what sidecars ask for).
_SWEEP_EVERY = 64


def hops_by_service(rules: RuleSet) -> dict[str, tuple[ChainHop, ...]]:
    """service -> the chains with a hop on it, in chain-name order: what a build derives."""
    return Translator()._from_rules(rules)[0]


class _Memo:
    """Last (key, value) per name: a piece is rebuilt only when its inputs changed. A name
    is a string (a global piece, or a cluster `service|group...`) or a tuple whose second
    item owns it (a service, a role, a scope); `sweep` forgets the pieces of owners gone."""

    def __init__(self) -> None:
        self._entries: dict[object, tuple[object, object]] = {}

    def get(self, name: object, key: object, build: Callable[..., T], *args: object) -> T:
        """The value built last time for `name` if `key` is unchanged, else build(*args)."""
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        value = build(*args)
        self._entries[name] = (key, value)
        return value

    def sweep(self, live: set[object]) -> None:
        """Forget the pieces whose owner is not in `live` (global pieces stay)."""
        for name in list(self._entries):
            if isinstance(name, tuple):
                owner = name[1]
            elif SEPARATOR in name:
                owner = name.partition(SEPARATOR)[0]
            else:
                continue
            if owner not in live:
                del self._entries[name]


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
        self._rules: tuple | None = None  # (rules, what _from_rules derived from them)
        self._chains: dict[str, tuple] = {}  # name -> (chain, its ChainHops, chain_callees)
        self._chains_of: dict[str, set[str]] = {}  # service -> chains with a hop on it
        self._services: dict[str, tuple[tuple, _Pieces]] = {}  # name -> (inputs, pieces)
        # service -> (the scopes and outside hosts its groups' scoped views are memoised by,
        # the rules' callees and no outside host first; {role: snapshot} of those views)
        self._views: dict[str, tuple[list[tuple[str, ...]], dict[str, Snapshot]]] = {}
        self._builds = 0
        # Whole-mesh maps (the gateway's, full views) are keyed on a generation per kind of
        # piece, bumped when a service's piece of that kind is new: no pass over every piece.
        self._generation = dict.fromkeys(_KINDS, 0)

    def build(
        self, rules: RuleSet, endpoints: Endpoints, scopes: Scopes | None = None
    ) -> dict[str, Snapshot]:
        """{snapshot key: snapshot}: every (service, group) of the rules' scoped view, the
        full views `scopes.full` asks for, and the gateway's.

        Incremental: a service whose inputs (rule, chains' hops, endpoints) are unchanged
        keeps its pieces; a role whose scope and inbound route are unchanged and holds no
        changed service keeps its snapshot, without looking at its pieces. So a one-chain
        change costs the chain's services and the roles that hold them, plus one pass over
        the services (a 10,000-service mesh: bench/translate.py)."""
        scopes = scopes or Scopes()
        memo = self._memo
        services_before = self._rules[2].keys() if self._rules is not None else None
        hops, static, by_group = self._from_rules(rules)
        pieces: dict[str, _Pieces] = {}
        changed: set[str] = set()  # services whose pieces are new
        moved: set[str] = set()  # services whose inputs changed (their inbound routes may)
        if services_before != static.keys():
            self._generation.update((kind, self._generation[kind] + 1) for kind in _KINDS)
        for name in static:
            service = rules.services[name]
            inputs = (
                service,
                hops.get(name, ()),
                *(endpoints.get((name, g.name)) for g in service.groups),
            )
            last = self._services.get(name)
            if last is not None and last[0] == inputs:
                pieces[name] = last[1]
                continue
            built = self._pieces(service, inputs[1], endpoints)
            self._services[name] = (inputs, built)
            pieces[name] = built
            moved.add(name)
            if last is None or last[1] is not built:
                changed.add(name)
                for kind in _KINDS:
                    if last is None or getattr(last[1], kind) is not getattr(built, kind):
                        self._generation[kind] += 1
        every = tuple(pieces.values())
        dynamic = {k.service for k in scopes.sighted} | {k.service for k in scopes.outside}
        dynamic |= {k.service for k in scopes.full}
        snapshots: dict[str, Snapshot] = {}
        for name, callees in static.items():
            views = self._views.get(name)
            if (
                views is not None
                and name not in moved
                and name not in dynamic
                and views[0] == [callees, ()]  # built from the rules alone, last time too
                and changed.isdisjoint(callees)
            ):
                snapshots.update(views[1])
                continue
            service = rules.services[name]
            views_now: dict[str, Snapshot] = {}
            owners: list[tuple[str, ...]] = [callees, ()]  # the scopes its maps are kept by
            shared = None  # the maps of its groups whose sidecars asked for nothing
            for group in service.groups:
                key = GroupKey(name, group.name)
                role = role_name(name, group.name)
                mine = by_group.get(key, ())
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
                sighted = scopes.sighted.get(key)
                scope = (
                    tuple(sorted({*callees, *(c for c in sighted if c in pieces)}))
                    if sighted
                    else callees
                )
                outside = scopes.outside.get(key, ())
                if sighted or outside:
                    maps = self._scope_maps(scope, pieces, outside)
                    owners += [scope, outside]
                else:
                    maps = shared = shared or self._scope_maps(callees, pieces, ())
                routes = memo.get(
                    ("routes", role), id(inbound), ResourceMap, (self._vhds_egress, inbound)
                )
                views_now[role] = memo.get(
                    ("snapshot", role), (id(maps), id(routes)), _snapshot, *maps, routes
                )
                if key in scopes.full:
                    snapshots[full_view(role)] = self._full(role, every, inbound)
            self._views[name] = (owners, views_now)
            snapshots.update(views_now)
        snapshots[GATEWAY_ROLE] = self._gateway(rules, every)
        if GroupKey.parse(GATEWAY_ROLE) in scopes.full:
            snapshots[full_view(GATEWAY_ROLE)] = self._gateway(rules, every, full=True)
        self._builds += 1
        if services_before != static.keys() or self._builds % _SWEEP_EVERY == 0:
            self._sweep(snapshots)
        return snapshots

    def _sweep(self, snapshots: Mapping[str, Snapshot]) -> None:
        """Forget what belongs to services, roles and scopes no longer built."""
        live: set[object] = {*snapshots, *(view_role(key)[0] for key in snapshots)}
        live.update(self._rules[2])  # the services
        for gone in self._services.keys() - live:
            del self._services[gone]
        for gone in self._views.keys() - live:
            del self._views[gone]
        for views in self._views.values():
            live.update(views[0])
        self._memo.sweep(live)

    # --- pieces ------------------------------------------------------------------------------

    def _from_rules(
        self, rules: RuleSet
    ) -> tuple[dict[str, tuple[ChainHop, ...]], dict[str, tuple[str, ...]], dict]:
        """What depends on the rules alone, once per RuleSet (instances change more often):
        each service's chain hops, its callees by the rules (model/scope.py; in name order,
        services in name order), and each group's chain hops. Redone for the services the
        change touched when the services stay and a few rules changed (the usual apply)."""
        if self._rules is not None and self._rules[0] is rules:
            return self._rules[1], self._rules[2], self._rules[3]
        before = self._rules[0] if self._rules is not None else None
        touched = _touched(before, rules) if before is not None else None
        if touched is None or len(touched[0]) + len(touched[1]) > _INCREMENTAL_LIMIT:
            self._chains, self._chains_of = {}, {}
            hops, static, by_group = {}, {}, {}
            chains, services = set(rules.chains), set(rules.services)
        else:  # the same services: every dict keeps its order (services by name)
            hops, static, by_group = self._rules[1], self._rules[2], self._rules[3]
            chains, services = touched
            for name in chains:  # the services the old version of a changed chain had
                for entry in self._chains.pop(name, (None, ()))[1]:
                    services.add(entry.hop.service)
                    self._chains_of[entry.hop.service].discard(name)
        for name in chains:
            chain_ = rules.chains.get(name)
            if chain_ is None:
                continue
            entries = tuple(ChainHop(chain_, hop) for hop in chain_.hops)
            self._chains[name] = (chain_, entries, chain_callees(chain_))
            for entry in entries:
                self._chains_of.setdefault(entry.hop.service, set()).add(name)
                services.add(entry.hop.service)
        for name in sorted(services):
            self._derive(rules, name, hops, static, by_group)
        self._rules = (rules, hops, static, by_group)
        return hops, static, by_group

    def _derive(
        self,
        rules: RuleSet,
        name: str,
        hops: dict[str, tuple[ChainHop, ...]],
        static: dict[str, tuple[str, ...]],
        by_group: dict[GroupKey, tuple[ChainHop, ...]],
    ) -> None:
        """One service's chain hops (in chain-name order), callees and groups' hops."""
        service = rules.services.get(name)
        chain_names = sorted(self._chains_of.get(name, ()))
        entries = tuple(
            entry
            for chain_name in chain_names
            for entry in self._chains[chain_name][1]
            if entry.hop.service == name
        )
        for entry in hops.pop(name, ()):
            by_group.pop(GroupKey(name, entry.hop.group), None)
        if service is None:
            static.pop(name, None)
            return
        if entries:
            hops[name] = entries
            grouped: dict[GroupKey, list[ChainHop]] = {}
            for entry in entries:
                grouped.setdefault(GroupKey(name, entry.hop.group), []).append(entry)
            by_group.update((key, tuple(found)) for key, found in grouped.items())
        callees = set(service.calls)
        for chain_name in chain_names:
            callees.update(self._chains[chain_name][2].get(name, ()))
        static[name] = tuple(sorted(c for c in callees if c in rules.services))

    def _pieces(
        self, service: Service, hops: tuple[ChainHop, ...], endpoints: Endpoints
    ) -> _Pieces:
        memo, name = self._memo, service.name
        clusters = []
        for group in service.groups:
            cname = cluster_name(name, group.name)
            clusters.append(memo.get(cname, None, _group_cluster_resource, name, group.name))
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
                    _loose_cluster_resource,
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
        # A loose fallback says whether its group had no instance at all: the host changes
        # when one of those groups empties or fills, not with every instance.
        empty = frozenset(g for g in loose if not endpoints.get(GroupKey(name, g)))
        host = memo.get(
            ("host", name), (service, hops, empty), egress_virtual_host, service, hops, empty
        )
        # The tuples are memoised too: maps keyed on them survive a change of the host alone.
        clusters_t = memo.get(("clusters", name), tuple(map(id, clusters)), tuple, clusters)
        assignments_t = memo.get(
            ("assignments", name), tuple(map(id, assignments)), tuple, assignments
        )
        # Keyed by content: a chain's change rebuilds the hosts of all its services, and only
        # those whose routes really changed are new pieces (their callers' views move).
        content = memo.get(("content", name), id(host), _serialized, host)
        refs = host_clusters(service, hops)
        scoped = memo.get(("vhds", name), content, vhds_host, name, content, refs)
        inline = memo.get(("inline", name), content, _inline, content, scoped)
        return memo.get(
            ("pieces", name),
            (id(clusters_t), id(assignments_t), id(inline), id(scoped)),
            _Pieces,
            clusters_t,
            assignments_t,
            inline,
            scoped,
        )

    def _scope_maps(
        self, scope: tuple[str, ...], pieces: Mapping[str, _Pieces], outside: tuple[str, ...]
    ) -> tuple[ResourceMap, ResourceMap, ResourceMap]:
        """(clusters, endpoints, hosts) of a scoped view. Memoised by scope, so the roles
        that call the same services share them, and each map by its own pieces: a host's
        change keeps the clusters and endpoints maps."""
        memo = self._memo
        mine = tuple(pieces[c] for c in scope)
        outside_res = memo.get(
            ("outside", outside), None, outside_host, self.outbound_policy, outside
        )
        return memo.get(
            ("scope", scope, outside),
            (tuple(map(id, mine)), id(outside_res)),
            self._new_scope_maps,
            scope,
            mine,
            outside,
            outside_res,
        )

    def _new_scope_maps(
        self,
        scope: tuple[str, ...],
        mine: tuple[_Pieces, ...],
        outside: tuple[str, ...],
        outside_res: Resource,
    ) -> tuple[ResourceMap, ResourceMap, ResourceMap]:
        memo = self._memo
        cds = memo.get(("cds", scope), _ids(mine, "clusters"), _map_of, mine, "clusters")
        eds = memo.get(("eds", scope), _ids(mine, "endpoints"), _map_of, mine, "endpoints")
        hosts = memo.get(
            ("vhds", scope, outside),
            (_ids(mine, "vhds_host"), id(outside_res)),
            lambda: ResourceMap([*(p.vhds_host for p in mine), outside_res]),
        )
        return cds, eds, hosts

    def _everything(self, every: tuple[_Pieces, ...]) -> tuple[ResourceMap, ResourceMap]:
        """(clusters, endpoints) of the whole mesh: full views and the gateway."""
        memo = self._memo
        generation = self._generation
        cds = memo.get(CLUSTER, generation["clusters"], _map_of, every, "clusters")
        eds = memo.get(ENDPOINT, generation["endpoints"], _map_of, every, "endpoints")
        return cds, eds

    def _full(self, role: str, every: tuple[_Pieces, ...], inbound: Resource) -> Snapshot:
        """A state-of-the-world sidecar's snapshot: the whole mesh, as before scoping."""
        memo = self._memo
        cds, eds = self._everything(every)
        ids = self._generation["inline_host"]
        egress = memo.get(EGRESS_ROUTE, ids, self._full_egress, every, True)
        routes = memo.get(
            ("routes", full_view(role)), (id(egress), id(inbound)), ResourceMap, (egress, inbound)
        )
        return memo.get(
            ("snapshot", full_view(role)),
            (id(cds), id(eds), id(routes)),
            _snapshot,
            cds,
            eds,
            _EMPTY,
            routes,
        )

    def _full_egress(self, every: Sequence[_Pieces], outside: bool) -> Resource:
        """`egress` with every service's host inline (SotW sidecars, the gateway); the
        sidecars' ends with the outside-mesh host, the gateway's does not: callers from
        outside must not reach past the mesh through it."""
        hosts = [p.inline_host for p in every] + ([self._outside] if outside else [])
        payload = wire.text(1, EGRESS_ROUTE) + b"".join(h.field for h in hosts)
        refs = frozenset().union(*(h.cluster_refs for h in hosts))
        return Resource.encoded(ROUTE, EGRESS_ROUTE, payload, refs)

    def _gateway(self, rules: RuleSet, every: tuple[_Pieces, ...], full: bool = False) -> Snapshot:
        """The gateway: the whole mesh and the dye filter, no inbound. Its `egress` names
        every service's host and nothing outside the mesh (callers from outside must not
        reach past it): over VHDS for a Delta gateway, inline in its full view."""
        memo = self._memo
        cds, eds = self._everything(every)
        if full:
            ids = self._generation["inline_host"]
            egress = memo.get(("egress", GATEWAY_ROLE), ids, self._full_egress, every, False)
            routes = memo.get(
                ("routes", full_view(GATEWAY_ROLE)), id(egress), ResourceMap, (egress,)
            )
            hosts = _EMPTY
        else:
            routes = memo.get(("routes", GATEWAY_ROLE), None, ResourceMap, (self._vhds_egress,))
            hosts = memo.get(
                ("vhds", GATEWAY_ROLE),
                self._generation["vhds_host"],
                lambda: ResourceMap(p.vhds_host for p in every),
            )
        # The filter strips every carrier a chain has used while this process ran (each replica
        # keeps its own), not only the current ones: it goes out before the routes
        # (make-before-break), so a deleted chain's header would otherwise reach routes that
        # still honour it for a round trip.
        names = self._stripped = self._stripped.union(DyeNames.of(rules.chains.values()))
        filters = memo.get(EXTENSION_CONFIG, names, _gateway_filters, names)
        key = full_view(GATEWAY_ROLE) if full else GATEWAY_ROLE
        return memo.get(
            ("snapshot", key),
            (id(cds), id(eds), id(routes), id(hosts), id(filters)),
            lambda: Snapshot(
                {
                    CLUSTER: cds,
                    ENDPOINT: eds,
                    LISTENER: _EMPTY,
                    ROUTE: routes,
                    VIRTUAL_HOST: hosts,
                    EXTENSION_CONFIG: filters,
                }
            ),
        )


def _touched(before: RuleSet, rules: RuleSet) -> tuple[set[str], set[str]] | None:
    """(chains, services) that differ between two rule sets with the same services; None
    when services came or went (everything is derived again)."""
    if before.services.keys() != rules.services.keys():
        return None
    services = {n for n, s in rules.services.items() if before.services[n] is not s}
    names = before.chains.keys() | rules.chains.keys()
    chains = {n for n in names if before.chains.get(n) is not rules.chains.get(n)}
    return chains, services


def _ids(pieces: Sequence[_Pieces], kind: str) -> tuple[int, ...]:
    """A memo key: the identities of one kind of piece (rebuilt pieces are new objects)."""
    return tuple(id(getattr(p, kind)) for p in pieces)


def _map_of(pieces: Sequence[_Pieces], kind: str) -> ResourceMap:
    return ResourceMap(chain.from_iterable(getattr(p, kind) for p in pieces))


def _snapshot(
    cds: ResourceMap, eds: ResourceMap, hosts: ResourceMap, routes: ResourceMap
) -> Snapshot:
    return Snapshot(
        {CLUSTER: cds, ENDPOINT: eds, LISTENER: _EMPTY, ROUTE: routes, VIRTUAL_HOST: hosts}
    )


def _loose_cluster_resource(service: str, group: str) -> Resource:
    return Resource.of(loose_cluster(service, group))  # an aggregate: its children are walked


def _gateway_filters(names: DyeNames) -> ResourceMap:
    return ResourceMap([dye_filter(names)])


def _assignment_resource(service: str, group: str, addresses: Sequence[Address]) -> Resource:
    payload = load_assignment_bytes(service, group, addresses)
    return Resource.encoded(ENDPOINT, cluster_name(service, group), payload)


def _group_cluster_resource(service: str, group: str) -> Resource:
    payload = group_cluster_bytes(service, group)
    return Resource.encoded(CLUSTER, cluster_name(service, group), payload)


def _inbound_resource(service: Service, group: str, hops: Sequence[ChainHop], n: int) -> Resource:
    """An inbound route only ever leads to the sidecar's own app (or answers itself)."""
    return Resource.of(inbound_route(service, group, hops, n), _TO_APP)


def _serialized(host: route_pb2.VirtualHost) -> bytes:
    return host.SerializeToString(deterministic=True)


def _inline(content: bytes, scoped: Resource) -> _EncodedHost:
    """A host's entry in a full `egress`: its bytes, naming what its VHDS twin names."""
    return _EncodedHost(wire.field(2, content), scoped.cluster_refs)


def _encode(host: route_pb2.VirtualHost) -> _EncodedHost:
    clusters, _ = references(host)
    return _EncodedHost(wire.field(2, host.SerializeToString(deterministic=True)), clusters)
