"""The Kubernetes actuator's reactive signals on the wire: a real `kubernetes.client.ApiClient`
against a tiny API server answering in the real schemas (Deployment, PodList, the Metrics
API's PodMetricsList). Which pods are read, what is asked of the API, how usage becomes a
share of the requests, and the decision the real Policy takes on it, reason included."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from urllib.parse import quote

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient, V1LabelSelector, V1LabelSelectorRequirement

from controlplane.model.rules import Group, Requests, Service
from controlplane.scaler.actuators.kubernetes import KubernetesActuator
from controlplane.scaler.podsignals import label_selector, metrics_url
from controlplane.scaler.policy import Observation, Policy
from controlplane.scaler.signals import Reading, group_means
from tests.support.kubeapi import (
    DEPLOYMENTS,
    NAMESPACE,
    POD_METRICS,
    PODS,
    FakeApiServer,
    deployment_object,
    pod_object,
)
from tests.support.profiles import at, rules, task

ACCOUNT = ("account-svc", "task")
LABELS = {"tasklane.io/service": "account-svc", "tasklane.io/group": "task"}
SELECTOR = "tasklane.io/group=task,tasklane.io/service=account-svc"
GIB = 1024**3


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        server.deployments["account-svc-task"] = [3, 3, 3]
        server.selectors["account-svc-task"] = LABELS
        yield server


def services(requests: Requests | None = None, gauge: str | None = None) -> dict[str, Service]:
    return {
        "account-svc": Service(
            "account-svc",
            "http",
            (Group("default", 1, 4), Group("task", 0, 6)),
            saturation_gauge=gauge,
            requests=requests,
        )
    }


def read(api: FakeApiServer, declared: dict[str, Service]) -> dict:
    actuator = KubernetesActuator(NAMESPACE, api_client=api.client(), groups=lambda: [ACCOUNT])
    try:
        actuator.observe()
        return group_means(actuator.readings({ACCOUNT}, declared))
    finally:
        actuator.close()


def test_the_fake_objects_pass_the_kubernetes_schemas() -> None:
    """The Pods and Deployment the tests serve are what a cluster serves (strict: no
    unknown or misspelt field). PodMetrics has no schema there: its shape follows
    k8s.io/metrics' types (tests/support/kubeapi.py)."""
    pods = [
        pod_object(
            "account-svc-task-7d9f-a",
            LABELS,
            "10.1.0.5",
            requests={"app": {"cpu": "1"}, "worker": {"memory": "1Gi"}},
            annotations={"prometheus.io/port": "9102"},
            ports={"http": 8080, "metrics": 9100},
        ),
        pod_object("account-svc-task-7d9f-b", LABELS, "10.1.0.6", ready=False, terminating=True),
    ]
    pod_list = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods}
    for obj in (*pods, pod_list, deployment_object("account-svc-task", 3, 3, 3, LABELS)):
        kubernetes_validate.validate(obj, "1.29.0", strict=True)


def test_cpu_and_memory_of_the_ready_pods_drive_the_decision(api: FakeApiServer) -> None:
    """Three ready pods at 0.95 of a core each (their sidecar's use left out); a starting, a
    terminating and another group's pod are not read."""
    api.pods = [
        pod_object(f"account-svc-task-7d9f-{n}", LABELS, f"10.1.0.{n}") for n in range(1, 4)
    ] + [
        pod_object("account-svc-task-7d9f-4", LABELS, "10.1.0.4", ready=False),
        pod_object("account-svc-task-7d9f-5", LABELS, "10.1.0.5", terminating=True),
        pod_object(
            "account-svc-default-5c4b-1", {**LABELS, "tasklane.io/group": "default"}, "10.1.0.9"
        ),
    ]
    api.usage = {
        pod["metadata"]["name"]: {
            "app": {"cpu": "950000000n", "memory": f"{GIB // 2 // 1024}Ki"},
            "envoy": {"cpu": "900m", "memory": "700Mi"},
        }
        for pod in api.pods
    }
    api.usage["account-svc-task-7d9f-4"]["app"]["cpu"] = "4"  # starting up: not its load
    api.usage["account-svc-task-7d9f-5"]["app"]["cpu"] = "4"
    api.usage["account-svc-default-5c4b-1"]["app"]["cpu"] = "4"

    means = read(api, services(Requests(cpu=1.0, memory=GIB)))
    assert means == {ACCOUNT: Reading(cpu=pytest.approx(0.95), memory=pytest.approx(0.5))}
    assert [(r.method, r.path) for r in api.requests] == [
        ("GET", f"{DEPLOYMENTS}account-svc-task"),
        ("GET", f"{PODS}?labelSelector={quote(SELECTOR)}"),
        ("GET", f"{POD_METRICS}?labelSelector={quote(SELECTOR)}"),
    ]

    fire = at(2026, 6, 1, 18)
    seen = Observation(*ACCOUNT, ready=3, starting=0, cpu=means[ACCOUNT].cpu)
    decisions = Policy().decide(fire + 60, rules(task("nightly")), [], {ACCOUNT: seen}, {})
    assert [(d.replicas, d.reason) for d in decisions if (d.service, d.group) == ACCOUNT] == [
        (5, "metric: cpu 0.95 > target 0.7")
    ]


def test_the_pods_requests_serve_when_the_service_declares_none(api: FakeApiServer) -> None:
    """Two app containers: their usage and requests add up (the HPA's utilization); a
    resource one of them does not request is not known."""
    api.pods = [
        pod_object(
            "account-svc-task-7d9f-1",
            LABELS,
            "10.1.0.1",
            requests={"app": {"cpu": "500m", "memory": "256Mi"}, "worker": {"cpu": "250m"}},
        )
    ]
    api.usage = {
        "account-svc-task-7d9f-1": {
            "app": {"cpu": "300m", "memory": "200Mi"},
            "worker": {"cpu": "150m", "memory": "100Mi"},
        }
    }
    assert read(api, services()) == {ACCOUNT: Reading(cpu=pytest.approx(0.6))}
    # Declared requests win over the pods' own: one meaning on every actuator.
    declared = read(api, services(Requests(cpu=0.5, memory=GIB)))
    assert declared == {ACCOUNT: Reading(cpu=pytest.approx(0.9), memory=pytest.approx(300 / 1024))}


def test_no_metrics_server_leaves_cpu_unknown_with_one_warning(
    api: FakeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    api.pods = [pod_object("account-svc-task-7d9f-1", LABELS, "10.1.0.1")]
    actuator = KubernetesActuator(NAMESPACE, api_client=api.client(), groups=lambda: [ACCOUNT])
    caplog.set_level(logging.WARNING, "tasklane.actuator.kubernetes")
    try:
        actuator.observe()
        # No requests anywhere: nothing to share CPU by, the Metrics API is not asked.
        assert actuator.readings({ACCOUNT}, services()) == []
        assert not [r for r in api.requests if r.path.startswith(POD_METRICS)]
        for _ in range(2):
            assert actuator.observe()[ACCOUNT].ready == 3  # scaling goes on
            assert actuator.readings({ACCOUNT}, services(Requests(cpu=1.0, memory=GIB))) == []
    finally:
        actuator.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot read the Metrics API's pods {SELECTOR!r} in batch: 404 the server could not "
        "find the requested resource: those signals are not known"
    ]
    assert len([r for r in api.requests if r.path.startswith(POD_METRICS)]) == 2


def test_no_reading_for_a_group_never_observed_or_a_service_without_a_rule(
    api: FakeApiServer,
) -> None:
    api.pods = [pod_object("account-svc-task-7d9f-1", LABELS, "10.1.0.1")]
    api.usage = {"account-svc-task-7d9f-1": {"app": {"cpu": "1", "memory": "1Gi"}}}
    actuator = KubernetesActuator(NAMESPACE, api_client=api.client(), groups=lambda: [ACCOUNT])
    try:
        declared = services(Requests(cpu=1.0, memory=GIB))
        assert actuator.readings({ACCOUNT}, declared) == []  # no Deployment read yet
        actuator.observe()
        assert actuator.readings({ACCOUNT}, {}) == []
        assert actuator.readings({ACCOUNT}, declared) == [(ACCOUNT, Reading(cpu=1.0, memory=1.0))]
    finally:
        actuator.close()


def test_label_selector_as_the_api_takes_it() -> None:
    assert label_selector(None) is None
    selector = V1LabelSelector(
        match_labels={"tasklane.io/service": "account-svc", "app": "ledger"},
        match_expressions=[
            V1LabelSelectorRequirement(key="tier", operator="In", values=["batch", "api"]),
            V1LabelSelectorRequirement(key="canary", operator="DoesNotExist"),
            V1LabelSelectorRequirement(key="zone", operator="NotIn", values=["b"]),
            V1LabelSelectorRequirement(key="team", operator="Exists"),
        ],
    )
    assert label_selector(selector) == (
        "app=ledger,tasklane.io/service=account-svc,tier in (api,batch),!canary,zone notin (b),team"
    )


@pytest.mark.parametrize(
    ("annotations", "ports", "url"),
    [
        ({"prometheus.io/port": "9102"}, None, "http://10.1.0.1:9102/metrics"),
        (
            {"prometheus.io/port": "9102", "prometheus.io/path": "stats/prometheus"},
            None,
            "http://10.1.0.1:9102/stats/prometheus",
        ),
        (None, {"http": 8080, "metrics": 9100}, "http://10.1.0.1:9100/metrics"),
        # The app port is redirected into the sidecar, which refuses undyed requests to a
        # task group: not a place to read a gauge from.
        (None, {"http": 8080}, None),
    ],
    ids=["annotation", "annotated-path", "named-port", "app-port-only"],
)
def test_where_a_pods_gauge_is_read(
    annotations: dict | None, ports: dict | None, url: str | None
) -> None:
    pod = pod_object("p-1", LABELS, "10.1.0.1", annotations=annotations, ports=ports)
    model = ApiClient().deserialize(json.dumps(pod), "V1Pod", "application/json")  # as listed
    assert metrics_url(model) == url
