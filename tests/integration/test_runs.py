"""Task runs and scaling decisions against a real etcd, through the store, the HTTP API and the
`tasklane task` CLI: starts, finishes, listings, retention, refusals, racing reporters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.model.run import Run
from controlplane.store import decisions as decisions_store
from controlplane.store import runs as runs_store
from controlplane.store.runs import (
    DuplicateRun,
    RunConflict,
    RunError,
    RunNotFound,
    UnknownTask,
    finish_run,
    list_runs,
    run_key,
    start_run,
    watch_runs,
)
from tests.support.plane import api_opener
from tests.support.runs import Plane, plane_with_rules

REPO = Path(__file__).resolve().parents[2]
TASKLANE = [sys.executable, "-m", "controlplane"]

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def plane(etcd_endpoint_module: str) -> Iterator[Plane]:
    yield from plane_with_rules(etcd_endpoint_module)


# --- the store -------------------------------------------------------------------------------


def test_start_finish_list(plane: Plane) -> None:
    task = plane.new_task()
    first = start_run(plane.store, task, "a", at=1000.0)
    second = start_run(plane.store, task, at=2000.0)
    assert first == Run(task=task, id="a", started_at=1000.0)
    assert second.id.startswith("19700101T003320Z-") and len(second.id) == 23
    # No id: the latest open run finishes.
    done = finish_run(plane.store, task, at=2500.0)
    assert done == Run(task, second.id, 2000.0, 2500.0, "succeeded")
    failed = finish_run(plane.store, task, "a", at=3000.0, outcome="failed")
    assert failed.duration == 2000.0 and not failed.open
    assert list_runs(plane.store, task) == [failed, done]
    assert plane.stored(task) == {
        run_key(task, "a"): runs_store.to_json(failed),
        run_key(task, second.id): runs_store.to_json(done),
    }
    assert {run.id for run in list_runs(plane.store) if run.task == task} == {"a", second.id}


def test_refusals_name_the_problem(plane: Plane) -> None:
    task = plane.new_task()
    with pytest.raises(UnknownTask, match="ScheduledTask 'no-such-task' not found"):
        start_run(plane.store, "no-such-task")
    with pytest.raises(UnknownTask, match="ScheduledTask 'no-such-task' not found"):
        finish_run(plane.store, "no-such-task")
    with pytest.raises(RunConflict, match=f"task {task} has no open run"):
        finish_run(plane.store, task)
    with pytest.raises(RunNotFound, match=f"task {task} has no run 'x'"):
        finish_run(plane.store, task, "x")
    start_run(plane.store, task, "r1", at=100.0)
    with pytest.raises(DuplicateRun, match=f"task {task} already has a run 'r1'"):
        start_run(plane.store, task, "r1")
    with pytest.raises(RunError, match="before its start"):
        finish_run(plane.store, task, "r1", at=50.0)
    with pytest.raises(RunError, match="invalid outcome"):
        finish_run(plane.store, task, "r1", outcome="")
    with pytest.raises(RunError, match="invalid run id 'a/b'"):
        start_run(plane.store, task, "a/b")
    with pytest.raises(RunError, match="invalid start time"):
        start_run(plane.store, task, at=float("nan"))
    finish_run(plane.store, task, "r1", at=200.0)
    with pytest.raises(RunConflict, match="already finished at 1970-01-01T00:03:20Z"):
        finish_run(plane.store, task, "r1")
    assert list(plane.stored(task)) == [run_key(task, "r1")]


def test_retention_keeps_open_runs_and_the_last_finished(plane: Plane) -> None:
    task = plane.new_task()
    start_run(plane.store, task, "still-open", at=1.0)
    for i in range(runs_store.RETAIN + 5):
        start_run(plane.store, task, f"r{i:03d}", at=100.0 + i)
        finish_run(plane.store, task, f"r{i:03d}", at=1000.0 + i)
    kept = [f"r{i:03d}" for i in range(5, runs_store.RETAIN + 5)]
    assert [run.id for run in list_runs(plane.store, task)] == ["still-open", *kept]
    assert sorted(plane.stored(task)) == sorted(
        run_key(task, run_id) for run_id in ["still-open", *kept]
    )
    # The open run is what a finish without id picks, however old.
    assert finish_run(plane.store, task, at=5000.0).id == "still-open"
    assert "r005" not in {run.id for run in list_runs(plane.store, task)}


def test_racing_finishes_have_one_winner(plane: Plane) -> None:
    task = plane.new_task()
    start_run(plane.store, task, "race", at=10.0)

    def finish(outcome: str) -> Run | RunError:
        try:
            return finish_run(plane.store, task, "race", outcome=outcome)
        except RunError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(finish, [f"by-{i}" for i in range(8)]))
    winners = [result for result in results if isinstance(result, Run)]
    assert len(winners) == 1
    assert all(isinstance(result, RunConflict) for result in results if result not in winners)
    assert list_runs(plane.store, task) == winners


def test_watch_runs_sees_starts_and_finishes(plane: Plane) -> None:
    task = plane.new_task()
    seen: list[list[Run]] = []
    changed = threading.Event()

    def callback(runs: list[Run], _revision: int) -> None:
        seen.append([run for run in runs if run.task == task])
        changed.set()

    cancel = watch_runs(plane.store, callback)
    try:
        assert seen[-1] == []
        started = start_run(plane.store, task, "w", at=5.0)
        deadline = time.monotonic() + 5
        while seen[-1] != [started]:
            assert changed.wait(max(0.0, deadline - time.monotonic())), seen
            changed.clear()
        finished = finish_run(plane.store, task, "w", at=6.0)
        while seen[-1] != [finished]:
            assert changed.wait(max(0.0, deadline - time.monotonic())), seen
            changed.clear()
    finally:
        cancel()


# --- the HTTP API ----------------------------------------------------------------------------


def test_http_lifecycle(plane: Plane) -> None:
    task = plane.new_task()
    base = f"/api/v1/tasks/{task}/runs"
    status, started = plane.call("POST", base)
    assert status == 201
    assert started["task"] == task and started["finished_at"] is None and started["outcome"] == ""
    assert abs(started["started_at"] - time.time()) < 30
    status, explicit = plane.call("POST", base, {"id": "n1", "at": "2024-03-01T02:00:00+08:00"})
    assert (status, explicit["started_at"]) == (201, 1709229600.0)
    status, done = plane.call("POST", f"{base}/finish", {"id": "n1", "at": 1709233200})
    assert status == 200
    assert (done["finished_at"], done["outcome"]) == (1709233200.0, "succeeded")
    status, latest = plane.call("POST", f"{base}/finish", {"outcome": "failed"})
    assert (status, latest["id"], latest["outcome"]) == (200, started["id"], "failed")
    status, listing = plane.call("GET", base)
    assert status == 200
    assert listing == {"task": task, "items": [done, latest]}
    assert plane.stored(task) == {
        run_key(task, "n1"): done,
        run_key(task, started["id"]): latest,
    }


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/api/v1/tasks/nope/runs", None, 404, "ScheduledTask 'nope' not found"),
        ("GET", "/api/v1/tasks/nope/runs", None, 404, "ScheduledTask 'nope' not found"),
        ("POST", "/api/v1/tasks/nope/runs/finish", None, 404, "ScheduledTask 'nope' not found"),
        ("POST", "/api/v1/tasks/{task}/runs/finish", None, 409, "task {task} has no open run"),
        ("POST", "/api/v1/tasks/{task}/runs/finish", {"id": "x"}, 404, "task {task} has no run"),
        ("POST", "/api/v1/tasks/{task}/runs", {"id": "dup"}, 409, "task {task} already has"),
        ("POST", "/api/v1/tasks/{task}/runs", {"idd": "x"}, 400, "unknown field 'idd'"),
        ("POST", "/api/v1/tasks/{task}/runs", [1], 400, "must be a JSON object"),
        ("POST", "/api/v1/tasks/{task}/runs", {"id": 7}, 400, "invalid run id integer 7"),
        ("POST", "/api/v1/tasks/{task}/runs", {"at": "today"}, 400, "invalid time string"),
        ("POST", "/api/v1/tasks/{task}/runs", {"at": "2024-03-01T02:00"}, 400, "timezone"),
        ("POST", "/api/v1/tasks/{task}/runs", {"id": "a b"}, 400, "invalid run id 'a b'"),
    ],
)
def test_http_errors(
    plane: Plane, method: str, path: str, body: object, status: int, message: str
) -> None:
    task = plane.new_task()
    plane.call("POST", f"/api/v1/tasks/{task}/runs", {"id": "dup"})
    plane.call("POST", f"/api/v1/tasks/{task}/runs/finish", {"id": "dup"})
    answer = plane.call(method, path.format(task=task), body)
    assert answer[0] == status, answer
    assert list(answer[1]) == ["error"] and "\n" not in answer[1]["error"]
    assert message.format(task=task) in answer[1]["error"]
    assert list(plane.stored(task)) == [run_key(task, "dup")]


def test_http_body_that_is_not_json(plane: Plane) -> None:
    task = plane.new_task()
    request = urllib.request.Request(
        f"{plane.url}/api/v1/tasks/{task}/runs", b"{nope", plane.auth_headers(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        api_opener.open(request, timeout=10)
    assert caught.value.code == 400
    assert json.loads(caught.value.read()) == {"error": "the request body is not JSON"}


# --- the CLI ---------------------------------------------------------------------------------


def tasklane(plane: Plane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKLANE, "task", *args, "--server", plane.url],
        env={**os.environ, "TASKLANE_TOKEN": plane.token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_start_finish_runs(plane: Plane) -> None:
    task = plane.new_task()
    started = tasklane(plane, "start", task, "--id", "cli-1")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith(f"run {task}/cli-1 started at 20")
    second = tasklane(plane, "start", task)
    assert second.returncode == 0, second.stderr
    second_id = second.stdout.split()[1].split("/")[1]
    finished = tasklane(plane, "finish", task, "--id", "cli-1", "--outcome", "failed")
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(f"run {task}/cli-1 finished (failed) at 20")
    assert finished.stdout.rstrip().endswith("s")  # "after 1s" or similar

    listing = tasklane(plane, "runs", task)
    assert listing.returncode == 0, listing.stderr
    header, *rows = listing.stdout.splitlines()
    assert header.split() == ["ID", "STARTED", "FINISHED", "DURATION", "OUTCOME"]
    assert [row.split()[0] for row in rows] == ["cli-1", second_id]
    assert rows[0].split()[-1] == "failed"
    assert rows[1].split()[2:] == ["-", "-", "open"]
    assert sorted(plane.stored(task)) == sorted([run_key(task, "cli-1"), run_key(task, second_id)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("start", "nope"), "ScheduledTask 'nope' not found"),
        (("finish", "{task}"), "task {task} has no open run"),
        (("runs", "nope"), "ScheduledTask 'nope' not found"),
        (("start", "{task}", "--id", "a/b"), "invalid run id 'a/b'"),
    ],
)
def test_cli_errors_are_one_line(plane: Plane, args: tuple[str, ...], message: str) -> None:
    task = plane.new_task()
    result = tasklane(plane, *(arg.format(task=task) for arg in args))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"tasklane: error: {message.format(task=task)}")
    assert result.stderr.count("\n") == 1


def test_cli_runs_of_a_task_without_runs(plane: Plane) -> None:
    task = plane.new_task()
    result = tasklane(plane, "runs", task)
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == f"No runs of task {task} recorded.\n"


# --- decisions -------------------------------------------------------------------------------


def test_decisions_are_kept_per_group_newest_last(plane: Plane) -> None:
    store = plane.store
    for i in range(decisions_store.RETAIN + 3):
        decisions_store.record_decision(store, "svc-a", "task", i % 4, f"step {i}", 1000.0 + i)
    decisions_store.record_decision(store, "svc-a", "debit", 2, "pre-warm for t", 1050.5)
    decisions_store.record_decision(store, "svc-ab", "task", 1, "other service", 1051.0)

    task_group = decisions_store.list_decisions(store, "svc-a", "task", limit=1000)
    assert len(task_group) == decisions_store.RETAIN
    assert task_group[0]["reason"] == "step 3" and task_group[-1]["reason"] == "step 102"
    items, _ = store.get_prefix("decisions/svc-a/task/")
    assert len(items) == decisions_store.RETAIN
    assert min(items) == "decisions/svc-a/task/000000001003000"

    latest = decisions_store.list_decisions(store, "svc-a", limit=3)
    assert [(d["group"], d["at"]) for d in latest] == [("task", 1100.0 + i) for i in range(3)]
    every = decisions_store.list_decisions(store, "svc-a", limit=1000)
    assert len(every) == decisions_store.RETAIN + 1  # not svc-ab's
    assert every[47:49] == [
        {"service": "svc-a", "group": "task", "replicas": 2, "reason": "step 50", "at": 1050.0},
        {"service": "svc-a", "group": "debit", "replicas": 2, "reason": "pre-warm for t",
         "at": 1050.5},
    ]  # fmt: skip


def test_decisions_in_one_millisecond_all_stay(plane: Plane) -> None:
    @dataclass(frozen=True)
    class Decision:  # the shape of controlplane.scaler.policy.Decision
        service: str
        group: str
        replicas: int
        reason: str
        at: float

    store = plane.store
    decisions_store.record_decisions(
        store, [Decision("svc-b", "task", n, f"metric {n}", 7.0) for n in range(3)]
    )
    items, _ = store.get_prefix("decisions/svc-b/task/")
    assert sorted(items) == [f"decisions/svc-b/task/{ms:015d}" for ms in (7000, 7001, 7002)]
    assert [d["replicas"] for d in decisions_store.list_decisions(store, "svc-b")] == [0, 1, 2]
    with pytest.raises(ValueError, match="replicas must be an integer >= 0"):
        decisions_store.record_decision(store, "svc-b", "task", -1, "x", 8.0)
