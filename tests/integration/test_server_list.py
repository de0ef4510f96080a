"""`--server A,B`: the CLI's control plane replicas, against a real `tasklane up` and a port
where nothing listens (a replica that is down)."""

from __future__ import annotations

import subprocess

import pytest

from controlplane.cli.client import call
from controlplane.errors import TasklaneError
from controlplane.runtime.ports import free_port
from controlplane.runtime.sidecar import xds_addresses
from tests.support.up import TASKLANE, Up, assert_one_line_error

pytestmark = pytest.mark.timeout(60)


def _tasklane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TASKLANE, *args], capture_output=True, text=True, timeout=30)


def test_requests_skip_a_replica_that_is_down(running_up: Up) -> None:
    live, down = running_up.url(""), f"http://127.0.0.1:{free_port()}"
    got = _tasklane("get", "services", "-o", "json", "--server", f"{down},{live}")
    assert got.returncode == 0, got.stderr
    status = call(f"{down}, {live}", "GET", "/api/v1/status")
    assert status["xds"]["address"] == f"127.0.0.1:{running_up.ports['xds']}"

    refused = _tasklane("get", "services", "--server", f"{down},{down}/")
    assert refused.returncode == 2
    assert_one_line_error(refused.stderr, f"cannot reach the control plane at {down}:")
    empty = _tasklane("get", "services", "--server", f"{live},")
    assert empty.returncode == 2
    assert_one_line_error(empty.stderr, f"--server '{live},': an empty URL in the list")


def test_sidecars_get_the_xds_address_of_every_replica_that_answers(running_up: Up) -> None:
    live, down = running_up.url(""), f"http://127.0.0.1:{free_port()}"
    xds = ("127.0.0.1", running_up.ports["xds"])

    def status_of(url: str) -> dict:
        return call(url, "GET", "/api/v1/status")

    assert xds_addresses([down, live, live], status_of, None) == (xds,)
    with pytest.raises(TasklaneError, match="cannot reach the control plane at"):
        xds_addresses([down], status_of, None)
