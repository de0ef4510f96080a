"""The scaler's reactive input read from real sidecars: requests in flight on the inbound
listener, while an app holds them."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from controlplane.model.instance import Instance
from controlplane.scaler.inflight import active_requests, in_flight
from tests.support.mesh import Mesh
from tests.support.rules import service
from tests.support.wait import wait_until


def held_app(release: threading.Event):
    """A Mesh start_app: answers only once `release` is set."""

    class Hold(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            release.wait(10)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    def start(name: str, egress: tuple[str, int]):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Hold)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def stop() -> None:
            release.set()
            server.shutdown()
            server.server_close()

        return server.server_address[1], stop

    return start


def test_requests_in_flight_are_read_from_the_sidecar(tmp_path: Path) -> None:
    release = threading.Event()
    with Mesh(tmp_path, service("nav-pricing")) as mesh:
        # `default` accepts undyed requests (a task group's inbound would refuse them).
        held = mesh.add("nav-pricing", "default", start_app=held_app(release))
        instance = Instance(
            "i1", "nav-pricing", "default", "127.0.0.1", held.inbound_port, held.app_port,
            held.envoy.admin_port, held.egress_port, 1, 0.0,
        )  # fmt: skip
        assert active_requests("127.0.0.1", held.envoy.admin_port) == 0

        def call() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", held.inbound_port, timeout=15)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()

        callers = [threading.Thread(target=call) for _ in range(3)]
        for caller in callers:
            caller.start()
        try:
            wait_until(
                lambda: active_requests("127.0.0.1", held.envoy.admin_port) == 3, what="3 held"
            )
            group = ("nav-pricing", "default")
            assert in_flight([instance], {group}) == {group: 3}
            assert in_flight([instance], {("nav-pricing", "task")}) == {}
        finally:
            release.set()
            for caller in callers:
                caller.join(15)
        wait_until(lambda: active_requests("127.0.0.1", held.envoy.admin_port) == 0, what="0")
