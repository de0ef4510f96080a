"""Scheduled tasks and rule sets for the profile and policy tests, built in code (no YAML):
the fund-yield chain fund-facade -> account-svc -> nav-pricing and a debit chain."""

from __future__ import annotations

from datetime import UTC, datetime

from controlplane.model.dye import Dye
from controlplane.model.rules import Group, Hop, RuleSet, ScheduledTask, Service, TaskChain

HOUR = 3600.0


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()


def task(
    name: str,
    schedule: str = "0 2 * * *",
    timezone: str = "Asia/Shanghai",
    hours: float = 1,
    chain: str = "fund-yield",
    replicas: tuple[tuple[str, int], ...] = (("account-svc", 3), ("fund-facade", 4)),
) -> ScheduledTask:
    return ScheduledTask(name, chain, schedule, timezone, int(hours * HOUR), replicas)


def rules(*tasks: ScheduledTask) -> RuleSet:
    """fund-facade -> account-svc -> nav-pricing (default: online capacity, not scaled), and a
    debit chain sharing account-svc's task group."""

    def service(name: str, *groups: Group) -> Service:
        return Service(name, "http", (Group("default", 1, 4), *groups))

    def chain(name: str, *hops: tuple[str, str]) -> TaskChain:
        dye = Dye("x-task-dye", "task-dye", (name,), ())
        return TaskChain(name, dye, "strict", tuple(Hop(s, g, 100, None) for s, g in hops))

    return RuleSet(
        services={
            "fund-facade": service("fund-facade", Group("task", 0, 8)),
            "account-svc": service("account-svc", Group("task", 0, 6)),
            "nav-pricing": service("nav-pricing"),
        },
        chains={
            "fund-yield": chain(
                "fund-yield",
                ("fund-facade", "task"),
                ("account-svc", "task"),
                ("nav-pricing", "default"),
            ),
            "debit": chain("debit", ("account-svc", "task")),
        },
        tasks={t.name: t for t in tasks},
    )
