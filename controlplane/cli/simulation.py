"""How `tasklane simulate` prints a Report: two tables that fit 100 columns (the README's
columns first, under the README's names, then the rest), a legend saying what each column
measures, or every figure as JSON (`-o json`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controlplane.scaler.simulate import PolicyResult, Report, percentile

WIDTH = 100


@dataclass(frozen=True)
class Column:
    """One figure per policy: its JSON key, its header (the README's name, on two lines),
    what it means, and how it is computed and shown."""

    key: str
    head: tuple[str, str]
    legend: str
    value: Callable[[Report, PolicyResult], float]
    shown: str  # a format for the value

    @property
    def name(self) -> str:
        """The header on one line: 'fires with no shortfall', 'events/run/group'."""
        first, second = self.head
        return first + second if first.endswith("/") else f"{first} {second}".strip()


def _extra_p50(_: Report, r: PolicyResult) -> float:
    return percentile(r.extra_shortfalls, 50) if r.extra_shortfalls else 0.0


# The columns of README's scaler table, in its order and with its names.
README_COLUMNS = (
    Column("replica_hours", ("", "replica-h"), "replica-hours run over the measured days",
           lambda _, r: r.replica_hours, "{:.1f}"),
    Column("share_of_static_peak", ("% of", "static peak"),
           "replica-hours against keeping every group at its peak all the time",
           lambda rep, r: 100 * r.replica_hours / rep.static_peak_hours, "{:.1f} %"),
    Column("times_oracle", ("x", "oracle"),
           "replica-hours against the oracle, which knows every run in advance",
           lambda rep, r: r.replica_hours / rep.oracle_hours, "{:.2f}"),
    Column("times_flap_free_oracle", ("x flap-free", "oracle"),
           "replica-hours against the least that any policy that never flaps can cost",
           lambda rep, r: r.replica_hours / rep.flap_free_oracle_hours, "{:.2f}"),
    Column("fires_with_no_shortfall", ("fires with", "no shortfall"),
           "share of cron fires whose run started with every hop's replicas ready",
           lambda _, r: 100 * r.share_without_shortfall, "{:.1f} %"),
    Column("shortfall_p99", ("shortfall", "p99"),
           "p99 over fired runs of the seconds a run waited for capacity",
           lambda _, r: r.shortfall_p99, "{:.0f} s"),
    Column("events_per_run_group", ("events/", "run/group"),
           "scale events per (run, task group)", lambda _, r: r.events_per_run_group, "{:.2f}"),
    Column("flaps", ("", "flaps"), "a scale-down undone within 300 s",
           lambda _, r: r.flaps, "{:.0f}"),
)  # fmt: skip
MORE_COLUMNS = (
    Column("shortfall_p50", ("shortfall", "p50"), "the median of the same waits",
           lambda _, r: r.shortfall_p50, "{:.0f} s"),
    Column("extra_runs_shortfall_p50", ("extra runs'", "shortfall p50"),
           "the same for runs started by hand, which no cron predicts", _extra_p50, "{:.0f} s"),
    Column("missing_replica_hours", ("missing", "replica-h"),
           "replica-hours needed but not ready while runs were open",
           lambda _, r: r.missing_replica_hours, "{:.1f}"),
    Column("flaps_by_extra_runs", ("flaps by", "extra runs"),
           "flaps whose scale-up was for a run started by hand",
           lambda _, r: r.forced_flaps, "{:.0f}"),
)  # fmt: skip
COLUMNS = (*README_COLUMNS, *MORE_COLUMNS)


def render(report: Report) -> str:
    """The summary line, both tables and the legend."""
    summary = (
        f"workload {report.workload}: {report.days:g} days, seed {report.seed}, "
        f"{report.fires} fires ({report.skipped} skipped), {report.runs} runs "
        f"({report.extra} extra)"
    )
    legend = ["legend:"] + [
        line for column in COLUMNS for line in _wrapped(f"{column.name}: {column.legend}")
    ]
    return "\n\n".join(
        [summary, _table(report, README_COLUMNS), _table(report, MORE_COLUMNS), "\n".join(legend)]
    )


def as_json(report: Report) -> str:
    """Every figure of every policy, by the columns' keys, with the run counts."""
    body: dict[str, Any] = {
        "workload": report.workload,
        "days": report.days,
        "seed": report.seed,
        "fires": report.fires,
        "skipped": report.skipped,
        "runs": report.runs,
        "extra": report.extra,
        "static_peak_hours": report.static_peak_hours,
        "oracle_hours": report.oracle_hours,
        "flap_free_oracle_hours": report.flap_free_oracle_hours,
        "policies": [
            {"policy": r.policy, **{c.key: c.value(report, r) for c in COLUMNS}}
            for r in report.results
        ],
    }
    return json.dumps(body, indent=2) + "\n"


def _table(report: Report, columns: tuple[Column, ...]) -> str:
    rows = [
        ["", *(c.head[0] for c in columns)],
        ["policy", *(c.head[1] for c in columns)],
        *(
            [r.policy, *(c.shown.format(c.value(report, r)) for c in columns)]
            for r in report.results
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _wrapped(text: str) -> list[str]:
    """`text` as lines of at most WIDTH characters, continuation lines indented."""
    lines, line = [], "  "
    for word in text.split():
        if len(line) + len(word) + 1 > WIDTH:
            lines.append(line.rstrip())
            line = "      "
        line += word + " "
    return [*lines, line.rstrip()]
