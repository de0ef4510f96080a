"""The isolation accounting on synthetic access-log entries (no Envoy, a virtual clock):
counts per chain x hop x group, leaks, fallback versus leak for loose and strict chains,
rate limits, uncovered hops, propagation breaks, rates; the parsing of Envoy's entries and
the Prometheus page built from them."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client.parser import text_string_to_metric_families

from controlplane.model.dye import DyeIndex
from controlplane.model.load import load_text
from controlplane.model.rules import RuleSet
from controlplane.model.validate import apply
from controlplane.telemetry.accounting import (
    EGRESS,
    GATEWAY,
    INBOUND,
    Accounting,
    Expiring,
    LogEntry,
    Rate,
    percentiles,
)
from controlplane.telemetry.als import Source, parse_entry
from controlplane.telemetry.metrics import Metrics
from controlplane.telemetry.report import isolation_report
from controlplane.xds.names import BLACK_HOLE_ROUTE, PASSTHROUGH_CLUSTER
from controlplane.xds.status import StatusBoard
from controlplane.xds.stream import Push
from controlplane.xds.types import CLUSTER, ROUTE
from tests.support.rules import chain, service

SERVICES = service("fund-facade") + service("account-svc") + service("nav-pricing")
# fund-yield: strict, every hop in `task`; batch-debit: loose on account-svc; pricing: a
# 30 % weight on nav-pricing and a rate limit.
RULES = (
    SERVICES
    + chain(
        "fund-yield",
        "[{service: fund-facade, group: task}, {service: account-svc, group: task}]",
    )
    + chain("batch-debit", "[{service: account-svc, group: task}]", fallback="loose")
    + chain(
        "pricing",
        "[{service: nav-pricing, group: task, weight: 30}]",
        dye="{values: [px-*], baggageKey: job}",
    )
)
FY = {"dye": "fund-yield"}
BD = {"dye": "batch-debit"}
CALL = ("fund-facade", "account-svc")  # (caller, service called)
PRICE = ("fund-facade", "nav-pricing")


def ruleset(text: str = RULES) -> RuleSet:
    return apply(RuleSet.empty(), load_text(text, "rules.yaml"))


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Book:
    """An Accounting with a virtual clock."""

    def __init__(self, rules: RuleSet | None = None) -> None:
        self.rules = rules or ruleset()
        self.clock = Clock()
        self.accounting = Accounting(lambda: self.rules, self.clock)

    def feed(self, *entries: LogEntry) -> None:
        self.accounting.ingest(entries)

    def snap(self) -> dict:
        return isolation_report(self.accounting)

    def group(self, chain: str, service: str, group: str) -> dict:
        """The chain's view of (service, group) in the snapshot."""
        snap = self.snap()
        (found,) = (c for c in snap["chains"] if c["name"] == chain)
        (hop,) = (h for h in found["hops"] if h["service"] == service)
        (entry,) = (g for g in hop["groups"] if g["group"] == group)
        return entry

    def stats(self, chain: str, service: str, group: str):
        return self.accounting.stats[chain, service, group]


_ids = iter(range(1, 1_000_000))


def rid() -> str:
    return f"req-{next(_ids)}"


def inbound(service: str, group: str, route: str = "", **fields) -> LogEntry:
    """What the inbound listener of an instance of (service, group) logs."""
    fields.setdefault("status", 200)
    return LogEntry(
        node=f"{service}/{group}/1",
        service=service,
        group=group,
        direction=INBOUND,
        route=route or fields.pop("chain", "") or "online",
        cluster="local-app",
        upstream="127.0.0.1:9000",
        authority=service,
        **fields,
    )


def egress(caller: str, service: str, cluster_group: str, route: str = "online", **fields):
    """What the egress listener of a `caller` instance logs for a call to `service`."""
    fields.setdefault("status", 200)
    fields.setdefault("upstream", "127.0.0.1:15006")
    return LogEntry(
        node=f"{caller}/default/1",
        service=caller,
        group="default",
        direction=fields.pop("direction", EGRESS),
        route=route,
        cluster=f"{service}|{cluster_group}" if cluster_group else "",
        authority=service,
        **fields,
    )


def test_counts_per_chain_hop_and_group() -> None:
    book = Book()
    for _ in range(7):
        book.feed(inbound("fund-facade", "task", "fund-yield", duration_ms=10.0, **FY))
    for ms in range(1, 4):
        book.feed(inbound("fund-facade", "default", duration_ms=float(ms)))
    book.feed(inbound("fund-facade", "task", "fund-yield", status=503, **FY))
    task = book.group("fund-yield", "fund-facade", "task")
    assert task == {
        **task,
        "group": "task",
        "hop_group": True,
        "requests": 8,
        "dyed": 8,
        "online": 0,
        "errors_5xx": 1,
        "leaks": 0,
        "fallbacks": {},
        "rate_limited": 0,
    }
    default = book.group("fund-yield", "fund-facade", "default")
    assert (default["dyed"], default["online"], default["requests"]) == (0, 3, 3)
    assert (default["p50_ms"], default["p99_ms"]) == (2.0, 3.0)
    # An account-svc hop with no traffic yet still lists its groups, with zeros.
    assert book.group("fund-yield", "account-svc", "task")["requests"] == 0
    snap = book.snap()
    assert set(snap) >= {"chains", "online", "uncovered", "propagation_breaks", "totals"}
    (fund_yield,) = (c for c in snap["chains"] if c["name"] == "fund-yield")
    assert fund_yield["dyes"] == ["fund-yield", "fund-yield@*"]
    assert fund_yield["fallback"] == "strict"
    assert [h["service"] for h in fund_yield["hops"]] == ["fund-facade", "account-svc"]
    assert snap["online"]["fund-facade"]["default"]["online"] == 3
    assert snap["online"]["fund-facade"]["task"]["dyed"] == 8
    totals = snap["totals"]
    assert (totals["requests"], totals["dyed"], totals["online"], totals["leaks"]) == (11, 8, 3, 0)


def test_the_chain_comes_from_the_route_or_the_logged_dye() -> None:
    dyes = DyeIndex(ruleset().chains)
    assert dyes.chain_of("fund-yield", "").name == "fund-yield"
    assert dyes.chain_of("fund-yield@2026-11-27", "").name == "fund-yield"
    assert dyes.chain_of("", "userId=7, task-dye = batch-debit ;p=1").name == "batch-debit"
    assert dyes.chain_of("", "job=px-42").name == "pricing"  # the chain's own baggage key
    assert dyes.chain_of("", "task-dye=px-42") is None  # ... and not the default key
    assert dyes.chain_of("fund-yield", "task-dye=batch-debit").name == "fund-yield"  # header wins
    assert dyes.chain_of("nobody", "task-dye=batch-debit").name == "batch-debit"
    assert dyes.chain_of("fund-yieldx", "task-dye=other,sampled=1") is None
    book = Book()
    # No dye logged (a chain with its own header), but Envoy matched the chain's route.
    book.feed(inbound("fund-facade", "task", "fund-yield"))
    assert book.stats("fund-yield", "fund-facade", "task").requests == 1


def test_online_request_served_by_a_task_group_is_a_leak_a_refused_one_is_not() -> None:
    book = Book()
    book.feed(inbound("account-svc", "task", "online"))
    book.feed(inbound("account-svc", "task", "refused", status=403))
    book.feed(inbound("account-svc", "task", "refused", status=403, dye="batch-debit-x"))
    online = book.snap()["online"]["account-svc"]["task"]
    assert (online["online"], online["leaks"], online["refused"]) == (3, 1, 2)
    assert book.group("fund-yield", "account-svc", "task")["leaks"] == 1  # shown on the hop


def test_dyed_request_outside_its_strict_group_is_a_leak() -> None:
    book = Book()
    book.feed(inbound("account-svc", "default", **FY))
    assert book.group("fund-yield", "account-svc", "default")["leaks"] == 1
    assert book.snap()["totals"]["leaks"] == 1


@pytest.mark.parametrize("reason", ["no_instance", "unhealthy"])
def test_loose_fallback_to_default_is_a_fallback_not_a_leak(reason: str) -> None:
    book = Book()
    for _ in range(4):
        request_id = rid()
        # The caller's router picked `account-svc|default` (the aggregate's member), and
        # told the caller why ...
        fell = egress(*CALL, "default", "batch-debit", request_id=request_id, fallback=reason, **BD)
        book.feed(fell)
        # ... and an instance of `default` served it.
        book.feed(inbound("account-svc", "default", request_id=request_id, **BD))
    book.clock.now += 5
    assert book.group("batch-debit", "account-svc", "task")["fallbacks"] == {reason: 4}
    default = book.group("batch-debit", "account-svc", "default")
    assert (default["dyed"], default["leaks"]) == (4, 0)
    assert book.snap()["totals"]["unmatched"] == 0


@pytest.mark.parametrize("egress_first", [True, False])
def test_instance_registered_in_the_wrong_group_leaks_even_on_a_loose_chain(
    egress_first: bool,
) -> None:
    """A `default` instance registered as `account-svc|task`: the router picked the task
    cluster, an instance of default served. Logs of two Envoys come in either order."""
    book = Book()
    request_id = rid()
    picked = egress(*CALL, "task", "batch-debit", request_id=request_id, **BD)
    served = inbound("account-svc", "default", request_id=request_id, **BD)
    book.feed(*((picked, served) if egress_first else (served, picked)))
    default = book.group("batch-debit", "account-svc", "default")
    assert default["leaks"] == 1
    assert book.group("batch-debit", "account-svc", "task")["fallbacks"] == {}


def test_parked_request_passes_when_its_callers_entry_never_comes() -> None:
    book = Book()
    book.feed(inbound("account-svc", "default", request_id=rid(), **BD))
    assert book.snap()["totals"]["pending"] == 1
    book.clock.now += 1.0
    assert book.snap()["totals"]["pending"] == 1  # still waiting (settle_s = 2)
    book.clock.now += 1.5
    totals = book.snap()["totals"]
    assert (totals["pending"], totals["unmatched"], totals["leaks"]) == (0, 1, 0)


def test_weight_share_to_default_is_neither_leak_nor_fallback() -> None:
    book = Book()
    for _ in range(3):
        request_id = rid()
        book.feed(egress(*PRICE, "default", "pricing", request_id=request_id, dye="px-1"))
        book.feed(inbound("nav-pricing", "default", request_id=request_id, dye="px-1"))
    book.clock.now += 5
    default = book.group("pricing", "nav-pricing", "default")
    assert (default["dyed"], default["leaks"], default["fallbacks"]) == (3, 0, {})
    assert book.group("pricing", "nav-pricing", "task")["fallbacks"] == {}


def test_fallbacks_are_what_the_caller_was_told() -> None:
    """The egress routes decide a fallback (x-tasklane-fallback): a loose hop's weight share
    that fell back counts, its plain share to `default` does not, and a header an app set on
    a response its hop's group served is no fallback."""
    hops = "[{service: account-svc, group: task, weight: 50}]"
    book = Book(ruleset(SERVICES + chain("split", hops, fallback="loose")))
    split = {"dye": "split"}
    book.feed(egress(*CALL, "default", "split", fallback="unhealthy", **split))
    book.feed(egress(*CALL, "default", "split", **split))  # the weight's share
    book.feed(egress(*CALL, "task", "split", fallback="no_instance", **split))  # the app's word
    assert book.group("split", "account-svc", "task")["fallbacks"] == {"unhealthy": 1}


def test_requests_that_reach_no_instance_count_from_the_egress_log() -> None:
    book = Book()
    # strict: the group has no healthy host -> 503 UH, no inbound entry ever comes
    no_host = {"status": 503, "flags": frozenset({"UH"}), "upstream": ""}
    for _ in range(2):
        book.feed(egress(*CALL, "task", "fund-yield", fallback="strict_reject", **no_host, **FY))
    # loose, and default has no healthy host either
    book.feed(egress(*CALL, "task", "batch-debit", fallback="unavailable", **no_host, **BD))
    # online, connection failure; and a Host no route knows, from the gateway
    book.feed(egress(*PRICE, "default", status=503, flags=frozenset({"UF"})))
    unknown = {"status": 404, "flags": frozenset({"NR"}), "upstream": "", "direction": GATEWAY}
    book.feed(egress("@gateway", "evil.example:80", "", "", **unknown))
    strict = book.group("fund-yield", "account-svc", "task")
    assert strict == {
        **strict,
        "requests": 2,
        "dyed": 2,
        "errors_5xx": 2,
        "fallbacks": {"strict_reject": 2},
        "flags": {"UH": 2},
    }
    assert book.group("batch-debit", "account-svc", "task")["fallbacks"] == {"unavailable": 1}
    online = book.snap()["online"]
    assert online["nav-pricing"]["default"]["errors_5xx"] == 1
    assert online["(unknown)"]["default"]["flags"] == {"NR": 1}  # a client's Host: one bucket


def test_rate_limited_requests_of_a_hop() -> None:
    book = Book()
    book.feed(*(inbound("nav-pricing", "task", "pricing", dye="px-1") for _ in range(5)))
    limited = {"status": 429, "flags": frozenset({"RL"})}
    book.feed(*(inbound("nav-pricing", "task", "pricing", dye="px-1", **limited) for _ in range(3)))
    task = book.group("pricing", "nav-pricing", "task")
    assert (task["requests"], task["rate_limited"], task["errors_5xx"]) == (8, 3, 0)
    assert book.snap()["totals"]["rate_limited"] == 3


def test_dyed_requests_reaching_a_service_off_the_chain_are_an_uncovered_hop() -> None:
    book = Book()
    for _ in range(3):
        book.feed(inbound("nav-pricing", "default", "online", **FY))
    snap = book.snap()
    assert [(u["chain"], u["service"], u["group"], u["requests"]) for u in snap["uncovered"]] == [
        ("fund-yield", "nav-pricing", "default", 3)
    ]
    assert snap["totals"]["uncovered"] == 3
    assert snap["totals"]["leaks"] == 0
    assert "nav-pricing" not in snap["online"]  # dyed, not online


@pytest.mark.parametrize("call_logged_first", [True, False])
def test_dyed_request_answered_with_an_undyed_call_is_a_propagation_break(
    call_logged_first: bool,
) -> None:
    """The app forwards x-request-id but drops the dye. Its own Envoy logs the call (which
    ends first) before the request it served, but either order is handled."""
    book = Book()
    request_id = rid()
    received = LogEntry(
        node="fund-facade/task/1", service="fund-facade", group="task", direction=INBOUND,
        route="fund-yield", request_id=request_id, dye="fund-yield", status=200,
    )  # fmt: skip
    call = LogEntry(
        node="fund-facade/task/1", service="fund-facade", group="task", direction=EGRESS,
        route="online", cluster="account-svc|default", upstream="127.0.0.1:1",
        request_id=request_id, status=200,
    )  # fmt: skip
    book.feed(*((call, received) if call_logged_first else (received, call)))
    # The same request id called dyed elsewhere, or another node's undyed call: no break.
    book.feed(egress("account-svc", "nav-pricing", "default", request_id=request_id))
    (found,) = book.snap()["propagation_breaks"]
    assert found == {
        **found,
        "chain": "fund-yield",
        "service": "fund-facade",
        "group": "task",
        "to": "account-svc",
        "count": 1,
        "last_request_id": request_id,
    }
    assert book.snap()["totals"]["propagation_breaks"] == 1


def test_calls_outside_the_mesh_count_apart_by_caller() -> None:
    """A dyed request's app calls an external API (passed through) and another one that
    REGISTRY_ONLY refuses (502): neither is a propagation break, an unknown service's 5xx,
    nor a request of the mesh; a 5xx of the API passed through is that call's error."""
    book = Book()
    request_id = rid()
    where = {"node": "fund-facade/task/1", "service": "fund-facade", "group": "task"}
    book.feed(
        LogEntry(**where, direction=INBOUND, route="fund-yield", request_id=request_id,
                 dye="fund-yield", status=200),
        LogEntry(**where, direction=EGRESS, route=PASSTHROUGH_CLUSTER,
                 cluster=PASSTHROUGH_CLUSTER, upstream="127.0.0.1:443",
                 authority="api.example:443", request_id=request_id, status=200),
        LogEntry(**where, direction=EGRESS, route=PASSTHROUGH_CLUSTER,
                 cluster=PASSTHROUGH_CLUSTER, upstream="127.0.0.1:80",
                 authority="api.example", request_id=request_id, status=503),
        LogEntry(**where, direction=EGRESS, route=BLACK_HOLE_ROUTE, authority="db.example",
                 request_id=request_id, status=502),
    )  # fmt: skip
    snap = book.snap()
    (row,) = snap["outside_mesh"]
    assert {k: row[k] for k in ("service", "group", "requests", "refused", "errors_5xx")} == {
        "service": "fund-facade",
        "group": "task",
        "requests": 3,
        "refused": 1,
        "errors_5xx": 1,
    }
    totals = snap["totals"]
    assert (totals["outside_mesh"], totals["outside_mesh_refused"]) == (3, 1)
    assert (totals["requests"], totals["errors_5xx"], totals["propagation_breaks"]) == (1, 0, 0)
    assert "(unknown)" not in snap["online"] and not snap["propagation_breaks"]
    page = Metrics(book.accounting, lambda: 0, StatusBoard(), lambda: None, dict).render()[0]
    families = {
        f.name: {(s.labels["service"], s.labels["group"]): s.value for s in f.samples}
        for f in text_string_to_metric_families(page.decode())
        if f.name.startswith("tasklane_outside_mesh_")
    }
    assert families["tasklane_outside_mesh_requests"] == {("fund-facade", "task"): 3}
    assert families["tasklane_outside_mesh_refused"] == {("fund-facade", "task"): 1}
    assert families["tasklane_outside_mesh_responses_5xx"] == {("fund-facade", "task"): 1}


def test_rates_over_the_last_complete_seconds() -> None:
    book = Book()
    book.clock.now = 100.2
    book.feed(*(inbound("fund-facade", "task", "fund-yield", **FY) for _ in range(30)))
    book.feed(*(inbound("fund-facade", "default") for _ in range(10)))
    book.clock.now = 100.9
    assert book.group("fund-yield", "fund-facade", "task")["rate_dyed"] == 0  # second not over
    book.clock.now = 101.0
    task = book.group("fund-yield", "fund-facade", "task")
    assert (task["rate_dyed"], task["rate_online"]) == (3.0, 0)
    assert book.group("fund-yield", "fund-facade", "default")["rate_online"] == 1.0
    assert book.snap()["totals"]["rate_dyed"] == 3.0
    book.clock.now = 110.5  # second 100 is still one of the last ten complete ones
    assert book.group("fund-yield", "fund-facade", "task")["rate_dyed"] == 3.0
    book.clock.now = 111.0
    assert book.group("fund-yield", "fund-facade", "task")["rate_dyed"] == 0


def test_rate_ring_reuses_its_slots() -> None:
    rate = Rate(window=2)
    rate.add(10.5, 4)
    rate.add(11.5, 2)
    assert rate.per_second(12.0) == 3.0
    rate.add(13.2, 6)  # reuses second 10's slot
    assert rate.per_second(14.0) == 3.0  # seconds 12 (nothing) and 13
    assert rate.per_second(20.0) == 0


def test_percentiles_are_nearest_rank() -> None:
    assert percentiles([], 0.5) == [None]
    assert percentiles(map(float, range(1, 101)), 0.5, 0.99, 1.0) == [50.0, 99.0, 100.0]


def test_removed_chain_is_forgotten() -> None:
    book = Book()
    book.feed(inbound("fund-facade", "task", "fund-yield", **FY))
    book.rules = ruleset(SERVICES + chain("batch-debit", "[{service: account-svc, group: task}]"))
    snap = book.snap()
    assert [c["name"] for c in snap["chains"]] == ["batch-debit"]
    assert snap["totals"]["dyed"] == 0


def test_correlation_tables_are_bounded() -> None:
    table: Expiring[str, int] = Expiring(ttl=5, cap=3)
    for i in range(5):
        table.put(f"k{i}", i, now=0)
    assert [k for k, _ in table.expire(now=0)] == ["k0", "k1"]  # the oldest beyond the cap
    assert len(table) == 3 and table.get("k0") is None and table.get("k4") == 4
    table.put("k2", 2, now=4)  # refreshed
    assert [k for k, _ in table.expire(now=6)] == ["k3", "k4"]
    assert table.pop("k2") == 2 and len(table) == 0


def test_untagged_entries_are_counted_and_ignored() -> None:
    book = Book()
    book.feed(LogEntry(node="x", service="fund-facade", group="task", direction=""))
    totals = book.snap()["totals"]
    assert (totals["entries"], totals["requests"]) == (1, 0)


def _protobuf_entry() -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.route_name = "fund-yield"
    common.upstream_cluster = "account-svc|task|loose"
    common.upstream_remote_address.socket_address.address = "10.0.0.7"
    common.upstream_remote_address.socket_address.port_value = 15006
    common.custom_tags["tasklane.direction"] = "egress"
    common.response_flags.no_healthy_upstream = True
    common.response_flags.unauthorized_details.reason = 1
    common.time_to_last_downstream_tx_byte.FromNanoseconds(12_500_000)
    common.start_time.FromNanoseconds(1_700_000_000_250_000_000)
    entry.request.authority = "account-svc"
    entry.request.request_id = "r-1"
    entry.request.request_headers["x-task-dye"] = "fund-yield"
    entry.request.request_headers["baggage"] = "task-dye=fund-yield"
    entry.response.response_code.value = 503
    return entry


def test_envoy_entries_are_flattened() -> None:
    source = Source("fund-facade/default/1", "fund-facade", "default")
    parsed = parse_entry(source, _protobuf_entry())
    assert parsed == LogEntry(
        node="fund-facade/default/1",
        service="fund-facade",
        group="default",
        direction=EGRESS,
        route="fund-yield",
        cluster="account-svc|task|loose",
        upstream="10.0.0.7:15006",
        authority="account-svc",
        request_id="r-1",
        dye="fund-yield",
        baggage="task-dye=fund-yield",
        status=503,
        flags=frozenset({"UH", "UAEX"}),
        duration_ms=12.5,
        at=1_700_000_000.25,
    )


def test_metrics_page_carries_accounting_xds_and_scaler() -> None:
    book = Book()
    book.feed(inbound("fund-facade", "task", "fund-yield", **FY), inbound("account-svc", "task"))
    no_host = {"status": 503, "flags": frozenset({"UH"}), "upstream": ""}
    book.feed(egress(*CALL, "task", "fund-yield", fallback="strict_reject", **no_host, **FY))
    board = StatusBoard()
    node = board.connect("fund-facade/default/1", "fund-facade|default", "delta")
    scaler = {"ticks": 3, "desired": {"fund-facade|task": 2}}
    metrics = Metrics(
        book.accounting, lambda: 2, board, lambda: scaler, lambda: {("fund-facade", "task"): 1}
    )
    metrics.xds.pushed(node, Push(CLUSTER, "v1", [], []))
    metrics.xds.acked(node, CLUSTER, "v1")
    metrics.xds.pushed(node, Push(ROUTE, "v1", [], []))
    metrics.xds.nacked(node, ROUTE, "v1", "bad route")
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    page = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    fy_task = (("chain", "fund-yield"), ("group", "task"), ("service", "fund-facade"))
    online_task = (("chain", ""), ("group", "task"), ("service", "account-svc"))
    strict = (("chain", "fund-yield"), ("group", "task"), ("service", "account-svc"))
    assert page["tasklane_requests_total", fy_task] == 1
    assert page["tasklane_leaks_total", online_task] == 1
    reject = (*strict[:2], ("reason", "strict_reject"), strict[2])
    assert page["tasklane_fallbacks_total", reject] == 1
    assert page["tasklane_responses_5xx_total", strict] == 1
    assert page["tasklane_access_log_entries_total", (("direction", "inbound"),)] == 2
    assert page["tasklane_access_log_streams", ()] == 2
    assert page["tasklane_xds_streams", (("protocol", "delta"),)] == 1
    assert page["tasklane_xds_pushes_total", (("type", "cds"),)] == 1
    assert page["tasklane_xds_push_ack_seconds_count", (("type", "cds"),)] == 1
    assert page["tasklane_xds_nacks_total", (("type", "rds"),)] == 1
    assert ("tasklane_xds_push_ack_seconds_count", (("type", "rds"),)) not in page
    facade_task = (("group", "task"), ("service", "fund-facade"))
    assert page["tasklane_scaler_desired_replicas", facade_task] == 2
    assert page["tasklane_scaler_actual_replicas", facade_task] == 1
    assert page["tasklane_scaler_ticks_total", ()] == 3
