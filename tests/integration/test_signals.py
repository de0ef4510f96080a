"""Reactive signals from a real app under load: its saturation gauge, exported through
prometheus_client, and its process's CPU and memory from /proc drive the policy, whose
reason names the signal."""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from controlplane.runtime.ports import free_port
from controlplane.scaler.policy import Observation, Policy
from controlplane.scaler.signals import ProcessSampler, read_gauge
from tests.support.profiles import at, rules, task
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
ACCOUNT = ("account-svc", "task")


def get(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.read()


def test_a_saturated_pool_and_a_busy_process_drive_the_decision() -> None:
    port = free_port()
    app = subprocess.Popen(
        [sys.executable, "-m", "tests.support.gauge_app", "--port", str(port)]
        + ["--workers", "4", "--hold", "2"],
        cwd=REPO,
    )
    metrics = f"http://127.0.0.1:{port}/metrics"
    sampler = ProcessSampler()
    try:
        idle = wait_until(lambda: read_gauge(metrics, "pool_busy_ratio") is not None, 10, "up")
        assert read_gauge(metrics, "pool_busy_ratio") == 0.0 and idle
        assert read_gauge(metrics, "no_such_gauge") is None
        sampler.sample(app.pid)
        load = [
            threading.Thread(target=get, args=(f"http://127.0.0.1:{port}/work",)) for _ in range(4)
        ]
        for thread in load:
            thread.start()
        saturation = wait_until(
            lambda: (read_gauge(metrics, "pool_busy_ratio") or 0) >= 1.0 and 1.0, 5, "busy"
        )
        cpu, resident = sampler.sample(app.pid)
        for thread in load:
            thread.join()
    finally:
        app.terminate()
        app.wait(10)
    assert cpu is not None and cpu > 0.3  # spinning workers (the GIL: about one core)
    assert resident is not None and resident > 5_000_000
    assert sampler.sample(app.pid) == (None, None)  # gone

    fire = at(2026, 6, 1, 18)
    seen = Observation(*ACCOUNT, ready=3, starting=0, in_flight=8.0, saturation=saturation)
    decisions = Policy().decide(fire + 60, rules(task("nightly")), [], {ACCOUNT: seen}, {})
    account = [d for d in decisions if (d.service, d.group) == ACCOUNT]
    assert [(d.replicas, d.reason) for d in account] == [
        (4, "metric: saturation 1.00 > target 0.8")
    ]
