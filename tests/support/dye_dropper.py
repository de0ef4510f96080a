"""A broken app for tests: it calls the next service through its sidecar's egress listener
forwarding `x-request-id` but not the dye (a client made without the propagation helper), and
answers 200 with the next service's status.

    python -m tests.support.dye_dropper --port 8081 --next nav-pricing   # egress: $TASKLANE_EGRESS
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from demo.chain_app import REQUEST_ID, parse_egress, serve_until_interrupted


class DropsTheDye(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        egress, service = self.server.egress, self.server.next_service  # type: ignore[attr-defined]
        conn = http.client.HTTPConnection(*egress, timeout=10)
        forwarded = {"Host": service, REQUEST_ID: self.headers[REQUEST_ID]}
        try:
            conn.request("GET", "/", headers=forwarded)
            status = conn.getresponse().status
        finally:
            conn.close()
        body = json.dumps({"downstream": status}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent."""


def make_server(next_service: str, egress: tuple[str, int], port: int = 0) -> ThreadingHTTPServer:
    """A bound dye dropper calling `next_service` through `egress` (port 0: a free one)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), DropsTheDye)
    server.daemon_threads = True
    server.egress, server.next_service = egress, next_service  # type: ignore[attr-defined]
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=os.environ.get("PORT"))
    parser.add_argument("--next", required=True, help="the service to call")
    args = parser.parse_args(argv)
    egress = parse_egress(os.environ.get("TASKLANE_EGRESS"))
    if egress is None:
        parser.error("TASKLANE_EGRESS is not set")
    serve_until_interrupted(make_server(args.next, egress, args.port))


if __name__ == "__main__":
    main()
