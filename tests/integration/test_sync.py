"""The control plane follows etcd into real Envoy sidecars: registered instances become
endpoints and leave on deregistration or lease expiry, rule changes change routes, a
registration outlives etcd outages, and an inconsistent build never reaches Envoy."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment

from controlplane.errors import StoreError
from controlplane.model.instance import Instance
from controlplane.model.load import load_files, load_text
from controlplane.model.rules import RuleSet
from controlplane.model.validate import apply as validate_apply
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.ports import free_port
from controlplane.store.etcd import Store
from controlplane.store.registry import Registration, register
from controlplane.store.rules import apply_rules, load_rules
from controlplane.xds.names import GATEWAY_ROLE
from controlplane.xds.snapshot import ResourceMap, Snapshot
from controlplane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST
from tests.support.chain import cluster_hosts
from tests.support.plane import Plane as BasePlane
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(90)

GOOD = Path(__file__).resolve().parents[1] / "rules" / "good" / "fund-yield.yaml"
ROLE = "fund-facade|default"  # the sidecar under test: a caller of account-svc

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Plane(BasePlane):
    """The control plane, with rules written straight to etcd and bare sidecars."""

    def apply(self, text: str | None = None) -> None:
        """Apply the fund-yield rules, or more rule documents on top of the stored ones."""
        current, revision = load_rules(self.store)
        parsed = load_files([GOOD]) if text is None else load_text(text, "extra.yaml")
        apply_rules(self.store, validate_apply(current, parsed), current, revision)

    def ready_sidecar(self, tmp_path: Path, role: str = ROLE, delta: bool = True) -> EnvoyProcess:
        """A started, ready sidecar of `role`."""
        envoy = self.sidecar(tmp_path / "envoy", role, delta)
        envoy.start()
        envoy.wait_ready()
        return envoy

    def nacks(self) -> list[str]:
        return [
            f"{node.node_id} {status.last_nack.message}"
            for node in self.on_loop(self.control_plane.status_board.nodes)
            for status in node.types.values()
            if status.last_nack is not None
        ]


@pytest.fixture
def plane(etcd_server: EmbeddedEtcd) -> Iterator[Plane]:  # noqa: F811
    running = Plane(etcd_server.endpoint)
    try:
        running.apply()
        yield running
    finally:
        running.stop()


@pytest.fixture
def sidecar(plane: Plane, tmp_path: Path) -> Iterator[EnvoyProcess]:
    envoy = plane.ready_sidecar(tmp_path)
    try:
        yield envoy
    finally:
        envoy.stop()


def instance(service: str, group: str = "default", port: int | None = None) -> Instance:
    """An instance record; nothing listens at its address (health checks fail, which does
    not hide it from /clusters)."""
    port = port or free_port()
    return Instance(
        id=f"127.0.0.1-{port}",
        service=service,
        group=group,
        host="127.0.0.1",
        inbound_port=port,
        app_port=free_port(),
        admin_port=free_port(),
        egress_port=free_port(),
        pid=0,
        started_at=time.time(),
    )


def registered(store: Store, record: Instance) -> Registration | None:
    """A registration of record with a TTL of 2 s, or None while etcd does not answer."""
    try:
        return register(store, record, ttl=2)
    except StoreError:
        return None


def test_instances_come_and_go_with_their_registration(plane: Plane, sidecar: EnvoyProcess) -> None:
    kept = register(plane.store, instance("account-svc"), ttl=2)
    closed = register(plane.store, instance("account-svc"), ttl=2)
    # No keep-alive at all: what remains of a `tasklane run` killed with SIGKILL.
    abandoned = register(plane.store, instance("account-svc", "task"), ttl=2, keepalive=False)
    try:
        addresses = {r: "{}:{}".format(*r.instance.address) for r in (kept, closed, abandoned)}
        wait_until(
            lambda: (
                cluster_hosts(sidecar.admin_port, "account-svc|default")
                == {addresses[kept], addresses[closed]}
                and cluster_hosts(sidecar.admin_port, "account-svc|task") == {addresses[abandoned]}
            ),
            what="all three instances in the sidecar's /clusters",
        )
        status = plane.status()["sync"]
        assert status["instances"] == 3
        assert status["roles"] == 8  # seven groups and the gateway
        assert status["refused"] == {}

        closed.close()
        assert plane.store.get(closed.instance.key) is None  # revoked at once
        wait_until(
            lambda: cluster_hosts(sidecar.admin_port, "account-svc|default") == {addresses[kept]},
            timeout=3,
            what="closed instance gone",
        )

        expiring = time.monotonic()
        wait_until(
            lambda: not cluster_hosts(sidecar.admin_port, "account-svc|task"),
            timeout=2 + 3,
            what="abandoned instance expired",
        )
        assert time.monotonic() - expiring < 2 + 1.5
        # Renewed meanwhile: the TTL has passed since it was registered.
        assert cluster_hosts(sidecar.admin_port, "account-svc|default") == {addresses[kept]}
        assert plane.store.get(kept.instance.key) is not None
        assert plane.nacks() == []
    finally:
        for registration in (kept, closed, abandoned):
            registration.close()


def test_rule_change_changes_the_routes(plane: Plane, tmp_path: Path) -> None:
    # A state-of-the-world sidecar holds the full view: every service, as it comes and goes.
    sidecar = plane.ready_sidecar(tmp_path, delta=False)
    try:
        _check_rule_change_changes_the_routes(plane, sidecar)
    finally:
        sidecar.stop()


def _check_rule_change_changes_the_routes(plane: Plane, sidecar: EnvoyProcess) -> None:
    def egress_hosts() -> set[str]:
        for section in sidecar.config_dump(include_eds=False)["configs"]:
            for entry in section.get("dynamic_route_configs", []):
                config = entry["route_config"]
                if config["name"] == "egress":
                    return {host["name"] for host in config["virtual_hosts"]}
        return set()

    # The services, then every other host (outside the mesh).
    assert egress_hosts() == {"fund-facade", "account-svc", "nav-pricing", "outside_mesh"}
    plane.apply(
        "apiVersion: tasklane.io/v1\nkind: Service\nmetadata: {name: ledger-svc}\n"
        "spec: {groups: [{name: default}]}\n"
    )
    wait_until(lambda: "ledger-svc" in egress_hosts(), what="ledger-svc in the egress routes")
    assert "ledger-svc|default" in sidecar.versions()["clusters"]
    assert "ledger-svc|default" in plane.status()["roles"]

    current, revision = load_rules(plane.store)
    apply_rules(plane.store, current.without("Service", "ledger-svc"), current, revision)
    wait_until(lambda: "ledger-svc" not in egress_hosts(), what="ledger-svc gone again")
    assert "ledger-svc|default" not in plane.status()["roles"]  # its snapshot was cleared
    assert plane.nacks() == []


def test_inconsistent_build_never_reaches_envoy(
    plane: Plane, sidecar: EnvoyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = plane.control_plane.sync
    real_build = sync.translator.build

    def broken_build(rules: RuleSet, endpoints: Any, scopes: Any = None) -> dict[str, Snapshot]:
        """The real build, except that ROLE's snapshot lacks a cluster its routes name."""
        snapshots = real_build(rules, endpoints, scopes)
        good = snapshots[ROLE]
        clusters = [r for r in good.resources(CLUSTER).values() if r.name != "account-svc|task"]
        snapshots[ROLE] = Snapshot(
            {
                CLUSTER: ResourceMap(clusters),
                ENDPOINT: good.resources(ENDPOINT),
                LISTENER: good.resources(LISTENER),
                ROUTE: good.resources(ROUTE),
                VIRTUAL_HOST: good.resources(VIRTUAL_HOST),
            }
        )
        return snapshots

    before = sidecar.versions()
    builds = plane.status()["sync"]["builds"]
    monkeypatch.setattr(sync.translator, "build", broken_build)
    registration = register(plane.store, instance("account-svc"))
    try:
        status = wait_until(
            lambda: (s := plane.status()["sync"])["builds"] > builds and s,
            what="a build after the registration",
        )
        assert list(status["refused"]) == [ROLE]
        assert "account-svc|task" in status["refused"][ROLE]
        # Other roles' snapshots of the same build were published, with the new endpoint.
        gateway = plane.on_loop(plane.control_plane.cache.snapshot, GATEWAY_ROLE)
        assignment = ClusterLoadAssignment.FromString(
            gateway.resources(ENDPOINT)["account-svc|default"].payload
        )
        [[endpoint]] = [locality.lb_endpoints for locality in assignment.endpoints]
        port = endpoint.endpoint.address.socket_address.port_value
        assert port == registration.instance.inbound_port
        time.sleep(0.5)  # a push, had there been one, is applied by now
        assert sidecar.versions() == before
        assert cluster_hosts(sidecar.admin_port, "account-svc|default") == set()
        assert plane.nacks() == []

        monkeypatch.setattr(sync.translator, "build", real_build)
        plane.apply(
            "apiVersion: tasklane.io/v1\nkind: Service\nmetadata: {name: ledger-svc}\n"
            "spec: {groups: [{name: default}]}\n"
        )
        address = "{}:{}".format(*registration.instance.address)
        wait_until(
            lambda: cluster_hosts(sidecar.admin_port, "account-svc|default") == {address},
            what="the sidecar catches up once builds are consistent again",
        )
        assert plane.status()["sync"]["refused"] == {}
        assert plane.nacks() == []
    finally:
        registration.close()


def test_registration_outlives_lost_leases_and_etcd_restarts(
    plane: Plane,
    sidecar: EnvoyProcess,
    etcd_server: EmbeddedEtcd,  # noqa: F811
) -> None:
    registration: Registration = register(plane.store, instance("account-svc"), ttl=2)
    address = "{}:{}".format(*registration.instance.address)
    try:
        wait_until(lambda: cluster_hosts(sidecar.admin_port, "account-svc|default") == {address})
        # The lease is lost behind the registration's back (as when its owner was cut off
        # from etcd for longer than the TTL): the next renewal registers it again.
        lost = registration.lease_id
        registration.lease.revoke()
        assert plane.store.get(registration.instance.key) is None
        wait_until(  # the key is put just before the registration holds the new lease
            lambda: (
                plane.store.get(registration.instance.key) is not None
                and registration.lease_id != lost
            ),
            timeout=3,
            what="registered again under a new lease",
        )
        assert registration.lease_id != lost
        wait_until(lambda: cluster_hosts(sidecar.admin_port, "account-svc|default") == {address})

        etcd_server.stop()
        time.sleep(2.5)  # longer than the TTL: every keep-alive meanwhile failed
        etcd_server.start()
        restarted = time.monotonic()
        later = wait_until(
            lambda: registered(plane.store, instance("account-svc", "task")),
            what="etcd answers the test's client again",
        )
        try:
            # The control plane's watches came back: a registration made after the restart
            # reaches the sidecar, and the one from before is still there and renewed.
            wait_until(
                lambda: (
                    cluster_hosts(sidecar.admin_port, "account-svc|task")
                    == {"{}:{}".format(*later.instance.address)}
                ),
                what="the sync follows etcd again after its restart",
            )
            wait_until(lambda: registration.renewed_at > restarted, what="renewed after restart")
            assert cluster_hosts(sidecar.admin_port, "account-svc|default") == {address}
            assert plane.store.get(registration.instance.key) is not None
        finally:
            later.close()
        assert plane.nacks() == []
    finally:
        registration.close()
