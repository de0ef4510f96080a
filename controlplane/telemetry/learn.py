"""The learned part of a role's scope (model/scope.py): the mesh services its sidecars' egress
access logs show it calling.

Pure: fed the same parsed entries as the accounting, it hands each (role, callee) of a batch
once to `sink`, which records it (app.py: store.scope.ScopeRecorder.offer, throttled, off the
event loop). Only roles and callees of the rules count: a Host outside the mesh, an unknown
service or a sidecar of a group no rule defines are no scope, and keeping them out bounds
what the recorder holds. A request the egress passed through (or refused) as outside the
mesh although its Host names a service is one whose config the sidecar lacked: learning it
is what puts the service in the scope.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet
from controlplane.telemetry.accounting import (
    EGRESS,
    OUTSIDE_MESH_ROUTES,
    LogEntry,
    destination,
    host_of,
)

Sink = Callable[[GroupKey, str, float], None]  # (role, callee, seen at)


def sightings(rules: RuleSet, entries: Iterable[LogEntry]) -> set[tuple[GroupKey, str]]:
    """(role, callee) of each egress entry from a role of the rules to a service of them."""
    out: set[tuple[GroupKey, str]] = set()
    for entry in entries:
        if entry.direction != EGRESS:
            continue
        caller = rules.services.get(entry.service)
        if caller is None or caller.group(entry.group) is None:
            continue
        if entry.route in OUTSIDE_MESH_ROUTES:
            callee = host_of(entry)
        else:
            callee, _ = destination(rules, entry)
        if callee in rules.services:
            out.add((GroupKey(entry.service, entry.group), callee))
    return out


class Learner:
    """Feeds each batch's sightings to `sink`; `rules` returns the current RuleSet."""

    def __init__(
        self, rules: Callable[[], RuleSet], sink: Sink, clock: Callable[[], float] = time.time
    ) -> None:
        self._rules, self._sink, self._clock = rules, sink, clock

    def ingest(self, entries: Iterable[LogEntry]) -> None:
        now = self._clock()
        for role, callee in sightings(self._rules(), entries):
            self._sink(role, callee, now)
