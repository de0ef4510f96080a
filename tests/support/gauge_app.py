"""An app with a bounded worker pool that exports its saturation through prometheus_client:
`pool_busy_ratio` (busy workers / workers). GET /work holds a worker for `--hold` seconds
spinning the CPU; GET /metrics is Prometheus text. For the scaler's reactive signals.

    python -m tests.support.gauge_app --port 8081 --workers 4 --hold 1.5
"""

from __future__ import annotations

import argparse
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

BUSY = Gauge("pool_busy_ratio", "Share of the worker pool busy with requests")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--hold", type=float, default=1.5)
    args = parser.parse_args()
    pool = threading.BoundedSemaphore(args.workers)
    busy = [0]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            if self.path == "/metrics":
                body = generate_latest()
                kind = CONTENT_TYPE_LATEST
            else:
                with pool:
                    with lock:
                        busy[0] += 1
                        BUSY.set(busy[0] / args.workers)
                    until = time.monotonic() + args.hold
                    while time.monotonic() < until:  # work: the CPU is busy too
                        sum(range(1000))
                    with lock:
                        busy[0] -= 1
                        BUSY.set(busy[0] / args.workers)
                body, kind = b"done\n", "text/plain"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
