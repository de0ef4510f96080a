"""The probe's verdicts from access-log entries (telemetry/probe.py), for the cases the real
mesh tests (tests/integration/test_probe.py) do not build: a wrong group, a loose fallback, a
strict 503, an app that dropped x-request-id with the dye."""

from __future__ import annotations

import pytest

from controlplane.model.load import load_text
from controlplane.model.rules import RuleSet
from controlplane.model.validate import apply
from controlplane.telemetry.accounting import EGRESS, INBOUND, LogEntry
from controlplane.telemetry.probe import IN_FLIGHT_S, Probes, trace
from tests.support.rules import chain, service

ID = "probe-1"
HOPS = "[{service: a, group: task}, {service: b, group: task}, {service: c, group: task}]"


def rules(fallback: str, hops: str = HOPS) -> RuleSet:
    text = service("a") + service("b") + service("c") + chain("x", hops, fallback=fallback)
    return apply(RuleSet.empty(), load_text(text, "rules.yaml"))


def served(
    svc: str, group: str, dyed: bool = True, at: float = 0.0, request_id: str = ID
) -> LogEntry:
    return LogEntry(f"{svc}|{group}|1", svc, group, INBOUND, request_id=request_id,
                    dye="x" if dyed else "", at=at)  # fmt: skip


def sent(caller: str, callee: str, status: int, flags: frozenset[str] = frozenset()) -> LogEntry:
    return LogEntry(f"{caller}|task|1", caller, "task", EGRESS, route="x", cluster=f"{callee}|task",
                    request_id=ID, dye="x", status=status, flags=flags)  # fmt: skip


@pytest.mark.parametrize(
    ("fallback", "entries", "verdicts", "problem"),
    [
        ("strict", [served("a", "task"), served("b", "debit"), served("c", "task")],
         ["ok", "wrong group", "ok"], "hop 2 (b) served by group debit, not task"),
        ("loose", [served("a", "task"), served("b", "default"), served("c", "task")],
         ["ok", "fallback", "ok"], None),
        ("strict", [served("a", "task"), sent("a", "b", 503, frozenset({"UH"}))],
         ["ok", "not reached", "not reached"], "hop 2 (b): not reached: the caller's sidecar "
         "(a|task|1) answered 503 (UH): no instance served it"),
        ("strict", [served("a", "task"), served("b", "task")],
         ["ok", "ok", "not reached"], "hop 3 (c): not reached: no sidecar saw a request with id "
         "probe-1 to c: the app at hop 2 (b) did not call it, or dropped x-request-id too (with or "
         "without the dye)"),
        ("strict", [served("a", "task"), served("b", "default", dyed=False, at=1),
                    served("c", "default", dyed=False, at=2)],
         ["ok", "dye lost", "undyed"], "dye lost between hop 1 (a) and hop 2 (b)"),
    ],
)  # fmt: skip
def test_verdicts(
    fallback: str, entries: list[LogEntry], verdicts: list[str], problem: str | None
) -> None:
    ruleset = rules(fallback)
    probes = Probes()
    probes.start(ID)
    other = LogEntry("a|debit|2", "a", "debit", INBOUND, request_id="another request")
    probes.ingest([*entries, other])  # only the probe's own entries are kept
    report = trace(ruleset, ruleset.chains["x"], ID, probes.entries(ID), {})
    assert [hop["verdict"] for hop in report["hops"]] == verdicts
    assert (report["ok"], report["problem"]) == (problem is None, problem)


def test_hops_behind_a_queue_are_not_followed() -> None:
    """A message carries no x-request-id: the probe stops at the first queue hop and passes."""
    hops = HOPS.replace("{service: c, group: task}", "{service: c, group: task, queue: q}")
    ruleset = rules("strict", hops)
    report = trace(ruleset, ruleset.chains["x"], ID, [served("a", "task"), served("b", "task")], {})
    assert [(h["verdict"], h.get("detail")) for h in report["hops"]] == [
        ("ok", None),
        ("ok", None),
        ("not followed", "behind queue q"),
    ]
    assert (report["ok"], report["problem"]) == (True, None)


def test_a_probe_never_finished_is_dropped_after_its_time() -> None:
    """A probe whose request was cancelled before its finish keeps no entries for good: once
    it is older than IN_FLIGHT_S its later entries are not kept, while a younger one's are."""
    now = [0.0]
    probes = Probes(clock=lambda: now[0])
    probes.start("lost")
    now[0] = IN_FLIGHT_S / 2
    probes.start(ID)
    probes.ingest([served("a", "task", request_id="lost"), served("a", "task")])
    assert len(probes.entries("lost")) == len(probes.entries(ID)) == 1
    now[0] = IN_FLIGHT_S + 1
    probes.ingest([served("b", "task", request_id="lost"), served("b", "task")])
    assert probes.entries("lost") == []
    assert [e.service for e in probes.entries(ID)] == ["a", "b"]
