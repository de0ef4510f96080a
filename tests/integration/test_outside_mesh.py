"""Calls to hosts outside the mesh through a real sidecar's egress listener, as an app makes
them with `http_proxy`/`https_proxy`: plain HTTP and HTTPS (a CONNECT tunnel) to local servers
that are no service of the mesh, under ALLOW_ANY and REGISTRY_ONLY, and how the access-log
accounting and the metrics count them."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from controlplane import pki
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.gateway import GatewayEnvoy, Trust
from controlplane.runtime.ports import free_port
from controlplane.xds.names import HEALTH_PATH, REGISTRY_ONLY
from demo.chain_app import serve_in_thread
from tests.support.echo_app import EchoHandler, make_server
from tests.support.mesh import Mesh, request, served_by
from tests.support.rules import service
from tests.support.up import TASKLANE, Up, assert_one_line_error
from tests.support.wait import wait_until

RULES = service("caller")
# A name, not an address: the sidecar resolves it as the app would (/etc/hosts).
OUTSIDE_HOST = "localhost"


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[dict]:
    """Two servers that are no service of the mesh: plain HTTP, and HTTPS with a certificate
    made here; with the CA a client trusts and the number of requests each one received."""
    pki.init_dir(tmp_path / "tls", hosts=(OUTSIDE_HOST,))
    files = pki.server_files(tmp_path / "tls")
    hits: Counter[str] = Counter()

    class Counted(EchoHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            hits[self.server.app_name] += 1  # type: ignore[attr-defined]
            super().do_GET()

    plain = make_server("outside-http")
    tls = make_server("outside-https")
    plain.RequestHandlerClass = tls.RequestHandlerClass = Counted
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    tls.socket = context.wrap_socket(tls.socket, server_side=True)
    http_port, stop_http = serve_in_thread(plain)
    https_port, stop_https = serve_in_thread(tls)
    try:
        yield {"http": http_port, "https": https_port, "ca": files.ca, "hits": hits}
    finally:
        stop_http()
        stop_https()


def through_proxy(egress_port: int, url: str, ca: Path | None = None) -> tuple[int, str]:
    """GET `url` the way an app with http_proxy and https_proxy set does (urllib: absolute
    URL for http, a CONNECT tunnel for https); returns (status, body)."""
    proxy = f"http://127.0.0.1:{egress_port}"
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": proxy, "https": proxy}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)),
    )
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def connect(egress_port: int, authority: str) -> tuple[int, str]:
    """A bare CONNECT to the egress listener; returns the answer's (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", egress_port, timeout=10)
    try:
        conn.request("CONNECT", authority, headers={"Host": authority})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@contextmanager
def running_gateway(mesh: Mesh, work_dir: Path) -> Iterator[int]:
    """The port of an ingress gateway of the mesh (trusting no one), once it serves."""
    port = free_port()
    gateway = GatewayEnvoy(
        node_id=f"gateway-{port}",
        listen_host="127.0.0.1",
        port=port,
        trust=Trust.build((), None, None),
        xds_host="127.0.0.1",
        xds_port=mesh.ads.port,
        admin_port=free_port(),
        delta=mesh.delta,
        work_dir=work_dir,
    )
    with gateway:
        gateway.wait_ready()
        wait_until(lambda: get(port, "caller")[0] == 200, what="the gateway serves caller")
        yield port


def get(port: int, host: str) -> tuple[int, str]:
    """GET / with `Host: host` (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def mesh_still_routes(egress_port: int) -> None:
    """A service of the mesh is reached through the same listener as before (once its first
    health check passed)."""
    wait_until(
        lambda: served_by(request(egress_port, "caller")[1]) == [("caller", "default")],
        what="caller reached through the mesh",
    )


def outside_row(mesh: Mesh) -> dict:
    rows = mesh.isolation()["outside_mesh"]
    return rows[0] if rows else {}


def test_allow_any_passes_http_and_https_through_and_counts_them_outside_the_mesh(
    tmp_path: Path, outside: dict
) -> None:
    with Mesh(tmp_path, RULES) as mesh:
        caller = mesh.add("caller", "default")
        port = caller.egress_port

        status, body = through_proxy(
            port, f"http://{OUTSIDE_HOST}:{outside['http']}/x", outside["ca"]
        )
        assert status == 200, body
        assert json.loads(body)["name"] == "outside-http"
        status, body = through_proxy(
            port, f"https://{OUTSIDE_HOST}:{outside['https']}/y", outside["ca"]
        )
        assert status == 200, body
        answer = json.loads(body)
        assert (answer["name"], answer["path"]) == ("outside-https", "/y")
        assert outside["hits"] == {"outside-http": 1, "outside-https": 1}

        mesh_still_routes(port)

        wait_until(lambda: outside_row(mesh).get("requests") == 2, what="2 calls outside")
        isolation = mesh.isolation()
        assert outside_row(mesh) | {"rate": 0, "last_at": 0} == {
            "service": "caller",
            "group": "default",
            "requests": 2,
            "refused": 0,
            "errors_5xx": 0,
            "rate": 0,
            "last_at": 0,
        }
        assert (isolation["totals"]["outside_mesh"], isolation["totals"]["leaks"]) == (2, 0)
        assert "(unknown)" not in isolation["online"]  # no unknown service's errors
        assert (
            'tasklane_outside_mesh_requests_total{group="default",service="caller"} 2.0'
            in mesh.metrics_text()
        )

        # The gateway shares the services' routes but must not open the mesh's way out to
        # callers from outside: a host outside the mesh stays a 404 there.
        with running_gateway(mesh, tmp_path / "gateway") as gateway:
            status, body = get(gateway, f"{OUTSIDE_HOST}:{outside['http']}")
            assert status == 404, body
        assert outside["hits"]["outside-http"] == 1


def test_a_call_back_to_the_egress_itself_stops_at_once(tmp_path: Path) -> None:
    """Passed through to its own address, a request would come back to the sidecar, again
    and again (measured: ~1,000 connections until the 15 s route timeout)."""
    with Mesh(tmp_path, RULES) as mesh:
        caller = mesh.add("caller", "default")
        port = caller.egress_port
        status, body = through_proxy(port, f"http://127.0.0.1:{port}/")
        assert (status, body) == (
            508,
            f"tasklane: 127.0.0.1:{port} leads back to this sidecar's egress listener\n",
        )
        stats = caller.envoy.admin_get("/stats?filter=^http.egress.downstream_rq_total$")
        assert stats.strip() == "http.egress.downstream_rq_total: 2"  # the call and its echo


def test_registry_only_refuses_hosts_outside_the_mesh_with_a_reason(
    tmp_path: Path, outside: dict
) -> None:
    with Mesh(tmp_path, RULES, outbound_policy=REGISTRY_ONLY) as mesh:
        caller = mesh.add("caller", "default")
        port = caller.egress_port
        authority = f"{OUTSIDE_HOST}:{outside['http']}"
        reason = f"{authority} is no service of the mesh, and the outbound traffic policy is "

        status, body = through_proxy(port, f"http://{authority}/x", outside["ca"])
        assert (status, body) == (502, f"tasklane: {reason}{REGISTRY_ONLY}\n")
        tunnel = f"{OUTSIDE_HOST}:{outside['https']}"
        status, body = connect(port, tunnel)
        assert status == 502 and f"tasklane: {tunnel} is no service" in body, body
        with pytest.raises(OSError, match="Tunnel connection failed: 502"):
            through_proxy(port, f"https://{tunnel}/y", outside["ca"])
        assert outside["hits"] == {}  # refused at the sidecar

        mesh_still_routes(port)

        wait_until(lambda: outside_row(mesh).get("refused") == 3, what="3 refused calls")
        row = outside_row(mesh)
        assert (row["service"], row["requests"], row["errors_5xx"]) == ("caller", 3, 0)
        isolation = mesh.isolation()
        assert (isolation["totals"]["outside_mesh_refused"], isolation["totals"]["leaks"]) == (3, 0)
        assert "(unknown)" not in isolation["online"]
        assert (
            'tasklane_outside_mesh_refused_total{group="default",service="caller"} 3.0'
            in mesh.metrics_text()
        )


@pytest.mark.parametrize(
    "running_up", [["--outbound-traffic-policy", REGISTRY_ONLY]], indirect=True
)
def test_tasklane_up_outbound_traffic_policy_reaches_the_sidecars(
    running_up: Up, tmp_path: Path, outside: dict
) -> None:
    apply = urllib.request.Request(
        running_up.url("/api/v1/apply"),
        data=json.dumps({"files": [{"name": "rules.yaml", "text": RULES}]}).encode(),
        headers={"Authorization": f"Bearer {running_up.token}"},
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(apply, timeout=10):
        pass
    egress_port = free_port()
    sidecar = EnvoyProcess(
        node_id="caller|default|test",
        service="caller",
        group="default",
        xds_host="127.0.0.1",
        xds_port=running_up.ports["xds"],
        admin_port=free_port(),
        delta=False,
        work_dir=tmp_path / "sidecar",
        parts={
            "sidecar.yaml": {
                "egress_port": egress_port,
                "inbound_host": "127.0.0.1",
                "inbound_port": free_port(),
                "app_port": free_port(),
                "health_path": HEALTH_PATH,
            }
        },
    )
    with sidecar:
        sidecar.wait_ready()
        authority = f"{OUTSIDE_HOST}:{outside['http']}"
        status, body = through_proxy(egress_port, f"http://{authority}/", outside["ca"])
        assert (status, body) == (
            502,
            f"tasklane: {authority} is no service of the mesh, and the outbound traffic "
            f"policy is {REGISTRY_ONLY}\n",
        )


def test_tasklane_up_refuses_an_unknown_policy_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = subprocess.run(
        [*TASKLANE, "up", "--state-dir", str(state), "--outbound-traffic-policy", "allow_any"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert_one_line_error(done.stderr, "--outbound-traffic-policy 'allow_any' is not one of")
    assert "ALLOW_ANY, REGISTRY_ONLY" in done.stderr
    assert not state.exists()  # nothing started, nothing written
