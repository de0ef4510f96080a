"""Scaler benchmark: every policy on three synthetic weeks of different shapes, with the same
default policy settings, against the issue's targets.

Each workload is seeded and built here; `bench/workloads/*.yaml` are their outputs for the
default seed (`--write` renews them):

- bank (`make_workload`, week.yaml): a bank's batch estate, 12 services with 13 task groups,
  7 chains, 60 cron tasks in 6 time zones. Statements and nightly yields pile up around
  01:00-02:30 Shanghai on shared groups, weekday debits are staggered 10 minutes apart,
  pricing runs every two hours on London weekdays, reconciliations follow each region's
  close, archives run on Sunday. 3 % overruns (x1.5-3), 2 % of fires skipped, an extra
  (manual) run every ~20 days per task. Start-ups from 20 s median (a Go service) to 90 s
  median with a p95 of 180 s (a JVM one). The week starts on 2026-03-29 00:00 UTC: Berlin
  springs forward an hour later and Sydney falls back on 2026-04-05 local.
- shop (`make_shop`, shop-week.yaml): an online shop, 15-minute and hourly tasks all day,
  JVM start-ups of 2-5 minutes, extra runs several times a day (re-syncs), 8 % overruns
  (x2-3), a Friday flash sale at 4x capacity on the day of the month-end close.
- etl (`make_etl`, etl-week.yaml): long overlapping nightly ETL (2-4 h extracts, 1.5-3.5 h
  transforms), hourly incremental loads over them on the same groups, an 8-hour weekly
  compaction, backfills run only by hand (~3 a day), and the US spring-forward.

Run times are log-normal (p95 1.2-1.6 x median). A day of warm-up before each week builds
the history (run durations, start-up times, extra runs) that the measured week starts with.

    .venv/bin/python bench/scaler.py [--workload bank|shop|etl|all] [--days 7] [--seed 1]
    .venv/bin/python bench/scaler.py --write    # renew bench/workloads/*.yaml
    .venv/bin/python bench/scaler.py --scale [--days 30] [--warmup 24]    # issue 15 part 5

Prints the `tasklane simulate` table of every workload, tasklane's targets (the replica-hours
against both the oracle and the flap-free oracle) and whether both oracles are lower bounds
there (exit 1 when one is not).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from controlplane.model.cron import format_duration
from controlplane.model.run import Run
from controlplane.scaler.policy import Policy, PolicyConfig
from controlplane.scaler.profile import percentile
from controlplane.scaler.simulate import (
    START_SAMPLES,
    SYNC_PERIOD_S,
    PolicyResult,
    Report,
    plan_runs,
    simulate,
)
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
    """The bank week's workload document (rules embedded) for one seed."""
    rng = random.Random(seed)
    return assemble(
        Shape(
            name=f"bank-week-{seed}",
            start="2026-03-29T00:00:00Z",
            services={s: {g: MAX_REPLICAS for g in groups} for s, groups in SERVICES.items()},
            chains=CHAINS,
            startup=STARTUP,
            defaults={
                "startup": {"median": "40s", "p95": "70s"},
                "skip": 0.02,
                "extraRunsPerDay": 0.05,
                "overrun": {"probability": 0.03, "factor": 2},
                "startDelay": "5s",
            },
        ),
        [(*task, {}) for task in make_tasks(rng)],
        seed,
        rng,
    )


SHOP_CHAINS: dict[str, list[tuple[str, str]]] = {
    "order-export": [("order-svc", "task"), ("warehouse-svc", "task"), ("mail-svc", "batch")],
    "inventory-sync": [("inventory-svc", "task"), ("catalog-svc", "task")],
    "price-update": [
        ("pricing-svc", "task"),
        ("catalog-svc", "task"),
        ("search-indexer", "batch"),
        ("mail-svc", "default"),
    ],
    "flash-sale": [
        ("pricing-svc", "task"),
        ("inventory-svc", "task"),
        ("order-svc", "task"),
        ("payment-svc", "batch"),
    ],
    "month-end": [("ledger-svc", "batch"), ("payment-svc", "batch"), ("order-svc", "task")],
    "search-reindex": [("search-indexer", "batch"), ("catalog-svc", "task")],
    "newsletter": [("mail-svc", "batch"), ("catalog-svc", "task")],
}
# JVM services: 2-5 minutes from start to ready
SHOP_STARTUP: dict[str, tuple[int, int]] = {
    "order-svc/task": (150, 240),
    "warehouse-svc/task": (180, 300),
    "mail-svc/batch": (120, 180),
    "inventory-svc/task": (160, 260),
    "catalog-svc/task": (140, 220),
    "pricing-svc/task": (130, 200),
    "search-indexer/batch": (200, 300),
    "payment-svc/batch": (170, 280),
    "ledger-svc/batch": (150, 240),
}


def make_shop(seed: int) -> dict[str, Any]:
    """An online shop's week, unlike the bank's: 15-minute order exports and hourly inventory
    and price syncs all day, JVM start-ups of 2-5 minutes, frequent unannounced extra runs
    (re-syncs after stock and price errors), 8 % overruns, a Friday flash sale that needs
    several times the usual capacity, and the month-end close on the same Friday (1 May)."""
    rng = random.Random(seed)
    tasks: list[TaskSpec] = []

    def add(
        name: str, chain: str, schedule: str, zone: str, minutes: float, scale: int = 1, **own: Any
    ) -> None:
        replicas = {
            s: scale * rng.randint(1, 3) for s, group in SHOP_CHAINS[chain] if group != "default"
        }
        tasks.append((name, chain, schedule, zone, int(minutes * 60), replicas, own))

    for region, zone in (("eu", "Europe/Berlin"), ("us", "America/New_York")):
        add(f"order-export-{region}", "order-export", "*/15 * * * *", zone, rng.uniform(4, 7))
    for index, warehouse in enumerate(("north", "south", "east")):
        add(
            f"inventory-sync-{warehouse}",
            "inventory-sync",
            f"{5 + 20 * index} * * * *",
            "Europe/Berlin",
            rng.uniform(12, 18),
            extraRunsPerDay=3,
        )
    add("price-update", "price-update", "50 * * * *", "Europe/Berlin", 8, extraRunsPerDay=4)
    add("flash-sale", "flash-sale", "0 12 * * fri", "Europe/Berlin", 120, scale=4)
    add("month-end-close", "month-end", "0 1 1 * *", "Europe/Berlin", 180, scale=2)
    add("search-reindex", "search-reindex", "30 2 * * *", "Europe/Berlin", 70)
    add("newsletter", "newsletter", "0 7 * * *", "Europe/Berlin", 30, extraRunsPerDay=0.5)
    shape = Shape(
        name=f"shop-week-{seed}",
        start="2026-04-26T00:00:00Z",
        services={
            service: {group: MAX_REPLICAS}
            for service, group in (key.split("/") for key in SHOP_STARTUP)
        },
        chains=SHOP_CHAINS,
        startup=SHOP_STARTUP,
        defaults={
            "startup": {"median": "150s", "p95": "240s"},
            "skip": 0.01,
            "extraRunsPerDay": 0.2,
            "overrun": {"probability": 0.08, "factor": 2},
            "startDelay": "10s",
        },
        overrun=(0.08, 2.0, 3.0),
    )
    return assemble(shape, tasks, seed, rng)


ETL_CHAINS: dict[str, list[tuple[str, str]]] = {
    "extract": [("extractor", "etl"), ("staging-db", "etl"), ("warehouse-loader", "etl")],
    "transform": [("spark-driver", "etl"), ("warehouse-loader", "etl")],
    "incremental": [("extractor", "etl"), ("warehouse-loader", "etl")],
    "compaction": [("warehouse-loader", "etl"), ("object-store-gw", "etl")],
    "backfill": [("extractor", "etl"), ("spark-driver", "etl"), ("warehouse-loader", "etl")],
}
ETL_STARTUP: dict[str, tuple[int, int]] = {
    "extractor/etl": (30, 50),
    "staging-db/etl": (60, 110),
    "warehouse-loader/etl": (45, 80),
    "spark-driver/etl": (90, 150),
    "object-store-gw/etl": (15, 25),
}


def make_etl(seed: int) -> dict[str, Any]:
    """A data team's week, unlike both others: few groups shared by long nightly ETL runs of
    3-6 hours that overlap each other, hourly incremental loads on top of them, a weekly
    8-hour compaction, backfills started by hand in bursts, and the US spring-forward
    (Sunday 8 March 2026: 02:30 Chicago does not exist that night)."""
    rng = random.Random(seed)
    tasks: list[TaskSpec] = []

    def add(name: str, chain: str, schedule: str, zone: str, minutes: float, **own: Any) -> None:
        replicas = {s: rng.randint(1, 4) for s, _ in ETL_CHAINS[chain]}
        tasks.append((name, chain, schedule, zone, int(minutes * 60), replicas, own))

    sources = ("crm", "billing", "web", "mobile", "erp", "support")
    for index, source in enumerate(sources):
        zone = ("America/New_York", "America/Chicago")[index % 2]
        add(
            f"extract-{source}",
            "extract",
            f"{15 * (index % 4)} 1 * * *",
            zone,
            rng.uniform(120, 240),
        )
        add(f"transform-{source}", "transform", "30 2 * * *", zone, rng.uniform(90, 200))
        add(
            f"incremental-{source}",
            "incremental",
            f"{10 * index} * * * *",
            zone,
            rng.uniform(15, 35),
        )
    add("compaction-weekly", "compaction", "0 0 * * sun", "America/Chicago", 480)
    add("backfill", "backfill", "0 4 1 1 *", "America/New_York", 90, extraRunsPerDay=3)
    shape = Shape(
        name=f"etl-week-{seed}",
        start="2026-03-07T00:00:00Z",
        services={
            service: {group: MAX_REPLICAS}
            for service, group in (key.split("/") for key in ETL_STARTUP)
        },
        chains=ETL_CHAINS,
        startup=ETL_STARTUP,
        defaults={
            "startup": {"median": "45s", "p95": "80s"},
            "skip": 0.03,
            "extraRunsPerDay": 0.1,
            "overrun": {"probability": 0.05, "factor": 2},
            "startDelay": "30s",
        },
        overrun=(0.05, 1.5, 2.5),
    )
    return assemble(shape, tasks, seed, rng)


def make_scale(seed: int, tasks: int = 500, groups: int = 200) -> dict[str, Any]:
    """The scale check's estate: `groups` services with one task group each, chains of two
    hops over them, and `tasks` tasks every 15 minutes, hourly or nightly, on those chains."""
    rng = random.Random(seed)
    names = [f"svc-{index:03d}" for index in range(groups)]
    chains = {
        f"chain-{index:03d}": [(names[index], "task"), (names[(index + 1) % groups], "task")]
        for index in range(groups)
    }
    specs: list[TaskSpec] = []
    for index in range(tasks):
        chain = f"chain-{index % groups:03d}"
        kind = rng.random()
        if kind < 0.2:
            schedule, minutes = f"{rng.randrange(15)}/15 * * * *", rng.uniform(3, 8)
        elif kind < 0.6:
            schedule, minutes = f"{rng.randrange(60)} * * * *", rng.uniform(10, 30)
        else:
            schedule, minutes = (
                f"{rng.randrange(60)} {rng.randrange(24)} * * *",
                rng.uniform(20, 120),
            )
        replicas = {service: rng.randint(1, 3) for service, _ in chains[chain]}
        specs.append((f"task-{index:03d}", chain, schedule, "UTC", int(minutes * 60), replicas, {}))
    shape = Shape(
        name=f"scale-{tasks}-{groups}",
        start="2026-03-02T00:00:00Z",
        services={name: {"task": MAX_REPLICAS} for name in names},
        chains=chains,
        startup={},
        defaults={
            "startup": {"median": "40s", "p95": "70s"},
            "skip": 0.02,
            "extraRunsPerDay": 0.05,
            "overrun": {"probability": 0.03, "factor": 2},
        },
    )
    return assemble(shape, specs, seed, rng)


def measure_scale(days: float, seed: int, warmup_h: float | None = None) -> None:
    """The issue's scale check: a `days` simulation of 500 tasks over 200 groups (tasklane
    only), and the CPU one live sync period's decision takes at that size. `warmup_h`
    replaces the workload's day of warm-up, so a short run can be profiled or timed."""
    workload = parse_workload(render(make_scale(seed)), "<scale>")
    if warmup_h is not None:
        workload = replace(workload, warmup_s=warmup_h * 3600)
    rules = workload.rules
    print(f"scale: {len(rules.tasks)} tasks, {len(workload.startup)} groups")
    start = workload.start
    history = [
        Run(run.task, run.id, run.start, run.end, "succeeded")
        for run in plan_runs(workload, start - 3 * 86400, start, seed)
    ]
    starts = {key: [spread.median] * START_SAMPLES for key, spread in workload.startup.items()}
    policy = Policy(PolicyConfig(sync_period_s=SYNC_PERIOD_S))
    cpu: list[float] = []
    for tick in range(40):
        now = start + tick * SYNC_PERIOD_S
        began = time.process_time()
        policy.decide(now, rules, history, {}, starts)
        cpu.append(time.process_time() - began)
    print(
        f"live sync period: Policy.decide CPU first {cpu[0]:.2f}s, then p50 "
        f"{percentile(cpu[1:], 50):.3f}s, max {max(cpu[1:]):.3f}s "
        f"({len(history)} runs in the history)"
    )
    began, cpu_began = time.perf_counter(), time.process_time()
    simulate(workload, days, "tasklane")
    elapsed, cpu_used = time.perf_counter() - began, time.process_time() - cpu_began
    simulated = days + workload.warmup_s / 86400
    print(
        f"simulation of {days:g} days after {workload.warmup_s / 3600:g} h of warm-up, tasklane "
        f"only: {elapsed:.1f}s ({elapsed / simulated:.1f}s per simulated day; CPU "
        f"{cpu_used:.1f}s, {cpu_used / simulated:.1f}s per day: the machine is shared)"
    )


@dataclass(frozen=True)
class Shape:
    """What a generated workload is made of besides its tasks."""

    name: str
    start: str
    services: dict[str, dict[str, int]]  # service -> task group -> maxReplicas
    chains: dict[str, list[tuple[str, str]]]
    startup: dict[str, tuple[int, int]]  # service/group -> (median, p95) seconds
    defaults: dict[str, Any]
    overrun: tuple[float, float, float] = (0.03, 1.5, 3.0)  # probability, factor range


TaskSpec = tuple[str, str, str, str, int, dict[str, int], dict[str, Any]]


def assemble(shape: Shape, tasks: list[TaskSpec], seed: int, rng: random.Random) -> dict[str, Any]:
    """The workload document: Services (a default group plus the task groups), chains,
    ScheduledTasks with an author's expectedDuration (p95 x 1.1 rounded up to 5 minutes), and
    each task's run times (log-normal, p95 1.2-1.6 x median) and overruns. A task's own
    behaviour (the last field of its spec) overrides the shape's defaults."""
    rules: list[dict[str, Any]] = []
    for service, groups in shape.services.items():
        rules.append(
            _doc(
                "Service",
                service,
                {
                    "groups": [
                        {"name": "default", "minReplicas": 2, "maxReplicas": 6},
                        *(
                            {"name": group, "minReplicas": 0, "maxReplicas": most}
                            for group, most in groups.items()
                        ),
                    ]
                },
            )
        )
    for chain, hops in shape.chains.items():
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
    probability, low, high = shape.overrun
    for name, chain, schedule, zone, median, replicas, own in tasks:
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
            "overrun": {"probability": probability, "factor": round(rng.uniform(low, high), 1)},
            **own,
        }
    return {
        "apiVersion": API,
        "kind": "Workload",
        "metadata": {"name": shape.name},
        "spec": {
            "start": shape.start,
            "warmup": "24h",
            "seed": seed,
            "defaults": shape.defaults,
            "groups": {
                key: {"startup": {"median": f"{low}s", "p95": f"{high}s"}}
                for key, (low, high) in shape.startup.items()
            },
            "tasks": behaviour,
            "rules": rules,
        },
    }


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}


@dataclass(frozen=True)
class Generated:
    """One committed workload: its generator and the file it writes for the default seed."""

    make: Callable[[int], dict[str, Any]]
    path: Path
    what: str


WORKLOADS = {
    "bank": Generated(make_workload, WEEK, "a bank's batch tasks"),
    "shop": Generated(make_shop, ROOT / "bench" / "workloads" / "shop-week.yaml", "an online shop"),
    "etl": Generated(make_etl, ROOT / "bench" / "workloads" / "etl-week.yaml", "a data team's ETL"),
}


def render(document: dict[str, Any], generated: Generated | None = None) -> str:
    """The YAML of a workload, with a header saying where it comes from."""
    generated = generated or WORKLOADS["bank"]
    name = generated.path.relative_to(ROOT)
    header = (
        f"# Generated by bench/scaler.py --write (seeded): a synthetic week of {generated.what}\n"
        f"# for `tasklane simulate --workload {name} --days 7`.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False, width=100, default_flow_style=None)


@dataclass(frozen=True)
class Target:
    text: str
    value: Callable[[Report, PolicyResult], float]
    met: Callable[[float], bool]
    shown: str


def _extra_p50(result: PolicyResult) -> float:
    shortfalls = result.extra_shortfalls
    return percentile(shortfalls, 50) if shortfalls else 0.0


TARGETS = (
    Target(
        "<= 1.10 x oracle replica-hours",
        lambda report, r: r.replica_hours / report.oracle_hours,
        lambda v: v <= 1.10,
        "{:.3f}x",
    ),
    Target(
        "<= 1.10 x flap-free oracle replica-h",
        lambda report, r: r.replica_hours / report.flap_free_oracle_hours,
        lambda v: v <= 1.10,
        "{:.3f}x",
    ),
    Target(
        "no shortfall at >= 99.5% of fires",
        lambda report, r: r.share_without_shortfall,
        lambda v: v >= 0.995,
        "{:.1%}",
    ),
    Target("0 flaps", lambda report, r: r.flaps, lambda v: v == 0, "{:.0f}"),
    Target(
        "<= 2 scale events per run per group",
        lambda report, r: r.events_per_run_group,
        lambda v: v <= 2,
        "{:.2f}",
    ),
    Target(
        "extra runs short p50 <= 10 s",
        lambda report, r: _extra_p50(r),
        lambda v: v <= 10,
        "{:.1f}s",
    ),
)


def verdicts(report: Report, policy: str = "tasklane") -> tuple[str, bool]:
    """The issue's targets for one policy, one line each, and whether all were met."""
    lines = [f"targets for {policy} on {report.workload}:"]
    passed = True
    for target in TARGETS:
        value = target.value(report, report.result(policy))
        met = target.met(value)
        passed = passed and met
        lines.append(
            f"  {target.text:<38}{target.shown.format(value):>10}  {'ok' if met else 'MISS'}"
        )
    for group, moment, direction, after, forced in report.result(policy).flapped:
        lines.append(
            f"  flap: {group} {'up' if direction > 0 else 'down'} at "
            f"{datetime.fromtimestamp(moment, UTC):%a %H:%M:%S} UTC, reversed {after:.0f} s "
            + ("later by an extra run" if forced else "later")
        )
    below = report.below_oracle()
    lines.append(
        "  both oracles are lower bounds               "
        + ("yes" if not below else f"NO: {', '.join(below)} cost less without shortfall")
    )
    return "\n".join(lines), passed and not below


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=float, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workload", choices=[*WORKLOADS, "all"], default="all", help="which generated week"
    )
    parser.add_argument(
        "--write", action="store_true", help="write the workload files (default seed) and exit"
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="instead: time a --days simulation of 500 tasks over 200 groups and the CPU of "
        "one live sync period at that size",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        metavar="HOURS",
        help="with --scale: hours of warm-up instead of the workload's 24",
    )
    args = parser.parse_args(argv)
    if args.scale:
        measure_scale(args.days, args.seed, args.warmup)
        return 0
    chosen = WORKLOADS if args.workload == "all" else {args.workload: WORKLOADS[args.workload]}
    if args.write:
        for generated in chosen.values():
            generated.path.parent.mkdir(parents=True, exist_ok=True)
            generated.path.write_text(render(generated.make(args.seed), generated), "utf-8")
            print(f"wrote {generated.path.relative_to(ROOT)}")
        return 0
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    bound = True
    for generated in chosen.values():
        text = render(generated.make(args.seed), generated)
        workload = parse_workload(text, f"<{generated.path.name}, seed {args.seed}>")
        began = time.perf_counter()
        report = simulate(workload, args.days)
        elapsed = time.perf_counter() - began
        print()
        print(
            f"{len(workload.rules.tasks)} tasks over {len(workload.rules.chains)} chains, "
            f"{len(workload.startup)} groups, simulated in {elapsed:.1f}s"
        )
        print(report.table())
        shown, _ = verdicts(report)
        print(shown)
        bound = bound and not report.below_oracle()
    return 0 if bound else 1


if __name__ == "__main__":
    sys.exit(main())
