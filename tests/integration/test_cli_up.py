"""`tasklane up` as a user runs it: a real process with a real etcd, on free ports, stopped by
a signal; it fails fast with one line when its ports or its etcd are not there."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.ports import port_in_use
from tests.support.procs import wait_gone
from tests.support.up import (
    EXIT_TIMEOUT,
    PYTHON_M,
    TASKLANE,
    Up,
    assert_one_line_error,
    etcd_children,
    free_ports,
    get_json,
    launch,
    start_up,
)

pytestmark = pytest.mark.timeout(90)


def test_up_serves_health_and_status(running_up: Up) -> None:
    ports = running_up.ports
    assert running_up.stdout() == (
        f"tasklane up: xDS on 127.0.0.1:{ports['xds']}, "
        f"HTTP on http://127.0.0.1:{ports['http']}, "
        f"etcd at 127.0.0.1:{ports['etcd_client']} "
        f"(embedded, data in {running_up.state_dir / 'etcd'})\n"
        f"API token written to {running_up.state_dir / 'api-token'}\n"
    )
    assert get_json(running_up.url("/healthz")) == (200, {"status": "ok"})
    code, status = get_json(running_up.url("/api/v1/status"))
    assert code == 200
    assert status["etcd"] == {"endpoint": f"127.0.0.1:{ports['etcd_client']}", "embedded": True}
    assert status["xds"] == {"address": f"127.0.0.1:{ports['xds']}"}
    # No rules yet: only the gateway role is published, and no sidecar is connected.
    assert status["roles"] == ["@gateway|default"] and status["nodes"] == []
    assert status["sync"]["builds"] >= 1 and not status["sync"]["refused"]
    assert get_json(running_up.url("/api/v1/nope")) == (404, {"error": "Not Found"})
    assert len(etcd_children(running_up.proc.pid)) == 1
    assert (running_up.state_dir / "etcd" / "etcd.log").exists()


def test_second_up_on_same_ports_fails_fast(running_up: Up, tmp_path: Path) -> None:
    started = time.monotonic()
    second = launch(TASKLANE, tmp_path, running_up.ports)
    try:
        assert second.proc.wait(timeout=EXIT_TIMEOUT) == 2
    finally:
        second.kill()
    assert time.monotonic() - started < 5.0
    assert_one_line_error(
        second.stderr(),
        f"port {running_up.ports['xds']} (xDS) is already in use: "
        "is another `tasklane up` running?",
    )
    assert second.stdout() == ""
    assert not (second.state_dir / "etcd").exists()  # no second etcd was started
    assert get_json(running_up.url("/healthz")) == (200, {"status": "ok"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_everything(running_up: Up, sig: signal.Signals) -> None:
    [etcd_pid] = etcd_children(running_up.proc.pid)
    running_up.proc.send_signal(sig)
    assert running_up.proc.wait(timeout=EXIT_TIMEOUT) == 0
    assert wait_gone(etcd_pid, EXIT_TIMEOUT)
    for name, port in running_up.ports.items():
        assert not port_in_use(port), f"{name} port {port} still in use"
    assert "Traceback" not in running_up.stderr()


def test_external_etcd_is_used_and_its_loss_reported(
    etcd_server: EmbeddedEtcd,  # noqa: F811
    tmp_path: Path,
) -> None:
    up = start_up(tmp_path, etcd=etcd_server.endpoint)
    try:
        assert up.stdout().splitlines()[0].endswith(f"etcd at {etcd_server.endpoint} (external)")
        assert etcd_children(up.proc.pid) == []
        assert not (up.state_dir / "etcd").exists()
        status, body = get_json(up.url("/api/v1/status"))
        assert status == 200
        assert body["etcd"] == {"endpoint": etcd_server.endpoint, "embedded": False}
        assert get_json(up.url("/healthz")) == (200, {"status": "ok"})

        etcd_server.stop()
        status, body = get_json(up.url("/healthz"))
        assert status == 503
        assert body["status"] == "unavailable"
        assert etcd_server.endpoint in body["error"]
        assert get_json(up.url("/livez")) == (200, {"status": "ok"})  # alive all the same

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=EXIT_TIMEOUT) == 0
        assert "Traceback" not in up.stderr()
    finally:
        up.kill()


def test_unreachable_etcd_fails_with_one_line(tmp_path: Path) -> None:
    ports = free_ports()
    closed = f"127.0.0.1:{ports['etcd_client']}"
    up = launch(PYTHON_M, tmp_path, ports, etcd=closed)
    try:
        assert up.proc.wait(timeout=EXIT_TIMEOUT) == 2
    finally:
        up.kill()
    assert_one_line_error(up.stderr(), f"cannot reach etcd at {closed}: ")
    assert up.stdout() == ""
    assert not port_in_use(ports["xds"])
    assert not port_in_use(ports["http"])


@pytest.mark.parametrize("cost", ["-0.1", "1.5"])
def test_a_parked_cost_outside_0_to_1_is_refused(tmp_path: Path, cost: str) -> None:
    """A parked hour cannot cost less than nothing or more than a running one."""
    result = subprocess.run(
        [*TASKLANE, "up", "--state-dir", str(tmp_path), "--parked-cost", cost],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"--parked-cost must be from 0 to 1, got {cost}")
    assert not list(tmp_path.iterdir())  # refused before anything started
