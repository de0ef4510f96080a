"""Scoped configuration through real Envoys: a Delta sidecar holds the services its role's
scope names, and reaches any other one on its first call, within that call (VHDS on demand),
with no failed request; the new service then stays in the role's scope, and nothing else
joins it. Hosts outside the mesh are asked for the same way and answer as the outbound
traffic policy says."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from controlplane.xds.names import REGISTRY_ONLY
from tests.support.mesh import Mesh, request
from tests.support.rules import service

pytestmark = pytest.mark.timeout(120)

RULES = service("front") + service("ledger") + service("audit") + service("unused")


def config_dump(admin_port: int) -> dict:
    url = f"http://127.0.0.1:{admin_port}/config_dump?include_eds"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def held(admin_port: int) -> tuple[set[str], set[str]]:
    """(cluster names, egress virtual host names) the sidecar's Envoy holds."""
    clusters, hosts = set(), set()
    for config in config_dump(admin_port)["configs"]:
        for entry in config.get("dynamic_active_clusters", []):
            clusters.add(entry["cluster"]["name"])
        for entry in config.get("dynamic_route_configs", []):
            route = entry["route_config"]
            if route["name"] == "egress":
                hosts.update(h["name"] for h in route.get("virtual_hosts", []))
    return clusters, hosts


def test_a_first_call_outside_the_scope_succeeds_and_joins_it(tmp_path: Path) -> None:
    with Mesh(tmp_path, RULES) as mesh:
        mesh.add("ledger", "default")
        mesh.add("audit", "default")
        front = mesh.add("front", "default", next_services=["ledger", "audit"])
        clusters, hosts = held(front.envoy.admin_port)
        assert not clusters & {"ledger|default", "audit|default", "unused|default"}
        assert hosts == {"egress/@outside_mesh"}  # its rules declare no call

        started = time.monotonic()
        status, body = request(front.inbound_port, "front")
        first = time.monotonic() - started
        assert status == 200, body
        assert [hop["service"] for hop in body["hops"]] == ["front", "ledger", "audit"]

        started = time.monotonic()
        status, _ = request(front.inbound_port, "front")
        second = time.monotonic() - started
        assert status == 200
        clusters, hosts = held(front.envoy.admin_port)
        assert {"ledger|default", "ledger|task", "audit|default", "audit|task"} <= clusters
        assert "unused|default" not in clusters  # nothing joins that was not called
        assert hosts == {"egress/@outside_mesh", "egress/@ledger", "egress/@audit"}
        # Two services discovered within one request; measured, not a target.
        print(f"first call {first * 1000:.1f} ms, second {second * 1000:.1f} ms")
        assert first < 5.0


def test_a_host_outside_the_mesh_is_asked_for_and_refused_with_a_reason(tmp_path: Path) -> None:
    with Mesh(tmp_path, RULES, outbound_policy=REGISTRY_ONLY) as mesh:
        front = mesh.add("front", "default")
        for name in ("one.example", "two.example:8080", "one.example"):
            status, body = request(front.egress_port, name)
            assert status == 502, (name, body)
            assert f"{name} is no service of the mesh" in str(body), body
        _, hosts = held(front.envoy.admin_port)
        assert hosts == {"egress/@outside_mesh"}  # one host for every outside name
