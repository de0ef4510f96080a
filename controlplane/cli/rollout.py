"""`tasklane rollout status|promote|abort`: the staged rollout an `apply --canary` started."""

from __future__ import annotations

import argparse
from typing import Any

from controlplane.cli.client import OUTPUTS, api_token, call, output, server_option, structured
from controlplane.cli.views import table
from controlplane.model.run import format_time


def add_rollout(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "rollout",
        parents=[common, server_option()],
        help="show, promote or abort the staged rollout of a rule change",
        description="`tasklane apply --canary PERCENT` serves a change to a share of each "
        "role's sidecars first. The control plane compares what those canaries' requests did "
        "(5xx, strict rejections, fallbacks, leaks) with the other sidecars of the same roles, "
        "aborts as soon as the canary is worse, and promotes once the window is over. "
        "`status` shows it; `promote` and `abort` end it by hand.",
    )
    p.add_argument("action", choices=("status", "promote", "abort"), metavar="ACTION",
                   help="status, promote or abort")  # fmt: skip
    p.add_argument(
        "-o", "--output", choices=OUTPUTS, default="table", help="output format (default: table)"
    )
    p.set_defaults(handler=rollout)


def rollout(args: argparse.Namespace) -> int:
    if args.action != "status":
        body = call(args.server, "POST", f"/api/v1/rollout/{args.action}", {}, api_token(args))
        which = f" of revision {body['revision']}" if body["revision"] is not None else ""
        output(f"rollout{which} {body['outcome']}\n")
        return 0
    body = call(args.server, "GET", "/api/v1/rollout")
    output(render_status(body) if args.output == "table" else structured(body, args.output))
    return 0


def render_status(body: dict[str, Any]) -> str:
    """The rollout in progress (cohorts side by side, canaries per role), or the last one."""
    current, last = body["current"], body["last"]
    lines = []
    if current is None:
        lines.append("No rollout in progress.")
    else:
        lines.append(
            f"rollout of revision {current['revision']}: {current['percent']}% of each role's "
            f"sidecars, started {format_time(current['startedAt'])} by {current['who']}, window "
            f"{current['window']}, at least {current['minRequests']} canary requests"
        )
        lines.append(f"verdict so far: {current['verdict']['action']}: "
                     f"{current['verdict']['reason']}")  # fmt: skip
        cohorts = current["cohorts"]
        lines.append(
            table(
                [
                    {"COHORT": name.upper(), **{k.upper(): str(v) for k, v in tally.items()}}
                    for name, tally in cohorts.items()
                ]
            )
        )
        roles = [
            {"ROLE": r["role"], "CANARIES": f"{len(r['canaries'])} of {r['sidecars']}",
             "NODES": ", ".join(r["canaries"]) or "-"}
            for r in current["roles"]
        ]  # fmt: skip
        if roles:
            lines.append(table(roles))
    if last is not None:
        lines.append(
            f"last rollout: revision {last['rollout']['revision']} {last['outcome']} "
            f"{format_time(last['at'])} by {last['by']}: {last['reason']}"
        )
    return "\n".join(lines) + "\n"
