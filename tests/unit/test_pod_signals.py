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

from controlplane.inject.pod import READY_PORT, InjectOptions, inject_pod
from controlplane.model.rules import Group, Requests, Service
from controlplane.scaler.actuators.kubernetes import KubernetesActuator
from controlplane.scaler.podsignals import (
    active_requests_at,
    metrics_url,
    pods_of,
    selects,
    shared_selector,
)
from controlplane.scaler.policy import Observation, Policy
from controlplane.scaler.signals import Reading, group_means
from controlplane.xds.names import ACTIVE_REQUESTS_PATH
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
            ready_port=15021,
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
    """One warning for a failing call, whatever the number of groups and periods; after the
    call answers again, a new failure warns again."""
    api.deployments["account-svc-default"] = [2, 2, 2]
    api.selectors["account-svc-default"] = {**LABELS, "tasklane.io/group": "default"}
    api.pods = [pod_object("account-svc-task-7d9f-1", LABELS, "10.1.0.1")]
    both = [ACCOUNT, ("account-svc", "default")]
    actuator = KubernetesActuator(NAMESPACE, api_client=api.client(), groups=lambda: both)
    caplog.set_level(logging.WARNING, "tasklane.actuator.kubernetes")
    declared = services(Requests(cpu=1.0, memory=GIB))
    missing = (
        "cannot read the Metrics API's pods in batch: 404 the server could not find the "
        "requested resource: those signals are not known"
    )
    try:
        actuator.observe()
        # No requests anywhere: nothing to share CPU by, the Metrics API is not asked.
        assert actuator.readings(set(both), services()) == []
        assert not [r for r in api.requests if r.path.startswith(POD_METRICS)]
        for _ in range(2):
            assert actuator.observe()[ACCOUNT].ready == 3  # scaling goes on
            assert actuator.readings(set(both), declared) == []
        assert [r.getMessage() for r in caplog.records] == [missing]
        assert len([r for r in api.requests if r.path.startswith(POD_METRICS)]) == 2

        api.usage = {"account-svc-task-7d9f-1": {"app": {"cpu": "500m", "memory": "1Gi"}}}
        assert actuator.readings(set(both), declared) == [(ACCOUNT, Reading(cpu=0.5, memory=1))]
        api.usage = None  # metrics-server gone again: worth a new warning
        for _ in range(2):
            assert actuator.readings(set(both), declared) == []
    finally:
        actuator.close()
    assert [r.getMessage() for r in caplog.records] == [missing, missing]


def test_one_list_of_pods_and_of_pod_metrics_for_all_groups(api: FakeApiServer) -> None:
    """Six groups of three services: two requests per readings(), by what their selectors
    share, and each group's pods picked here by its own Deployment's selector."""
    keys = [(f"{name}-svc", group) for name in ("account", "ledger", "fund") for group in "ab"]
    api.deployments.clear()
    api.pods, api.usage = [], {}
    for n, (service, group) in enumerate(keys, start=1):
        labels = {"tasklane.io/service": service, "tasklane.io/group": group}
        api.deployments[f"{service}-{group}"] = [1, 1, 1]
        api.selectors[f"{service}-{group}"] = labels
        api.pods.append(pod_object(f"{service}-{group}-7d9f-1", labels, f"10.1.0.{n}"))
        api.usage[f"{service}-{group}-7d9f-1"] = {"app": {"cpu": f"{n}00m", "memory": "1Gi"}}
    api.pods.append(pod_object("other-7d9f-1", {"app": "other"}, "10.1.0.99"))
    declared = {
        service: Service(
            service, "http", (Group("a", 0, 4), Group("b", 0, 4)), requests=Requests(1.0, GIB)
        )
        for service, _ in keys
    }
    actuator = KubernetesActuator(NAMESPACE, api_client=api.client(), groups=lambda: keys)
    try:
        actuator.observe()
        api.requests.clear()
        means = group_means(actuator.readings(set(keys), declared))
    finally:
        actuator.close()
    assert means == {
        key: Reading(cpu=pytest.approx(n / 10), memory=pytest.approx(1.0))
        for n, key in enumerate(keys, start=1)
    }
    shared = "tasklane.io/group in (a,b),tasklane.io/service in (account-svc,fund-svc,ledger-svc)"
    assert [(r.method, r.path) for r in api.requests] == [
        ("GET", f"{PODS}?labelSelector={quote(shared)}"),
        ("GET", f"{POD_METRICS}?labelSelector={quote(shared)}"),
    ]


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


def requirement(key: str, operator: str, *values: str) -> V1LabelSelectorRequirement:
    return V1LabelSelectorRequirement(key=key, operator=operator, values=list(values) or None)


TIER_IN = requirement("tier", "In", "api", "batch")
TIER_NOT_IN = requirement("tier", "NotIn", "batch")


@pytest.mark.parametrize(
    ("selector", "labels", "picked"),
    [
        # https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/ and the
        # LabelSelector reference: matchLabels and matchExpressions are ANDed; an empty
        # selector matches all objects, a null one none.
        (V1LabelSelector(match_labels={"app": "a"}), {"app": "a", "x": "y"}, True),
        (V1LabelSelector(match_labels={"app": "a"}), {"app": "b"}, False),
        (V1LabelSelector(match_labels={"app": "a"}), {}, False),
        (V1LabelSelector(match_expressions=[TIER_IN]), {"tier": "batch"}, True),
        (V1LabelSelector(match_expressions=[TIER_IN]), {"tier": "web"}, False),
        (V1LabelSelector(match_expressions=[TIER_IN]), {}, False),  # In: the key must exist
        (V1LabelSelector(match_expressions=[TIER_NOT_IN]), {"tier": "api"}, True),
        (V1LabelSelector(match_expressions=[TIER_NOT_IN]), {"tier": "batch"}, False),
        (V1LabelSelector(match_expressions=[TIER_NOT_IN]), {"app": "a"}, True),  # no key: in
        (
            V1LabelSelector(match_expressions=[requirement("canary", "Exists")]),
            {"canary": ""},
            True,
        ),
        (V1LabelSelector(match_expressions=[requirement("canary", "Exists")]), {}, False),
        (
            V1LabelSelector(match_expressions=[requirement("canary", "DoesNotExist")]),
            {"canary": "1"},
            False,
        ),
        (V1LabelSelector(match_expressions=[requirement("canary", "DoesNotExist")]), {}, True),
        (
            V1LabelSelector(match_labels={"app": "a"}, match_expressions=[TIER_IN]),
            {"app": "a", "tier": "web"},
            False,  # ANDed: matchLabels alone would pick it
        ),
        (
            V1LabelSelector(match_labels={"app": "a"}, match_expressions=[TIER_IN]),
            {"app": "a", "tier": "api"},
            True,
        ),
        (V1LabelSelector(), {"app": "a"}, True),
        (None, {"app": "a"}, False),
    ],
)
def test_which_pods_a_deployments_selector_picks(
    selector: V1LabelSelector | None, labels: dict[str, str], picked: bool
) -> None:
    assert selects(selector, labels) is picked


def test_each_groups_pods_out_of_one_list() -> None:
    """By each selector whole (not only the matchLabels pair the index tried), in the list's
    order; a selector with expressions alone tries every pod."""
    client = ApiClient()
    labels = [
        {"tasklane.io/service": "a", "tasklane.io/group": "x", "tier": "api"},
        {"tasklane.io/service": "a", "tasklane.io/group": "y"},
        {"tasklane.io/service": "b", "tasklane.io/group": "x", "tier": "batch"},
        {"tasklane.io/service": "a", "tasklane.io/group": "x", "tier": "batch"},
    ]
    pods = [
        client.deserialize(json.dumps(pod_object(f"p-{n}", pod, "10.1.0.1")), "V1Pod", None)
        for n, pod in enumerate(labels)
    ]
    selectors = {
        ("a", "x"): V1LabelSelector(
            match_labels={"tasklane.io/service": "a", "tasklane.io/group": "x"}
        ),
        ("a", "x-batch"): V1LabelSelector(
            match_labels={"tasklane.io/service": "a"},
            match_expressions=[requirement("tier", "In", "batch")],
        ),
        ("any", "tiered"): V1LabelSelector(match_expressions=[requirement("tier", "Exists")]),
        ("c", "x"): V1LabelSelector(match_labels={"tasklane.io/service": "c"}),
    }
    found = pods_of(selectors, pods)
    assert {key: [pod.metadata.name for pod in got] for key, got in found.items()} == {
        ("a", "x"): ["p-0", "p-3"],
        ("a", "x-batch"): ["p-3"],
        ("any", "tiered"): ["p-0", "p-2", "p-3"],
        ("c", "x"): [],
    }


def test_the_selector_all_groups_share() -> None:
    """Each selector picks a subset of what the shared one lists; nothing shared: all."""
    account = V1LabelSelector(match_labels={"tasklane.io/service": "account-svc", "app": "x"})
    assert shared_selector([account]) == "app=x,tasklane.io/service=account-svc"
    ledger = V1LabelSelector(
        match_labels={"tasklane.io/service": "ledger-svc"},
        match_expressions=[TIER_IN, TIER_NOT_IN, requirement("canary", "DoesNotExist")],
    )
    assert shared_selector([account, ledger]) == "tasklane.io/service in (account-svc,ledger-svc)"
    assert shared_selector([ledger]) == (
        "tasklane.io/service=ledger-svc,tier in (api,batch)"  # NotIn and DoesNotExist: left out
    )
    anyone = V1LabelSelector(
        match_expressions=[requirement("tasklane.io/service", "Exists"), TIER_IN]
    )
    assert shared_selector([account, anyone]) == "tasklane.io/service"
    assert shared_selector([account, V1LabelSelector(match_labels={"app": "y"})]) == (
        "app in (x,y)"
    )
    assert shared_selector([account, V1LabelSelector(match_labels={"team": "z"})]) == ""
    assert shared_selector([]) == ""


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


@pytest.mark.parametrize(
    ("ip", "ready_port", "url"),
    [
        (
            "10.1.0.1",
            15021,
            "http://10.1.0.1:15021/stats/prometheus"
            "?filter=%5Ehttp%5C.inbound%5C.downstream_rq_active%24",
        ),
        (
            "fd00::1",
            15021,
            "http://[fd00::1]:15021/stats/prometheus"
            "?filter=%5Ehttp%5C.inbound%5C.downstream_rq_active%24",
        ),
        ("10.1.0.1", None, None),  # no sidecar's ready port: not injected, nothing to read
    ],
    ids=["injected", "ipv6", "not-injected"],
)
def test_where_a_pods_requests_in_flight_are_read(
    ip: str, ready_port: int | None, url: str | None
) -> None:
    """At the pod IP, the port the injected sidecar declares as `tasklane-ready`, the one
    admin URL its ready listener passes on."""
    pod = pod_object("p-1", LABELS, ip, ready_port=ready_port)
    model = ApiClient().deserialize(json.dumps(pod), "V1Pod", "application/json")  # as listed
    assert active_requests_at(model) == url


def test_an_injected_pods_requests_in_flight_are_read_at_its_sidecars_ready_port() -> None:
    """The pod the injector makes, as the API server lists it once it has an IP."""
    template = inject_pod(
        {
            "metadata": {"labels": LABELS},
            "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
        },
        InjectOptions(),
    )
    pod = {"apiVersion": "v1", "kind": "Pod", **template, "status": {"podIP": "10.1.0.1"}}
    model = ApiClient().deserialize(json.dumps(pod), "V1Pod", "application/json")
    assert active_requests_at(model) == f"http://10.1.0.1:{READY_PORT}{ACTIVE_REQUESTS_PATH}"
