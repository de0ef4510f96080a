"""A staged rollout on the running control plane: which sidecars are its canaries, and the
judge that ends it.

Each replica assigns the sidecars connected to it (model/rollout.assign: a share of each
role, sticky, the same pick on every replica) and serves them the candidate's snapshots
(sync.py builds them under names.canary_view). The judge reads what the two cohorts' routers
did (telemetry/canary.py) once a second and, when `model.rollout.verdict` says so, promotes or
aborts through etcd (store/rollout.py). Replicas judge their own sidecars; the first to decide
ends the rollout, and the guard makes the others' calls no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from controlplane.errors import StoreError
from controlplane.model.rollout import (
    ABORTED,
    CANARY,
    PROMOTED,
    STABLE,
    Rollout,
    Tally,
    assign,
    verdict,
)
from controlplane.store.etcd import Store
from controlplane.store.rollout import NoRollout, abort, promote
from controlplane.xds.status import StatusBoard

log = logging.getLogger(__name__)

JUDGE_PERIOD = 1.0
AUTO = "tasklane (automatic)"  # who ended a rollout the judge ended


class Cohorts:
    """The canaries among the connected sidecars, per role, while a rollout runs."""

    def __init__(self, board: StatusBoard) -> None:
        self.board = board
        self.rollout: Rollout | None = None
        self._canaries: dict[str, frozenset[str]] = {}
        self._nodes: frozenset[str] = frozenset()  # every role's canaries
        self._assigned_at: dict[str, int] = {}  # role -> board.changes when last assigned

    def start(self, rollout: Rollout | None) -> bool:
        """Follow `rollout` (None: none runs); whether that changed anything."""
        same = (rollout and rollout.generation) == (self.rollout and self.rollout.generation)
        if same:
            return False
        self.rollout, self._canaries, self._nodes = rollout, {}, frozenset()
        self._assigned_at = {}
        return True

    def canary(self, node: str, role: str) -> bool:
        """The ADS server's question for a connected stream (xds/server.py). A role is
        assigned again only when the connected sidecars changed since (rekey asks for every
        stream at once)."""
        if self.rollout is None:
            return False
        if self._assigned_at.get(role) != self.board.changes:
            chosen = assign(
                self.board.role_nodes(role),
                self._canaries.get(role, frozenset()),
                self.rollout.percent,
                self.rollout.generation,
            )
            self._assigned_at[role] = self.board.changes
            if chosen != self._canaries.get(role):
                self._canaries[role] = chosen
                self._nodes = frozenset().union(*self._canaries.values())
        return node in self._canaries.get(role, frozenset())

    def is_canary(self, node: str) -> bool:
        """Whether a node's access logs count for the canary (telemetry/canary.py)."""
        return node in self._nodes

    def roles(self) -> list[dict[str, Any]]:
        """Per role: its connected sidecars and the canaries among them, for status."""
        sidecars: dict[str, list[str]] = {}
        for node in self.board.nodes():
            sidecars.setdefault(node.role, []).append(node.node_id)
        return [
            {
                "role": role,
                "sidecars": len(nodes),
                "canaries": sorted(set(nodes) & self._canaries.get(role, frozenset())),
            }
            for role, nodes in sorted(sidecars.items())
        ]


class Judge:
    """Ends the rollout in progress when its verdict says so (once a second)."""

    def __init__(
        self,
        cohorts: Cohorts,
        tallies: Callable[[], dict[str, Tally]],
        keep: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cohorts, self.tallies, self.keep, self.clock = cohorts, tallies, keep, clock
        self._task: asyncio.Task | None = None

    def start(self, store: Store) -> None:
        self._task = asyncio.create_task(self._run(store), name="rollout judge")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def status(self) -> dict[str, Any] | None:
        """The rollout in progress with its cohorts' tallies and the verdict so far."""
        rollout = self.cohorts.rollout
        if rollout is None:
            return None
        tallies = self.tallies()
        judged = verdict(rollout, tallies[CANARY], tallies[STABLE], self.clock())
        return {
            **rollout.to_json(),
            "cohorts": {name: tally.to_json() for name, tally in tallies.items()},
            "roles": self.cohorts.roles(),
            "verdict": {"action": judged.action, "reason": judged.reason},
        }

    async def _run(self, store: Store) -> None:
        while True:
            await asyncio.sleep(JUDGE_PERIOD)
            rollout = self.cohorts.rollout
            if rollout is None:
                continue
            tallies = self.tallies()
            judged = verdict(rollout, tallies[CANARY], tallies[STABLE], self.clock())
            end = {PROMOTED: promote, ABORTED: abort}.get(judged.action)
            if end is None:
                continue
            try:
                await asyncio.to_thread(
                    end, store, judged.reason, AUTO, rollout.generation, self.keep
                )
                log.warning(
                    "rollout of revision %d %s: %s", rollout.revision, judged.action, judged.reason
                )
            except NoRollout:
                pass  # another replica, or a user, ended it first
            except StoreError as exc:
                log.warning("could not end the rollout (%s); judging again", exc)
