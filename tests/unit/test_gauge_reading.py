"""Reading an app's saturation gauge: what prometheus_client itself exports, NaN included."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from controlplane.scaler.signals import read_gauge


@pytest.fixture
def exported() -> Iterator[tuple[str, Gauge]]:
    """A /metrics endpoint on 127.0.0.1 serving a real registry with one labelled gauge."""
    registry = CollectorRegistry()
    gauge = Gauge("pool_busy_ratio", "busy share", ["pool"], registry=registry)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", gauge
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_not_a_number_samples_are_left_out_of_the_mean(exported: tuple[str, Gauge]) -> None:
    url, gauge = exported
    gauge.labels("io").set(0.9)
    gauge.labels("idle").set(math.nan)  # an idle pool's 0/0
    gauge.labels("broken").set(math.inf)
    assert read_gauge(url, "pool_busy_ratio") == 0.9


def test_a_gauge_with_only_not_a_number_samples_is_not_known(
    exported: tuple[str, Gauge],
) -> None:
    url, gauge = exported
    gauge.labels("idle").set(math.nan)
    assert read_gauge(url, "pool_busy_ratio") is None
