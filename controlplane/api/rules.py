"""The rules API: apply (with dry run and diff), list, get and delete; history and rollback.

Every write makes one new generation of the rules current with one transaction guarded by
the rules revision (store/rules.py), so a request of any size either changes all it asked
for or nothing, and becomes one revision in the history (when, who, what changed). Writes
are serialised in-process by one asyncio.Lock, and across control planes by that guard;
parsing, validation and etcd calls run in a worker thread because the event loop also
serves xDS and must never block on them.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import time
from collections.abc import Callable
from typing import Any

import yaml
from aiohttp import web

from controlplane.api import auth
from controlplane.api.context import ApiContext
from controlplane.api.http import ApiError
from controlplane.errors import RuleError
from controlplane.model.load import Parsed, read_rules
from controlplane.model.rollout import (
    DEFAULT_MIN_REQUESTS,
    DEFAULT_WINDOW_S,
    Rollout,
    parse_percent,
    parse_window,
)
from controlplane.model.rules import (
    KIND_ALIASES,
    KINDS,
    Rule,
    RuleSet,
    from_document,
    to_document,
)
from controlplane.model.text import byte_size, did_you_mean, quote
from controlplane.model.validate import apply as validate_apply
from controlplane.model.validate import check_delete
from controlplane.store import history
from controlplane.store.etcd import Store
from controlplane.store.rollout import start_rollout
from controlplane.store.rules import (
    CANDIDATE_KEY,
    DEFAULT_HISTORY_LIMIT,
    ConcurrentChange,
    RolloutRunning,
    apply_rules,
    load_rules,
)

log = logging.getLogger(__name__)

# Another writer (a second control plane) changing the rules between our read and write is
# rare; one retry re-validates against their rules, a second conflict goes to the user.
RETRIES = 1
# The largest apply request. Measured (bench/translate.py's generator, canonical documents):
# 1,000 Services and 200 TaskChains are 0.4 MB of request; 10,000 Services and 200 chains
# 3.0 MB, with 2,000 chains 4.1 MB. 16 MiB leaves 4x over the largest; aiohttp's default
# (1 MiB) refused meshes over ~3,000 Services. Only the apply route reads bodies this large.
MAX_APPLY_BODY = 16 * 1024 * 1024


def resolve_kind(text: str) -> str:
    """The canonical kind for a name, alias or plural in any case; 404 for anything else."""
    kind = KIND_ALIASES.get(text.lower())
    if kind is None:
        hint = did_you_mean(text, KIND_ALIASES) or (
            f" (expected one of: {', '.join(KINDS)}, or svc, chain, task and their plurals)"
        )
        raise ApiError(404, f"unknown kind {quote(text)}{hint}")
    return kind


# libyaml's emitter writes the same text as PyYAML's, 5x faster (10,000 documents: 0.9 s
# against 4.7 s here).
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def document_yaml(rule: Rule) -> str:
    """A rule's canonical document as YAML: what diffs compare, line by line."""
    return yaml.dump(to_document(rule), Dumper=_DUMPER, sort_keys=False, allow_unicode=True)


def document_diff(
    before: Rule | None, after: Rule | None, labels: tuple[str, str] = ("live", "new")
) -> str:
    """A unified diff of the YAML documents; a new rule is diffed against nothing, and a
    deleted one (after None) to nothing."""
    rule = after or before
    assert rule is not None
    label = f"{rule.kind}/{rule.name}"
    old = document_yaml(before).splitlines(keepends=True) if before is not None else []
    new = document_yaml(after).splitlines(keepends=True) if after is not None else []
    fromfile = f"{labels[0]}/{label}" if before is not None else "/dev/null"
    tofile = f"{labels[1]}/{label}" if after is not None else "/dev/null"
    return "".join(difflib.unified_diff(old, new, fromfile=fromfile, tofile=tofile))


def ruleset_diff(old: RuleSet, new: RuleSet, labels: tuple[str, str]) -> str:
    """The diff of every rule that differs between two rule sets, in kind and name order."""
    return "".join(document_diff(before, after, labels) for before, after in _differing(old, new))


def _differing(old: RuleSet, new: RuleSet) -> list[tuple[Rule | None, Rule | None]]:
    """(before, after) of every rule that differs, in kind and name order; None: absent."""
    keys = {(r.kind, r.name) for r in (*old.all(), *new.all())}
    pairs = []
    for kind, name in sorted(keys, key=lambda key: (KINDS.index(key[0]), key[1])):
        before, after = old.get(kind, name), new.get(kind, name)
        if before != after:
            pairs.append((before, after))
    return pairs


class Writer:
    """Who writes (for the history), how many revisions are kept, and for an apply that
    stages a rollout, its settings (the change then goes to canary sidecars first)."""

    def __init__(
        self, who: str, keep: int = DEFAULT_HISTORY_LIMIT, canary: Rollout | None = None
    ) -> None:
        self.who, self.keep, self.canary = who, keep, canary


def apply_files(
    store: Store, files: list[tuple[str, str]], dry_run: bool, writer: Writer | None = None
) -> dict[str, Any]:
    """Parse, validate against the stored rules and (unless dry_run) write, all or nothing.

    files are (name, text) pairs; name is how messages refer to the file.
    """
    parsed, unread = read_rules(files)

    def plan(current: RuleSet) -> tuple[RuleSet, dict[str, Any]]:
        new = validate_apply(current, parsed, unread)
        results, diffs = [], []
        for item in parsed:
            before = current.get(item.kind, item.name)
            if before is None:
                action = "created"
            elif before == item.rule:
                action = "unchanged"
            else:
                action = "configured"
            results.append({"kind": item.kind, "name": item.name, "action": action})
            if action != "unchanged":
                diffs.append(document_diff(before, item.rule))
        return new, {"results": results, "diff": "".join(diffs)}

    return _commit(store, plan, None if dry_run else writer or Writer(""), "apply")


def delete_rule(store: Store, kind_text: str, name: str, writer: Writer) -> dict[str, Any]:
    """Delete one rule unless another rule still refers to it (409 naming the referrer)."""
    kind = resolve_kind(kind_text)

    def plan(current: RuleSet) -> tuple[RuleSet, dict[str, Any]]:
        if current.get(kind, name) is None:
            raise ApiError(404, f"{kind} {quote(name)} not found")
        try:
            check_delete(current, kind, name)
        except RuleError as exc:
            raise ApiError(409, str(exc)) from None
        return current.without(kind, name), {"kind": kind, "name": name, "action": "deleted"}

    return _commit(store, plan, writer, "delete")


def rollback(store: Store, revision: int, writer: Writer) -> dict[str, Any]:
    """Make the rules what they were at `revision`, checked again as if applied whole: a
    revision that no longer validates is refused with the validator's message."""

    def plan(current: RuleSet) -> tuple[RuleSet, dict[str, Any]]:
        where = f"revision {revision}"
        parsed = [
            Parsed(from_document(doc, f"{where}: document {number}"), where, number)
            for number, doc in enumerate(history.revision_documents(store, revision), 1)
        ]
        target = validate_apply(RuleSet.empty(), parsed)
        results = [
            {"kind": kind, "name": name, "action": action}
            for kind, name, action in _actions(current, target)
        ]
        return target, {"rolledBackTo": revision, "results": results}

    return _commit(store, plan, writer, f"rollback to {revision}")


def _actions(old: RuleSet, new: RuleSet) -> list[tuple[str, str, str]]:
    """(kind, name, created|configured|deleted) of every rule that differs."""
    actions = []
    for before, after in _differing(old, new):
        rule = after or before
        assert rule is not None
        action = "created" if before is None else "deleted" if after is None else "configured"
        actions.append((rule.kind, rule.name, action))
    return actions


def _commit(
    store: Store,
    plan: Callable[[RuleSet], tuple[RuleSet, dict[str, Any]]],
    writer: Writer | None,
    action: str,
) -> dict[str, Any]:
    """Read the rules, plan the change on them and write it (writer None: a dry run); on a
    concurrent change read and plan again, so the change is validated against what the other
    writer stored."""
    for _ in range(RETRIES):
        try:
            return _plan_and_write(store, plan, writer, action)
        except ConcurrentChange:
            log.info("rules changed while applying; validating and applying again")
    return _plan_and_write(store, plan, writer, action)


def _plan_and_write(
    store: Store,
    plan: Callable[[RuleSet], tuple[RuleSet, dict[str, Any]]],
    writer: Writer | None,
    action: str,
) -> dict[str, Any]:
    if writer is not None and store.mod_revision(CANDIDATE_KEY):
        raise RolloutRunning()  # before validating 10,000 documents for nothing
    current, revision = load_rules(store)
    new, result = plan(current)
    if writer is not None and writer.canary is not None:
        rollout = start_rollout(store, new, current, revision, writer.canary, keep=writer.keep)
        if rollout is not None:
            result["rollout"] = rollout.to_json()
    elif writer is not None:
        written = apply_rules(
            store, new, current, revision, who=writer.who, action=action, keep=writer.keep
        )
        if written:
            result["revision"] = written
    return result


def history_list(store: Store, kind_text: str | None, name: str | None) -> dict[str, Any]:
    """The kept revisions, newest first; only those touching KIND (and NAME) when given."""
    kind = resolve_kind(kind_text) if kind_text else None
    items = [r.to_json() for r in reversed(history.records(store)) if r.touches(kind, name)]
    return {"current": history.current_revision(store), "items": items}


def history_revision(store: Store, revision: int) -> dict[str, Any]:
    """One revision's record and the diff of the documents it changed."""
    record = history.record(store, revision)
    try:
        before = history.revision_rules(store, revision - 1)
    except history.RevisionNotKept:
        raise history.RevisionNotKept(
            f"revision {revision - 1} is no longer kept, so the diff of revision {revision} "
            "cannot be shown"
        ) from None
    after = history.revision_rules(store, revision)
    labels = (f"r{revision - 1}", f"r{revision}")
    return {**record.to_json(), "diff": ruleset_diff(before, after, labels)}


def list_rules(store: Store, kind_text: str) -> dict[str, Any]:
    """Every stored rule of one kind, by name."""
    kind = resolve_kind(kind_text)
    rules, _ = load_rules(store)
    items = [to_document(rule) for rule in rules.all() if rule.kind == kind]
    return {"kind": kind, "items": items}


def get_rule(store: Store, kind_text: str, name: str) -> dict[str, Any]:
    kind = resolve_kind(kind_text)
    rules, _ = load_rules(store)
    rule = rules.get(kind, name)
    if rule is None:
        raise ApiError(404, f"{kind} {quote(name)} not found")
    return to_document(rule)


MAX_FILE_NAME = 1024


def _apply_request(body: object) -> tuple[list[tuple[str, str]], bool, dict | None]:
    """The (name, text) files, dryRun flag and canary settings of an apply request; 400 for
    any other shape."""
    shape = (
        'expected {"files": [{"name": "...", "text": "..."}, ...], "dryRun": false, '
        '"canary": {"percent": 10, "window": "60s", "minRequests": 20} (optional)}'
    )
    if not isinstance(body, dict) or set(body) - {"files", "dryRun", "canary"}:
        raise ApiError(400, f"bad apply request: {shape}")
    files, dry_run = body.get("files"), body.get("dryRun", False)
    canary = body.get("canary")
    if not isinstance(files, list) or not files or not isinstance(dry_run, bool):
        raise ApiError(400, f"bad apply request: {shape}")
    if canary is not None and (
        not isinstance(canary, dict) or set(canary) - {"percent", "window", "minRequests"}
    ):
        raise ApiError(400, f"bad apply request: {shape}")
    pairs = []
    for file in files:
        if not (
            isinstance(file, dict)
            and set(file) == {"name", "text"}
            and isinstance(file["name"], str)
            and isinstance(file["text"], str)
        ):
            raise ApiError(400, f"bad apply request: {shape}")
        name = file["name"]
        if not name.isprintable() or not 0 < len(name) <= MAX_FILE_NAME:
            # Every message starts with the file name: it must keep them on one line.
            raise ApiError(
                400, f"bad apply request: a file name is 1-{MAX_FILE_NAME} printable characters"
            )
        pairs.append((name, file["text"]))
    return pairs, dry_run, canary


def canary_settings(canary: dict, who: str) -> Rollout:
    """A rollout to stage from an apply's `canary` member; RuleError (400) when a setting is
    out of range. The store fills in its generation and revisions."""
    percent = canary.get("percent")
    if isinstance(percent, bool) or not isinstance(percent, int | str):
        raise RuleError("canary: percent is a share of 1-99 % (e.g. 10%)")
    window = canary.get("window", f"{DEFAULT_WINDOW_S}s")
    if not isinstance(window, str):
        raise RuleError("canary window: a duration such as 60s or 5m")
    least = canary.get("minRequests", DEFAULT_MIN_REQUESTS)
    if isinstance(least, bool) or not isinstance(least, int) or not 1 <= least <= 1_000_000:
        raise RuleError("canary minRequests: a whole number of 1-1000000")
    return Rollout(
        generation="",
        percent=parse_percent(percent),
        window_s=parse_window(window),
        min_requests=least,
        started_at=time.time(),
        who=who,
        base=0,
        revision=0,
    )


def too_large(size: int | None, limit: int) -> str:
    """The 413 message: the CLI puts the files' names in front of it."""
    sent = f" ({size:,} bytes)" if size else ""
    return (
        f"too large for one apply{sent}: the control plane takes up to {limit:,} bytes "
        f"({byte_size(limit)})"
    )


# Who made a change, as the history says: the client's own account of itself (the CLI sends
# user@host), then its address.
CLIENT_HEADER = "X-Tasklane-Client"
MAX_CLIENT = 128


def who(request: web.Request) -> str:
    """'alice@laptop (127.0.0.1)', or the address alone when the client does not say."""
    client = request.headers.get(CLIENT_HEADER, "")
    address = request.remote or "unknown address"
    if client and client.isprintable() and len(client) <= MAX_CLIENT:
        return f"{client} ({address})"
    return address


def _revision(text: str) -> int:
    if not text.isdigit() or len(text) > 12:
        raise ApiError(400, f"revision {quote(text)} is not a revision number")
    return int(text)


def routes(context: ApiContext, keep: int = DEFAULT_HISTORY_LIMIT) -> list[web.RouteDef]:
    """The rules routes, sharing one write lock; writes keep the last `keep` revisions."""
    writing = asyncio.Lock()

    async def run(call: Callable[..., dict[str, Any]], *args: Any) -> web.Response:
        """Run a blocking call in a worker thread (the loop also serves xDS)."""
        return web.json_response(await asyncio.to_thread(call, context.store, *args))

    async def apply(request: web.Request) -> web.Response:
        try:
            body = await request.clone(client_max_size=MAX_APPLY_BODY).json()
            files, dry_run, canary = _apply_request(body)
        except ValueError as exc:  # JSONDecodeError, or a body that is not UTF-8
            raise ApiError(400, f"request body is not JSON: {exc}") from None
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, too_large(request.content_length, MAX_APPLY_BODY)) from None
        rollout = None if canary is None else canary_settings(canary, who(request))
        if dry_run:
            return await run(apply_files, files, True)
        auth.require_token(request)
        async with writing:
            return await run(apply_files, files, False, Writer(who(request), keep, rollout))

    async def list_kind(request: web.Request) -> web.Response:
        return await run(list_rules, request.match_info["kind"])

    async def get_one(request: web.Request) -> web.Response:
        return await run(get_rule, request.match_info["kind"], request.match_info["name"])

    async def delete(request: web.Request) -> web.Response:
        kind, name = request.match_info["kind"], request.match_info["name"]
        async with writing:
            return await run(delete_rule, kind, name, Writer(who(request), keep))

    async def history_of(request: web.Request) -> web.Response:
        kind, name = request.query.get("kind"), request.query.get("name")
        if name is not None and kind is None:
            raise ApiError(400, "a name needs its kind: ?kind=KIND&name=NAME")
        return await run(history_list, kind, name)

    async def one_revision(request: web.Request) -> web.Response:
        return await run(history_revision, _revision(request.match_info["revision"]))

    async def roll_back(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            raise ApiError(400, f"request body is not JSON: {exc}") from None
        target = body.get("revision") if isinstance(body, dict) else None
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise ApiError(400, 'bad rollback request: expected {"revision": N}, N >= 1')
        async with writing:
            return await run(rollback, target, Writer(who(request), keep))

    return [
        web.post("/api/v1/apply", auth.writes_on_request(apply)),
        web.get("/api/v1/rules/{kind}", list_kind),
        web.get("/api/v1/rules/{kind}/{name}", get_one),
        web.delete("/api/v1/rules/{kind}/{name}", delete),
        web.get("/api/v1/history", history_of),
        web.get("/api/v1/history/{revision}", one_revision),
        web.post("/api/v1/rollback", roll_back),
    ]
