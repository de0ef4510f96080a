"""The profile: how many replicas of which task group the runs of scheduled tasks need, when.

Pure functions of the rules, the run history and a time range, so the policy, the API
(`desired replicas per (service, group) per minute for the next 24 h`) and the simulator
compute the same thing.

A run is predicted at each cron fire (in the task's time zone, DST rules as in
`controlplane.model.cron`) and lasts the task's expected duration. The history corrects the
prediction: a reported run *claims* the fire it belongs to (the latest fire at most
`CLAIM_EARLY_S` after its start, if the run started before that fire's expected end), and
then its real start and finish replace the guess. An open run never ends in the profile: its
window reaches at least `now + OPEN_MARGIN_S`, whatever the predicted end, until it has been
open for `NEVER_FINISHED` x the expected duration (then it is taken as never reported).
A fire no run claims keeps its predicted window, so a skipped run holds its capacity for the
expected duration and no longer. A run that claims no fire (a manual or extra run) gets a window of
its own.

Only task groups are profiled: a hop in a `default` group is online capacity, sized by
whoever runs the online service, not by this scaler. Windows of different tasks on one group
add up. The profile is the capacity the runs need while they run: the policy adds the
start-up lead before a window and the drain after it, and clamps to the group's
[minReplicas, maxReplicas] (a profile that exceeds the maximum shows the conflict instead of
hiding it).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from controlplane.model.cron import fires_between
from controlplane.model.group import DEFAULT_GROUP, GroupKey
from controlplane.model.rules import Group, RuleSet, ScheduledTask
from controlplane.model.run import Run

HISTORY_RUNS = 20  # finished runs a task's expected duration is learned from
DURATION_PERCENTILE = 90
CLAIM_EARLY_S = 60.0  # a run reported this much before its fire still belongs to it
OPEN_MARGIN_S = 60.0  # an open run's window reaches at least this far past `now`
# An open run is held at most this many times its task's expected duration: past that, its
# finish was surely never reported (a crashed scheduler), and holding it for good would pile
# up capacity run after run (a 15-minute task would add its replicas every 15 minutes).
NEVER_FINISHED = 10
UNLISTED_HOP_REPLICAS = 1  # a task group hop missing from spec.replicas still needs one
_DAY_S = 86400
# every run, or each task's runs (kept so by the simulator, which then regroups nothing)
History = Sequence[Run] | Mapping[str, Sequence[Run]]


@dataclass(frozen=True)
class Window:
    """Capacity one task run needs on one hop group, from `start` to `end` (UTC epoch s).

    `fire` is the cron fire the run stands for (None for a run no fire claims), `run` the
    reported run's id (None for a predicted run), `open` whether that run is still open.
    """

    task: str
    service: str
    group: str
    replicas: int
    start: float
    end: float
    fire: float | None = None
    run: str | None = None
    open: bool = False
    stuck: bool = False  # an open run no longer held: open past NEVER_FINISHED x expected


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile: always a value that was observed, never an interpolation,
    so "p90 of 20 runs" is the 18th shortest and one outlier cannot move it. Empty: nan."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def expected_duration(task: ScheduledTask, history: Sequence[Run]) -> float:
    """Seconds a run of `task` is expected to take: the p90 of its last `HISTORY_RUNS`
    finished runs, or the declared `expectedDuration` before any run has finished.

    Why p90: scale-down waits for the run's own finish report, so this number only decides
    how long a fire without a reported run (skipped, or not reported yet) keeps its capacity
    and what the profile shows. The p90 covers all but the slowest runs while one overrun,
    which the max would keep for 20 runs, hardly moves it; the mean would drop a slow but
    ordinary run's capacity half of the time.
    """
    return _expected(task, [run for run in history if run.task == task.name])


def _expected(task: ScheduledTask, runs: Sequence[Run]) -> float:
    """`expected_duration` from runs of `task` only."""
    finished = [run for run in runs if run.finished_at is not None]
    if not finished:
        return float(task.expected_duration_s)
    if len(finished) > HISTORY_RUNS:
        finished = sorted(finished, key=lambda run: run.started_at)[-HISTORY_RUNS:]
    return percentile((max(0.0, run.finished_at - run.started_at) for run in finished), 90)


def managed_groups(rules: RuleSet) -> dict[GroupKey, Group]:
    """The groups the scaler sizes: every non-default hop group of a chain some
    ScheduledTask drives, with its replica bounds, ordered by (service, group)."""
    return dict(_plan(rules).groups)


def task_hops(rules: RuleSet, task: ScheduledTask) -> list[tuple[str, str, int]]:
    """(service, group, replicas) of each task-group hop of the task's chain, in hop order.

    A hop whose service `spec.replicas` does not list needs `UNLISTED_HOP_REPLICAS`: with no
    instance its dyed requests would fail (strict) or leak to `default` (loose). Hops whose
    service or group does not exist (rules under edit) are left out."""
    chain = rules.chains.get(task.chain)
    if chain is None:
        return []
    counts = dict(task.replicas)
    return [
        (hop.service, hop.group, counts.get(hop.service, UNLISTED_HOP_REPLICAS))
        for hop in chain.hops
        if hop.group != DEFAULT_GROUP
        and hop.service in rules.services
        and rules.services[hop.service].group(hop.group) is not None
    ]


@dataclass(frozen=True)
class _Plan:
    """What the rules say about scaling, derived once per RuleSet."""

    hops: Mapping[str, tuple[tuple[str, str, int], ...]]
    groups: Mapping[GroupKey, Group]
    tasks: Mapping[GroupKey, tuple[str, ...]]  # the tasks with a hop on each group, by name


_plans: dict[int, tuple[RuleSet, _Plan]] = {}


def _plan(rules: RuleSet) -> _Plan:
    """Cached by identity: a RuleSet never changes (every change makes a new one), and the
    policy asks every sync period."""
    cached = _plans.get(id(rules))
    if cached is not None and cached[0] is rules:
        return cached[1]
    hops = {name: tuple(task_hops(rules, task)) for name, task in sorted(rules.tasks.items())}
    groups = {
        (service, group): rules.services[service].group(group)
        for task_hops_ in hops.values()
        for service, group, _ in task_hops_
    }
    tasks: dict[GroupKey, list[str]] = {}
    for name, task_hops_ in hops.items():
        for service, group, _ in task_hops_:
            tasks.setdefault((service, group), []).append(name)
    plan = _Plan(
        hops,
        dict(sorted(groups.items())),
        {key: tuple(dict.fromkeys(names)) for key, names in tasks.items()},
    )
    if len(_plans) >= 8:
        _plans.clear()
    _plans[id(rules)] = (rules, plan)
    return plan


def group_tasks(rules: RuleSet) -> Mapping[GroupKey, tuple[str, ...]]:
    """The tasks with a hop on each managed group, by name (shared: do not change it)."""
    return _plan(rules).tasks


def hop_groups(rules: RuleSet) -> Mapping[str, tuple[tuple[str, str, int], ...]]:
    """`task_hops` of every task, by name (shared: do not change it)."""
    return _plan(rules).hops


def runs_by_task(history: History) -> Mapping[str, Sequence[Run]]:
    """Each task's runs, in the history's order. A caller that keeps them per task (the
    simulator) passes them so, and nothing is regrouped."""
    if isinstance(history, Mapping):
        return history
    runs_of: dict[str, list[Run]] = {}
    for run in history:
        runs_of.setdefault(run.task, []).append(run)
    return runs_of


def fire_times(task: ScheduledTask, start: float, end: float) -> list[float]:
    """The task's cron fires in [start, end), epoch seconds, ascending."""
    fires = _fires_on_days(
        task.schedule, task.timezone, math.floor(start / _DAY_S), math.ceil(end / _DAY_S)
    )
    return list(fires[bisect.bisect_left(fires, start) : bisect.bisect_left(fires, end)])


@lru_cache(maxsize=16384)
def _fires_on_days(schedule: str, timezone: str, first: int, last: int) -> tuple[float, ...]:
    """Fires within UTC days [first, last), ascending: the policy asks each task for the
    same day or two every sync period, so they are joined once and then only bisected."""
    fires: list[float] = []
    for day in range(first, last):
        fires.extend(_fires_on_day(schedule, timezone, day))
    return tuple(fires)


@lru_cache(maxsize=16384)
def _fires_on_day(schedule: str, timezone: str, day: int) -> tuple[float, ...]:
    """Fires within one UTC day: the policy asks for a few minutes around `now` every sync
    period, and walking the cron for each ask would cost more than everything else."""
    low = datetime.fromtimestamp(day * _DAY_S, UTC)
    fires = fires_between(schedule, low, low + timedelta(days=1), ZoneInfo(timezone))
    return tuple(t.timestamp() for t in fires)


def windows(
    rules: RuleSet,
    history: History,
    start: float,
    end: float,
    now: float | None = None,
) -> list[Window]:
    """Windows of predicted and reported runs that overlap [start, end), per task-group hop,
    ordered by start, task and hop. `now` (default: `start`) is how far open runs reach at
    least. `history` must hold each task's open runs and recent finished ones (the last
    `HISTORY_RUNS` at least); older runs change nothing."""
    now = start if now is None else now
    runs_of = runs_by_task(history)
    result: list[Window] = []
    for name, hops in _plan(rules).hops.items():
        if hops:
            result.extend(task_windows(rules, name, runs_of.get(name, ()), start, end, now).windows)
    result.sort(key=lambda w: (w.start, w.task))
    return result


@dataclass(frozen=True)
class TaskWindows:
    """One task's windows over [start, end) at `now`, and how long they hold while the range
    moves along with now (the policy asks for the same reach around now every period, and
    recomputing 500 tasks' windows each time is what made a 30-day simulation take hours).

    Before `until` the moved range gives the same windows but those that left it (ended by
    its start), except that an open run's end keeps reaching `now + OPEN_MARGIN_S` while
    `grows`. `enters` is when the next fire's window enters the range at its end (`until`
    is never later)."""

    windows: tuple[Window, ...]
    until: float
    enters: float
    grows: bool


def task_windows(
    rules: RuleSet, name: str, runs: Sequence[Run], start: float, end: float, now: float
) -> TaskWindows:
    """`windows` of one task, in their order before the sort by start."""
    task = rules.tasks[name]
    duration = _expected(task, runs)
    every = _claimed(task, runs, start, end, now, duration)
    spans = _overlapping(every, start, end)
    found = tuple(
        Window(
            task=name,
            service=service,
            group=group,
            replicas=replicas,
            start=low,
            end=high,
            fire=fire,
            run=None if run is None else run.id,
            open=run is not None and run.open and high > now,
            stuck=run is not None and run.open and high <= now,
        )
        for low, high, fire, run in spans
        for service, group, replicas in _plan(rules).hops[name]
    )
    below, above = now - start, end - now
    following = fire_times(task, end, end + _DAY_S)
    enters = (following[0] if following else end + _DAY_S) - above
    changes = [enters]
    # A run that finishes before the range's start no longer claims its fire then: another
    # run that claimed none may claim it instead (its window then starts at the fire).
    unclaimed = [run.started_at for _, _, fire, run in every if run is not None and fire is None]
    for _, _, fire, run in every:
        if fire is None or run is None or run.finished_at is None:
            continue
        if any(fire - CLAIM_EARLY_S <= other < fire + duration for other in unclaimed):
            changes.append(run.finished_at + duration + 2 * CLAIM_EARLY_S + below)
    grows = False
    for run in runs:
        if run.finished_at is not None:
            continue
        held = run.started_at + NEVER_FINISHED * duration
        if run.started_at + duration >= now + OPEN_MARGIN_S:
            changes.append(run.started_at + duration - OPEN_MARGIN_S)  # starts growing
        elif now + OPEN_MARGIN_S < held:
            grows = True
            changes.append(held - OPEN_MARGIN_S)  # stops growing
        elif held > now:
            changes.append(held)  # stuck
    return TaskWindows(found, min(changes), enters, grows)


def _task_windows(
    task: ScheduledTask,
    runs: Sequence[Run],
    start: float,
    end: float,
    now: float,
    duration: float,
) -> list[tuple[float, float, float | None, Run | None]]:
    """(start, end, fire, run) of one task's runs overlapping [start, end); `duration` is
    its `expected_duration`."""
    return _overlapping(_claimed(task, runs, start, end, now, duration), start, end)


def _overlapping(
    spans: list[tuple[float, float, float | None, Run | None]], start: float, end: float
) -> list[tuple[float, float, float | None, Run | None]]:
    """The spans that overlap [start, end)."""
    return [span for span in spans if span[0] < end and span[1] > start]


def _claimed(
    task: ScheduledTask,
    runs: Sequence[Run],
    start: float,
    end: float,
    now: float,
    duration: float,
) -> list[tuple[float, float, float | None, Run | None]]:
    """`_task_windows` before the overlap: also those of the runs that may claim a fire."""
    # a run that finished before this cannot overlap the range nor claim a fire that does
    horizon = start - duration - 2 * CLAIM_EARLY_S
    relevant = sorted(
        (run for run in runs if run.finished_at is None or run.finished_at > horizon),
        key=lambda run: run.started_at,
    )
    low = start - duration - CLAIM_EARLY_S
    if relevant:
        low = min(low, relevant[0].started_at - duration)
    fires = fire_times(task, low, end + CLAIM_EARLY_S)
    claimed: dict[int, Run] = {}
    spans: list[tuple[float, float, float | None, Run | None]] = []
    for run in relevant:
        index = bisect.bisect_right(fires, run.started_at + CLAIM_EARLY_S) - 1
        fire: float | None = None
        if index >= 0 and index not in claimed and run.started_at < fires[index] + duration:
            claimed[index] = run
            fire = fires[index]
        if run.finished_at is not None:
            finish = run.finished_at
        else:
            finish = max(run.started_at + duration, now + OPEN_MARGIN_S)
            finish = min(finish, run.started_at + NEVER_FINISHED * duration)
        begin = run.started_at if fire is None else min(fire, run.started_at)
        spans.append((begin, finish, fire, run))
    spans.extend(
        (fire, fire + duration, fire, None)
        for index, fire in enumerate(fires)
        if index not in claimed
    )
    return spans


def extra_runs(task: ScheduledTask, runs: Sequence[Run]) -> tuple[Run, ...]:
    """The runs of `task` that no cron fire claims (manual or extra runs), by the same claim
    rule as `windows`. Cached: the policy asks every sync period, the history changes only
    when a run is reported."""
    return _extra(task, tuple(sorted(runs, key=lambda run: run.started_at)))


@lru_cache(maxsize=4096)
def _extra(task: ScheduledTask, runs: tuple[Run, ...]) -> tuple[Run, ...]:
    if not runs:
        return ()
    low, high = runs[0].started_at, runs[-1].started_at + 1
    spans = _task_windows(task, runs, low, high, high, _expected(task, runs))
    return tuple(run for _, _, fire, run in spans if fire is None and run is not None)


def profile(
    rules: RuleSet,
    history: Sequence[Run],
    start: float,
    minutes: int = 1440,
    now: float | None = None,
) -> dict[GroupKey, list[int]]:
    """Replicas each managed group needs in each minute from `start`: the most that
    overlapping windows need at once at any moment of that minute (windows of different
    tasks add up). Every managed group has an entry, zeros when idle. Not clamped to the
    group's bounds and without lead or drain: those belong to the policy."""
    end = start + 60 * minutes
    result = {key: [0] * minutes for key in managed_groups(rules)}
    changes: dict[GroupKey, dict[float, int]] = {}
    for window in windows(rules, history, start, end, now):
        steps = changes.setdefault((window.service, window.group), {})
        steps[window.start] = steps.get(window.start, 0) + window.replicas
        steps[window.end] = steps.get(window.end, 0) - window.replicas
    for key, steps in changes.items():
        slots = result.setdefault(key, [0] * minutes)
        level = 0
        times = sorted(steps)
        for moment, following in zip(times, [*times[1:], math.inf], strict=True):
            level += steps[moment]
            low, high = max(moment, start), min(following, end)
            if level <= 0 or low >= high:
                continue
            for slot in range(int((low - start) // 60), math.ceil((high - start) / 60)):
                slots[slot] = max(slots[slot], level)
    return result
