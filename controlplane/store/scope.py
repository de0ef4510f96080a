"""Sightings in etcd: the services a role's sidecars were seen calling (model/scope.py).

One JSON document `{"reason", "since", "lastSeen"}` per (role, callee) at
`scope/<service>/<group>/<callee>`, so a learned scope survives a control-plane restart and
every replica sees the same one. The access logs refresh `lastSeen` while the call goes on;
`expire_sightings` deletes what has been idle longer than the idle time.

Access logs come by the thousand per second: `ScopeRecorder` writes a sighting at most once
per REFRESH_FRACTION of the idle time (per replica), from a thread of its own, so neither
etcd nor the event loop that reads the logs feels them.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import replace

from controlplane.errors import StoreError
from controlplane.model.group import GroupKey
from controlplane.model.scope import SIGHTING_REASONS, Sighting
from controlplane.store.etcd import PREFIX, Store
from controlplane.store.follow import Follower, keyed_fold

SCOPE = "scope/"
# A sighting in use is written again once this share of the idle time has passed: it then
# never looks idle, and a day's idle time costs one write per 2.4 h per (role, callee).
REFRESH_FRACTION = 0.1
ATTEMPTS = 3

_log = logging.getLogger(__name__)

Pair = tuple[GroupKey, str]  # (role, callee)


def sighting_key(role: GroupKey, callee: str) -> str:
    return f"{SCOPE}{role.service}/{role.group}/{callee}"


def encode(sighting: Sighting) -> bytes:
    value = {"reason": sighting.reason, "since": sighting.since, "lastSeen": sighting.last_seen}
    return json.dumps(value, separators=(",", ":")).encode()


def record_sighting(
    store: Store,
    role: GroupKey,
    callee: str,
    reason: str,
    now: float,
    min_interval: float = 0.0,
) -> bool:
    """`role`'s sidecars called `callee` at `now`: create the sighting (with `reason`), or
    refresh its lastSeen, keeping the reason it first came in with. No write when the stored
    lastSeen is less than `min_interval` old (another replica refreshed it) or newer than
    `now`. Returns whether etcd was written. ValueError for a malformed argument, StoreError
    if etcd fails."""
    _check(role, callee, reason, now)
    key = sighting_key(role, callee)
    for _ in range(ATTEMPTS):
        value, revision = store.get_versioned(key)
        current = None if value is None else _decode(key, value)
        if current is None:  # absent, or malformed: write a good one over it
            sighting = Sighting(role, callee, reason, now, now)
        elif now - current.last_seen < min_interval or now <= current.last_seen:
            return False
        else:
            sighting = replace(current, last_seen=now)
        if store.txn({key: encode(sighting)}, [], {key: revision}):
            return True
    _log.debug("sighting %s kept changing concurrently: fresh enough", key)
    return False


def load_sightings(store: Store, service: str | None = None) -> list[Sighting]:
    """Every stored sighting (or those of `service`'s roles), by key; StoreError if etcd
    fails."""
    prefix = SCOPE if service is None else f"{SCOPE}{service}/"
    items, _ = store.get_prefix(prefix)
    decoded = (_decode(key, value) for key, value in sorted(items.items()))
    return [sighting for sighting in decoded if sighting is not None]


def watch_sightings(
    store: Store, on_change: Callable[[list[Sighting]], None]
) -> Callable[[], None]:
    """Call `on_change(every sighting)` now and after each change, like
    registry.watch_instances: the first call before this returns, later ones from the watch
    thread (one at a time); a broken watch is read again and resumed. Returns a cancel
    function; StoreError if etcd does not answer the first read."""

    def read(store: Store) -> tuple[dict[str, Sighting], int]:
        items, revision = store.get_prefix(SCOPE)
        decoded = {key: _decode(key, value) for key, value in items.items()}
        return {key: s for key, s in decoded.items() if s is not None}, revision

    return Follower(
        store,
        SCOPE,
        read,
        keyed_fold(_decode),
        lambda state, _: on_change([state[key] for key in sorted(state)]),
    ).start()


def expire_sightings(store: Store, now: float, idle: float) -> int:
    """Delete the sightings unused for longer than `idle` seconds; returns how many. Each
    delete is guarded by the revision it was judged at, so a refresh racing it (from this or
    another replica) wins, and replicas sweeping together delete each key once."""
    deleted = 0
    for sighting in load_sightings(store):
        if not sighting.idle(now, idle):
            continue
        key = sighting_key(sighting.role, sighting.callee)
        value, revision = store.get_versioned(key)
        current = None if value is None else _decode(key, value)
        if current is not None and current.idle(now, idle):
            deleted += store.txn({}, [key], {key: revision})
    return deleted


class ScopeRecorder:
    """Records sightings from the access logs without a write per log: `offer` (cheap, for
    the event loop) queues a (role, callee) only when this replica has not written it for
    `refresh` seconds, and a thread of its own writes the queue to etcd.

    Memory is bounded by what the caller offers: one pending and one written-at entry per
    (role, callee) (the learner offers only services of the rules), and written-at entries
    older than `refresh` are dropped, since they are due again anyway.
    """

    def __init__(self, store: Store, idle: float) -> None:
        self.store, self.idle = store, idle
        self.refresh = idle * REFRESH_FRACTION
        self._written: dict[Pair, float] = {}  # when this replica last wrote (or saw) it
        self._pending: dict[Pair, tuple[str, float]] = {}  # reason, when seen
        self._pruned_at = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._failing = False

    def due(self, pair: Pair, now: float) -> bool:
        """Whether a sighting of `pair` at `now` is worth a write."""
        written = self._written.get(pair)
        return written is None or now - written >= self.refresh

    def offer(self, role: GroupKey, callee: str, reason: str, now: float) -> bool:
        """Queue a sighting for the writer thread when due; never blocks on etcd. Returns
        whether it was queued."""
        pair = (role, callee)
        with self._lock:
            if self._stopped or pair in self._pending or not self.due(pair, now):
                return False
            self._pending[pair] = (reason, now)
        self._wake.set()
        return True

    def record(self, role: GroupKey, callee: str, reason: str, now: float) -> bool:
        """Write one sighting now when due (see record_sighting); returns whether etcd was
        written. StoreError if etcd fails: the sighting stays due."""
        pair = (role, callee)
        if not self.due(pair, now):
            return False
        wrote = record_sighting(self.store, role, callee, reason, now, self.refresh)
        with self._lock:
            self._written[pair] = max(now, self._written.get(pair, now))
            self._prune(now)
        return wrote

    def pending(self) -> int:
        return len(self._pending)

    def written(self) -> int:
        """(role, callee) pairs remembered as written recently: what the throttle costs."""
        return len(self._written)

    def _prune(self, now: float) -> None:
        if now - self._pruned_at < self.refresh:
            return
        self._pruned_at = now
        for pair in [p for p, at in self._written.items() if now - at >= self.refresh]:
            del self._written[pair]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scope-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the writer; what is still queued is dropped (the next log brings it back)."""
        with self._lock:
            self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                self._wake.clear()
                if self._stopped:
                    return
                batch, self._pending = self._pending, {}
            for (role, callee), (reason, at) in batch.items():
                self._write(role, callee, reason, at)

    def _write(self, role: GroupKey, callee: str, reason: str, at: float) -> None:
        try:
            self.record(role, callee, reason, at)
        except StoreError as exc:
            if not self._failing:
                _log.warning("cannot record that %s calls %s (retried on its next log): %s",
                             role, callee, exc)  # fmt: skip
            self._failing = True
            return
        except ValueError as exc:
            _log.warning("not a sighting: %s", exc)
            return
        if self._failing:
            _log.info("recording sightings again")
        self._failing = False


def _check(role: GroupKey, callee: str, reason: str, now: float) -> None:
    for name, value in (("service", role.service), ("group", role.group), ("callee", callee)):
        if not isinstance(value, str) or not value or "/" in value:
            raise ValueError(f"sighting {name} must be a non-empty name without '/': {value!r}")
    if reason not in SIGHTING_REASONS:
        reasons = ", ".join(SIGHTING_REASONS)
        raise ValueError(f"sighting reason must be one of {reasons}: {reason!r}")
    if not _is_time(now):
        raise ValueError(f"sighting time must be epoch seconds: {now!r}")


def _is_time(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _decode(key: str, value: bytes) -> Sighting | None:
    """The sighting stored at `key`, or None (logged) when it holds something else: one bad
    key must not hide the others."""
    try:
        service, group, callee = key[len(SCOPE) :].split("/")
        data = json.loads(value)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        since, last_seen = data.get("since"), data.get("lastSeen")
        if not (_is_time(since) and _is_time(last_seen)):
            raise ValueError("since and lastSeen must be epoch seconds")
        _check(GroupKey(service, group), callee, data.get("reason"), last_seen)
    except ValueError as exc:  # json's errors, a key of too few or too many parts, a field
        _log.warning("ignoring etcd key %s%s: not a sighting: %s", PREFIX, key, exc)
        return None
    return Sighting(GroupKey(service, group), callee, data["reason"], since, last_seen)
