"""A workload file from what really happened: the rules, the runs and the measured start-ups
stored in etcd, so a user can replay their own week under every policy (`tasklane simulate
--from-history`) before trusting the scaler.

Per task, from its recorded runs (the open ones and the last finished ones etcd keeps):

- duration: median and p95 of its finished runs (nearest rank). A task whose runs always
  overrun its `expectedDuration` simply has long durations: what was measured is replayed.
  Without two finished runs the workload keeps the default (80 % of `expectedDuration`).
- skip: the share of its cron fires, between its first recorded run and now, that no run
  claims (by the profile's claim rule). A gap in the history (nothing reported for a while)
  therefore reads as skipped fires: that is what the scaler saw.
- extraRunsPerDay: runs no fire claims, per day of that span (at least a day).
- startDelay: p95 of how long after its fire a run started; a run reported before its fire
  (clock skew between the scheduler and the control plane) counts as 0.

Left out, each with a note: a run that finished before it started (clock skew), and a run
open for longer than `NEVER_FINISHED` x the task's expected duration (a scheduler that never
reported the end; the scaler stops holding it then too).

Per task group: median and p95 of the measured start-to-ready seconds; groups with none
take every measured group's pooled figures, or `FALLBACK_STARTUP` when nothing was measured.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controlplane.model.cron import format_duration
from controlplane.model.rules import RuleSet, ScheduledTask, to_document
from controlplane.model.run import Run
from controlplane.scaler.profile import (
    CLAIM_EARLY_S,
    NEVER_FINISHED,
    expected_duration,
    extra_runs,
    fire_times,
    managed_groups,
    percentile,
)

FALLBACK_STARTUP = (30.0, 60.0)  # median, p95 seconds, when no start-up was measured
MIN_FINISHED = 2
_DAY_S = 86400.0


@dataclass(frozen=True)
class Export:
    """The workload document and what was left out of it, one line each."""

    document: dict[str, Any]
    notes: tuple[str, ...]


def export_workload(
    rules: RuleSet,
    runs: Sequence[Run],
    startups: Mapping[tuple[str, str], Sequence[float]],
    now: float,
    name: str = "history",
) -> Export:
    """The workload of `rules` as the recorded `runs` and measured `startups` show them; the
    measured days start at the next UTC midnight after `now`."""
    notes: list[str] = []
    tasks: dict[str, Any] = {}
    for task_name, task in sorted(rules.tasks.items()):
        kept = _usable(task, [run for run in runs if run.task == task_name], now, notes)
        tasks[task_name] = _behaviour(task, kept, now)
    groups, default = _startups(rules, startups)
    midnight = math.floor(now / _DAY_S + 1) * _DAY_S
    document = {
        "apiVersion": "tasklane.io/v1",
        "kind": "Workload",
        "metadata": {"name": name},
        "spec": {
            "start": datetime.fromtimestamp(midnight, UTC).isoformat().replace("+00:00", "Z"),
            "warmup": "24h",
            "seed": 1,
            "defaults": {"startup": default},
            "groups": groups,
            "tasks": tasks,
            "rules": [
                to_document(rule)
                for kind in (rules.services, rules.chains, rules.tasks)
                for _, rule in sorted(kind.items())
            ],
        },
    }
    return Export(document, tuple(notes))


def _usable(task: ScheduledTask, runs: list[Run], now: float, notes: list[str]) -> list[Run]:
    """The runs a replay can learn from; a note for each one left out."""
    limit = NEVER_FINISHED * float(task.expected_duration_s)
    kept: list[Run] = []
    for run in sorted(runs, key=lambda run: run.started_at):
        if run.finished_at is not None and run.finished_at < run.started_at:
            notes.append(f"task {task.name}: run {run.id} finished before it started (clock skew)")
        elif run.finished_at is None and now - run.started_at > limit:
            hours = (now - run.started_at) / 3600
            notes.append(
                f"task {task.name}: run {run.id} open for {hours:.1f}h, over {NEVER_FINISHED} x "
                "its expected duration: never finished"
            )
        else:
            kept.append(run)
    return kept


def _behaviour(task: ScheduledTask, runs: list[Run], now: float) -> dict[str, Any]:
    """Duration, skip share, extra runs a day and start delay of one task's runs."""
    if not runs:
        return {}
    behaviour: dict[str, Any] = {}
    durations = [run.duration for run in runs if run.duration is not None]
    if len(durations) >= MIN_FINISHED:
        median = max(1.0, percentile(durations, 50))
        behaviour["duration"] = {
            "median": format_duration(round(median)),
            "p95": format_duration(max(round(median), round(percentile(durations, 95)))),
        }
    first = runs[0].started_at
    expected = expected_duration(task, runs)
    fires = fire_times(task, first - expected, now)
    extra = set(extra_runs(task, runs))
    delays = []
    claimed: set[int] = set()
    for run in runs:
        if run in extra:
            continue
        index = bisect.bisect_right(fires, run.started_at + CLAIM_EARLY_S) - 1
        delays.append(max(0.0, run.started_at - fires[index]) if index >= 0 else 0.0)
        claimed.add(index)
    # a fire counts once its run had an expected duration to be reported, or when claimed
    due = sum(
        1
        for index, fire in enumerate(fires)
        if fire >= first - CLAIM_EARLY_S and (fire <= now - expected or index in claimed)
    )
    if due:
        behaviour["skip"] = round(max(0.0, 1 - len(claimed) / due), 3)
    days = max(1.0, (now - first) / _DAY_S)
    behaviour["extraRunsPerDay"] = round(len(extra) / days, 3)
    if delays:
        behaviour["startDelay"] = format_duration(round(percentile(delays, 95)))
    return behaviour


def _startups(
    rules: RuleSet, startups: Mapping[tuple[str, str], Sequence[float]]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Per managed group's start-up spread, and the default for groups never measured."""
    pooled = [value for values in startups.values() for value in values if value > 0]
    default = _spread(pooled) if pooled else _format(*FALLBACK_STARTUP)
    groups = {
        f"{service}/{group}": {"startup": _spread(values)}
        for (service, group) in managed_groups(rules)
        if (values := [v for v in startups.get((service, group), ()) if v > 0])
    }
    return groups, default


def _spread(values: Sequence[float]) -> dict[str, str]:
    return _format(percentile(values, 50), percentile(values, 95))


def _format(median: float, p95: float) -> dict[str, str]:
    low = max(1, math.ceil(median))
    return {"median": format_duration(low), "p95": format_duration(max(low, math.ceil(p95)))}
