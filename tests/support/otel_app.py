"""A Flask app that carries the dye only as OpenTelemetry does: run under
`opentelemetry-instrument` (Flask and requests auto-instrumented, W3C baggage propagated), it
knows nothing of tasklane. Each answer lists who served every hop, with the `baggage` header
each hop received, the shape of demo.chain_app's answers (tests.support.mesh.served_by).

    opentelemetry-instrument python -m tests.support.otel_app --service fund-facade \
        --group task --instance 1 --egress 127.0.0.1:15001 --next account-svc

It serves on a free port of 127.0.0.1 and prints that port as its first line of output.
`start_otel_app` is a Mesh.add start_app that runs it so.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

START_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[2]


def create_app(group: str, service: str, instance: str, next_services: Sequence[str], egress: str):
    """The Flask app of one instance; calls go through the sidecar's egress as an HTTP proxy."""
    import flask
    import requests

    app = flask.Flask(service)
    session = requests.Session()
    session.trust_env = False  # only the sidecar, whatever the environment says
    session.proxies = {"http": f"http://{egress}"}

    @app.get("/")
    def serve() -> tuple[flask.Response, int]:
        me = {
            "service": service,
            "group": group,
            "instance": instance,
            "baggage": flask.request.headers.get("baggage", ""),
        }
        hops, status = [me], 200
        for name in next_services:
            answer = session.get(f"http://{name}/", timeout=10)
            try:
                hops += answer.json().get("hops", [])
            except ValueError:
                me["error"] = answer.text[:200]
            if answer.status_code != 200:
                status = answer.status_code
                me["error"] = f"{name} answered {answer.status_code}: {me.get('error', '')}"
                break
        return flask.jsonify(hops=hops), status

    return app


def main(argv: list[str] | None = None) -> None:
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--egress", required=True, help="host:port of the sidecar's egress")
    parser.add_argument("--next", action="append", default=[], help="service to call next")
    args = parser.parse_args(argv)
    app = create_app(args.group, args.service, args.instance, args.next, args.egress)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.server_port, flush=True)
    server.serve_forever()


def start_otel_app(
    service: str, group: str, next_services: Sequence[str] = ()
) -> Callable[[str, tuple[str, int]], tuple[int, Callable[[], None]]]:
    """A Mesh.add start_app: this app under `opentelemetry-instrument`, in its own process
    (exporters off: only propagation matters here)."""
    from controlplane.runtime.process import dying_with_parent, stop_process

    def start(name: str, egress: tuple[str, int]) -> tuple[int, Callable[[], None]]:
        instrument = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))
        assert instrument, "opentelemetry-instrument is missing: pip install -e '.[test]'"
        command = [instrument, sys.executable, "-m", "tests.support.otel_app"]
        command += ["--service", service, "--group", group, "--instance", name]
        command += ["--egress", f"{egress[0]}:{egress[1]}"]
        for next_service in next_services:
            command += ["--next", next_service]
        env = {
            **os.environ,
            "OTEL_SERVICE_NAME": service,
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        # stderr (werkzeug logs every request there); closed by stop()
        log = tempfile.TemporaryFile()  # noqa: SIM115
        proc = subprocess.Popen(
            dying_with_parent(command),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            stop_process(proc)
            log.seek(0)
            output = log.read().decode(errors="replace")[-2000:]
            raise AssertionError(f"{name}: the OpenTelemetry app did not start:\n{output}")

        def stop() -> None:
            stop_process(proc)
            proc.stdout.close()
            log.close()

        return int(line), stop

    return start


if __name__ == "__main__":
    main()
