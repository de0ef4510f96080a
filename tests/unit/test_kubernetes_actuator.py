"""The Kubernetes actuator on the wire: a real `kubernetes.client.ApiClient` talks to a tiny
local API server that records every request and answers as the API server does (Scale and
Deployment objects, Status errors). What matters is exactly what a real cluster would
receive: method, path, query, content type, auth and body."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from kubernetes import client

from controlplane.runtime.ports import free_port
from controlplane.scaler.actuators import ActuatorError, GroupReplicas
from controlplane.scaler.actuators.kubernetes import KubernetesActuator
from tests.support.kubeapi import DEPLOYMENTS, NAMESPACE, TOKEN, FakeApiServer


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def actuator_for(api: FakeApiServer, **kwargs) -> KubernetesActuator:
    return KubernetesActuator(NAMESPACE, api_client=api.client(), **kwargs)


def test_scale_patches_the_scale_subresource_with_a_merge_patch(api: FakeApiServer) -> None:
    api.deployments["fund-facade-task"] = [0, 0, 0]
    actuator = actuator_for(api)
    try:
        actuator.scale("fund-facade", "task", 4, "pre-warm for nightly-fund-yield")
        actuator.scale("fund-facade", "task", 4, "pre-warm for nightly-fund-yield")
    finally:
        actuator.close()
    assert len(api.requests) == 2
    first, again = api.requests
    assert first.method == "PATCH"
    assert first.path == f"{DEPLOYMENTS}fund-facade-task/scale?fieldManager=tasklane"
    # RFC 7386 merge patch: the only object patch type that every scale subresource (custom
    # resources too) accepts; the client alone would send strategic merge for a dict body.
    assert first.headers["content-type"] == "application/merge-patch+json"
    assert first.headers["accept"] == "application/json"
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(first.body) == {"spec": {"replicas": 4}}
    assert first.body == b'{"spec": {"replicas": 4}}'
    # Idempotent: the same decision sends the same patch, which changes nothing twice.
    assert (again.method, again.path, again.body) == (first.method, first.path, first.body)
    assert api.deployments["fund-facade-task"][0] == 4


def test_name_template_and_observe(api: FakeApiServer) -> None:
    api.deployments["tl-account-svc-task"] = [3, 3, 1]
    api.deployments["tl-nav-pricing-task"] = [0, 0, 0]
    actuator = actuator_for(api, name_template="tl-{service}-{group}")
    assert actuator.observe() == {}  # nothing scaled yet and no groups given: nothing read
    actuator.scale("account-svc", "task", 3, "metric")
    actuator.scale("nav-pricing", "task", 0, "run finished")
    api.requests.clear()
    assert actuator.observe() == {
        ("account-svc", "task"): GroupReplicas(ready=1, starting=2),
        ("nav-pricing", "task"): GroupReplicas(ready=0, starting=0),
    }
    assert [(r.method, r.path, r.body) for r in api.requests] == [
        ("GET", f"{DEPLOYMENTS}tl-account-svc-task", b""),
        ("GET", f"{DEPLOYMENTS}tl-nav-pricing-task", b""),
    ]


def test_observe_reads_the_given_groups_and_skips_missing_deployments(
    api: FakeApiServer,
) -> None:
    api.deployments["fund-facade-task"] = [2, 2, 2]
    actuator = actuator_for(api, groups=lambda: [("fund-facade", "task"), ("fund-facade", "gone")])
    assert actuator.observe() == {("fund-facade", "task"): GroupReplicas(ready=2, starting=0)}
    assert {r.path for r in api.requests} == {
        f"{DEPLOYMENTS}fund-facade-task",
        f"{DEPLOYMENTS}fund-facade-gone",
    }


def test_start_durations_are_measured_from_scale_up_to_ready(api: FakeApiServer) -> None:
    clock = Clock()
    api.deployments["fund-facade-task"] = [0, 0, 0]
    actuator = actuator_for(api, clock=clock)
    assert actuator.start_durations() == {}
    actuator.scale("fund-facade", "task", 2, "pre-warm")
    clock.now += 5
    api.deployments["fund-facade-task"] = [2, 2, 1]
    actuator.observe()
    assert actuator.start_durations() == {}  # one of two ready: not yet
    clock.now += 7.5
    api.deployments["fund-facade-task"] = [2, 2, 2]
    actuator.observe()
    assert actuator.start_durations() == {("fund-facade", "task"): [12.5]}
    # Down and up again before ready: the abandoned start is not a measurement.
    actuator.scale("fund-facade", "task", 0, "run finished")
    api.deployments["fund-facade-task"] = [0, 0, 0]
    actuator.scale("fund-facade", "task", 1, "pre-warm")
    actuator.scale("fund-facade", "task", 0, "run finished")
    actuator.observe()
    assert actuator.start_durations() == {("fund-facade", "task"): [12.5]}


def test_refusals_are_one_line_errors(api: FakeApiServer) -> None:
    api.forbidden.add("fund-facade-task")
    actuator = actuator_for(api)
    with pytest.raises(ActuatorError) as missing:
        actuator.scale("nope", "task", 1, "pre-warm")
    assert str(missing.value) == (
        'cannot scale deployment batch/nope-task to 1: 404 deployments.apps "nope-task" not found'
    )
    with pytest.raises(ActuatorError) as forbidden:
        actuator.scale("fund-facade", "task", 1, "pre-warm")
    message = str(forbidden.value)
    assert message.startswith("cannot scale deployment batch/fund-facade-task to 1: 403 ")
    assert 'cannot patch resource "deployments/scale"' in message and "\n" not in message
    requests = len(api.requests)
    with pytest.raises(ActuatorError, match="replicas must be a whole number >= 0, got -1"):
        actuator.scale("fund-facade", "task", -1, "bug")
    assert len(api.requests) == requests  # refused before any request


def test_unreachable_api_server_is_a_one_line_error() -> None:
    configuration = client.Configuration(host=f"http://127.0.0.1:{free_port()}")
    configuration.retries = 0
    actuator = KubernetesActuator(NAMESPACE, api_client=client.ApiClient(configuration))
    with pytest.raises(ActuatorError) as caught:
        actuator.scale("fund-facade", "task", 1, "pre-warm")
    message = str(caught.value)
    assert message.startswith("cannot scale deployment batch/fund-facade-task to 1: ")
    assert "\n" not in message
