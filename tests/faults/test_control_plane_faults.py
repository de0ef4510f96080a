"""Faults of the control plane and of its etcd, on a small real chain under steady load.

A `tasklane up` on an external etcd (so each can be SIGKILLed alone), the fund-yield rules,
and one `tasklane run` of demo.chain_app per group of fund-facade -> account-svc ->
nav-pricing (default and task) behind real Envoys. Twenty threads on keep-alive connections
send dyed and online requests (about 150/s in all) through one sidecar's egress to
fund-facade the whole time; every answer lists the hops that served it, so a failed request
and a leak (an online request served by a task group at any hop, or a dyed one served outside
the task group) are counted from what really happened."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.model.instance import DEFAULT_TTL
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.store.etcd import Store
from tests.support.chain import (
    DYE,
    GOOD,
    NEXT,
    ONLINE,
    STOP_TIMEOUT,
    TASK,
    XDS_TYPES,
    Load,
    Plane,
    Run,
    chain_app,
    children_of,
    get,
    hops,
    stop_run,
)
from tests.support.etcd import start_etcd
from tests.support.procs import wait_gone
from tests.support.up import (
    TASKLANE,
    Up,
    assert_one_line_error,
    get_json,
    start_up,
    wait_ready,
)
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(240)

GROUPS = ("default", "task")
RESYNC_LIMIT = 5.0
RULE_KINDS = ("Service", "TaskChain", "ScheduledTask")


@dataclass
class Chain:
    plane: Plane
    etcd: EmbeddedEtcd
    runs: list[Run]

    @property
    def egress(self) -> int:
        run = next(r for r in self.runs if (r.service, r.group) == ("nav-pricing", "default"))
        assert run.instance is not None
        return run.instance.egress_port

    def status(self) -> dict:
        code, body = get_json(self.plane.up.url("/api/v1/status"))
        assert code == 200, body
        return body

    def nodes(self) -> dict[str, dict[str, tuple[str, str]]]:
        """{node id: {xds type: (sent version, acked version)}} of the connected sidecars."""
        return {
            node["node_id"]: {
                kind: (
                    node["types"].get(kind, {}).get("sent_version", ""),
                    node["types"].get(kind, {}).get("acked_version", ""),
                )
                for kind in {*XDS_TYPES, *node["types"]}
            }
            for node in self.status()["nodes"]
        }

    def in_sync(self) -> dict[str, dict[str, tuple[str, str]]] | None:
        """The nodes when every sidecar is connected and ACKed all it was sent, else None."""
        nodes = self.nodes()
        if len(nodes) != len(self.runs):
            return None
        for types in nodes.values():
            if any(not sent or sent != acked for sent, acked in types.values()):
                return None
        return nodes

    def healthy(self) -> bool:
        try:
            return get_json(self.plane.up.url("/healthz"))[0] == 200
        except OSError:
            return False

    def rules(self) -> dict[str, object]:
        found = {}
        for kind in RULE_KINDS:
            code, body = get_json(self.plane.up.url(f"/api/v1/rules/{kind}"))
            assert code == 200, body
            found[kind] = body
        return found

    def registrations(self) -> dict[str, int]:
        return {f"{r.service}|{r.group}": r.stderr().count("registered again") for r in self.runs}

    def restart_up(self) -> None:
        """`tasklane up` again: same ports, state dir and external etcd."""
        old, ports = self.plane.up, self.plane.up.ports
        out, err = old.out.with_name("stdout-again"), old.err.with_name("stderr-again")
        with out.open("wb") as out_file, err.open("wb") as err_file:
            proc = subprocess.Popen(
                [*TASKLANE, "up", "--state-dir", str(old.state_dir)]
                + ["--xds-port", str(ports["xds"]), "--http-port", str(ports["http"])]
                + ["--etcd", self.etcd.endpoint],
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=err_file,
                cwd=old.out.parent,
            )
        self.plane.up = Up(proc, ports, old.state_dir, out, err)
        assert wait_ready(self.plane.up), self.plane.up.stderr()


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    etcd = start_etcd(tmp_path_factory.mktemp("etcd"))
    up: Up | None = None
    store: Store | None = None
    runs: list[Run] = []
    pids: list[int] = []
    try:
        up = start_up(tmp_path_factory.mktemp("up"), etcd=etcd.endpoint)
        store = Store.connect(etcd.endpoint)
        plane = Plane(up, store, tmp_path_factory.mktemp("runs"))
        applied = plane.tasklane("apply", "-f", str(GOOD))
        assert applied.returncode == 0, applied.stderr
        runs = [
            plane.launch(service, group, chain_app(service, group))
            for service in NEXT
            for group in GROUPS
        ]
        with ThreadPoolExecutor(len(runs)) as pool:
            list(pool.map(plane.registered, runs))
        pids = [pid for run in runs for pid in children_of(run.proc.pid)]
        running = Chain(plane, etcd, runs)
        egress = running.egress
        # Callers route to an instance once their first health check of it passed.
        wait_until(
            lambda: all(
                hops(get(egress, "fund-facade", headers)[1]) == served
                for headers, served in ((DYE, TASK), ({}, ONLINE))
            ),
            timeout=30,
            what="both chains answer",
        )
        wait_until(running.in_sync, timeout=15, what="every sidecar in sync")
        yield running
    finally:
        with ThreadPoolExecutor(max(len(runs), 1)) as pool:
            list(pool.map(stop_run, runs))
        if store is not None:
            store.close()
        if up is not None:
            current = plane.up if "plane" in locals() else up
            pids.append(current.proc.pid)
            if current.proc.poll() is None:
                current.proc.send_signal(signal.SIGTERM)
                try:
                    current.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    current.kill()
        if etcd.pid is not None:
            pids.append(etcd.pid)
        etcd.stop()
        pids += [run.proc.pid for run in runs]
        left = [pid for pid in pids if not wait_gone(pid, timeout=5)]
        assert not left, f"still running: {left}"


def test_control_plane_sigkill_then_restart(chain: Chain) -> None:
    before = chain.registrations()
    with Load(chain.egress) as load:
        wait_until(lambda: load.sent >= 50, timeout=10, what="load flows")
        chain.plane.up.proc.kill()
        killed = time.monotonic()
        chain.plane.up.proc.wait(timeout=STOP_TIMEOUT)
        # Traffic on the sidecars' last config alone, until the instances' leases (renewed
        # through the control plane) have expired: the restarted control plane must let the
        # runs register again before it serves a snapshot, or every endpoint would leave.
        wait_until(
            lambda: not chain.plane.instance_keys(),
            timeout=DEFAULT_TTL + 5,
            what="the instances' leases expire",
        )
        load.wait_sent(50)
        down = load.sent
        chain.restart_up()
        restarted = time.monotonic()
        downtime = restarted - killed
        wait_until(chain.in_sync, timeout=15, what="every sidecar in sync again")
        resync = time.monotonic() - restarted
        wait_until(
            lambda: all(chain.registrations()[k] > n for k, n in before.items()),
            timeout=20,
            what="every run registered again with the new control plane",
        )
        time.sleep(1)
    print(
        f"\ncontrol plane SIGKILL: {load.report()}; down {downtime:.2f}s (kill to ready), "
        f"resync {resync:.2f}s"
    )
    assert down > 0
    assert (load.failed, load.leaked) == (0, 0), load.report()
    assert resync <= RESYNC_LIMIT, f"sidecars back in sync after {resync:.2f}s"
    code, body = get_json(chain.plane.up.url("/api/v1/instances"))
    assert code == 200
    ids = {run.instance.id for run in chain.runs if run.instance is not None}
    assert ids <= {item["id"] for item in body["items"]}


def test_etcd_sigkill_then_restart(chain: Chain, tmp_path: Path) -> None:
    rules = chain.rules()
    versions = wait_until(chain.in_sync, timeout=15, what="every sidecar in sync")
    changed = tmp_path / "changed.yaml"
    changed.write_text(GOOD.read_text().replace("weight: 100", "weight: 50"))
    assert changed.read_text() != GOOD.read_text()
    with Load(chain.egress) as load:
        wait_until(lambda: load.sent >= 50, timeout=10, what="load flows")
        assert chain.etcd.pid is not None
        os.kill(chain.etcd.pid, signal.SIGKILL)
        assert wait_gone(chain.etcd.pid, timeout=5)
        chain.etcd.stop()  # reaps it; the data dir and ports stay
        wait_until(lambda: not chain.healthy(), timeout=10, what="/healthz sees etcd gone")
        started = time.monotonic()
        applied = chain.plane.tasklane("apply", "-f", str(changed))
        took = time.monotonic() - started
        assert applied.returncode == 2, (applied.returncode, applied.stdout, applied.stderr)
        assert_one_line_error(applied.stderr, "")
        chain.etcd.start(timeout=20)
        wait_until(chain.healthy, timeout=15, what="the control plane resumes (/healthz 200)")
        time.sleep(3)  # room for any (wrong) push and for keep-alives to settle
    print(
        f"\netcd SIGKILL: {load.report()}; apply during outage: exit {applied.returncode} "
        f"in {took:.1f}s: {applied.stderr.strip()}"
    )
    assert (load.failed, load.leaked) == (0, 0), load.report()
    assert chain.rules() == rules
    after = wait_until(chain.in_sync, timeout=5, what="every sidecar in sync")
    assert after == versions, "the control plane pushed although nothing changed"
