"""The ingress gateway in front of a real mesh: an untrusted caller's dyes (the header, custom
chain headers, the baggage members) are gone before the first hop, so online traffic stays in
`default` at every hop; a trusted caller (by source address, or by the shared secret) keeps
them and is served by the task groups; the secret header never reaches an app. The dye names
come from the control plane (ECDS): a chain applied while the gateway runs is stripped too.

The test process connects from 127.0.0.1: a gateway trusting 10.0.0.0/8 sees an outsider, one
trusting 127.0.0.0/8 an insider. The gateway Envoy is started by controlplane.runtime.gateway
against the test's ADS server, and once by the `tasklane gateway` command against a stand-in
of the control plane's HTTP API, so no etcd is needed."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controlplane.runtime.gateway import GatewayEnvoy, Trust
from controlplane.runtime.ports import free_port
from controlplane.xds.names import BAGGAGE_DYE_HEADER
from tests.support import rules
from tests.support.echo_app import start_echo
from tests.support.grpc_app import call, dial, grpc_chain_app
from tests.support.mesh import Mesh, request, served_by
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

RULES = (
    rules.service("front")
    + rules.service("back")
    + rules.service("echo")
    + rules.service("pricing-grpc", protocol="grpc")
    + rules.chain(
        "fund-yield",
        "[{service: front, group: task}, {service: back, group: task},"
        " {service: echo, group: task}, {service: pricing-grpc, group: task}]",
        dye="{values: [fund-yield]}",
    )
    + rules.chain(
        "nightly",
        "[{service: echo, group: task}]",
        dye="{header: x-batch-dye, baggageKey: batch-dye, values: [nightly]}",
    )
)

# A chain applied while the gateways run, with a dye header and baggage key of its own.
LATE_CHAIN = rules.chain(
    "late",
    "[{service: echo, group: task}]",
    dye="{header: x-late-dye, baggageKey: late-dye, values: [late]}",
)

SECRET_HEADER = "x-tasklane-trust"
SECRET = "s3cret-Token_42"
DYED = {"x-task-dye": "fund-yield"}
ALL_TASK = [("front", "task"), ("back", "task")]
ALL_DEFAULT = [("front", "default"), ("back", "default")]
WARM_UP_S = 10.0


# --- the mesh and its gateways ---------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """front -> back (chain apps), echo (says which headers arrived), pricing-grpc (gRPC)."""
    with Mesh(tmp_path_factory.mktemp("gateway-mesh"), RULES) as mesh:
        for group in ("default", "task"):
            mesh.add("back", group)
            mesh.add("front", group, ["back"])
            mesh.add("echo", group, start_app=lambda name, egress: start_echo(name))
            mesh.add("pricing-grpc", group, start_app=grpc_chain_app("pricing-grpc", group))
        yield mesh
        assert mesh.nacks() == {}


@contextmanager
def running_gateway(
    mesh: Mesh, work_dir: Path, cidrs: tuple[str, ...] = (), secret: bool = True
) -> Iterator[GatewayEnvoy]:
    """A gateway Envoy on a free port, trusting `cidrs` and (with `secret`) SECRET."""
    secret_file = None
    if secret:
        secret_file = work_dir / "secret"
        secret_file.write_text(SECRET + "\n")
    trust = Trust.build(cidrs, SECRET_HEADER if secret else None, secret_file)
    port = free_port()
    envoy = GatewayEnvoy(
        node_id=f"gateway-{port}",
        listen_host="127.0.0.1",
        port=port,
        trust=trust,
        xds_host="127.0.0.1",
        xds_port=mesh.ads.port,
        admin_port=free_port(),
        delta=mesh.delta,
        work_dir=work_dir / "envoy",
    )
    with envoy:
        envoy.wait_ready()
        _wait_until_served(port, {SECRET_HEADER: SECRET} if secret or cidrs else None)
        yield envoy
        assert mesh.nacks() == {}  # while the gateway is still connected


def _wait_until_served(port: int, trusted: dict[str, str] | None) -> None:
    """Envoy health-checks each endpoint before sending it requests: wait until every group
    answers through this gateway (task groups only when some way to trust is there)."""
    variants = [{}] if trusted is None else [{}, {**DYED, **trusted}]
    deadline = time.monotonic() + WARM_UP_S
    for headers in variants:
        for service in ("front", "echo"):
            while request(port, service, headers=headers)[0] != 200:
                assert time.monotonic() < deadline, f"{service} not served through the gateway"
                time.sleep(0.1)


@pytest.fixture(scope="module")
def outside(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of a gateway that trusts 10.0.0.0/8 (not us) and the shared secret."""
    with running_gateway(mesh, tmp_path_factory.mktemp("gw-out"), ("10.0.0.0/8",)) as gw:
        yield gw.port


@pytest.fixture(scope="module")
def inside(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Port of a gateway that trusts 127.0.0.0/8, where the test connects from."""
    trusted = ("10.0.0.0/8", "127.0.0.0/8")
    with running_gateway(mesh, tmp_path_factory.mktemp("gw-in"), trusted) as gw:
        yield gw.port


def _echo(port: int, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(group that served, headers the echo app received) of one request through `port`."""
    status, answer = request(port, "echo", headers=headers)
    assert status == 200, answer
    return answer["name"].split("/")[1], answer["headers"]


def _get_echo(port: int, headers: Sequence[tuple[str, str]]) -> dict:
    """The echo app's answer to a request whose headers may repeat (a dict cannot)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", "/", skip_host=True)
        for name, value in (("Host", "echo"), *headers):
            conn.putheader(name, value)
        conn.endheaders()
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _members(baggage: str) -> list[str]:
    return [member.strip() for member in baggage.split(",")]


# --- untrusted callers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        DYED,
        {"baggage": "a=1,task-dye=fund-yield"},
        {"baggage": "a=1,\ttask-dye = fund-yield ;p=1"},  # routes as a dye too: must go
        {**DYED, "baggage": "task-dye=fund-yield"},
    ],
    ids=["header", "baggage", "baggage-spaced", "both"],
)
def test_untrusted_dyes_are_served_by_default_at_every_hop(
    outside: int, headers: dict[str, str]
) -> None:
    status, answer = request(outside, "front", headers=headers)
    assert status == 200, answer
    assert served_by(answer) == ALL_DEFAULT
    assert [hop["dye"] for hop in answer["hops"]] == [None, None]


def test_untrusted_baggage_loses_only_the_dye_members(outside: int) -> None:
    group, seen = _echo(
        outside,
        {
            **DYED,
            "x-batch-dye": "nightly",  # a chain's own header name, learnt from the rules
            "baggage": "a=1, task-dye=fund-yield,b=2;prop=x , batch-dye=nightly",
        },
    )
    assert group == "default"
    assert "x-task-dye" not in seen and "x-batch-dye" not in seen
    assert _members(seen["baggage"]) == ["a=1", "b=2;prop=x"]


def test_a_chain_applied_after_the_gateway_started_has_its_dyes_stripped(
    mesh: Mesh, outside: int
) -> None:
    late = {"x-late-dye": "late"}
    mesh.set_rules(RULES + LATE_CHAIN)
    try:
        # Once a trusted caller's new dye is routed to the task group, the chain is in force.
        wait_until(
            lambda: _echo(outside, {**late, SECRET_HEADER: SECRET})[0] == "task",
            WARM_UP_S,
            "the new chain routes a trusted caller's dye",
        )
        group, seen = _echo(outside, {**late, "baggage": "a=1,late-dye=late"})
        assert group == "default" and "x-late-dye" not in seen
        assert seen["baggage"] == "a=1"
    finally:
        mesh.set_rules(RULES)


def test_untrusted_baggage_of_dyes_only_is_removed(outside: int) -> None:
    group, seen = _echo(outside, {"baggage": "task-dye=fund-yield"})
    assert group == "default" and "baggage" not in seen


def test_baggage_without_dyes_passes_untouched(outside: int) -> None:
    assert _echo(outside, {"baggage": "a=1 ,b=2"})[1]["baggage"] == "a=1 ,b=2"


def test_every_baggage_header_is_cleaned(outside: int) -> None:
    """Repeated `baggage` headers form one list (RFC 9110); a dye in the second one counts."""
    answer = _get_echo(outside, [("baggage", "a=1"), ("baggage", "task-dye=fund-yield")])
    assert answer["name"].startswith("echo/default/")
    assert _members(answer["headers"]["baggage"]) == ["a=1"]


@pytest.mark.parametrize("secret", ["wrong", SECRET + "x", SECRET.lower(), ""])
def test_a_wrong_secret_is_untrusted_and_never_forwarded(outside: int, secret: str) -> None:
    status, answer = request(outside, "front", headers={**DYED, SECRET_HEADER: secret})
    assert served_by(answer) == ALL_DEFAULT, (status, answer)
    group, seen = _echo(outside, {**DYED, SECRET_HEADER: secret})
    assert group == "default" and SECRET_HEADER not in seen and "x-task-dye" not in seen


def test_the_right_secret_keeps_the_dye_and_is_not_forwarded(outside: int) -> None:
    status, answer = request(outside, "front", headers={**DYED, SECRET_HEADER: SECRET})
    assert status == 200, answer
    assert served_by(answer) == ALL_TASK
    assert [hop["dye"] for hop in answer["hops"]] == ["fund-yield", "fund-yield"]
    group, seen = _echo(outside, {"baggage": "a=1,task-dye=fund-yield", SECRET_HEADER: SECRET})
    assert group == "task" and SECRET_HEADER not in seen
    assert _members(seen["baggage"]) == ["a=1", "task-dye=fund-yield"]


def test_a_repeated_secret_header_is_untrusted(outside: int) -> None:
    answer = _get_echo(outside, [*DYED.items(), (SECRET_HEADER, SECRET), (SECRET_HEADER, SECRET)])
    assert answer["name"].startswith("echo/default/")
    assert SECRET_HEADER not in answer["headers"]


# --- trusted callers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [DYED, {"baggage": "a=1,task-dye=fund-yield"}], ids=["header", "baggage"]
)
def test_trusted_source_keeps_dyes_at_every_hop(inside: int, headers: dict[str, str]) -> None:
    status, answer = request(inside, "front", headers=headers)
    assert status == 200, answer
    assert served_by(answer) == ALL_TASK
    assert [hop["dye"] for hop in answer["hops"]] == ["fund-yield", "fund-yield"]


def test_trusted_source_keeps_custom_dyes_and_still_drops_the_secret(inside: int) -> None:
    group, seen = _echo(inside, {"x-batch-dye": "nightly", SECRET_HEADER: "anything"})
    assert group == "task" and seen["x-batch-dye"] == "nightly"
    assert SECRET_HEADER not in seen


def test_trusted_source_online_traffic_stays_online(inside: int) -> None:
    status, answer = request(inside, "front")
    assert status == 200 and served_by(answer) == ALL_DEFAULT


@pytest.mark.parametrize("gateway", ["outside", "inside"])
def test_the_baggage_filters_header_is_never_a_callers(
    request: pytest.FixtureRequest, gateway: str
) -> None:
    """x-tasklane-baggage-dye is the gateway's own reading of `baggage`: sent by any caller,
    trusted or not, it routes nothing and goes no further."""
    port = request.getfixturevalue(gateway)
    group, seen = _echo(port, {BAGGAGE_DYE_HEADER: "task-dye=fund-yield"})
    assert group == "default" and BAGGAGE_DYE_HEADER not in seen, seen


# --- gRPC, and a gateway with no trust at all ------------------------------------------------


def test_grpc_dye_metadata_is_stripped_unless_trusted(outside: int) -> None:
    """The Lua filter works on HTTP/2 too: gRPC metadata are headers."""
    with dial(("127.0.0.1", outside), "pricing-grpc") as channel:
        untrusted = call(channel, [("x-task-dye", "fund-yield"), (SECRET_HEADER, "wrong")])
        trusted = call(channel, [("x-task-dye", "fund-yield"), (SECRET_HEADER, SECRET)])
    assert served_by(untrusted) == [("pricing-grpc", "default")]
    assert untrusted["hops"][0]["dye"] is None
    assert SECRET_HEADER not in untrusted["hops"][0]["metadata"]
    assert served_by(trusted) == [("pricing-grpc", "task")]
    assert SECRET_HEADER not in trusted["hops"][0]["metadata"]


def test_gateway_without_trust_strips_every_dye(mesh: Mesh, tmp_path: Path) -> None:
    with running_gateway(mesh, tmp_path, secret=False) as gw:
        group, seen = _echo(gw.port, {**DYED, SECRET_HEADER: SECRET, "baggage": "task-dye=x,a=1"})
        assert group == "default" and "x-task-dye" not in seen
        assert seen["baggage"] == "a=1"
        assert seen[SECRET_HEADER] == SECRET  # no secret configured: just another header
        assert "filter_chains" not in _listener(gw)


def _listener(gw: GatewayEnvoy) -> dict:
    dump = gw.config_dump(include_eds=False)
    for section in dump["configs"]:
        for entry in section.get("static_listeners", []):
            if entry["listener"]["name"] == "gateway":
                return entry["listener"]
    raise AssertionError("no gateway listener in the config dump")


# --- `tasklane gateway` ----------------------------------------------------------------------


@contextmanager
def fake_api(mesh: Mesh) -> Iterator[str]:
    """A stand-in for the control plane's HTTP API: status (with the test's ADS address),
    which is all `tasklane gateway` asks."""
    routes = {"/api/v1/status": {"xds": {"address": f"127.0.0.1:{mesh.ads.port}"}}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            found = self.path in routes
            body = json.dumps(routes[self.path] if found else {"error": "not found"}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Silent."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _tasklane(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controlplane", "gateway", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The first stdout line (the ready line), read without blocking past `timeout`."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not (lines and lines[0]):
        proc.kill()
        pytest.fail(f"no ready line; stderr: {proc.communicate(timeout=10)[1]}")
    return lines[0]


def test_cli_gateway_serves_until_sigterm(mesh: Mesh, tmp_path: Path) -> None:
    """On 127.0.0.1 unless told (like `tasklane up`), and its state goes when it stops."""
    port = free_port()
    (tmp_path / "secret").write_text(SECRET)
    with fake_api(mesh) as server:
        down = f"http://127.0.0.1:{free_port()}"  # a replica that is down is left out
        proc = _tasklane(
            "--port", str(port), "--server", f"{down},{server}",
            "--trusted-cidr", "10.0.0.0/8", "--trust-header", SECRET_HEADER,
            "--trust-secret-file", str(tmp_path / "secret"), "--state-dir", str(tmp_path / "state"),
            cwd=tmp_path,
        )  # fmt: skip
        try:
            ready = _first_line(proc)
            assert f"127.0.0.1:{port}" in ready and "loses the dyes of every chain" in ready
            assert f"xDS at 127.0.0.1:{mesh.ads.port}, admin" in ready
            _wait_until_served(port, {SECRET_HEADER: SECRET})
            assert _echo(port, {"x-batch-dye": "nightly"})[0] == "default"
            assert _echo(port, {"x-batch-dye": "nightly", SECRET_HEADER: SECRET})[0] == "task"
            bootstrap = tmp_path / "state" / f"gateway-{port}" / "bootstrap.yaml"
            assert bootstrap.parent.stat().st_mode & 0o077 == 0  # it holds the secret
            admin = int(ready.split("admin on 127.0.0.1:")[1].split(";")[0])
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            url = f"http://127.0.0.1:{admin}/listeners?format=json"
            with direct.open(url, timeout=10) as answer:
                listeners = json.loads(answer.read())["listener_statuses"]
            bound = [x["local_address"]["socket_address"] for x in listeners]
            assert bound == [{"address": "127.0.0.1", "port_value": port}], bound
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
    assert code == 0, proc.stderr.read()
    assert list((tmp_path / "state").iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trust-header", "x-t"], "--trust-header and --trust-secret-file go together"),
        (["--trusted-cidr", "10.0.0.0/33"], "--trusted-cidr '10.0.0.0/33'"),
        (["--trust-header", "x-task-dye", "--trust-secret-file", "{secret}"], "the mesh itself"),
        (["--trust-header", "x-t", "--trust-secret-file", "{missing}"], "cannot read"),
        (["--server", "http://127.0.0.1:1"], "cannot reach the control plane"),
    ],
)
def test_cli_gateway_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "secret").write_text(SECRET)
    paths = {"secret": str(tmp_path / "secret"), "missing": str(tmp_path / "missing")}
    args = [arg.format(**paths) for arg in args]
    server = [] if "--server" in args else ["--server", "http://127.0.0.1:1"]
    proc = _tasklane("--port", str(free_port()), *server, *args, cwd=tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("tasklane: error: ") and message in err, err


def test_cli_gateway_fails_on_a_busy_port(mesh: Mesh, tmp_path: Path) -> None:
    with fake_api(mesh) as server, _listening() as busy:
        proc = _tasklane("--port", str(busy), "--host", "127.0.0.1", "--server", server,
                         "--state-dir", str(tmp_path), cwd=tmp_path)  # fmt: skip
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, (out, err)
    assert err.count("\n") == 1 and f"127.0.0.1:{busy}: Address already in use" in err, err


@contextmanager
def _listening() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]
