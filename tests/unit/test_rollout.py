"""Staged rollouts, the pure parts: settings, how many and which sidecars are canaries, how a
routing decision is tallied against the rules its sidecar holds, and the verdict."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controlplane.canary import Cohorts
from controlplane.errors import RuleError
from controlplane.model.dye import DyeIndex
from controlplane.model.load import load_text
from controlplane.model.rollout import (
    ABORTED,
    CANARY,
    PROMOTED,
    STABLE,
    Rollout,
    Tally,
    admits,
    canary_count,
    parse_percent,
    parse_window,
    verdict,
)
from controlplane.model.rules import RuleSet
from controlplane.model.validate import apply
from controlplane.telemetry.accounting import EGRESS, LogEntry
from controlplane.telemetry.canary import tally
from controlplane.xds.status import StatusBoard
from tests.support.rules import chain, service

SERVICES = service("front", groups=("default",)) + service(
    "ledger", groups=("default", "task", "batch")
)


def rules(group: str, fallback: str = "strict") -> RuleSet:
    text = SERVICES + chain("nightly", f"[{{service: ledger, group: {group}}}]", fallback)
    return apply(RuleSet.empty(), load_text(text, "rules.yaml"))


def judged(*sets: RuleSet) -> list[tuple[RuleSet, DyeIndex]]:
    return [(each, DyeIndex(each.chains)) for each in sets]


def routed(cluster: str, dye: str = "nightly", status: int = 200, flags: frozenset = frozenset(),
           fallback: str = ""):  # fmt: skip
    return LogEntry(
        node="front-0", service="front", group="default", direction=EGRESS,
        route="nightly" if dye else "online", cluster=cluster,
        upstream="127.0.0.1:1" if not flags else "", authority="ledger", dye=dye,
        status=status, flags=flags, fallback=fallback,
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


def test_sidecars_are_admitted_as_they_come_up_to_the_share() -> None:
    admitted = 0
    for sidecars in range(1, 11):  # ten sidecars of a role connect one by one, at 30 %
        admitted += admits(admitted, sidecars, 30)
    assert admitted == canary_count(10, 30) == 3
    assert not admits(3, 10, 30) and admits(2, 10, 30)
    assert not admits(0, 1, 99)  # a role's only sidecar stays on the current rules


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
    tally(counts, judged(loose), routed("ledger|default", fallback="no_instance"))  # loose
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
    # More leaks than the stable sidecars see is worse, however few.
    leakier = verdict(ROLLOUT, Tally(requests=100, leaks=2), Tally(requests=100, leaks=1), 1001)
    assert leakier.action == ABORTED


def test_verdict_tolerates_what_the_stable_sidecars_see_too() -> None:
    canary, stable = Tally(requests=100, errors=3), Tally(requests=100, errors=2)
    assert verdict(ROLLOUT, canary, stable, now=1001.0).action == "wait"
    assert verdict(ROLLOUT, canary, stable, now=1060.0).action == PROMOTED


def test_verdict_waits_for_enough_canary_requests_even_after_the_window() -> None:
    late = verdict(ROLLOUT, Tally(requests=3), Tally(requests=50), now=1000.0 + 2 * 60)
    assert late.action == "wait"
    assert late.reason == (
        "3 of 20 canary requests seen; the window is over: promote or abort by hand, or it is "
        "aborted after 3 windows"
    )
    given_up = verdict(ROLLOUT, Tally(requests=3), Tally(requests=50), now=1000.0 + 3 * 60)
    assert given_up.action == ABORTED
    assert given_up.reason.startswith("too few canary requests to judge in 3 windows (3 of 20)")


def test_the_cohort_of_a_sidecar_is_what_its_stream_was_told() -> None:
    """Sidecars connect, leave and come back during a rollout: a sidecar counts as a canary
    exactly while the stream it has was told to take the candidate."""
    board, told = StatusBoard(), {}
    cohorts = Cohorts(board)
    cohorts.start(replace(ROLLOUT, percent=50))
    statuses = {}

    def connect(node: str) -> None:
        statuses[node] = board.connect(node, "front|default", "delta")
        told[node] = cohorts.canary(node, "front|default")

    def leave(node: str) -> None:
        board.disconnect(statuses.pop(node))
        told.pop(node)

    for n in range(6):
        connect(f"f{n}")
    leave("f0")
    leave("f1")
    connect("f6")
    connect("f0")  # back, on a new stream
    for node in told:
        assert cohorts.cohort_of(node) == (CANARY if told[node] else STABLE), node
    assert 0 < sum(told.values()) < len(told)
    assert cohorts.cohort_of("elsewhere") is None  # connected to another replica
