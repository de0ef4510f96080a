"""The snapshot cache: the latest snapshot of every role, and who to tell when it changes.

Protocol handling lives in `server`/`stream`; this module only owns state and watches, so
either protocol variant works against the same narrow interface (go-control-plane's split
between `pkg/cache` and `pkg/server`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Protocol

from .names import view_role
from .snapshot import InconsistentSnapshot, Snapshot
from .types import CLUSTER, PUSH_ORDER

log = logging.getLogger(__name__)


class Watcher(Protocol):
    def snapshot_changed(self, types: frozenset[str]) -> None:
        """Called on the event loop with the types whose content changed for this role."""


class SnapshotCache:
    """Snapshots keyed by role ("service|group"). Must be used from the server's event loop."""

    def __init__(
        self,
        static_clusters: frozenset[str] = frozenset(),
        fallback: Callable[[str], Snapshot | None] | None = None,
    ) -> None:
        """`fallback(role)` is served to the streams of a role with no published snapshot
        (translate/unknown.py); without it, or when it returns None, they wait for one."""
        self.static_clusters = static_clusters  # the sidecars' own clusters, not in snapshots
        self.fallback = fallback
        # Told when a role with no snapshot gets its first stream: snapshots built only for
        # roles someone watches (full views, sync.py) are built then.
        self.on_new_watch: Callable[[str], None] | None = None
        self._snapshots: dict[str, Snapshot] = {}
        self._fallbacks: dict[str, Snapshot] = {}  # of the watched roles that have none
        self._watchers: dict[str, set[Watcher]] = defaultdict(set)

    def set_snapshot(self, role: str, snapshot: Snapshot) -> frozenset[str]:
        """Publish a consistent snapshot; only the streams of this role hear of it, and only
        of the types whose content changed. Returns those types."""
        outcome = self.set_snapshots({role: snapshot}).get(role, frozenset())
        if isinstance(outcome, InconsistentSnapshot):
            raise outcome
        return outcome

    def set_snapshots(
        self, snapshots: Mapping[str, Snapshot]
    ) -> dict[str, frozenset[str] | InconsistentSnapshot]:
        """Publish one translation's snapshots: per role given a new snapshot, the changed
        types, or why it was refused (an inconsistent snapshot is never published; the role
        keeps its last one). A role given the very snapshot it has is left out.

        Roles share their clusters, endpoints and egress routes, so the consistency checks and
        comparisons of those shared maps are made once per call, not once per role (3000 roles:
        ~350 ms -> ~10 ms, bench/translate.py). The memos live only during this call, while
        every map they name is held by `snapshots`.
        """
        verified_by: dict[int, set[int]] = {}
        compared: dict[tuple[int, int], tuple] = {}
        outcomes: dict[str, frozenset[str] | InconsistentSnapshot] = {}
        known = self._snapshots
        for role, snapshot in snapshots.items():
            previous = known.get(role)
            if snapshot is previous:  # the translator kept it: nothing to check or tell
                continue
            # verified ids hold for one clusters map (alive while `snapshots` is)
            verified = verified_by.setdefault(id(snapshot.resources(CLUSTER)), set())
            try:
                snapshot.check_consistent(self.static_clusters, verified, previous)
            except InconsistentSnapshot as exc:
                outcomes[role] = exc
                continue
            changed = snapshot.changed_types(previous, compared)
            self._snapshots[role] = snapshot
            if changed:
                for watcher in tuple(self._watchers.get(role, ())):
                    watcher.snapshot_changed(changed)
            outcomes[role] = changed
        return outcomes

    def clear_snapshot(self, role: str) -> None:
        """Forget a role: its streams are sent the fallback, or without one keep what they
        have and wait for a new snapshot."""
        if self._snapshots.pop(role, None) is not None and self.fallback is not None:
            for watcher in tuple(self._watchers.get(role, ())):
                watcher.snapshot_changed(frozenset(PUSH_ORDER))

    def snapshot(self, role: str) -> Snapshot | None:
        """The role's published snapshot, else its fallback (None without one)."""
        found = self._snapshots.get(role)
        if found is None and self.fallback is not None:
            found = self._fallbacks.get(role)
            if found is None:
                found = self._fallbacks[role] = self.fallback(role)
        return found

    def published(self, role: str) -> bool:
        """Whether the role has a snapshot of its own (its streams are not on the fallback)."""
        return role in self._snapshots

    def roles(self) -> list[str]:
        """The roles with a snapshot (of either view: see names.full_view)."""
        return sorted({view_role(key)[0] for key in self._snapshots})

    def watched(self) -> list[str]:
        """The roles that have a stream."""
        return list(self._watchers)

    def watch(self, role: str, watcher: Watcher) -> None:
        first = role not in self._watchers
        self._watchers[role].add(watcher)
        if first and role not in self._snapshots and self.on_new_watch is not None:
            self.on_new_watch(role)

    def unwatch(self, role: str, watcher: Watcher) -> None:
        watchers = self._watchers.get(role)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[role]
                self._fallbacks.pop(role, None)
