"""The lanes plan drawn from queue hops, how a message's headers pick its lane, how a consumer
judges a delivery's headers and how the accounting judges deliveries (pure; the broker tests
are tests/integration/test_queues*.py)."""

from __future__ import annotations

from controlplane.model import RuleSet, apply, from_document, load_text, to_document
from controlplane.model.queues import CHAIN_HEADER, plan_document, plan_from_document, queue_plan
from controlplane.queues import Delivery, publish_headers, receive
from controlplane.telemetry.queues import QueueAccounting
from tests.support.rules import chain, service

HOP = "[{service: ledger, group: %s, queue: entries}]"
RULES = apply(
    RuleSet.empty(),
    load_text(
        service("ledger", groups=("default", "task", "batch"))
        + chain("fund-yield", HOP % "task")
        + chain("fund-yield-eu", HOP % "batch", dye='{values: ["eu-yield@*"]}')
        + chain("pricing", HOP % "task", fallback="loose", dye="{values: [pricing]}"),
        "rules.yaml",
    ),
)
LANES = queue_plan(RULES)["entries"]


def test_each_group_consumes_its_chains_lanes() -> None:
    assert [LANES.lane_queue(lane) for lane in LANES.lanes] == [
        "entries.fund-yield",
        "entries.fund-yield-eu",
        "entries.pricing",
    ]
    assert LANES.queues_for("default") == ["entries"]
    assert LANES.queues_for("task") == ["entries.fund-yield", "entries.pricing"]
    assert LANES.queues_for("batch") == ["entries.fund-yield-eu"]
    assert LANES.queues_for("other") == []


def test_a_dye_claims_its_lane() -> None:
    def lane(headers: dict[str, object]) -> str | None:
        found = LANES.lane_of(headers)
        return None if found is None else found.chain

    assert lane({"x-task-dye": "fund-yield"}) == "fund-yield"
    assert lane({"x-task-dye": "fund-yield@r1"}) == "fund-yield"
    assert lane({"x-task-dye": "eu-yield@7"}) == "fund-yield-eu"
    assert (
        lane({"x-task-dye": "x", CHAIN_HEADER: "pricing"}) is None
    )  # a chain header claims nothing
    assert lane({"x-task-dye": "nobody"}) is None
    assert lane({}) is None


def test_the_plan_survives_json_and_the_hop_its_document() -> None:
    assert plan_from_document(plan_document(queue_plan(RULES))) == queue_plan(RULES)
    stored = RULES.chains["pricing"]
    assert from_document(to_document(stored), "stored") == stored
    assert to_document(stored)["spec"]["hops"][0]["queue"] == "entries"


def test_a_consumer_reads_only_dyes_that_are_dyes() -> None:
    def judged(value: object, user: str | None = None) -> tuple[str | None, str | None, bool]:
        got = receive(LANES, "task", {"x-task-dye": value}, user, frozenset({"publisher"}))
        return got.dye, got.bad_dye, got.rejected

    assert judged(b"fund-yield@r1") == ("fund-yield@r1", None, False)
    as_bytes = receive(LANES, "task", {"x-task-dye": b"fund-yield@r1"}, source="entries.fund-yield")
    assert (as_bytes.dye, as_bytes.rejected) == ("fund-yield@r1", False)
    assert judged("a b")[0:1] == (None,) and judged("a b")[1]
    assert judged("x" * 300)[1] == "300 characters; a dye is at most 256"
    assert judged("caf\xe9".encode("latin-1"))[1] == "not ASCII"
    assert judged(7)[1] == "a int, not a string"
    assert judged({"nested": "table"})[1] == "a dict, not a string"
    assert judged("a b", "publisher")[2] is True  # a trusted publisher's broken dye: rejected


def test_only_waiting_out_its_own_loose_lane_is_a_fallback() -> None:
    def judged(queue: str, reason: str) -> tuple[bool, bool]:
        death = [{"queue": queue, "reason": reason}, {"queue": "other", "reason": "expired"}]
        got = receive(LANES, "default", {"x-task-dye": "pricing", "x-death": death})
        return got.fell_back, got.rejected

    assert judged("entries.pricing", "expired") == (True, False)
    assert judged("entries.pricing", "rejected") == (False, True)  # its lane refused it
    assert judged("elsewhere.pricing", "expired") == (False, False)  # passed on, not waited


def test_a_lane_hands_over_only_its_own_chains_dyes() -> None:
    def misrouted(headers: dict[str, object], source: str) -> bool:
        got = receive(LANES, "task", headers, source=source)
        return got.misrouted and got.rejected

    assert not misrouted({"x-task-dye": "fund-yield@r1"}, "entries.fund-yield")
    assert misrouted({CHAIN_HEADER: "fund-yield"}, "entries.fund-yield")  # no dye
    assert misrouted({"x-task-dye": "pricing", CHAIN_HEADER: "fund-yield"}, "entries.fund-yield")
    assert not misrouted({"x-task-dye": "pricing"}, "entries")  # the default queue: judged later


def test_publishing_recomputes_the_lane_headers() -> None:
    passed_on = {
        "x-task-dye": "fund-yield@r1",
        CHAIN_HEADER: "fund-yield",
        "x-death": [{"queue": "entries.pricing", "reason": "expired"}],
        "x-first-death-reason": "expired",
        "trace": "t1",
    }
    assert publish_headers(LANES, passed_on) == {"trace": "t1"}  # no dye current
    stale = {CHAIN_HEADER: "fund-yield"}
    assert publish_headers(LANES, stale, "pricing") == {"x-task-dye": "pricing"}
    assert publish_headers(LANES, stale, "eu-yield@7") == {
        "x-task-dye": "eu-yield@7",
        CHAIN_HEADER: "fund-yield-eu",
    }


def test_the_accounting_judges_each_delivery() -> None:
    book = QueueAccounting(lambda: RULES, lambda: 1000.0)

    def delivery(group: str, dye: str | None, fell_back: bool = False) -> Delivery:
        return Delivery("entries", "ledger", group, dye, fell_back)

    book.ingest(
        [
            delivery("task", "fund-yield@r1"),  # in its lane
            delivery("default", None),  # online, online
            delivery("task", None),  # online in a task group: a leak
            delivery("default", "pricing", fell_back=True),  # loose, waited out: a fallback
            delivery("default", "fund-yield", fell_back=True),  # strict never falls back: a leak
            delivery("batch", "fund-yield"),  # outside its hop's group: a leak
        ]
    )
    judged = {(k[0], k[3]): (s.messages, s.leaks, s.fallbacks) for k, s in book.stats.items()}
    assert judged == {
        ("fund-yield", "task"): (1, 0, 0),
        ("", "default"): (1, 0, 0),
        ("", "task"): (1, 1, 0),
        ("pricing", "default"): (1, 0, 1),
        ("fund-yield", "default"): (1, 1, 0),
        ("fund-yield", "batch"): (1, 1, 0),
    }
    assert book.totals() == {
        "queue_messages": 6,
        "queue_leaks": 3,
        "queue_fallbacks": 1,
        "queue_bad_dyes": 0,
    }


def test_the_accounting_keeps_by_name_only_what_the_rules_know() -> None:
    book = QueueAccounting(lambda: RULES, lambda: 1000.0)
    strangers = [Delivery(f"q{n}", "ledger", "default", None, False) for n in range(1000)]
    strangers += [
        Delivery("entries", "billing", "default", None, False),  # not the queue's consumer
        Delivery("entries", "ledger", "nightly", None, False),  # not a group of ledger's
        Delivery("entries", "ledger", "default", None, False, failed=True),
    ]
    book.ingest(strangers)
    counted = {key: (s.messages, s.failed) for key, s in book.stats.items()}
    assert counted == {
        ("", "unknown", "unknown", "unknown"): (1002, 0),
        ("", "entries", "ledger", "default"): (1, 1),
    }
