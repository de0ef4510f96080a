"""A tiny Kubernetes API server for the Kubernetes actuator's tests: it records every request
and answers as the API server does, in the real API schema. Deployments and their scale
subresource (apps/v1, autoscaling/v1), Pods listed by label selector (v1) and, when
metrics-server is "installed", their PodMetrics (metrics.k8s.io/v1beta1, shaped after
k8s.io/metrics' pkg/apis/metrics/v1beta1/types.go: timestamp, window, and per container of
`spec.containers` its usage quantities), and Status errors. The Pod, PodList and Deployment
objects pass kubernetes-validate's strict schemas (tests/unit/test_pod_signals.py)."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from kubernetes import client

NAMESPACE = "batch"
TOKEN = "t0ken-for-tests"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/"
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"
POD_METRICS = f"/apis/metrics.k8s.io/v1beta1/namespaces/{NAMESPACE}/pods"
CREATED = "2025-03-01T02:00:00Z"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes


class FakeApiServer:
    """Deployments by name: [spec.replicas, status.replicas, status.readyReplicas], with the
    pod labels their selector matches; Pod objects; container usage by pod name (None: no
    metrics-server, the metrics API is not there)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.deployments: dict[str, list[int]] = {}
        self.selectors: dict[str, dict[str, str]] = {}  # by Deployment; default app=<name>
        self.forbidden: set[str] = set()
        self.pods: list[dict] = []
        self.usage: dict[str, dict[str, dict[str, str]]] | None = None  # pod -> container ->
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def client(self, **settings: object) -> client.ApiClient:
        """A real ApiClient for this server, with a bearer token as in a cluster."""
        configuration = client.Configuration(host=self.url)
        configuration.api_key = {"BearerToken": TOKEN}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        for name, value in settings.items():
            setattr(configuration, name, value)
        return client.ApiClient(configuration)

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
                url = urlsplit(self.path)
                query = {name: values[0] for name, values in parse_qs(url.query).items()}
                status, answer = api.answer(self.command, url.path, query, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the requests list is the record."""

        return Handler

    def answer(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, dict]:
        if path in (PODS, POD_METRICS) and method == "GET":
            return self._list(path, query.get("labelSelector", ""))
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
            return 200, deployment_object(name, *counts, labels=self.selectors.get(name))
        return 405, status_error(405, "MethodNotAllowed", "the server does not allow this")

    def _list(self, path: str, selector: str) -> tuple[int, dict]:
        """A list by label selector: the terms the actuator sends (`a=b`, `a in (b,c)`, `a`:
        the key exists), ANDed; anything else is refused, so a test sees what was asked."""
        terms = re.findall(
            r"([\w./-]+) in \(([\w.,-]+)\)|([\w./-]+)=([\w.-]+)|([\w./-]+)", selector
        )
        if ",".join(_term(term) for term in terms) != selector:
            return 400, status_error(400, "BadRequest", f"unexpected selector {selector!r}")
        pods = [p for p in self.pods if all(_has(p["metadata"]["labels"], t) for t in terms)]
        if path == PODS:
            return 200, {
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": "48213"},
                "items": pods,
            }
        if self.usage is None:  # the metrics.k8s.io APIService is not registered
            return 404, status_error(
                404, "NotFound", "the server could not find the requested resource"
            )
        return 200, {
            "kind": "PodMetricsList",
            "apiVersion": "metrics.k8s.io/v1beta1",
            "metadata": {},
            "items": [  # metrics-server leaves out pods that are not Running
                pod_metrics(p, self.usage[p["metadata"]["name"]])
                for p in pods
                if p["metadata"]["name"] in self.usage and p["status"]["phase"] == "Running"
            ],
        }

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _term(term: tuple[str, ...]) -> str:
    """A parsed selector term written back, to check that the parse covered the selector."""
    key_in, values, key_is, value, key = term
    return f"{key_in} in ({values})" if key_in else f"{key_is}={value}" if key_is else key


def _has(labels: dict[str, str], term: tuple[str, ...]) -> bool:
    key_in, values, key_is, value, key = term
    if key_in:
        return labels.get(key_in) in values.split(",")
    return labels.get(key_is) == value if key_is else key in labels


def metadata(name: str) -> dict:
    return {
        "name": name,
        "namespace": NAMESPACE,
        "uid": "5f0c7e1e-3c55-4d8a-9a52-0d6f3f1b2c11",
        "resourceVersion": "48213",
        "creationTimestamp": CREATED,
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


def deployment_object(
    name: str, wanted: int, current: int, ready: int, labels: dict[str, str] | None = None
) -> dict:
    """An apps/v1 Deployment whose selector and pod template carry `labels` (app=<name>)."""
    labels = labels or {"app": name}
    status: dict = {"observedGeneration": 3, "replicas": current, "updatedReplicas": current}
    if ready:  # the API server leaves zero counts out
        status |= {"readyReplicas": ready, "availableReplicas": ready}
    return {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {**metadata(name), "generation": 3, "labels": {"app": name}},
        "spec": {
            "replicas": wanted,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]},
            },
        },
        "status": status,
    }


def pod_object(
    name: str,
    labels: dict[str, str],
    ip: str,
    *,
    ready: bool = True,
    phase: str = "Running",
    requests: dict[str, dict[str, str]] | None = None,
    annotations: dict[str, str] | None = None,
    ports: dict[str, int] | None = None,
    terminating: bool = False,
    ready_port: int | None = None,
) -> dict:
    """A v1 Pod of a Deployment as the API server lists it, injected: its app containers
    (`requests` and `ports` name them: container -> resource -> quantity, port name ->
    number; one `app` container by default) and the Envoy sidecar as a native sidecar (an
    init container with restartPolicy Always), which declares its ready port (where the
    scaler reads its requests in flight) when `ready_port` is given."""
    names = list(requests or {"app": {}})
    containers = []
    for index, container in enumerate(names):
        spec: dict = {"name": container, "image": "registry.local/app:1"}
        if index == 0:
            spec["ports"] = [
                {"name": port_name, "containerPort": number, "protocol": "TCP"}
                for port_name, number in (ports or {"http": 8080}).items()
            ]
        request = (requests or {}).get(container)
        spec["resources"] = {"requests": request} if request else {}
        containers.append(spec)
    meta = {
        **metadata(name),
        "generateName": name.rsplit("-", 1)[0] + "-",
        "labels": labels,
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": name.rsplit("-", 1)[0],
                "uid": "0b7d1c52-8f0e-4b8e-9d6c-2a1f3e4d5c6b",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        meta["annotations"] = annotations
    if terminating:
        meta |= {"deletionTimestamp": "2025-03-01T02:10:00Z", "deletionGracePeriodSeconds": 30}
    condition = "True" if ready else "False"
    sidecar: dict = {
        "name": "envoy",
        "image": "ghcr.io/tasklane/tasklane:0.1.0",
        "restartPolicy": "Always",
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
    }
    if ready_port is not None:
        sidecar["ports"] = [
            {"name": "tasklane-ready", "containerPort": ready_port, "protocol": "TCP"}
        ]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "initContainers": [sidecar],
            "containers": containers,
            "nodeName": "node-1",
            "restartPolicy": "Always",
        },
        "status": {
            "phase": phase,
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "10.0.0.11",
            "startTime": CREATED,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": CREATED},
                {"type": "Ready", "status": condition, "lastTransitionTime": CREATED},
                {"type": "ContainersReady", "status": condition, "lastTransitionTime": CREATED},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": CREATED},
            ],
        },
    }


def pod_metrics(pod: dict, usage: dict[str, dict[str, str]]) -> dict:
    """A metrics.k8s.io/v1beta1 PodMetrics as metrics-server serves it: CPU in nanocores and
    memory (the working set) in Ki, as the kubelet's resource metrics give them."""
    return {
        "metadata": {
            "name": pod["metadata"]["name"],
            "namespace": NAMESPACE,
            "creationTimestamp": "2025-03-01T02:05:07Z",
            "labels": pod["metadata"]["labels"],
        },
        "timestamp": "2025-03-01T02:04:58Z",
        "window": "15.011s",
        "containers": [
            {"name": container, "usage": quantities} for container, quantities in usage.items()
        ],
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
