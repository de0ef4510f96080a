"""`tasklane get scope`'s table, rendered from a fixed API answer."""

from __future__ import annotations

from controlplane.cli.scope import render_scope

NOW = 1_000_000.0


def test_render_scope() -> None:
    body = {
        "service": "fund-facade",
        "groups": {
            "default": [
                {"callee": "ledger-svc", "reason": "declared", "detail": "", "since": None,
                 "lastSeen": None},
                {"callee": "risk-svc", "reason": "learned", "detail": "", "since": NOW - 7260,
                 "lastSeen": NOW - 42},
            ],
            "task": [
                {"callee": "account-svc", "reason": "chain", "detail": "fund-yield",
                 "since": None, "lastSeen": None},
                {"callee": "quote-svc", "reason": "on-demand", "detail": "", "since": NOW - 5,
                 "lastSeen": NOW - 5},
            ],
            "batch": [],
        },
    }  # fmt: skip
    assert render_scope(body, NOW).splitlines() == [
        "ROLE                  CALLEE        REASON             SINCE       LAST SEEN",
        "fund-facade|default   ledger-svc    declared           -           -",
        "fund-facade|default   risk-svc      learned            2h01m ago   42s ago",
        "fund-facade|task      account-svc   chain fund-yield   -           -",
        "fund-facade|task      quote-svc     on-demand          5s ago      5s ago",
        "fund-facade|batch     -             -                  -           -",
    ]
