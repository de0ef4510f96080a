"""Learning scopes from access logs without etcd: which egress entries are sightings
(telemetry/learn.py), and how ScopeRecorder's throttle turns a flood of them into few writes
with bounded memory (store/scope.py; its store is a counting double here, real etcd in
tests/integration/test_scope_store.py)."""

from __future__ import annotations

from controlplane.model.group import GroupKey
from controlplane.model.load import load_text
from controlplane.model.rules import RuleSet
from controlplane.model.scope import LEARNED, ON_DEMAND
from controlplane.model.validate import apply
from controlplane.store.scope import ScopeRecorder
from controlplane.telemetry.accounting import EGRESS, GATEWAY, INBOUND, LogEntry
from controlplane.telemetry.learn import Learner, sightings
from controlplane.xds.names import BLACK_HOLE_ROUTE, PASSTHROUGH_CLUSTER
from tests.support.rules import service

RULES = apply(
    RuleSet.empty(),
    load_text(service("fund-facade") + service("account-svc") + service("ledger-svc"), "r.yaml"),
)
FACADE = GroupKey("fund-facade", "default")
IDLE = 100.0


def egress(**fields: str) -> LogEntry:
    base = {"node": "n1", "service": "fund-facade", "group": "default", "direction": EGRESS}
    return LogEntry(**{**base, **fields})


def test_egress_to_a_mesh_service_is_a_sighting() -> None:
    entries = [
        egress(cluster="account-svc|task", upstream="127.0.0.1:1"),
        egress(cluster="account-svc|task|loose", upstream="127.0.0.1:1"),
        egress(cluster="", authority="ledger-svc:8080", flags=frozenset({"NR"})),
        egress(service="account-svc", group="task", cluster="ledger-svc|default"),
        # A service the sidecar had no config for went out as if outside the mesh.
        egress(service="ledger-svc", route=PASSTHROUGH_CLUSTER, cluster=PASSTHROUGH_CLUSTER,
               authority="account-svc:8080"),
        egress(service="ledger-svc", group="task", route=BLACK_HOLE_ROUTE, authority="fund-facade"),
    ]  # fmt: skip
    assert sightings(RULES, entries) == {
        (FACADE, "account-svc"),
        (FACADE, "ledger-svc"),
        (GroupKey("account-svc", "task"), "ledger-svc"),
        (GroupKey("ledger-svc", "default"), "account-svc"),
        (GroupKey("ledger-svc", "task"), "fund-facade"),
    }


def test_what_is_no_sighting() -> None:
    entries = [
        egress(route=PASSTHROUGH_CLUSTER, cluster=PASSTHROUGH_CLUSTER, authority="example.com"),
        egress(route=BLACK_HOLE_ROUTE, authority="account-svc.example.com:443"),
        egress(authority="no-such-svc:80"),  # a Host that is no service of the rules
        egress(cluster="gone-svc|default"),  # a cluster of a service deleted since
        egress(service="no-such-svc", cluster="account-svc|default"),  # unknown caller
        egress(group="nightly", cluster="account-svc|default"),  # a group no rule defines
        egress(direction=INBOUND, cluster="local-app"),
        egress(direction=GATEWAY, service="@gateway", cluster="account-svc|default"),
    ]
    assert sightings(RULES, entries) == set()


def test_learner_hands_each_pair_of_a_batch_once() -> None:
    seen: list[tuple[GroupKey, str, float]] = []
    learner = Learner(lambda: RULES, lambda *args: seen.append(args), clock=lambda: 42.0)
    learner.ingest([egress(cluster="account-svc|default")] * 300)
    assert seen == [(FACADE, "account-svc", 42.0)]


class CountingStore:
    """Just enough of a Store for record_sighting: every key absent, every write counted."""

    def __init__(self) -> None:
        self.writes = 0

    def get_versioned(self, key: str) -> tuple[None, int]:
        return None, 0

    def txn(self, puts: dict, deletes: list, expect: dict) -> bool:
        self.writes += 1
        return True


def test_offer_queues_a_pair_once_until_written() -> None:
    recorder = ScopeRecorder(CountingStore(), IDLE)
    assert recorder.offer(FACADE, "account-svc", ON_DEMAND, 1.0)
    assert not any(recorder.offer(FACADE, "account-svc", LEARNED, 1.0 + i) for i in range(99))
    assert recorder.offer(FACADE, "ledger-svc", LEARNED, 1.0)
    assert recorder.pending() == 2


def test_record_is_throttled_to_one_write_per_refresh() -> None:
    store = CountingStore()
    recorder = ScopeRecorder(store, IDLE)  # refresh: 10 s
    for i in range(1000):  # ten a second for 100 s
        recorder.record(FACADE, "account-svc", LEARNED, 1000.0 + i / 10)
    assert store.writes == 10
    assert not recorder.offer(FACADE, "account-svc", LEARNED, 1099.0)  # written at 1090
    assert recorder.offer(FACADE, "account-svc", LEARNED, 1100.0)


def test_throttle_memory_holds_only_recent_writes() -> None:
    recorder = ScopeRecorder(CountingStore(), IDLE)
    for n in range(500):
        recorder.record(GroupKey(f"svc-{n}", "default"), "account-svc", LEARNED, 1000.0)
    assert recorder.written() == 500
    recorder.record(FACADE, "account-svc", LEARNED, 1000.0 + recorder.refresh)
    assert recorder.written() == 1
