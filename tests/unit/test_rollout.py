"""Staged rollouts, the pure parts: settings, how many and which sidecars are canaries, how a
routing decision is tallied against the rules its sidecar holds, and the verdict."""

from __future__ import annotations

import pytest

from controlplane.errors import RuleError
from controlplane.model.dye import DyeIndex
from controlplane.model.load import load_text
from controlplane.model.rollout import (
    ABORTED,
    PROMOTED,
    Rollout,
    Tally,
    assign,
    canary_count,
    parse_percent,
    parse_window,
    verdict,
)
from controlplane.model.rules import RuleSet
from controlplane.model.validate import apply
from controlplane.telemetry.accounting import EGRESS, LogEntry
from controlplane.telemetry.canary import tally
from tests.support.rules import chain, service

SERVICES = service("front", groups=("default",)) + service(
    "ledger", groups=("default", "task", "batch")
)


def rules(group: str, fallback: str = "strict") -> RuleSet:
    text = SERVICES + chain("nightly", f"[{{service: ledger, group: {group}}}]", fallback)
    return apply(RuleSet.empty(), load_text(text, "rules.yaml"))


def judged(*sets: RuleSet) -> list[tuple[RuleSet, DyeIndex]]:
    return [(each, DyeIndex(each.chains)) for each in sets]


def routed(cluster: str, dye: str = "nightly", status: int = 200, flags: frozenset = frozenset()):
    return LogEntry(
        node="front-0", service="front", group="default", direction=EGRESS,
        route="nightly" if dye else "online", cluster=cluster,
        upstream="127.0.0.1:1" if not flags else "", authority="ledger", dye=dye,
        status=status, flags=flags,
    )  # fmt: skip


@pytest.mark.parametrize(("text", "share"), [("10%", 10), ("99", 99), (1, 1), (" 50% ", 50)])
def test_percent(text, share) -> None:
    assert parse_percent(text) == share


@pytest.mark.parametrize("text", ["0", "100%", "-5", "ten", "10.5%", "", "%"])
def test_percent_out_of_range(text) -> None:
    with pytest.raises(RuleError, match="is not a share of 1-99 %"):
        parse_percent(text)


def test_window() -> None:
    assert parse_window("2m") == 120
    for text in ("0", "soon", "1d"):
        with pytest.raises(RuleError, match="canary window"):
            parse_window(text)


def test_a_role_keeps_a_stable_sidecar_and_one_sidecar_is_never_a_canary() -> None:
    assert [canary_count(n, 10) for n in range(6)] == [0, 0, 1, 1, 1, 1]
    assert [canary_count(n, 50) for n in (2, 3, 4, 5)] == [1, 2, 2, 3]
    assert canary_count(20, 99) == 19


def test_assignment_is_sticky_and_the_same_on_every_replica() -> None:
    nodes = [f"n{i}" for i in range(10)]
    first = assign(nodes, frozenset(), 30, "gen-a")
    assert len(first) == 3
    assert assign(list(reversed(nodes)), frozenset(), 30, "gen-a") == first  # order-free
    grown = assign([*nodes, "n10", "n11"], first, 30, "gen-a")
    assert first <= grown and len(grown) == 4  # canaries stay; one more for 12 sidecars
    gone = sorted(first)[0]
    refilled = assign([n for n in nodes if n != gone], first, 30, "gen-a")
    assert first - {gone} < refilled and len(refilled) == 3  # another takes the share
    shrunk = assign(nodes[:4], first | {"n0", "n1", "n2"}, 30, "gen-a")
    assert shrunk == frozenset({"n0", "n1", "n2"}) | (first & set(nodes[:4]))  # none dropped


def test_a_decision_the_current_rules_explain_is_no_leak_of_the_change() -> None:
    current, candidate = rules("task"), rules("batch")
    still_old = routed("ledger|task")  # a canary before the candidate reached it
    alone, both = Tally(), Tally()
    tally(alone, judged(candidate), still_old)
    tally(both, judged(candidate, current), still_old)
    assert (alone.leaks, both.leaks) == (1, 0)


def test_tallies_of_rejections_fallbacks_errors_and_online_leaks() -> None:
    strict, loose = rules("batch"), rules("batch", "loose")
    counts = Tally()
    tally(counts, judged(strict), routed("ledger|batch", status=503, flags=frozenset({"UH"})))
    tally(counts, judged(loose), routed("ledger|batch", status=503, flags=frozenset({"UH"})))
    tally(counts, judged(loose), routed("ledger|default"))  # a loose fallback
    tally(counts, judged(strict), routed("ledger|task", dye=""))  # online to a task group
    tally(counts, judged(strict), routed("ledger|default", dye="", status=502))
    assert counts.to_json() == {
        "requests": 5, "errors": 3, "rejected": 1, "fallbacks": 2, "leaks": 1,
    }  # fmt: skip


ROLLOUT = Rollout("g", 10, 60, 20, started_at=1000.0, who="me", base=1, revision=2)


def test_verdict_aborts_at_once_when_the_canary_is_worse() -> None:
    canary, stable = Tally(requests=20, errors=5, rejected=5), Tally(requests=200)
    judged_now = verdict(ROLLOUT, canary, stable, now=1001.0)
    assert judged_now.action == ABORTED
    assert judged_now.reason == (
        "canary strict rejections 25.0% (5 of 20) against 0.0% (0 of 200) on the stable sidecars"
    )
    leak = verdict(ROLLOUT, Tally(requests=1, leaks=1), stable, now=1001.0)
    assert leak.action == ABORTED and leak.reason.startswith("canary leaks")


def test_verdict_tolerates_what_the_stable_sidecars_see_too() -> None:
    canary, stable = Tally(requests=100, errors=3), Tally(requests=100, errors=2)
    assert verdict(ROLLOUT, canary, stable, now=1001.0).action == "wait"
    assert verdict(ROLLOUT, canary, stable, now=1060.0).action == PROMOTED


def test_verdict_waits_for_enough_canary_requests_even_after_the_window() -> None:
    late = verdict(ROLLOUT, Tally(requests=3), Tally(requests=50), now=2000.0)
    assert late.action == "wait"
    assert late.reason == (
        "3 of 20 canary requests seen; the window is over: promote or abort by hand, or wait"
    )
