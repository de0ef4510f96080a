"""Scaling decisions in etcd, so the dashboard and `tasklane get profile` can say why a group
has the replicas it has (pre-warm for task X, metric, run finished, bound).

One JSON document per decision at `decisions/<service>/<group>/<ms timestamp>`, the timestamp
zero-padded so key order is time order. Each write prunes the group's decisions beyond RETAIN
in the same transaction. Stored on plain fields (not the scaler's Decision class) so the store
does not import the scaler, which imports the store.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from typing import Protocol

from controlplane.errors import StoreError
from controlplane.store.etcd import PREFIX, Store

DECISIONS = "decisions/"
# Decisions kept per (service, group): a day of changes at a few per run.
RETAIN = 100
# etcd takes at most 128 operations per transaction; a write prunes at most this many.
MAX_PRUNE = 100
# Enough digits for any millisecond timestamp up to the year 33658.
TIMESTAMP_DIGITS = 15
ATTEMPTS = 3
FIELDS = ("service", "group", "replicas", "reason", "at")

_log = logging.getLogger(__name__)


class DecisionLike(Protocol):
    """What the scaler's Decision has (controlplane.scaler.policy.Decision)."""

    service: str
    group: str
    replicas: int
    reason: str
    at: float


def decision_key(service: str, group: str, at_ms: int) -> str:
    """The store key of the decision taken at `at_ms` (epoch milliseconds)."""
    return f"{DECISIONS}{service}/{group}/{at_ms:0{TIMESTAMP_DIGITS}d}"


def record_decisions(store: Store, decisions: Iterable[DecisionLike]) -> None:
    """Record each decision (see record_decision)."""
    for decision in decisions:
        record_decision(
            store,
            decision.service,
            decision.group,
            decision.replicas,
            decision.reason,
            decision.at,
        )


def record_decision(
    store: Store, service: str, group: str, replicas: int, reason: str, at: float
) -> str:
    """Store one decision taken at `at` (epoch seconds); returns its key.

    Two decisions for one group in the same millisecond both stay: the later one takes the
    next free millisecond in its key (its document keeps the exact time). ValueError for
    malformed fields, StoreError if etcd fails.
    """
    _check(service, group, replicas, reason, at)
    value = json.dumps(
        {"service": service, "group": group, "replicas": replicas, "reason": reason, "at": at},
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    prefix = f"{DECISIONS}{service}/{group}/"
    for _ in range(ATTEMPTS):
        items, _ = store.get_prefix(prefix)
        at_ms = int(at * 1000)
        while decision_key(service, group, at_ms) in items:
            at_ms += 1
        key = decision_key(service, group, at_ms)
        kept = sorted([*items, key])
        deletes = kept[: max(0, len(kept) - RETAIN)][:MAX_PRUNE]
        if store.txn({key: value}, deletes, {key: 0}):
            return key
    raise StoreError(f"decisions of {service}/{group} kept changing concurrently; retry")


def list_decisions(
    store: Store, service: str, group: str | None = None, limit: int = 50
) -> list[dict]:
    """The last `limit` decisions for `service` (one group, or all), oldest first; each a
    dict of service, group, replicas, reason, at."""
    prefix = f"{DECISIONS}{service}/" if group is None else f"{DECISIONS}{service}/{group}/"
    items, _ = store.get_prefix(prefix)
    decisions = [d for d in (_decode(k, v) for k, v in items.items()) if d is not None]
    decisions.sort(key=lambda d: (d["at"], d["group"]))
    return decisions[-limit:] if limit > 0 else []


def _check(service: str, group: str, replicas: int, reason: str, at: float) -> None:
    for name, value in (("service", service), ("group", group)):
        if not isinstance(value, str) or not value or "/" in value:
            raise ValueError(f"decision {name} must be a non-empty name without '/': {value!r}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ValueError(f"decision replicas must be an integer >= 0: {replicas!r}")
    if not isinstance(reason, str):
        raise ValueError(f"decision reason must be a string: {reason!r}")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < 0:
        raise ValueError(f"decision time must be epoch seconds: {at!r}")


def _decode(key: str, value: bytes) -> dict | None:
    """The decision stored at `key`, or None (logged) when it holds something else."""
    try:
        data = json.loads(value)
        if not isinstance(data, dict) or set(data) != set(FIELDS):
            raise ValueError(f"expected the fields {', '.join(FIELDS)}")
        _check(data["service"], data["group"], data["replicas"], data["reason"], data["at"])
    except ValueError as exc:
        _log.warning("ignoring etcd key %s%s: not a decision: %s", PREFIX, key, exc)
        return None
    return data
