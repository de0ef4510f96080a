"""A sidecar whose node names a service no rule defines: a real Envoy against a real control
plane gets listeners that answer 503 with a reason naming the missing Service, is shown as
UNKNOWN SERVICE by /api/v1/status and `tasklane status`, gets its real config as soon as the
Service is applied, and is told why again when the Service is deleted."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.runtime.etcd import EmbeddedEtcd
from tests.support import rules
from tests.support.echo_app import start_echo
from tests.support.mesh import request
from tests.support.plane import Plane
from tests.support.runs import plane_with_rules
from tests.support.up import TASKLANE
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "tests" / "rules" / "good" / "fund-yield.yaml"
GHOST, KNOWN = "ghost|default", "fund-facade|default"
REASON = (
    'tasklane: the rules have no Service "ghost": apply it to serve this sidecar (ghost|default)'
)
READY_TIMEOUT = 15.0


@pytest.fixture
def plane(etcd_server: EmbeddedEtcd) -> Iterator[Plane]:
    yield from plane_with_rules(etcd_server.endpoint)


def _unknown(plane: Plane) -> dict[str, bool]:
    """node id -> its `unknown_service` in /api/v1/status."""
    return {node["node_id"]: node["unknown_service"] for node in plane.status()["nodes"]}


def _status(plane: Plane) -> str:
    result = subprocess.run(
        [*TASKLANE, "status", "--server", plane.url],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_sidecar_of_an_unknown_service_is_told_why_until_it_is_applied(
    plane: Plane, tmp_path: Path, delta: bool
) -> None:
    app_port, stop_app = start_echo("ghost/default/1")
    try:
        ghost = plane.sidecar(tmp_path / "ghost", GHOST, delta, app_port=app_port)
        known = plane.sidecar(tmp_path / "known", KNOWN, delta)
        ports = ghost.parts["sidecar.yaml"]
        with ghost, known:
            ghost.wait_ready(READY_TIMEOUT)  # it has listeners and routes, though no Service
            known.wait_ready(READY_TIMEOUT)
            for port in (ports["inbound_port"], ports["egress_port"]):
                assert request(port, "fund-facade") == (503, {"error": REASON + "\n"})
            wait_until(
                lambda: _unknown(plane) == {f"{GHOST}|test": True, f"{KNOWN}|test": False},
                what="the status marks the unknown service's sidecar only",
            )
            rows = {line.split()[0]: line for line in _status(plane).splitlines() if "|" in line}
            assert "ghost (UNKNOWN SERVICE)" in rows[f"{GHOST}|test"]
            assert "UNKNOWN" not in rows[f"{KNOWN}|test"]
            assert rows[f"{GHOST}|test:"] == (
                f'{GHOST}|test: UNKNOWN SERVICE, the rules have no Service "ghost"; its listeners '
                "answer 503 until it is applied"
            )

            code, body = plane.apply_files({"ghost.yaml": rules.service("ghost")})
            assert code == 200, body
            status, answer = wait_until(
                lambda: (reply := request(ports["inbound_port"], "ghost"))[0] == 200 and reply,
                what="the applied Service's config reaches the sidecar",
            )
            assert answer["name"] == "ghost/default/1"
            assert request(ports["egress_port"], "fund-facade")[1] != {"error": REASON + "\n"}
            assert _unknown(plane) == {f"{GHOST}|test": False, f"{KNOWN}|test": False}
            assert "UNKNOWN" not in _status(plane)

            code, body = plane.request("DELETE", "/api/v1/rules/service/ghost")
            assert code == 200, body
            wait_until(
                lambda: request(ports["inbound_port"], "ghost") == (503, {"error": REASON + "\n"}),
                what="the deleted Service's sidecar is told why again",
            )
            assert _unknown(plane)[f"{GHOST}|test"] is True
    finally:
        stop_app()
