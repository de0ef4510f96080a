"""The per-stream subscription state machine, shared by the SotW and delta servers.

Pure logic, no I/O: requests are applied with `on_request`, and `next_push` says what (if
anything) to send next. The server only moves bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .snapshot import Resource, ResourceMap, Snapshot, state_version
from .types import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    FULL_STATE,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    ROUTING,
    VIRTUAL_HOST,
)

WILDCARD = "*"


@dataclass
class TypeState:
    """One resource type on one stream."""

    type_url: str
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str | None] = field(default_factory=dict)  # name -> version (None: told absent)
    unacked: dict[str, Resource | None] = field(default_factory=dict)  # since the last ACK
    held: dict[str, Resource] = field(default_factory=dict)  # what the client has accepted
    nonce: str = ""
    version: str = ""  # version_info / system_version_info of the last response
    dirty: bool = True
    rejected: bool = False  # the client NACKed our last response of this type
    # Delta reconnects: names the client says it holds whose content we have not identified
    # (its version is not in our snapshot), so we cannot know which clusters they use.
    unknown: set[str] = field(default_factory=set)
    # VHDS on demand: requested names ("egress/<authority>") answered since their request,
    # and those the control plane said will never exist (answered "not found").
    answered: dict[str, str] = field(default_factory=dict)  # name -> the host that answered
    missing: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Push:
    type_url: str
    version: str
    resources: list[Resource]
    removed: list[str]


@dataclass(frozen=True)
class Verdict:
    """What a request meant: an ACK or NACK of a response we sent, or neither."""

    ack: bool = False
    nack: bool = False
    stale: bool = False


class StreamState:
    """Subscriptions, sent versions and held resources of one ADS stream."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.types: dict[str, TypeState] = {}
        self._nonces = 0
        self._retaining = False  # the last CDS push kept clusters that old routes still use
        self._resumed = False  # a delta client that came back holding clusters

    # --- requests -------------------------------------------------------------------------

    def on_sotw_request(
        self, type_url: str, names: Iterable[str], nonce: str, error: bool
    ) -> Verdict:
        """Apply a DiscoveryRequest. A stale nonce means the client has not yet seen our
        latest response for this type: the request is ignored entirely (xDS protocol, SotW)."""
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = TypeState(type_url)
        elif nonce and nonce != state.nonce:
            return Verdict(stale=True)
        verdict = self._ack_or_nack(state, nonce, error)
        requested = set(names)
        wildcard = type_url in FULL_STATE and (not requested or WILDCARD in requested)
        requested.discard(WILDCARD)
        if wildcard != state.wildcard or requested != state.names:
            for gone in state.names - requested:
                state.sent.pop(gone, None)
                state.held.pop(gone, None)
            state.wildcard, state.names = wildcard, requested
            state.dirty = True
        return verdict

    def on_delta_request(
        self,
        type_url: str,
        subscribe: Iterable[str],
        unsubscribe: Iterable[str],
        initial_versions: Mapping[str, str],
        nonce: str,
        error: bool,
    ) -> Verdict:
        """Apply a DeltaDiscoveryRequest. Unlike SotW, subscription changes count even when
        the nonce is stale (xDS protocol, incremental variant); only the ACK/NACK is dropped."""
        subscribe, unsubscribe = set(subscribe), set(unsubscribe)
        state = self.types.get(type_url)
        if state is None:
            state = self.types[type_url] = TypeState(type_url)
            # Envoy's VHDS subscription is to every host of its route config, plus names on
            # demand (even when its first request already carries one).
            state.wildcard = (
                WILDCARD in subscribe
                or type_url == VIRTUAL_HOST
                or (type_url in FULL_STATE and not subscribe)
            )
            state.sent.update(initial_versions)
            state.unknown = set(initial_versions)
            if type_url == CLUSTER and initial_versions:
                self._resumed = True
            verdict = Verdict()
        elif nonce and nonce != state.nonce:
            verdict = Verdict(stale=True)
        else:
            verdict = self._ack_or_nack(state, nonce, error)
        if WILDCARD in subscribe:
            state.wildcard = True
        if WILDCARD in unsubscribe:
            state.wildcard = False
        subscribe.discard(WILDCARD)
        unsubscribe.discard(WILDCARD)
        for name in subscribe - state.names:
            if name not in initial_versions:
                state.sent.pop(name, None)  # newly requested: send even if unchanged
        for name in subscribe:  # asked (again) on demand: a request waits on the answer
            state.answered.pop(name, None)
        state.missing -= subscribe
        state.names |= subscribe
        state.names -= unsubscribe
        for name in unsubscribe:
            state.sent.pop(name, None)
            state.held.pop(name, None)
        if subscribe or unsubscribe:
            state.dirty = True
        return verdict

    def _ack_or_nack(self, state: TypeState, nonce: str, error: bool) -> Verdict:
        if not nonce or nonce != state.nonce:
            return Verdict()
        if error:
            # The client keeps what it held; `sent` keeps the rejected versions, so the same
            # content is never sent again (go-control-plane resends in a loop: its #962).
            state.unacked.clear()
            state.rejected = True
            return Verdict(nack=True)
        if state.type_url in FULL_STATE and not self.delta:
            state.held = {n: r for n, r in state.unacked.items() if r is not None}
        else:
            for name, res in state.unacked.items():
                if res is None:
                    state.held.pop(name, None)
                else:
                    state.held[name] = res
        state.unacked.clear()
        state.rejected = False
        if state.type_url in ROUTING and self._retaining:
            self.types[CLUSTER].dirty = True  # a cluster kept for old routes may go now
        return Verdict(ack=True)

    # --- pushes ---------------------------------------------------------------------------

    def mark_changed(self, types: Iterable[str]) -> None:
        for type_url in types:
            state = self.types.get(type_url)
            if state is not None:
                state.dirty = True

    def pending(self) -> bool:
        return any(s.dirty for s in self.types.values())

    def next_push(self, snapshot: Snapshot | None) -> Push | None:
        """The next response to send, in make-before-break order, or None when the client
        already has everything (no response to an ACK when nothing changed)."""
        if snapshot is None:
            return None
        self._adopt_initial(snapshot)
        for type_url in PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or not state.dirty:
                continue
            if type_url in ROUTING and self._in_flight():
                continue  # stays dirty: sent once the client took the new clusters and filter
            state.dirty = False
            push = self._plan(state, snapshot)
            if push is not None:
                return push
        return None

    def _adopt_initial(self, snapshot: Snapshot) -> None:
        """After a delta reconnect, what the client holds at a version our snapshot has is
        known content: hold it, so make-before-break knows which clusters its routes use."""
        for state in self.types.values():
            if not state.unknown:
                continue
            resources = snapshot.resources(state.type_url)
            for name in list(state.unknown):
                res = resources.get(name)
                if res is not None and res.version == state.sent.get(name):
                    state.held[name] = res
                    state.unknown.discard(name)

    def _removals_wait(self, snapshot: Snapshot) -> bool:
        """A resumed delta client holds listeners and routes this stream never sent. Until
        it has told us which (its LDS and RDS requests) and we know their content, any
        cluster it holds may still be in use, so cluster removals wait. Held routes count
        even when no listener we serve names them: a sidecar's listeners are static, in its
        bootstrap, and use the routes all the same."""
        if not self._resumed:
            return False
        listeners = self.types.get(LISTENER)
        if listeners is None or listeners.unknown:
            return True
        routes = self.types.get(ROUTE)
        if routes is not None:
            if routes.unknown:
                return True
            if not snapshot.resources(VIRTUAL_HOST):
                return False
            hosts = self.types.get(VIRTUAL_HOST)  # its VHDS request is still to come
            return hosts is None or bool(hosts.unknown)
        held = [*listeners.held.values(), *listeners.unacked.values()]
        named = any(res is not None and res.route_refs for res in held)
        return named or bool(snapshot.resources(ROUTE))  # its RDS request is still to come

    def _holds_cluster(self, name: str) -> bool:
        """The client has cluster `name` (sent, and not told it is gone)."""
        clusters = self.types.get(CLUSTER)
        return clusters is not None and clusters.sent.get(name) is not None

    def _in_flight(self) -> bool:
        """A CDS or ECDS push is not ACKed yet, or the gateway's dye filter was refused.
        Envoy subscribes to the new clusters' endpoints before it ACKs CDS, so waiting for the
        ACK puts EDS ahead of the routes that need it; and the gateway's new dye filter must
        strip a new chain's header before a route matches it: while the filter is refused,
        the routes stay as they were (fail closed), until a filter is accepted."""
        clusters, filters = self.types.get(CLUSTER), self.types.get(EXTENSION_CONFIG)
        if filters is not None and (filters.unacked or filters.rejected):
            return True
        return clusters is not None and bool(clusters.unacked)

    def unresolved(self, snapshot: Snapshot | None) -> list[str]:
        """Virtual hosts asked for on demand that neither the snapshot has (by domain) nor
        were declared missing: the control plane must say whether they will come."""
        state = self.types.get(VIRTUAL_HOST)
        if state is None:
            return []
        hosts = snapshot.resources(VIRTUAL_HOST) if snapshot is not None else ResourceMap()
        return sorted(
            name
            for name in state.names - state.answered.keys() - state.missing
            if hosts.host_for(authority_of(name)) is None
        )

    def declare_missing(self, names: Iterable[str]) -> None:
        """Answer these on-demand names "not found" with the next push."""
        state = self.types[VIRTUAL_HOST]
        state.missing.update(names)
        state.dirty = True

    def new_nonce(self, type_url: str) -> str:
        self._nonces += 1
        self.types[type_url].nonce = nonce = str(self._nonces)
        return nonce

    def _retained_clusters(self, snapshot: Snapshot) -> dict[str, Resource]:
        """Clusters gone from the snapshot that routes or listeners the client may still run
        point at: removed only after those routes are gone (make-before-break)."""
        state = self.types[CLUSTER]
        current = snapshot.resources(CLUSTER)
        gone = {n: r for n, r in state.held.items() if n not in current}
        gone.update((n, r) for n, r in state.unacked.items() if r is not None and n not in current)
        if not gone:
            return gone
        in_use: set[str] = set()
        for type_url in ROUTING:
            routes = self.types.get(type_url)
            if routes is not None:
                for res in [*routes.held.values(), *routes.unacked.values()]:
                    if res is not None:
                        in_use |= res.cluster_refs
        return {n: r for n, r in gone.items() if n in in_use}

    def _plan(self, state: TypeState, snapshot: Snapshot) -> Push | None:
        available: Mapping[str, Resource] = snapshot.resources(state.type_url)
        if state.type_url == CLUSTER:
            retained = self._retained_clusters(snapshot)
            self._retaining = bool(retained)
            if retained:
                available = {**available.copy(), **retained}
        if state.wildcard:
            desired = available
        else:
            desired = {n: available[n] for n in state.names if n in available}
        removed: list[str] = []
        if not self.delta and state.type_url in FULL_STATE:
            # State of the world: every response carries the whole set; absence = removal.
            versions = (
                desired.versions
                if isinstance(desired, ResourceMap)
                else {n: r.version for n, r in desired.items()}
            )
            if versions == state.sent and state.version:
                return None  # (the first answer goes out even when empty: Envoy waits for it)
            resources = list(desired.values())
            state.sent = dict(versions)
            state.unacked = desired.copy() if isinstance(desired, ResourceMap) else dict(desired)
        else:
            resources = [r for n, r in desired.items() if state.sent.get(n) != r.version]
            if self.delta:
                removed = [n for n, v in state.sent.items() if v is not None and n not in desired]
                if state.type_url != VIRTUAL_HOST:  # names asked on demand are aliases
                    removed += [n for n in state.names if n not in desired and n not in state.sent]
                if state.type_url == CLUSTER and removed and self._removals_wait(snapshot):
                    removed, self._retaining = [], True  # re-planned after LDS/RDS ACKs
                if state.type_url == ENDPOINT:  # a retained cluster keeps its endpoints
                    removed = [n for n in removed if not self._holds_cluster(n)]
                if state.type_url == VIRTUAL_HOST:
                    removed += _forget_aliases(state, removed)
                    resources = _answer_on_demand(state, desired, resources)
            else:
                # SotW cannot say "absent" for RDS/EDS: forget it, so a return is sent again.
                for name in [n for n in state.sent if n not in desired]:
                    del state.sent[name]
            if not resources and not removed and (state.version or not state.wildcard):
                return None
            for res in resources:
                if res.payload:  # not a "not found" answer
                    state.sent[res.name] = res.version
                    state.unacked[res.name] = res
            for name in removed:
                state.sent[name] = None
                state.unacked[name] = None
            state.unknown.difference_update(r.name for r in resources)
            state.unknown.difference_update(removed)
        state.version = state_version(desired.values())
        resources.sort(key=lambda r: r.name)
        return Push(state.type_url, state.version, resources, sorted(removed))


def authority_of(name: str) -> str:
    """The host a VHDS name asks for: Envoy names it "<route config>/<authority>"."""
    return name.partition("/")[2]


def _forget_aliases(state: TypeState, removed: list[str]) -> list[str]:
    """The names asked on demand that removed hosts answered: removed too, so that Envoy
    forgets them and asks again when its app calls that host again (till then they are no
    longer asked for)."""
    gone = set(removed)
    aliases = [name for name, host in state.answered.items() if host in gone]
    for name in aliases:
        del state.answered[name]
        state.names.discard(name)
    return aliases


def _answer_on_demand(
    state: TypeState, hosts: Mapping[str, Resource], resources: list[Resource]
) -> list[Resource]:
    """`resources` plus the answers to on-demand names now known: the host serving each
    name, aliased to it (even if the client has it: the request waits on the alias), or
    "not found" for the names declared missing."""
    if not isinstance(hosts, ResourceMap):
        hosts = ResourceMap(hosts.values())
    out = {r.name: r for r in resources}
    for name in sorted(state.names - state.answered.keys()):
        host = hosts.host_for(authority_of(name))
        if host is not None:
            out[host.name] = host.aliased(name)
            state.answered[name] = host.name
        elif name in state.missing:
            out[name] = Resource.not_found(VIRTUAL_HOST, name)
            state.answered[name] = ""
        # else still to come: answered when the snapshot has it
    return list(out.values())
