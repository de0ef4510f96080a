"""Real Envoy binaries: the ADS-only bootstrap validates, and EnvoyProcess starts, reports its
state, fails loudly, never outlives its parent and never shares a port with another sidecar
(that one test needs a control plane: listeners bind once the config arrived)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from controlplane.errors import RuntimeFailure
from controlplane.runtime.envoy import (
    EnvoyProcess,
    dumped_versions,
    envoy_binary,
    parse_stats,
    parse_text_readouts,
    render_bootstrap,
)
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.ports import free_port
from controlplane.runtime.process import stop_process
from tests.support.echo_app import start_echo
from tests.support.plane import Plane
from tests.support.procs import gone, wait_gone
from tests.support.rules import service

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


def _sidecar(tmp_path: Path, **overrides: object) -> EnvoyProcess:
    settings: dict = dict(
        node_id="fund-facade|task|test",
        service="fund-facade",
        group="task",
        xds_host="127.0.0.1",
        xds_port=free_port(),  # nothing listens there
        admin_port=free_port(),
        delta=False,
        work_dir=tmp_path / "envoy",
    )
    settings.update(overrides)
    return EnvoyProcess(**settings)


def _validate(tmp_path: Path, text: str) -> str:
    """Envoy's validate mode on a bootstrap: its output, after asserting it passed."""
    path = tmp_path / "bootstrap.yaml"
    path.write_text(text)
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


@pytest.mark.parametrize(
    ("delta", "xds_host", "api_type", "cluster_type"),
    [
        (False, "127.0.0.1", "GRPC", "STATIC"),
        (True, "127.0.0.1", "DELTA_GRPC", "STATIC"),
        (False, "localhost", "GRPC", "STRICT_DNS"),
    ],
)
def test_bootstrap_passes_envoy_validate(
    tmp_path: Path, delta: bool, xds_host: str, api_type: str, cluster_type: str
) -> None:
    text = render_bootstrap(
        node_id='odd "id"|task|1',
        service="fund-facade",
        group="task",
        xds_host=xds_host,
        xds_port=18000,
        admin_port=15000,
        delta=delta,
    )
    doc = yaml.safe_load(text)
    assert doc["node"]["id"] == 'odd "id"|task|1'
    assert doc["node"]["metadata"] == {"tasklane.service": "fund-facade", "tasklane.group": "task"}
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == api_type
    assert doc["static_resources"]["clusters"][0]["type"] == cluster_type

    output = _validate(tmp_path, text)
    assert "OK" in output
    assert "warning" not in output  # e.g. the unbounded-connections warning stays silenced


@pytest.mark.parametrize(
    ("more_xds", "cluster_type"),
    [
        ((("127.0.0.2", 18001),), "STATIC"),
        ((("localhost", 18000), ("127.0.0.1", 18000)), "STRICT_DNS"),
    ],
)
def test_bootstrap_with_replicas_passes_envoy_validate(
    tmp_path: Path, more_xds: tuple[tuple[str, int], ...], cluster_type: str
) -> None:
    """Every control plane replica is an endpoint of the `xds` cluster (a repeated one once),
    picked at random per stream and ejected at its first refused connection."""
    text = render_bootstrap(
        node_id="fund-facade|task|1",
        service="fund-facade",
        group="task",
        xds_host="127.0.0.1",
        xds_port=18000,
        admin_port=15000,
        delta=False,
        more_xds=more_xds,
    )
    (xds,) = yaml.safe_load(text)["static_resources"]["clusters"]
    assert (xds["type"], xds["lb_policy"]) == (cluster_type, "RANDOM")
    assert xds["outlier_detection"]["consecutive_local_origin_failure"] == 1
    (locality,) = xds["load_assignment"]["endpoints"]
    dialled = [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]]
    expected = dict.fromkeys([("127.0.0.1", 18000), *more_xds])
    assert [(a["address"], a["port_value"]) for a in dialled] == list(expected)
    output = _validate(tmp_path, text)
    assert "OK" in output and "warning" not in output


def test_envoy_without_control_plane_is_live_but_not_ready(tmp_path: Path) -> None:
    envoy = _sidecar(tmp_path)
    with envoy:
        pid = envoy.pid
        assert pid is not None
        state = envoy.wait_live(timeout=15)
        assert state in ("PRE_INITIALIZING", "INITIALIZING")
        with pytest.raises(RuntimeFailure, match="not ready"):
            envoy.wait_ready(timeout=0.5)
        assert envoy.ready_state() != "LIVE"

        dump = envoy.config_dump()
        bootstrap = dump["configs"][0]["bootstrap"]
        assert bootstrap["node"]["id"] == "fund-facade|task|test"
        assert dumped_versions(dump) == {
            "clusters": {},
            "listeners": {},
            "routes": {},
            "endpoints": {},
        }
        stats = envoy.stats()
        assert stats["cluster.xds.membership_total"] == 1
        assert all(isinstance(value, int) for value in stats.values())
        assert envoy.text_readouts()["listener_manager.lds.version_text"] == ""
        assert envoy.versions()["clusters"] == {}
        assert envoy.admin_get("/server_info")
    assert wait_gone(pid, timeout=1)
    assert envoy.running() is False


def test_delta_envoy_is_live(tmp_path: Path) -> None:
    with _sidecar(tmp_path, delta=True) as envoy:
        assert envoy.wait_live(timeout=15) != "LIVE"
        ads = envoy.config_dump()["configs"][0]["bootstrap"]["dynamic_resources"]["ads_config"]
        assert ads["api_type"] == "DELTA_GRPC"


def test_envoy_death_is_reported_with_log_tail(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        envoy = _sidecar(tmp_path, admin_port=squatter.getsockname()[1])
        with envoy, pytest.raises(RuntimeFailure) as failure:
            envoy.wait_live(timeout=15)
    message = str(failure.value)
    assert "died" in message
    assert "envoy.log" in message
    assert "Address already in use" in message or "cannot bind" in message
    assert not envoy.running()


def test_envoy_dies_with_its_parent(tmp_path: Path) -> None:
    parent_code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from controlplane.runtime.envoy import EnvoyProcess
        envoy = EnvoyProcess(
            node_id="orphan", service="fund-facade", group="default", xds_host="127.0.0.1",
            xds_port={free_port()}, admin_port={free_port()}, delta=False,
            work_dir=Path({str(tmp_path / "orphan")!r}),
        ).start()
        envoy.wait_live(timeout=15)
        print(envoy.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    envoy_pid = None
    try:
        envoy_pid = int(parent.stdout.readline())
        assert not gone(envoy_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=5)
        assert wait_gone(envoy_pid, timeout=5), "envoy outlived its killed parent"
    finally:
        stop_process(parent, timeout=1)
        if envoy_pid is not None and not gone(envoy_pid):
            os.kill(envoy_pid, signal.SIGKILL)


_DUMP_PREFIX = "type.googleapis.com/envoy.admin.v3."
# Shapes copied from a real Envoy 1.40 /config_dump?include_eds (trimmed).
_DUMP = {
    "configs": [
        {"@type": _DUMP_PREFIX + "BootstrapConfigDump", "bootstrap": {}},
        {
            "@type": _DUMP_PREFIX + "ClustersConfigDump",
            "static_clusters": [{"cluster": {"name": "xds"}}],
            "dynamic_active_clusters": [
                {"version_info": "v1", "cluster": {"name": "echo|default"}},
                {"version_info": "v1", "cluster": {"name": "echo|task"}},
            ],
            "dynamic_warming_clusters": [{"version_info": "v2", "cluster": {"name": "echo|task"}}],
        },
        {
            "@type": _DUMP_PREFIX + "ListenersConfigDump",
            "dynamic_listeners": [
                {"name": "egress", "active_state": {"version_info": "v1"}},
                {
                    "name": "inbound",
                    "active_state": {"version_info": "v1"},
                    "warming_state": {"version_info": "v2"},
                },
            ],
        },
        {
            "@type": _DUMP_PREFIX + "RoutesConfigDump",
            "dynamic_route_configs": [{"version_info": "v1", "route_config": {"name": "egress"}}],
        },
        {
            "@type": _DUMP_PREFIX + "EndpointsConfigDump",
            "static_endpoint_configs": [{"endpoint_config": {"cluster_name": "xds"}}],
            "dynamic_endpoint_configs": [{"endpoint_config": {"cluster_name": "echo|default"}}],
        },
    ]
}


def test_dumped_versions_prefers_warming_and_fills_eds_from_text_readouts() -> None:
    readouts = {"cluster.echo|default.version_text": "v3", "cluster_manager.cds.version_text": "v2"}
    assert dumped_versions(_DUMP, readouts) == {
        "clusters": {"echo|default": "v1", "echo|task": "v2"},
        "listeners": {"egress": "v1", "inbound": "v2"},
        "routes": {"egress": "v1"},
        "endpoints": {"echo|default": "v3"},
    }
    assert dumped_versions(_DUMP)["endpoints"] == {"echo|default": ""}


def test_stats_split_numbers_from_text_readouts() -> None:
    payload = {
        "stats": [
            {"name": "cluster_manager.cds.version_text", "value": "v1"},
            {"name": "cluster.xds.upstream_cx_total", "value": 3},
            {"histograms": {"supported_quantiles": [50]}},
        ]
    }
    assert parse_stats(payload) == {"cluster.xds.upstream_cx_total": 3}
    assert parse_text_readouts(payload) == {"cluster_manager.cds.version_text": "v1"}


def _get_json(port: int, path: str, headers: dict[str, str] | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())
    finally:
        conn.close()


def test_echo_app_in_thread() -> None:
    port, stop = start_echo("account-svc/task")
    try:
        answer = _get_json(port, "/balance?user=7", {"x-task-dye": "fund-yield"})
    finally:
        stop()
    assert answer["name"] == "account-svc/task"
    assert answer["path"] == "/balance?user=7"
    assert answer["headers"]["x-task-dye"] == "fund-yield"


def test_echo_app_as_module() -> None:
    port = free_port()
    app = subprocess.Popen(
        [sys.executable, "-m", "tests.support.echo_app", "--port", str(port), "--name", "a"],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                answer = _get_json(port, "/")
                break
            except OSError:
                assert app.poll() is None, "echo app exited"
                assert time.monotonic() < deadline, "echo app did not answer"
                time.sleep(0.05)
    finally:
        stop_process(app, timeout=2)
    assert answer["name"] == "a"


def test_two_sidecars_never_share_a_port(etcd_server: EmbeddedEtcd, tmp_path: Path) -> None:
    """Given the same inbound port (a free-port race), the second sidecar fails instead of
    silently sharing the port's connections with the first (Envoy's default SO_REUSEPORT)."""
    plane = Plane(etcd_server.endpoint)
    inbound = free_port()
    try:
        assert plane.apply_files({"rules.yaml": service("fund-facade")})[0] == 200
        first = plane.sidecar(tmp_path / "first", "fund-facade|default", inbound_port=inbound)
        second = plane.sidecar(tmp_path / "second", "fund-facade|task", inbound_port=inbound)
        with first:
            first.wait_ready()
            socket.create_connection(("127.0.0.1", inbound), timeout=2).close()
            with second:
                with pytest.raises(RuntimeFailure):
                    second.wait_ready(timeout=10)
                assert "Address already in use" in second.log_tail(200), second.log_tail()
                assert not second.running()  # it exits: `tasklane run` tries other ports at once
            assert first.running()
    finally:
        plane.stop()
