"""Reactive signals from a real app under load: its saturation gauge, exported through
prometheus_client, its process's CPU and memory from /proc, and on Kubernetes the requests in
flight its pods' real Envoy sidecars show, drive the policy, whose reason names the signal."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from controlplane.runtime.ports import free_port
from controlplane.scaler.actuators import DryRunActuator
from controlplane.scaler.actuators.kubernetes import KubernetesActuator
from controlplane.scaler.policy import Observation, Policy, PolicyConfig
from controlplane.scaler.profile import managed_groups
from controlplane.scaler.signals import ProcessSampler, read_gauge
from controlplane.store.decisions import list_decisions
from tests.support.held_app import held_app
from tests.support.kubeapi import NAMESPACE, FakeApiServer, pod_object
from tests.support.plane import Plane
from tests.support.profiles import at, rules, task
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
ACCOUNT = ("account-svc", "task")


def get(url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.read()


@pytest.fixture
def gauge_app() -> Iterator[tuple[subprocess.Popen, int]]:
    """The app with a pool of 4 workers, each request holding one for 2 s."""
    port = free_port()
    app = subprocess.Popen(
        [sys.executable, "-m", "tests.support.gauge_app", "--port", str(port)]
        + ["--workers", "4", "--hold", "2"],
        cwd=REPO,
    )
    try:
        yield app, port
    finally:
        app.terminate()
        app.wait(10)


def load(port: int, requests: int = 4) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=get, args=(f"http://127.0.0.1:{port}/work",), daemon=True)
        for _ in range(requests)
    ]
    for thread in threads:
        thread.start()
    return threads


def test_a_saturated_pool_and_a_busy_process_drive_the_decision(gauge_app) -> None:
    app, port = gauge_app
    metrics = f"http://127.0.0.1:{port}/metrics"
    sampler = ProcessSampler()
    try:
        idle = wait_until(lambda: read_gauge(metrics, "pool_busy_ratio") is not None, 10, "up")
        assert read_gauge(metrics, "pool_busy_ratio") == 0.0 and idle
        assert read_gauge(metrics, "no_such_gauge") is None
        sampler.sample(app.pid)
        threads = load(port)
        saturation = wait_until(
            lambda: (read_gauge(metrics, "pool_busy_ratio") or 0) >= 1.0 and 1.0, 5, "busy"
        )
        sampler.sample(app.pid)
        time.sleep(1)  # all four workers spin for 2 s
        cpu, resident = sampler.sample(app.pid)
        for thread in threads:
            thread.join()
    finally:
        app.terminate()
        app.wait(10)  # the fixture's wait returns at once
    assert cpu is not None and cpu > 0.1  # spinning workers: up to one core (the GIL), less
    # on a loaded machine; an idle process measures ~0
    assert resident is not None and resident > 5_000_000
    assert sampler.sample(app.pid) == (None, None)  # gone

    fire = at(2026, 6, 1, 18)
    seen = Observation(*ACCOUNT, ready=3, starting=0, in_flight=8.0, saturation=saturation)
    decisions = Policy().decide(fire + 60, rules(task("nightly")), [], {ACCOUNT: seen}, {})
    account = [d for d in decisions if (d.service, d.group) == ACCOUNT]
    assert [(d.replicas, d.reason) for d in account] == [
        (4, "metric: saturation 1.00 > target 0.8")
    ]


def ledger_rules(declared: str) -> str:
    """ledger-svc's batch group (0-4 instances) in a chain whose task fires this minute and
    wants 2 of them; `declared` is what the Service says of its signals."""
    now = datetime.now(UTC)
    return f"""
apiVersion: tasklane.io/v1
kind: Service
metadata: {{name: ledger-svc}}
spec:
  groups: [{{name: default}}, {{name: batch, minReplicas: 0, maxReplicas: 4}}]
  {declared}
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {{name: close}}
spec:
  dye: {{values: [close]}}
  hops: [{{service: ledger-svc, group: batch}}]
---
apiVersion: tasklane.io/v1
kind: ScheduledTask
metadata: {{name: close}}
spec:
  chain: close
  schedule: "{now.minute} {now.hour} * * *"
  timezone: UTC
  expectedDuration: 30m
  replicas: {{ledger-svc: 2}}
"""


@pytest.mark.parametrize(
    ("declared", "signal"),
    [
        ("saturationGauge: pool_busy_ratio", "metric: saturation 1.00 > target 0.8"),
        ("requests: {cpu: 0.5, memory: 1Gi}", "metric: cpu "),
    ],
    ids=["saturation", "cpu"],
)
def test_the_live_scaler_reads_what_the_service_declares(
    etcd_server, gauge_app, declared: str, signal: str
) -> None:
    """A Service naming `pool_busy_ratio` as its saturation gauge, or declaring its CPU and
    memory requests: once its registered instance's pool is full (its workers spinning,
    about one core), the live scaler adds instances and its reason names the signal."""
    app, port = gauge_app
    rules_yaml = ledger_rules(declared)
    plane = Plane(
        etcd_server.endpoint,
        actuator=lambda cp: DryRunActuator(),
        scaler_config=PolicyConfig(sync_period_s=1),
    )
    try:
        assert plane.apply_files({"rules.yaml": rules_yaml})[0] == 200
        instance = {
            "id": "ledger-1", "service": "ledger-svc", "group": "batch", "host": "127.0.0.1",
            "inbound_port": free_port(), "app_port": port, "admin_port": free_port(),
            "egress_port": free_port(), "pid": app.pid, "started_at": time.time(),
        }  # fmt: skip
        assert plane.request("POST", "/api/v1/instances", instance)[0] == 200

        def reasons() -> list[tuple[int, str]]:
            return [
                (d["replicas"], d["reason"])
                for d in list_decisions(plane.store, "ledger-svc", "batch")
            ]

        wait_until(lambda: (2, "task close fired") in [(r, t[:16]) for r, t in reasons()], 10, "2")
        threads = load(port, 8)
        up = wait_until(lambda: [d for d in reasons() if signal in d[1]], 10, "up")
        for thread in threads:
            thread.join()
    finally:
        plane.stop()
    assert up[0][0] > 2, up  # e.g. "bound: max 4 (metric: cpu 2.00 > target 0.7)"


@pytest.mark.parametrize(
    ("declared", "signal"),
    [
        ("saturationGauge: pool_busy_ratio", "metric: saturation 1.00 > target 0.8"),
        ("requests: {cpu: 0.5, memory: 1Gi}", "metric: cpu 1.90 > target 0.7"),
    ],
    ids=["saturation", "cpu"],
)
def test_the_live_scaler_reads_the_pods_on_kubernetes(
    etcd_server, gauge_app, declared: str, signal: str
) -> None:
    """The Kubernetes actuator against an API server answering in the real schemas: the two
    ready pods of ledger-svc-batch (found by its Deployment's selector) use 0.95 of a core
    each by the Metrics API, and serve the real gauge app at their pod IP's annotated
    `prometheus.io/port`. From the PodMetrics, or once the pool is full, the live scaler adds
    pods and its reason, stored in etcd, names the signal."""
    _, port = gauge_app
    labels = {"tasklane.io/service": "ledger-svc", "tasklane.io/group": "batch"}
    with FakeApiServer() as api:
        api.deployments["ledger-svc-batch"] = [2, 2, 2]
        api.selectors["ledger-svc-batch"] = labels
        api.pods = [
            pod_object(
                f"ledger-svc-batch-6b8c-{n}",
                labels,
                "127.0.0.1",  # the "pod IP": traffic stays on this host
                annotations={"prometheus.io/port": str(port)},
            )
            for n in (1, 2)
        ]
        api.usage = {pod["metadata"]["name"]: {"app": {"cpu": "950m"}} for pod in api.pods}
        plane = Plane(
            etcd_server.endpoint,
            actuator=lambda cp: KubernetesActuator(
                NAMESPACE, api_client=api.client(), groups=lambda: managed_groups(cp.sync.rules)
            ),
            scaler_config=PolicyConfig(sync_period_s=1),
        )
        try:
            assert plane.apply_files({"rules.yaml": ledger_rules(declared)})[0] == 200
            metrics = f"http://127.0.0.1:{port}/metrics"
            wait_until(lambda: read_gauge(metrics, "pool_busy_ratio") is not None, 10, "app up")
            threads = load(port, 8)
            up = wait_until(
                lambda: [
                    (d["replicas"], d["reason"])
                    for d in list_decisions(plane.store, "ledger-svc", "batch")
                    if signal in d["reason"]
                ],
                10,
                "up",
            )
            for thread in threads:
                thread.join()
        finally:
            plane.stop()
    assert up[0][0] > 2, up


def test_the_live_scaler_reads_requests_in_flight_from_the_pods_on_kubernetes(
    etcd_server, tmp_path: Path
) -> None:
    """Three ready pods of ledger-svc-batch (a Service that declares no signal). Two have,
    at their pod IP (127.0.0.1 here), the ready port of a real Envoy sidecar with the injected
    pod's ready listener (templates/pod.yaml) in front of an app holding four dyed requests;
    the third's ready port answers nothing. The live scaler reads 4 in flight per pod it can
    read (the third is left out, not read as 0: that would be 2.7) and adds pods, and its
    reason, stored in etcd, names the signal."""
    release = threading.Event()
    app_port, stop_app = held_app(release, hold=30)("ledger", ("127.0.0.1", 0))
    labels = {"tasklane.io/service": "ledger-svc", "tasklane.io/group": "batch"}
    ready_port, inbound_port = free_port(), free_port()
    with FakeApiServer() as api:
        api.deployments["ledger-svc-batch"] = [3, 3, 3]
        api.selectors["ledger-svc-batch"] = labels
        api.pods = [
            pod_object(f"ledger-svc-batch-6b8c-{n}", labels, "127.0.0.1", ready_port=port)
            for n, port in ((1, ready_port), (2, ready_port), (3, free_port()))
        ]
        plane = Plane(
            etcd_server.endpoint,
            actuator=lambda cp: KubernetesActuator(
                NAMESPACE, api_client=api.client(), groups=lambda: managed_groups(cp.sync.rules)
            ),
            scaler_config=PolicyConfig(sync_period_s=1, target_in_flight=2),
        )
        sidecar = plane.sidecar(
            tmp_path / "envoy",
            "ledger-svc|batch",
            app_port=app_port,
            inbound_port=inbound_port,
            ready_port=ready_port,
        )
        callers: list[threading.Thread] = []
        try:
            assert plane.apply_files({"rules.yaml": ledger_rules("")})[0] == 200
            sidecar.start()
            sidecar.wait_ready()

            def call() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", inbound_port, timeout=40)
                conn.request("GET", "/", headers={"Host": "ledger-svc", "x-task-dye": "close"})
                conn.getresponse().read()
                conn.close()

            callers = [threading.Thread(target=call, daemon=True) for _ in range(4)]
            for caller in callers:
                caller.start()
            up = wait_until(
                lambda: [
                    (d["replicas"], d["reason"])
                    for d in list_decisions(plane.store, "ledger-svc", "batch")
                    if "metric: in-flight" in d["reason"]
                ],
                15,
                "up",
            )
        finally:
            release.set()
            for caller in callers:
                caller.join(10)
            sidecar.stop()
            plane.stop()
            stop_app()
    assert up[0] == (4, "bound: max 4 (metric: in-flight 4.0 > target 2)"), up
