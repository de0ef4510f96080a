"""The live scaler: each sync period, on the leader only, observe the groups, let the policy
decide, make the actuator converge, and record every decision with its reason in etcd.

It runs the same `Policy` as the simulator, fed with the groups' requests in flight read from
their sidecars (`inflight`) and, for services that declare them, the app's saturation gauge
and its CPU and memory against its requests (`signals`): read on this host for the
instances here, and by the actuator for the ones only it can see (Kubernetes pods), and
averaged per group in one place (`signals.group_means`). Actuators are idempotent, so every
period the latest desired count of every managed group is re-asserted (an instance that
crashed is replaced), while only changes are recorded as decisions. A run reported started
or finished wakes it before the period is over: an extra run no cron announced is served
from the parked pool at once, not up to a period later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet
from controlplane.scaler.actuators import Actuator
from controlplane.scaler.inflight import in_flight
from controlplane.scaler.policy import Decision, Observation, Policy, PolicyConfig
from controlplane.scaler.profile import managed_groups
from controlplane.scaler.signals import LocalSignals, Reading, group_means
from controlplane.store.decisions import record_decisions
from controlplane.store.etcd import Store
from controlplane.store.registry import list_instances
from controlplane.store.runs import list_runs, watch_runs
from controlplane.store.startups import record_startups

log = logging.getLogger(__name__)


class Scaler:
    """Drives one actuator from the policy while `is_leader()` holds."""

    def __init__(
        self,
        actuator: Actuator,
        rules: Callable[[], RuleSet],
        is_leader: Callable[[], bool],
        config: PolicyConfig | None = None,
    ) -> None:
        self.actuator = actuator
        self.config = config or PolicyConfig()
        self._rules = rules
        self._is_leader = is_leader
        self._policy: Policy | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._unwatch: Callable[[], None] | None = None
        self._recorded: dict[GroupKey, list[float]] = {}  # start-ups last stored in etcd
        self._local = LocalSignals()
        self._status: dict[str, Any] = {"actuator": actuator.name, "ticks": 0, "error": None}

    def start(self, store: Store) -> None:
        loop = asyncio.get_running_loop()
        self._unwatch = watch_runs(store, lambda *_: loop.call_soon_threadsafe(self._wake.set))
        self._task = asyncio.create_task(self._run(store))

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.to_thread(self.actuator.close)

    def status(self) -> dict[str, Any]:
        """For /api/v1/status and the dashboard: desired replicas per group and the last tick."""
        desired = self._policy.desired if self._policy is not None else {}
        return {
            **self._status,
            "desired": {str(GroupKey(*key)): d.replicas for key, d in sorted(desired.items())},
        }

    async def _run(self, store: Store) -> None:
        while True:
            try:
                if self._is_leader():
                    await asyncio.to_thread(self.tick, store, time.time())
                else:
                    self._policy = None  # a new leadership starts from a fresh policy
            except Exception as exc:  # a failed tick must not stop scaling for good
                log.exception("scaler tick failed")
                self._status["error"] = str(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.sync_period_s)
            self._wake.clear()

    def tick(self, store: Store, now: float) -> list[Decision]:
        """One period: decide, record what changed, converge every group. Blocking."""
        if self._policy is None:
            # an actuator that cannot park must have every instance started a lead early
            parks = self.actuator.parks
            self._policy = Policy(self.config if parks else replace(self.config, resume_s=None))
        seen = self.actuator.observe()
        rules = self._rules()
        instances, _ = list_instances(store)
        managed = set(managed_groups(rules))
        signals = group_means(
            in_flight(instances, managed)
            + self._local.read(instances, managed, rules.services)
            + self.actuator.readings(managed, rules.services)
        )
        observed = {
            key: Observation(
                key[0],
                key[1],
                got.ready,
                got.starting,
                got.parked,
                **asdict(signals.get(key, Reading())),  # in_flight, cpu, memory, saturation
            )
            for key, got in seen.items()
        }
        starts = self.actuator.start_durations()
        decisions = self._policy.decide(now, rules, list_runs(store), observed, starts)
        changed = {
            key: values for key, values in starts.items() if self._recorded.get(key) != values
        }
        if changed:
            record_startups(store, changed)
            self._recorded.update(changed)
        for decision in decisions:
            log.info(
                "scale %s|%s to %d: %s",
                decision.service,
                decision.group,
                decision.replicas,
                decision.reason,
            )
        record_decisions(store, decisions)
        self.actuator.keep(self._policy.pools)
        # Re-assert every managed group (and the last word on groups no longer managed).
        targets = {**self._policy.desired, **{(d.service, d.group): d for d in decisions}}
        for (service, group), decision in targets.items():
            self.actuator.scale(service, group, decision.replicas, decision.reason)
        self._status.update(ticks=self._status["ticks"] + 1, last_tick=now, error=None)
        return decisions
