"""Actuators with real processes: a real `tasklane up`, and a LocalActuator that starts,
parks, resumes and stops real `tasklane run`s (demo/chain_app behind real Envoys) from each
Service's `spec.run`. Requests go through a real sidecar's egress listener, so "serves" and
"receives no traffic" are what the mesh actually did. Nothing is left running."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.model import RuleSet, apply, load_files
from controlplane.scaler.actuators import DryRunActuator, GroupReplicas
from controlplane.scaler.actuators.local import LocalActuator
from controlplane.scaler.policy import Decision
from tests.support.chain import children_of
from tests.support.procs import wait_gone
from tests.support.up import TASKLANE, Up, get_json, start_up
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

STOP_TIMEOUT = 15.0
DYE = {"x-task-dye": "fund-yield"}
FACADE_TASK = ("fund-facade", "task")
FACADE_DEFAULT = ("fund-facade", "default")

# One hop is enough to see where a dyed request lands: fund-facade's online instance calls
# fund-facade itself through its sidecar's egress, and the strict chain sends dyed requests
# to the task group only (503 when it has no instance).
RULES = """\
apiVersion: tasklane.io/v1
kind: Service
metadata: {name: fund-facade}
spec:
  groups:
    - {name: default, minReplicas: 1, maxReplicas: 2}
    - {name: task, minReplicas: 0, maxReplicas: 4}
  run:
    command: [python, -m, demo.chain_app, --service, fund-facade]
    env: {PYTHONUNBUFFERED: "1"}
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: fund-yield}
spec:
  dye: {values: [fund-yield]}
  fallback: strict
  hops: [{service: fund-facade, group: task}]
"""


@dataclass
class Plane:
    up: Up
    rules: RuleSet
    work: Path

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.up.ports['http']}"

    def instances(self, key: tuple[str, str]) -> list[dict]:
        status, body = get_json(f"{self.server}/api/v1/instances")
        assert status == 200, body
        return [item for item in body["items"] if (item["service"], item["group"]) == key]

    def actuator(self, keep_alive: int) -> LocalActuator:
        return LocalActuator(
            self.server,
            lambda: self.rules,
            self.work / f"keep-{keep_alive}",
            keep_alive,
            api_token=self.up.token,
        )


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    work = tmp_path_factory.mktemp("actuators")
    rules_file = work / "rules.yaml"
    rules_file.write_text(RULES)
    up = start_up(work)
    try:
        applied = subprocess.run(
            [*TASKLANE, "apply", "--server", f"http://127.0.0.1:{up.ports['http']}"]
            + ["-f", str(rules_file)],
            env={**os.environ, "TASKLANE_TOKEN": up.token},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert applied.returncode == 0, applied.stderr
        yield Plane(up, apply(RuleSet.empty(), load_files([rules_file])), work)
    finally:
        up.proc.send_signal(signal.SIGTERM)
        try:
            assert up.proc.wait(timeout=STOP_TIMEOUT) == 0
        finally:
            up.kill()


def get(egress_port: int, headers: dict[str, str]) -> tuple[int, dict]:
    """GET / on fund-facade through a sidecar's egress listener."""
    conn = http.client.HTTPConnection("127.0.0.1", egress_port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": "fund-facade", **headers})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, {"error": body.decode(errors="replace")}


def served_by(egress_port: int) -> tuple[int, tuple[str, int] | None]:
    """Status of a dyed request and (group, app pid) of the instance that served it."""
    status, answer = get(egress_port, DYE)
    hops = answer.get("hops", [])
    return status, (hops[0]["group"], int(hops[0]["instance"])) if hops else None


def wait_observed(actuator: LocalActuator, key: tuple[str, str], want: GroupReplicas) -> None:
    wait_until(
        lambda: actuator.observe().get(key) == want,
        timeout=45,
        what=f"{key} observed as {want} (last: {actuator.observe().get(key)})",
    )


def run_processes() -> list[int]:
    """Our `tasklane run` children (the actuator's worker thread forks in this process)."""
    found = []
    for pid in children_of(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"controlplane" in cmdline and b"run" in cmdline:
            found.append(pid)
    return found


def state_of(pid: int) -> str:
    """The kernel's one-letter state: R/S running or sleeping, T stopped, Z zombie."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def assert_all_gone(pids: list[int]) -> None:
    for pid in pids:
        assert wait_gone(pid, timeout=5), f"pid {pid} still running"


def test_dry_run_records_and_acts_on_nothing() -> None:
    clock = iter([100.0, 160.0])
    actuator = DryRunActuator(clock=lambda: next(clock))
    before = set(children_of(os.getpid()))
    actuator.scale("fund-facade", "task", 4, "pre-warm for nightly-fund-yield")
    actuator.scale("fund-facade", "task", 0, "run finished")
    assert actuator.decisions == [
        Decision("fund-facade", "task", 4, "pre-warm for nightly-fund-yield", 100.0),
        Decision("fund-facade", "task", 0, "run finished", 160.0),
    ]
    assert actuator.observe() == {FACADE_TASK: GroupReplicas(ready=0, starting=0)}
    assert actuator.start_durations() == {}
    assert set(children_of(os.getpid())) == before
    actuator.close()


def test_local_actuator_scales_a_task_group_up_and_down(plane: Plane) -> None:
    actuator = plane.actuator(keep_alive=0)
    try:
        actuator.scale(*FACADE_DEFAULT, 1, "online")
        actuator.scale(*FACADE_TASK, 2, "pre-warm for fund-yield")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=2, starting=0))
        wait_observed(actuator, FACADE_DEFAULT, GroupReplicas(ready=1, starting=0))
        task = plane.instances(FACADE_TASK)
        assert len(task) == 2
        [caller] = plane.instances(FACADE_DEFAULT)
        # Served through the mesh by the task group, by one of the two new instances.
        status, by = wait_until(
            lambda: (result := served_by(caller["egress_port"]))[0] == 200 and result,
            timeout=15,
            what="a dyed request served",
        )
        assert by[0] == "task" and by[1] in {item["pid"] for item in task}
        durations = actuator.start_durations()[FACADE_TASK]
        assert len(durations) == 2 and all(0 < seconds < 30 for seconds in durations)

        runs = set(run_processes())
        assert len(runs) == 3
        task_runs = {pid for pid in runs if any(item["pid"] in children_of(pid) for item in task)}
        children = [child for pid in task_runs for child in children_of(pid)]
        assert len(task_runs) == 2 and len(children) == 4  # each: its app and its Envoy

        actuator.scale(*FACADE_TASK, 0, "run finished")
        wait_until(
            lambda: not actuator.observe()[FACADE_TASK].ready and not plane.instances(FACADE_TASK),
            timeout=STOP_TIMEOUT,
            what="the task group gone from the registry",
        )
        assert_all_gone([*task_runs, *children])
        assert actuator.observe()[FACADE_TASK] == GroupReplicas(ready=0, starting=0)
        assert set(run_processes()) == runs - task_runs
        status, _ = get(caller["egress_port"], DYE)
        assert status == 503  # strict: no instance left in the task group
    finally:
        actuator.close()
    assert not run_processes()
    assert not plane.instances(FACADE_DEFAULT)
    assert "Traceback" not in "".join(p.read_text() for p in (plane.work / "keep-0").iterdir())


def test_keep_alive_parks_the_newest_and_resumes_it(plane: Plane) -> None:
    actuator = plane.actuator(keep_alive=1)
    try:
        actuator.scale(*FACADE_DEFAULT, 1, "online")
        actuator.scale(*FACADE_TASK, 1, "pre-warm")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=1, starting=0))
        [older] = plane.instances(FACADE_TASK)
        actuator.scale(*FACADE_TASK, 2, "metric")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=2, starting=0))
        [newer] = [item for item in plane.instances(FACADE_TASK) if item["id"] != older["id"]]
        [caller] = plane.instances(FACADE_DEFAULT)
        egress = caller["egress_port"]
        wait_until(
            lambda: (
                {served_by(egress)[1] for _ in range(10)}
                == {("task", older["pid"]), ("task", newer["pid"])}
            ),
            timeout=15,
            what="both task instances serve",
        )

        # Down to 1: the newest is parked, deregistered first, then stopped; its run lives.
        actuator.scale(*FACADE_TASK, 1, "metric")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=1, starting=0, parked=1))
        wait_until(  # the run deregisters on being told to park, a moment after the ask
            lambda: [item["id"] for item in plane.instances(FACADE_TASK)] == [older["id"]],
            timeout=5,
            what="only the older instance registered",
        )
        [run] = [pid for pid in run_processes() if newer["pid"] in children_of(pid)]
        parked = children_of(run)  # its app and its Envoy
        wait_until(
            lambda: all(state_of(pid) == "T" for pid in parked),
            timeout=5,
            what="the parked app and Envoy stopped",
        )
        assert state_of(run) != "T"
        for _ in range(20):
            assert served_by(egress) == (200, ("task", older["pid"]))

        # Down to 0: the keep-alive slot is taken, so the last one is stopped for good, and a
        # strict chain with only a parked instance fails fast instead of waiting on it.
        actuator.scale(*FACADE_TASK, 0, "run finished")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=0, starting=0, parked=1))
        wait_until(lambda: not plane.instances(FACADE_TASK), what="the task group deregistered")
        wait_until(lambda: get(egress, DYE)[0] == 503, what="callers told", timeout=5)
        for _ in range(5):
            started = time.monotonic()
            status, answer = get(egress, DYE)
            assert status == 503 and "no healthy instance (strict_reject)" in answer["error"]
            assert time.monotonic() - started < 0.5

        # Up to 1: the parked instance resumes (same run, same app) instead of a cold start.
        actuator.scale(*FACADE_TASK, 1, "pre-warm")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=1, starting=0))
        assert [item["id"] for item in plane.instances(FACADE_TASK)] == [newer["id"]]
        assert all(state_of(pid) != "T" for pid in parked)
        wait_until(
            lambda: served_by(egress) == (200, ("task", newer["pid"])),
            timeout=10,
            what="the resumed instance serves",
        )
        assert len(actuator.start_durations()[FACADE_TASK]) == 2  # resumes are not starts

        # Parked again, then close(): a parked run is stopped too, app and Envoy with it.
        actuator.scale(*FACADE_TASK, 0, "run finished")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=0, starting=0, parked=1))
        wait_until(
            lambda: all(state_of(pid) == "T" for pid in parked),
            timeout=5,
            what="parked again",
        )
    finally:
        actuator.close()
    assert not run_processes()
    assert_all_gone([run, *parked])
    logs = "".join(p.read_text() for p in (plane.work / "keep-1").iterdir())
    assert "parked: app" in logs and "resumed in" in logs and "Traceback" not in logs


def test_the_policys_pool_parks_beyond_the_keep_alive(plane: Plane) -> None:
    """--keep-alive 0, but the policy keeps a pool for a group whose task is run by hand
    every day: the pool is filled (cold starts, parked once registered) and kept full while
    runs come and go; an extra run resumes from it."""
    actuator = plane.actuator(keep_alive=0)
    try:
        actuator.keep({FACADE_TASK: 1})
        actuator.scale(*FACADE_TASK, 0, "idle")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=0, starting=0, parked=1))
        wait_until(lambda: not plane.instances(FACADE_TASK), what="the filler deregistered")
        actuator.keep({FACADE_TASK: 2})
        actuator.scale(*FACADE_TASK, 2, "run open")  # one resumed, one cold, two to refill
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=2, starting=0, parked=2))
        actuator.scale(*FACADE_TASK, 0, "run finished")  # the pool is full: these stop
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=0, starting=0, parked=2))
        actuator.scale(*FACADE_TASK, 1, "extra run open")
        wait_observed(actuator, FACADE_TASK, GroupReplicas(ready=1, starting=0, parked=2))
        assert len(actuator.start_durations()[FACADE_TASK]) == 5  # resumes are not starts
    finally:
        actuator.close()
    assert not run_processes()


def test_scale_refuses_what_it_cannot_start(plane: Plane, tmp_path: Path) -> None:
    rules = apply(
        plane.rules,
        load_files([_write(tmp_path / "bare.yaml", "kind: Service\nmetadata: {name: bare}\n")]),
    )
    actuator = LocalActuator(plane.server, lambda: rules, tmp_path / "logs", api_token="unused")
    try:
        with pytest.raises(Exception, match="service bare has no spec.run.command"):
            actuator.scale("bare", "default", 1, "test")
        with pytest.raises(Exception, match="service fund-facade has no group 'batch'"):
            actuator.scale("fund-facade", "batch", 1, "test")
        with pytest.raises(Exception, match="Service 'nope' not found"):
            actuator.scale("nope", "default", 1, "test")
        with pytest.raises(Exception, match="replicas must be a whole number >= 0"):
            actuator.scale("fund-facade", "task", -1, "test")
        actuator.scale("nope", "default", 0, "nothing to start")  # harmless
    finally:
        actuator.close()
    assert not run_processes()


def _write(path: Path, body: str) -> Path:
    path.write_text(f"apiVersion: tasklane.io/v1\n{body}spec: {{}}\n")
    return path
