"""A demo service that reports who served each hop of a call chain.

Every request is answered with the instance that served it (service, group, instance) followed
by the answers of the next services it calls through its sidecar's egress listener, with the
dye carried over by `controlplane.propagation` and the `x-request-id` forwarded (as tracing
asks of apps: every hop's access logs then name the same request, which `tasklane probe`
follows). Isolation is then counted from what actually happened at every hop, not from the
configuration. Its online work (a stand-in for a queue listener or scheduler) starts only in
`default`, through `controlplane.lanes.online_only`, and each answer says whether it runs there.

    python -m demo.chain_app --service fund-facade --group task --instance 1 --port 9001 \
        --next account-svc          # egress from $TASKLANE_EGRESS (host:port)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from controlplane import lanes, propagation

REQUEST_ID = "x-request-id"


class ChainHandler(BaseHTTPRequestHandler):
    server_version = "tasklane-demo/1"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm on the connections Envoy
    # keeps open, the second waited for the delayed ACK of the first (~40 ms per answer).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        app: ChainApp = self.server.app  # type: ignore[attr-defined]
        dye = propagation.extract(self.headers.items())
        me = {
            "service": app.service,
            "group": app.group,
            "instance": app.instance,
            "dye": dye,
            "onlineWork": app.online_work is not None,
        }
        status, hops = 200, [me]
        with propagation.dye_scope(dye):
            for service in app.next_services:
                code, answer = app.call(service, self.path, self.headers.get(REQUEST_ID))
                hops += answer.get("hops", [])
                if code != 200:
                    status = code
                    me["error"] = f"{service} answered {code}: {answer.get('error', '')}"
                    break
        self._reply(status, {"hops": hops})

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the answers are the record."""


class ChainApp:
    """One instance: serves on `port`, calls `next_services` through the egress listener."""

    def __init__(
        self,
        service: str,
        group: str,
        instance: str,
        next_services: list[str],
        egress: tuple[str, int] | None,
    ) -> None:
        self.service, self.group, self.instance = service, group, instance
        self.next_services = next_services
        self.egress = egress
        self.online_work: threading.Event | None = None

    def start_online_work(self) -> None:
        """Start the online-only work: in a task group it would take online jobs."""
        self.online_work = _online_ticker()

    def call(self, service: str, path: str, request_id: str | None = None) -> tuple[int, dict]:
        """GET `path` on `service` through the sidecar (Host: service), carrying the dye and
        the served request's id."""
        if self.egress is None:
            return 502, {"error": "no egress listener (TASKLANE_EGRESS is not set)"}
        headers = (
            {"Host": service} if request_id is None else {"Host": service, REQUEST_ID: request_id}
        )
        conn = http.client.HTTPConnection(*self.egress, timeout=10)
        try:
            conn.request("GET", path, headers=propagation.inject(headers))
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:  # e.g. an answer cut short
            return 502, {"error": f"no answer through the egress listener: {exc!r}"}
        finally:
            conn.close()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, {"error": body.strip()[:200]}

    def serve(self, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
        server = ThreadingHTTPServer((host, port), ChainHandler)
        server.daemon_threads = True
        server.app = self  # type: ignore[attr-defined]
        return server


@lanes.online_only
def _online_ticker() -> threading.Event:
    """A scheduler ticking until its event is set: the shape of an online job runner."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            pass  # an online job would run here

    threading.Thread(target=tick, daemon=True).start()
    return stop


def start_in_thread(app: ChainApp) -> tuple[int, Callable[[], None]]:
    """Serve app on a free port in a background thread; returns (port, stop)."""
    return serve_in_thread(app.serve())


def serve_until_interrupted(server: ThreadingHTTPServer) -> None:
    """Serve a bound server in this thread until Ctrl-C (a process of its own)."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(server: ThreadingHTTPServer) -> tuple[int, Callable[[], None]]:
    """Serve a bound server in a background thread; returns (its port, stop)."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return server.server_address[1], stop


def parse_egress(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    service = lanes.current_service()
    parser.add_argument("--service", default=service, required=service is None)
    parser.add_argument("--group", default=lanes.current_group())
    parser.add_argument("--instance", default=str(os.getpid()))
    port = os.environ.get("PORT")  # set by `tasklane run`
    parser.add_argument("--port", type=int, default=port, required=port is None)
    parser.add_argument("--next", action="append", default=[], help="service to call next")
    parser.add_argument("--egress", default=os.environ.get("TASKLANE_EGRESS"))
    args = parser.parse_args(argv)
    app = ChainApp(args.service, args.group, args.instance, args.next, parse_egress(args.egress))
    app.start_online_work()
    serve_until_interrupted(app.serve(args.port))


if __name__ == "__main__":
    main()
