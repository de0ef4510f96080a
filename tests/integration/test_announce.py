"""Instances announced by their sidecar (a pod's, a compose service's): a real Envoy whose
bootstrap carries `tasklane.announce`, a real control plane, a real etcd, and a second real
sidecar calling the announced one. What etcd holds and what a request returns are the proof."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.model.instance import DEFAULT_TTL, INSTANCES
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.ports import free_port
from controlplane.store.etcd import Store
from tests.support.echo_app import start_echo
from tests.support.plane import Plane
from tests.support.rules import service
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)

NODE = "pricing|default|test"  # Plane.sidecar's node id for role pricing|default
KEY = f"{INSTANCES}pricing/default/{NODE}"


def start_plane(etcd: EmbeddedEtcd, accept: bool, xds_port: int = 0) -> Plane:
    plane = Plane(etcd.endpoint, accept_announce=accept, xds_port=xds_port)
    code, body = plane.apply_files({"rules.yaml": service("pricing") + service("caller")})
    assert code == 200, body
    return plane


@pytest.fixture
def echo() -> Iterator[int]:
    port, stop = start_echo("pricing-pod")
    try:
        yield port
    finally:
        stop()


def registered(plane: Plane) -> dict | None:
    value = plane.store.get(KEY)
    return json.loads(value) if value is not None else None


def answered(egress: int) -> dict | None:
    """The app's answer to a call of `pricing` through a caller's egress; None unless 200."""
    conn = http.client.HTTPConnection("127.0.0.1", egress, timeout=5)
    try:
        conn.request("GET", "/price", headers={"Host": "pricing"})
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if response.status == 200 else None
    finally:
        conn.close()


def listener_port(envoy: EnvoyProcess, name: str) -> int:
    """The port of one of the sidecar's static listeners, from its bootstrap."""
    bootstrap = yaml.safe_load(envoy.bootstrap_path.read_text())
    listener = next(x for x in bootstrap["static_resources"]["listeners"] if x["name"] == name)
    return listener["address"]["socket_address"]["port_value"]


def announced_sidecar(plane: Plane, tmp_path: Path, app_port: int, announce: str) -> EnvoyProcess:
    inbound = int(announce.rpartition(":")[2]) if announce[-1:].isdigit() else free_port()
    return plane.sidecar(
        tmp_path / "pod",
        "pricing|default",
        app_port=app_port,
        inbound_port=inbound,
        announce=announce,
    )


def test_announced_instance_serves_while_its_stream_lasts(
    etcd_server: EmbeddedEtcd, tmp_path: Path, echo: int
) -> None:
    plane = start_plane(etcd_server, accept=True)
    try:
        inbound = free_port()
        pod = announced_sidecar(plane, tmp_path, echo, f"127.0.0.1:{inbound}")
        with pod, plane.sidecar(tmp_path / "caller", "caller|default") as caller:
            pod.wait_ready()
            caller.wait_ready()
            found = wait_until(lambda: registered(plane), timeout=10, what="announced in etcd")
            assert (found["host"], found["inbound_port"]) == ("127.0.0.1", inbound)
            assert (found["service"], found["group"], found["app_port"]) == (
                "pricing",
                "default",
                0,
            )
            egress = listener_port(caller, "egress")
            answer = wait_until(
                lambda: answered(egress), timeout=15, what="the caller reaches the pod"
            )
            assert answer["name"] == "pricing-pod"
            # The stream ends (Envoy killed): removed at once, not one lease TTL later.
            pod._proc.kill()
            started = time.monotonic()
            wait_until(lambda: registered(plane) is None, timeout=DEFAULT_TTL, what="removed")
            assert time.monotonic() - started < DEFAULT_TTL / 2
    finally:
        plane.stop()


def test_a_stopping_replica_leaves_announced_instances_to_their_lease(
    etcd_server: EmbeddedEtcd, tmp_path: Path, echo: int
) -> None:
    """Stopping a replica does not revoke: its sidecars reconnect to another one, which
    registers them again under the same key, with no moment without the instance."""
    first = start_plane(etcd_server, accept=True)
    xds_port = first.control_plane.xds_port
    pod = announced_sidecar(first, tmp_path, echo, f"127.0.0.1:{free_port()}")
    store = Store.connect(etcd_server.endpoint)
    try:
        pod.start()
        pod.wait_ready()
        wait_until(lambda: registered(first), timeout=10, what="announced in etcd")
        put_at = store.mod_revision(KEY)
        first.stop()
        second = start_plane(etcd_server, accept=True, xds_port=xds_port)
        try:
            gaps, deadline = 0, time.monotonic() + DEFAULT_TTL + 5
            while store.mod_revision(KEY) in (0, put_at) and time.monotonic() < deadline:
                gaps += store.get(KEY) is None
                time.sleep(0.05)
            assert store.mod_revision(KEY) > put_at, "not registered again by the new replica"
            assert gaps == 0
            time.sleep(DEFAULT_TTL + 1)  # the first replica's lease has expired by now
            assert registered(second) is not None
        finally:
            second.stop()
    finally:
        pod.stop()
        store.close()


@pytest.mark.parametrize(
    ("accept", "announce"), [(False, "127.0.0.1:15006"), (True, "no-port-here")]
)
def test_announcements_are_ignored_unless_accepted_or_when_malformed(
    etcd_server: EmbeddedEtcd, tmp_path: Path, echo: int, accept: bool, announce: str
) -> None:
    plane = start_plane(etcd_server, accept=accept)
    try:
        with announced_sidecar(plane, tmp_path, echo, announce) as pod:
            pod.wait_ready()
            wait_until(lambda: plane.status()["nodes"], timeout=10, what="the pod's stream is up")
            time.sleep(1)
            items, _ = plane.store.get_prefix(INSTANCES)
            assert items == {}
    finally:
        plane.stop()
