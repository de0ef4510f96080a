"""`tasklane run` as a user runs it: a real `tasklane up`, the fund-yield rules applied with
`tasklane apply`, and demo apps behind real Envoy sidecars started by `tasklane run`. Dyed
requests stay in the task groups at every hop; a run that stops (signal, the app exiting, or
killed hard) leaves etcd and its callers' endpoints, and leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controlplane.model.instance import DEFAULT_TTL
from controlplane.runtime.ports import free_port
from demo.chain_app import serve_in_thread
from tests.support.chain import (
    GOOD,
    NEXT,
    STOP_TIMEOUT,
    Plane,
    Run,
    chain_app,
    children_of,
    cluster_hosts,
    get,
    hops,
    running_plane,
    stop_run,
)
from tests.support.procs import wait_gone
from tests.support.up import (
    TASKLANE,
    assert_one_line_error,
    get_json,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)
FAIL_FAST = 10.0  # a run whose Envoy cannot get config says why within this

# A minimal app for the stop tests: records the environment `tasklane run` gave it, accepts
# connections on $PORT, exits 7 on SIGTERM and 3 by itself once the file argv[1] exists.
PROBE_APP = """
import json, os, signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
with open(sys.argv[1] + ".env", "w") as out:
    json.dump(dict(os.environ), out)
server = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
server.settimeout(0.05)
while not os.path.exists(sys.argv[1]):
    try:
        server.accept()[0].close()
    except TimeoutError:
        pass
sys.exit(3)
"""


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    """`tasklane up` with the fund-yield rules applied by `tasklane apply`."""
    yield from running_plane(tmp_path_factory, GOOD)


@dataclass
class Probe:
    """A run of PROBE_APP in account-svc|debit (no request of the tests goes there), and the
    file that makes its app exit by itself."""

    run: Run
    trigger: Path


@dataclass
class Mesh:
    chain: dict[tuple[str, str], Run]  # one instance of every group of the fund-yield chain
    probes: dict[str, Probe]  # one per stop test


@pytest.fixture(scope="module")
def mesh(plane: Plane) -> Iterator[Mesh]:
    """Every instance the tests need, started in parallel."""
    chain = {
        (service, group): plane.launch(service, group, chain_app(service, group))
        for service in NEXT
        for group in ("default", "task")
    }
    probes = {}
    for name in ("sigterm", "exit", "kill", "envoy"):
        trigger = plane.logs / f"exit-{name}"
        command = [sys.executable, "-c", PROBE_APP, str(trigger)]
        probes[name] = Probe(plane.launch("account-svc", "debit", command), trigger)
    runs = [*chain.values(), *(probe.run for probe in probes.values())]
    try:
        with ThreadPoolExecutor(len(runs)) as pool:
            list(pool.map(plane.registered, runs))
        yield Mesh(chain, probes)
    finally:
        with ThreadPoolExecutor(len(runs)) as pool:
            list(pool.map(stop_run, runs))


def test_dyed_requests_stay_in_the_task_groups_at_every_hop(mesh: Mesh) -> None:
    egress = mesh.chain["nav-pricing", "default"].instance.egress_port  # any sidecar will do
    task = [("fund-facade", "task"), ("account-svc", "task"), ("nav-pricing", "task")]
    online = [("fund-facade", "default"), ("account-svc", "default"), ("nav-pricing", "default")]

    # Callers route to an instance once their first health check of it passed.
    wait_until(
        lambda: (
            get(egress, "fund-facade", {"x-task-dye": "fund-yield"})[0] == 200
            and get(egress, "fund-facade", {})[0] == 200
        ),
        what="both chains answer",
        timeout=30,  # ten sidecars start at once; in a loaded -n 2 suite 15 s fell short once
    )
    for _ in range(5):
        status, answer = get(egress, "fund-facade", {"x-task-dye": "fund-yield"})
        assert (status, hops(answer)) == (200, task), answer
        status, answer = get(egress, "fund-facade", {})
        assert (status, hops(answer)) == (200, online), answer
    instances = {(run.service, run.group): run.instance.id for run in mesh.chain.values()}
    assert [hop["instance"] for hop in answer["hops"]] == [instances[hop] for hop in online]


def test_unknown_service_or_group_fails_with_one_line(plane: Plane) -> None:
    command = ["--", "sleep", "30"]
    nope = plane.tasklane("run", "--service", "nope", *command)
    assert nope.returncode == 2
    assert_one_line_error(nope.stderr, "Service 'nope' not found")
    group = plane.tasklane("run", "--service", "fund-facade", "--group", "batch", *command)
    assert group.returncode == 2
    assert_one_line_error(
        group.stderr, "service fund-facade has no group 'batch' (groups: default, task)"
    )
    missing = plane.tasklane("run", "--service", "fund-facade", "--", "no-such-command-here")
    assert missing.returncode == 2
    assert_one_line_error(missing.stderr, "command not found: no-such-command-here")


def test_sigterm_deregisters_then_stops_app_and_envoy(plane: Plane, mesh: Mesh) -> None:
    run, trigger = mesh.probes["sigterm"].run, mesh.probes["sigterm"].trigger
    instance = run.instance
    address = "{}:{}".format(*instance.address)
    caller = mesh.chain["fund-facade", "default"].instance.admin_port
    wait_until(
        lambda: address in cluster_hosts(caller, "account-svc|debit"),
        what="the caller's sidecar has the new instance",
    )
    env = json.loads(Path(f"{trigger}.env").read_text())
    egress = f"127.0.0.1:{instance.egress_port}"
    expected = {
        "PORT": str(instance.app_port),
        "TASKLANE_SERVICE": "account-svc",
        "TASKLANE_GROUP": "debit",
        "TASKLANE_INSTANCE": instance.id,
        "TASKLANE_EGRESS": egress,
        "http_proxy": f"http://{egress}",
        "HTTP_PROXY": f"http://{egress}",
        "https_proxy": f"http://{egress}",
        "HTTPS_PROXY": f"http://{egress}",
        "no_proxy": "localhost,127.0.0.1",
        "NO_PROXY": "localhost,127.0.0.1",
        "TASKLANE_TOKEN": None,  # given to `tasklane run`, kept from the app
    }
    assert {name: env.get(name) for name in expected} == expected
    children = children_of(run.proc.pid)
    assert instance.pid in children and len(children) == 2  # the app and Envoy

    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=STOP_TIMEOUT) == 7, run.stderr()
    # Deregistered, not expired: well within the lease's 5 s TTL even on a loaded machine.
    wait_until(lambda: instance.key not in plane.instance_keys(), 3, "deregistered")
    for pid in children:
        assert wait_gone(pid, timeout=1), f"pid {pid} still running"
    # Gone from the caller's endpoints (see the report: health checks may keep it a moment).
    wait_until(
        lambda: address not in cluster_hosts(caller, "account-svc|debit"),
        what="the caller's sidecar forgot the instance",
    )
    log = run.stderr()
    assert "Traceback" not in log
    assert "deregistering" in log


def test_app_exit_ends_the_run_with_its_code(plane: Plane, mesh: Mesh) -> None:
    run = mesh.probes["exit"].run
    children = children_of(run.proc.pid)
    mesh.probes["exit"].trigger.touch()
    assert run.proc.wait(timeout=STOP_TIMEOUT) == 3, run.stderr()
    assert run.instance.key not in plane.instance_keys()
    for pid in children:
        assert wait_gone(pid, timeout=1), f"pid {pid} still running"
    assert "Traceback" not in run.stderr()


def test_run_killed_hard_expires_with_its_lease(plane: Plane, mesh: Mesh) -> None:
    run = mesh.probes["kill"].run
    children = children_of(run.proc.pid)
    [envoy] = [pid for pid in children if pid != run.instance.pid]
    args = Path(f"/proc/{envoy}/cmdline").read_bytes().split(b"\0")
    bootstrap = Path(args[args.index(b"-c") + 1].decode())
    run.proc.kill()
    run.proc.wait()
    for pid in children:  # the kernel kills them with their parent
        assert wait_gone(pid, timeout=2), f"pid {pid} still running"
    killed = time.monotonic()
    wait_until(
        lambda: run.instance.key not in plane.instance_keys(),
        timeout=DEFAULT_TTL + 3,
        what="the instance expired",
    )
    assert time.monotonic() - killed <= DEFAULT_TTL + 1
    status, body = get_json(f"{plane.server}/api/v1/instances")
    assert status == 200
    assert run.instance.id not in {item["id"] for item in body["items"]}
    shutil.rmtree(bootstrap.parent)  # the one thing a run killed hard cannot clean up


def test_envoy_dying_ends_the_run_deregistered(plane: Plane, mesh: Mesh) -> None:
    run = mesh.probes["envoy"].run
    app = run.instance.pid
    [envoy] = [pid for pid in children_of(run.proc.pid) if pid != app]
    os.kill(envoy, signal.SIGKILL)
    assert run.proc.wait(timeout=STOP_TIMEOUT) == 2
    assert run.instance.key not in plane.instance_keys()
    assert wait_gone(app, timeout=1)
    log = run.stderr()
    assert "tasklane: error: Envoy (admin " in log
    assert "Traceback" not in log


def test_runs_register_again_with_a_restarted_control_plane(plane: Plane, mesh: Mesh) -> None:
    """The new control plane knows none of the registrations: each run's next keep-alive
    gets 404 and registers again, before the lease the old one held has expired."""
    keys = {run.instance.key for run in mesh.chain.values()}
    leases = {key: plane.lease_of(key) for key in keys}
    plane.restart_up()
    wait_until(
        lambda: all(0 != plane.lease_of(key) != leases[key] for key in keys),
        what="every instance under a lease of the new control plane",
        timeout=30,  # a loaded -n 2 suite once took longer than 15 s
    )
    egress = mesh.chain["nav-pricing", "default"].instance.egress_port
    status, answer = get(egress, "fund-facade", {"x-task-dye": "fund-yield"})
    assert (status, hops(answer)[-1]) == (200, ("nav-pricing", "task")), answer
    assert all("registered again" in run.stderr() for run in mesh.chain.values())


# The first start of this app finds its $PORT taken by another process (the race between
# `tasklane run` picking a free port and the app binding it), as a parallel test saw it.
PORT_THIEF = """
import os, pathlib, socket, sys, time
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text(os.environ["PORT"])
    thief = socket.socket()
    thief.bind(("127.0.0.1", int(os.environ["PORT"])))
    thief.listen()
    if os.fork() == 0:  # keeps the port, in the app's process group, until that is killed
        time.sleep(60)
        os._exit(0)
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def test_an_app_port_taken_first_is_picked_again(plane: Plane, tmp_path: Path) -> None:
    marker = tmp_path / "first-port"
    command = [sys.executable, "-c", PORT_THIEF, str(marker), *chain_app("nav-pricing", "task")]
    run = plane.registered(plane.launch("nav-pricing", "task", command))
    try:
        assert run.instance is not None and run.instance.app_port != int(marker.read_text())
        assert "was taken first: trying others" in run.stderr()
    finally:
        stop_run(run)


class _UnreachableXds(BaseHTTPRequestHandler):
    """The control plane's API as `tasklane run` reads it, its real answers, except that the
    xDS address it reports is a port nobody listens on: a control plane advertising an
    address its sidecars cannot reach."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        status, body = get_json(self.server.real + self.path)  # type: ignore[attr-defined]
        if self.path == "/api/v1/status":
            body["xds"]["address"] = self.server.xds  # type: ignore[attr-defined]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_run_whose_envoy_cannot_reach_xds_fails_fast_naming_the_cause(plane: Plane) -> None:
    """Not 3 x 30 s of retried ports (its own Envoy held them), but one line within seconds."""
    api = ThreadingHTTPServer(("127.0.0.1", 0), _UnreachableXds)
    xds = f"127.0.0.1:{free_port()}"
    api.real, api.xds = plane.server, xds  # type: ignore[attr-defined]
    port, stop = serve_in_thread(api)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*TASKLANE, "run", "--server", f"http://127.0.0.1:{port}"]
            + ["--service", "nav-pricing", "--", "sleep", "60"],
            capture_output=True,
            text=True,
            timeout=FAIL_FAST,
            env=plane.env(),
        )
    finally:
        stop()
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < FAIL_FAST
    assert_one_line_error(done.stderr, "Envoy (admin :")
    assert f"cannot connect to the control plane's xDS at {xds}: Connection refused" in done.stderr
