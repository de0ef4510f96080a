"""Terminal views of a running control plane: `tasklane status` and `tasklane top`.

Pure renderers of the API's JSON (GET /api/v1/status, GET /api/v1/isolation) into text, so
they are tested on fixed answers; cli.py fetches and prints. `table` is the CLI's one table
layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from controlplane.cli.client import OUTPUTS, ApiError, call, output, server_option, structured
from controlplane.errors import TasklaneError
from controlplane.model.group import GroupKey
from controlplane.model.run import format_time
from controlplane.translate.unknown import UNKNOWN_STATUS, missing_rule

# The xDS types of the status table, as /api/v1/status names them, in push order.
XDS_TYPES = ("cds", "eds", "lds", "rds")
# The totals `tasklane top` shows, of those the accounting keeps (the rest are the dashboard's).
TOTALS = (
    *("requests", "dyed", "online", "errors_5xx", "leaks", "fallbacks", "rate_limited"),
    *("uncovered", "propagation_breaks", "outside_mesh"),
)
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def table(rows: list[dict[str, str]]) -> str:
    """Left-aligned columns three spaces apart, like kubectl."""
    headers = list(rows[0])
    lines = [headers, *([row[header] for header in headers] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


# --- tasklane status -----------------------------------------------------------------------


def sync_state(entry: dict[str, Any] | None) -> str:
    """One xDS type of one sidecar: SYNCED (it ACKed what it was last sent), NACK (it rejected
    that version), STALE (sent, no answer yet), or - (nothing of the type sent)."""
    if not entry or not entry["sent_version"]:
        return "-"
    if entry["acked_version"] == entry["sent_version"]:
        return "SYNCED"
    nack = entry["last_nack"]
    if nack is not None and nack["version"] == entry["sent_version"]:
        return "NACK"
    return "STALE"


def render_status(status: dict[str, Any], now: float) -> str:
    """A header line (etcd, xDS, leader, last build), the sidecars table like `istioctl
    proxy-status`, and below it the message of each NACK the table shows."""
    lines = [_status_header(status, now)]
    if status["sync"].get("error"):
        lines.append(f"{status['sync']['error']} (sidecars keep the config built before)")
    nodes = status["nodes"]
    if not nodes:
        return "\n".join([*lines, "", "no sidecar is connected"])
    rows, nacks, unknown = [], [], []
    for node in nodes:
        service, group = GroupKey.parse(node["role"])
        if node.get("unknown_service"):
            service += " (UNKNOWN SERVICE)"
            unknown.append(
                f"{node['node_id']}: UNKNOWN SERVICE, {missing_rule(node['role'])}; its "
                f"listeners answer {UNKNOWN_STATUS} until it is applied"
            )
        row = {"NODE": node["node_id"], "SERVICE": service, "GROUP": group}
        row["PROTOCOL"] = node["protocol"]
        for kind in XDS_TYPES:
            entry = node["types"].get(kind)
            row[kind.upper()] = state = sync_state(entry)
            if state == "NACK":
                nack = entry["last_nack"]
                message = " ".join(nack["message"].split())
                nacks.append(
                    f"{node['node_id']} {kind.upper()} rejected version {nack['version']} "
                    f"{_ago(now - nack['at'])} ago: {message}"
                )
        rows.append(row)
    lines += ["", table(rows)]
    if unknown:
        lines += ["", *unknown]
    if nacks:
        lines += ["", *nacks]
    return "\n".join(lines)


def _status_header(status: dict[str, Any], now: float) -> str:
    etcd = status["etcd"]
    where = "embedded" if etcd["embedded"] else "external"
    leadership = status["leadership"]
    leader = leadership["leader_id"] or "none"
    if leadership["leader"]:
        leader += " (this control plane)"
    sync = status["sync"]
    if sync["last_build_at"] is None:
        build = "none yet"
    else:
        build = (
            f"{format_time(sync['last_build_at'])} ({_ago(now - sync['last_build_at'])} ago, "
            f"{sync['last_build_ms']:g} ms)"
        )
    xds = status["xds"]["address"] + (" (TLS)" if status["xds"].get("tls") else "")
    return f"etcd {etcd['endpoint']} ({where}), xDS {xds}, leader {leader}, last build {build}"


# --- tasklane top --------------------------------------------------------------------------


def render_top(isolation: dict[str, Any]) -> str:
    """Per chain, one row per hop and group: dyed and online request rates, requests, 5xx,
    latency, leaks, fallbacks by reason and rate-limited requests; then the uncovered hops,
    the propagation breaks, the queue hops and the totals (queue leaks and fallbacks in them)."""
    blocks = [_chain_block(chain) for chain in isolation["chains"]] or ["no chain is defined"]
    uncovered = [
        f"  {u['chain']}: {u['service']}/{u['group']}, {u['requests']} requests ({u['rate']:.1f}/s)"
        for u in isolation["uncovered"]
    ]
    if uncovered:
        title = "uncovered (a chain's dyed requests reached a service that is not its hop):"
        blocks.append("\n".join([title, *uncovered]))
    breaks = [
        f"  {b['chain']}: {b['service']}/{b['group']} called {b['to']} without the dye "
        f"{b['count']} times (last request id {b['last_request_id']})"
        for b in isolation["propagation_breaks"]
    ]
    if breaks:
        blocks.append("\n".join(["propagation breaks:", *breaks]))
    if isolation.get("queues"):
        rows = [_queue_row(row) for row in isolation["queues"]]
        blocks.append("\n".join(["queue hops (messages consumed):", table(rows)]))
    totals = isolation["totals"]
    counts = [f"{name.replace('_', ' ')} {totals[name]}" for name in TOTALS if name in totals]
    blocks.append("totals: " + ", ".join(counts))
    return "\n\n".join(blocks)


def _queue_row(row: dict[str, Any]) -> dict[str, str]:
    fallbacks = ",".join(f"{reason}:{n}" for reason, n in sorted(row["fallbacks"].items()) if n)
    return {
        "QUEUE": row["queue"],
        "CHAIN": row["chain"] or "(online)",
        "SERVICE": row["service"],
        "GROUP": row["group"],
        "MSG/S": f"{row['rate']:.1f}",
        "MESSAGES": str(row["messages"]),
        "LEAKS": str(row["leaks"]) + (" !" if row["leaks"] else ""),
        "FALLBACKS": fallbacks or "-",
        "BAD DYES": str(row["bad_dyes"]),
    }


def _chain_block(chain: dict[str, Any]) -> str:
    head = f"chain {chain['name']}: dyes {', '.join(chain['dyes'])}; fallback {chain['fallback']}"
    rows = []
    for number, hop in enumerate(chain["hops"], 1):
        label = f"{number} {hop['service']}"
        for group in hop["groups"]:
            rows.append(_group_row(label, group))
            label = ""  # the hop is named on its first row only
    return "\n".join([head, table(rows)])


def _group_row(hop: str, group: dict[str, Any]) -> dict[str, str]:
    fallbacks = ",".join(f"{reason}:{n}" for reason, n in sorted(group["fallbacks"].items()) if n)
    return {
        "HOP": hop,
        "GROUP": group["group"],
        "DYED/S": f"{group['rate_dyed']:.1f}",
        "ONLINE/S": f"{group['rate_online']:.1f}",
        "REQUESTS": str(group["requests"]),
        "5XX": str(group["errors_5xx"]),
        "P50 MS": _ms(group["p50_ms"]),
        "P99 MS": _ms(group["p99_ms"]),
        "LEAKS": str(group["leaks"]) + (" !" if group["leaks"] else ""),
        "FALLBACKS": fallbacks or "-",
        "RATE-LIMITED": str(group["rate_limited"]),
    }


def watch(frame: Callable[[], str], interval: float) -> int:
    """Print frame() every `interval` s until Ctrl-C, then exit 0. On a terminal each frame
    replaces the last; piped, frames follow each other (a closed pipe ends it too)."""
    terminal = sys.stdout.isatty()
    try:
        while True:
            text = frame()
            sys.stdout.write(f"{CLEAR_SCREEN}{text}\n" if terminal else f"{text}\n\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if terminal:
            sys.stdout.write("\n")
        return 0
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ago(seconds: float) -> str:
    """'42s', '3m05s', '2h07m'."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --- the commands ---------------------------------------------------------------------------

TOP_INTERVAL = 2.0


def add_status(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane status`: the sidecars and their xDS sync, like `istioctl proxy-status`."""
    p = commands.add_parser(
        "status",
        parents=[common, server_option()],
        help="show the connected sidecars and whether each runs the config it was sent",
        description="A line on etcd, xDS, the leader and the last config build, then one row "
        "per connected sidecar (node, service, group, xDS protocol) with each xDS type's state: "
        "SYNCED (ACKed what it was sent), STALE (sent, not ACKed yet) or NACK (rejected; the "
        "message is shown below the table).",
    )
    add_output(p)
    p.set_defaults(handler=status)


def add_output(parser: argparse.ArgumentParser) -> None:
    """-o table|yaml|json: the view, or the API's answer behind it."""
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default="table",
        help="output format (default: table; yaml and json print the API's answer)",
    )


def status(args: argparse.Namespace) -> int:
    body = call(args.server, "GET", "/api/v1/status")
    if args.output != "table":
        output(structured(body, args.output))
    else:
        output(render_status(body, datetime.now(UTC).timestamp()) + "\n")
    return 0


def add_top(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane top [--watch]`: isolation per chain, hop and group."""
    p = commands.add_parser(
        "top",
        parents=[common, server_option()],
        help="show per chain and hop: request rates, leaks, fallbacks, rate-limited requests",
        description="Isolation accounting from the sidecars' access logs, per chain, hop and "
        "group: dyed and online request rates, requests, 5xx, p50/p99 latency, leaks, "
        "fallbacks by reason and rate-limited requests; then uncovered hops and propagation "
        "breaks.",
    )
    p.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help=f"refresh every {TOP_INTERVAL:g} s until Ctrl-C",
    )
    add_output(p)
    p.set_defaults(handler=top)


def top(args: argparse.Namespace) -> int:
    def frame() -> str:
        try:
            isolation = call(args.server, "GET", "/api/v1/isolation")
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise TasklaneError(
                f"{args.server} has no isolation accounting (GET /api/v1/isolation: 404): "
                "is it an older control plane?"
            ) from None
        if args.output != "table":
            return structured(isolation, args.output).rstrip("\n")
        return render_top(isolation)

    def timed_frame() -> str:
        now = format_time(datetime.now(UTC).timestamp())
        return f"tasklane top at {now}, every {TOP_INTERVAL:g}s (Ctrl-C to stop)\n\n{frame()}"

    if not args.watch:
        output(frame() + "\n")
        return 0
    return watch(timed_frame if args.output == "table" else frame, TOP_INTERVAL)
