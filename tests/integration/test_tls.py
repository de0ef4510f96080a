"""xDS over TLS with client certificates: a real `tasklane up --tls-dir` (a TLS dir from
`tasklane tls init`), real `tasklane run --tls-dir` instances of the fund-yield chain and a
`tasklane gateway --tls-dir`, real Envoys and real gRPC clients. Everything is observed from
outside: Envoy's admin (/ready, config_dump, TLS stats, its log), requests routed through the
mesh, the access-log accounting, refused handshakes, and the files and logs left behind."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from controlplane import pki
from controlplane.runtime.envoy import EnvoyProcess, dumped_versions
from controlplane.runtime.ports import free_port, port_in_use
from controlplane.runtime.process import dying_with_parent
from controlplane.store.etcd import Store
from controlplane.xds.types import CLUSTER
from testkit.ads_client import AdsClient
from tests.support.chain import (
    GOOD,
    NEXT,
    STOP_TIMEOUT,
    Plane,
    Run,
    chain_app,
    get,
    hops,
    stop_run,
)
from tests.support.up import (
    TASKLANE,
    Up,
    assert_one_line_error,
    etcd_children,
    free_ports,
    get_json,
    launch,
    start_up,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

ONLINE = [(service, "default") for service in NEXT]
# An Envoy refused by the control plane must still not be ready after this long (a good one
# is ready in well under a second here).
REFUSED_FOR = 5.0
FAIL_FAST = 10.0  # a client refusing a TLS/plaintext mismatch answers within this


def tasklane(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TASKLANE, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def admin(port: int, path: str) -> str:
    """GET an Envoy admin path (straight to it, whatever http_proxy says)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def xds_cluster(static_resources: dict) -> dict:
    """The `xds` cluster of a bootstrap's static resources."""
    (xds,) = (c for c in static_resources["clusters"] if c["name"] == "xds")
    return xds


def xds_tls_stats(port: int) -> dict[str, int]:
    """The `xds` cluster's TLS counters of an Envoy (cluster.xds.ssl.*)."""
    stats = json.loads(admin(port, "/stats?format=json&filter=^cluster\\.xds\\.ssl\\."))["stats"]
    return {s["name"]: s["value"] for s in stats if isinstance(s.get("value"), int)}


@dataclass
class TlsPlane(Plane):
    """The chain helpers' control plane, with every `tasklane run` given the TLS dir through
    $TASKLANE_TLS_DIR (what --tls-dir defaults to)."""

    tls_dir: Path

    def env(self) -> dict[str, str]:
        return {**super().env(), pki.TLS_DIR_ENV: str(self.tls_dir)}


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TLS dir written by `tasklane tls init` (default names: localhost, 127.0.0.1, ::1)."""
    directory = tmp_path_factory.mktemp("tls") / "tls"
    made = tasklane("tls", "init", str(directory))
    assert made.returncode == 0, made.stderr
    return directory


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, tls_dir: Path) -> Iterator[TlsPlane]:
    """`tasklane up --tls-dir` with the fund-yield rules applied."""
    up = start_up(tmp_path_factory.mktemp("up"), options=["--tls-dir", str(tls_dir)])
    try:
        store = Store.connect(f"127.0.0.1:{up.ports['etcd_client']}")
    except BaseException:
        up.kill()
        raise
    running = TlsPlane(up, store, tmp_path_factory.mktemp("runs"), tls_dir)
    try:
        applied = running.tasklane("apply", "-f", str(GOOD))
        assert applied.returncode == 0, applied.stderr
        yield running
    finally:
        store.close()
        up.proc.send_signal(signal.SIGTERM)
        try:
            assert up.proc.wait(timeout=STOP_TIMEOUT) == 0
        finally:
            up.kill()


@pytest.fixture(scope="module")
def chain(plane: TlsPlane) -> Iterator[dict[tuple[str, str], Run]]:
    """One `tasklane run --tls-dir` instance of each hop's default group, registered."""
    runs = {hop: plane.launch(*hop, chain_app(*hop)) for hop in ONLINE}
    try:
        with ThreadPoolExecutor(len(runs)) as pool:
            list(pool.map(plane.registered, runs.values()))
        yield runs
    finally:
        with ThreadPoolExecutor(len(runs)) as pool:
            list(pool.map(stop_run, runs.values()))


def online_request(chain: dict[tuple[str, str], Run]) -> tuple[int, dict]:
    """GET fund-facade through the last hop's egress: it crosses every sidecar."""
    return get(chain["nav-pricing", "default"].instance.egress_port, "fund-facade", {})


# ---------------------------------------------------------------------------- the happy path


def test_status_says_xds_requires_tls(plane: TlsPlane) -> None:
    status = get_json(f"{plane.server}/api/v1/status")[1]
    assert status["xds"] == {"address": f"127.0.0.1:{plane.up.ports['xds']}", "tls": True}
    assert "xDS (TLS, client certificates required) on" in plane.up.stdout()


def test_chain_over_tls_routes_requests_and_streams_access_logs(
    plane: TlsPlane, chain: dict[tuple[str, str], Run]
) -> None:
    for run in chain.values():
        port = run.instance.admin_port
        assert admin(port, "/ready").strip() == "LIVE"
        dump = json.loads(admin(port, "/config_dump"))
        assert {"egress", "inbound"} <= set(dumped_versions(dump)["routes"]), run.service
        # The connection that brought the config is TLS, as the bootstrap says.
        (bootstrap,) = (c for c in dump["configs"] if c["@type"].endswith("BootstrapConfigDump"))
        xds = xds_cluster(bootstrap["bootstrap"]["static_resources"])
        assert xds["transport_socket"]["name"] == "envoy.transport_sockets.tls"
        assert xds_tls_stats(port)["cluster.xds.ssl.handshake"] >= 1

    def totals() -> dict:
        return get_json(f"{plane.server}/api/v1/isolation")[1]["totals"]

    wait_until(lambda: online_request(chain)[0] == 200, what="the chain answers")
    before = totals()["requests"]
    for _ in range(5):
        status, answer = online_request(chain)
        assert (status, hops(answer)) == (200, ONLINE), answer
    # Every hop's access logs came over the same TLS connection and were counted: 5 requests
    # through 3 hops, each seen by a caller's egress and a callee's inbound listener.
    wait_until(lambda: totals()["requests"] >= before + 5, what="access logs counted")


def test_gateway_over_tls_routes_a_request(
    plane: TlsPlane, chain: dict[tuple[str, str], Run], tls_dir: Path, tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    command = [*TASKLANE, "gateway", "--server", plane.server, "--port", str(port)]
    command += ["--host", "127.0.0.1", "--admin-port", str(admin_port)]
    command += ["--state-dir", str(tmp_path), "--tls-dir", str(tls_dir)]
    out = tmp_path / "gateway.out"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            dying_with_parent(command), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    try:
        wait_until(
            lambda: "tasklane gateway: listening" in out.read_text() or proc.poll() is not None,
            timeout=30,
            what="gateway ready",
        )
        assert proc.poll() is None, out.read_text()
        assert xds_tls_stats(admin_port)["cluster.xds.ssl.handshake"] >= 1
        wait_until(lambda: get(port, "fund-facade", {})[0] == 200, what="gateway routes")
        status, answer = get(port, "fund-facade", {})
        assert (status, hops(answer)) == (200, ONLINE), answer
        bootstrap = (tmp_path / f"gateway-{port}" / "bootstrap.yaml").read_text()
        assert str(tls_dir / "client.key") in bootstrap  # Envoy reads the key; the YAML names it
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT) == 0, out.read_text()
    assert not (tmp_path / f"gateway-{port}").exists()  # its state goes with it


# ---------------------------------------------------------------------------- refusals


def test_run_and_gateway_without_tls_dir_fail_fast(plane: TlsPlane, tmp_path: Path) -> None:
    """Against a TLS control plane, no Envoy is started to hang on handshakes."""
    server = ["--server", plane.server]
    for command in (
        ["run", *server, "--service", "nav-pricing", "--", "sleep", "60"],
        ["gateway", *server, "--port", str(free_port()), "--state-dir", str(tmp_path)],
    ):
        started = time.monotonic()
        done = tasklane(*command, timeout=FAIL_FAST, env=Plane.env(plane))  # no TLS dir
        assert done.returncode == 2, done.stderr
        assert time.monotonic() - started < FAIL_FAST
        assert_one_line_error(done.stderr, f"the control plane at {plane.server} serves xDS")
        assert "--tls-dir" in done.stderr
    assert not list(tmp_path.iterdir())  # the gateway wrote no bootstrap


def test_tls_dir_against_a_plaintext_control_plane_fails_fast(
    running_up: Up, tls_dir: Path
) -> None:
    server = f"http://127.0.0.1:{running_up.ports['http']}"
    env = {**os.environ, "TASKLANE_TOKEN": running_up.token}
    done = tasklane(
        "run", "--server", server, "--tls-dir", str(tls_dir), "--service", "nav-pricing",
        "--", "sleep", "60", timeout=FAIL_FAST, env=env,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert_one_line_error(
        done.stderr, f"--tls-dir is given but the control plane at {server} serves xDS in plaintext"
    )


@pytest.mark.parametrize("which", ["another tls init", "a client certificate of another CA"])
def test_run_refused_by_tls_fails_fast_naming_the_cause(
    plane: TlsPlane, tls_dir: Path, tmp_path: Path, which: str
) -> None:
    """Its Envoy is refused on every attempt: `tasklane run` says why in one line within
    seconds, instead of retrying ports its own Envoy holds for 3 x 30 s."""
    if which == "another tls init":  # trusts another CA, so it refuses the control plane
        other = tmp_path / "other"
        assert tasklane("tls", "init", str(other)).returncode == 0
        expected = "failed TLS: unknown CA (the control plane's certificate is not signed by"
    else:  # the control plane refuses the certificate
        other = tmp_path / "foreign"
        foreign_files(tls_dir, other)
        expected = "failed TLS: the control plane closed it after the handshake, refusing"
    started = time.monotonic()
    done = tasklane(
        "run", "--server", plane.server, "--tls-dir", str(other), "--service", "nav-pricing",
        "--", "sleep", "60", timeout=FAIL_FAST, env=Plane.env(plane),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < FAIL_FAST
    assert_one_line_error(done.stderr, "Envoy (admin :")
    assert f"xDS connection to 127.0.0.1:{plane.up.ports['xds']} {expected}" in done.stderr


def test_grpc_clients_without_a_good_certificate_are_refused(
    plane: TlsPlane, tls_dir: Path
) -> None:
    target = f"127.0.0.1:{plane.up.ports['xds']}"
    ca = (tls_dir / "ca.crt").read_bytes()
    good = grpc.ssl_channel_credentials(
        ca, (tls_dir / "client.key").read_bytes(), (tls_dir / "client.crt").read_bytes()
    )
    foreign = pki.issue(pki.new_ca(), "intruder", server=False)
    refused = {
        "no certificate": grpc.ssl_channel_credentials(ca),
        "another CA's certificate": grpc.ssl_channel_credentials(ca, foreign.key, foreign.cert),
        "plaintext": None,
    }

    async def probe() -> dict[str, tuple[int, grpc.StatusCode | None]]:
        # The good stream stays open while the others are refused: the server keeps serving.
        async with ads(target, good, "good") as kept:
            await kept.wait_for(lambda: kept.count(CLUSTER) > 0, timeout=10)
            results = {}
            for name, credentials in refused.items():
                async with ads(target, credentials, name) as client:
                    await client.wait_for(
                        lambda c=client: c.count(CLUSTER) > 0 or c.error is not None, timeout=10
                    )
                    results[name] = (client.count(CLUSTER), client.error.code())
            async with ads(target, good, "good again") as again:
                await again.wait_for(lambda: again.count(CLUSTER) > 0, timeout=10)
            assert kept.error is None
        return results

    results = asyncio.run(probe())
    assert results == {name: (0, grpc.StatusCode.UNAVAILABLE) for name in refused}


@contextlib.asynccontextmanager
async def ads(
    target: str, credentials: grpc.ChannelCredentials | None, name: str
) -> AsyncIterator[AdsClient]:
    """An ADS stream asking for clusters, on a channel of its own: TLS with `credentials`,
    else plaintext."""
    options = [("grpc.enable_http_proxy", 0)]
    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=options)
    else:
        channel = grpc.aio.secure_channel(target, credentials, options)
    client = AdsClient(target, f"fund-facade|default|{name}", "fund-facade", channel=channel)
    try:
        await client.start()
        client.subscribe(CLUSTER)
        yield client
    finally:
        await client.close()
        await channel.close()


def foreign_files(tls_dir: Path, directory: Path) -> pki.TlsFiles:
    """A client dir trusting the right CA but holding a certificate from another CA."""
    directory.mkdir()
    shutil.copy(tls_dir / pki.CA_CERT, directory / pki.CA_CERT)
    pair = pki.issue(pki.new_ca(), "intruder", server=False)
    (directory / pki.CLIENT_CERT).write_bytes(pair.cert)
    (directory / pki.CLIENT_KEY).write_bytes(pair.key)
    return pki.client_files(directory)


def refused_envoy(
    plane: TlsPlane, work_dir: Path, tls: pki.TlsFiles, kind: type[EnvoyProcess] = EnvoyProcess
) -> EnvoyProcess:
    """A sidecar of fund-facade|default (a role with config) with `tls`; debug logs, where
    Envoy reports TLS errors of the xDS connection."""
    return kind(
        node_id=f"fund-facade|default|{work_dir.name}",
        service="fund-facade",
        group="default",
        xds_host="127.0.0.1",
        xds_port=plane.up.ports["xds"],
        admin_port=free_port(),
        delta=False,
        work_dir=work_dir,
        log_level="debug",
        tls=tls,
    )


def assert_never_ready(envoy: EnvoyProcess) -> None:
    envoy.wait_live()
    deadline = time.monotonic() + REFUSED_FOR
    while time.monotonic() < deadline:
        assert envoy.ready_state() != "LIVE", "a refused Envoy got its config"
        time.sleep(0.1)


def test_envoy_with_another_cas_certificate_never_gets_config(
    plane: TlsPlane, tls_dir: Path, tmp_path: Path
) -> None:
    with refused_envoy(plane, tmp_path / "foreign", foreign_files(tls_dir, tmp_path / "f")) as e:
        assert_never_ready(e)
        log = e.log_path.read_text()
    assert re.search(r"remote address:127\.0\.0\.1:\d+,TLS_error:", log), log[-2000:]
    assert "gRPC config stream to xds closed" in log


class _MisnamedEnvoy(EnvoyProcess):
    """Dials the control plane at 127.0.0.1 but expects its certificate to name another
    host: what a sidecar sees when a different server answers at that address."""

    def render(self) -> str:
        doc = yaml.safe_load(super().render())
        tls = xds_cluster(doc["static_resources"])["transport_socket"]["typed_config"]
        tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] = [
            {"san_type": "DNS", "matcher": {"exact": "elsewhere.example"}}
        ]
        return yaml.safe_dump(doc)


def test_envoy_checks_the_control_planes_name(
    plane: TlsPlane, tls_dir: Path, tmp_path: Path
) -> None:
    tls = pki.client_files(tls_dir)
    with refused_envoy(plane, tmp_path / "misnamed", tls, _MisnamedEnvoy) as envoy:
        assert_never_ready(envoy)
        stats = xds_tls_stats(envoy.admin_port)
        log = envoy.log_path.read_text()
    assert stats["cluster.xds.ssl.fail_verify_san"] >= 1
    assert stats["cluster.xds.ssl.handshake"] == 0
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-2000:]


# ---------------------------------------------------------------------------- files and errors


def test_tls_init_writes_private_keys_and_refuses_to_overwrite(tls_dir: Path) -> None:
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tls_dir.iterdir()}
    assert {name: mode for name, mode in modes.items() if name.endswith(".key")} == {
        "ca.key": 0o600, "server.key": 0o600, "client.key": 0o600,
    }  # fmt: skip
    ca = (tls_dir / "ca.crt").read_bytes()
    again = tasklane("tls", "init", str(tls_dir))
    assert again.returncode == 2
    assert_one_line_error(again.stderr, f"{tls_dir / 'ca.crt'} exists: not overwriting a CA")
    assert (tls_dir / "ca.crt").read_bytes() == ca


def handshake(port: int, directory: Path, name: str) -> None:
    """A TLS handshake with the xDS port as a sidecar makes it (DIR's client certificate, h2),
    checking that the server's certificate names `name`; ssl.SSLError otherwise."""
    context = ssl.create_default_context(cafile=directory / "ca.crt")
    context.load_cert_chain(directory / "client.crt", directory / "client.key")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=name) as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"


def test_tls_init_host_adds_a_name_to_an_existing_ca(tmp_path: Path) -> None:
    """A new server certificate from the same CA: the CA and the clients' files stay, the
    control plane then answers a handshake for the new name (and the old ones), and `tasklane
    status` says xDS is on TLS."""
    directory = tmp_path / "tls"
    assert tasklane("tls", "init", str(directory)).returncode == 0
    kept = {
        n: (directory / n).read_bytes() for n in ("ca.crt", "ca.key", "client.crt", "client.key")
    }
    server = (directory / "server.crt").read_bytes()
    added = tasklane(
        "tls", "init", str(directory), "--host", "cp.example.test", "--host", "10.9.8.7"
    )
    assert added.returncode == 0, added.stderr
    assert "localhost, 127.0.0.1, ::1, cp.example.test, 10.9.8.7" in added.stdout
    assert {n: (directory / n).read_bytes() for n in kept} == kept
    assert (directory / "server.crt").read_bytes() != server
    assert stat.S_IMODE((directory / "server.key").stat().st_mode) == 0o600
    up = start_up(tmp_path, options=["--tls-dir", str(directory)])
    try:
        for name in ("cp.example.test", "10.9.8.7", "localhost", "127.0.0.1"):
            handshake(up.ports["xds"], directory, name)
        with pytest.raises(ssl.SSLCertVerificationError, match="other.example.test"):
            handshake(up.ports["xds"], directory, "other.example.test")
        status = tasklane("status", "--server", up.url(""))
        assert status.returncode == 0, status.stderr
        assert f"xDS 127.0.0.1:{up.ports['xds']} (TLS), leader " in status.stdout.splitlines()[0]
    finally:
        up.kill()


def test_up_with_a_missing_file_fails_with_one_line_and_starts_nothing(
    tls_dir: Path, tmp_path: Path
) -> None:
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in (pki.CA_CERT, pki.SERVER_CERT):
        shutil.copy(tls_dir / name, incomplete / name)
    ports = free_ports()
    up = launch(TASKLANE, tmp_path, ports, options=["--tls-dir", str(incomplete)])
    assert up.proc.wait(timeout=30) == 2
    assert_one_line_error(up.stderr(), f"--tls-dir {incomplete}: server.key missing")
    assert up.stdout() == ""
    assert not up.state_dir.exists()  # no token, no etcd data
    assert etcd_children(up.proc.pid) == []
    assert not any(port_in_use(port) for port in ports.values())


# ---------------------------------------------------------------------------- no secrets


def test_no_key_material_in_logs_or_outputs(
    plane: TlsPlane, chain: dict[tuple[str, str], Run], tls_dir: Path
) -> None:
    assert online_request(chain)[0] == 200  # something to log
    bodies = [
        "".join((tls_dir / name).read_text().splitlines()[1:-1])
        for name in (pki.CA_KEY, pki.SERVER_KEY, pki.CLIENT_KEY)
    ]
    texts = {
        "up stdout": plane.up.stdout(),
        "up stderr": plane.up.stderr(),
        **{run.err.name: run.stderr() for run in chain.values()},
    }
    for kind in ("services", "taskchains", "tasks"):
        got = plane.tasklane("get", kind, "-o", "yaml")
        assert got.returncode == 0, got.stderr
        texts[f"get {kind}"] = got.stdout + got.stderr
    status = plane.tasklane("status")
    texts["status"] = status.stdout + status.stderr
    texts["api status"] = json.dumps(get_json(f"{plane.server}/api/v1/status")[1])
    for where, text in texts.items():
        flat = "".join(text.split())
        assert "PRIVATE KEY" not in text, where
        for body in bodies:
            # Any 40-character run of a key's base64 body would be a leak.
            assert not any(body[i : i + 40] in flat for i in range(0, len(body) - 40, 20)), where
