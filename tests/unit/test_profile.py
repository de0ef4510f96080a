"""The profile: predicted and reported runs as windows per task group, on ordinary days and on
both daylight-saving changes, overlapping tasks adding up, and durations learned from runs."""

from __future__ import annotations

import pytest

from controlplane.model.run import Run
from controlplane.scaler.profile import (
    OPEN_MARGIN_S,
    Window,
    expected_duration,
    managed_groups,
    percentile,
    profile,
    windows,
)
from tests.support.profiles import HOUR, at, rules, task


def spans(found: list[Window], service: str = "account-svc") -> list[tuple[float, float]]:
    return [(w.start, w.end) for w in found if w.service == service]


# --- cron and time zones ------------------------------------------------------------------


def test_a_fire_needs_its_replicas_on_every_task_group_hop_for_the_expected_duration() -> None:
    found = windows(rules(task("nightly")), [], at(2026, 6, 1), at(2026, 6, 2))
    # 02:00 in Shanghai is 18:00 UTC the day before
    assert [(w.service, w.group, w.replicas, w.start, w.end) for w in found] == [
        ("fund-facade", "task", 4, at(2026, 6, 1, 18), at(2026, 6, 1, 19)),
        ("account-svc", "task", 3, at(2026, 6, 1, 18), at(2026, 6, 1, 19)),
    ]
    assert all(w.fire == w.start and w.run is None and not w.open for w in found)


def test_default_groups_are_not_managed_and_unlisted_hops_need_one() -> None:
    ruleset = rules(task("nightly", replicas=(("account-svc", 2),)))
    assert list(managed_groups(ruleset)) == [("account-svc", "task"), ("fund-facade", "task")]
    found = windows(ruleset, [], at(2026, 6, 1), at(2026, 6, 2))
    assert {(w.service, w.replicas) for w in found} == {("account-svc", 2), ("fund-facade", 1)}


def test_a_window_that_started_before_the_range_still_overlaps_it() -> None:
    found = windows(rules(task("nightly", hours=3)), [], at(2026, 6, 1, 20), at(2026, 6, 1, 21))
    assert spans(found) == [(at(2026, 6, 1, 18), at(2026, 6, 1, 21))]


def test_spring_forward_day_runs_at_the_end_of_the_gap() -> None:
    # Berlin 2026-03-29: 02:00 CET -> 03:00 CEST at 01:00 UTC; 02:30 does not exist
    ruleset = rules(task("eu", "30 2 * * *", "Europe/Berlin"))
    found = windows(ruleset, [], at(2026, 3, 28), at(2026, 3, 31))
    assert [start for start, _ in spans(found)] == [
        at(2026, 3, 28, 1, 30),  # 02:30 CET
        at(2026, 3, 29, 1),  # 03:00 CEST, the first moment after the gap
        at(2026, 3, 30, 0, 30),  # 02:30 CEST
    ]
    minutes = profile(ruleset, [], at(2026, 3, 29), 24 * 60)[("account-svc", "task")]
    assert minutes[59:61] == [0, 3] and minutes[119:121] == [3, 0]
    assert sum(minutes) == 3 * 60


def test_fall_back_day_runs_a_fixed_time_once_and_a_wildcard_twice() -> None:
    # Berlin 2026-10-25: 03:00 CEST -> 02:00 CET at 01:00 UTC; 02:xx happens twice
    once = rules(task("eu", "30 2 * * *", "Europe/Berlin"))
    found = windows(once, [], at(2026, 10, 25), at(2026, 10, 26))
    assert [start for start, _ in spans(found)] == [at(2026, 10, 25, 0, 30)]

    twice = rules(task("eu", "*/30 2 * * *", "Europe/Berlin", hours=0.25))
    found = windows(twice, [], at(2026, 10, 25), at(2026, 10, 26))
    assert [start for start, _ in spans(found)] == [
        at(2026, 10, 25, 0),
        at(2026, 10, 25, 0, 30),
        at(2026, 10, 25, 1),
        at(2026, 10, 25, 1, 30),
    ]


def test_profile_is_per_minute_for_the_next_day_and_counts_a_partial_minute() -> None:
    ruleset = rules(task("nightly", hours=0.5))
    start = at(2026, 6, 1, 17, 59, 30)
    result = profile(ruleset, [], start)
    assert set(result) == {("account-svc", "task"), ("fund-facade", "task")}
    assert len(result[("account-svc", "task")]) == 1440
    # the run 18:00-18:30 touches minute slots 0 (17:59:30-18:00:30) to 30
    assert result[("account-svc", "task")][:32] == [3] * 31 + [0]


# --- overlaps -----------------------------------------------------------------------------


def test_overlapping_tasks_on_one_group_add_up_and_other_groups_do_not() -> None:
    ruleset = rules(
        task("nightly", "0 2 * * *", hours=2),
        task("debit", "30 3 * * *", hours=1, chain="debit", replicas=(("account-svc", 2),)),
    )
    result = profile(ruleset, [], at(2026, 6, 1, 18), 180)
    account = result[("account-svc", "task")]
    assert account[0] == 3  # 18:00 nightly
    assert account[90:120] == [5] * 30  # 19:30-20:00 both
    assert account[120] == 2  # 20:00 debit alone
    assert account[150] == 0
    assert max(result[("fund-facade", "task")]) == 4


def test_profile_is_not_clamped_to_the_group_maximum() -> None:
    ruleset = rules(
        task("a", replicas=(("account-svc", 5),)),
        task("b", replicas=(("account-svc", 5),)),
    )
    assert max(profile(ruleset, [], at(2026, 6, 1, 17))[("account-svc", "task")]) == 10


# --- history --------------------------------------------------------------------------------


def runs_of(name: str, minutes: list[float], first: float = at(2026, 5, 1)) -> list[Run]:
    return [
        Run(name, f"r{i}", first + i * 86400, first + i * 86400 + m * 60, "succeeded")
        for i, m in enumerate(minutes)
    ]


def test_expected_duration_is_p90_of_the_last_20_finished_runs() -> None:
    nightly = task("nightly", hours=7)
    assert expected_duration(nightly, []) == 7 * HOUR
    history = runs_of("nightly", list(range(1, 26)))  # the last 20 took 6..25 minutes
    history += [Run("nightly", "open", at(2026, 6, 1)), *runs_of("other", [500])]
    assert expected_duration(nightly, history) == 23 * 60  # 18th shortest of 20
    one_overrun = runs_of("nightly", [10] * 19 + [600])
    assert expected_duration(nightly, one_overrun) == 10 * 60


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile([1, 2], 95) == 2
    assert percentile([7], 1) == 7


def test_learned_duration_sets_the_predicted_window() -> None:
    ruleset = rules(task("nightly", hours=7))
    history = runs_of("nightly", [30] * 5)
    found = windows(ruleset, history, at(2026, 6, 1), at(2026, 6, 2))
    assert spans(found) == [(at(2026, 6, 1, 18), at(2026, 6, 1, 18, 30))]


def test_a_reported_run_claims_its_fire_and_ends_when_it_finishes() -> None:
    ruleset = rules(task("nightly"))
    done = Run("nightly", "abc", at(2026, 6, 1, 18, 0, 4), at(2026, 6, 1, 18, 20))
    found = windows(ruleset, [done], at(2026, 6, 1), at(2026, 6, 2))
    assert spans(found) == [(at(2026, 6, 1, 18), at(2026, 6, 1, 18, 20))]
    assert {(w.run, w.fire, w.open) for w in found} == {("abc", at(2026, 6, 1, 18), False)}


def test_an_open_run_never_ends_while_open() -> None:
    ruleset = rules(task("nightly"))
    running = Run("nightly", "abc", at(2026, 6, 1, 18))
    now = at(2026, 6, 1, 23)  # four hours past the expected end
    found = windows(ruleset, [running], now, now + HOUR, now)
    assert spans(found) == [(at(2026, 6, 1, 18), now + OPEN_MARGIN_S)]
    assert all(w.open for w in found)


def test_a_skipped_fire_keeps_its_predicted_window_and_an_extra_run_gets_its_own() -> None:
    ruleset = rules(task("nightly"))
    extra = Run("nightly", "manual", at(2026, 6, 1, 9), at(2026, 6, 1, 9, 40))
    found = windows(ruleset, [extra], at(2026, 6, 1), at(2026, 6, 2))
    assert spans(found) == [
        (at(2026, 6, 1, 9), at(2026, 6, 1, 9, 40)),
        (at(2026, 6, 1, 18), at(2026, 6, 1, 18, 40)),  # as long as the runs so far
    ]
    assert [w.fire for w in found if w.service == "account-svc"] == [None, at(2026, 6, 1, 18)]


@pytest.mark.parametrize("early", [0, 30])
def test_a_run_reported_slightly_before_its_fire_belongs_to_it(early: int) -> None:
    ruleset = rules(task("nightly"))
    run = Run("nightly", "x", at(2026, 6, 1, 18) - early, at(2026, 6, 1, 18, 10))
    found = windows(ruleset, [run], at(2026, 6, 1), at(2026, 6, 2))
    assert len(spans(found)) == 1
