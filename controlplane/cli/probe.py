"""`tasklane probe CHAIN`: does the dye really travel the chain? (api/probe.py)"""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from controlplane.cli.client import OUTPUTS, api_token, call, output, server_option, structured
from controlplane.cli.views import table
from controlplane.telemetry.probe import NOT_FOLLOWED

EXIT_PROBLEM = 1  # the probe found a hop that lost the dye, was not reached or misrouted


def add_probe(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "probe",
        parents=[common, server_option()],
        help="send a dyed request into a chain and show where the dye went",
        description="The control plane sends one request with the chain's dye and a fresh "
        "x-request-id to a registered instance of the chain's first hop (at its sidecar's "
        "inbound listener), then reads the sidecars' access logs: for each hop, which group "
        "served it and whether the dye arrived. Exit 0 when every hop was served dyed by its "
        "group (or by a fallback the rules allow), 1 naming the first hop that was not.",
    )
    p.add_argument("chain", metavar="CHAIN", help="the TaskChain to probe")
    p.add_argument("--path", default="/", help="the request's path (default: /)")
    p.add_argument(
        "-o", "--output", choices=OUTPUTS, default="table", help="output format (default: table)"
    )
    p.set_defaults(handler=probe)


def probe(args: argparse.Namespace) -> int:
    path = f"/api/v1/probe/{quote(args.chain, safe='')}"
    report = call(args.server, "POST", path, {"path": args.path}, api_token(args))
    output(render(report) if args.output == "table" else structured(report, args.output))
    return 0 if report["ok"] else EXIT_PROBLEM


def render(report: dict[str, Any]) -> str:
    """The hops as a table, then one line: the verdict, and the notes of the hops that had one."""
    sent = report["sentTo"]
    where = f"{sent['instance']} at {sent['address']}" if sent else "nowhere"
    lines = [
        f"probe of {report['chain']}: {report['header']}: {report['dye']}, x-request-id "
        f"{report['requestId']}, sent to {where}, answered {report['answer']}",
        table(
            [
                {
                    "HOP": str(hop["hop"]),
                    "SERVICE": hop["service"],
                    "EXPECTED": hop["expected"],
                    "SERVED BY": hop["servedBy"] or "-",
                    "DYED": {True: "yes", False: "no", None: "-"}[hop["dyed"]],
                    "VERDICT": hop["verdict"],
                }
                for hop in report["hops"]
            ]
        ),
    ]
    lines += [f"hop {hop['hop']}: {hop['detail']}" for hop in report["hops"] if "detail" in hop]
    behind = any(hop["verdict"] == NOT_FOLLOWED for hop in report["hops"])
    passed = "ok: the dye reached every hop" + (" before the queue" if behind else "")
    lines.append(passed if report["ok"] else report["problem"])
    return "\n".join(lines) + "\n"
