"""Two `tasklane up` replicas on one etcd, a real chain spread over them, one SIGKILLed under load.

Both replicas share the etcd and the state dir (so the API token); each serves xDS and the HTTP
API on its own ports. Every `tasklane run` of the fund-yield chain (fund-facade -> account-svc ->
nav-pricing, default and task groups) is given both replicas (`--server A,B`, half of them in
the other order, so each replica holds some registrations); its Envoy picks one for its ADS
and access-log streams. The replica holding more streams is SIGKILLed while twenty threads send
dyed and online requests through a sidecar's egress. Its sidecars must move to the survivor and
be in sync there within RESYNC_LIMIT, the runs that registered through it register again
through the survivor before their lease expires, and no request may fail or leak, counted from
what really answered and from the survivor's isolation accounting."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.model.instance import DEFAULT_TTL, Instance
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.ports import free_port
from controlplane.store.etcd import Store
from controlplane.store.registry import list_instances
from controlplane.xds.names import HEALTH_PATH
from tests.support.chain import (
    DYE,
    GOOD,
    NEXT,
    ONLINE,
    STOP_TIMEOUT,
    TASK,
    Load,
    Plane,
    Run,
    chain_app,
    children_of,
    get,
    hops,
    stop_run,
)
from tests.support.echo_app import start_echo
from tests.support.etcd import start_etcd
from tests.support.procs import wait_gone
from tests.support.rules import service
from tests.support.up import Up, get_json, start_up
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(180)

GROUPS = ("default", "task")
RESYNC_LIMIT = 10.0  # the bound, kill to every moved sidecar ACKing the survivor


@dataclass
class ReplicaPlane(Plane):
    """A Plane whose CLI and runs are given several replicas (`--server A,B`)."""

    servers: str = ""

    @property
    def server(self) -> str:
        return self.servers


def url(up: Up) -> str:
    return f"http://127.0.0.1:{up.ports['http']}"


def synced_nodes(up: Up) -> dict[str, bool]:
    """{node id: its listeners and every xDS type it was sent ACKed} of the sidecars
    streaming from this replica (a scoped sidecar that calls nothing is sent no endpoints)."""
    code, status = get_json(up.url("/api/v1/status"))
    assert code == 200, status
    return {
        node["node_id"]: "lds" in node["types"]
        and all(
            kind["sent_version"] and kind["sent_version"] == kind.get("acked_version")
            for kind in node["types"].values()
        )
        for node in status["nodes"]
    }


@dataclass
class Replicas:
    ups: list[Up]
    etcd: EmbeddedEtcd
    plane: ReplicaPlane
    runs: list[Run]

    @property
    def egress(self) -> int:
        run = next(r for r in self.runs if (r.service, r.group) == ("nav-pricing", "default"))
        assert run.instance is not None
        return run.instance.egress_port

    def streams(self) -> list[dict[str, bool]]:
        return [synced_nodes(up) for up in self.ups]

    def all_synced(self) -> list[dict[str, bool]] | None:
        """The nodes per replica once every sidecar is on exactly one and in sync."""
        found = self.streams()
        nodes = [node for per_replica in found for node in per_replica]
        ok = len(nodes) == len(set(nodes)) == len(self.runs)
        return found if ok and all(all(per.values()) for per in found) else None


@pytest.fixture
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    etcd = start_etcd(tmp_path_factory.mktemp("etcd"))
    ups: list[Up] = []
    store: Store | None = None
    runs: list[Run] = []
    pids: list[int] = []
    try:
        first = start_up(tmp_path_factory.mktemp("up-a"), etcd=etcd.endpoint)
        ups.append(first)
        ups.append(
            start_up(tmp_path_factory.mktemp("up-b"), etcd=etcd.endpoint, state_dir=first.state_dir)
        )
        store = Store.connect(etcd.endpoint)
        logs = tmp_path_factory.mktemp("runs")
        orders = [
            ReplicaPlane(first, store, logs, servers=",".join(url(up) for up in order))
            for order in (ups, ups[::-1])
        ]
        applied = orders[0].tasklane("apply", "-f", str(GOOD))
        assert applied.returncode == 0, applied.stderr
        runs = [
            orders[n % 2].launch(service, group, chain_app(service, group))
            for n, (service, group) in enumerate((s, g) for s in NEXT for g in GROUPS)
        ]
        with ThreadPoolExecutor(len(runs)) as pool:
            list(pool.map(orders[0].registered, runs))
        pids = [pid for run in runs for pid in children_of(run.proc.pid)]
        running = Replicas(ups, etcd, orders[0], runs)
        wait_until(
            lambda: all(
                hops(get(running.egress, "fund-facade", headers)[1]) == served
                for headers, served in ((DYE, TASK), ({}, ONLINE))
            ),
            timeout=30,
            what="both chains answer",
        )
        wait_until(running.all_synced, timeout=15, what="every sidecar in sync on one replica")
        yield running
    finally:
        with ThreadPoolExecutor(max(len(runs), 1)) as pool:
            list(pool.map(stop_run, runs))
        if store is not None:
            store.close()
        for up in ups:
            pids.append(up.proc.pid)
            if up.proc.poll() is None:
                up.proc.send_signal(signal.SIGTERM)
                try:
                    up.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    up.kill()
        if etcd.pid is not None:
            pids.append(etcd.pid)
        etcd.stop()
        pids += [run.proc.pid for run in runs]
        left = [pid for pid in pids if not wait_gone(pid, timeout=5)]
        assert not left, f"still running: {left}"


class KeysWatch:
    """Polls etcd's instance keys in a thread: the fewest seen at once, to prove none left."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fewest = len(self._keys())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _keys(self) -> list[Instance]:
        return list_instances(self.store)[0]

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.fewest = min(self.fewest, len(self._keys()))

    def __enter__(self) -> KeysWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_sigkill_one_replica_under_load(replicas: Replicas) -> None:
    per_replica = replicas.streams()
    victim = max(range(2), key=lambda n: len(per_replica[n]))
    survivor = replicas.ups[1 - victim]
    moved = set(per_replica[victim])
    stayed = set(per_replica[1 - victim])
    assert moved, per_replica
    # Runs given the victim first registered through it; they must move to the survivor.
    through_victim = [run for n, run in enumerate(replicas.runs) if n % 2 == victim]
    registrations = {id(run): run.stderr().count("registered again") for run in through_victim}
    accounted = get_json(survivor.url("/api/v1/isolation"))[1]["totals"]["requests"]
    everyone = len(replicas.runs)
    with KeysWatch(replicas.plane.store) as keys, Load(replicas.egress) as load:
        load.wait_sent(50)
        replicas.ups[victim].proc.kill()
        killed = time.monotonic()
        replicas.ups[victim].proc.wait(timeout=STOP_TIMEOUT)
        wait_until(
            lambda: (
                (nodes := synced_nodes(survivor)).keys() == moved | stayed and all(nodes.values())
            ),
            timeout=RESYNC_LIMIT + 5,
            what="every sidecar in sync on the surviving replica",
        )
        resync = time.monotonic() - killed
        wait_until(
            lambda: all(
                run.stderr().count("registered again") > registrations[id(run)]
                for run in through_victim
            ),
            timeout=10,
            what="the runs that registered through the dead replica registered again",
        )
        # Past the old leases' expiry: had a run not moved, its instance would be gone now.
        time.sleep(max(0.0, killed + DEFAULT_TTL + 1 - time.monotonic()))
        load.wait_sent(50)
    isolation = get_json(survivor.url("/api/v1/isolation"))[1]["totals"]
    print(
        f"\nreplica SIGKILL ({len(moved)} of {everyone} sidecars on it): {load.report()}; "
        f"resync on the survivor {resync:.2f}s; fewest instances registered {keys.fewest}; "
        f"the survivor's accounting: {isolation['leaks']} leaks, {isolation['errors_5xx']} "
        "answers 5xx inside the mesh (retried)"
    )
    assert resync <= RESYNC_LIMIT, f"sidecars back in sync after {resync:.2f}s"
    assert (load.failed, load.leaked) == (0, 0), load.report()
    assert keys.fewest == everyone, "an instance left the registry"
    assert isolation["requests"] > accounted, "the survivor accounts the load"
    assert isolation["leaks"] == 0, isolation


def test_an_announced_instance_moves_with_its_stream(tmp_path: Path) -> None:
    """A pod's sidecar (no `tasklane run`: its instance lives while its xDS stream does) given
    both replicas: the one holding its stream is SIGKILLed, the other registers it again
    before the dead one's lease expires, so it never leaves etcd."""
    etcd = start_etcd(tmp_path / "etcd")
    ups: list[Up] = []
    store = Store.connect(etcd.endpoint)
    app_port, stop_echo = start_echo("pricing-pod")
    try:
        announce = {"etcd": etcd.endpoint, "options": ("--accept-announce",)}
        ups.append(start_up(tmp_path, **announce))
        ups.append(start_up(tmp_path, **announce, state_dir=ups[0].state_dir))
        rules = tmp_path / "pricing.yaml"
        rules.write_text(service("pricing"))
        applied = Plane(ups[0], store, tmp_path).tasklane("apply", "-f", str(rules))
        assert applied.returncode == 0, applied.stderr
        a, b = (("127.0.0.1", up.ports["xds"]) for up in ups)
        pod = EnvoyProcess(
            node_id="pricing|default|pod-0",
            service="pricing",
            group="default",
            xds_host=a[0],
            xds_port=a[1],
            more_xds=[b],
            admin_port=free_port(),
            delta=False,
            work_dir=tmp_path / "pod",
            parts={
                "sidecar.yaml": {
                    "egress_port": free_port(),
                    "inbound_host": "127.0.0.1",
                    "inbound_port": (inbound := free_port()),
                    "app_port": app_port,
                    "health_path": HEALTH_PATH,
                }
            },
            announce=f"127.0.0.1:{inbound}",
        )
        with pod:
            pod.wait_ready()
            wait_until(lambda: list_instances(store)[0], timeout=10, what="announced in etcd")
            holder = next(n for n, up in enumerate(ups) if synced_nodes(up))
            survivor = ups[1 - holder]
            with KeysWatch(store) as keys:
                ups[holder].proc.kill()
                killed = time.monotonic()
                ups[holder].proc.wait(timeout=STOP_TIMEOUT)
                wait_until(
                    lambda: synced_nodes(survivor) == {pod.node_id: True},
                    timeout=RESYNC_LIMIT,
                    what="the pod's sidecar in sync on the surviving replica",
                )
                resync = time.monotonic() - killed
                # Past the dead replica's lease: only a new registration keeps it now.
                time.sleep(max(0.0, killed + DEFAULT_TTL + 1 - time.monotonic()))
            print(f"\nannounced instance: resync on the survivor {resync:.2f}s")
            assert keys.fewest == 1, "the announced instance left the registry"
            assert [i.id for i in list_instances(store)[0]] == [pod.node_id]
    finally:
        stop_echo()
        store.close()
        for up in ups:
            up.kill()
        etcd.stop()
