"""The ADS server against real Envoy sidecars (SotW and Delta): routing follows updates and
removals, Envoy runs exactly the versions the server says were ACKed, a rejected resource is
NACKed once and not resent, and a SIGKILLed control plane does not stop traffic."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port
from controlplane.runtime.process import dying_with_parent, stop_process
from controlplane.xds.server import Observer
from controlplane.xds.stream import Push
from controlplane.xds.types import CLUSTER, ENDPOINT, FULL_STATE, LISTENER, ROUTE
from testkit.ads_server import AdsThread
from testkit.resources import cluster, endpoints, listener, regex_route, route
from tests.support.echo_app import start_echo
from tests.support.wait import wait_until
from tests.support.xds_fixture_server import write_spec

ROLE = "web|default"
NODE = "web-1"
MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]
DUMP_NAME = {CLUSTER: "clusters", ENDPOINT: "endpoints", LISTENER: "listeners", ROUTE: "routes"}


class Recorder(Observer):
    """Every push the server wrote, in order (appends are atomic, so tests read it safely)."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, Push]] = []

    def pushed(self, node, push: Push) -> None:
        self.pushes.append((node.node_id, push))

    def count(self, type_url: str) -> int:
        return sum(1 for node, push in self.pushes if node == NODE and push.type_url == type_url)


def expected_versions(pushes: list[tuple[str, Push]], delta: bool) -> dict[str, dict[str, str]]:
    """What Envoy's config_dump must show if it applied every push the server made to NODE.

    SotW resources carry the version_info of the response that last changed them (Envoy skips
    a resource whose content is unchanged); Delta ones their own version, except that EDS
    versions are only visible as `version_text`, the response's system version.
    """
    out: dict[str, dict[str, str]] = {short: {} for short in DUMP_NAME.values()}
    content: dict[tuple[str, str], str] = {}
    for node, push in pushes:
        if node != NODE:
            continue
        names = out[DUMP_NAME[push.type_url]]
        if not delta and push.type_url in FULL_STATE:
            for name in set(names) - {res.name for res in push.resources}:
                del names[name]
        for name in push.removed:
            names.pop(name, None)
        for res in push.resources:
            key = (push.type_url, res.name)
            if not delta and res.name in names and content.get(key) == res.version:
                continue
            content[key] = res.version
            per_response = not delta or push.type_url == ENDPOINT
            names[res.name] = push.version if per_response else res.version
    out["endpoints"] = {n: v for n, v in out["endpoints"].items() if n in out["clusters"]}
    return out


def get(port: int, path: str = "/") -> tuple[int, str]:
    """GET through Envoy; returns (status, echo app name or body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode()
    finally:
        conn.close()
    if resp.status == 200:
        return 200, json.loads(body)["name"]
    return resp.status, body


def answers(port: int, expected: tuple[int, str], path: str = "/") -> None:
    wait_until(lambda: get(port, path) == expected, what=f"GET {path} -> {expected}")


def assert_runs_acked_versions(envoy: EnvoyProcess, ads: AdsThread, rec: Recorder) -> None:
    """Envoy's config_dump shows exactly what the server pushed, and the server recorded an
    ACK of the last push of every type."""

    def settled() -> bool:
        status = ads.status(NODE)
        acked = all(t.acked_version == t.sent_version for t in status.types.values())
        return acked and envoy.versions() == expected_versions(rec.pushes, envoy.delta)

    try:
        wait_until(settled, what="Envoy runs the ACKed versions")
    except AssertionError:
        assert envoy.versions() == expected_versions(rec.pushes, envoy.delta)
        raise


@pytest.fixture
def echoes() -> Iterator[dict[str, int]]:
    stops = []
    ports = {}
    for name in ("a", "b"):
        ports[name], stop = start_echo(name)
        stops.append(stop)
    yield ports
    for stop in stops:
        stop()


def sidecar(tmp_path: Path, xds_port: int, delta: bool) -> EnvoyProcess:
    return EnvoyProcess(
        node_id=NODE,
        service="web",
        group="default",
        xds_host="127.0.0.1",
        xds_port=xds_port,
        admin_port=free_port(),
        delta=delta,
        work_dir=tmp_path / "envoy",
    )


def base_config(echoes: dict[str, int], listen: int, target: str = "a") -> list:
    return [
        cluster(target),
        endpoints(target, echoes[target]),
        listener("ingress", listen, "local"),
        route("local", {"/": target}),
    ]


@pytest.mark.parametrize("delta", MODES)
def test_envoy_follows_updates_and_removals(tmp_path: Path, echoes, delta: bool) -> None:
    listen = free_port()
    rec = Recorder()
    with AdsThread(rec) as ads, sidecar(tmp_path, ads.port, delta) as envoy:
        ads.set_snapshot(ROLE, base_config(echoes, listen))
        envoy.wait_ready()
        answers(listen, (200, "a"))
        assert_runs_acked_versions(envoy, ads, rec)

        # An update: a new cluster and a route change reach Envoy.
        ads.set_snapshot(
            ROLE,
            [
                cluster("a"),
                cluster("b"),
                endpoints("a", echoes["a"]),
                endpoints("b", echoes["b"]),
                listener("ingress", listen, "local"),
                route("local", {"/": "b", "/a": "a"}),
            ],
        )
        answers(listen, (200, "b"))
        answers(listen, (200, "a"), "/a")
        assert_runs_acked_versions(envoy, ads, rec)

        # A removal: the route and the cluster it used disappear from Envoy.
        ads.set_snapshot(
            ROLE,
            [
                cluster("b"),
                endpoints("b", echoes["b"]),
                listener("ingress", listen, "local"),
                route("local", {"/b": "b"}),
            ],
        )
        wait_until(lambda: get(listen, "/")[0] == 404, what="route / removed")
        answers(listen, (200, "b"), "/b")
        wait_until(lambda: "a" not in envoy.versions()["clusters"], what="cluster a removed")
        assert_runs_acked_versions(envoy, ads, rec)
        assert "a" not in envoy.versions()["endpoints"]


@pytest.mark.parametrize("delta", MODES)
def test_rejected_route_is_nacked_once_and_envoy_keeps_serving(
    tmp_path: Path, echoes, delta: bool
) -> None:
    listen = free_port()
    rec = Recorder()
    with AdsThread(rec) as ads, sidecar(tmp_path, ads.port, delta) as envoy:
        config = base_config(echoes, listen)
        ads.set_snapshot(ROLE, config)
        envoy.wait_ready()
        answers(listen, (200, "a"))

        ads.set_snapshot(ROLE, [*config[:3], regex_route("local", "(", "a")])
        nack = wait_until(
            lambda: ads.status(NODE).type(ROUTE).last_nack, what="the server records a NACK"
        )
        assert nack.version == ads.status(NODE).type(ROUTE).sent_version
        assert "regex" in nack.message.lower() or "(" in nack.message, nack.message
        pushes = rec.count(ROUTE)
        rejected = envoy.stats()["http.ingress.rds.local.update_rejected"]
        assert rejected == 1

        # Envoy keeps serving the last good config; nothing more is sent for that version.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert get(listen) == (200, "a")
            time.sleep(0.1)
        assert rec.count(ROUTE) == pushes
        assert envoy.stats()["http.ingress.rds.local.update_rejected"] == rejected
        assert ads.status(NODE).type(ROUTE).nacks == 1

        # The next good version is delivered and ACKed.
        ads.set_snapshot(
            ROLE,
            [
                cluster("a"),
                cluster("b"),
                endpoints("a", echoes["a"]),
                endpoints("b", echoes["b"]),
                listener("ingress", listen, "local"),
                route("local", {"/": "b"}),
            ],
        )
        answers(listen, (200, "b"))
        assert_runs_acked_versions(envoy, ads, rec)


class FixtureServer:
    """tests.support.xds_fixture_server as a child process that can be SIGKILLed and restarted."""

    def __init__(self, port: int, spec: Path, log: Path) -> None:
        self.port, self.spec, self.log = port, spec, log
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                dying_with_parent(
                    [sys.executable, "-m", "tests.support.xds_fixture_server"]
                    + ["--port", str(self.port), "--spec", str(self.spec)]
                ),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), f"fixture server did not start: {self.log.read_text()}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)


@pytest.mark.parametrize("delta", MODES)
def test_traffic_survives_control_plane_sigkill(tmp_path: Path, echoes, delta: bool) -> None:
    listen, xds_port = free_port(), free_port()
    spec = tmp_path / "spec.json"
    write_spec(spec, {ROLE: base_config(echoes, listen)})
    server = FixtureServer(xds_port, spec, tmp_path / "server.log")
    results: list[int] = []
    stop_traffic = threading.Event()

    def traffic() -> None:
        while not stop_traffic.is_set():
            try:
                results.append(get(listen)[0])
            except OSError:
                results.append(-1)
            time.sleep(0.01)

    server.start()
    sender = threading.Thread(target=traffic, daemon=True)
    try:
        with sidecar(tmp_path, xds_port, delta) as envoy:
            envoy.wait_ready()
            answers(listen, (200, "a"))
            connected = "control_plane.connected_state"
            sender.start()

            wait_until(lambda: len(results) >= 5, what="traffic flows")
            server.kill()
            wait_until(lambda: envoy.stats()[connected] == 0, what="Envoy sees the loss")
            before_outage = len(results)
            time.sleep(1)
            during_outage = len(results) - before_outage
            server.start()
            wait_until(lambda: envoy.stats()[connected] == 1, what="Envoy reconnects")

            write_spec(spec, {ROLE: base_config(echoes, listen, target="b")})
            wait_until(lambda: 200 in results[-3:] and get(listen) == (200, "b"), what="update")
            stop_traffic.set()
            sender.join(5)
            assert during_outage >= 10, f"only {during_outage} requests while the server was down"
            assert set(results) == {200}, f"{results.count(200)} of {len(results)} succeeded"
    finally:
        stop_traffic.set()
        server.stop()
