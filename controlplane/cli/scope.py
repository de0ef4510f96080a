"""`tasklane get scope SERVICE`: the services each of its groups' sidecars hold the config of,
and why (GET /api/v1/scope/{service}, model/scope.py)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from controlplane.cli.client import call, output, quote_segment, structured
from controlplane.cli.views import _ago, table
from controlplane.errors import TasklaneError
from controlplane.model.group import GroupKey


def render_scope(body: dict[str, Any], now: float) -> str:
    """One row per (role, callee): why it is in the scope (`chain NAME` for a chain), since
    when and when last called, relative to `now`; a role with an empty scope gets a row of
    dashes, so every group of the service shows."""
    rows = []
    for group, entries in body["groups"].items():
        role = str(GroupKey(body["service"], group))
        for entry in entries or [None]:
            if entry is None:
                rows.append(dict.fromkeys(("CALLEE", "REASON", "SINCE", "LAST SEEN"), "-"))
            else:
                reason = " ".join(filter(None, (entry["reason"], entry["detail"])))
                rows.append(
                    {
                        "CALLEE": entry["callee"],
                        "REASON": reason,
                        "SINCE": _when(entry["since"], now),
                        "LAST SEEN": _when(entry["lastSeen"], now),
                    }
                )
            rows[-1] = {"ROLE": role, **rows[-1]}
    if not rows:
        return f"{body['service']} has no group"
    return table(rows)


def _when(at: float | None, now: float) -> str:
    return "-" if at is None else f"{_ago(now - at)} ago"


def get_scope(args: argparse.Namespace) -> int:
    if args.name is None:
        raise TasklaneError("tasklane get scope needs a SERVICE name")
    body = call(args.server, "GET", f"/api/v1/scope/{quote_segment(args.name)}")
    if args.output in ("json", "yaml"):
        output(structured(body, args.output))
    else:
        output(render_scope(body, datetime.now(UTC).timestamp()) + "\n")
    return 0
