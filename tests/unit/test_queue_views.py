"""`tasklane top` shows the queue hops of the isolation report, one row per queue, chain and
consuming group, with the leaks marked."""

from __future__ import annotations

from controlplane.cli.views import render_top

ROW = {
    "queue": "ledger-entries",
    "service": "ledger",
    "hop_group": True,
    "rejected": 0,
    "last_at": 0.0,
}


def test_top_lists_queue_hops() -> None:
    isolation = {
        "chains": [],
        "uncovered": [],
        "propagation_breaks": [],
        "queues": [
            {
                **ROW,
                "chain": "",
                "group": "task",
                "messages": 1,
                "leaks": 1,
                "fallbacks": {},
                "bad_dyes": 0,
                "rate": 0.1,
            },
            {
                **ROW,
                "chain": "pricing",
                "group": "default",
                "messages": 40,
                "leaks": 0,
                "fallbacks": {"no_consumer": 40},
                "bad_dyes": 2,
                "rate": 4.0,
            },
        ],
        "totals": {"leaks": 1, "fallbacks": 40},
    }
    assert render_top(isolation).splitlines()[2:] == [
        "queue hops (messages consumed):",
        "QUEUE            CHAIN      SERVICE   GROUP     MSG/S   MESSAGES   LEAKS   FALLBACKS"
        "        BAD DYES",
        "ledger-entries   (online)   ledger    task      0.1     1          1 !     -"
        "                0",
        "ledger-entries   pricing    ledger    default   4.0     40         0       no_consumer:40"
        "   2",
        "",
        "totals: leaks 1, fallbacks 40",
    ]
