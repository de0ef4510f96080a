"""The simulator: deterministic for a seed, the oracle is a lower bound, tasklane (the real
Policy) beats static peak, and bad workload files are refused with one clear line."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.scaler import WEEK, make_workload, render, verdicts
from controlplane.errors import RuleError, TasklaneError
from controlplane.scaler import policy as policy_module
from controlplane.scaler.policy import PolicyConfig
from controlplane.scaler.profile import percentile
from controlplane.scaler.simulate import POLICIES, Report, plan_runs, simulate
from controlplane.scaler.workload import load_workload, parse_workload

RULES = Path(__file__).resolve().parents[1] / "rules" / "good" / "fund-yield.yaml"


def document() -> dict[str, Any]:
    """The fund-yield rules, with nightly runs of about 50 minutes and some noise."""
    return {
        "apiVersion": "tasklane.io/v1",
        "kind": "Workload",
        "metadata": {"name": "small"},
        "spec": {
            "start": "2026-03-29T00:00:00Z",
            "warmup": "24h",
            "seed": 3,
            "defaults": {
                "startup": {"median": "40s", "p95": "70s"},
                "skip": 0.05,
                "extraRunsPerDay": 0.2,
                "overrun": {"probability": 0.05, "factor": 2},
                "startDelay": "5s",
            },
            "groups": {"nav-pricing/task": {"startup": {"median": "20s", "p95": "30s"}}},
            "tasks": {"nightly-fund-yield": {"duration": {"median": "50m", "p95": "70m"}}},
            "rules": list(yaml.safe_load_all(RULES.read_text(encoding="utf-8"))),
        },
    }


def parse(doc: dict[str, Any]) -> Any:
    return parse_workload(yaml.safe_dump(doc, sort_keys=False), "small.yaml")


@pytest.fixture(scope="module")
def report() -> Report:
    return simulate(parse(document()), days=3)


def test_every_policy_is_reported(report: Report) -> None:
    assert [result.policy for result in report.results] == list(POLICIES)
    assert report.runs > 0 and report.fires >= report.runs - report.extra
    table = report.table()
    assert "static-peak" in table and "oracle" in table and "1.00x" in table


def test_same_seed_same_report_other_seed_other_runs(report: Report) -> None:
    assert simulate(parse(document()), days=3) == report
    workload = parse(document())
    start, end = workload.start - workload.warmup_s, workload.start + 3 * 86400
    assert plan_runs(workload, start, end, 3) == plan_runs(workload, start, end, 3)
    assert plan_runs(workload, start, end, 3) != plan_runs(workload, start, end, 4)


def test_oracle_is_a_lower_bound_and_tasklane_beats_static_peak(report: Report) -> None:
    oracle = report.result("oracle")
    for result in report.results:
        assert oracle.replica_hours <= result.replica_hours, result.policy
    tasklane = report.result("tasklane")
    assert tasklane.replica_hours < 0.4 * report.result("static-peak").replica_hours
    assert tasklane.replica_hours <= 1.3 * oracle.replica_hours
    assert tasklane.share_without_shortfall > report.result("hpa").share_without_shortfall
    assert report.result("static-peak").scale_events == 0
    assert report.result("static-peak").shortfalls == (0.0,) * len(tasklane.shortfalls)


def test_a_policy_below_either_oracle_without_shortfall_is_named(report: Report) -> None:
    """The flap-free oracle binds only policies that never flap; neither binds a policy that
    was short, which bought its savings with waiting runs."""
    assert report.oracle_hours <= report.flap_free_oracle_hours
    never_short = replace(
        report.result("tasklane"),
        shortfalls=(0.0,),
        extra_shortfalls=(),
        missing_replica_hours=0.0,
        flaps=0,
    )
    cases = (
        replace(never_short, policy="steady", replica_hours=105),
        replace(never_short, policy="flappy", replica_hours=105, flaps=2),
        replace(never_short, policy="cheap", replica_hours=95, flaps=2),
        replace(never_short, policy="short", replica_hours=95, shortfalls=(30.0,)),
    )
    bounded = replace(report, oracle_hours=100, flap_free_oracle_hours=110, results=cases)
    assert bounded.below_oracle() == ["steady (flap-free oracle)", "cheap (oracle)"]
    assert "flap-free oracle 110.0" in bounded.table()


def test_every_flap_is_named_for_the_benchmark_to_print() -> None:
    """Each policy's flaps, as `bench/scaler.py` prints them: the group, the reversed event
    and how soon it was reversed, within the flap window. Three-minute runs every ten
    minutes make the HPA flap (its 300 s window ends just before the next run)."""
    doc = document()
    nightly(doc).update(schedule="*/10 * * * *", expectedDuration="5m")
    doc["spec"]["tasks"]["nightly-fund-yield"]["duration"] = {"median": "3m", "p95": "4m"}
    report = simulate(parse(doc), days=0.25)
    hpa = report.result("hpa")
    assert hpa.flaps > 0
    for result in report.results:
        assert len(result.flapped) == result.flaps, result.policy
        assert sum(flap[-1] for flap in result.flapped) == result.forced_flaps
    group, moment, direction, after, _ = hpa.flapped[0]
    assert group in {"fund-facade/task", "account-svc/task"}
    assert direction in (1, -1) and 0 <= after < 300
    assert report.result("static-peak").flapped == ()
    assert f"flap: {group} " in verdicts(report, "hpa")[0]


def test_tasklane_runs_the_real_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = policy_module.Policy.decide

    def counted(self: policy_module.Policy, *args: Any) -> Any:
        calls.append(args[0])
        return real(self, *args)

    monkeypatch.setattr(policy_module.Policy, "decide", counted)
    simulate(parse(document()), days=0.5, policy="tasklane")
    periods = {calls[0] + 15 * n for n in range(int((24 + 12) * 3600 / 15))}
    assert periods <= set(calls)  # every sync period of warm-up and days, and run reports


def test_bad_arguments() -> None:
    workload = parse(document())
    with pytest.raises(TasklaneError, match="unknown policy 'vpa'"):
        simulate(workload, 1, policy="vpa")
    with pytest.raises(TasklaneError, match="days must be more than 0"):
        simulate(workload, 0)


# --- the example week -------------------------------------------------------------------------


def test_the_example_week_is_the_benchmarks_and_big_enough() -> None:
    assert WEEK.read_text(encoding="utf-8") == render(make_workload(1))
    workload = load_workload(WEEK)
    assert len(workload.rules.tasks) >= 50
    assert len(workload.rules.chains) >= 5
    zones = {task.timezone for task in workload.rules.tasks.values()}
    assert {"Europe/Berlin", "Australia/Sydney"} <= zones  # both change clocks that week


# --- bad workload files ---------------------------------------------------------------------


def rule(doc: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    return next(
        r for r in doc["spec"]["rules"] if r["kind"] == kind and r["metadata"]["name"] == name
    )


def nightly(doc: dict[str, Any]) -> dict[str, Any]:
    return rule(doc, "ScheduledTask", "nightly-fund-yield")["spec"]


BAD = [
    (
        lambda d: nightly(d).update(schedule="0 2 30 2 *"),
        "small.yaml: spec.rules[5] (ScheduledTask nightly-fund-yield): spec.schedule: "
        "'0 2 30 2 *' never fires",
    ),
    (
        lambda d: nightly(d)["replicas"].update({"fund-facade": -1}),
        "spec.replicas.fund-facade: must not be negative, got -1",
    ),
    (
        lambda d: nightly(d).update(timezone="Mars/Olympus"),
        "spec.timezone: unknown time zone 'Mars/Olympus'",
    ),
    (
        lambda d: nightly(d).update(chain="no-such-chain"),
        "small.yaml: spec.rules[5] (ScheduledTask nightly-fund-yield): spec.chain: unknown chain",
    ),
    (
        lambda d: d["spec"]["tasks"].update({"nightly": {}}),
        "small.yaml: spec.tasks.nightly: not a ScheduledTask of spec.rules",
    ),
    (
        lambda d: d["spec"]["groups"].update({"fund-facade/default": {}}),
        "small.yaml: spec.groups.fund-facade/default: not a task group",
    ),
    (
        lambda d: d["spec"]["defaults"].update(skip=1.5),
        "small.yaml: spec.defaults.skip: must be between 0 and 1, got 1.5",
    ),
    (
        lambda d: d["spec"]["tasks"]["nightly-fund-yield"]["duration"].update(p95="10m"),
        "small.yaml: spec.tasks.nightly-fund-yield.duration.p95: 10m is shorter than the median",
    ),
    (
        lambda d: d["spec"]["defaults"]["startup"].update(median="fast"),
        "small.yaml: spec.defaults.startup.median: 'fast' is not a duration",
    ),
    (
        lambda d: d["spec"]["defaults"]["startup"].update(median="0s"),
        "small.yaml: spec.defaults.startup.median: must be longer than 0",
    ),
    (
        lambda d: d["spec"].update(start="2026-03-29T00:00:00"),
        "small.yaml: spec.start: needs a UTC offset",
    ),
    (lambda d: d["spec"].pop("start"), "small.yaml: spec.start: missing required field"),
    (
        lambda d: d["spec"].update(warmpu="1h"),
        "small.yaml: spec.warmpu: unknown field (expected one of: start, warmup",
    ),
    (lambda d: d.update(kind="Workloads"), "small.yaml: kind: expected 'Workload'"),
    (
        lambda d: d["spec"].update(parkedCost=2),
        "small.yaml: spec.parkedCost: must be between 0 and 1, got 2",
    ),
    (
        lambda d: d["spec"].update(
            rules=[r for r in d["spec"]["rules"] if r["kind"] != "ScheduledTask"]
        ),
        "small.yaml: spec.rules: no ScheduledTask: nothing to simulate",
    ),
    (
        lambda d: d["spec"].pop("defaults"),
        "small.yaml: spec.groups.account-svc/debit.startup: missing",
    ),
]


@pytest.mark.parametrize(("mangle", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_workload_is_refused_with_one_line(mangle: Any, message: str) -> None:
    doc = copy.deepcopy(document())
    mangle(doc)
    with pytest.raises(RuleError) as caught:
        parse(doc)
    assert "\n" not in str(caught.value)
    assert message in str(caught.value)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match=r"w.yaml: YAML syntax error at line 3, column 1: expected"):
        parse_workload("kind: Workload\nspec: [unclosed\n", "w.yaml")
    with pytest.raises(RuleError, match="expected one Workload document, got 2"):
        parse_workload("a: 1\n---\nb: 2\n", "w.yaml")
    with pytest.raises(RuleError, match="no such file or directory"):
        load_workload(tmp_path / "missing.yaml")


def test_keda_cron_adds_overlapping_tasks_and_leads_by_the_measured_startup() -> None:
    """Two tasks fire together on account-svc/task (3 + 2 replicas) whose start-ups take
    3-4 minutes: a careful KEDA setup (triggers summed, lead from the start-up p95) starts
    every fire on enough capacity, as the oracle does."""
    doc = document()
    spec = doc["spec"]
    spec["defaults"] = {"startup": {"median": "200s", "p95": "240s"}}
    spec["groups"] = {}
    twin = copy.deepcopy(
        next(d for d in spec["rules"] if d["metadata"]["name"] == "nightly-fund-yield")
    )
    twin["metadata"]["name"] = "nightly-fund-yield-twin"
    twin["spec"]["replicas"] = {"fund-facade": 1, "account-svc": 2, "nav-pricing": 1}
    spec["rules"].append(twin)
    spec["tasks"] = {
        name: {"duration": {"median": "50m", "p95": "55m"}}
        for name in ("nightly-fund-yield", "nightly-fund-yield-twin")
    }
    report = simulate(parse(doc), days=3, policy="keda-cron")
    keda = report.result("keda-cron")
    assert keda.shortfalls and keda.share_without_shortfall == 1.0
    assert report.below_oracle() == []


def test_frequent_extra_runs_start_from_the_parked_pool_costed_as_memory() -> None:
    """A task run by hand about four times a day: once its history shows the habit, its
    groups keep a parked pool, so extra runs start within a sync period, not after a cold
    start; the pool's hours are priced at the workload's parkedCost. An actuator that cannot
    park (resume_s None) parks nothing and starts every extra run cold."""
    doc = document()
    doc["spec"]["tasks"]["nightly-fund-yield"]["extraRunsPerDay"] = 4
    doc["spec"]["parkedCost"] = 0.25
    config = PolicyConfig(sync_period_s=15)
    pooled = simulate(parse(doc), days=3, policy="tasklane", config=config).result("tasklane")
    cold_config = replace(config, resume_s=None)
    cold = simulate(parse(doc), days=3, policy="tasklane", config=cold_config).result("tasklane")
    assert percentile(cold.extra_shortfalls, 50) > 30
    assert percentile(pooled.extra_shortfalls, 50) <= 10
    assert cold.parked_hours == 0 < pooled.parked_hours
    doc["spec"]["parkedCost"] = 0.5
    dearer = simulate(parse(doc), days=3, policy="tasklane").result("tasklane")
    # priced at twice the cost, and parked no longer: the policy weighs the same price
    assert 0 < dearer.parked_hours / 0.5 <= pooled.parked_hours / 0.25 + 1e-9
