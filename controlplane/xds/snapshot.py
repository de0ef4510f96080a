"""Resources serialised once per version, and immutable per-role snapshots of them."""

from __future__ import annotations

import hashlib
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, replace

from google.protobuf import any_pb2, message_factory
from google.protobuf.message import Message

from . import wire
from .types import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    MESSAGE_CLASS,
    PUSH_ORDER,
    ROUTE,
    VIRTUAL_HOST,
    type_url_of,
)

# Fields through which one resource names another, by message type. Walked once per
# resource version so the server knows which clusters a route still needs (make-before-break)
# and the snapshot can be checked for dangling names before it is published.
_CLUSTER_REFS = {
    "envoy.config.route.v3.RouteAction": ("cluster",),
    "envoy.config.route.v3.WeightedCluster.ClusterWeight": ("name",),
    "envoy.extensions.clusters.aggregate.v3.ClusterConfig": ("clusters",),
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy": ("cluster",),
}
_ROUTE_REFS = {
    "envoy.extensions.filters.network.http_connection_manager.v3.Rds": ("route_config_name",),
}


def _version(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


def _unpack_any(value: any_pb2.Any) -> Message | None:
    try:
        descriptor = value.DESCRIPTOR.file.pool.FindMessageTypeByName(value.TypeName())
    except KeyError:
        return None
    inner = message_factory.GetMessageClass(descriptor)()
    value.Unpack(inner)
    return inner


def _walk_refs(message: Message, clusters: set[str], routes: set[str]) -> None:
    name = message.DESCRIPTOR.full_name
    for field_name in _CLUSTER_REFS.get(name, ()):
        value = getattr(message, field_name)
        clusters.update([value] if isinstance(value, str) else value)
    for field_name in _ROUTE_REFS.get(name, ()):
        routes.add(getattr(message, field_name))
    if name == "google.protobuf.Any":
        inner = _unpack_any(message)
        if inner is not None:
            _walk_refs(inner, clusters, routes)
        return
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            values = value.values() if fd.message_type.fields_by_name["value"].message_type else ()
        elif fd.is_repeated:
            values = value
        else:
            values = (value,)
        for item in values:
            _walk_refs(item, clusters, routes)
    clusters.discard("")
    routes.discard("")


def references(message: Message) -> tuple[frozenset[str], frozenset[str]]:
    """(cluster names, route config names) that a message refers to, however deeply."""
    clusters: set[str] = set()
    routes: set[str] = set()
    _walk_refs(message, clusters, routes)
    return frozenset(clusters), frozenset(routes)


@dataclass(frozen=True, slots=True, eq=False)
class Resource:
    """One named Envoy resource at one version, with its wire encodings precomputed."""

    type_url: str
    name: str
    version: str
    payload: bytes  # the serialised message
    sotw_entry: bytes  # DiscoveryResponse.resources[] entry (an Any)
    delta_entry: bytes  # DeltaDiscoveryResponse.resources[] entry (a Resource)
    cluster_refs: frozenset[str]
    route_refs: frozenset[str]

    @classmethod
    def of(
        cls, message: Message, refs: tuple[frozenset[str], frozenset[str]] | None = None
    ) -> Resource:
        """`refs`, (clusters, route configs) the message names, when the caller knows them:
        walking a big message for them costs more than building it (the translator's
        inbound routes; tests/unit/test_translator_build.py checks what it declares)."""
        type_url = type_url_of(message)
        name = message.name if type_url != ENDPOINT else message.cluster_name
        clusters, routes = refs if refs is not None else references(message)
        return cls.encoded(
            type_url, name, message.SerializeToString(deterministic=True), clusters, routes
        )

    @classmethod
    def encoded(
        cls,
        type_url: str,
        name: str,
        payload: bytes,
        cluster_refs: Iterable[str] = (),
        route_refs: Iterable[str] = (),
    ) -> Resource:
        """A resource from its serialised message, for callers that assemble the bytes
        themselves (the translator concatenates cached virtual hosts) and know its references."""
        version = _version(payload)
        any_bytes = wire.any_message(type_url, payload)
        return cls(
            type_url=type_url,
            name=name,
            version=version,
            payload=payload,
            sotw_entry=wire.field(2, any_bytes),
            delta_entry=_delta_entry(version, any_bytes, name),
            cluster_refs=frozenset(cluster_refs),
            route_refs=frozenset(route_refs),
        )

    def aliased(self, alias: str) -> Resource:
        """This resource as the answer to an on-demand request for `alias` (Delta only):
        Envoy resumes the requests waiting on that name when the reply lists it."""
        any_bytes = wire.any_message(self.type_url, self.payload)
        return replace(self, delta_entry=_delta_entry(self.version, any_bytes, self.name, alias))

    @classmethod
    def not_found(cls, type_url: str, alias: str) -> Resource:
        """The answer to an on-demand request for a name that will not exist: the name as
        its own alias and no resource, so Envoy stops waiting (a 404) rather than hanging,
        as it does on a `removed` entry."""
        entry = _delta_entry("0", b"", alias, alias)
        return cls(type_url, alias, "", b"", b"", entry, frozenset(), frozenset())


class ResourceMap(Mapping[str, Resource]):
    """An immutable name -> Resource map that many snapshots can share.

    Thousands of roles share the same clusters, endpoints and egress routes; sharing one map
    (and the unions of what it references, computed once) keeps publishing a snapshot per role
    proportional to what is particular to that role.
    """

    __slots__ = (
        "_items",
        "_names",
        "_known",
        "_cluster_refs",
        "_route_refs",
        "_versions",
        "_domains",
    )

    def __init__(self, resources: Iterable[Resource] = ()) -> None:
        self._items = {r.name: r for r in resources}
        self._names: frozenset[str] | None = None
        self._known: tuple[frozenset[str], frozenset[str]] | None = None
        self._cluster_refs: frozenset[str] | None = None
        self._route_refs: frozenset[str] | None = None
        self._versions: dict[str, str] | None = None
        self._domains: dict[str, Resource] | None = None

    def __getitem__(self, name: str) -> Resource:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    # The Mapping mixins go through __getitem__ per key; these are the dict's own views.
    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str, default: Resource | None = None) -> Resource | None:
        return self._items.get(name, default)

    def keys(self) -> KeysView[str]:
        return self._items.keys()

    def items(self) -> ItemsView[str, Resource]:
        return self._items.items()

    def values(self) -> ValuesView[Resource]:
        return self._items.values()

    def copy(self) -> dict[str, Resource]:
        """A plain dict of the resources (C-speed, unlike dict(self) through Mapping)."""
        return dict(self._items)

    @property
    def names(self) -> frozenset[str]:
        if self._names is None:
            self._names = frozenset(self._items)
        return self._names

    def known(self, static: frozenset[str]) -> frozenset[str]:
        """The names plus `static` (the sidecars' own clusters), computed once per map."""
        if self._known is None or self._known[0] is not static:
            self._known = (static, self.names | static)
        return self._known[1]

    @property
    def cluster_refs(self) -> frozenset[str]:
        if self._cluster_refs is None:
            self._cluster_refs = frozenset().union(*(r.cluster_refs for r in self.values()))
        return self._cluster_refs

    @property
    def route_refs(self) -> frozenset[str]:
        if self._route_refs is None:
            self._route_refs = frozenset().union(*(r.route_refs for r in self.values()))
        return self._route_refs

    @property
    def versions(self) -> dict[str, str]:
        if self._versions is None:
            self._versions = {name: r.version for name, r in self._items.items()}
        return self._versions

    def host_for(self, authority: str) -> Resource | None:
        """The virtual host (of a VHDS map) whose domains match `authority` as Envoy matches
        them: exact, then the longest `*suffix`, then the longest `prefix*`, then `*`."""
        if self._domains is None:
            self._domains = {}
            for res in self.values():
                host = MESSAGE_CLASS[VIRTUAL_HOST].FromString(res.payload)
                for domain in host.domains:
                    self._domains.setdefault(domain.lower(), res)
        authority = authority.lower()
        found = self._domains.get(authority)
        if found is not None:
            return found
        wildcards = [
            (kind, len(domain), res)
            for domain, res in self._domains.items()
            if "*" in domain
            for kind in (_wildcard_kind(domain, authority),)
            if kind is not None
        ]
        return min(wildcards, key=lambda w: (w[0], -w[1]))[2] if wildcards else None


def _delta_entry(version: str, any_bytes: bytes, name: str, alias: str = "") -> bytes:
    """DeltaDiscoveryResponse.resources[] entry: Resource{version = 1, resource = 2 (none
    for "not found"), name = 3, aliases = 4}."""
    resource = wire.field(2, any_bytes) if any_bytes else b""
    return wire.field(
        2, wire.text(1, version) + resource + wire.text(3, name) + wire.text(4, alias)
    )


def _wildcard_kind(domain: str, authority: str) -> int | None:
    """0 for a matching `*suffix`, 1 for a matching `prefix*`, 2 for `*`; None otherwise."""
    if domain == "*":
        return 2
    longer = len(authority) >= len(domain)  # the wildcard stands for at least one character
    if domain.startswith("*") and longer and authority.endswith(domain[1:]):
        return 0
    if domain.endswith("*") and longer and authority.startswith(domain[:-1]):
        return 1
    return None


class InconsistentSnapshot(ValueError):
    """A snapshot names a resource it does not contain."""


class Snapshot:
    """All resources one role (service, group) should have; immutable once built."""

    __slots__ = ("_by_type",)

    def __init__(self, by_type: Mapping[str, ResourceMap | Mapping[str, Resource]]):
        self._by_type = {
            t: m if isinstance(m, ResourceMap) else ResourceMap(m.values())
            for t in PUSH_ORDER
            for m in (by_type.get(t, _EMPTY),)
        }

    @classmethod
    def of(cls, messages: Iterable[Message | Resource]) -> Snapshot:
        by_type: dict[str, dict[str, Resource]] = {t: {} for t in PUSH_ORDER}
        for item in messages:
            resource = item if isinstance(item, Resource) else Resource.of(item)
            by_type[resource.type_url][resource.name] = resource
        return cls(by_type)

    def resources(self, type_url: str) -> ResourceMap:
        return self._by_type[type_url]

    def changed_types(
        self, other: Snapshot | None, memo: dict[tuple[int, int], tuple] | None = None
    ) -> frozenset[str]:
        """Types whose (name, version) sets differ: compared by content, not by who changed what.

        `memo` (e.g. for one publish of many roles) remembers comparisons of maps that many
        roles share.
        """
        if other is None:
            return frozenset(PUSH_ORDER)
        changed = []
        for t in PUSH_ORDER:
            new, old = self._by_type[t], other._by_type[t]
            if new is old:
                continue
            key = (id(new), id(old))
            hit = memo.get(key) if memo is not None else None
            if hit is None:
                hit = (new, old, new.versions != old.versions)  # holds both: ids stay unique
                if memo is not None:
                    memo[key] = hit
            if hit[2]:
                changed.append(t)
        return frozenset(changed)

    def check_consistent(
        self,
        static_clusters: frozenset[str] = frozenset(),
        verified: set[int] | None = None,
        previous: Snapshot | None = None,
    ) -> None:
        """Raise InconsistentSnapshot if a listener, route or cluster names a missing resource
        (other than the sidecar's own static clusters).

        Checked before publishing, as go-control-plane's Snapshot.Consistent() does: Envoy
        would otherwise warm forever or 503 on the dangling name. `verified` (valid while this
        snapshot's clusters and routes maps are alive, e.g. for one publish of many roles that
        share them) holds ids of maps and resources already found consistent with them.
        `previous`, a published (so consistent) snapshot of the same role: the maps it shares
        with this one are consistent still while the clusters and routes they name are the
        same maps.
        """
        clusters, routes = self._by_type[CLUSTER], self._by_type[ROUTE]
        known = clusters.known(static_clusters)
        same = (
            previous is not None
            and previous._by_type[CLUSTER] is clusters
            and previous._by_type[ROUTE] is routes
        )
        problems = []
        for t in (LISTENER, ROUTE, VIRTUAL_HOST, CLUSTER):
            resources = self._by_type[t]
            held = previous._by_type[t] if same else _EMPTY
            if held is resources:
                continue
            if verified is not None and id(resources) in verified:
                continue
            for res in resources.values():
                if verified is not None and id(res) in verified:
                    continue
                if held.get(res.name) is res:  # checked with the same clusters and routes
                    continue
                missing = [("cluster", c) for c in res.cluster_refs - known]
                missing += [("route", r) for r in res.route_refs - routes.names]
                problems += [f"{res.name} -> {kind} {name}" for kind, name in missing]
                if verified is not None and not missing and not res.route_refs:
                    verified.add(id(res))  # route refs are checked per snapshot
            if verified is not None and not problems and not resources.route_refs:
                verified.add(id(resources))
        if problems:
            raise InconsistentSnapshot("dangling references: " + ", ".join(sorted(problems)))


_EMPTY = ResourceMap()


def state_version(resources: Iterable[Resource]) -> str:
    """A version for a set of resources: stable for the same (name, version) pairs."""
    pairs = sorted(f"{r.name}\0{r.version}" for r in resources)
    return _version("\n".join(pairs).encode())
