"""`tasklane simulate`'s output: within 100 columns, the README's column names, a legend for
every column, and `-o json` with every figure; from a real (small) simulation, and once
through the installed command."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from controlplane.cli.simulation import COLUMNS, README_COLUMNS, as_json, render
from controlplane.scaler.simulate import Report, simulate
from tests.support.up import TASKLANE
from tests.unit.test_simulate import document, parse

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def report() -> Report:
    return simulate(parse(document()), days=1)


def test_the_tables_fit_100_columns_and_every_column_has_a_legend(report: Report) -> None:
    text = render(report)
    assert max(len(line) for line in text.splitlines()) <= 100, text
    legend = text.split("\nlegend:\n", 1)[1].splitlines()
    named = [line.strip().split(": ", 1)[0] for line in legend if not line.startswith("      ")]
    assert named == [column.name for column in COLUMNS]
    for result in report.results:
        assert sum(line.startswith(result.policy + " ") for line in text.splitlines()) == 2


def test_the_columns_are_the_readmes(report: Report) -> None:
    (header,) = [line for line in README.read_text().splitlines() if line.startswith("| policy ")]
    names = [cell.strip() for cell in header.strip("|").split("|")]
    assert names == ["policy", *(column.name for column in README_COLUMNS)]


def test_json_has_every_figure_of_every_policy(report: Report) -> None:
    body = json.loads(as_json(report))
    assert [p["policy"] for p in body["policies"]] == [r.policy for r in report.results]
    for shown, result in zip(body["policies"], report.results, strict=True):
        assert shown["replica_hours"] == result.replica_hours
        assert shown["flaps"] == result.flaps
        assert set(shown) == {"policy", *(column.key for column in COLUMNS)}
    assert body["oracle_hours"] == report.oracle_hours
    assert body["flap_free_oracle_hours"] == report.flap_free_oracle_hours


def test_the_command_prints_json_or_the_tables(tmp_path: Path, report: Report) -> None:
    workload = tmp_path / "small.yaml"
    workload.write_text(yaml.safe_dump(document(), sort_keys=False))
    args = [*TASKLANE, "simulate", "--workload", str(workload), "--days", "1"]
    done = subprocess.run([*args, "-o", "json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(as_json(report))
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.stdout == render(report) + "\n"
