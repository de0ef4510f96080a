"""`tasklane history` and `tasklane rollback` as a user runs them against a real `tasklane up`:
every apply and delete is a revision (when, who, what), a revision's diff, a rollback that is
itself a revision, a history that survives etcd's compaction and keeps --history-limit
revisions, and rollbacks that cannot be done refused in one line with nothing changed."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.store.rules import CHUNKS, GENERATIONS, HISTORY
from tests.integration.test_cli_rules import GOOD, Cli, ok
from tests.support.stored import stored_documents
from tests.support.up import TASKLANE, Up, assert_one_line_error

pytestmark = pytest.mark.timeout(120)

GOOD_LABELS = {
    "Service/fund-facade",
    "Service/account-svc",
    "Service/nav-pricing",
    "TaskChain/fund-yield",
    "TaskChain/batch-debit",
    "ScheduledTask/nightly-fund-yield",
    "ScheduledTask/weekday-batch-debit",
}


@pytest.fixture
def cli(running_up: Up, tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(running_up, tmp_path)
    try:
        yield runner
    finally:
        runner.store.close()


@pytest.mark.parametrize("running_up", [("--history-limit", "4")], indirect=True)
def test_history_lists_shows_and_rolls_back_revisions(cli: Cli) -> None:
    ok(cli("apply", "-f", str(GOOD)))
    revision_1 = stored_documents(cli.store)
    changed = cli.cwd / "changed.yaml"
    changed.write_text(GOOD.read_text().replace("fallback: strict", "fallback: loose"))
    ok(cli("apply", "-f", "changed.yaml"))
    ok(cli("delete", "task", "weekday-batch-debit"))

    lines = ok(cli("history")).splitlines()
    assert re.split(r"\s{3,}", lines[0]) == ["REVISION", "AT", "WHO", "ACTION", "CHANGES"]
    rows = [re.split(r"\s{3,}", line) for line in lines[1:]]
    assert [(row[0], row[3]) for row in rows] == [("3", "delete"), ("2", "apply"), ("1", "apply")]
    assert all(re.fullmatch(r"\S+@\S+ \(127\.0\.0\.1\)", row[2]) for row in rows), rows
    assert rows[0][4] == "-scheduledtask/weekday-batch-debit"
    assert rows[1][4] == "~taskchain/fund-yield"
    assert (
        rows[2][4] == "+service/account-svc, +service/fund-facade, +service/nav-pricing and 4 more"
    )

    assert [
        row.split()[0] for row in ok(cli("history", "chain", "fund-yield")).splitlines()[1:]
    ] == [
        "2",
        "1",
    ]
    assert [row.split()[0] for row in ok(cli("history", "svc")).splitlines()[1:]] == ["1"]
    shown = ok(cli("history", "--revision", "2"))
    assert re.match(r"# revision 2: apply by \S+@\S+ \(127\.0\.0\.1\) at [-0-9T:]+Z ", shown)
    assert "(0 created, 1 configured, 0 deleted)\n" in shown
    assert "--- r1/TaskChain/fund-yield\n+++ r2/TaskChain/fund-yield\n" in shown
    assert "-  fallback: strict\n+  fallback: loose\n" in shown
    assert "--- r2/ScheduledTask/weekday-batch-debit\n+++ /dev/null\n" in ok(
        cli("history", "--revision", "3")
    )
    listed = json.loads(ok(cli("history", "-o", "json")))
    assert listed["current"] == 3
    assert listed["items"][0]["deleted"] == ["ScheduledTask/weekday-batch-debit"]

    # etcd compacts its old revisions; the history is made of current keys and stays.
    _, etcd_revision = cli.store.get_prefix("")
    cli.store._client.compact(etcd_revision)
    assert ok(cli("history")).splitlines() == lines

    assert ok(cli("rollback", "1")) == (
        "taskchain/fund-yield configured\n"
        "scheduledtask/weekday-batch-debit created\n"
        "rolled back to revision 1 as revision 4\n"
    )
    assert stored_documents(cli.store) == revision_1
    assert re.split(r"\s{3,}", ok(cli("history")).splitlines()[1])[3] == "rollback to 1"

    # --history-limit 4: a fifth revision drops the first, which can no longer be restored.
    ok(cli("delete", "task", "weekday-batch-debit"))
    assert [row.split()[0] for row in ok(cli("history")).splitlines()[1:]] == ["5", "4", "3", "2"]
    before = cli.snapshot()
    result = cli("rollback", "1")
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr, "revision 1 is not in the history (revisions 2-5 are kept)"
    )
    assert cli.snapshot() == before


def test_a_revision_that_no_longer_validates_is_refused_whole(cli: Cli) -> None:
    """Revision 1 as an older or foreign writer stored it: a chain whose service it does not
    hold. Rolling back to it fails with the validator's message and changes nothing."""
    ok(cli("apply", "-f", str(GOOD)))
    ok(cli("delete", "task", "weekday-batch-debit"))
    chunk = json.dumps(
        [
            {
                "apiVersion": "tasklane.io/v1",
                "kind": "TaskChain",
                "metadata": {"name": "ledger"},
                "spec": {
                    "dye": {"values": ["ledger"]},
                    "hops": [{"service": "ledger-svc", "group": "task"}],
                },
            }
        ]
    ).encode()
    name = hashlib.sha256(chunk).hexdigest()
    record = {"chunks": [name], "at": 0, "who": "old", "action": "apply"}
    record.update(created=["TaskChain/ledger"], configured=[], deleted=[])
    cli.store.put(CHUNKS + name, chunk)
    cli.store.put(GENERATIONS + "older", json.dumps(record))
    cli.store.put(f"{HISTORY}{1:010d}", "older")
    before = cli.snapshot()

    result = cli("rollback", "1")
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr,
        "revision 1: document 1 (TaskChain ledger): spec.hops[0].service: "
        "unknown service 'ledger-svc'",
    )
    assert cli.snapshot() == before
    assert set(stored_documents(cli.store)) == GOOD_LABELS - {"ScheduledTask/weekday-batch-debit"}


def test_a_history_limit_below_one_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TASKLANE, "up", "--state-dir", str(tmp_path), "--history-limit", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--history-limit must be at least 1, got 0")
