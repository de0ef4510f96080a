"""`tasklane simulate --from-history`: the runs and measured start-ups stored in a real etcd
become a workload file that loads like any other and is replayed; a run that never finished
is left out with a note."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.scaler.workload import load_workload
from controlplane.store.runs import finish_run, start_run
from controlplane.store.startups import record_startups
from tests.support.plane import Plane

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
RULES = """
apiVersion: tasklane.io/v1
kind: Service
metadata: {name: nav-pricing}
spec:
  groups: [{name: default}, {name: task, minReplicas: 0, maxReplicas: 4}]
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: pricing}
spec:
  dye: {values: [pricing]}
  hops: [{service: nav-pricing, group: task}]
---
apiVersion: tasklane.io/v1
kind: ScheduledTask
metadata: {name: hourly}
spec: {chain: pricing, schedule: "0 * * * *", timezone: UTC, expectedDuration: 20m,
       replicas: {nav-pricing: 2}}
---
apiVersion: tasklane.io/v1
kind: ScheduledTask
metadata: {name: nightly}
spec: {chain: pricing, schedule: "0 3 * * *", timezone: UTC, expectedDuration: 10m,
       replicas: {nav-pricing: 1}}
"""


def test_history_is_exported_as_a_workload_and_replayed(etcd_server, tmp_path: Path) -> None:
    plane = Plane(etcd_server.endpoint)
    try:
        assert plane.apply_files({"rules.yaml": RULES})[0] == 200
        store = plane.store
        hour = 3600 * (int(time.time()) // 3600)
        for n in range(1, 11):  # the last 10 fires; the 5th has no run (a gap)
            fire = hour - 3600 * n
            if n != 5:
                start_run(store, "hourly", f"f{n}", fire + 30)
                finish_run(store, "hourly", f"f{n}", fire + 30 + 600 + 30 * n)
        start_run(store, "hourly", "f0", min(hour + 30, time.time()))  # this hour's, open
        for n in (2, 7):  # two extra runs, half an hour after a fire
            start_run(store, "hourly", f"x{n}", hour - 3600 * n + 1800)
            finish_run(store, "hourly", f"x{n}", hour - 3600 * n + 2100)
        start_run(store, "nightly", "stuck", time.time() - 5 * 3600)  # never finished
        record_startups(store, {("nav-pricing", "task"): [20.0, 22.0, 25.0, 40.0]})

        out = tmp_path / "mine.yaml"
        done = subprocess.run(
            [sys.executable, "-m", "controlplane", "simulate", "--from-history"]
            + ["--workload", str(out), "--days", "1", "--policy", "tasklane"],
            env={"TASKLANE_SERVER": plane.url, "PATH": "/usr/bin:/bin"},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        plane.stop()
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: task nightly: run stuck open for 5.0h, over 10 x its expected duration: "
        "never finished"
    ]
    assert "tasklane" in done.stdout
    workload = load_workload(out)
    hourly = workload.tasks["hourly"]
    assert hourly.duration.median == 720  # of 9 runs of 630-900 s and 2 extra ones of 300 s
    assert hourly.duration.p95 == 900
    assert hourly.skip == pytest.approx(1 / 11, abs=0.001)  # 1 of 11 fires had no run
    assert hourly.extra_runs_per_day == 2.0
    assert workload.startup["nav-pricing", "task"].median == 22
    assert workload.startup["nav-pricing", "task"].p95 == pytest.approx(40, rel=1e-6)
    assert workload.tasks["nightly"].duration.median == 0.8 * 600  # no finished run: declared
