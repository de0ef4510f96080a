"""`tasklane apply / diff / get / delete / history / rollback`: clients of the rules API (and
the profile view)."""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from http import HTTPStatus
from pathlib import Path
from typing import Any

from controlplane.cli.client import (
    OUTPUTS,
    STDIN,
    ApiError,
    api_token,
    call,
    output,
    quote_segment,
    server_option,
    structured,
)
from controlplane.cli.views import table
from controlplane.errors import RuleError, TasklaneError
from controlplane.model.load import RULE_SUFFIXES, read_rules
from controlplane.model.rollout import (
    DEFAULT_MIN_REQUESTS,
    DEFAULT_WINDOW_S,
    parse_percent,
    parse_window,
)
from controlplane.model.rules import RuleSet
from controlplane.model.run import format_time
from controlplane.model.text import byte_size
from controlplane.model.validate import apply as validate_apply


def _add_filename(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE|DIR",
        help="a rule file, a directory of *.yaml/*.yml files (not recursive), or - for stdin; "
        "repeat for more",
    )


def add_apply(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane apply -f FILE|DIR [--dry-run]`: create or update rules, all or nothing."""
    p = commands.add_parser(
        "apply",
        parents=[common, server_option()],
        help="create or update rules from YAML files",
        description="Send rule files to the control plane, which checks them against the "
        "stored rules and writes every change in one transaction, or nothing at all. Rules "
        "not in the files are kept.",
    )
    _add_filename(p)
    p.add_argument("--dry-run", action="store_true", help="check and show the diff without writing")
    p.add_argument(
        "--canary",
        metavar="PERCENT",
        help="stage the change as a rollout: serve it to PERCENT (1-99%%) of each role's "
        "sidecars first, compare them with the rest, then promote it or revert it "
        "automatically (see `tasklane rollout`)",
    )
    p.add_argument(
        "--canary-window",
        metavar="DURATION",
        default=f"{DEFAULT_WINDOW_S}s",
        help=f"how long the canary is watched before promotion (default: {DEFAULT_WINDOW_S}s)",
    )
    p.add_argument(
        "--canary-min-requests",
        type=int,
        metavar="N",
        default=DEFAULT_MIN_REQUESTS,
        help="canary requests needed to judge it (default: %(default)s)",
    )
    p.set_defaults(handler=apply)


def apply(args: argparse.Namespace) -> int:
    """One line per document, as kubectl prints them; a dry run adds the diff."""
    canary = None
    if args.canary is not None:  # checked here too, before sending 10,000 documents
        canary = {
            "percent": parse_percent(args.canary),
            "window": f"{parse_window(args.canary_window)}s",
            "minRequests": args.canary_min_requests,
        }
    body = _apply_files(args, _rule_files(args.filename), dry_run=args.dry_run, canary=canary)
    suffix = " (dry run)" if args.dry_run else ""
    lines = [f"{r['kind'].lower()}/{r['name']} {r['action']}{suffix}\n" for r in body["results"]]
    rollout = body.get("rollout")
    if rollout is not None:
        lines.append(
            f"rollout of revision {rollout['revision']} started: {rollout['percent']}% of each "
            f"role's sidecars first, judged over {rollout['window']} "
            "(tasklane rollout status)\n"
        )
    output("".join(lines) + (body["diff"] if args.dry_run else ""))
    return 0


def add_validate(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane validate -f FILE|DIR`: the apply's checks, offline (pre-commit, CI)."""
    p = commands.add_parser(
        "validate",
        parents=[common],
        help="check rule files offline, with no control plane",
        description="Check rule files with the same validator and messages as an apply, "
        "without a control plane: each document, then the references between the files' "
        "rules (so give every file the rules refer to). Every problem is one line on stderr; "
        "exit status 0 when valid, 2 otherwise. For pre-commit hooks and CI.",
    )
    _add_filename(p)
    p.set_defaults(handler=validate)


def validate(args: argparse.Namespace) -> int:
    files = _rule_files(args.filename)
    parsed, unread = read_rules([(file["name"], file["text"]) for file in files])
    rules = validate_apply(RuleSet.empty(), parsed, unread)
    counts = [(len(rules.services), "Service"), (len(rules.chains), "TaskChain"),
              (len(rules.tasks), "ScheduledTask")]  # fmt: skip
    shown = ", ".join(f"{count} {kind}" for count, kind in counts)
    output(f"valid: {shown} ({len(files)} file{'s' if len(files) != 1 else ''})\n")
    return 0


def add_diff(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane diff -f FILE|DIR`: what an apply would change; exit 1 if anything."""
    p = commands.add_parser(
        "diff",
        parents=[common, server_option()],
        help="show what applying rule files would change",
        description="Print a unified diff between the stored rules and the rule files. Exit "
        "status: 0 no changes, 1 changes, 2 error (like kubectl diff).",
    )
    _add_filename(p)
    p.set_defaults(handler=diff)


def diff(args: argparse.Namespace) -> int:
    body = _apply_files(args, _rule_files(args.filename), dry_run=True)
    output(body["diff"])
    return 1 if any(result["action"] != "unchanged" for result in body["results"]) else 0


def add_delete(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane delete KIND NAME`: refused while another rule refers to it."""
    p = commands.add_parser(
        "delete",
        parents=[common, server_option()],
        help="delete one rule",
        description="Delete one rule. A service a chain uses, or a chain a task drives, is "
        "refused with the name of the rule that still refers to it.",
    )
    p.add_argument(
        "kind",
        metavar="KIND",
        help="service (svc), taskchain (chain) or scheduledtask (task), or a plural",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=delete)


def delete(args: argparse.Namespace) -> int:
    path = f"/api/v1/rules/{quote_segment(args.kind)}/{quote_segment(args.name)}"
    body = call(args.server, "DELETE", path, None, api_token(args))
    output(f"{body['kind'].lower()}/{body['name']} {body['action']}\n")
    return 0


def add_history(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane history [KIND [NAME]] [--revision N] [-o table|yaml|json]`."""
    p = commands.add_parser(
        "history",
        parents=[common, server_option()],
        help="list the revisions of the rules, or show one",
        description="Every apply, delete and rollback is a revision of the rules: when, who "
        "and which rules it created, configured or deleted, newest first. KIND (and NAME) "
        "lists only the revisions that changed such rules; --revision N shows the diff of "
        "revision N's documents against the revision before it.",
    )
    p.add_argument("kind", metavar="KIND", nargs="?", help="service, taskchain or scheduledtask")
    p.add_argument("name", metavar="NAME", nargs="?", help="one rule of KIND")
    p.add_argument("--revision", type=int, metavar="N", help="show revision N as a diff")
    p.add_argument(
        "-o", "--output", choices=OUTPUTS, default="table", help="output format (default: table)"
    )
    p.set_defaults(handler=history)


def history(args: argparse.Namespace) -> int:
    if args.revision is not None:
        if args.kind is not None:
            raise TasklaneError("tasklane history: give KIND [NAME] or --revision N, not both")
        body = call(args.server, "GET", f"/api/v1/history/{args.revision}")
        if args.output != "table":
            output(structured(body, args.output))
        else:
            output(_revision_line(body) + "\n" + body["diff"])
        return 0
    query = {key: value for key, value in (("kind", args.kind), ("name", args.name)) if value}
    path = "/api/v1/history" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    body = call(args.server, "GET", path)
    if args.output != "table":
        output(structured(body, args.output))
    elif body["items"]:
        output(table([_history_row(item) for item in body["items"]]) + "\n")
    else:
        print("No revisions" + (" of such rules" if query else "") + " in the history.",
              file=sys.stderr)  # fmt: skip
    return 0


def _history_row(item: dict[str, Any]) -> dict[str, str]:
    changed = [
        f"{sign}{label.lower()}"
        for sign, key in (("+", "created"), ("~", "configured"), ("-", "deleted"))
        for label in item[key]
    ]
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return {
        "REVISION": str(item["revision"]),
        "AT": format_time(item["at"]),
        "WHO": item["who"],
        "ACTION": item["action"],
        "CHANGES": shown,
    }


def _revision_line(item: dict[str, Any]) -> str:
    counts = ", ".join(f"{len(item[key])} {key}" for key in ("created", "configured", "deleted"))
    return (
        f"# revision {item['revision']}: {item['action']} by {item['who']} "
        f"at {format_time(item['at'])} ({counts})"
    )


def add_rollback(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """`tasklane rollback N`: the rules as they were at revision N, as a new revision."""
    p = commands.add_parser(
        "rollback",
        parents=[common, server_option()],
        help="return the rules to an earlier revision",
        description="Make the rules what they were at revision N (see `tasklane history`): "
        "checked again like an apply of all of them, written all or nothing, and recorded "
        "as a new revision. A revision that no longer validates is refused and changes "
        "nothing.",
    )
    p.add_argument("revision", type=int, metavar="N")
    p.set_defaults(handler=rollback)


def rollback(args: argparse.Namespace) -> int:
    body = call(args.server, "POST", "/api/v1/rollback", {"revision": args.revision},
                api_token(args))  # fmt: skip
    lines = [f"{r['kind'].lower()}/{r['name']} {r['action']}\n" for r in body["results"]]
    if "revision" in body:
        lines.append(f"rolled back to revision {args.revision} as revision {body['revision']}\n")
    else:
        lines.append(f"the rules are already those of revision {args.revision}\n")
    output("".join(lines))
    return 0


def _rule_files(given: list[str]) -> list[dict[str, str]]:
    """Read the files here, not on the server, so messages name paths as the user typed them."""
    files: list[dict[str, str]] = []
    for name in given:
        if name == STDIN:
            files.append({"name": "<stdin>", "text": _decode("<stdin>", sys.stdin.buffer.read())})
            continue
        path = Path(name)
        if path.is_dir():
            found = sorted(
                p.name for p in path.iterdir() if p.suffix in RULE_SUFFIXES and p.is_file()
            )
            if not found:
                raise RuleError(f"{name}: no *.yaml or *.yml files in this directory")
            paths = [os.path.join(name, each) for each in found]
        elif path.exists():
            paths = [name]
        else:
            raise RuleError(f"{name}: no such file or directory")
        for each in paths:
            try:
                data = Path(each).read_bytes()
            except OSError as exc:
                raise RuleError(f"{each}: cannot read: {exc.strerror or exc}") from None
            files.append({"name": each, "text": _decode(each, data)})
    return files


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RuleError(f"{name}: not UTF-8 text (byte {exc.start})") from None


def _apply_files(
    args: argparse.Namespace,
    files: list[dict[str, str]],
    *,
    dry_run: bool,
    canary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"files": files, "dryRun": dry_run}
    if canary is not None:
        body["canary"] = canary
    token = None if dry_run else api_token(args)  # a dry run writes nothing: no token needed
    try:
        return call(args.server, "POST", "/api/v1/apply", body, token)
    except ApiError as exc:
        if exc.status != HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
            raise
        raise RuleError(f"{_largest(files)}: {exc}") from None


def _largest(files: list[dict[str, str]], shown: int = 3) -> str:
    """The largest files with their sizes, the ones to split first."""
    sizes = sorted(((len(f["text"].encode()), f["name"]) for f in files), reverse=True)
    names = ", ".join(f"{name} ({byte_size(size)})" for size, name in sizes[:shown])
    return names + (f" and {len(files) - shown} more files" if len(files) > shown else "")
