"""`tasklane apply/diff/get/delete` as a user runs them, against a real `tasklane up` and its
etcd: kubectl-like output, exit codes, one-line errors, and etcd untouched by every refusal
(the malformed-rules corpus in tests/rules/bad, applied over tests/rules/good)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.runtime.ports import free_port
from controlplane.store.etcd import Store
from tests.support.stored import stored_documents
from tests.support.up import (
    TASKLANE,
    Up,
    assert_one_line_error,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)

RULES = REPO / "tests" / "rules"
GOOD_DIR = RULES / "good"
GOOD = GOOD_DIR / "fund-yield.yaml"
CORPUS = sorted((RULES / "bad").glob("*.yaml"))
CLI_TIMEOUT = 30.0
GOOD_LINES = [
    "service/fund-facade",
    "service/account-svc",
    "service/nav-pricing",
    "taskchain/fund-yield",
    "taskchain/batch-debit",
    "scheduledtask/nightly-fund-yield",
    "scheduledtask/weekday-batch-debit",
]


class Cli:
    """Runs the installed `tasklane` against one control plane, with a proxy set that would
    swallow every request if the CLI used it."""

    def __init__(self, up: Up, cwd: Path) -> None:
        self.env = {
            **os.environ,
            "TASKLANE_SERVER": f"http://127.0.0.1:{up.ports['http']}",
            "TASKLANE_TOKEN": up.token,
            "http_proxy": f"http://127.0.0.1:{free_port()}",
            "HTTP_PROXY": f"http://127.0.0.1:{free_port()}",
        }
        self.cwd = cwd
        self.store = Store.connect(f"127.0.0.1:{up.ports['etcd_client']}")

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TASKLANE, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.cwd,
            timeout=CLI_TIMEOUT,
        )

    def snapshot(self) -> tuple[dict[str, bytes], int]:
        """Everything tasklane keeps in etcd but the leader-election keys (live state of the
        running control planes), and etcd's revision."""
        items, revision = self.store.get_prefix("")
        return {k: v for k, v in items.items() if not k.startswith("leader/")}, revision


@pytest.fixture
def cli(running_up: Up, tmp_path: Path) -> Iterator[Cli]:  # noqa: F811
    runner = Cli(running_up, tmp_path)
    try:
        yield runner
    finally:
        runner.store.close()


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert result.returncode == code, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_apply_prints_one_line_per_document_and_writes_only_changes(cli: Cli) -> None:
    assert ok(cli("apply", "-f", str(GOOD))) == "".join(f"{n} created\n" for n in GOOD_LINES)
    items, revision = cli.snapshot()
    stored = stored_documents(cli.store)
    assert set(stored) == {"/".join(_kind_name(line)) for line in GOOD_LINES}

    assert ok(cli("apply", "-f", str(GOOD))) == "".join(f"{n} unchanged\n" for n in GOOD_LINES)
    assert cli.snapshot() == (items, revision)

    changed = cli.cwd / "changed.yaml"
    changed.write_text(GOOD.read_text().replace("fallback: strict", "fallback: loose"))
    out = ok(cli("apply", "-f", "changed.yaml"))
    assert "taskchain/fund-yield configured\n" in out
    assert out.count("unchanged\n") == len(GOOD_LINES) - 1
    after = stored_documents(cli.store)
    assert {label for label in after if after[label] != stored[label]} == {"TaskChain/fund-yield"}


def test_dry_run_and_diff_show_changes_and_write_nothing(cli: Cli) -> None:
    ok(cli("apply", "-f", str(GOOD_DIR)))
    before = cli.snapshot()
    changed = cli.cwd / "changed.yaml"
    changed.write_text(GOOD.read_text().replace("maxReplicas: 8", "maxReplicas: 10"))

    out = ok(cli("apply", "-f", "changed.yaml", "--dry-run"))
    assert out.startswith("service/fund-facade configured (dry run)\n")
    assert "service/account-svc unchanged (dry run)\n" in out
    assert (
        "--- live/Service/fund-facade\n+++ new/Service/fund-facade\n" in out
        and "-    maxReplicas: 8\n+    maxReplicas: 10\n" in out
    )
    assert cli.snapshot() == before

    diff = ok(cli("diff", "-f", "changed.yaml"), code=1)
    assert diff.startswith("--- live/Service/fund-facade\n")
    assert ok(cli("diff", "-f", str(GOOD))) == ""
    assert cli.snapshot() == before


def test_every_malformed_file_is_refused_naming_file_document_field(cli: Cli) -> None:
    assert len(CORPUS) >= 30
    ok(cli("apply", "-f", str(GOOD_DIR)))
    before = cli.snapshot()
    for path in CORPUS:
        expected, document = _expectation(path)
        result = cli("apply", "-f", str(path))
        assert result.returncode == 2, (path.name, result.stdout)
        assert result.stdout == ""
        assert_one_line_error(result.stderr, "")
        message = result.stderr.removeprefix("tasklane: error: ").rstrip("\n")
        assert f"{path}: document {document}" in message, path.name
        assert expected in message, path.name
        assert cli.snapshot() == before, f"{path.name} changed etcd"


def test_bad_file_among_good_ones_writes_nothing(cli: Cli) -> None:
    ok(cli("apply", "-f", str(GOOD_DIR)))
    before = cli.snapshot()
    rules = cli.cwd / "rules"
    rules.mkdir()
    (rules / "a-ledger.yaml").write_text(
        "apiVersion: tasklane.io/v1\nkind: Service\nmetadata: {name: ledger-svc}\n"
        "spec: {groups: [{name: task}]}\n"
    )
    (rules / "b-chain.yaml").write_text(
        "apiVersion: tasklane.io/v1\nkind: TaskChain\nmetadata: {name: ledger}\n"
        "spec:\n  dye: {values: [ledger]}\n  hops:\n    - {service: ledger-svc, group: batch}\n"
    )
    (rules / "notes.txt").write_text("not a rule file")
    result = cli("apply", "-f", "rules")
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr,
        "rules/b-chain.yaml: document 1 (TaskChain ledger): spec.hops[0].group: "
        "service ledger-svc has no group 'batch'",
    )
    assert cli.snapshot() == before

    result = cli("apply", "-f", "missing.yaml")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "missing.yaml: no such file or directory")
    (cli.cwd / "empty").mkdir()
    result = cli("apply", "-f", "empty")
    assert_one_line_error(result.stderr, "empty: no *.yaml or *.yml files in this directory")
    assert cli.snapshot() == before


SEVERAL_PROBLEMS = """\
apiVersion: tasklane.io/v1
kind: Taskchain
metadata: {name: ledger-chain}
spec: {dye: {values: [ledger]}, hops: [{service: account-svc, group: task}]}
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: ledger}
spec:
  dye: {values: [ledger]}
  hops:
    - {service: acount-svc, group: task}
    - {service: account-svc, group: batch}
"""


def test_every_problem_at_once_and_validate_offline_says_the_same(cli: Cli) -> None:
    """`tasklane validate` needs no control plane (the server is told to be nowhere) and
    prints exactly what an apply of the same files prints: every problem, one line each."""
    (cli.cwd / "several.yaml").write_text(SEVERAL_PROBLEMS)
    offline = {**cli.env, "TASKLANE_SERVER": f"http://127.0.0.1:{free_port()}"}
    offline.pop("TASKLANE_TOKEN")
    before = cli.snapshot()
    for path in [Path("several.yaml"), *CORPUS[::8]]:
        applied = cli("apply", "-f", str(GOOD_DIR), "-f", str(path))
        checked = subprocess.run(
            [*TASKLANE, "validate", "-f", str(GOOD_DIR), "-f", str(path)],
            capture_output=True, text=True, env=offline, cwd=cli.cwd, timeout=CLI_TIMEOUT,
        )  # fmt: skip
        assert applied.returncode == checked.returncode == 2, path.name
        assert checked.stderr == applied.stderr and checked.stdout == "", path.name
        if path.name == "several.yaml":
            lines = applied.stderr.splitlines()
    assert cli.snapshot() == before
    assert lines == [
        "tasklane: error: several.yaml: document 1 (unknown kind, name ledger-chain): kind: "
        "unknown kind 'Taskchain' (did you mean TaskChain?)",
        "tasklane: error: several.yaml: document 2 (TaskChain ledger): spec.hops[0].service: "
        "unknown service 'acount-svc' (did you mean account-svc?)",
        "tasklane: error: several.yaml: document 2 (TaskChain ledger): spec.hops[1].group: "
        "service account-svc has no group 'batch' (it has: default, task, debit)",
    ]
    good = subprocess.run(
        [*TASKLANE, "validate", "-f", str(GOOD_DIR)],
        capture_output=True, text=True, env=offline, cwd=cli.cwd, timeout=CLI_TIMEOUT,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert good.stdout == "valid: 3 Service, 2 TaskChain, 2 ScheduledTask (1 file)\n"


def test_delete_refuses_a_referenced_rule_and_removes_a_free_one(cli: Cli) -> None:
    ok(cli("apply", "-f", str(GOOD)))
    before = cli.snapshot()
    result = cli("delete", "svc", "account-svc")
    assert result.returncode == 2
    assert_one_line_error(
        result.stderr,
        "cannot delete Service account-svc: still referred to by TaskChain batch-debit "
        "(spec.hops[0].service), TaskChain fund-yield (spec.hops[1].service)",
    )
    assert cli.snapshot() == before

    assert ok(cli("delete", "task", "weekday-batch-debit")) == (
        "scheduledtask/weekday-batch-debit deleted\n"
    )
    assert ok(cli("delete", "TaskChain", "batch-debit")) == "taskchain/batch-debit deleted\n"
    stored = stored_documents(cli.store)
    assert "TaskChain/batch-debit" not in stored
    assert "ScheduledTask/weekday-batch-debit" not in stored
    assert "TaskChain/fund-yield" in stored

    result = cli("delete", "chain", "batch-debit")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "TaskChain 'batch-debit' not found")


def test_get_table_and_yaml_round_trip(cli: Cli) -> None:
    ok(cli("apply", "-f", str(GOOD)))
    assert ok(cli("get", "svc")) == (
        "NAME          PROTOCOL   GROUPS\n"
        "account-svc   http       default:2-4,task:0-6,debit:0-4\n"
        "fund-facade   http       default:2-4,task:0-8\n"
        "nav-pricing   http       default:1-2,task:0-4\n"
    )
    assert ok(cli("get", "chains")) == (
        "NAME          DYES                        FALLBACK   HOPS\n"
        "batch-debit   batch-debit,batch-debit@*   loose      "
        "account-svc/debit(80%),nav-pricing/default\n"
        "fund-yield    fund-yield,fund-yield@*     strict     "
        "fund-facade/task,account-svc/task,nav-pricing/task\n"
    )
    assert ok(cli("get", "scheduledtask", "nightly-fund-yield")) == (
        "NAME                 CHAIN        SCHEDULE    TIMEZONE        DURATION\n"
        "nightly-fund-yield   fund-yield   0 2 * * *   Asia/Shanghai   7h\n"
    )
    chain = json.loads(ok(cli("get", "chain", "fund-yield", "-o", "json")))
    assert chain["spec"]["hops"][1]["rateLimit"] == {"requestsPerSecond": 100, "burst": 100}

    before = cli.snapshot()
    everything = "".join(ok(cli("get", kind, "-o", "yaml")) for kind in ("svc", "chain", "task"))
    assert len(list(yaml.safe_load_all(everything))) == len(GOOD_LINES)
    out = ok(cli("apply", "-f", "-", stdin=everything))
    assert out.count(" unchanged\n") == len(GOOD_LINES)
    assert cli.snapshot() == before

    # An empty kind: nothing on stdout, a note on stderr, success.
    ok(cli("delete", "task", "nightly-fund-yield"))
    ok(cli("delete", "task", "weekday-batch-debit"))
    result = cli("get", "tasks")
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == "No ScheduledTask rules found.\n"
    result = cli("get", "pods")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "unknown kind 'pods'")


# A comment line of 1 KiB: it pads a rule file to the size of a real mesh's rules (10,000
# Services are 3 MB of request) with few documents.
PADDING = "# " + "x" * 1021 + "\n"


def services(count: int) -> str:
    """`count` Services of two groups each, as compactly as a user would write them."""
    return "".join(
        f"apiVersion: tasklane.io/v1\nkind: Service\nmetadata: {{name: svc-{n:05d}}}\n"
        "spec: {groups: [{name: default, minReplicas: 1, maxReplicas: 4},"
        " {name: task, minReplicas: 0, maxReplicas: 4}]}\n---\n"
        for n in range(count)
    )


def test_an_apply_of_several_mib_is_taken(cli: Cli, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(PADDING * 3 * 1024 + services(100))  # aiohttp's default takes 1 MiB
    lines = "".join(f"service/svc-{n:05d} created\n" for n in range(100))
    assert ok(cli("apply", "-f", str(rules))) == lines
    assert {f"Service/svc-{n:05d}" for n in range(100)} <= set(stored_documents(cli.store))


def test_an_apply_over_the_size_limit_names_the_files_and_writes_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(services(1) + PADDING * 17 * 1024)  # 17 MiB
    before = cli.snapshot()
    result = cli("apply", "-f", str(big), "-f", str(GOOD))
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_line_error(
        result.stderr,
        f"{big} (17.0 MiB), {GOOD} (2 KiB): too large for one apply (17,8",
    )
    assert "bytes): the control plane takes up to 16,777,216 bytes (16.0 MiB)" in result.stderr
    assert cli.snapshot() == before


def test_unreachable_control_plane_is_one_line(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "TASKLANE_SERVER": closed, "TASKLANE_TOKEN": "t"}
    for args in (["get", "svc"], ["delete", "svc", "x"], ["diff", "-f", str(GOOD)]):
        result = subprocess.run(
            [*TASKLANE, *args], capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT
        )
        assert result.returncode == 2, args
        assert result.stdout == ""
        assert_one_line_error(
            result.stderr,
            f"cannot reach the control plane at {closed}: Connection refused "
            "(is `tasklane up` running?)",
        )
    other = f"127.0.0.1:{free_port()}"  # --server wins over the environment; scheme optional
    result = subprocess.run(
        [*TASKLANE, "get", "svc", "--server", other],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT,
    )
    assert_one_line_error(result.stderr, f"cannot reach the control plane at http://{other}: ")


def _kind_name(line: str) -> tuple[str, str]:
    kinds = {"service": "Service", "taskchain": "TaskChain", "scheduledtask": "ScheduledTask"}
    kind, name = line.split("/")
    return kinds[kind], name


def _expectation(path: Path) -> tuple[str, int]:
    """The corpus convention: '# expect: <part of the message>', '# document: N'."""
    first, second = path.read_text(encoding="utf-8").splitlines()[:2]
    match_expect = re.fullmatch(r"# expect: (.+)", first)
    match_document = re.fullmatch(r"# document: (\d+)", second)
    assert match_expect and match_document, path
    return match_expect.group(1), int(match_document.group(1))
