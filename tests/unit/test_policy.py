"""The policy on a virtual clock: the lead from measured starts, the whole chain up before the
fire and down together after the run, no scale-down while a run is open, drain, skipped runs,
bounds, the HPA-style reactive part with its tolerance and stabilisation, and no flaps."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import pytest

from controlplane.model.group import GroupKey
from controlplane.model.run import Run
from controlplane.scaler.policy import (
    Decision,
    Observation,
    Policy,
    PolicyConfig,
    _stdev,
    chain_lead,
    hpa_recommendation,
)
from tests.support.profiles import at, rules, task

FACADE = ("fund-facade", "task")
ACCOUNT = ("account-svc", "task")
# fund-facade starts in 20 s, account-svc in 50 s: the chain's lead is 50 + one sync period
STARTS: dict[GroupKey, list[float]] = {FACADE: [20.0] * 20, ACCOUNT: [50.0] * 20}
FIRE = at(2026, 6, 1, 18)  # nightly: 02:00 Asia/Shanghai
LEAD = 50 + 15
# An actuator that cannot park (Kubernetes): every instance starts a chain lead before its
# window. Most tests here are about that; those about parking say so.
COLD = PolicyConfig(resume_s=None)
Observe = Callable[[float], Mapping[GroupKey, Observation]]


def known(runs: Sequence[Run], now: float) -> list[Run]:
    """The runs as a scheduler has reported them by `now`."""
    return [
        run if run.finished_at is None or run.finished_at <= now else replace(run, finished_at=None)
        for run in runs
        if run.started_at <= now
    ]


def replay(
    policy: Policy,
    ruleset: object,
    start: float,
    end: float,
    runs: Sequence[Run] = (),
    observe: Observe | None = None,
    starts: Mapping[GroupKey, Sequence[float]] = STARTS,
) -> list[Decision]:
    """Every decision of a policy ticking each 15 s from `start` to `end`."""
    decisions: list[Decision] = []
    now = start
    while now < end:
        seen = observe(now) if observe else {}
        decisions += policy.decide(now, ruleset, known(runs, now), seen, starts)  # type: ignore[arg-type]
        now += 15
    return decisions


def changes(decisions: list[Decision], key: GroupKey) -> list[tuple[float, int]]:
    return [(d.at, d.replicas) for d in decisions if (d.service, d.group) == key]


# --- the lead -------------------------------------------------------------------------------


def test_lead_is_measured_start_time_plus_a_sync_period() -> None:
    config = PolicyConfig()
    assert chain_lead({ACCOUNT: [50.0] * 20}, {ACCOUNT: 3}, config) == 65
    assert chain_lead({}, {ACCOUNT: 3}, config) == config.default_lead_s
    assert chain_lead({ACCOUNT: []}, {ACCOUNT: 3}, config) == config.default_lead_s
    assert chain_lead({}, {ACCOUNT: 0}, config) == 0


def test_lead_grows_with_the_instances_that_must_all_be_ready() -> None:
    draws = random.Random(1)
    spread = [draws.lognormvariate(math.log(40), 0.34) for _ in range(200)]  # p95 about 70 s
    config = replace(COLD, lead_percentile=95)
    one = chain_lead({ACCOUNT: spread}, {ACCOUNT: 1}, config)
    nine = chain_lead({ACCOUNT: spread}, {ACCOUNT: 9}, config)
    strict = chain_lead({ACCOUNT: spread}, {ACCOUNT: 1}, COLD)  # the default: p99
    assert 62 <= one - 15 <= 78
    assert nine - 15 > 85 and strict - 15 > 85
    # a chain waits for its slowest hop, and an unmeasured hop for the default
    both = chain_lead({ACCOUNT: spread, FACADE: [5.0] * 10}, {ACCOUNT: 1, FACADE: 4}, config)
    assert both == pytest.approx(one, abs=1)
    assert chain_lead({FACADE: [5.0] * 10}, {ACCOUNT: 1, FACADE: 1}, config) == 30


def test_few_measurements_do_not_promise_that_nothing_is_slower() -> None:
    few = [40.0, 50.0, 60.0]
    lead = chain_lead({ACCOUNT: few}, {ACCOUNT: 3}, PolicyConfig())
    assert lead - 15 > 60  # the fitted tail goes beyond the slowest start seen


def test_the_fitted_spread_is_statistics_stdev_to_the_bit() -> None:
    # the lead is a bisection on the fit: a spread off in its last bit could move a lead
    draws = random.Random(7)
    samples = [[5.0, 5.0, 5.0], [0.0, 1.0, 2.0], [-6.9, 0.0, 709.0, 3.5], [1e-16, 0.0, 700.0]]
    for _ in range(2000):
        center, spread = draws.choice([-6.9, 0.0, 3.7, 6.0]), draws.choice([1e-9, 0.3, 2.0])
        samples.append([draws.gauss(center, spread) for _ in range(draws.randint(2, 100))])
    for values in samples:
        assert _stdev(values) == statistics.stdev(values), values


# --- up before the fire, down after the run -------------------------------------------------


def test_whole_chain_is_prewarmed_by_the_slowest_hops_lead_and_goes_down_together() -> None:
    run = Run("nightly", "abc", FIRE + 3, FIRE + 20 * 60)
    decisions = replay(Policy(COLD), rules(task("nightly")), FIRE - 300, FIRE + 3600, [run])
    up = FIRE - 60  # the first tick at or after FIRE - LEAD
    assert changes(decisions, FACADE) == [(FIRE - 300, 0), (up, 4), (FIRE + 20 * 60 + 30, 0)]
    assert changes(decisions, ACCOUNT) == [(FIRE - 300, 0), (up, 3), (FIRE + 20 * 60 + 30, 0)]
    reasons = {d.reason for d in decisions if d.at == up}
    assert reasons == {"pre-warm for task nightly (fires 02:00 Asia/Shanghai)"}
    assert {d.reason for d in decisions if d.replicas == 0 and d.at > FIRE} == {
        "run nightly/abc finished + drain 30s"
    }


def test_no_scale_down_while_the_run_is_open_whatever_the_predicted_end() -> None:
    run = Run("nightly", "abc", FIRE + 3, FIRE + 5 * 3600)  # 1 h expected, 5 h real
    decisions = replay(Policy(COLD), rules(task("nightly")), FIRE - 300, FIRE + 6 * 3600, [run])
    assert changes(decisions, ACCOUNT) == [
        (FIRE - 300, 0),
        (FIRE - 60, 3),
        (FIRE + 5 * 3600 + 30, 0),
    ]
    fresh = Policy(COLD).decide(
        FIRE + 2 * 3600, rules(task("nightly")), known([run], FIRE + 7200), {}, STARTS
    )
    assert {d.reason for d in fresh} == {"run nightly/abc open"}


def test_drain_keeps_the_group_for_drain_seconds_after_the_finish() -> None:
    run = Run("nightly", "abc", FIRE + 3, FIRE + 20 * 60 + 5)
    config = replace(COLD, drain_s=120)
    decisions = replay(Policy(config), rules(task("nightly")), FIRE - 300, FIRE + 3600, [run])
    assert changes(decisions, ACCOUNT)[-1] == (FIRE + 22 * 60 + 15, 0)  # first tick >= +125 s


def test_a_skipped_run_holds_capacity_for_the_expected_duration_plus_drain() -> None:
    decisions = replay(Policy(COLD), rules(task("nightly")), FIRE - 300, FIRE + 7200)
    assert changes(decisions, ACCOUNT) == [(FIRE - 300, 0), (FIRE - 60, 3), (FIRE + 3630, 0)]
    assert decisions[-1].reason == (
        "task nightly: no run reported by its expected end; down after drain 30s"
    )


def test_a_fire_not_yet_reported_is_explained_as_such() -> None:
    fresh = Policy(COLD).decide(FIRE + 60, rules(task("nightly")), [], {}, STARTS)
    assert {d.reason for d in fresh} == {
        "task nightly fired 02:00 Asia/Shanghai, no run reported yet"
    }


def test_capacity_needed_again_within_the_window_is_kept_not_restarted() -> None:
    ruleset = rules(
        task("nightly"),
        task("debit", "10 2 * * *", chain="debit", replicas=(("account-svc", 2),)),
    )
    run = Run("nightly", "abc", FIRE, FIRE + 150)
    decisions = replay(Policy(COLD), ruleset, FIRE - 300, FIRE + 1200, [run])
    # nightly ends at +150 s, down at +240 s (a flap guard: 300 s after going up); debit's
    # pre-warm is due at +535 s (within the window and the keep margin, 375 s), so
    # account-svc keeps 2 of its 3 instead of 0, then 2 again
    assert changes(decisions, FACADE) == [(FIRE - 300, 0), (FIRE - 60, 4), (FIRE + 240, 0)]
    account = [d for d in decisions if (d.service, d.group) == ACCOUNT]
    assert [(d.at, d.replicas) for d in account] == [
        (FIRE - 300, 0),
        (FIRE - 60, 3),
        (FIRE + 240, 2),
    ]
    assert account[-1].reason == "keep for task debit: due within 375s"


def test_a_runs_drain_does_not_stack_on_the_same_tasks_next_pre_warm() -> None:
    """Every 15 minutes, a run finishing 60 s before the next fire: its drain (30 s) and
    the next run's pre-warm (65 s) overlap, and the same instances serve both (was 3 -> 6)."""
    ruleset = rules(task("quarter", "*/15 * * * *", "UTC", hours=10 / 60))
    fire = at(2026, 6, 1, 18)
    runs = [
        Run("quarter", f"r{n}", fire + 900 * n + 2, fire + 900 * n + 840, "succeeded")
        for n in range(3)
    ]
    decisions = replay(Policy(COLD), ruleset, fire - 300, fire + 2700, runs)
    assert max(replicas for _, replicas in changes(decisions, ACCOUNT)) == 3


def test_a_drain_served_by_a_run_open_beside_it_does_not_come_back_when_that_run_ends() -> None:
    """A run started by hand while the nightly run is open: the nightly run finishes first,
    the extra one 10 s later. The open run's instances serve the first one's drain, as they
    would the next run's pre-warm; that drain counted again once the second run finished
    too, and the group went down for those seconds and straight back up (6 -> 3 -> 6)."""
    runs = [
        Run("nightly", "fired", FIRE + 3, FIRE + 1200, "succeeded"),
        Run("nightly", "by-hand", FIRE + 600, FIRE + 1210, "succeeded"),
    ]
    decisions = replay(Policy(COLD), rules(task("nightly")), FIRE - 300, FIRE + 1800, runs)
    assert changes(decisions, ACCOUNT) == [
        (FIRE - 300, 0),
        (FIRE - 60, 3),
        (FIRE + 600, 6),
        (FIRE + 1200, 3),
        (FIRE + 1245, 0),  # the first tick after the second run's drain (+1240 s)
    ]


def test_runs_never_reported_finished_do_not_pile_up_capacity() -> None:
    """An hourly 5-minute task whose scheduler reports starts but never a finish: each open
    run is held for 10 x its expected duration, then let go with a reason, so six hours of
    such runs hold at most two runs' replicas (was all six, up to the group's maximum)."""
    ruleset = rules(
        task("hourly", "0 * * * *", "UTC", hours=5 / 60, replicas=(("account-svc", 1),))
    )
    fire = at(2026, 6, 1, 18)
    runs = [Run("hourly", f"r{n}", fire + 3600 * n + 5) for n in range(6)]
    decisions = replay(Policy(COLD), ruleset, fire - 300, fire + 6 * 3600, runs)
    assert max(replicas for _, replicas in changes(decisions, ACCOUNT)) <= 2
    assert (
        "run hourly/r0 still open after 10 x the task's expected duration: no longer held "
        "(its finish was never reported?)"
    ) in {d.reason for d in decisions}


def test_always_overrunning_runs_reported_by_a_skewed_clock_hold_what_they_need() -> None:
    """A 15-minute task whose runs all take 25 minutes, reported by a scheduler whose clock
    is 30 s behind (each run seems to start before its fire): two runs are open at a time,
    so the group holds two runs' replicas, no more, and no run counts as an extra one."""
    ruleset = rules(
        task("quarter", "*/15 * * * *", "UTC", hours=10 / 60, replicas=(("account-svc", 1),))
    )
    fire = at(2026, 6, 1, 18)
    runs = [
        Run("quarter", f"r{n}", fire + 900 * n - 30, fire + 900 * n - 30 + 1500, "succeeded")
        for n in range(12)
    ]
    policy = Policy(COLD)
    decisions = replay(policy, ruleset, fire - 300, fire + 3 * 3600, runs)
    assert max(replicas for _, replicas in changes(decisions, ACCOUNT)) == 2
    assert policy.pools == {FACADE: 0, ACCOUNT: 0}


def test_no_decrease_within_the_scale_down_window_of_an_increase() -> None:
    run = Run("nightly", "abc", FIRE, FIRE + 60)  # a one-minute run
    decisions = replay(Policy(COLD), rules(task("nightly")), FIRE - 300, FIRE + 900, [run])
    assert changes(decisions, ACCOUNT) == [(FIRE - 300, 0), (FIRE - 60, 3), (FIRE + 240, 0)]


# --- bounds ---------------------------------------------------------------------------------


def test_bounds_clamp_and_say_so() -> None:
    ruleset = rules(
        task("nightly", replicas=(("account-svc", 5), ("fund-facade", 1))),
        task("debit", chain="debit", replicas=(("account-svc", 4),)),
    )
    up = Policy(COLD).decide(FIRE + 60, ruleset, [], {}, STARTS)
    account = next(d for d in up if (d.service, d.group) == ACCOUNT)
    assert account.replicas == 6
    assert account.reason.startswith("bound: max 6 (")

    services = dict(ruleset.services)
    facade = services["fund-facade"]
    services["fund-facade"] = replace(
        facade, groups=(facade.groups[0], replace(facade.groups[1], min_replicas=1))
    )
    idle = Policy(COLD).decide(FIRE - 3600, replace(ruleset, services=services), [], {}, STARTS)
    facade_decision = next(d for d in idle if (d.service, d.group) == FACADE)
    assert (facade_decision.replicas, facade_decision.reason) == (1, "bound: min 1")


def test_a_lowered_maximum_applies_at_once() -> None:
    policy = Policy(COLD)
    ruleset = rules(task("nightly"))
    policy.decide(FIRE - 300, ruleset, [], {}, STARTS)
    policy.decide(FIRE - 60, ruleset, [], {}, STARTS)
    services = dict(ruleset.services)
    account = services["account-svc"]
    services["account-svc"] = replace(
        account, groups=(account.groups[0], replace(account.groups[1], max_replicas=2))
    )
    lowered = policy.decide(FIRE, replace(ruleset, services=services), [], {}, STARTS)
    assert [(d.service, d.replicas, d.reason[:12]) for d in lowered] == [
        ("account-svc", 2, "bound: max 2")
    ]


# --- reactive -------------------------------------------------------------------------------


def test_hpa_recommendation() -> None:
    assert hpa_recommendation(4, 4, 12.0, 8.0, 0.1) == 6
    assert hpa_recommendation(4, 5, 8.6, 8.0, 0.1) == 5  # within tolerance: keep current
    assert hpa_recommendation(4, 4, 4.0, 8.0, 0.1) == 2
    assert hpa_recommendation(3, 3, 8.0 * 4 / 3, 8.0, 0.1) == 4  # exact, no float creep


def busy(in_flight: Callable[[float], float | None], ready: int = 3) -> Observe:
    return lambda now: {
        ACCOUNT: Observation(*ACCOUNT, ready=ready, starting=0, in_flight=in_flight(now))
    }


def test_in_flight_above_target_scales_beyond_the_prediction() -> None:
    run = Run("nightly", "abc", FIRE, FIRE + 3600)
    decisions = replay(
        Policy(COLD),
        rules(task("nightly")),
        FIRE + 60,
        FIRE + 120,
        [run],
        busy(lambda now: 16.0),
    )
    account = [d for d in decisions if (d.service, d.group) == ACCOUNT]
    assert [(d.replicas, d.reason) for d in account] == [(6, "metric: in-flight 16.0 > target 8")]


def test_the_signal_that_drives_the_decision_is_named() -> None:
    """In-flight within its target, CPU low, memory and the app's thread pool saturated: the
    highest recommendation wins and its reason names the signal behind it."""
    run = Run("nightly", "abc", FIRE, FIRE + 3600)

    def seen(now: float) -> dict[GroupKey, Observation]:
        return {
            ACCOUNT: Observation(
                *ACCOUNT, ready=3, starting=0, in_flight=8.0, cpu=0.3, memory=1.0, saturation=1.6
            )
        }

    decisions = replay(Policy(COLD), rules(task("nightly")), FIRE + 60, FIRE + 90, [run], seen)
    account = [(d.replicas, d.reason) for d in decisions if (d.service, d.group) == ACCOUNT]
    assert account == [(6, "metric: saturation 1.60 > target 0.8")]


def test_a_signal_that_is_not_a_number_drives_nothing() -> None:
    """Prometheus text allows NaN and +Inf (an idle pool's 0/0 busy ratio): such a reading
    is not known, the others still count, and the scaler goes on deciding."""
    run = Run("nightly", "abc", FIRE, FIRE + 3600)

    def seen(now: float) -> dict[GroupKey, Observation]:
        return {
            ACCOUNT: Observation(
                *ACCOUNT, ready=3, starting=0, cpu=math.inf, memory=1.6, saturation=math.nan
            )
        }

    decisions = replay(Policy(COLD), rules(task("nightly")), FIRE + 60, FIRE + 90, [run], seen)
    account = [(d.replicas, d.reason) for d in decisions if (d.service, d.group) == ACCOUNT]
    assert account == [(6, "metric: memory 1.60 > target 0.8")]


def test_within_tolerance_the_metric_changes_nothing() -> None:
    run = Run("nightly", "abc", FIRE, FIRE + 3600)
    decisions = replay(
        Policy(COLD), rules(task("nightly")), FIRE + 60, FIRE + 600, [run], busy(lambda now: 8.7)
    )
    assert changes(decisions, ACCOUNT) == [(FIRE + 60, 3)]


def test_scale_down_is_stabilised_over_the_window() -> None:
    # an idle task group that metrics alone drive: 16 in flight per instance, then nothing
    decisions = replay(
        Policy(COLD),
        rules(task("nightly")),
        FIRE - 7200,
        FIRE - 6000,
        observe=busy(lambda now: 16.0 if now < FIRE - 7200 + 60 else 0.0, ready=2),
    )
    # the last high recommendation (+45 s) holds for the 300 s window
    assert changes(decisions, ACCOUNT) == [(FIRE - 7200, 4), (FIRE - 7200 + 360, 0)]


def test_metric_history_of_a_finished_run_does_not_hold_its_capacity() -> None:
    run = Run("nightly", "abc", FIRE, FIRE + 1800)
    decisions = replay(
        Policy(COLD),
        rules(task("nightly")),
        FIRE + 60,
        FIRE + 2400,
        [run],
        busy(lambda now: 12.0 if now < FIRE + 1800 else 0.0),
    )
    # 12 in flight on 3 ready: 5 until the run ends, then down after the drain, not 300 s
    assert changes(decisions, ACCOUNT) == [(FIRE + 60, 5), (FIRE + 1830, 0)]


# --- decisions ------------------------------------------------------------------------------


def test_first_call_decides_every_group_then_only_changes() -> None:
    policy = Policy(COLD)
    ruleset = rules(task("nightly"))
    first = policy.decide(FIRE - 3600, ruleset, [], {}, STARTS)
    assert [(d.service, d.group, d.replicas) for d in first] == [
        ("account-svc", "task", 0),
        ("fund-facade", "task", 0),
    ]
    assert first[0].reason == "idle: no run open or due"
    assert policy.decide(FIRE - 3585, ruleset, [], {}, STARTS) == []
    assert {key: d.replicas for key, d in policy.desired.items()} == {ACCOUNT: 0, FACADE: 0}


def test_a_group_no_task_uses_gets_a_last_decision() -> None:
    policy = Policy(COLD)
    policy.decide(FIRE + 60, rules(task("nightly")), [], {}, STARTS)
    last = policy.decide(FIRE + 75, rules(), [], {}, STARTS)
    assert {(d.service, d.replicas, d.reason) for d in last} == {
        ("account-svc", 0, "no scheduled task uses this group any more"),
        ("fund-facade", 0, "no scheduled task uses this group any more"),
    }
    assert policy.desired == {}


def parked_replay(
    ruleset: object, start: float, end: float, runs: Sequence[Run], starts: Mapping
) -> list[tuple[float, int, int, str]]:
    """(time, desired, parked pool, reason of a change) of account-svc's task group, for a
    policy that can park, each 15 s."""
    policy, seen, now = Policy(), [], start
    while now < end:
        made = policy.decide(now, ruleset, known(runs, now), {}, starts)  # type: ignore[arg-type]
        reason = next((d.reason for d in made if (d.service, d.group) == ACCOUNT), "")
        seen.append((now, policy.desired[ACCOUNT].replicas, policy.pools[ACCOUNT], reason))
        now += 15
    return seen


def test_instances_started_a_lead_early_wait_parked_for_the_resume() -> None:
    """Where the actuator can park, the pre-warm's instances are started the chain lead
    early into the parked pool (they cost memory, not CPU, while they wait) and resumed a
    sync period plus `resume_s` before the fire; the lead is the same."""
    seen = parked_replay(rules(task("nightly")), FIRE - 300, FIRE + 60, [], STARTS)
    pool_from = min(now for now, _, pool, _ in seen if pool)
    up = min(now for now, count, _, _ in seen if count)
    assert FIRE - LEAD <= pool_from < FIRE - LEAD + 15
    assert FIRE - 16 <= up < FIRE
    assert all(pool == 3 and count == 0 for now, count, pool, _ in seen if pool_from <= now < up)
    at_up = next(entry for entry in seen if entry[0] == up)
    assert at_up[1:3] == (3, 0)  # the three parked ones resumed, none left parked
    assert at_up[3].startswith("resume parked for task nightly")
    cold = replay(Policy(COLD), rules(task("nightly")), FIRE - 300, FIRE + 60)
    assert changes(cold, ACCOUNT)[1] == (FIRE - 60, 3)  # without parking: up a lead early


def test_a_runs_instances_wait_parked_for_the_tasks_next_run() -> None:
    """A 15-minute task of 5-minute runs on 200 s start-ups: its instances are parked from
    the end of one run's drain to the resume before the next fire (0.25 x 9 minutes cost
    less than the 215 s lead of a restart), and the next run finds them there."""
    quarter = task("quarter", schedule="*/15 * * * *", hours=5 / 60)
    slow = {FACADE: [200.0] * 20, ACCOUNT: [200.0] * 20}
    run = Run("quarter", "r1", FIRE, FIRE + 300, "succeeded")
    seen = parked_replay(rules(quarter), FIRE + 60, FIRE + 900, [run], slow)
    down = next(entry for entry in seen if entry[1] == 0)
    assert down[0] == FIRE + 330  # the drain's end
    assert "3 parked for task quarter" in down[3]
    assert all(pool == 3 for now, _, pool, _ in seen if FIRE + 330 <= now < FIRE + 884)
    up = next(entry for entry in seen if entry[0] > down[0] and entry[1] == 3)
    assert FIRE + 884 <= up[0] < FIRE + 900 and up[2] == 0
    assert up[3].startswith("resume parked for task quarter")
    # with 20 s starts a restart is cheaper than the parked gap: stopped, then started cold
    fast = {FACADE: [20.0] * 20, ACCOUNT: [20.0] * 20}
    seen = parked_replay(rules(quarter), FIRE + 60, FIRE + 900, [run], fast)
    assert all(pool == 0 for now, _, pool, _ in seen if FIRE + 330 <= now < FIRE + 850)
