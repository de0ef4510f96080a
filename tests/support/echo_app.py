"""A tiny HTTP app that says who answered: the name of its instance, the path and the headers.

Tests put it behind Envoy sidecars to see which instance (service, group) served a request and
which headers (dye, baggage) arrived there.

    python -m tests.support.echo_app --port 8081 --name account-svc/task
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from demo.chain_app import serve_in_thread, serve_until_interrupted


class EchoHandler(BaseHTTPRequestHandler):
    """Answers every method with 200 and a JSON echo of the request."""

    server_version = "tasklane-echo/1"
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connections expect

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)  # drain the body so the connection can be reused
        body = json.dumps(
            {
                "name": self.server.app_name,  # type: ignore[attr-defined]
                "method": self.command,
                "path": self.path,
                "headers": {key.lower(): value for key, value in self.headers.items()},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: object) -> None:
        """Silent: tests read responses, not logs."""


def make_server(name: str, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A bound echo server (port 0: the kernel picks one, so parallel tests never collide)."""
    server = ThreadingHTTPServer((host, port), EchoHandler)
    server.daemon_threads = True
    server.app_name = name  # type: ignore[attr-defined]
    return server


def start_echo(name: str, host: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
    """Run an echo server in a background thread; returns (port, stop)."""
    return serve_in_thread(make_server(name, 0, host))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    serve_until_interrupted(make_server(args.name, args.port, args.host))


if __name__ == "__main__":
    main()
