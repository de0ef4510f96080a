"""Runs of scheduled tasks in etcd: one JSON document per Run at `runs/<task>/<run id>`.

Schedulers report starts and finishes (CLI, HTTP, gRPC); the scaler learns durations from the
history and keeps a chain up while a run is open. Every write is one transaction guarded by
the revisions it was decided on, so two reporters racing on one run cannot both win, and it
prunes the task's finished runs beyond RETAIN in the same transaction: the history stays
bounded without a janitor.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace

from controlplane.errors import StoreError, TasklaneError
from controlplane.model.run import Run, format_time
from controlplane.model.text import quote
from controlplane.store.etcd import PREFIX, Store
from controlplane.store.follow import Follower, keyed_fold
from controlplane.store.rules import REVISION_KEY, load_rules

RUNS = "runs/"
# Finished runs kept per task: enough for a p90 of recent durations. Open runs are never pruned.
RETAIN = 50
# etcd takes at most 128 operations per transaction; a write prunes at most this many runs
# (a longer backlog shrinks by as many on each later write).
MAX_PRUNE = 100
# A transaction lost to a concurrent writer is decided again on fresh reads this many times.
ATTEMPTS = 3
DEFAULT_OUTCOME = "succeeded"
MAX_OUTCOME = 64
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")

_log = logging.getLogger(__name__)


class RunError(TasklaneError):
    """A run report that cannot be recorded as given (malformed id, time or outcome)."""


class UnknownTask(RunError):
    """The task is not a stored ScheduledTask."""


class RunNotFound(RunError):
    """The task has no run with the given id."""


class RunConflict(RunError):
    """The report contradicts the stored runs: a duplicate id, no open run, already finished."""


class DuplicateRun(RunConflict):
    """The task already has a run with this id."""


def run_key(task: str, run_id: str) -> str:
    """The store key of one run."""
    return f"{RUNS}{task}/{run_id}"


def to_json(run: Run) -> dict:
    return asdict(run)


def from_json(data: object) -> Run:
    """A Run from its JSON document; ValueError naming what is wrong otherwise."""
    if not isinstance(data, dict) or set(data) != {
        "task",
        "id",
        "started_at",
        "finished_at",
        "outcome",
    }:
        raise ValueError("a run must be an object with task, id, started_at, finished_at, outcome")
    for name in ("task", "id", "outcome"):
        if not isinstance(data[name], str):
            raise ValueError(f"run field {name!r} must be a string")
    for name in ("started_at", "finished_at"):
        value = data[name]
        if value is None and name == "finished_at":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"run field {name!r} must be a number")
    return Run(**data)


def encode(run: Run) -> bytes:
    return json.dumps(to_json(run), separators=(",", ":")).encode()


def new_run_id(at: float) -> str:
    """The start time in UTC plus a short random suffix: readable, sortable, unique enough."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(at))}-{secrets.token_hex(3)}"


def start_run(store: Store, task: str, run_id: str | None = None, at: float | None = None) -> Run:
    """Record that a run of `task` started at `at` (default now); returns it.

    UnknownTask unless `task` is a stored ScheduledTask, RunConflict if it already has a run
    `run_id` (DuplicateRun), RunError for a malformed id or time, StoreError if etcd fails.
    """
    started_at = time.time() if at is None else _check_time(at, "start")
    run_id = new_run_id(started_at) if run_id is None else _check_id(run_id)
    run = Run(task=task, id=run_id, started_at=started_at)
    key = run_key(task, run_id)
    for _ in range(ATTEMPTS):
        # The task's existence is part of the guard: a run never lands after its task was
        # deleted, whatever the interleaving.
        rules_revision = require_task(store, task)
        runs = _task_runs(store, task)
        if run_id in runs:
            raise DuplicateRun(f"task {task} already has a run {quote(run_id)}")
        deletes = _pruned([*runs.values(), run])
        if store.txn({key: encode(run)}, deletes, {key: 0, REVISION_KEY: rules_revision}):
            return run
    raise StoreError(f"runs of task {task} kept changing concurrently; retry")


def finish_run(
    store: Store,
    task: str,
    run_id: str | None = None,
    at: float | None = None,
    outcome: str = DEFAULT_OUTCOME,
) -> Run:
    """Record that a run of `task` finished at `at` (default now) with `outcome`; returns it.

    run_id None finishes the task's latest open run. UnknownTask or RunNotFound when there is
    no such task or run, RunConflict when no run is open or this one already finished,
    RunError for a finish before the start or a malformed outcome, StoreError if etcd fails.
    """
    _check_outcome(outcome)
    finished_at = None if at is None else _check_time(at, "finish")
    for _ in range(ATTEMPTS):
        runs = _task_runs(store, task)
        run = _to_finish(store, task, runs, run_id)
        key = run_key(task, run.id)
        # Revision first, value second: a write in between makes the value differ (read
        # again) or the guard fail, never a finish decided on a state that is gone.
        revision = store.mod_revision(key)
        if _decode(key, store.get(key)) != run:
            continue
        end = time.time() if finished_at is None else finished_at
        if end < run.started_at:
            raise RunError(
                f"run {run.id} of task {task} cannot finish at {format_time(end)}, "
                f"before its start at {format_time(run.started_at)}"
            )
        done = replace(run, finished_at=end, outcome=outcome)
        deletes = _pruned([*(each for each in runs.values() if each.id != run.id), done])
        if store.txn({key: encode(done)}, deletes, {key: revision}):
            return done
    raise StoreError(f"runs of task {task} kept changing concurrently; retry")


def list_runs(store: Store, task: str | None = None) -> list[Run]:
    """The stored runs of `task` (default: every task), oldest start first."""
    items, _ = store.get_prefix(RUNS if task is None else f"{RUNS}{task}/")
    return _sorted(_decode(key, value) for key, value in items.items())


def require_task(store: Store, task: str) -> int:
    """The rules revision the task was seen at; UnknownTask if it is not a ScheduledTask."""
    rules, revision = load_rules(store)
    if task not in rules.tasks:
        raise UnknownTask(f"ScheduledTask {quote(task)} not found")
    return revision


RunsCallback = Callable[[list[Run], int], None]


def watch_runs(store: Store, callback: RunsCallback) -> Callable[[], None]:
    """Call `callback(every run, oldest start first, etcd revision)` now and after each change.

    Returns a cancel function. Through etcd outages the runs are read again and passed to
    `callback` (see Follower); callbacks come from one thread at a time. StoreError if etcd
    does not answer the first read.
    """
    return Follower(
        store,
        RUNS,
        _read_by_key,
        keyed_fold(_decode),
        lambda runs, revision: callback(_sorted(runs.values()), revision),
    ).start()


def _read_by_key(store: Store) -> tuple[dict[str, Run], int]:
    items, revision = store.get_prefix(RUNS)
    decoded = {key: _decode(key, value) for key, value in items.items()}
    return {key: run for key, run in decoded.items() if run is not None}, revision


def _sorted(runs: Iterable[Run | None]) -> list[Run]:
    return sorted((run for run in runs if run is not None), key=_start_order)


def _start_order(run: Run) -> tuple[float, str, str]:
    return run.started_at, run.task, run.id


def _task_runs(store: Store, task: str) -> dict[str, Run]:
    """The task's runs by id (a name with '/' can be no task's, so it has none)."""
    if not task or "/" in task:
        return {}
    return {run.id: run for run in list_runs(store, task)}


def _to_finish(store: Store, task: str, runs: dict[str, Run], run_id: str | None) -> Run:
    """The run a finish report is about, or the error that report deserves."""
    if run_id is None:
        open_runs = [run for run in runs.values() if run.open]
        if not open_runs:
            require_task(store, task)
            raise RunConflict(f"task {task} has no open run")
        return max(open_runs, key=_start_order)
    run = runs.get(run_id)
    if run is None:
        require_task(store, task)
        raise RunNotFound(f"task {task} has no run {quote(run_id)}")
    if not run.open:
        assert run.finished_at is not None
        raise RunConflict(
            f"run {run.id} of task {task} already finished at {format_time(run.finished_at)} "
            f"({run.outcome})"
        )
    return run


def _pruned(runs: list[Run]) -> list[str]:
    """Keys of the finished runs beyond the RETAIN most recently finished (at most
    MAX_PRUNE of them, oldest first)."""
    finished = sorted(
        (run for run in runs if run.finished_at is not None),
        key=lambda run: (run.finished_at, *_start_order(run)),
    )
    excess = finished[: max(0, len(finished) - RETAIN)]
    return [run_key(run.task, run.id) for run in excess[:MAX_PRUNE]]


def _check_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise RunError(
            f"invalid run id {quote(str(run_id))}: 1-128 letters, digits and ._:@+- "
            "starting with a letter or digit"
        )
    return run_id


def _check_time(at: object, what: str) -> float:
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < 0:
        raise RunError(f"invalid {what} time {quote(str(at))}: seconds since the epoch (UTC)")
    return float(at)


def _check_outcome(outcome: object) -> None:
    if (
        not isinstance(outcome, str)
        or not outcome
        or len(outcome) > MAX_OUTCOME
        or not outcome.isprintable()
    ):
        raise RunError(
            f"invalid outcome {quote(str(outcome))}: 1-{MAX_OUTCOME} printable characters, "
            f"e.g. {DEFAULT_OUTCOME} or failed"
        )


def _decode(key: str, value: bytes | None) -> Run | None:
    """The run stored at `key`, or None (logged) when it holds something else: one bad key
    must not hide every other run."""
    if value is None:
        return None
    try:
        run = from_json(json.loads(value))
    except ValueError as exc:
        _log.warning("ignoring etcd key %s%s: not a run: %s", PREFIX, key, exc)
        return None
    if run_key(run.task, run.id) != key:
        _log.warning("ignoring etcd key %s%s: it holds run %s/%s", PREFIX, key, run.task, run.id)
        return None
    return run
