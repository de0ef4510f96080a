"""`tasklane get KIND [NAME]`: stored rules, registered instances, a service's scaling profile
or scope, or everything at once, in kubectl's output forms (table, wide, name, yaml, json)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

import yaml

from controlplane.cli.client import (
    OUTPUTS,
    call,
    output,
    quote_segment,
    server_option,
    structured,
)
from controlplane.cli.scope import get_scope
from controlplane.cli.views import _ago, table
from controlplane.errors import TasklaneError
from controlplane.model.rules import KIND_ALIASES, KINDS
from controlplane.model.run import format_time
from controlplane.model.text import did_you_mean, quote

# kubectl's forms: `wide` adds columns to the table, `name` prints kind/name only.
GET_OUTPUTS = (*OUTPUTS, "wide", "name")
# Kinds that are views of the running control plane rather than rules: (word, aliases, what).
VIEWS = (
    ("instances", ("instance", "inst"), "the registered instances of every service"),
    ("profile", ("profiles",), "SERVICE's scaling profile (next 24 h) and the scaler's decisions"),
    ("scope", (), "the services SERVICE's sidecars hold the config of, and why"),
    ("all", (), "every rule: services, task chains and scheduled tasks"),
)
_VIEW_OF = {alias: word for word, aliases, _ in VIEWS for alias in (word, *aliases)}


def kinds_help() -> str:
    """Every KIND `get` takes, with its aliases: the list `tasklane get --help` ends with."""
    rows = []
    for kind in KINDS:
        aliases = [alias for alias, of in KIND_ALIASES.items() if of == kind]
        rows.append((aliases[0], aliases[1:], f"{kind} rules"))
    rows += [(word, list(aliases), what) for word, aliases, what in VIEWS]
    width = max(len(word) + len(", ".join(aliases)) + 3 for word, aliases, _ in rows)
    lines = []
    for word, aliases, what in rows:
        named = f"{word} ({', '.join(aliases)})" if aliases else word
        lines.append(f"  {named.ljust(width)}  {what}")
    return "KIND is one of:\n" + "\n".join(lines)


def kind_words() -> list[str]:
    """What shell completion offers for KIND."""
    return [*KIND_ALIASES, *_VIEW_OF]


def add_get(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane get KIND [NAME] [-o table|wide|name|yaml|json]`."""
    p = commands.add_parser(
        "get",
        parents=[common, server_option()],
        help="show stored rules, instances, a profile or a scope",
        description="Show the stored rules of one kind, or one rule, the registered "
        "instances, or a service's profile or scope. `-o yaml` prints rules as documents "
        "that `tasklane apply -f -` takes back unchanged.",
        epilog=kinds_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kind = p.add_argument("kind", metavar="KIND", help="what to show (the list below)")
    kind.completions = kind_words()  # type: ignore[attr-defined]  # read by cli/completion.py
    p.add_argument("name", metavar="NAME", nargs="?", help="one rule (default: all of KIND)")
    p.add_argument(
        "-o",
        "--output",
        choices=GET_OUTPUTS,
        default="table",
        help="output format: table (default), wide (more columns), name (kind/name only), "
        "yaml or json",
    )
    p.set_defaults(handler=get)


def get(args: argparse.Namespace) -> int:
    view = _VIEW_OF.get(args.kind.lower())
    if view is None and args.kind.lower() not in KIND_ALIASES:
        hint = did_you_mean(args.kind, kind_words()) or " (see tasklane get --help)"
        raise TasklaneError(f"unknown kind {quote(args.kind)}{hint}")
    if view == "profile":
        return _get_profile(args)
    if view == "scope":
        if args.output in ("wide", "name"):
            raise TasklaneError(f"tasklane get scope: -o {args.output} is for rules and instances")
        return get_scope(args)
    if view == "instances":
        return _get_instances(args)
    if view == "all":
        if args.name is not None:
            raise TasklaneError("tasklane get all takes no NAME")
        bodies = [call(args.server, "GET", f"/api/v1/rules/{kind.lower()}") for kind in KINDS]
        _show_rules([doc for body in bodies for doc in body["items"]], args.output, True)
        return 0
    path = f"/api/v1/rules/{quote_segment(args.kind)}"
    if args.name is not None:
        path += f"/{quote_segment(args.name)}"
    body = call(args.server, "GET", path)
    documents = body["items"] if args.name is None else [body]
    if args.output == "json":
        output(structured(body, "json"))
    elif documents or args.output in ("yaml", "name"):
        _show_rules(documents, args.output, False)
    else:
        print(f"No {body['kind']} rules found.", file=sys.stderr)
    return 0


def _show_rules(documents: list[dict[str, Any]], form: str, several_kinds: bool) -> None:
    """Rules as a table per kind (named kind/name when several kinds show, like `kubectl get
    all`), as names, or as documents."""
    if form == "json":
        output(structured({"kind": "List", "items": documents}, "json"))
    elif form == "yaml":
        # Every document starts with ---, so outputs of several gets can be concatenated.
        output(
            yaml.safe_dump_all(documents, explicit_start=True, sort_keys=False, allow_unicode=True)
        )
    elif form == "name":
        output("".join(f"{_name(doc)}\n" for doc in documents))
    else:
        tables = []
        for kind in KINDS:
            of_kind = [doc for doc in documents if doc["kind"] == kind]
            rows = [_row(doc, wide=form == "wide", prefixed=several_kinds) for doc in of_kind]
            if rows:
                tables.append(table(rows))
        if tables:
            output("\n\n".join(tables) + "\n")
        else:
            print("No rules found.", file=sys.stderr)


def _name(document: dict[str, Any]) -> str:
    return f"{document['kind'].lower()}/{document['metadata']['name']}"


def _row(document: dict[str, Any], *, wide: bool, prefixed: bool) -> dict[str, str]:
    """The table columns of one rule: what one needs to recognise it at a glance, and with
    `wide` the rest of what it says."""
    spec = document["spec"]
    row = {"NAME": _name(document) if prefixed else document["metadata"]["name"]}
    if document["kind"] == "Service":
        row["PROTOCOL"] = spec["protocol"]
        row["GROUPS"] = ",".join(
            f"{g['name']}:{g['minReplicas']}-{g['maxReplicas']}" for g in spec["groups"]
        )
        if wide:
            row["CALLS"] = ",".join(spec.get("calls", [])) or "-"
            row["RETRIES"] = _retries(spec.get("retries"))
            row["RUN"] = " ".join(spec["run"]["command"]) if "run" in spec else "-"
    elif document["kind"] == "TaskChain":
        row["DYES"] = ",".join(spec["dye"]["values"])
        row["FALLBACK"] = spec["fallback"]
        row["HOPS"] = ",".join(_hop(hop) for hop in spec["hops"])
        if wide:
            row["HEADER"] = spec["dye"]["header"]
            row["BAGGAGE KEY"] = spec["dye"]["baggageKey"]
            limits = [
                f"{hop['service']}:{hop['rateLimit']['requestsPerSecond']}/s"
                for hop in spec["hops"]
                if "rateLimit" in hop
            ]
            row["RATE LIMITS"] = ",".join(limits) or "-"
    elif document["kind"] == "ScheduledTask":
        row["CHAIN"] = spec["chain"]
        row["SCHEDULE"] = spec["schedule"]
        row["TIMEZONE"] = spec["timezone"]
        row["DURATION"] = spec["expectedDuration"]
        if wide:
            replicas = ",".join(f"{name}:{n}" for name, n in spec["replicas"].items())
            row["REPLICAS"] = replicas or "-"
    return row


def _hop(hop: dict[str, Any]) -> str:
    """'account-svc/debit', with '(80%)' when only part of the dyed traffic goes there."""
    share = f"({hop['weight']}%)" if hop["weight"] != 100 else ""
    return f"{hop['service']}/{hop['group']}{share}"


def _retries(retries: dict[str, Any] | None) -> str:
    if retries is None:
        return "-"
    return f"{retries['attempts']}x on {','.join(map(str, retries['retryOn']))}"


# --- instances -------------------------------------------------------------------------------


def _get_instances(args: argparse.Namespace) -> int:
    """`tasklane get instances [SERVICE]`: the registry, one row per instance."""
    body = call(args.server, "GET", "/api/v1/instances")
    items = [i for i in body["items"] if args.name is None or i["service"] == args.name]
    items.sort(key=lambda i: (i["service"], i["group"], i["id"]))
    if args.output in ("json", "yaml"):
        output(structured({"items": items, "revision": body["revision"]}, args.output))
    elif args.output == "name":
        output("".join(f"instance/{i['id']}\n" for i in items))
    elif items:
        now = datetime.now(UTC).timestamp()
        output(table([_instance_row(i, now, args.output == "wide") for i in items]) + "\n")
    else:
        which = f" of service {args.name}" if args.name else ""
        print(f"No instances{which} are registered.", file=sys.stderr)
    return 0


def _instance_row(item: dict[str, Any], now: float, wide: bool) -> dict[str, str]:
    row = {
        "SERVICE": item["service"],
        "GROUP": item["group"],
        "INSTANCE": item["id"],
        "ADDRESS": f"{item['host']}:{item['inbound_port']}",
        "AGE": _ago(now - item["started_at"]),
    }
    if wide:
        row["APP PORT"] = str(item["app_port"] or "-")
        row["EGRESS PORT"] = str(item["egress_port"] or "-")
        row["ADMIN PORT"] = str(item["admin_port"] or "-")
        row["PID"] = str(item["pid"] or "-")
    return row


# --- profile ---------------------------------------------------------------------------------


def _get_profile(args: argparse.Namespace) -> int:
    """`tasklane get profile SERVICE`: when each task group of the service is wanted up (the
    next 24 h, as windows of equal replicas) and the scaler's recent decisions and reasons;
    an empty part says why it is empty."""
    if args.name is None:
        raise TasklaneError("tasklane get profile needs a SERVICE name")
    if args.output in ("wide", "name"):
        raise TasklaneError(f"tasklane get profile: -o {args.output} is for rules and instances")
    body = call(args.server, "GET", f"/api/v1/profile/{quote_segment(args.name)}")
    if args.output != "table":
        compact = {**body, "groups": profile_windows(body), "start": format_time(body["start"])}
        output(structured(compact, args.output))
        return 0
    output(render_profile(body) + "\n")
    return 0


def profile_windows(body: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each group's per-minute replicas as windows of equal non-zero replicas (from, until in
    ISO UTC): what a user reads, instead of 1,440 integers."""
    return {
        group: [
            {
                "from": format_time(body["start"] + first * 60),
                "until": format_time(body["start"] + (last + 1) * 60),
                "replicas": replicas,
            }
            for first, last, replicas in _spans(counts)
        ]
        for group, counts in sorted(body["groups"].items())
    }


def render_profile(body: dict[str, Any]) -> str:
    """The profile's windows and the recent decisions as tables, or why there are none."""
    service = body["service"]
    rows = [
        {"GROUP": group, "FROM": format_time(body["start"] + first * 60),
         "UNTIL": format_time(body["start"] + (last + 1) * 60), "REPLICAS": str(replicas)}
        for group, counts in sorted(body["groups"].items())
        for first, last, replicas in _spans(counts)
    ]  # fmt: skip
    hours = body["minutes"] / 60
    lines = [f"profile of {service}, next {hours:g} h (UTC):"]
    if rows:
        lines.append(table(rows))
    elif not body["groups"]:
        lines.append(
            f"none: no ScheduledTask drives a chain with a task-group hop on {service} (only "
            "the groups of such hops are scaled from the tasks' crons)"
        )
    else:
        groups = ", ".join(sorted(body["groups"]))
        lines.append(f"none: no task fires in the next {hours:g} h that needs {groups}")
    decisions = [
        {"AT": format_time(d["at"]), "GROUP": d["group"], "REPLICAS": str(d["replicas"]),
         "REASON": d["reason"]}
        for d in body["decisions"][-10:]
    ]  # fmt: skip
    lines.append("\nrecent decisions:")
    if decisions:
        lines.append(table(decisions))
    elif not body.get("scaler"):  # an older control plane does not say: none assumed
        lines.append(
            "none: this control plane runs no scaler; it runs only when `tasklane up` is "
            "started with --actuator local|kubernetes|dry-run"
        )
    else:
        lines.append("none yet: the scaler (on the elected leader) has not changed these groups")
    return "\n".join(lines)


def _spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """(first minute, last minute, replicas) of each run of equal non-zero counts."""
    spans: list[tuple[int, int, int]] = []
    for minute, replicas in enumerate(counts):
        if spans and spans[-1][1] == minute - 1 and spans[-1][2] == replicas:
            spans[-1] = (spans[-1][0], minute, replicas)
        elif replicas:
            spans.append((minute, minute, replicas))
    return spans
