"""An injected sidecar run as in a pod: a network namespace of its own (`unshare --net`, with a
pod IP on its loopback), the app, and Envoy started with the sidecar's args as the kubelet
expands them. Until the control plane has sent the config, Envoy opens no listener, so the
kubelet's probes fail; then /ready answers 200 on the pod IP, where nothing else of the admin
is reachable, the inbound listener on the pod IP reaches the app, and the control plane (a
real `tasklane up` in the same namespace) lists the sidecar under the pod's name. With the
injector's redirect loaded, a direct call to a task-group pod's app port meets the sidecar's
inbound guard. The ready port also shows the requests in flight on the inbound listener, the
one stat the scaler reads, and refuses every other admin request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from controlplane.inject.pod import (
    ADMIN_PORT,
    APP_TCP_HEALTH,
    INBOUND_PORT,
    READY_PORT,
    REDIRECT_NAME,
    InjectOptions,
    inject_pod,
)
from controlplane.pki import init_dir
from controlplane.runtime.process import stop_process
from controlplane.xds.names import ACTIVE_REQUESTS_PATH
from tests.support.k8s import mount_tls, sidecar_command
from tests.support.system import require_command
from tests.support.up import TASKLANE, Up, launch, wait_ready

pytestmark = pytest.mark.timeout(180)
POD_IP = "10.99.0.2"
POD_NAME = "web-6d5f7c8b9-x2b9q"
APP_PORT = 9000
# The control plane shares the namespace here (it is reached at 127.0.0.1); its ports are
# tasklane up's defaults, away from the sidecar's 15000-15021 and the app's.
PLANE_PORTS = {"xds": 18000, "http": 8080, "etcd_client": 2379, "etcd_peer": 2380}
WAIT = 30.0
RULES = """\
apiVersion: tasklane.io/v1
kind: Service
metadata: {name: web}
spec:
  groups: [{name: default}]
"""
# Runs inside the namespace: one request (GET, timeout 2 s, unless given), printed as JSON
# [status, body]; status 0 when the connection fails.
_GET = """\
import http.client, json, sys
host, port, path, hostname = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
method = sys.argv[5] if len(sys.argv) > 5 else "GET"
timeout = float(sys.argv[6]) if len(sys.argv) > 6 else 2
try:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request(method, path, headers={"Host": hostname})
    resp = conn.getresponse()
    print(json.dumps([resp.status, resp.read().decode(errors="replace")]))
except OSError as exc:
    print(json.dumps([0, type(exc).__name__]))
"""


class Pod:
    """A network namespace held by a sleeping process; commands join it with nsenter. The
    holder's mount namespace has the sidecar's TLS Secret mounted (from `tls`, if given):
    Envoy joins it too (`sidecar`), the other processes see the machine's files."""

    def __init__(self, tls: Path | None) -> None:
        setup = f"ip link set lo up && ip addr add {POD_IP}/32 dev lo"
        if tls is not None:
            setup += f" && {mount_tls(tls)}"
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "sh", "-c", f"{setup} && echo up && exec sleep 600"],
            stdout=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        assert self.holder.stdout.readline() == b"up\n", "cannot make the pod's namespaces"
        self.prefix = ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]
        self.sidecar = [*self.prefix, f"--mount=/proc/{self.holder.pid}/ns/mnt"]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, command: list[str], log: Path, prefix: list[str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*(self.prefix if prefix is None else prefix), *command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                **kwargs,
            )
        self.procs.append(proc)
        return proc

    def get(
        self, host: str, port: int, path: str, hostname: str = "pod", method: str = "GET"
    ) -> tuple[int, str]:
        done = subprocess.run(
            [*self.prefix, sys.executable, "-c", _GET, host, str(port), path, hostname, method],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert done.returncode == 0, done.stderr
        status, body = json.loads(done.stdout)
        return status, body

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.holder.kill()
        self.holder.wait()


@pytest.fixture(params=[False, True], ids=["plaintext-xds", "mtls-xds"])
def tls(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    """None, or a TLS directory: the control plane runs with --tls-dir and the sidecar gets
    its client files from a Secret."""
    if not request.param:
        return None
    init_dir(tmp_path / "tls")
    return tmp_path / "tls"


@pytest.fixture
def pod(tls: Path | None) -> Iterator[Pod]:
    namespace = Pod(tls)
    try:
        yield namespace
    finally:
        namespace.close()


def wait_for(check: Callable[[], Any], what: str, logs: list[Path]) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs)
            raise AssertionError(f"{what}: not within {WAIT:g}s\n{tails}")
        time.sleep(0.2)


def serve(pod: Pod, tmp_path: Path, rules: str, options: Sequence[str] = ()) -> Up:
    """A real `tasklane up` in the pod's namespace (at 127.0.0.1 there), serving `rules`."""
    up = launch([*pod.prefix, *TASKLANE], tmp_path, PLANE_PORTS, options=options)
    pod.procs.append(up.proc)
    assert wait_ready(up), up.stderr()
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    applied = subprocess.run(
        [*pod.prefix, *TASKLANE, "apply", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "TASKLANE_SERVER": "http://127.0.0.1:8080", "TASKLANE_TOKEN": up.token},
    )
    assert applied.returncode == 0, applied.stderr
    return up


def test_injected_sidecar_in_a_pod_network_namespace(
    pod: Pod, tls: Path | None, tmp_path: Path
) -> None:
    template = inject_pod(
        {
            "metadata": {"labels": {"tasklane.io/service": "web", "tasklane.io/group": "default"}},
            "spec": {
                "containers": [
                    {
                        "name": "app",
                        "image": "x",
                        "ports": [{"containerPort": APP_PORT}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": APP_PORT}},
                        "livenessProbe": {"tcpSocket": {"port": APP_PORT}},
                    }
                ]
            },
        },
        InjectOptions(
            xds_host="127.0.0.1",
            xds_port=PLANE_PORTS["xds"],
            tls_secret=None if tls is None else "tasklane-sidecar-tls",
        ),
    )
    sidecar = sidecar_command(template, POD_NAME, POD_IP)
    app_log, envoy_log = tmp_path / "app.log", tmp_path / "envoy.log"
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello from the app\n")
    app = pod.start(
        [sys.executable, "-m", "http.server", str(APP_PORT), "--bind", "0.0.0.0"],
        app_log,
        cwd=tmp_path / "www",
    )
    envoy = pod.start(sidecar, envoy_log, pod.sidecar)
    logs = [envoy_log, app_log]

    # No control plane yet: Envoy runs (its admin on 127.0.0.1 says it is initializing) but
    # opens no listener before its first config, so the kubelet's probes are refused: failures.
    status, body = wait_for(
        lambda: (answer := pod.get("127.0.0.1", ADMIN_PORT, "/ready"))[0] and answer,
        "the admin",
        logs,
    )
    assert (status, body.strip()) in {(503, "PRE_INITIALIZING"), (503, "INITIALIZING")}
    assert pod.get(POD_IP, READY_PORT, "/ready") == (0, "ConnectionRefusedError")
    assert envoy.poll() is None

    # The control plane comes up (in the same namespace here) and serves the service.
    tls_options = [] if tls is None else ["--tls-dir", str(tls)]
    up = serve(pod, tmp_path, RULES, [*tls_options, "--accept-announce"])
    logs.append(up.err)
    wait_for(lambda: pod.get(POD_IP, READY_PORT, "/ready") == (200, "LIVE\n"), "ready", logs)
    # The probe listener passes /ready on, and nothing else of the admin.
    assert pod.get(POD_IP, READY_PORT, "/ready?verbose=1") == (200, "LIVE\n")
    for path in ("/stats", "/config_dump", "/quitquitquit", "/ready/x", "/"):
        assert pod.get(POD_IP, READY_PORT, path)[0] == 404, path
    assert pod.get(POD_IP, ADMIN_PORT, "/ready") == (0, "ConnectionRefusedError")
    # The app's own probe, moved off the (redirected) app port, reaches the app.
    probe = template["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["port"] == READY_PORT
    assert pod.get(POD_IP, probe["port"], probe["path"]) == (200, "hello from the app\n")

    # Inbound: other sidecars call the announced address, the pod IP.
    status, body = wait_for(
        lambda: (answer := pod.get(POD_IP, INBOUND_PORT, "/", "web"))[0] == 200 and answer,
        "the app through the inbound listener",
        logs,
    )
    assert body == "hello from the app\n"
    status, text = pod.get("127.0.0.1", PLANE_PORTS["http"], "/api/v1/status")
    assert status == 200
    nodes = json.loads(text)
    assert f"web|default|{POD_NAME}" in json.dumps(nodes), nodes

    # Registered from its xDS stream at the address it announced (tasklane up --accept-announce).
    def announced() -> list[dict[str, Any]]:
        status, text = pod.get("127.0.0.1", PLANE_PORTS["http"], "/api/v1/instances")
        assert status == 200, text
        return [i for i in json.loads(text)["items"] if i["id"] == f"web|default|{POD_NAME}"]

    found = wait_for(announced, "the announced instance", logs)
    assert [(i["service"], i["group"], i["host"], i["inbound_port"]) for i in found] == [
        ("web", "default", POD_IP, INBOUND_PORT)
    ]
    assert envoy.poll() is None

    # The app's TCP probe, moved to the ready port, follows the app itself, not the sidecar.
    liveness = template["spec"]["containers"][0]["livenessProbe"]["httpGet"]
    assert (liveness["port"], liveness["path"]) == (READY_PORT, APP_TCP_HEALTH)
    assert pod.get(POD_IP, READY_PORT, APP_TCP_HEALTH)[0] == 200
    app.kill()
    wait_for(
        lambda: pod.get(POD_IP, READY_PORT, APP_TCP_HEALTH)[0] == 503, "the TCP probe fails", logs
    )


TASK_RULES = """\
apiVersion: tasklane.io/v1
kind: Service
metadata: {name: web}
spec:
  groups: [{name: default}, {name: task}]
"""


def test_a_direct_call_to_the_app_port_meets_the_inbound_guard(tmp_path: Path) -> None:
    """A task-group pod with the redirect the injector adds: its app port, called at the pod
    IP, answers with the real sidecar's 403 (no chain uses the group), not with the app."""
    require_command("iptables-restore", "iptables")
    pod = Pod(None)
    try:
        template = inject_pod(
            {
                "metadata": {"labels": {"tasklane.io/service": "web", "tasklane.io/group": "task"}},
                "spec": {
                    "containers": [
                        {"name": "app", "image": "x", "ports": [{"containerPort": APP_PORT}]}
                    ]
                },
            },
            InjectOptions(xds_host="127.0.0.1", xds_port=PLANE_PORTS["xds"], tls_secret=None),
        )
        (redirect,) = [c for c in template["spec"]["initContainers"] if c["name"] == REDIRECT_NAME]
        sidecar = sidecar_command(template, POD_NAME, POD_IP)
        (tmp_path / "www").mkdir()
        (tmp_path / "www" / "index.html").write_text("hello from the app\n")
        app_log, envoy_log = tmp_path / "app.log", tmp_path / "envoy.log"
        pod.start(
            [sys.executable, "-m", "http.server", str(APP_PORT), "--bind", "0.0.0.0"],
            app_log,
            cwd=tmp_path / "www",
        )
        wait_for(lambda: pod.get(POD_IP, APP_PORT, "/")[0] == 200, "the app", [app_log])
        # The init container runs first, as the kubelet runs it (`python` is the image's).
        done = subprocess.run(
            [*pod.prefix, sys.executable, *redirect["command"][1:]],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert done.returncode == 0, done.stderr
        pod.start(sidecar, envoy_log)
        up = serve(pod, tmp_path, TASK_RULES, ["--accept-announce"])
        logs = [envoy_log, app_log, up.err]
        wait_for(lambda: pod.get(POD_IP, READY_PORT, "/ready")[0] == 200, "ready", logs)

        status, body = wait_for(
            lambda: (answer := pod.get(POD_IP, APP_PORT, "/", "web"))[0] == 403 and answer,
            "the guard's 403 at the app port",
            logs,
        )
        assert "tasklane: web group task serves only task traffic" in body
        # The sidecar's own way to the app, loopback, is left alone.
        assert pod.get("127.0.0.1", APP_PORT, "/") == (200, "hello from the app\n")
    finally:
        pod.close()


# An app that holds every request until the file named by its second argument exists.
_HELD_APP = """\
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, release = int(sys.argv[1]), sys.argv[2]
class Held(BaseHTTPRequestHandler):
    def do_GET(self):
        deadline = time.monotonic() + 30
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", port), Held).serve_forever()
"""
# What the ready port shows of the inbound listener's requests in flight: Envoy's Prometheus
# text of that one stat.
IN_FLIGHT = (
    "# TYPE envoy_http_downstream_rq_active gauge\n"
    'envoy_http_downstream_rq_active{{envoy_http_conn_manager_prefix="inbound"}} {}\n'
)
# Admin requests that stop Envoy, change it, or show more than that one stat.
REFUSED = [
    ("POST", "/quitquitquit"),
    ("GET", "/quitquitquit"),
    ("POST", "/logging?level=trace"),
    ("POST", "/healthcheck/fail"),
    ("POST", "/drain_listeners"),
    ("POST", "/runtime_modify?upstream.use_http2=false"),
    ("POST", "/reset_counters"),
    ("GET", "/config_dump"),
    ("GET", "/clusters"),
    ("GET", "/stats"),
    ("GET", "/stats?format=json"),
    ("GET", "/stats/prometheus"),
    ("GET", "/stats/prometheus?filter=.*"),
    ("GET", f"{ACTIVE_REQUESTS_PATH}&filter=.*"),
    ("GET", f"{ACTIVE_REQUESTS_PATH}&format=json"),
    ("GET", f"/stats?{ACTIVE_REQUESTS_PATH.partition('?')[2]}"),
    ("POST", ACTIVE_REQUESTS_PATH),
]


def test_the_ready_port_shows_requests_in_flight_and_nothing_else_of_the_admin(
    tmp_path: Path,
) -> None:
    """The scaler reads a pod's requests in flight at its ready port: while three requests to
    the pod IP's inbound listener are held by the app, that port shows 3 (what the admin on
    the pod's loopback shows), then 0; every other admin request there is a 404, and Envoy
    goes on as it was."""
    pod = Pod(None)
    try:
        template = inject_pod(
            {
                "metadata": {
                    "labels": {"tasklane.io/service": "web", "tasklane.io/group": "default"}
                },
                "spec": {
                    "containers": [
                        {"name": "app", "image": "x", "ports": [{"containerPort": APP_PORT}]}
                    ]
                },
            },
            InjectOptions(xds_host="127.0.0.1", xds_port=PLANE_PORTS["xds"], tls_secret=None),
        )
        release = tmp_path / "release"
        app_log, envoy_log = tmp_path / "app.log", tmp_path / "envoy.log"
        pod.start([sys.executable, "-c", _HELD_APP, str(APP_PORT), str(release)], app_log)
        envoy = pod.start(sidecar_command(template, POD_NAME, POD_IP), envoy_log)
        up = serve(pod, tmp_path, RULES)
        logs = [envoy_log, app_log, up.err]
        wait_for(lambda: pod.get(POD_IP, READY_PORT, "/ready")[0] == 200, "ready", logs)
        in_flight = (200, IN_FLIGHT.format(0))
        wait_for(lambda: pod.get(POD_IP, READY_PORT, ACTIVE_REQUESTS_PATH) == in_flight, "0", logs)

        held = [
            pod.start(
                [sys.executable, "-c", _GET, POD_IP, str(INBOUND_PORT), "/", "web", "GET", "30"],
                tmp_path / f"caller-{n}.log",
            )
            for n in range(3)
        ]
        in_flight = (200, IN_FLIGHT.format(3))
        wait_for(lambda: pod.get(POD_IP, READY_PORT, ACTIVE_REQUESTS_PATH) == in_flight, "3", logs)
        assert pod.get("127.0.0.1", ADMIN_PORT, ACTIVE_REQUESTS_PATH) == in_flight
        for method, path in REFUSED:
            assert pod.get(POD_IP, READY_PORT, path, method=method) == (404, ""), (method, path)
        assert envoy.poll() is None
        assert pod.get(POD_IP, READY_PORT, ACTIVE_REQUESTS_PATH) == in_flight
        assert pod.get("127.0.0.1", ADMIN_PORT, "/ready") == (200, "LIVE\n")
        logging = pod.get("127.0.0.1", ADMIN_PORT, "/logging", method="POST")[1]
        assert "admin: warning" in logging, logging  # the sidecar's --log-level, unchanged

        release.touch()
        for caller in held:
            assert caller.wait(WAIT) == 0
        in_flight = (200, IN_FLIGHT.format(0))
        wait_for(lambda: pod.get(POD_IP, READY_PORT, ACTIVE_REQUESTS_PATH) == in_flight, "0", logs)
    finally:
        pod.close()
