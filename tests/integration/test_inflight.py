"""The scaler's reactive input read from real sidecars: requests in flight on the inbound
listener, while an app holds them."""

from __future__ import annotations

import http.client
import threading
from pathlib import Path

from controlplane.model.instance import Instance
from controlplane.scaler.inflight import active_requests_url, in_flight
from controlplane.scaler.signals import Reading, read_gauge
from controlplane.xds.names import ACTIVE_REQUESTS_METRIC
from tests.support.held_app import held_app
from tests.support.mesh import Mesh
from tests.support.rules import service
from tests.support.wait import wait_until


def test_requests_in_flight_are_read_from_the_sidecar(tmp_path: Path) -> None:
    release = threading.Event()
    with Mesh(tmp_path, service("nav-pricing")) as mesh:
        # `default` accepts undyed requests (a task group's inbound would refuse them).
        held = mesh.add("nav-pricing", "default", start_app=held_app(release))
        instance = Instance(
            "i1", "nav-pricing", "default", "127.0.0.1", held.inbound_port, held.app_port,
            held.envoy.admin_port, held.egress_port, 1, 0.0,
        )  # fmt: skip
        admin = active_requests_url("127.0.0.1", held.envoy.admin_port)
        assert read_gauge(admin, ACTIVE_REQUESTS_METRIC) == 0

        def call() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", held.inbound_port, timeout=15)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()

        callers = [threading.Thread(target=call) for _ in range(3)]
        for caller in callers:
            caller.start()
        try:
            wait_until(lambda: read_gauge(admin, ACTIVE_REQUESTS_METRIC) == 3, what="3 held")
            group = ("nav-pricing", "default")
            assert in_flight([instance], {group}) == [(group, Reading(in_flight=3))]
            assert in_flight([instance], {("nav-pricing", "task")}) == []
        finally:
            release.set()
            for caller in callers:
                caller.join(15)
        wait_until(lambda: read_gauge(admin, ACTIVE_REQUESTS_METRIC) == 0, what="0")
