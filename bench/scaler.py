"""Scaler benchmark: every policy on one realistic synthetic week, against the issue's targets.

The workload (seeded, built by `make_workload`; `bench/workloads/week.yaml` is its output
for the default seed) is a bank's batch estate: 12 services with 13 task groups, 7 chains,
60 cron tasks in 6 time zones. Statements and nightly yields pile up around 01:00-02:30
Shanghai on shared groups, weekday debits are staggered 10 minutes apart, pricing runs every
two hours on London weekdays, reconciliations follow each region's close, archives run on
Sunday. Run times are log-normal (p95 1.2-1.6 x median) with 3 % overruns (x1.5-3); 2 % of
fires are skipped; each task gets an extra (manual) run every ~20 days on average. Start-ups
are log-normal per group, from 20 s median (a Go service) to 90 s median with a p95 of 180 s
(a JVM one). The week starts on 2026-03-29 00:00 UTC: Berlin springs forward an hour later
(02:30 tasks run at 03:00 CEST) and Sydney falls back on 2026-04-05 local (a 02:30 task runs
once, a `*/20 2 * * *` one twice as often for an hour). A day of warm-up before the week
builds the history (run durations, start-up times) that the measured week starts with.

    .venv/bin/python bench/scaler.py [--days 7] [--seed 1] [--write bench/workloads/week.yaml]

Prints the `tasklane simulate` table for all policies plus tasklane with its lead at the
chain's p95 (the issue's first ask), then the issue's targets for both.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from controlplane.model.cron import format_duration
from controlplane.scaler.policy import PolicyConfig
from controlplane.scaler.simulate import SYNC_PERIOD_S, PolicyResult, Report, simulate
from controlplane.scaler.workload import parse_workload

ROOT = Path(__file__).resolve().parent.parent
WEEK = ROOT / "bench" / "workloads" / "week.yaml"
API = "tasklane.io/v1"

# service -> task groups; every task group may grow to MAX_REPLICAS, more than its runs ever
# need at once, so no policy is starved by a bound
SERVICES: dict[str, tuple[str, ...]] = {
    "fund-facade": ("task",),
    "account-svc": ("task", "debit"),
    "nav-pricing": ("task",),
    "price-feed": ("task",),
    "risk-engine": ("batch",),
    "ledger-svc": ("batch",),
    "payment-gw": ("debit",),
    "statement-svc": ("batch",),
    "report-svc": ("batch",),
    "notify-svc": ("batch",),
    "recon-svc": ("batch",),
    "archive-svc": ("batch",),
}
MAX_REPLICAS = 64
# chain -> hops (service, group); "default" hops are online capacity, not scaled
CHAINS: dict[str, list[tuple[str, str]]] = {
    "fund-yield": [("fund-facade", "task"), ("account-svc", "task"), ("nav-pricing", "task")],
    "batch-debit": [
        ("account-svc", "debit"),
        ("payment-gw", "debit"),
        ("ledger-svc", "batch"),
        ("notify-svc", "default"),
    ],
    "pricing": [("price-feed", "task"), ("nav-pricing", "task"), ("risk-engine", "batch")],
    "statements": [
        ("statement-svc", "batch"),
        ("account-svc", "task"),
        ("report-svc", "batch"),
        ("notify-svc", "batch"),
    ],
    "reconciliation": [("recon-svc", "batch"), ("ledger-svc", "batch"), ("payment-gw", "debit")],
    "risk-report": [("risk-engine", "batch"), ("report-svc", "batch"), ("archive-svc", "batch")],
    "archive": [("archive-svc", "batch"), ("ledger-svc", "batch")],
}
# service/group -> start-up (median, p95) seconds
STARTUP: dict[str, tuple[int, int]] = {
    "fund-facade/task": (35, 60),
    "account-svc/task": (45, 80),
    "account-svc/debit": (45, 80),
    "nav-pricing/task": (30, 50),
    "price-feed/task": (20, 35),
    "risk-engine/batch": (90, 180),
    "ledger-svc/batch": (40, 75),
    "payment-gw/debit": (50, 90),
    "statement-svc/batch": (30, 55),
    "report-svc/batch": (25, 45),
    "notify-svc/batch": (20, 30),
    "recon-svc/batch": (35, 60),
    "archive-svc/batch": (25, 40),
}
PRODUCTS = ("funds", "cards", "loans", "deposits", "insurance", "brokerage")
REGIONS = (
    ("cn", "Asia/Shanghai"),
    ("eu", "Europe/Berlin"),
    ("us", "America/New_York"),
    ("au", "Australia/Sydney"),
    ("uk", "Europe/London"),
)


def make_tasks(rng: random.Random) -> list[tuple[str, str, str, str, int, dict[str, int]]]:
    """(name, chain, schedule, timezone, median run seconds, replicas per hop service)."""
    tasks: list[tuple[str, str, str, str, int, dict[str, int]]] = []

    def add(name: str, chain: str, schedule: str, zone: str, minutes: float) -> None:
        replicas = {s: rng.randint(1, 4) for s, group in CHAINS[chain] if group != "default"}
        tasks.append((name, chain, schedule, zone, int(minutes * 60), replicas))

    for region, zone in REGIONS:  # nightly yield per region, 02:30 local: DST days included
        add(f"nightly-fund-yield-{region}", "fund-yield", "30 2 * * *", zone, rng.uniform(40, 90))
    add("fund-yield-intraday-au", "fund-yield", "*/20 2 * * *", "Australia/Sydney", 8)
    for index, product in enumerate(PRODUCTS):  # debits on weekday mornings, staggered
        add(
            f"batch-debit-{product}",
            "batch-debit",
            f"{index * 10} 6 * * mon-fri",
            "Asia/Shanghai",
            rng.uniform(20, 60),
        )
    for hour in (9, 11, 13, 15, 17):  # intraday pricing, overlapping with yields elsewhere
        add(f"pricing-{hour:02d}h", "pricing", f"5 {hour} * * 1-5", "Europe/London", 12)
    add("pricing-close-us", "pricing", "15 16 * * mon-fri", "America/New_York", 25)
    add("pricing-close-cn", "pricing", "5 15 * * mon-fri", "Asia/Shanghai", 25)
    for index, product in enumerate(PRODUCTS):  # statements: nightly, all at 01:00 or 01:30
        add(
            f"statements-{product}",
            "statements",
            f"{30 * (index % 2)} 1 * * *",
            "Asia/Shanghai",
            rng.uniform(30, 120),
        )
        add(
            f"statements-{product}-monthly",
            "statements",
            "0 3 1 * *",
            "Asia/Shanghai",
            rng.uniform(60, 180),
        )
    for region, zone in REGIONS:  # reconciliation after each region's close, and at noon
        add(f"recon-eod-{region}", "reconciliation", "45 23 * * *", zone, rng.uniform(20, 50))
        add(f"recon-midday-{region}", "reconciliation", "0 12 * * 1-5", zone, 15)
    for index, product in enumerate(PRODUCTS):  # risk reports: weekday evenings, Berlin
        add(
            f"risk-report-{product}",
            "risk-report",
            f"{15 * (index % 4)} 19 * * 1-5",
            "Europe/Berlin",
            rng.uniform(15, 45),
        )
    add("risk-report-weekly", "risk-report", "0 6 * * sat", "Europe/Berlin", 150)
    add("var-overnight", "risk-report", "30 2 * * *", "Europe/Berlin", 70)
    for region, zone in REGIONS:
        add(f"archive-{region}", "archive", "0 4 * * sun", zone, rng.uniform(60, 120))
        add(f"archive-logs-{region}", "archive", "30 5 * * *", zone, 20)
    add("archive-audit", "archive", "15 3 * * *", "UTC", 35)
    return tasks


def make_workload(seed: int) -> dict[str, Any]:
    """The workload document (rules embedded) for one seed."""
    rng = random.Random(seed)
    rules: list[dict[str, Any]] = []
    for service, groups in SERVICES.items():
        rules.append(
            _doc(
                "Service",
                service,
                {
                    "groups": [
                        {"name": "default", "minReplicas": 2, "maxReplicas": 6},
                        *(
                            {"name": group, "minReplicas": 0, "maxReplicas": MAX_REPLICAS}
                            for group in groups
                        ),
                    ]
                },
            )
        )
    for chain, hops in CHAINS.items():
        rules.append(
            _doc(
                "TaskChain",
                chain,
                {
                    "dye": {"values": [chain, f"{chain}@*"]},
                    "hops": [{"service": s, "group": g} for s, g in hops],
                },
            )
        )
    behaviour: dict[str, Any] = {}
    for name, chain, schedule, zone, median, replicas in make_tasks(rng):
        p95 = int(median * rng.uniform(1.2, 1.6))
        declared = 300 * -(-int(p95 * 1.1) // 300)  # what an author writes: p95 rounded up
        rules.append(
            _doc(
                "ScheduledTask",
                name,
                {
                    "chain": chain,
                    "schedule": schedule,
                    "timezone": zone,
                    "expectedDuration": format_duration(declared),
                    "replicas": replicas,
                },
            )
        )
        behaviour[name] = {
            "duration": {"median": format_duration(median), "p95": format_duration(p95)},
            "overrun": {"probability": 0.03, "factor": round(rng.uniform(1.5, 3.0), 1)},
        }
    return {
        "apiVersion": API,
        "kind": "Workload",
        "metadata": {"name": f"bank-week-{seed}"},
        "spec": {
            "start": "2026-03-29T00:00:00Z",
            "warmup": "24h",
            "seed": seed,
            "defaults": {
                "startup": {"median": "40s", "p95": "70s"},
                "skip": 0.02,
                "extraRunsPerDay": 0.05,
                "overrun": {"probability": 0.03, "factor": 2},
                "startDelay": "5s",
            },
            "groups": {
                key: {"startup": {"median": f"{low}s", "p95": f"{high}s"}}
                for key, (low, high) in STARTUP.items()
            },
            "tasks": behaviour,
            "rules": rules,
        },
    }


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}


def render(document: dict[str, Any]) -> str:
    """The YAML of a workload, with a header saying where it comes from."""
    header = (
        "# Generated by bench/scaler.py --write (seeded): a synthetic week of a bank's batch\n"
        "# tasks for `tasklane simulate --workload bench/workloads/week.yaml --days 7`.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, width=100, default_flow_style=None)


VARIANT = "tasklane lead p95"


@dataclass(frozen=True)
class Target:
    text: str
    value: Callable[[Report, PolicyResult], float]
    met: Callable[[float], bool]
    shown: str


TARGETS = (
    Target(
        "<= 40% of static-peak replica-hours",
        lambda report, r: r.replica_hours / report.static_peak_hours,
        lambda v: v <= 0.40,
        "{:.1%}",
    ),
    Target(
        "<= 1.15 x oracle replica-hours",
        lambda report, r: r.replica_hours / report.oracle_hours,
        lambda v: v <= 1.15,
        "{:.2f}x",
    ),
    Target(
        "no shortfall at >= 99% of fires",
        lambda report, r: r.share_without_shortfall,
        lambda v: v >= 0.99,
        "{:.1%}",
    ),
    Target(
        "<= 2 scale events per run per group",
        lambda report, r: r.events_per_run_group,
        lambda v: v <= 2,
        "{:.2f}",
    ),
    Target("0 flaps", lambda report, r: r.flaps, lambda v: v == 0, "{:.0f}"),
)


def verdicts(report: Report, policies: Sequence[str]) -> str:
    """The issue's targets, one line each, a column per tasklane variant."""
    lines = [f"{'target':<38}" + "".join(f"{name:>22}" for name in policies)]
    for target in TARGETS:
        cells = []
        for name in policies:
            value = target.value(report, report.result(name))
            cells.append(
                f"{target.shown.format(value):>17} {'ok' if target.met(value) else 'MISS':>4}"
            )
        lines.append(f"{target.text:<38}" + "".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write", type=Path, help="write the workload YAML here and exit")
    args = parser.parse_args(argv)
    text = render(make_workload(args.seed))
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text, encoding="utf-8")
        print(f"wrote {args.write}")
        return 0
    workload = parse_workload(text, f"<seed {args.seed}>")
    began = time.perf_counter()
    report = simulate(workload, args.days)
    # the same policy with the lead at the chain's p95 (the issue's) instead of the default p99
    strict = PolicyConfig(sync_period_s=SYNC_PERIOD_S, lead_percentile=95)
    variant = simulate(workload, args.days, "tasklane", config=strict).result("tasklane")
    report = replace(report, results=(*report.results, replace(variant, policy=VARIANT)))
    elapsed = time.perf_counter() - began
    tasks = len(workload.rules.tasks)
    chains = len(workload.rules.chains)
    print(f"scaler benchmark: {tasks} tasks over {chains} chains, {len(workload.startup)} groups")
    print(f"python {platform.python_version()}, simulated in {elapsed:.1f}s")
    print()
    print(report.table())
    print()
    print(verdicts(report, ("tasklane", VARIANT)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
