"""A staged rollout on the running control plane: which sidecars are its canaries, and the
judge that ends it.

Each replica admits a share of each role's sidecars connected to it as canaries, each once,
when its stream opens or the rollout starts (model/rollout.admits), and serves them the
candidate's snapshots (sync.py builds them under names.canary_view). The judge reads what
the two cohorts' routers did (telemetry/canary.py) once a second and, when
`model.rollout.verdict` says so, promotes or aborts through etcd (store/rollout.py).

Replicas: a sidecar's access logs may go to another replica than its xDS stream, and only
the replica that serves its stream knows its cohort, so each replica judges the logs of the
sidecars connected to it and leaves the others' out. The first replica to decide ends the
rollout; the guard makes the others' calls no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from controlplane.errors import StoreError
from controlplane.model.rollout import (
    ABORTED,
    CANARY,
    PROMOTED,
    STABLE,
    Rollout,
    Tally,
    Verdict,
    admits,
    verdict,
)
from controlplane.store.etcd import Store
from controlplane.store.rollout import NoRollout, abort, promote
from controlplane.store.rules import ConcurrentChange
from controlplane.xds.status import StatusBoard

log = logging.getLogger(__name__)

JUDGE_PERIOD = 1.0
AUTO = "tasklane (automatic)"  # who ended a rollout the judge ended


class Cohorts:
    """The canaries among the connected sidecars, per role, while a rollout runs."""

    def __init__(self, board: StatusBoard) -> None:
        self.board = board
        self.rollout: Rollout | None = None
        self._canaries: dict[str, set[str]] = {}  # role -> its connected canaries
        self._pruned_at: dict[str, int] = {}  # role -> board.changes when last pruned

    def start(self, rollout: Rollout | None) -> bool:
        """Follow `rollout` (None: none runs); whether that changed anything."""
        same = (rollout and rollout.generation) == (self.rollout and self.rollout.generation)
        if same:
            return False
        self.rollout, self._canaries, self._pruned_at = rollout, {}, {}
        return True

    def canary(self, node: str, role: str) -> bool:
        """The ADS server's question for a stream that opens, or for every stream when a
        rollout starts or ends (xds/server.py): whether it is to get the candidate."""
        if self.rollout is None:
            return False
        chosen = self._canaries.setdefault(role, set())
        connected = self.board.role_nodes(role)
        if self._pruned_at.get(role) != self.board.changes:  # canaries that left don't count
            chosen &= connected
            self._pruned_at[role] = self.board.changes
        if node in chosen:
            return True
        if admits(len(chosen), len(connected), self.rollout.percent):
            chosen.add(node)
            return True
        return False

    def cohort_of(self, node: str) -> str | None:
        """A node's cohort for its access logs (telemetry/canary.py); None for a sidecar not
        connected to this replica, whose cohort only another replica knows."""
        status = self.board.get(node)
        if status is None:
            return None
        return CANARY if node in self._canaries.get(status.role, ()) else STABLE

    def roles(self) -> list[dict[str, Any]]:
        """Per role: its connected sidecars and the canaries among them, for status."""
        sidecars: dict[str, list[str]] = {}
        for node in self.board.nodes():
            sidecars.setdefault(node.role, []).append(node.node_id)
        return [
            {
                "role": role,
                "sidecars": len(nodes),
                "canaries": sorted(set(nodes) & self._canaries.get(role, set())),
            }
            for role, nodes in sorted(sidecars.items())
        ]


class Judge:
    """Ends the rollout in progress when its verdict says so (once a second)."""

    def __init__(
        self,
        cohorts: Cohorts,
        tallies: Callable[[], tuple[dict[str, Tally], float]],
        keep: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`tallies()`: both cohorts' tallies and since when this replica counts them."""
        self.cohorts, self.tallies, self.keep, self.clock = cohorts, tallies, keep, clock
        self.unbuildable: dict[str, str] = {}  # candidate generation -> why it is aborted
        self._task: asyncio.Task | None = None

    def start(self, store: Store) -> None:
        self._task = asyncio.create_task(self._run(store), name="rollout judge")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _verdict(self, rollout: Rollout) -> tuple[Verdict, dict[str, Tally]]:
        """The verdict on what this replica counted. Its window starts when the counting
        did: a replica that took the rollout over after a restart watches a whole one."""
        tallies, since = self.tallies()
        watched = replace(rollout, started_at=max(rollout.started_at, since))
        return verdict(watched, tallies[CANARY], tallies[STABLE], self.clock()), tallies

    def status(self) -> dict[str, Any] | None:
        """The rollout in progress with its cohorts' tallies and the verdict so far."""
        rollout = self.cohorts.rollout
        if rollout is None:
            return None
        judged, tallies = self._verdict(rollout)
        return {
            **rollout.to_json(),
            "cohorts": {name: tally.to_json() for name, tally in tallies.items()},
            "roles": self.cohorts.roles(),
            "verdict": {"action": judged.action, "reason": judged.reason},
        }

    async def _run(self, store: Store) -> None:
        while True:
            await asyncio.sleep(JUDGE_PERIOD)
            for generation, reason in list(self.unbuildable.items()):
                await self._end(store, abort, generation, reason)
                del self.unbuildable[generation]
            rollout = self.cohorts.rollout
            if rollout is None:
                continue
            judged, _ = self._verdict(rollout)
            if judged.action == PROMOTED:
                await self._end(store, promote, rollout.generation, judged.reason)
            elif judged.action == ABORTED:
                await self._end(store, abort, rollout.generation, judged.reason)

    async def _end(
        self, store: Store, end: Callable[..., Rollout], generation: str, reason: str
    ) -> None:
        try:
            ended = await asyncio.to_thread(end, store, reason, AUTO, generation, self.keep)
            log.warning("rollout of revision %d ended (%s): %s", ended.revision, end.__name__,
                        reason)  # fmt: skip
        except NoRollout:
            pass  # another replica, or a user, ended it first
        except ConcurrentChange as exc:  # the rules moved under it (an older replica's apply)
            await self._end(store, abort, generation, f"{exc}; not promoted")
        except StoreError as exc:
            log.warning("could not end the rollout (%s); judging again", exc)
