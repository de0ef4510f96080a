"""The memoising translator: every role's snapshot from the rules and the registered
instances, rebuilding only the pieces whose inputs changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from envoy.config.route.v3 import route_components_pb2 as route_pb2

from controlplane.model.group import DEFAULT_GROUP, GroupKey
from controlplane.model.rules import RuleSet, Service
from controlplane.translate.clusters import group_cluster, load_assignment, loose_cluster
from controlplane.translate.common import Address, ChainHop, Endpoints
from controlplane.translate.egress import egress_virtual_host, outside_mesh_host
from controlplane.translate.gateway import DyeNames, dye_filter
from controlplane.translate.inbound import inbound_route
from controlplane.xds import wire
from controlplane.xds.names import (
    ALLOW_ANY,
    EGRESS_ROUTE,
    GATEWAY_DYE_FILTER,
    GATEWAY_ROLE,
    cluster_name,
    loose_cluster_name,
    role_name,
)
from controlplane.xds.snapshot import Resource, ResourceMap, Snapshot, references
from controlplane.xds.types import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE

T = TypeVar("T")


_EMPTY = ResourceMap()


_GATEWAY_EGRESS = (EGRESS_ROUTE, GATEWAY_ROLE)  # memo key of the gateway's `egress`


def hops_by_service(rules: RuleSet) -> dict[str, tuple[ChainHop, ...]]:
    """service -> the chains with a hop on it, in chain-name order."""
    out: dict[str, list[ChainHop]] = {}
    for name in sorted(rules.chains):
        chain = rules.chains[name]
        for hop in chain.hops:
            out.setdefault(hop.service, []).append(ChainHop(chain, hop))
    return {service: tuple(entries) for service, entries in out.items()}


class _Memo:
    """Last (key, value) per name: a piece is rebuilt only when its inputs changed."""

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

    def keep_only(self, names: set) -> None:
        for name in set(self._entries) - names:
            del self._entries[name]


@dataclass(frozen=True)
class _EncodedHost:
    field: bytes  # RouteConfiguration.virtual_hosts entry, already framed
    cluster_refs: frozenset[str]


class Translator:
    """Builds every role's snapshot; keeps the pieces of the last build to reuse them.

    `outbound_policy` says what sidecars do with hosts outside the mesh (ALLOW_ANY or
    REGISTRY_ONLY, as Istio's `outboundTrafficPolicy.mode`)."""

    def __init__(self, outbound_policy: str = ALLOW_ANY) -> None:
        self._outside = _encode(outside_mesh_host(outbound_policy))
        self._hosts = _Memo()
        self._clusters = _Memo()
        self._endpoints = _Memo()
        self._inbound = _Memo()
        self._maps = _Memo()
        self._stripped = DyeNames.of(())

    def build(self, rules: RuleSet, endpoints: Endpoints) -> dict[str, Snapshot]:
        """{role: snapshot} for every (service, group) of the rules, plus the gateway."""
        hops = hops_by_service(rules)
        services = [rules.services[name] for name in sorted(rules.services)]

        clusters = self._build_clusters(services, hops)
        assignments = self._build_endpoints(services, endpoints)
        egress, gateway_egress = self._build_egress(services, hops)
        # Keys are object ids: a piece that was not rebuilt is the very same object.
        cds = self._maps.get(CLUSTER, tuple(map(id, clusters)), ResourceMap, clusters)
        eds = self._maps.get(ENDPOINT, tuple(map(id, assignments)), ResourceMap, assignments)
        shared = {CLUSTER: cds, ENDPOINT: eds, LISTENER: _EMPTY}

        by_group: dict[GroupKey, list[ChainHop]] = {}
        for service_hops in hops.values():
            for entry in service_hops:
                by_group.setdefault((entry.hop.service, entry.hop.group), []).append(entry)
        snapshots: dict[str, Snapshot] = {}
        roles: set[str] = set()
        for service in services:
            for group in service.groups:
                role = role_name(service.name, group.name)
                roles.add(role)
                mine = tuple(by_group.get((service.name, group.name), ()))
                count = len(endpoints.get((service.name, group.name), ()))
                key = (service, mine, count)
                inbound = self._inbound.get(
                    role, key, _inbound_resource, service, group.name, mine, count
                )
                routes = self._maps.get(
                    role, (id(egress), id(inbound)), ResourceMap, (egress, inbound)
                )
                snapshots[role] = Snapshot({**shared, ROUTE: routes})
        gateway_routes = self._maps.get(
            GATEWAY_ROLE, id(gateway_egress), ResourceMap, (gateway_egress,)
        )
        # The filter strips every carrier a chain has used while this process ran (each replica
        # keeps its own), not only the current ones: it goes out before the routes
        # (make-before-break), so a deleted chain's header would otherwise reach routes that
        # still honour it for a round trip.
        names = self._stripped = self._stripped.union(DyeNames.of(rules.chains.values()))
        filters = self._maps.get(GATEWAY_DYE_FILTER, names, _gateway_filters, names)
        snapshots[GATEWAY_ROLE] = Snapshot(
            {**shared, ROUTE: gateway_routes, EXTENSION_CONFIG: filters}
        )
        self._inbound.keep_only(roles)
        kept = {GATEWAY_ROLE, GATEWAY_DYE_FILTER, CLUSTER, ENDPOINT, EGRESS_ROUTE, _GATEWAY_EGRESS}
        self._maps.keep_only(roles | kept)
        return snapshots

    def _build_clusters(
        self, services: list[Service], hops: dict[str, tuple[ChainHop, ...]]
    ) -> list[Resource]:
        wanted: dict[str, tuple] = {}
        for service in services:
            for group in service.groups:
                name = cluster_name(service.name, group.name)
                wanted[name] = (group_cluster, service.name, group.name)
            for entry in hops.get(service.name, ()):
                if entry.chain.fallback == "loose" and entry.hop.group != DEFAULT_GROUP:
                    name = loose_cluster_name(service.name, entry.hop.group)
                    wanted[name] = (loose_cluster, service.name, entry.hop.group)
        self._clusters.keep_only(set(wanted))
        return [
            self._clusters.get(name, key, lambda k: Resource.of(k[0](*k[1:])), key)
            for name, key in wanted.items()
        ]

    def _build_endpoints(self, services: list[Service], endpoints: Endpoints) -> list[Resource]:
        out, names = [], set()
        for service in services:
            for group in service.groups:
                addresses = tuple(sorted(endpoints.get((service.name, group.name), ())))
                name = cluster_name(service.name, group.name)
                names.add(name)
                out.append(
                    self._endpoints.get(
                        name, addresses, _assignment_resource, service.name, group.name, addresses
                    )
                )
        self._endpoints.keep_only(names)
        return out

    def _build_egress(
        self, services: list[Service], hops: dict[str, tuple[ChainHop, ...]]
    ) -> tuple[Resource, Resource]:
        """`egress` of the sidecars (the services, then every other host as the outbound
        policy says) and of the gateway (the services only: callers from outside must not
        reach past the mesh through it)."""
        hosts = []
        for service in services:
            mine = hops.get(service.name, ())
            hosts.append(
                self._hosts.get(service.name, (service, mine), _encode_host, service, mine)
            )
        self._hosts.keep_only({s.name for s in services})

        def assemble(*extra: _EncodedHost) -> Resource:
            every = (*hosts, *extra)
            payload = wire.text(1, EGRESS_ROUTE) + b"".join(h.field for h in every)
            refs = frozenset().union(*(h.cluster_refs for h in every))
            return Resource.encoded(ROUTE, EGRESS_ROUTE, payload, refs)

        key = tuple(map(id, hosts))
        sidecars = self._maps.get(EGRESS_ROUTE, key, assemble, self._outside)
        return sidecars, self._maps.get(_GATEWAY_EGRESS, key, assemble)


def _gateway_filters(names: DyeNames) -> ResourceMap:
    return ResourceMap([dye_filter(names)])


def _assignment_resource(service: str, group: str, addresses: Sequence[Address]) -> Resource:
    return Resource.of(load_assignment(service, group, addresses))


def _inbound_resource(service: Service, group: str, hops: Sequence[ChainHop], n: int) -> Resource:
    return Resource.of(inbound_route(service, group, hops, n))


def _encode_host(service: Service, hops: Sequence[ChainHop]) -> _EncodedHost:
    return _encode(egress_virtual_host(service, hops))


def _encode(host: route_pb2.VirtualHost) -> _EncodedHost:
    clusters, _ = references(host)
    return _EncodedHost(wire.field(2, host.SerializeToString(deterministic=True)), clusters)
