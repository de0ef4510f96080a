"""The Kubernetes actuator on the wire: a real `kubernetes.client.ApiClient` talks to a tiny
local API server that records every request and answers as the API server does (Scale and
Deployment objects, Status errors). What matters is exactly what a real cluster would
receive: method, path, query, content type, auth and body."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from controlplane.runtime.ports import free_port
from controlplane.scaler.actuators import ActuatorError, GroupReplicas
from controlplane.scaler.actuators.kubernetes import KubernetesActuator

NAMESPACE = "batch"
TOKEN = "t0ken-for-tests"
DEPLOYMENTS = "/apis/apps/v1/namespaces/batch/deployments/"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes


class FakeApiServer:
    """Deployments by name: [spec.replicas, status.replicas, status.readyReplicas]."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.deployments: dict[str, list[int]] = {}
        self.forbidden: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._serve()

            def do_PATCH(self) -> None:  # noqa: N802
                self._serve()

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                api.requests.append(Request(self.command, self.path, headers, body))
                status, answer = api.answer(self.command, self.path.split("?")[0], body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the requests list is the record."""

        return Handler

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        rest = path.removeprefix(DEPLOYMENTS)
        name, _, sub = rest.partition("/")
        if name in self.forbidden:
            return 403, status_error(
                403,
                "Forbidden",
                f'deployments.apps "{name}" is forbidden: User '
                '"system:serviceaccount:batch:tasklane" cannot patch resource '
                '"deployments/scale" in API group "apps" in the namespace "batch"',
            )
        if name not in self.deployments:
            return 404, status_error(404, "NotFound", f'deployments.apps "{name}" not found')
        counts = self.deployments[name]
        if method == "PATCH" and sub == "scale":
            counts[0] = json.loads(body)["spec"]["replicas"]
            return 200, scale_object(name, *counts[:2])
        if method == "GET" and sub == "":
            return 200, deployment_object(name, *counts)
        return 405, status_error(405, "MethodNotAllowed", "the server does not allow this")

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def metadata(name: str) -> dict:
    return {
        "name": name,
        "namespace": NAMESPACE,
        "uid": "5f0c7e1e-3c55-4d8a-9a52-0d6f3f1b2c11",
        "resourceVersion": "48213",
        "creationTimestamp": "2025-03-01T02:00:00Z",
    }


def scale_object(name: str, wanted: int, current: int) -> dict:
    """An autoscaling/v1 Scale as the API server answers a PATCH of the subresource."""
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": metadata(name),
        "spec": {"replicas": wanted},
        "status": {"replicas": current, "selector": f"app={name}"},
    }


def deployment_object(name: str, wanted: int, current: int, ready: int) -> dict:
    status: dict = {"observedGeneration": 3, "replicas": current, "updatedReplicas": current}
    if ready:  # the API server leaves zero counts out
        status |= {"readyReplicas": ready, "availableReplicas": ready}
    return {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {**metadata(name), "generation": 3, "labels": {"app": name}},
        "spec": {
            "replicas": wanted,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]},
            },
        },
        "status": status,
    }


def status_error(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


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
    configuration = client.Configuration(host=api.url)
    configuration.api_key = {"BearerToken": TOKEN}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    return KubernetesActuator(NAMESPACE, api_client=client.ApiClient(configuration), **kwargs)


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
