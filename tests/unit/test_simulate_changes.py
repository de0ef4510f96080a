"""The simulator tells the policy what changed (`Changes`), and the policy decides again only
the groups that touches and those due by time. On random small workloads (overruns, extra
runs, skipped fires, parked pools, DST nights, groups shared by several tasks) every decision,
with its reason and time, and every pool is the one deciding everything every time gives."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from bench.scaler import Shape, TaskSpec, assemble, render
from controlplane.model.run import Run
from controlplane.scaler.policy import Changes, Decision, Policy, PolicyConfig
from controlplane.scaler.simulate import Report, simulate
from controlplane.scaler.workload import Workload, parse_workload
from tests.support.profiles import HOUR, at, rules, task

SERVICES = [f"svc-{index}" for index in range(5)]
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney")
# Berlin springs forward at 01:00 UTC on 29 March 2026: its 02:30 fire that night is skipped
START = "2026-03-28T18:00:00Z"
DECIDE = Policy.decide
FIRE = at(2026, 6, 1, 18)  # nightly: 02:00 Asia/Shanghai
FACADE = ("fund-facade", "task")
ACCOUNT = ("account-svc", "task")


def workload(seed: int) -> Workload:
    """Five task groups, four chains over them (one with an online hop), eight tasks every 15
    minutes, hourly or nightly in time zones with DST, some with a habit of extra runs."""
    rng = random.Random(seed)
    chains = {
        f"chain-{index}": [(service, "task") for service in rng.sample(SERVICES, rng.randint(2, 3))]
        for index in range(4)
    }
    online = next(s for s in SERVICES if all(s != hop for hop, _ in chains["chain-0"]))
    chains["chain-0"].append((online, "default"))
    tasks: list[TaskSpec] = []
    for index in range(8):
        chain = f"chain-{index % 4}"
        kind = rng.random()
        zone = rng.choice(ZONES)
        if kind < 0.3 and index < 7:
            schedule, minutes = f"{rng.randrange(15)}/15 * * * *", rng.uniform(3, 8)
        elif kind < 0.7 and index < 7:
            schedule, minutes = f"{rng.randrange(60)} * * * *", rng.uniform(10, 40)
        else:  # at least one nightly task, at 02:30 Berlin: none the night DST begins
            schedule, minutes, zone = "30 2 * * *", rng.uniform(20, 90), "Europe/Berlin"
        replicas = {s: rng.randint(1, 3) for s, group in chains[chain] if group == "task"}
        own = {"extraRunsPerDay": 4} if rng.random() < 0.3 else {}
        tasks.append((f"task-{index}", chain, schedule, zone, int(minutes * 60), replicas, own))
    shape = Shape(
        name=f"changes-{seed}",
        start=START,
        services={service: {"task": 64} for service in SERVICES},
        chains=chains,
        startup={},
        defaults={
            "startup": {"median": "60s", "p95": "150s"},
            "skip": 0.1,
            "extraRunsPerDay": 0.5,
            "startDelay": "20s",
        },
        overrun=(0.15, 1.5, 3.0),
    )
    document = assemble(shape, tasks, seed, rng)
    parsed = parse_workload(render(document), f"<changes seed {seed}>")
    return replace(parsed, warmup_s=8 * 3600)


def replay(
    chosen: Workload, exhaustive: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[tuple[float, list[Decision], dict[Any, int]]], Report]:
    """Every call's decisions (when any) with the pools then, and the report."""
    made: list[tuple[float, list[Decision], dict[Any, int]]] = []

    def recorded(self: Policy, *args: Any) -> list[Decision]:
        decisions = DECIDE(self, *args)
        if decisions:
            made.append((args[0], decisions, self.pools))
        return decisions

    monkeypatch.setattr(Policy, "decide", recorded)
    report = simulate(chosen, days=0.75, policy="tasklane", exhaustive=exhaustive)
    return made, report


@pytest.mark.parametrize("seed", range(4))
def test_deciding_what_changed_decides_as_deciding_everything(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = workload(seed)
    fast, fast_report = replay(chosen, False, monkeypatch)
    full, full_report = replay(chosen, True, monkeypatch)
    assert len(full) > 100  # decisions enough to compare
    assert any(any(pools.values()) for _, _, pools in full)  # parked pools were kept
    for expected, got in zip(full, fast, strict=False):
        assert got == expected
    assert len(fast) == len(full)
    assert fast_report == full_report


def test_a_run_never_reported_finished_is_let_go_as_when_deciding_everything() -> None:
    """A run still open after `NEVER_FINISHED` x its expected duration is no longer held. No
    report says so: only time does, so the policy told of no change must still notice."""
    ruleset = rules(task("nightly", hours=0.5))
    run = Run("nightly", "r1", FIRE + 5)
    starts = {FACADE: [20.0] * 20, ACCOUNT: [50.0] * 20}
    made: dict[bool, list[Decision]] = {}
    for told in (False, True):
        policy, decisions, now = Policy(), [], FIRE - HOUR
        while now < FIRE + 6 * HOUR:
            history = [run] if now >= run.started_at else []
            reported = (
                frozenset({run.task}) if run.started_at <= now < run.started_at + 15 else None
            )
            changes = Changes(tasks=reported or frozenset()) if told else None
            decisions += policy.decide(now, ruleset, history, {}, starts, changes)
            now += 15
        made[told] = decisions
    assert any("still open after" in decision.reason for decision in made[False])
    assert made[True] == made[False]


@pytest.mark.parametrize("start_s", [None, 60.0, 61.3])
@pytest.mark.parametrize("resume_s", [None, 0.0])
def test_a_window_entering_the_reach_exactly_at_a_call_is_decided_at_the_next(
    start_s: float | None, resume_s: float | None
) -> None:
    """The reach is [start, end): a fire exactly at its end is out of it at that call and in
    at the next. Whole periods put the calls exactly on that moment: without parking, no
    start measured (a 405 s reach) or 60 s starts (450 s); parking with an instant resume,
    420 s and 465 s (a parked gap's reach, plus the resume's lead). The policy told of no
    change must still pre-warm for the fire."""
    ruleset = rules(task("nightly", hours=0.5))
    starts = {} if start_s is None else {FACADE: [start_s] * 20, ACCOUNT: [start_s] * 20}
    made: dict[bool, list[Decision]] = {}
    for told in (False, True):
        policy, decisions = Policy(PolicyConfig(resume_s=resume_s)), []
        now = FIRE - 2 * HOUR
        while now < FIRE + HOUR:
            decisions += policy.decide(now, ruleset, [], {}, starts, Changes() if told else None)
            now += 15
        made[told] = decisions
    warm = "pre-warm" if resume_s is None else "resume parked"
    assert any(decision.reason.startswith(warm) for decision in made[False])
    assert made[True] == made[False]
