"""`tasklane apply --canary` and `tasklane rollout` as a user runs them against a real
`tasklane up`: a rollout stages the change without making it current, holds every other
change until it ends, is promoted (a revision of its own) or aborted (nothing changed) by
hand; settings out of range and steps that cannot be taken are one-line errors that change
nothing. (With no sidecar connected there is no canary traffic, so the judge never ends it:
tests/integration/test_rollout.py covers the judge on real Envoys.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.store.rules import load_rules
from tests.integration.test_cli_rules import GOOD, Cli, ok
from tests.support.up import Up, assert_one_line_error

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cli(running_up: Up, tmp_path: Path) -> Iterator[Cli]:
    runner = Cli(running_up, tmp_path)
    try:
        ok(runner("apply", "-f", str(GOOD)))
        (tmp_path / "loose.yaml").write_text(
            GOOD.read_text().replace("fallback: strict", "fallback: loose")
        )
        yield runner
    finally:
        runner.store.close()


def fallback(cli: Cli) -> str:
    rules, _ = load_rules(cli.store)
    return rules.chains["fund-yield"].fallback


def test_a_rollout_is_staged_holds_other_changes_and_is_promoted_by_hand(cli: Cli) -> None:
    out = ok(cli("apply", "-f", "loose.yaml", "--canary", "30%", "--canary-window", "5m"))
    assert out.endswith(
        "rollout of revision 2 started: 30% of each role's sidecars first, judged over 5m "
        "(tasklane rollout status)\n"
    ), out
    assert fallback(cli) == "strict"  # staged, not current

    status = ok(cli("rollout", "status"))
    assert status.startswith("rollout of revision 2: 30% of each role's sidecars"), status
    assert "verdict so far: wait: 0 of 20 canary requests seen" in status

    for args in (("apply", "-f", str(GOOD)), ("apply", "-f", "loose.yaml", "--canary", "10")):
        held = cli(*args)
        assert held.returncode != 0
        assert_one_line_error(held.stderr, "a rollout is in progress")
    held = cli("delete", "task", "weekday-batch-debit")
    assert_one_line_error(held.stderr, "a rollout is in progress")
    assert fallback(cli) == "strict"

    assert ok(cli("rollout", "promote")) == "rollout of revision 2 promoted\n"
    assert fallback(cli) == "loose"
    history = ok(cli("history")).splitlines()
    assert "apply --canary 30%" in history[1], history
    status = ok(cli("rollout", "status"))
    assert "No rollout in progress." in status
    assert "last rollout: revision 2 promoted" in status and "promoted by hand" in status
    gone = cli("rollout", "promote")
    assert_one_line_error(gone.stderr, "no rollout is in progress")


def test_an_aborted_rollout_changes_nothing(cli: Cli) -> None:
    before, _ = cli.snapshot()
    ok(cli("apply", "-f", "loose.yaml", "--canary", "50"))
    assert ok(cli("rollout", "abort")) == "rollout of revision 2 aborted\n"
    assert fallback(cli) == "strict"
    ok(cli("apply", "-f", str(GOOD)))  # no change, and applies are taken again
    after, _ = cli.snapshot()
    rules_keys = {k for k in after if k.startswith(("rules/", "meta/rules"))}
    assert rules_keys == {k for k in before if k.startswith(("rules/", "meta/rules"))}
    assert "last rollout: revision 2 aborted" in ok(cli("rollout", "status"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--canary", "0%"), "canary: '0%' is not a share of 1-99 %"),
        (("--canary", "100"), "canary: '100' is not a share of 1-99 %"),
        (("--canary", "ten"), "canary: 'ten' is not a share of 1-99 %"),
        (("--canary", "10%", "--canary-window", "soon"), "canary window:"),
    ],
)
def test_canary_settings_out_of_range_are_one_line_errors(
    cli: Cli, args: tuple[str, ...], message: str
) -> None:
    before, _ = cli.snapshot()
    result = cli("apply", "-f", "loose.yaml", *args)
    assert result.returncode != 0
    assert_one_line_error(result.stderr, message)
    assert cli.snapshot()[0] == before
