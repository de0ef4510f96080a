"""The live scaler end to end: the leader's policy drives the local actuator, which starts real
`tasklane run` instances (app + Envoy sidecar). A task group is pre-warmed and serves dyed
requests before its cron fires, goes down once the run is reported finished, and every
decision is in etcd with its reason."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controlplane.scaler.actuators import DryRunActuator, GroupReplicas
from controlplane.scaler.actuators.local import LocalActuator
from controlplane.scaler.policy import PolicyConfig
from controlplane.store.decisions import list_decisions
from tests.support.plane import Plane
from tests.support.procs import gone
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
APP = "[python, -m, demo.chain_app, --service, nav-pricing]"


def rules(fire: datetime) -> str:
    return f"""
apiVersion: tasklane.io/v1
kind: Service
metadata: {{name: nav-pricing}}
spec:
  groups: [{{name: default}}, {{name: task, minReplicas: 0, maxReplicas: 2}}]
  run: {{command: {APP}}}
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {{name: fund-yield}}
spec:
  dye: {{values: [fund-yield, "fund-yield@*"]}}
  hops: [{{service: nav-pricing, group: task}}]
---
apiVersion: tasklane.io/v1
kind: ScheduledTask
metadata: {{name: nightly}}
spec:
  chain: fund-yield
  schedule: "{fire.minute} {fire.hour} * * *"
  expectedDuration: 1m
  replicas: {{nav-pricing: 2}}
"""


def test_task_group_is_prewarmed_before_the_fire_and_goes_down_after_the_run(
    etcd_server, tmp_path: Path
) -> None:
    # The next fire is 2-3 minutes away; a 4-minute lead (no start measured yet) pre-warms
    # at once, so the test need not wait for the clock. The first instance ready measures a
    # start of seconds, which ends the pre-warm (the fire is minutes away) while the second
    # may still be starting: only the scale-down window (no down within it after an up)
    # holds the group until both are up and served. No keep margin, so once the run has
    # finished, the fire it did not claim (it was reported minutes early) keeps nothing.
    fire = (datetime.now(UTC) + timedelta(minutes=3)).replace(second=0, microsecond=0)
    later = fire + timedelta(hours=12)
    window_s = 30
    config = PolicyConfig(
        sync_period_s=1,
        drain_s=1,
        scale_down_window_s=window_s,
        keep_margin_s=0,
        default_lead_s=240,
        resume_s=None,  # up a lead early, not parked until the fire (see the parked test)
    )
    plane = Plane(
        etcd_server.endpoint,
        actuator=lambda cp: LocalActuator(
            cp_url(cp),
            lambda: cp.sync.rules,
            tmp_path / "instances",
            keep_alive=0,
            api_token=cp.api_token.value,
        ),
        scaler_config=config,
    )
    started: list[int] = []
    try:
        # The task is first due hours away: the group's first decision is 0, so the pre-warm
        # is an up, which the window holds (a group's first decision counts as none).
        code, body = plane.apply_files({"rules.yaml": rules(later)})
        assert code == 200, body
        wait_until(lambda: list_decisions(plane.store, "nav-pricing", "task"), 10, "idle")
        code, body = plane.apply_files({"rules.yaml": rules(fire)})
        assert code == 200, body

        def task_instances() -> list[dict]:
            _, listed = plane.request("GET", "/api/v1/instances")
            return [i for i in listed["items"] if i["group"] == "task"]

        # Both waits end within the window: two instances up, then served.
        up_s = window_s - 10
        ready = wait_until(lambda: len(task_instances()) == 2 and task_instances(), up_s, "2 up")
        started = [i["pid"] for i in ready]
        # Callers route to a new instance once their first health check of it passed.
        served = wait_until(lambda: dyed_request(ready[0]["egress_port"]), 10, "dyed routed")
        assert datetime.now(UTC) < fire, "pre-warm came too late to prove anything"
        assert served == [("nav-pricing", "task")]

        # The scheduler reports the run; once it is finished the group goes down together.
        assert plane.request("POST", "/api/v1/tasks/nightly/runs", {})[0] == 201
        assert plane.request("POST", "/api/v1/tasks/nightly/runs/finish", {})[0] == 200

        def last() -> dict:
            return list_decisions(plane.store, "nav-pricing", "task")[-1]

        # The group goes down at the end of the scale-down window at the earliest: wait for
        # the decision that takes it down after the run, not merely for no instance registered.
        wait_until(
            lambda: last()["replicas"] == 0 and "finished" in last()["reason"],
            window_s + 10,
            "down after",
        )
        wait_until(lambda: task_instances() == [], 30, "task group down after the run")
        wait_until(lambda: all(gone(pid) for pid in started), 15, "instances stopped")

        reasons = [d["reason"] for d in list_decisions(plane.store, "nav-pricing", "task")]
        assert any("pre-warm" in r for r in reasons), reasons
        profile = subprocess.run(
            [sys.executable, "-m", "controlplane", "get", "profile", "nav-pricing"],
            env={"TASKLANE_SERVER": plane.url, "PATH": "/usr/bin:/bin"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert profile.returncode == 0, profile.stderr
        assert "recent decisions:" in profile.stdout and "pre-warm" in profile.stdout
        assert plane.request("GET", "/api/v1/profile/nav-pricing")[1]["scaler"] is True
    finally:
        plane.stop()
    assert all(gone(pid) for pid in started)


def test_a_parked_pre_warm_starts_early_and_resumes_just_before_the_fire(
    etcd_server, tmp_path: Path
) -> None:
    """Where the actuator can park, the pre-warm's instances are started a lead early (240 s,
    none measured: at once) and parked once registered: deregistered, serving nothing, with
    the group's desired count still 0. A sync period plus `resume_s` before the fire they
    are resumed, not started again, and serve the task's dyed requests."""
    fire = (datetime.now(UTC) + timedelta(seconds=90)).replace(second=0, microsecond=0)
    config = PolicyConfig(
        sync_period_s=1, drain_s=1, scale_down_window_s=30, default_lead_s=240, resume_s=1
    )
    made: list[LocalActuator] = []

    def actuator(control_plane) -> LocalActuator:
        made.append(
            LocalActuator(
                cp_url(control_plane),
                lambda: control_plane.sync.rules,
                tmp_path / "instances",
                keep_alive=0,
                api_token=control_plane.api_token.value,
            )
        )
        return made[-1]

    plane = Plane(etcd_server.endpoint, actuator=actuator, scaler_config=config)
    try:
        assert plane.apply_files({"rules.yaml": rules(fire)})[0] == 200

        def seen() -> GroupReplicas | None:
            return made[0].observe().get(("nav-pricing", "task"))

        def decided() -> list[dict]:
            return list_decisions(plane.store, "nav-pricing", "task")

        wait_until(lambda: seen() == GroupReplicas(ready=0, starting=0, parked=2), 60, "parked")

        def task_instances() -> list[dict]:
            _, listed = plane.request("GET", "/api/v1/instances")
            return [item for item in listed["items"] if item["group"] == "task"]

        wait_until(lambda: not task_instances(), 10, "the parked ones deregistered")
        assert datetime.now(UTC) < fire - timedelta(seconds=5), "parked too late to prove it"
        assert [d["replicas"] for d in decided()] == [0]

        up = wait_until(
            lambda: [d for d in decided() if d["replicas"] == 2], 150, "resumed for the fire"
        )[0]
        assert up["reason"].startswith("resume parked for task nightly"), up["reason"]
        assert fire.timestamp() - 4 <= up["at"] < fire.timestamp()
        wait_until(lambda: seen() == GroupReplicas(ready=2, starting=0, parked=0), 10, "ready")
        assert len(made[0].start_durations()[("nav-pricing", "task")]) == 2  # no start again
        [task_instance, *_] = wait_until(task_instances, 10, "registered again")
        served = wait_until(lambda: dyed_request(task_instance["egress_port"]), 10, "served")
        assert served == [("nav-pricing", "task")]
    finally:
        plane.stop()


def cp_url(control_plane) -> str:
    return f"http://127.0.0.1:{control_plane.http_port}"


def dyed_request(egress_port: int) -> list[tuple[str, str]] | None:
    """A dyed request through an instance's own egress; the hops that served it, None
    unless it was answered 200."""
    conn = http.client.HTTPConnection("127.0.0.1", egress_port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": "nav-pricing", "x-task-dye": "fund-yield"})
        response = conn.getresponse()
        text = response.read()
        if response.status != 200:
            return None
        body = json.loads(text)
    finally:
        conn.close()
    return [(hop["service"], hop["group"]) for hop in body.get("hops", [])]


def test_a_reported_extra_run_is_decided_at_once_not_a_period_later(etcd_server) -> None:
    """A run nobody announced (its cron fires hours away) is reported: the scaler decides
    for it within seconds, although its sync period is a minute."""
    fire = datetime.now(UTC) + timedelta(hours=6)
    config = PolicyConfig(sync_period_s=60)
    plane = Plane(etcd_server.endpoint, actuator=lambda cp: DryRunActuator(), scaler_config=config)
    try:
        assert plane.apply_files({"rules.yaml": rules(fire)})[0] == 200

        def decided() -> list[dict]:
            return list_decisions(plane.store, "nav-pricing", "task")

        assert plane.request("POST", "/api/v1/tasks/nightly/runs", {})[0] == 201
        reasons = wait_until(
            lambda: [d["reason"] for d in decided() if d["replicas"] == 2], 10, "up for the run"
        )
        assert reasons == [reasons[0]] and "open" in reasons[0], reasons
    finally:
        plane.stop()
