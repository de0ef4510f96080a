"""Measured start-to-ready seconds per task group in etcd, so the history of a mesh (runs,
durations, start-ups) can be exported as a workload and replayed (`tasklane simulate
--from-history`) by anyone, not only by the leader that measured them.

One JSON list of seconds per group at `startups/<service>/<group>`, the last KEPT, written
by the scaler when its actuator measured a new start.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence

from controlplane.store.etcd import PREFIX, Store
from controlplane.store.rules import compact_json

STARTUPS = "startups/"
KEPT = 100

_log = logging.getLogger(__name__)


def record_startups(store: Store, durations: Mapping[tuple[str, str], Sequence[float]]) -> None:
    """Store each group's latest measured start-ups (the last KEPT); StoreError if etcd fails."""
    for (service, group), values in durations.items():
        kept = [round(float(v), 3) for v in list(values)[-KEPT:]]
        store.put(f"{STARTUPS}{service}/{group}", compact_json(kept))


def list_startups(store: Store) -> dict[tuple[str, str], list[float]]:
    """Every group's stored start-ups, oldest first; a malformed value is skipped (logged)."""
    items, _ = store.get_prefix(STARTUPS)
    result: dict[tuple[str, str], list[float]] = {}
    for key, value in items.items():
        service, _, group = key[len(STARTUPS) :].partition("/")
        try:
            values = json.loads(value)
            if not isinstance(values, list) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            ):
                raise ValueError("expected a list of seconds")
        except ValueError as exc:
            _log.warning("ignoring etcd key %s%s: not start-ups: %s", PREFIX, key, exc)
            continue
        result[service, group] = [float(v) for v in values]
    return result
