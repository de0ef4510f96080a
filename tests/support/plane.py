"""A real control plane inside a test: a ControlPlane on free ports with its event loop in a
thread, a Store of the test's own on the same etcd, and JSON calls to its HTTP API (writes
carry its API token, kept in a state dir of its own)."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from controlplane.app import ControlPlane
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port
from controlplane.store.etcd import Store
from controlplane.xds.names import ACTIVE_REQUESTS_PATH, HEALTH_PATH

START_TIMEOUT = 30.0

# Straight to the API even when http_proxy is set in the environment.
api_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Plane:
    """Start it with an etcd endpoint (and any ControlPlane options); stop() ends it."""

    def __init__(self, etcd_endpoint: str, **options: Any) -> None:
        self._state_dir = tempfile.TemporaryDirectory(prefix="tasklane-plane-")
        options.setdefault("state_dir", Path(self._state_dir.name))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        options.setdefault("xds_port", 0)
        options.setdefault("registration_grace", 0)  # no instances to wait for
        self.control_plane = ControlPlane(etcd_endpoint=etcd_endpoint, http_port=0, **options)
        try:
            self.on_loop(self.control_plane.start)
        except BaseException:
            self._stop_loop()
            raise
        self.store = Store.connect(etcd_endpoint)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.control_plane.http_port}"

    @property
    def token(self) -> str:
        return self.control_plane.api_token.value

    def auth_headers(self) -> dict[str, str]:
        """What a write must carry."""
        return {"Authorization": f"Bearer {self.token}"}

    def grpc_channel(self) -> grpc.Channel:
        """A channel to the TaskService (on the xDS port) whose calls carry the token."""
        channel = grpc.insecure_channel(
            f"127.0.0.1:{self.control_plane.xds_port}", options=[("grpc.enable_http_proxy", 0)]
        )
        return grpc.intercept_channel(channel, _Bearer(self.token))

    def on_loop(self, fn: Callable, *args: Any) -> Any:
        """Run fn(*args) on the control plane's loop (awaited if it is a coroutine)."""

        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(START_TIMEOUT)

    def stop(self) -> None:
        self.store.close()
        self.on_loop(self.control_plane.stop)
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
        self._state_dir.cleanup()

    def request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """(status, JSON body) of an API call; error statuses are returned, not raised.
        `headers` default to the token's on writes."""
        data = None if body is None else json.dumps(body).encode()
        if headers is None:
            headers = {} if method == "GET" else self.auth_headers()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with api_opener.open(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def status(self) -> dict:
        code, body = self.request("GET", "/api/v1/status")
        assert code == 200, body
        return body

    def apply_files(self, files: dict[str, str], dry_run: bool = False) -> tuple[int, Any]:
        """POST /api/v1/apply with {file name: text}."""
        body = {"files": [{"name": n, "text": t} for n, t in files.items()], "dryRun": dry_run}
        return self.request("POST", "/api/v1/apply", body)

    def sidecar(
        self,
        work_dir: Path,
        role: str,
        delta: bool = True,
        *,
        app_port: int | None = None,
        inbound_port: int | None = None,
        egress_port: int | None = None,
        announce: str | None = None,
        node_id: str = "",
        ready_port: int | None = None,
    ) -> EnvoyProcess:
        """An Envoy sidecar of `role` fed by this control plane, not started; node id
        `<role>|test` unless given. With no `app_port`, no app is behind it: only its config
        matters. With `ready_port`, it has an injected pod's ready listener there
        (templates/pod.yaml)."""
        service, group = role.split("|")
        admin_port = free_port()
        pod = {
            "pod.yaml": {
                "ready_port": ready_port,
                "admin_port": admin_port,
                "active_requests_path": ACTIVE_REQUESTS_PATH,
            }
        }
        return EnvoyProcess(
            node_id=node_id or f"{role}|test",
            service=service,
            group=group,
            xds_host="127.0.0.1",
            xds_port=self.control_plane.xds_port,
            admin_port=admin_port,
            delta=delta,
            work_dir=work_dir,
            parts={
                "sidecar.yaml": {
                    "egress_port": egress_port or free_port(),
                    "inbound_host": "127.0.0.1",
                    "inbound_port": inbound_port or free_port(),
                    "app_port": app_port or free_port(),
                    "health_path": HEALTH_PATH,
                },
                **(pod if ready_port is not None else {}),
            },
            announce=announce,
        )


class _Bearer(grpc.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every unary call."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), self._metadata]
        return continuation(details._replace(metadata=metadata), request)
