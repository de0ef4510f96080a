"""An app that holds every request until the test lets it answer: what keeps requests in
flight on a sidecar's inbound listener for as long as a test looks at them."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def held_app(release: threading.Event, hold: float = 10):
    """A Mesh start_app: answers once `release` is set (or after `hold` seconds)."""

    class Hold(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            release.wait(hold)
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
