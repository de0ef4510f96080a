"""The lanes plan drawn from queue hops, how a message's headers pick its lane, how a consumer
judges a delivery's headers and how the accounting judges deliveries (pure; the broker tests
are tests/integration/test_queues*.py)."""

from __future__ import annotations

from controlplane.model import RuleSet, apply, from_document, load_text, to_document
from controlplane.model.queues import CHAIN_HEADER, plan_document, plan_from_document, queue_plan
from controlplane.queues import Delivery, receive
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


def test_headers_pick_the_lane_as_the_exchange_routes() -> None:
    def lane(headers: dict[str, object]) -> str | None:
        found = LANES.lane_of(headers)
        return None if found is None else found.chain

    assert lane({"x-task-dye": "fund-yield"}) == "fund-yield"
    assert lane({"x-task-dye": "fund-yield@r1"}) == "fund-yield"
    assert lane({"x-task-dye": "eu-yield@7"}) == "fund-yield-eu"
    assert lane({"x-task-dye": "x", CHAIN_HEADER: "pricing"}) == "pricing"
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
    as_bytes = receive(LANES, "task", {"x-task-dye": b"fund-yield@r1", CHAIN_HEADER: b"fund-yield"})
    assert as_bytes.chain == "fund-yield"
    assert judged("a b")[0:1] == (None,) and judged("a b")[1]
    assert judged("x" * 300)[1] == "300 characters; a dye is at most 256"
    assert judged("caf\xe9".encode("latin-1"))[1] == "not ASCII"
    assert judged(7)[1] == "a int, not a string"
    assert judged({"nested": "table"})[1] == "a dict, not a string"
    assert judged("a b", "publisher")[2] is True  # a trusted publisher's broken dye: rejected
    dead = receive(LANES, "default", {"x-task-dye": "pricing", "x-death": [{"reason": "expired"}]})
    assert (dead.chain, dead.fell_back) == ("pricing", True)


def test_the_accounting_judges_each_delivery() -> None:
    book = QueueAccounting(lambda: RULES, lambda: 1000.0)

    def delivery(group: str, dye: str | None, fell_back: bool = False) -> Delivery:
        return Delivery("entries", "ledger", group, dye, None, fell_back)

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
