"""Faults inside the mesh under steady load: an instance killed hard, a sidecar that rejects
config, rule changes (weights, a chain added and removed, a group scaled 0 -> 3 -> 0), and
spoofed or malformed dyes at the gateway.

A real `tasklane up` (embedded etcd) with the rules of tests/faults/rules.yaml (retries on
every Service and hop), one `tasklane run` of demo.chain_app per group of fund-facade ->
account-svc -> nav-pricing (default and task), and load through one sidecar's egress (or the
gateway). Every answer lists the instance that served each hop, so failed, leaked and
rejected requests are counted from what really happened. Each test starts whatever extra it
needs (a second instance, a sidecar, a gateway) and puts the rules back, so the tests do not
depend on each other's order or worker."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from controlplane.model.instance import DEFAULT_TTL
from controlplane.runtime.envoy import EnvoyProcess
from controlplane.runtime.ports import free_port
from controlplane.runtime.process import dying_with_parent
from controlplane.store.etcd import Store
from controlplane.xds.names import HEALTH_PATH
from tests.support.chain import (
    DYE,
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
    cluster_hosts,
    get,
    hops,
    stop_run,
)
from tests.support.procs import wait_gone
from tests.support.up import TASKLANE, get_json, start_up
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(240)

RULES = Path(__file__).with_name("rules.yaml")
GROUPS = ("default", "task")
# An endpoint of a run killed hard leaves EDS when its lease expires (DEFAULT_TTL after the
# last keep-alive), plus the control plane's build and push: this much more at most.
EDS_MARGIN = 2.0
SYNC_TIMEOUT = 15.0


@dataclass
class Mesh:
    plane: Plane
    runs: list[Run]  # the fixture's: one per group of every service
    extra: list[Run] = field(default_factory=list)  # started by a test, stopped by the fixture

    def run(self, service: str, group: str) -> Run:
        """The fixture's run of (service, group)."""
        return next(r for r in self.runs if (r.service, r.group) == (service, group))

    @property
    def egress(self) -> int:
        """The test's way in: nav-pricing|default's egress (any sidecar's would do)."""
        instance = self.run("nav-pricing", "default").instance
        assert instance is not None
        return instance.egress_port

    def status(self) -> dict:
        """GET /api/v1/status: per node what it was sent, ACKed and NACKed."""
        code, body = get_json(self.plane.up.url("/api/v1/status"))
        assert code == 200, body
        return body

    def nodes(self) -> dict[str, dict]:
        """The connected sidecars' status by node id."""
        return {node["node_id"]: node for node in self.status()["nodes"]}

    def in_sync(self, count: int, skip: frozenset[str] = frozenset()) -> dict[str, dict] | None:
        """{node: {type: acked version}} once `count` sidecars are connected and every one
        (but `skip`) ACKed all it was sent; else None."""
        nodes = self.nodes()
        if len(nodes) != count:
            return None
        versions = {}
        for node_id, node in nodes.items():
            if node_id in skip:
                continue
            types = {kind: node["types"].get(kind, {}) for kind in {*XDS_TYPES, *node["types"]}}
            sent_acked = [(t.get("sent_version"), t.get("acked_version")) for t in types.values()]
            if any(not sent or sent != acked for sent, acked in sent_acked):
                return None
            versions[node_id] = {kind: t["acked_version"] for kind, t in types.items()}
        return versions

    def sidecars(self) -> int:
        """How many `tasklane run` sidecars are running now."""
        return sum(run.proc.poll() is None for run in [*self.runs, *self.extra])

    def apply(self, text: str, tmp_path: Path, name: str = "change.yaml") -> None:
        """`tasklane apply -f` of `text`, as an operator changes rules."""
        path = tmp_path / name
        path.write_text(text)
        applied = self.plane.tasklane("apply", "-f", str(path))
        assert applied.returncode == 0, applied.stderr

    def launch(self, service: str, group: str) -> Run:
        """Start one more instance; the fixture stops it even if the test fails."""
        run = self.plane.launch(service, group, chain_app(service, group))
        self.extra.append(run)
        return run


def rules_with(**changes: object) -> str:
    """tests/faults/rules.yaml with documents changed: {"<kind>/<name>": fn(doc) -> doc|None}
    (None drops it), and extra documents under "add"."""
    docs = [doc for doc in yaml.safe_load_all(RULES.read_text()) if doc]
    out = []
    for doc in docs:
        change = changes.get(f"{doc['kind']}/{doc['metadata']['name']}")
        doc = change(doc) if callable(change) else doc
        if doc is not None:
            out.append(doc)
    out += list(changes.get("add", []))  # type: ignore[arg-type]
    return yaml.safe_dump_all(out, sort_keys=False)


def fund_yield_weight(weight: int) -> object:
    """A rules_with change: fund-yield's share of dyed requests into fund-facade|task."""

    def change(doc: dict) -> dict:
        doc["spec"]["hops"][0]["weight"] = weight
        return doc

    return change


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    up = start_up(tmp_path_factory.mktemp("up"))
    store: Store | None = None
    running: Mesh | None = None
    pids: list[int] = [up.proc.pid]
    try:
        store = Store.connect(f"127.0.0.1:{up.ports['etcd_client']}")
        plane = Plane(up, store, tmp_path_factory.mktemp("runs"))
        applied = plane.tasklane("apply", "-f", str(RULES))
        assert applied.returncode == 0, applied.stderr
        runs = [
            plane.launch(service, group, chain_app(service, group))
            for service in NEXT
            for group in GROUPS
        ]
        running = Mesh(plane, runs)
        with ThreadPoolExecutor(len(runs)) as pool:
            list(pool.map(plane.registered, runs))
        pids += [pid for run in runs for pid in children_of(run.proc.pid)]
        egress = running.egress
        wait_until(
            lambda: all(
                hops(get(egress, "fund-facade", headers)[1]) == served
                for headers, served in ((DYE, TASK), ({}, ONLINE))
            ),
            timeout=30,
            what="both chains answer",
        )
        wait_until(lambda: running.in_sync(len(runs)), SYNC_TIMEOUT, "every sidecar in sync")
        yield running
    finally:
        everything = [*running.runs, *running.extra] if running is not None else []
        with ThreadPoolExecutor(max(len(everything), 1)) as pool:
            list(pool.map(stop_run, everything))
        pids += [run.proc.pid for run in everything]
        if store is not None:
            store.close()
        if up.proc.poll() is None:
            up.proc.send_signal(signal.SIGTERM)
            try:
                up.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                up.kill()
        left = [pid for pid in pids if not wait_gone(pid, timeout=5)]
        assert not left, f"still running: {left}"


def _retry_stats(admin_port: int, cluster: str) -> dict[str, int]:
    """The caller sidecar's retry counters for one cluster (Envoy admin /stats)."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", f"/stats?filter=^cluster\\.{cluster.replace('|', '.')}\\.")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    wanted = ("upstream_rq_retry", "upstream_rq_retry_success", "upstream_rq_retry_overflow")
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        short = name.rsplit(".", 1)[-1]
        if short in wanted and value.strip().isdigit():
            found[short] = int(value)
    return found


def envoy_work_dir(run: Run) -> Path:
    """The directory of a run's Envoy (its bootstrap), from the Envoy's command line."""
    assert run.instance is not None
    [envoy] = [pid for pid in children_of(run.proc.pid) if pid != run.instance.pid]
    args = Path(f"/proc/{envoy}/cmdline").read_bytes().split(b"\0")
    return Path(args[args.index(b"-c") + 1].decode()).parent


def account_svc_instance(mesh: Mesh) -> str | None:
    """Which instance served the account-svc hop of one dyed request (None: no answer)."""
    served = get(mesh.egress, "fund-facade", DYE)[1].get("hops", [])
    return served[1].get("instance") if len(served) > 1 else None


# ---------------------------------------------------------------------------- instance SIGKILL


def test_instance_sigkill_leaves_eds_within_the_lease_and_retries_hide_it(mesh: Mesh) -> None:
    """account-svc|task gets a second instance; under load one of the two is SIGKILLed with
    its app (a `tasklane run` killed hard cannot deregister). Its callers' retries go to the
    other instance (previous_hosts), and its endpoint leaves EDS when its lease expires."""
    first = mesh.run("account-svc", "task")
    second = mesh.plane.registered(mesh.launch("account-svc", "task"))
    assert first.instance is not None and second.instance is not None
    caller = mesh.run("fund-facade", "task").instance
    assert caller is not None
    cluster = "account-svc|task"
    addresses = {"{}:{}".format(*r.instance.address) for r in (first, second)}  # type: ignore[union-attr]

    def served_by_both() -> bool:
        seen = {account_svc_instance(mesh) for _ in range(8)}
        return seen == {first.instance.id, second.instance.id}  # type: ignore[union-attr]

    wait_until(lambda: cluster_hosts(caller.admin_port, cluster) == addresses, 15, "both in EDS")
    wait_until(served_by_both, 15, "dyed requests served by both account-svc|task instances")
    victim, survivor = second, first
    gone = "{}:{}".format(*victim.instance.address)  # type: ignore[union-attr]
    entry = mesh.run("nav-pricing", "default").instance  # the test's egress, calling fund-facade
    assert entry is not None
    retries_before = _retry_stats(caller.admin_port, cluster)
    entry_before = _retry_stats(entry.admin_port, "fund-facade|task")
    with Load(mesh.egress) as load:
        load.wait_sent(200)
        children = children_of(victim.proc.pid)
        work_dir = envoy_work_dir(victim)
        victim.proc.kill()
        killed = time.monotonic()
        victim.proc.wait(timeout=5)
        for pid in children:
            assert wait_gone(pid, timeout=5), f"pid {pid} of the killed run still running"
        wait_until(
            lambda: victim.instance.key not in mesh.plane.instance_keys(),  # type: ignore[union-attr]
            DEFAULT_TTL + EDS_MARGIN + 3,
            "the killed instance's lease expired",
        )
        expired = time.monotonic() - killed
        wait_until(
            lambda: gone not in cluster_hosts(caller.admin_port, cluster),
            DEFAULT_TTL + EDS_MARGIN + 3,
            "the killed instance left the caller's EDS",
        )
        left_eds = time.monotonic() - killed
        load.wait_sent(300)
    retries = _retry_stats(caller.admin_port, cluster)
    retried = {k: retries.get(k, 0) - retries_before.get(k, 0) for k in retries}
    entry_after = _retry_stats(entry.admin_port, "fund-facade|task")
    entry_retried = {k: entry_after.get(k, 0) - entry_before.get(k, 0) for k in entry_after}
    after = {account_svc_instance(mesh) for _ in range(5)}
    print(
        f"\ninstance SIGKILL (account-svc|task, 2 -> 1, retries 2 + previous_hosts): "
        f"{load.report()}; lease expired after {expired:.1f}s, left the caller's EDS after "
        f"{left_eds:.1f}s (TTL {DEFAULT_TTL}s); retries at the caller of account-svc "
        f"{retried}, at the caller of fund-facade {entry_retried}"
    )
    assert (load.failed, load.leaked) == (0, 0), load.report()
    assert left_eds <= DEFAULT_TTL + EDS_MARGIN, f"left EDS after {left_eds:.1f}s"
    assert after == {survivor.instance.id}  # type: ignore[union-attr]
    assert retried.get("upstream_rq_retry_overflow", 0) == 0, retried
    shutil.rmtree(work_dir)  # the one thing a run killed hard cannot clean up


# ---------------------------------------------------------------------------- a NACKing sidecar


class WithoutAggregateEnvoy(EnvoyProcess):
    """A sidecar like any other but without Envoy's aggregate cluster extension, as a minimal
    or older Envoy build would be: it alone rejects the `<service>|<group>|loose` cluster
    that a `loose` chain brings."""

    def command(self) -> list[str]:
        return [*super().command(), "--disable-extensions", AGGREGATE_EXTENSION]


AGGREGATE_EXTENSION = "envoy.clusters/envoy.clusters.aggregate"
LOOSE_CHAIN = {
    "apiVersion": "tasklane.io/v1",
    "kind": "TaskChain",
    "metadata": {"name": "spot-check"},
    "spec": {
        "dye": {"values": ["spot-check"]},
        "fallback": "loose",
        "hops": [{"service": "nav-pricing", "group": "burst"}],
    },
}


def test_a_sidecar_that_nacks_is_reported_and_the_others_keep_serving(
    mesh: Mesh, tmp_path: Path
) -> None:
    count = mesh.sidecars() + 1
    ports: dict[str, int] = {}
    for name in ("admin", "egress", "inbound", "app"):
        port = free_port()
        while port in ports.values():
            port = free_port()
        ports[name] = port
    node_id = f"nav-pricing|default|no-aggregate-{ports['admin']}"
    envoy = WithoutAggregateEnvoy(
        node_id=node_id,
        service="nav-pricing",
        group="default",
        xds_host="127.0.0.1",
        xds_port=mesh.plane.up.ports["xds"],
        admin_port=ports["admin"],
        delta=False,
        work_dir=tmp_path / "no-aggregate-envoy",
        parts={
            "sidecar.yaml": {
                "egress_port": ports["egress"],
                "inbound_host": "127.0.0.1",
                "inbound_port": ports["inbound"],
                "app_port": ports["app"],  # no app: it is never registered, only a caller
                "health_path": HEALTH_PATH,
            }
        },
    )
    with envoy:
        envoy.wait_ready(30)
        before = wait_until(lambda: mesh.in_sync(count), SYNC_TIMEOUT, "all in sync, new one too")
        wait_until(
            lambda: hops(get(ports["egress"], "fund-facade", DYE)[1]) == TASK,
            15,
            "the new sidecar routes dyed requests",
        )
        with Load(mesh.egress) as load, Load(ports["egress"], threads=4, target=30) as own:
            load.wait_sent(150)
            # A `loose` chain: the sidecars holding nav-pricing (the new one included: it calls
            # it) get the aggregate cluster nav-pricing|burst|loose.
            mesh.apply(rules_with(add=[LOOSE_CHAIN]), tmp_path)
            changed = time.monotonic()

            def nacked_and_others_synced() -> dict | None:
                node = mesh.nodes().get(node_id)
                synced = mesh.in_sync(count, skip=frozenset({node_id}))
                if node is None or synced is None:
                    return None
                cds = node["types"].get("cds", {})
                moved = any(synced[n]["cds"] != before[n]["cds"] for n in synced)
                return cds if cds.get("last_nack") and moved else None

            try:
                cds = wait_until(nacked_and_others_synced, SYNC_TIMEOUT, "NACK on one node only")
            except AssertionError as error:
                raise AssertionError(f"{error}; status: {mesh.nodes()}") from None
            seen = time.monotonic() - changed
            load.wait_sent(300)
        status = mesh.plane.tasklane("status")
    nack = cds["last_nack"]
    line = next((row for row in status.stdout.splitlines() if node_id in row), "")
    print(
        f"\nsidecar NACK (CDS: a loose chain's aggregate cluster, on the one of {count} sidecars "
        f"without that extension): others "
        f"{load.report()}; via the NACKing sidecar {own.report()}; NACK seen and the others "
        f"synced {seen:.2f}s after the apply; message: {nack['message'][:120]}"
    )
    try:
        assert (load.failed, load.leaked) == (0, 0), load.report()
        # The NACKing sidecar keeps routing on the last config it accepted.
        assert (own.failed, own.leaked) == (0, 0), own.report()
        assert "aggregate" in nack["message"], nack
        assert cds["acked_version"] == before[node_id]["cds"] != nack["version"]
        assert cds["nacks"] >= 1
        assert status.returncode == 0, status.stderr
        assert "NACK" in line, status.stdout
    finally:
        deleted = mesh.plane.tasklane("delete", "taskchain", "spot-check")
        assert deleted.returncode == 0, deleted.stderr
        wait_until(lambda: mesh.in_sync(count - 1), SYNC_TIMEOUT, "in sync without the chain")


# ---------------------------------------------------------------------------- rule changes

WEIGHTS = (0, 25, 50, 100)  # fund-yield's share of dyed requests into fund-facade|task
STEP_S = 1.5  # load on each state once every sidecar has it
PROBE = "scale-probe"
PROBE_CHAIN = {
    "apiVersion": "tasklane.io/v1",
    "kind": "TaskChain",
    "metadata": {"name": PROBE},
    "spec": {
        "dye": {"values": [PROBE]},
        "fallback": "strict",
        "hops": [{"service": "nav-pricing", "group": "burst"}],
    },
}
SCALE_TO = 3


def judge_weighted(kind: str, status: int, answer: dict) -> str:
    """Dyed: fund-facade in either group (the weight splits it), every later hop in `task`;
    "ok-task" / "ok-default" by the first hop. Online: `default` everywhere."""
    if status != 200:
        return "failed"
    served = [group for _, group in hops(answer)]
    if len(served) != len(NEXT):
        return "failed"
    if kind == "online":
        return "ok" if set(served) == {"default"} else "leaked"
    if set(served[1:]) != {"task"} or served[0] not in ("task", "default"):
        return "leaked"
    return f"ok-{served[0]}"


def judge_probe(kind: str, status: int, answer: dict) -> str:
    """nav-pricing with the probe's dye: "ok-burst" (the chain's group), "ok-default" (no
    chain), "rejected" (strict: the chain's group has no healthy instance)."""
    if status == 503 and "no healthy instance (strict_reject)" in answer.get("error", ""):
        return "rejected"
    if status != 200:
        return "failed"
    served = hops(answer)
    if served in ([("nav-pricing", "burst")], [("nav-pricing", "default")]):
        return f"ok-{served[0][1]}"
    return "leaked"


def test_rule_changes_under_load(mesh: Mesh, tmp_path: Path) -> None:
    """Weights stepped 0 -> 25 -> 50 -> 100, a strict chain added, its group scaled 0 -> 3 -> 0
    with `tasklane run` instances, the chain made loose, then removed: nothing fails, nothing
    leaks, and the probe chain's 503s happen exactly while it is strict with no instance."""
    count = mesh.sidecars()
    caller = mesh.run("nav-pricing", "default").instance
    assert caller is not None
    synced_after: list[float] = []

    def change(text: str | None, name: str) -> float:
        """Apply `text` (None: delete the probe chain), then wait until every sidecar ACKed
        new routes; returns when."""
        before = wait_until(lambda: mesh.in_sync(count), SYNC_TIMEOUT, "in sync before")
        started = time.monotonic()
        if text is None:
            deleted = mesh.plane.tasklane("delete", "taskchain", PROBE)
            assert deleted.returncode == 0, deleted.stderr
        else:
            mesh.apply(text, tmp_path, name)

        def moved() -> bool:
            """Every sidecar in sync, the way in with the new hosts (the load's judge counts
            from here). It holds the services the loads call, asked for on demand; a scoped
            sidecar that holds none of the changed hosts is sent nothing."""
            now = mesh.in_sync(count)
            way_in = [n for n in now or () if n.startswith("nav-pricing|default|")]
            return bool(way_in) and all(now[n].get("vhds") != before[n].get("vhds") for n in way_in)

        wait_until(moved, SYNC_TIMEOUT, f"every sidecar has {name}")
        synced_after.append(time.monotonic() - started)
        return time.monotonic()

    main = Load(mesh.egress, threads=16, target=120, judge=judge_weighted)
    probe = Load(
        mesh.egress,
        threads=4,
        target=90,
        service="nav-pricing",
        requests=(("probe", {"x-task-dye": PROBE}),),
        judge=judge_probe,
    )
    steps: list[tuple[int, float, float]] = []
    burst: list[Run] = []
    with main, probe:
        main.wait_sent(100)
        for weight in WEIGHTS:
            fund_yield = {"TaskChain/fund-yield": fund_yield_weight(weight)}
            ready = change(rules_with(**fund_yield), f"weight-{weight}.yaml")
            time.sleep(STEP_S)
            steps.append((weight, ready, time.monotonic()))
        # A strict chain onto nav-pricing|burst, which has no instance yet.
        chain_applied = time.monotonic()
        added = change(rules_with(add=[PROBE_CHAIN]), "chain-added.yaml")
        time.sleep(STEP_S)
        at_zero = (added, time.monotonic())
        burst = [mesh.launch("nav-pricing", "burst") for _ in range(SCALE_TO)]
        with ThreadPoolExecutor(SCALE_TO) as pool:
            list(pool.map(mesh.plane.registered, burst))
        count += SCALE_TO
        addresses = {"{}:{}".format(*run.instance.address) for run in burst}  # type: ignore[union-attr]
        wait_until(
            lambda: cluster_hosts(caller.admin_port, "nav-pricing|burst") == addresses,
            15,
            "the caller has the 3 new instances",
        )
        wait_until(
            lambda: probe.between(time.monotonic() - 0.5, time.monotonic()).keys() == {"ok-burst"},
            15,
            "the new instances serve (health checks passed)",
        )
        scaled = time.monotonic()
        time.sleep(STEP_S)
        at_three = (scaled, time.monotonic())
        with ThreadPoolExecutor(SCALE_TO) as pool:
            list(pool.map(stop_run, burst))
        count -= SCALE_TO
        wait_until(
            lambda: not cluster_hosts(caller.admin_port, "nav-pricing|burst"),
            15,
            "the caller has no burst instance left",
        )
        emptied = time.monotonic()
        time.sleep(STEP_S)
        at_zero_again = (emptied, time.monotonic())
        # The same chain `loose`: with its group at 0 it is served by `default` instead.
        loose_chain = {**PROBE_CHAIN, "spec": {**PROBE_CHAIN["spec"], "fallback": "loose"}}
        loosened = change(rules_with(add=[loose_chain]), "chain-loose.yaml")
        time.sleep(STEP_S)
        loose_at_zero = (loosened, time.monotonic())
        removed = change(None, "the probe chain deleted")
        time.sleep(STEP_S)
        after = (removed, time.monotonic())

    shares = {}
    for weight, start, end in steps:
        seen = main.between(start, end)
        task, default = seen.get("ok-task", 0), seen.get("ok-default", 0)
        shares[weight] = (100.0 * task / (task + default)) if task + default else -1.0
    windows = {
        "before the chain": probe.between(0, chain_applied),
        "group at 0": probe.between(*at_zero),
        f"group at {SCALE_TO}": probe.between(*at_three),
        "group at 0 again": probe.between(*at_zero_again),
        "loose, group at 0": probe.between(*loose_at_zero),
        "chain removed": probe.between(*after),
    }
    rejected_when_not_allowed = sum(
        probe.between(start, end).get("rejected", 0)
        for start, end in ((0, chain_applied), at_three, loose_at_zero, (after[0], float("inf")))
    )
    print(
        f"\nrule changes: fund-yield {main.report()}; dyed share into fund-facade|task by "
        f"weight {', '.join(f'{w}: {s:.0f}%' for w, s in shares.items())}; probe chain "
        f"{probe.report()}; probe verdicts by window {windows}; every sidecar had each change "
        f"after max {max(synced_after):.2f}s"
    )
    assert (main.failed, main.leaked) == (0, 0), main.report()
    assert (probe.failed, probe.leaked) == (0, 0), probe.report()
    assert shares[0] == 0 and shares[100] == 100, shares
    assert 5 <= shares[25] <= 50 and 25 <= shares[50] <= 75, shares
    assert set(windows["before the chain"]) == {"ok-default"}, windows
    assert set(windows["group at 0"]) == {"rejected"}, windows
    assert set(windows[f"group at {SCALE_TO}"]) == {"ok-burst"}, windows
    assert set(windows["group at 0 again"]) == {"rejected"}, windows
    assert set(windows["loose, group at 0"]) == {"ok-default"}, windows
    assert set(windows["chain removed"]) == {"ok-default"}, windows
    assert rejected_when_not_allowed == 0, windows


# ---------------------------------------------------------------------------- the gateway

SECRET_HEADER = "x-tasklane-trust"
SECRET = "fault-test-secret-42"
GATEWAY_REQUESTS = (
    ("trusted", {**DYE, SECRET_HEADER: SECRET}),
    ("spoofed-header", DYE),
    ("spoofed-baggage", {"baggage": "task-dye=fund-yield"}),
    ("online", {}),
    ("spoofed-both", {**DYE, "baggage": "other=1,task-dye=fund-yield@run-7;p=1"}),
    ("wrong-secret", {**DYE, SECRET_HEADER: SECRET + "x"}),
)
LONG = "fund-yield@" + "x" * 10_240
# (name, header lines) of malformed dyes; each is sent by an outsider (its dyes are stripped,
# or Envoy refuses the request) and by a trusted caller (the gateway refuses an invalid dye
# with 400 and the reason: it must not reach a task group, where the app's propagation would
# drop it half-way down the chain).
MALFORMED: tuple[tuple[str, list[tuple[bytes, bytes]]], ...] = (
    ("10 KB dye header", [(b"x-task-dye", LONG.encode())]),
    ("10 KB baggage member", [(b"baggage", b"task-dye=" + LONG.encode())]),
    ("control character in the dye", [(b"x-task-dye", b"fund-yield@\x01run")]),
    ("DEL in the dye", [(b"x-task-dye", b"fund-yield@\x7frun")]),
    ("NUL in the dye", [(b"x-task-dye", b"fund-yield@\x00run")]),
    ("non-ASCII dye", [(b"x-task-dye", "fund-yield@é".encode())]),
    ("dye header twice", [(b"x-task-dye", b"fund-yield"), (b"x-task-dye", b"fund-yield")]),
    ("baggage member without value", [(b"baggage", b"task-dye")]),
    ("baggage member with empty value", [(b"baggage", b"task-dye=;p=1")]),
    ("baggage value with a space", [(b"baggage", b"task-dye=fund yield")]),
    ("baggage value with a backslash", [(b"baggage", b"a=1,task-dye=fund-yield\\x")]),
    ("baggage with two dyes", [(b"baggage", b"task-dye=fund-yield,task-dye=fund-yield@2")]),
    # Baggage values are percent-decoded (model.dye): this one carries CR LF.
    ("encoded CR LF in the baggage value", [(b"baggage", b"task-dye=fund-yield@%0D%0Arun")]),
)
# Not a dye at all (no key): served online whoever sends it.
NOT_A_DYE = ("baggage without key", [(b"baggage", b"=fund-yield,,;=,")])
TRUST_LINE = (SECRET_HEADER.encode(), SECRET.encode())


def judge_gateway(kind: str, status: int, answer: dict) -> str:
    """Only a trusted caller's dyed request may reach the task groups; spoofed dyes are
    stripped, so those requests are online ones."""
    if status != 200:
        return "failed"
    served = {group for _, group in hops(answer)}
    if len(hops(answer)) != len(NEXT):
        return "failed"
    return "ok" if served == ({"task"} if kind == "trusted" else {"default"}) else "leaked"


def raw_get(port: int, lines: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    """GET / on fund-facade with header lines sent byte for byte (http.client refuses control
    characters); (-1, error) when the connection breaks."""
    head = b"GET / HTTP/1.1\r\nHost: fund-facade\r\nConnection: close\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in lines) + b"\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        return -1, {"error": repr(exc)}
    data = b"".join(chunks)
    status_line, _, rest = data.partition(b"\r\n")
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return -1, {"error": repr(data[:200])}
    body = rest.partition(b"\r\n\r\n")[2]
    try:
        return int(parts[1]), json.loads(body)
    except ValueError:
        return int(parts[1]), {"error": body.decode(errors="replace")[:200]}


@dataclass
class Gateway:
    """A `tasklane gateway` process, its port and its output."""

    proc: subprocess.Popen[bytes]
    port: int
    out: Path


def start_gateway(mesh: Mesh, tmp_path: Path) -> Gateway:
    """`tasklane gateway` trusting 10.0.0.0/8 (not the test, on 127.0.0.1) and SECRET."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    port = free_port()
    out = tmp_path / "gateway.out"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            dying_with_parent(
                [*TASKLANE, "gateway", "--server", mesh.plane.server, "--port", str(port)]
                + ["--host", "127.0.0.1", "--trusted-cidr", "10.0.0.0/8"]
                + ["--trust-header", SECRET_HEADER, "--trust-secret-file", str(secret)]
                + ["--state-dir", str(tmp_path / "state")]
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=mesh.plane.env(),
        )
    gateway = Gateway(proc, port, out)
    wait_until(
        lambda: proc.poll() is not None or "tasklane gateway: listening" in out.read_text(),
        30,
        "the gateway is ready",
    )
    assert proc.poll() is None, out.read_text()
    return gateway


def test_gateway_spoofed_and_malformed_dyes_never_reach_a_task_group(
    mesh: Mesh, tmp_path: Path
) -> None:
    gateway = start_gateway(mesh, tmp_path)
    try:
        trusted = {**DYE, SECRET_HEADER: SECRET}
        wait_until(
            lambda: (
                hops(get(gateway.port, "fund-facade", trusted)[1]) == TASK
                and hops(get(gateway.port, "fund-facade", DYE)[1]) == ONLINE
            ),
            20,
            "the gateway routes trusted and outside callers",
        )
        outcomes: dict[str, str] = {}
        reasons: dict[str, str] = {}
        reached_task: list[str] = []
        with Load(gateway.port, threads=18, requests=GATEWAY_REQUESTS, judge=judge_gateway) as load:
            load.wait_sent(200)
            cases = [
                (f"{name} ({who})", name, [*extra, *lines])
                for name, lines in (*MALFORMED, NOT_A_DYE)
                for who, extra in (("outsider", []), ("trusted", [TRUST_LINE]))
            ]
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda case: raw_get(gateway.port, case[2]), cases))
            for (case, name, _), (status, answer) in zip(cases, answers, strict=True):
                groups = {group for _, group in hops(answer)}
                if status == 200 and groups == {"default"}:
                    outcomes[case] = "online"
                elif status == 400:
                    outcomes[case] = "rejected 400"
                    reasons[name] = answer.get("error", "").strip()[:100]
                else:
                    outcomes[case] = f"{status} {groups or answer}"
                if "task" in groups:
                    reached_task.append(case)
            load.wait_sent(200)
        alive = gateway.proc.poll() is None
        print(
            f"\ngateway under load: {load.report()}; malformed dyes: "
            + "; ".join(f"{case}: {outcome}" for case, outcome in outcomes.items())
            + f"; reasons given to trusted callers: {reasons}"
        )
        assert (load.failed, load.leaked) == (0, 0), load.report()
        assert load.counts.get("ok", 0) == load.sent
        assert not reached_task, reached_task
        assert set(outcomes.values()) <= {"online", "rejected 400"}, outcomes
        for name, _ in MALFORMED:
            assert outcomes[f"{name} (trusted)"] == "rejected 400", outcomes
        assert outcomes[f"{NOT_A_DYE[0]} (trusted)"] == "online", outcomes
        assert alive, gateway.out.read_text()
        assert get(gateway.port, "fund-facade", trusted)[0] == 200  # still serving
    finally:
        gateway.proc.send_signal(signal.SIGTERM)
        try:
            assert gateway.proc.wait(timeout=STOP_TIMEOUT) == 0, gateway.out.read_text()
        finally:
            if gateway.proc.poll() is None:
                gateway.proc.kill()
                gateway.proc.wait()
