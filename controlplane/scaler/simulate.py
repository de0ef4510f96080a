"""A discrete-event replay of a workload under each scaling policy, on a virtual clock.

The runs are planned once from the workload and its seed (cron fires in each task's time
zone, skipped fires, start delays, log-normal durations with overruns, extra runs at random
times) and replayed identically under every policy, so the policies differ only in what they
decide. Each managed group's i-th instance start takes the i-th draw of that group's seeded
start-up distribution under every policy.

Controllers run every `SYNC_PERIOD_S` and set a desired count per group; the replay starts
and stops instances accordingly (a start is ready after its start-up time; a stop removes
starting instances before ready ones). The policies:

- `static-peak`: each group always holds the most replicas its runs ever need at once;
- `hpa`: the Kubernetes HPA on in-flight requests per ready instance (tolerance 0.1,
  300 s scale-down stabilisation), which cannot go below one instance;
- `keda-cron`: a KEDA cron trigger per task, as a careful operator would set it: from a
  lead before each fire (the p95 start-up of the slowest of the task's groups plus one sync
  period, rounded up to whole minutes, since a trigger's start is itself a cron field) to the
  task's p95 duration after it, plus the 300 s cooldown. Triggers of tasks that overlap on a
  group add up (one ScaledObject per task, each asking for its own replicas);
- `tasklane`: the real `controlplane.scaler.policy.Policy`, fed run reports as a scheduler
  would send them and the start-to-ready durations measured in this replay, deciding each
  period and whenever a run is reported (as the live scaler, which watches the runs). Its
  keep-alive pools are kept full as the local actuator does: started cold, parked once
  ready; a scale-up resumes a parked instance (`RESUME_S`) before starting one, a
  scale-down parks ready ones while the pool has room. A parked hour costs the workload's
  `parkedCost` in replica-hours (memory held, no CPU);
- `oracle`: the lower bound. It knows the future: every instance starts exactly its own
  start-up time before it is needed and stops the moment it is not, and is kept through a
  gap, or parked for it, when that costs less than a restart. It is not clamped to the
  groups' maximum. Beside it, the flap-free oracle (a figure, not a row: `oracle` says how
  it is found) bounds every policy that never flaps the same way: it stops or parks a level
  only for gaps that leave the flap window, and holds a level it raised for the window.
  The benchmark checks on every workload that no policy without shortfall costs less than
  the oracle, and none without shortfall and flaps less than the flap-free oracle
  (`Report.below_oracle`).

A run needs its task's replicas on each task-group hop while it is open; its traffic is
`load` x the in-flight target per needed replica (load 0.9-1.0: the declared replicas fit).
Only the measured days count; the warm-up before them builds history (durations, start-ups).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from controlplane.errors import TasklaneError
from controlplane.model.run import Run
from controlplane.scaler.oracle import Terms, level_cost, need_levels
from controlplane.scaler.policy import (
    Changes,
    Observation,
    Policy,
    PolicyConfig,
    hpa_recommendation,
)
from controlplane.scaler.profile import (
    HISTORY_RUNS,
    GroupKey,
    fire_times,
    managed_groups,
    percentile,
    task_hops,
)
from controlplane.scaler.workload import Workload

POLICIES = ("static-peak", "hpa", "keda-cron", "tasklane", "oracle")
SYNC_PERIOD_S = 15.0
HPA_TOLERANCE = 0.1
HPA_WINDOW_S = 300.0
KEDA_STARTUP_PERCENTILE = 95  # the lead an operator reads off the measured start-ups
KEDA_COOLDOWN_S = 300.0
FLAP_WINDOW_S = 300.0
RESUME_S = 0.1  # a parked instance serving again (bench/resume.py: p50 90 ms, p95 96 ms)
START_SAMPLES = 100  # recent start-to-ready durations per group handed to the policy
LOAD_RANGE = (0.9, 1.0)
TARGET_IN_FLIGHT = PolicyConfig().target_in_flight
_DAY_S = 86400.0
# Order of events at one instant: capacity that becomes ready counts for a run starting then.
_READY, _FINISH, _START, _TICK = range(4)


@dataclass(frozen=True)
class SimRun:
    """One planned run: when it starts and ends and what it needs on which group."""

    task: str
    id: str
    fire: float | None  # None for an extra run
    start: float
    end: float
    load: float
    needs: tuple[tuple[GroupKey, int], ...]


@dataclass(frozen=True)
class PolicyResult:
    """What one policy cost and how often it let a run start on too little capacity."""

    policy: str
    replica_hours: float  # running, plus parked ones at the workload's parked cost
    shortfalls: tuple[float, ...]  # per fired run started in the measured days: seconds short
    extra_shortfalls: tuple[float, ...]  # the same for extra runs, which no cron predicts
    missing_replica_hours: float  # needed but not ready while runs were open
    scale_events: int
    run_groups: int  # (run, task group) pairs the scale events are divided by
    flaps: int
    forced_flaps: int  # of which an extra run started on the group between the two events
    parked_hours: float = 0.0  # the part of replica_hours parked instances cost
    # per flap: group, when the reversed event was, its direction, seconds to the reversal,
    # whether an extra run started on the group between the two (see `_flaps`)
    flapped: tuple[tuple[str, float, int, float, bool], ...] = ()

    @property
    def shortfall_p50(self) -> float:
        return percentile(self.shortfalls, 50) if self.shortfalls else 0.0

    @property
    def shortfall_p99(self) -> float:
        return percentile(self.shortfalls, 99) if self.shortfalls else 0.0

    @property
    def share_without_shortfall(self) -> float:
        if not self.shortfalls:
            return 1.0
        return sum(1 for s in self.shortfalls if s <= 0) / len(self.shortfalls)

    @property
    def events_per_run_group(self) -> float:
        return self.scale_events / self.run_groups if self.run_groups else 0.0


@dataclass(frozen=True)
class Report:
    """Every simulated policy on one workload, with the two references."""

    workload: str
    days: float
    seed: int
    fires: int
    runs: int
    skipped: int
    extra: int
    static_peak_hours: float
    oracle_hours: float
    flap_free_oracle_hours: float
    results: tuple[PolicyResult, ...]

    def result(self, policy: str) -> PolicyResult:
        return next(result for result in self.results if result.policy == policy)

    def below_oracle(self) -> list[str]:
        """Policies that cost less than the oracle without ever being short (no fire nor
        extra run started short, no replica missing while a run was open), or less than the
        flap-free oracle without being short or flapping: none, or a bound is no bound."""
        found = []
        for r in self.results:
            never_short = r.missing_replica_hours == 0 and not any(
                s > 0 for s in (*r.shortfalls, *r.extra_shortfalls)
            )
            if r.policy == "oracle" or not never_short:
                continue
            if r.replica_hours < self.oracle_hours:
                found.append(f"{r.policy} (oracle)")
            elif r.flaps == 0 and r.replica_hours < self.flap_free_oracle_hours:
                found.append(f"{r.policy} (flap-free oracle)")
        return found

    def table(self) -> str:
        """One line per policy, the columns the issue asks for."""
        header = (
            "policy",
            "replica-h",
            "% static",
            "x oracle",
            "x flap-free",
            "short p50",
            "short p99",
            "fires not short",
            "extra short p50",
            "missing rep-h",
            "parked rep-h",
            "events/run/group",
            "flaps",
            "by extra runs",
        )
        rows = [header]
        for r in self.results:
            rows.append(
                (
                    r.policy,
                    f"{r.replica_hours:.1f}",
                    f"{100 * r.replica_hours / self.static_peak_hours:.1f}%",
                    f"{r.replica_hours / self.oracle_hours:.2f}x",
                    f"{r.replica_hours / self.flap_free_oracle_hours:.2f}x",
                    f"{r.shortfall_p50:.0f}s",
                    f"{r.shortfall_p99:.0f}s",
                    f"{100 * r.share_without_shortfall:.1f}%",
                    f"{percentile(r.extra_shortfalls, 50) if r.extra_shortfalls else 0:.0f}s",
                    f"{r.missing_replica_hours:.1f}",
                    f"{r.parked_hours:.1f}",
                    f"{r.events_per_run_group:.2f}",
                    str(r.flaps),
                    str(r.forced_flaps),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        summary = (
            f"workload {self.workload}: {self.days:g} days, seed {self.seed}, {self.fires} fires "
            f"({self.skipped} skipped), {self.runs} runs ({self.extra} extra); oracle "
            f"{self.oracle_hours:.1f} replica-h, flap-free oracle {self.flap_free_oracle_hours:.1f}"
        )
        return "\n".join([summary, *lines])


def simulate(
    workload: Workload,
    days: float,
    policy: str = "all",
    seed: int | None = None,
    config: PolicyConfig | None = None,
    exhaustive: bool = False,
) -> Report:
    """Replay `days` of `workload` from its start (after its warm-up) under `policy`
    ("all" or one of POLICIES). The same seed gives the same report. `config` is the
    tasklane policy's (default: PolicyConfig() at the simulator's sync period).
    `exhaustive`: the tasklane policy decides every group every period and at every report,
    not only what changed (the reference its `Changes` are tested against; far slower)."""
    if policy != "all" and policy not in POLICIES:
        raise TasklaneError(
            f"unknown policy {policy!r} (expected all or one of: {', '.join(POLICIES)})"
        )
    if not days > 0:
        raise TasklaneError(f"days must be more than 0, got {days:g}")
    seed = workload.seed if seed is None else seed
    clock = _Clock(
        workload.start - workload.warmup_s, workload.start, workload.start + days * _DAY_S
    )
    runs = plan_runs(workload, clock.begin, clock.end, seed)
    groups = managed_groups(workload.rules)
    peak = _peaks(runs, groups, clock)
    oracle = _oracle(workload, runs, clock, seed)
    static = _replay(workload, runs, clock, seed, "static-peak", _Static(peak))
    chosen = POLICIES if policy == "all" else (policy,)
    results: list[PolicyResult] = []
    for name in chosen:
        if name == "static-peak":
            results.append(static)
        elif name == "oracle":
            results.append(oracle)
        else:
            results.append(
                _replay(
                    workload,
                    runs,
                    clock,
                    seed,
                    name,
                    _controller(name, workload, clock, config, exhaustive),
                )
            )
    measured = [run for run in runs if clock.measured(run.start)]
    fires = sum(
        len(fire_times(task, clock.start, clock.end)) for task in workload.rules.tasks.values()
    )
    extra = sum(1 for run in measured if run.fire is None)
    return Report(
        workload=workload.name,
        days=days,
        seed=seed,
        fires=fires,
        runs=len(measured),
        skipped=fires - (len(measured) - extra),
        extra=extra,
        static_peak_hours=static.replica_hours,
        oracle_hours=oracle.replica_hours,
        flap_free_oracle_hours=_bound_hours(workload, runs, clock, seed, FLAP_WINDOW_S),
        results=tuple(results),
    )


@dataclass(frozen=True)
class _Clock:
    begin: float  # warm-up starts
    start: float  # measured days start
    end: float

    def measured(self, moment: float) -> bool:
        return self.start <= moment < self.end

    def overlap(self, low: float, high: float) -> float:
        """Seconds of [low, high) inside the measured days."""
        return max(0.0, min(high, self.end) - max(low, self.start))


def plan_runs(workload: Workload, begin: float, end: float, seed: int) -> list[SimRun]:
    """Every run that starts in [begin, end), by start time. Each task draws from its own
    seeded stream, so adding a task does not change the others' runs."""
    runs: list[SimRun] = []
    for name in sorted(workload.rules.tasks):
        task = workload.rules.tasks[name]
        behaviour = workload.tasks[name]
        needs = tuple(((s, g), n) for s, g, n in task_hops(workload.rules, task))
        rng = random.Random(f"{seed}/runs/{name}")
        starts: list[tuple[float, float | None]] = []
        for fire in fire_times(task, begin, end):
            skip, delay = rng.random(), rng.random()
            if skip >= behaviour.skip:
                starts.append((fire + delay * behaviour.start_delay_s, fire))
        moment = begin
        rate = behaviour.extra_runs_per_day / _DAY_S
        while rate > 0:
            moment += rng.expovariate(rate)
            if moment >= end:
                break
            starts.append((moment, None))
        for number, (start, fire) in enumerate(sorted(starts, key=lambda item: item[0])):
            duration = behaviour.duration.sample(rng)
            if rng.random() < behaviour.overrun_probability:
                duration *= behaviour.overrun_factor
            load = rng.uniform(*LOAD_RANGE)
            if start < end:
                runs.append(SimRun(name, f"r{number}", fire, start, start + duration, load, needs))
    runs.sort(key=lambda run: (run.start, run.task))
    return runs


def _need_steps(runs: Sequence[SimRun]) -> dict[GroupKey, list[tuple[float, int]]]:
    """(time, need from then on) per group: the replicas the open runs need."""
    deltas: dict[GroupKey, dict[float, int]] = {}
    for run in runs:
        for key, count in run.needs:
            steps = deltas.setdefault(key, {})
            steps[run.start] = steps.get(run.start, 0) + count
            steps[run.end] = steps.get(run.end, 0) - count
    result: dict[GroupKey, list[tuple[float, int]]] = {}
    for key, steps in deltas.items():
        level = 0
        result[key] = []
        for moment in sorted(steps):
            level += steps[moment]
            result[key].append((moment, level))
    return result


def _peaks(
    runs: Sequence[SimRun], groups: Mapping[GroupKey, object], clock: _Clock
) -> dict[GroupKey, int]:
    """The most replicas each group's runs need at once during the measured days."""
    peaks = dict.fromkeys(groups, 0)
    for key, steps in _need_steps(runs).items():
        following = [moment for moment, _ in steps[1:]] + [math.inf]
        peaks[key] = max(
            (
                level
                for (moment, level), until in zip(steps, following, strict=True)
                if moment < clock.end and until > clock.start
            ),
            default=0,
        )
    return peaks


def _oracle(workload: Workload, runs: Sequence[SimRun], clock: _Clock, seed: int) -> PolicyResult:
    """The lower bound: every level of every group's need served at the least cost that the
    replay allows (`oracle.level_cost` with no flap window). Its scale events are the
    need's own changes."""
    events: dict[GroupKey, list[tuple[float, int, bool]]] = {}
    extra_starts = {(key, run.start) for run in runs if run.fire is None for key, _ in run.needs}
    for key, steps in _need_steps(runs).items():
        previous = 0
        for moment, level in steps:
            if level != previous and clock.measured(moment):
                up = level > previous
                forced = up and (key, moment) in extra_starts
                events.setdefault(key, []).append((moment, 1 if up else -1, forced))
            previous = level
    measured = [run for run in runs if clock.measured(run.start)]
    return PolicyResult(
        policy="oracle",
        replica_hours=_bound_hours(workload, runs, clock, seed, window=0.0),
        shortfalls=tuple(0.0 for run in measured if run.fire is not None),
        extra_shortfalls=tuple(0.0 for run in measured if run.fire is None),
        missing_replica_hours=0.0,
        scale_events=sum(len(changes) for changes in events.values()),
        run_groups=sum(len(run.needs) for run in measured),
        flaps=sum(len(_flaps(changes)) for changes in events.values()),
        forced_flaps=sum(f[-1] for changes in events.values() for f in _flaps(changes)),
        flapped=tuple(
            (f"{key[0]}/{key[1]}", *flap)
            for key, changes in events.items()
            for flap in _flaps(changes)
        ),
    )


def _bound_hours(
    workload: Workload, runs: Sequence[SimRun], clock: _Clock, seed: int, window: float
) -> float:
    """The least replica-hours that serve every run with no shortfall and no scale event
    reversed within `window` (0: any), parked hours at the workload's price. Each level's
    stretches take their start-ups from the group's seeded stream, level by level."""
    terms = Terms(window, RESUME_S, workload.parked_cost, clock.start, clock.end)
    seconds = 0.0
    for key, steps in _need_steps(runs).items():
        rng = random.Random(f"{seed}/startup/{key[0]}/{key[1]}")
        for _, needed in sorted(need_levels(steps).items()):
            startups = [workload.startup[key].sample(rng) for _ in needed]
            seconds += level_cost(needed, startups, terms)
    return seconds / 3600


def _flaps(changes: Sequence[tuple[float, int, bool]]) -> list[tuple[float, int, float, bool]]:
    """Per scale event that reverses the previous one's direction within FLAP_WINDOW_S:
    when the previous one was, its direction, the seconds between them, and whether the
    reversal was a scale-up after an extra run, which no schedule announces, started on the
    group between the two (it took the capacity kept for a fire, or needed its own)."""
    return [
        (t1, d1, t2 - t1, forced)
        for (t1, d1, _), (t2, d2, forced) in itertools.pairwise(changes)
        if d1 != d2 and t2 - t1 < FLAP_WINDOW_S
    ]


# --- the replay -----------------------------------------------------------------------------


@dataclass(eq=False)  # each instance is itself: two started at once are not one
class _Instance:
    requested: float  # started, or resumed
    ready: bool = False
    stopped: bool = False
    resumed: bool = False  # a resume is no start-up: not measured as one
    to_park: bool = False  # started to fill the parked pool, parked once ready


@dataclass(frozen=True)
class _Parked:
    since: float


@dataclass
class _Group:
    """One managed group during a replay."""

    key: GroupKey
    low: int
    high: int
    startup: Callable[[], float]
    instances: list[_Instance] = field(default_factory=list)
    parked: list[_Parked] = field(default_factory=list)  # oldest first
    filling: list[_Instance] = field(default_factory=list)  # starting, to be parked
    pool: int = 0  # instances to keep parked, as last told
    desired: int = 0
    ready: int = 0
    need: int = 0
    demand: float = 0.0  # in-flight requests the open runs send
    changes: list[tuple[float, int, bool]] = field(default_factory=list)  # time, +-1, forced
    extra_started: float = -math.inf  # when an extra run last started on the group
    starts: deque[float] = field(default_factory=lambda: deque(maxlen=START_SAMPLES))


class _View:
    """What a controller may see: groups, run reports, measured start-ups, and what changed
    since it last asked (`changes`). Runs are kept per task and observations per group, so
    a report or a ready instance rebuilds one task's runs or one group's observation, not
    those of all 500 tasks or 200 groups."""

    def __init__(self, groups: dict[GroupKey, _Group]) -> None:
        self.groups = groups
        self.finished: dict[str, deque[Run]] = {}
        self.open: dict[str, dict[str, Run]] = {}
        self._runs: dict[str, tuple[Run, ...]] = {}
        self._starts: dict[GroupKey, tuple[float, ...]] = {}  # none until the first is measured
        self._observed: dict[GroupKey, Observation] = {}
        self._tasks: set[str] = set()  # reported since `changes`
        self._touched: set[GroupKey] = set(groups)  # observation changed
        self._measured: set[GroupKey] = set()

    def report_start(self, run: SimRun) -> None:
        self.open.setdefault(run.task, {})[run.id] = Run(run.task, run.id, run.start)
        self._reported(run.task)

    def report_finish(self, run: SimRun) -> None:
        del self.open[run.task][run.id]
        kept = self.finished.setdefault(run.task, deque(maxlen=HISTORY_RUNS))
        kept.append(Run(run.task, run.id, run.start, run.end, "succeeded"))
        self._reported(run.task)

    def _reported(self, task: str) -> None:
        self._runs[task] = (*self.finished.get(task, ()), *self.open.get(task, {}).values())
        self._tasks.add(task)

    def observe(self, key: GroupKey) -> None:
        """The group's ready, starting or demanded count changed."""
        self._touched.add(key)

    def measured(self, key: GroupKey) -> None:
        """The group measured a start-up."""
        if not self._starts:
            self._starts = {key: tuple(group.starts) for key, group in self.groups.items()}
            self._measured.update(self.groups)
        self._starts[key] = tuple(self.groups[key].starts)
        self._measured.add(key)

    def runs(self) -> Mapping[str, tuple[Run, ...]]:
        """Each task's finished runs (its last `HISTORY_RUNS`) and open ones."""
        return self._runs

    def start_durations(self) -> dict[GroupKey, tuple[float, ...]]:
        return self._starts

    def observations(self) -> dict[GroupKey, Observation]:
        for key in self._touched:
            group = self.groups[key]
            self._observed[key] = Observation(
                key[0],
                key[1],
                ready=group.ready,
                starting=len(group.instances) - group.ready,
                in_flight=group.demand / group.ready if group.ready else None,
            )
        return self._observed

    def changes(self) -> Changes:
        """What changed since the previous call (observations must be taken before)."""
        changes = Changes(
            frozenset(self._tasks), frozenset(self._touched), frozenset(self._measured)
        )
        self._tasks.clear()
        self._touched.clear()
        self._measured.clear()
        return changes


class _Controller(Protocol):
    wakes_on_reports: bool  # decides again when a run is reported, not only each period

    def initial(self, group: _Group) -> int: ...

    def tick(self, now: float, view: _View) -> Mapping[GroupKey, int]: ...

    def pools(self) -> Mapping[GroupKey, int]:
        """Instances each group keeps parked instead of stopping them."""
        ...


def _replay(
    workload: Workload,
    runs: Sequence[SimRun],
    clock: _Clock,
    seed: int,
    name: str,
    controller: _Controller,
) -> PolicyResult:
    """Run one controller over the planned runs; measure cost, shortfall and events."""
    groups: dict[GroupKey, _Group] = {}
    for key, bounds in managed_groups(workload.rules).items():
        rng = random.Random(f"{seed}/startup/{key[0]}/{key[1]}")
        spread = workload.startup[key]
        groups[key] = _Group(
            key, bounds.min_replicas, bounds.max_replicas, lambda s=spread, r=rng: s.sample(r)
        )
    view = _View(groups)
    queue: list[tuple[float, int, int, object]] = []
    order = itertools.count()

    def push(moment: float, kind: int, item: object) -> None:
        heapq.heappush(queue, (moment, kind, next(order), item))

    seconds = 0.0
    parked_seconds = 0.0
    missing = 0.0
    short = 0  # replicas needed but not ready now, over all groups

    def shift(group: _Group, need: int = 0, ready: int = 0) -> None:
        """Change a group's need or ready count, keeping `short` and the view up to date."""
        nonlocal short
        short -= max(0, group.need - group.ready)
        group.need += need
        group.ready += ready
        short += max(0, group.need - group.ready)
        view.observe(group.key)

    def stop(group: _Group, instance: _Instance, now: float) -> None:
        nonlocal seconds
        instance.stopped = True
        seconds += clock.overlap(instance.requested, now)
        if instance.ready:
            shift(group, ready=-1)

    def unpark(group: _Group, now: float, newest: bool) -> None:
        nonlocal parked_seconds
        parked = group.parked.pop(-1 if newest else 0)
        parked_seconds += clock.overlap(parked.since, now)

    def scale(group: _Group, count: int, pool: int, now: float) -> None:
        group.pool = pool
        while len(group.instances) < count:
            if group.parked:  # resume the most recently parked one: its caches are warmest
                unpark(group, now, newest=True)
                instance = _Instance(now, resumed=True)
                push(now + RESUME_S, _READY, (group, instance))
            elif group.filling:  # one starting for the pool is needed now: not parked after all
                instance = group.filling.pop(0)  # the oldest: the nearest to ready
                instance.to_park = False
            else:
                instance = _Instance(now)
                push(now + group.startup(), _READY, (group, instance))
            group.instances.append(instance)
            view.observe(group.key)
        if len(group.instances) > count:
            # stop starting instances first, newest first: they serve nothing yet; park
            # ready ones while the pool has room
            ranked = sorted(group.instances, key=lambda i: (i.ready, -i.requested))
            for instance in ranked[: len(group.instances) - count]:
                if instance.ready and len(group.parked) < pool:
                    group.parked.append(_Parked(now))
                stop(group, instance, now)
            group.instances = [i for i in group.instances if not i.stopped]
            view.observe(group.key)
        while len(group.parked) > pool:
            unpark(group, now, newest=False)
        while group.filling and len(group.parked) + len(group.filling) > pool:
            stop(group, group.filling.pop(), now)  # the newest: the furthest from ready
        while len(group.parked) + len(group.filling) < pool:  # the pool is kept full
            instance = _Instance(now, to_park=True)
            group.filling.append(instance)
            push(now + group.startup(), _READY, (group, instance))

    for group in groups.values():
        group.desired = controller.initial(group)
        group.instances = [_Instance(clock.begin, ready=True) for _ in range(group.desired)]
        group.ready = group.desired
    for run in runs:
        push(run.start, _START, run)
        push(run.end, _FINISH, run)
    push(clock.begin, _TICK, None)
    pending: dict[SimRun, None] = {}
    shortfalls: dict[SimRun, float] = {}

    def control(now: float) -> None:
        desired = controller.tick(now, view)
        pools = controller.pools()
        for key, pool in pools.items():
            if pool != groups[key].pool and key not in desired:
                scale(groups[key], groups[key].desired, pool, now)
        for key, count in desired.items():
            group = groups[key]
            if count != group.desired:
                if clock.measured(now):
                    up = count > group.desired
                    # a run no cron announced started on the group since its last change
                    since = group.changes[-1][0] if group.changes else -math.inf
                    forced = up and group.extra_started >= since
                    group.changes.append((now, 1 if up else -1, forced))
                group.desired = count
            scale(group, count, pools.get(key, 0), now)

    last = clock.begin
    while queue and queue[0][0] < clock.end:
        now = queue[0][0]
        reported = False
        span = clock.overlap(last, now)
        if span:
            missing += span * short
        while queue and queue[0][0] == now:
            _, kind, _, item = heapq.heappop(queue)
            if kind == _READY:
                group, instance = item  # type: ignore[misc]
                if instance.stopped:
                    pass
                elif instance.to_park:
                    group.filling.remove(instance)
                    group.parked.append(_Parked(now))
                    seconds += clock.overlap(instance.requested, now)
                    group.starts.append(now - instance.requested)
                    view.measured(group.key)
                else:
                    instance.ready = True
                    shift(group, ready=1)
                    if not instance.resumed:
                        group.starts.append(now - instance.requested)
                        view.measured(group.key)
            elif kind == _FINISH:
                run = item  # type: ignore[assignment]
                for key, count in run.needs:
                    groups[key].demand -= count * run.load * TARGET_IN_FLIGHT
                    shift(groups[key], need=-count)
                view.report_finish(run)
                reported = True
                if run in pending:
                    del pending[run]
                    shortfalls[run] = run.end - run.start
            elif kind == _START:
                run = item  # type: ignore[assignment]
                for key, count in run.needs:
                    groups[key].demand += count * run.load * TARGET_IN_FLIGHT
                    shift(groups[key], need=count)
                    if run.fire is None:
                        groups[key].extra_started = now
                view.report_start(run)
                reported = True
                if clock.measured(run.start):
                    pending[run] = None
            else:
                control(now)
                reported = False
                push(now + SYNC_PERIOD_S, _TICK, None)
        if reported and controller.wakes_on_reports:
            control(now)
        for run in [
            run for run in pending if all(groups[k].ready >= groups[k].need for k, _ in run.needs)
        ]:
            del pending[run]
            shortfalls[run] = now - run.start
        last = now
    missing += clock.overlap(last, clock.end) * short
    shortfalls.update((run, clock.end - run.start) for run in pending)
    for group in groups.values():
        for instance in (*group.instances, *group.filling):
            stop(group, instance, clock.end)
        while group.parked:
            unpark(group, clock.end, newest=False)
    measured = [run for run in runs if clock.measured(run.start)]
    parked_hours = workload.parked_cost * parked_seconds / 3600
    return PolicyResult(
        policy=name,
        replica_hours=seconds / 3600 + parked_hours,
        parked_hours=parked_hours,
        shortfalls=tuple(s for run, s in shortfalls.items() if run.fire is not None),
        extra_shortfalls=tuple(s for run, s in shortfalls.items() if run.fire is None),
        missing_replica_hours=missing / 3600,
        scale_events=sum(len(group.changes) for group in groups.values()),
        run_groups=sum(len(run.needs) for run in measured),
        flaps=sum(len(_flaps(group.changes)) for group in groups.values()),
        forced_flaps=sum(f[-1] for group in groups.values() for f in _flaps(group.changes)),
        flapped=tuple(
            (f"{key[0]}/{key[1]}", *flap)
            for key, group in groups.items()
            for flap in _flaps(group.changes)
        ),
    )


class _Baseline:
    """What the baselines share: they act each period only and never park."""

    wakes_on_reports = False

    def pools(self) -> Mapping[GroupKey, int]:
        return {}


class _Static(_Baseline):
    """static-peak: the peak from the start, never changed."""

    def __init__(self, peak: Mapping[GroupKey, int]) -> None:
        self.peak = peak

    def initial(self, group: _Group) -> int:
        return min(max(self.peak[group.key], group.low), group.high)

    def tick(self, now: float, view: _View) -> Mapping[GroupKey, int]:
        return {}


class _Hpa(_Baseline):
    """The Kubernetes HPA on in-flight requests per ready instance; at least one instance."""

    def __init__(self) -> None:
        self.windows: dict[GroupKey, deque[tuple[float, int]]] = {}

    def initial(self, group: _Group) -> int:
        return max(1, group.low)

    def tick(self, now: float, view: _View) -> Mapping[GroupKey, int]:
        desired: dict[GroupKey, int] = {}
        for key, group in view.groups.items():
            current = group.desired
            count = current
            if group.ready:
                usage = group.demand / group.ready
                count = hpa_recommendation(
                    group.ready, current, usage, TARGET_IN_FLIGHT, HPA_TOLERANCE
                )
            count = min(max(count, max(1, group.low)), group.high)
            window = self.windows.setdefault(key, deque())
            window.append((now, count))
            while window[0][0] < now - HPA_WINDOW_S:
                window.popleft()
            desired[key] = max(value for _, value in window)
        return desired


def keda_lead(startups: Sequence[float]) -> float:
    """A KEDA cron trigger's lead before a fire: the p95 of the measured start-ups plus one
    sync period, rounded up to whole minutes (the trigger's start is a cron field)."""
    return 60.0 * math.ceil(
        (percentile(startups, KEDA_STARTUP_PERCENTILE) + SYNC_PERIOD_S) / 60 - 1e-9
    )


class _KedaCron(_Baseline):
    """One KEDA cron trigger per task: fire - lead to fire + p95 duration, then cooldown.
    The leads come from the start-ups measured in the warm-up (from the workload's start-up
    p95 until then), so the triggers are laid out again once, when the measured days begin."""

    def __init__(self, workload: Workload, clock: _Clock) -> None:
        self.workload = workload
        self.clock = clock
        self.measured = False
        self._layout({key: keda_lead([spread.p95]) for key, spread in workload.startup.items()})

    def _layout(self, leads: Mapping[GroupKey, float]) -> None:
        triggers: dict[GroupKey, list[tuple[float, float, int]]] = {}
        rules = self.workload.rules
        for name, task in rules.tasks.items():
            hops = task_hops(rules, task)
            if not hops:
                continue
            lead = max(leads[(service, group)] for service, group, _ in hops)
            length = self.workload.tasks[name].duration.p95 + KEDA_COOLDOWN_S
            fires = fire_times(task, self.clock.begin - length, self.clock.end + lead)
            for service, group, count in hops:
                triggers.setdefault((service, group), []).extend(
                    (fire - lead, fire + length, count) for fire in fires
                )
        self.steps = {key: _sum_steps(spans) for key, spans in triggers.items()}
        self.next = dict.fromkeys(self.steps, 0)

    def initial(self, group: _Group) -> int:
        return group.low

    def tick(self, now: float, view: _View) -> Mapping[GroupKey, int]:
        if not self.measured and now >= self.clock.start:
            self.measured = True
            spreads = self.workload.startup
            self._layout(
                {
                    key: keda_lead(samples or [spreads[key].p95])
                    for key, samples in view.start_durations().items()
                }
            )
        desired: dict[GroupKey, int] = {}
        for key, group in view.groups.items():
            steps = self.steps.get(key, [])
            index = self.next.get(key, 0)
            while index < len(steps) and steps[index][0] <= now:
                index += 1
            self.next[key] = index
            count = steps[index - 1][1] if index else 0
            desired[key] = min(max(count, group.low), group.high)
        return desired


def _sum_steps(spans: Sequence[tuple[float, float, int]]) -> list[tuple[float, int]]:
    """(time, total count of the spans active from then on), from (start, end, count)."""
    changes: dict[float, int] = {}
    for low, high, count in spans:
        changes[low] = changes.get(low, 0) + count
        changes[high] = changes.get(high, 0) - count
    steps: list[tuple[float, int]] = []
    level = 0
    for moment in sorted(changes):
        level += changes[moment]
        steps.append((moment, level))
    return steps


class _Tasklane:
    """The live scaler's Policy, unchanged, at the simulator's sync period and whenever a
    run is reported (the live scaler watches the runs in etcd). It is told what changed
    since it last decided, so that only the groups touched or due are decided again: the
    decisions are those of deciding everything each time (`exhaustive`), at a fraction of
    the cost."""

    wakes_on_reports = True

    def __init__(self, workload: Workload, config: PolicyConfig, exhaustive: bool) -> None:
        self.rules = workload.rules
        self.policy = Policy(config)
        self.exhaustive = exhaustive

    def initial(self, group: _Group) -> int:
        return group.low

    def tick(self, now: float, view: _View) -> Mapping[GroupKey, int]:
        observed = view.observations()
        changes = view.changes()
        decisions = self.policy.decide(
            now,
            self.rules,
            view.runs(),
            observed,
            view.start_durations(),
            None if self.exhaustive else changes,
        )
        return {(d.service, d.group): d.replicas for d in decisions}

    def pools(self) -> Mapping[GroupKey, int]:
        return self.policy.pools


def _controller(
    name: str, workload: Workload, clock: _Clock, config: PolicyConfig | None, exhaustive: bool
) -> _Controller:
    if name == "hpa":
        return _Hpa()
    if name == "keda-cron":
        return _KedaCron(workload, clock)
    config = config or PolicyConfig(sync_period_s=SYNC_PERIOD_S)
    return _Tasklane(workload, replace(config, parked_cost=workload.parked_cost), exhaustive)
