"""Isolation accounting: what the access logs say really happened, per chain x hop x group.

Pure (no I/O, an injectable clock): fed parsed access-log entries (`LogEntry`) and reading
the current rules, it counts requests and judges each one against its chain.

Where each number comes from (one count per request per hop):

- **served by group G** -- the *inbound* entry of the serving instance: its node metadata says
  its service and group, whatever group it was registered in. Requests, dyed/online, 5xx,
  latency, rate-limited (429 RL, the hop's token bucket at the inbound listener) and refused
  (the inbound `refused` route: a task group's 403 to traffic of no chain of its) count here.
- **never reached an instance** -- the *egress* (or gateway) entry with a flag saying so
  (UH no healthy upstream, UF, UO, NR, NC, URX, DF): counted under the group of the cluster
  it was sent to, since no inbound entry will ever come. A dyed request's 503 UH is a
  fallback whose reason is what the caller was told in `x-tasklane-fallback`:
  `strict_reject` for a strict chain, `unavailable` for a loose one (neither the group nor
  `default` had a healthy host).
- **fallback** -- an egress entry of a chain's hop whose upstream cluster is
  `<service>|default` (Envoy logs the aggregate's member cluster that served) and whose
  response told the caller why in `x-tasklane-fallback`: `no_instance` when the group had no
  registered instance, else `unhealthy`. The egress routes decide it (a loose cluster's
  `default` member served it: translate/egress.py), so the weight's own share to `default`,
  which looks the same in the log otherwise, counts no fallbacks.
- **chain of a request** -- the route name when it names a chain (Envoy matched its dye), else
  the dye read from the logged `x-task-dye` header and `baggage` member (percent-decoded, as
  `model.dye` reads it) with the same precedence as the routes. A chain with its own dye
  header is only recognised by its route (the bootstrap logs a fixed header list).
- **leak** -- an online request an app of a task group served; or a dyed request served by a
  group other than its hop's, unless it is the weight's share or a loose fallback to
  `default`. Whether it was either is decided with the caller's egress entry of the same
  request (x-request-id, destination service): the group of the cluster the router picked.
  When that cluster is not the group of the instance that served, the instance is
  registered in the wrong group: a leak. An inbound entry that would pass waits up to
  `settle_s` for that egress entry (they come from two Envoys).
- **uncovered hop** -- a chain's dyed request served by a service that is not a hop of it.
- **propagation break** -- an instance received a dyed request and called a service undyed
  with the same x-request-id (detectable only for apps that forward x-request-id).
- **outside the mesh** -- an egress entry of the `*` host's routes (a host that is no service:
  `PassthroughCluster` passed it through, `BlackHoleCluster` refused it under REGISTRY_ONLY):
  counted per calling (service, group), apart from the mesh's requests: neither a leak, nor
  an unknown service's error, nor a propagation break.

Memory is bounded: latency keeps the last LATENCY_SAMPLES per key, correlation tables are
capped and expire, and unknown services (from a client's Host header) are one bucket.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from controlplane.model.dye import DyeIndex
from controlplane.model.group import DEFAULT_GROUP, GroupKey
from controlplane.model.rules import Hop, RuleSet, TaskChain
from controlplane.xds.names import (
    BLACK_HOLE_ROUTE,
    NO_INSTANCE,
    PASSTHROUGH_CLUSTER,
    STRICT_REJECT,
    UNAVAILABLE,
    UNHEALTHY,
)

EGRESS, INBOUND, GATEWAY = "egress", "inbound", "gateway"
REFUSED_ROUTE = "refused"
UNKNOWN_SERVICE = "(unknown)"
# Flags of a request the egress side answered itself: no instance ever saw it.
UNREACHED = frozenset({"UH", "UF", "UO", "NR", "NC", "URX", "DF"})
OUTSIDE_MESH_ROUTES = frozenset({PASSTHROUGH_CLUSTER, BLACK_HOLE_ROUTE})

# x-tasklane-fallback values (xds/names.py, set by translate/egress.py): served by `default`
# instead of the group, and not served at all (a 503 UH on a dyed route).
FALLEN_BACK = frozenset({NO_INSTANCE, UNHEALTHY})
NOT_SERVED = frozenset({STRICT_REJECT, UNAVAILABLE})

RATE_WINDOW_S = 10  # per-second rates: the mean over the last complete seconds
LATENCY_SAMPLES = 512  # p50/p99 of the last this many requests per key
SETTLE_S = 2.0  # how long an inbound entry waits for its caller's egress entry
REMEMBER_S = 10.0  # how long entries are kept for correlation
REMEMBER_MAX = 50_000  # and at most this many per table

StatsKey = tuple[str, str, str]  # (chain or "" for online traffic, service, group)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One HTTP request as one listener of one Envoy saw it (see telemetry.als)."""

    node: str  # node id of the Envoy that logged it
    service: str  # node metadata tasklane.service
    group: str  # node metadata tasklane.group: for an inbound entry, the group that served
    direction: str  # egress | inbound | gateway
    route: str = ""  # route name: a chain, `online`, or `refused` (the inbound 403)
    cluster: str = ""  # upstream cluster: `<service>|<group>`, local-app for inbound
    upstream: str = ""  # "host:port" of the upstream host ("" when none was picked)
    authority: str = ""  # Host / :authority as the client sent it
    request_id: str = ""
    dye: str = ""  # x-task-dye ("" when absent)
    baggage: str = ""  # the whole baggage header ("" when absent)
    fallback: str = ""  # x-tasklane-fallback of the response: why the hop's group did not serve
    status: int = 0  # response code (0 when no response was sent)
    flags: frozenset[str] = frozenset()  # response flags by short code, e.g. {"UH"}
    duration_ms: float = 0.0  # start of the request to the last byte sent downstream
    at: float = 0.0  # start of the request, UNIX seconds


# ---------------------------------------------------------------------------- dyes


# ---------------------------------------------------------------------------- counters


class Rate:
    """Events per second over the last `window` complete seconds (a ring of seconds)."""

    def __init__(self, window: int = RATE_WINDOW_S) -> None:
        self.window = window
        self._seconds = [-1] * (window + 1)
        self._counts = [0] * (window + 1)

    def add(self, now: float, count: int = 1) -> None:
        second = math.floor(now)
        slot = second % len(self._seconds)
        if self._seconds[slot] != second:
            self._seconds[slot], self._counts[slot] = second, 0
        self._counts[slot] += count

    def per_second(self, now: float) -> float:
        current = math.floor(now)
        total = sum(
            count
            for second, count in zip(self._seconds, self._counts, strict=True)
            if current - self.window <= second < current
        )
        return total / self.window


@dataclass
class Stats:
    """What one (chain or online, service, group) saw."""

    requests: int = 0
    errors_5xx: int = 0
    leaks: int = 0
    rate_limited: int = 0
    refused: int = 0
    fallbacks: Counter[str] = field(default_factory=Counter)
    flags: Counter[str] = field(default_factory=Counter)
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    rate: Rate = field(default_factory=Rate)
    last_at: float = 0.0

    def count(self, entry: LogEntry, now: float, refused: bool = False) -> None:
        """Count one request; a refused one (answered by policy) is no 5xx error."""
        self.requests += 1
        self.refused += refused
        self.errors_5xx += entry.status >= 500 and not refused
        self.rate_limited += entry.status == 429 or "RL" in entry.flags
        self.flags.update(entry.flags)
        self.latency_ms.append(entry.duration_ms)
        self.rate.add(now)
        self.last_at = now


def percentiles(samples: Iterable[float], *quantiles: float) -> list[float | None]:
    """Nearest-rank quantiles (ms, 3 decimals) of the samples; None when there are none."""
    ordered = sorted(samples)
    if not ordered:
        return [None for _ in quantiles]
    return [
        round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 3)
        for q in quantiles
    ]


K = TypeVar("K")
V = TypeVar("V")


class Expiring(Generic[K, V]):
    """A dict whose entries leave after `ttl` seconds or when more than `cap` are held
    (oldest first): correlation state never grows without bound."""

    def __init__(self, ttl: float = REMEMBER_S, cap: int = REMEMBER_MAX) -> None:
        self.ttl, self.cap = ttl, cap
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: K, value: V, now: float) -> None:
        """Remember (or refresh) key; the owner calls expire() after each batch."""
        self._items[key] = (now, value)
        self._items.move_to_end(key)

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        return item[1] if item is not None else None

    def pop(self, key: K) -> V | None:
        item = self._items.pop(key, None)
        return item[1] if item is not None else None

    def values(self) -> list[V]:
        return [value for _, value in self._items.values()]

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Drop what is too old or too many; returns the dropped (key, value) pairs."""
        dropped: list[tuple[K, V]] = []
        while self._items:
            key, (at, value) = next(iter(self._items.items()))
            if at > now - self.ttl and len(self._items) <= self.cap:
                break
            del self._items[key]
            dropped.append((key, value))
        return dropped


@dataclass(frozen=True)
class _Parked:
    """A dyed request served outside its hop's group that looks legitimate (weight share or
    loose fallback) until its caller's egress entry says which cluster the router picked."""

    chain: str
    service: str
    group: str


@dataclass
class _Break:
    count: int = 0
    last_request_id: str = ""
    last_at: float = 0.0


# ---------------------------------------------------------------------------- accounting


class Accounting:
    """Counts access-log entries per chain x hop x group and judges isolation.

    `rules` returns the current RuleSet (re-read on each batch; a new set rebuilds the dye
    index and forgets chains that are gone).
    """

    def __init__(
        self,
        rules: Callable[[], RuleSet],
        clock: Callable[[], float] = time.time,
        settle_s: float = SETTLE_S,
    ) -> None:
        self._rules_source, self._clock = rules, clock
        self.started_at = clock()
        self._rules: RuleSet | None = None
        self._dyes = DyeIndex({})
        self.stats: dict[StatsKey, Stats] = {}
        self.uncovered: dict[StatsKey, Stats] = {}
        self.outside: dict[GroupKey, Stats] = {}  # calls outside the mesh, by caller
        self.breaks: dict[tuple[str, str, str, str], _Break] = {}  # chain, service, group, to
        self.entries: Counter[str] = Counter()  # by direction; "" = unusable
        self.unmatched = 0  # parked requests whose caller's egress entry never came
        # (request id, destination service) -> group of the cluster the caller's router picked
        self._picked: Expiring[tuple[str, str], str] = Expiring()
        self._parked: Expiring[tuple[str, str], list[_Parked]] = Expiring(ttl=settle_s)
        # (node, request id) -> what a node received dyed / the services it called undyed
        self._dyed_in: Expiring[tuple[str, str], tuple[str, str, str]] = Expiring()
        self._undyed_out: Expiring[tuple[str, str], list[str]] = Expiring()

    # --- input ---------------------------------------------------------------------------

    def _current_rules(self) -> RuleSet:
        """The rules now; a new set rebuilds the dye index and forgets chains that are gone."""
        rules = self._rules_source()
        if rules is not self._rules:
            self._rules, self._dyes = rules, DyeIndex(rules.chains)
            for table in (self.stats, self.uncovered):
                for key in [k for k in table if k[0] and k[0] not in rules.chains]:
                    del table[key]
            for key in [k for k in self.breaks if k[0] not in rules.chains]:
                del self.breaks[key]
        return rules

    def ingest(self, entries: Iterable[LogEntry]) -> None:
        """Account a batch of entries (one ALS message)."""
        rules, now = self._current_rules(), self._clock()
        for entry in entries:
            if entry.direction == INBOUND:
                self._inbound(rules, entry, now)
            elif entry.direction in (EGRESS, GATEWAY):
                self._egress(rules, entry, now)
            else:  # a logger without the direction tag: not ours to judge
                self.entries[""] += 1
                continue
            self.entries[entry.direction] += 1
        self._settle(now)

    def _chain_of(self, rules: RuleSet, entry: LogEntry) -> TaskChain | None:
        chain = rules.chains.get(entry.route)
        return chain if chain is not None else self._dyes.chain_of(entry.dye, entry.baggage)

    def _stats(
        self, chain: str, service: str, group: str, table: dict[StatsKey, Stats] | None = None
    ) -> Stats:
        """The Stats of a key in `table` (default: self.stats), made when first needed."""
        table = self.stats if table is None else table
        key = (chain, service, group)
        stats = table.get(key)
        if stats is None:
            stats = table[key] = Stats()
        return stats

    def _inbound(self, rules: RuleSet, entry: LogEntry, now: float) -> None:
        chain = self._chain_of(rules, entry)
        service, group = entry.service, entry.group
        refused = entry.route == REFUSED_ROUTE
        if chain is None:
            stats = self._stats("", service, group)
            stats.count(entry, now)
            stats.refused += refused
            stats.leaks += group != DEFAULT_GROUP and not refused
            return
        hop = chain.hop_for(service)
        if hop is None:
            stats = self._stats(chain.name, service, group, self.uncovered)
            stats.count(entry, now)
            stats.refused += refused
        else:
            stats = self._stats(chain.name, service, group)
            stats.count(entry, now)
            stats.refused += refused
            if group != hop.group and not refused:
                self._out_of_lane(chain, hop, entry, now)
        if entry.request_id:
            key = (entry.node, entry.request_id)
            for target in self._undyed_out.pop(key) or ():
                self._break(chain.name, service, group, target, entry.request_id, now)
            self._dyed_in.put(key, (chain.name, service, group), now)

    def _out_of_lane(self, chain: TaskChain, hop: Hop, entry: LogEntry, now: float) -> None:
        if not may_serve(chain, hop, entry.group):
            self._stats(chain.name, entry.service, entry.group).leaks += 1
            return
        parked = _Parked(chain.name, entry.service, entry.group)
        key = (entry.request_id, entry.service)
        picked = self._picked.get(key) if entry.request_id else None
        if picked is not None:
            self._judge(parked, picked)
        elif entry.request_id:
            waiting = self._parked.get(key)
            if waiting is None:
                self._parked.put(key, [parked], now)
            else:
                waiting.append(parked)
        # Without a request id nothing can contradict the config: the request passes.

    def _judge(self, parked: _Parked, picked: str | None) -> None:
        """A parked request is a leak when the router picked another group's cluster than
        that of the instance that served it (an instance registered in the wrong group)."""
        if picked is None:
            self.unmatched += 1
        elif picked != parked.group:
            self._stats(parked.chain, parked.service, parked.group).leaks += 1

    def _egress(self, rules: RuleSet, entry: LogEntry, now: float) -> None:
        if entry.route in OUTSIDE_MESH_ROUTES:
            stats = self.outside.get((entry.service, entry.group))
            if stats is None:
                stats = self.outside[entry.service, entry.group] = Stats()
            stats.count(entry, now, refused=entry.route == BLACK_HOLE_ROUTE)
            return
        chain = self._chain_of(rules, entry)
        service, picked = destination(rules, entry)
        hop = chain.hop_for(service) if chain is not None else None
        if entry.flags & UNREACHED or not entry.upstream:
            group = picked or (hop.group if hop is not None else DEFAULT_GROUP)
            self._unreached(chain, hop, service, group, entry, now)
        elif chain is not None:
            if hop is not None and entry.request_id:
                key = (entry.request_id, service)
                self._picked.put(key, picked, now)
                for parked in self._parked.pop(key) or ():
                    self._judge(parked, picked)
            if hop is not None and picked == DEFAULT_GROUP and entry.fallback in FALLEN_BACK:
                self._stats(chain.name, service, hop.group).fallbacks[entry.fallback] += 1
        elif entry.request_id:
            key = (entry.node, entry.request_id)
            received = self._dyed_in.get(key)
            if received is not None:
                self._break(*received, service, entry.request_id, now)
            else:
                calls = self._undyed_out.get(key)
                if calls is None:
                    self._undyed_out.put(key, [service], now)
                else:
                    calls.append(service)

    def _unreached(
        self,
        chain: TaskChain | None,
        hop: Hop | None,
        service: str,
        group: str,
        entry: LogEntry,
        now: float,
    ) -> None:
        if chain is not None and hop is None:
            self._stats(chain.name, service, group, self.uncovered).count(entry, now)
            return
        stats = self._stats(chain.name if chain is not None else "", service, group)
        stats.count(entry, now)
        if hop is not None and "UH" in entry.flags and entry.fallback in NOT_SERVED:
            stats.fallbacks[entry.fallback] += 1

    def _break(
        self, chain: str, service: str, group: str, target: str, request_id: str, now: float
    ) -> None:
        entry = self.breaks.setdefault((chain, service, group, target), _Break())
        entry.count += 1
        entry.last_request_id, entry.last_at = request_id, now

    def _settle(self, now: float) -> None:
        """Parked requests whose caller's egress entry did not come in time pass."""
        for _, parked in self._parked.expire(now):
            for each in parked:
                self._judge(each, None)
        self._picked.expire(now)
        self._dyed_in.expire(now)
        self._undyed_out.expire(now)

    # --- output --------------------------------------------------------------------------

    def settle(self) -> RuleSet:
        """Judge what waited long enough and re-read the rules (before every read)."""
        rules = self._current_rules()
        self._settle(self._clock())
        return rules

    def pending(self) -> int:
        """Inbound entries still waiting for their caller's egress entry."""
        return sum(len(parked) for parked in self._parked.values())

    def now(self) -> float:
        return self._clock()


def destination(rules: RuleSet, entry: LogEntry) -> tuple[str, str]:
    """(service, group) an egress entry was sent to: its upstream cluster's (a loose cluster
    names its group), else the Host's service and no group; UNKNOWN_SERVICE when the Host
    names no service of the rules."""
    service, picked = GroupKey.parse(entry.cluster)
    if not service:
        host = host_of(entry)
        service = host if host in rules.services else UNKNOWN_SERVICE
    return service, picked


def host_of(entry: LogEntry) -> str:
    """The host the client asked for (its Host or :authority without the port)."""
    return entry.authority.rsplit(":", 1)[0] if entry.authority else ""


def may_serve(chain: TaskChain, hop: Hop, group: str) -> bool:
    """Whether the config itself sends some of the hop's requests to `group`: the share of a
    weight under 100, or a loose chain's fallback, both to `default`."""
    return group == DEFAULT_GROUP and (hop.weight < 100 or chain.fallback == "loose")
