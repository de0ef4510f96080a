"""Rules in etcd: one JSON document per rule under `rules/<Kind>/<name>`, changed all-or-nothing.

Every change also rewrites REVISION_KEY in the same transaction, so that key's mod revision
is the *rules revision*: the etcd revision of the last change to any rule. A writer passes the
rules revision its RuleSet was read at and the transaction only succeeds if it is still
current. Comparing only the keys a writer touches would miss a rule another writer created
meanwhile (e.g. a chain referring to the service being deleted); one marker key catches every
change made through `apply_rules`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from controlplane.errors import RuleError, StoreError
from controlplane.model.rules import KINDS, Rule, RuleSet, from_document, to_document
from controlplane.store.etcd import PREFIX, Change, Store
from controlplane.store.follow import Follower

RULES = "rules/"
REVISION_KEY = "meta/rules-revision"
# etcd's default --max-txn-ops; one of them is the REVISION_KEY put.
MAX_TXN_OPS = 128
MAX_CHANGES = MAX_TXN_OPS - 1
_log = logging.getLogger(__name__)

RulesCallback = Callable[[RuleSet], None]


class ConcurrentChange(StoreError):
    """The rules changed between reading them and writing; read again and redo the change."""


def rule_key(kind: str, name: str) -> str:
    """The store key of one rule."""
    return f"{RULES}{kind}/{name}"


def encode(rule: Rule) -> bytes:
    """The stored form: the canonical document as compact JSON."""
    return json.dumps(to_document(rule), separators=(",", ":"), ensure_ascii=False).encode()


def load_rules(store: Store) -> tuple[RuleSet, int]:
    """Every stored rule, and the rules revision to pass to `apply_rules` (0: never written)."""
    rules, revision, _ = _read(store)
    return rules, revision


def changes(new: RuleSet, old: RuleSet) -> tuple[dict[str, bytes], list[str]]:
    """The puts and deletes turning `old` into `new`: unchanged rules are not rewritten.

    RuleError when they do not fit in one etcd transaction: splitting would break the
    all-or-nothing promise of an apply.
    """
    puts = {
        rule_key(rule.kind, rule.name): encode(rule)
        for rule in new.all()
        if old.get(rule.kind, rule.name) != rule
    }
    deletes = [
        rule_key(rule.kind, rule.name)
        for rule in old.all()
        if new.get(rule.kind, rule.name) is None
    ]
    count = len(puts) + len(deletes)
    if count > MAX_CHANGES:
        raise RuleError(
            f"too many changes in one apply ({count} > {MAX_CHANGES}): etcd takes at most "
            f"{MAX_TXN_OPS} operations per transaction and an apply is all-or-nothing; "
            "apply the rules in smaller parts"
        )
    return puts, deletes


def apply_rules(store: Store, new: RuleSet, old: RuleSet, expect_revision: int) -> bool:
    """Write `new` over `old` (read at rules revision `expect_revision`) in one transaction.

    Returns False when there was nothing to write (and nothing was written). Raises
    ConcurrentChange when another writer changed the rules since `old` was read.
    """
    puts, deletes = changes(new, old)
    if not puts and not deletes:
        return False
    puts[REVISION_KEY] = b""
    if not store.txn(puts, deletes, {REVISION_KEY: expect_revision}):
        raise ConcurrentChange(
            f"rules changed concurrently (they were read at rules revision {expect_revision}); "
            "retry"
        )
    return True


def watch_rules(store: Store, callback: RulesCallback) -> Callable[[], None]:
    """Call `callback` with the current RuleSet now and with the new one after each change.

    Returns a cancel function. If the watch breaks (etcd restarted, history compacted) the
    rules are read again, passed to `callback`, and watched from there, retrying until etcd
    answers or the watch is cancelled. Callbacks come from one thread at a time; keep them
    short. StoreError if etcd does not answer the first read.
    """

    def read(store: Store) -> tuple[RuleSet, int]:
        rules, _, read_at = _read(store)
        return rules, read_at

    return Follower(store, RULES, read, _fold, lambda rules, _: callback(rules)).start()


def _fold(rules: RuleSet, batch: list[Change]) -> RuleSet:
    for change in batch:
        rules = _updated(rules, change)
    return rules


def _read(store: Store) -> tuple[RuleSet, int, int]:
    """(rules, rules revision, etcd revision of the read).

    The marker is read before the rules: if a write lands in between, the rules are newer
    than the revision and the next apply fails safe (ConcurrentChange) instead of
    overwriting a change it never saw.
    """
    revision = store.mod_revision(REVISION_KEY)
    items, read_at = store.get_prefix(RULES)
    rules = [_decode(key, value) for key, value in sorted(items.items())]
    return RuleSet.empty().with_rules(rules), revision, read_at


def _decode(key: str, value: bytes) -> Rule:
    """The rule stored at `key`; StoreError names the key if it holds something else."""
    where = f"etcd key {PREFIX}{key}"
    try:
        rule = from_document(json.loads(value), where)
    except (ValueError, RuleError) as exc:
        raise StoreError(f"{where} does not hold a valid rule: {exc}") from exc
    if rule_key(rule.kind, rule.name) != key:
        raise StoreError(f"{where} holds {rule.kind} {rule.name}, not the rule its key names")
    return rule


def _updated(rules: RuleSet, change: Change) -> RuleSet:
    """`rules` after one watched change; a change etcd holds but no rule explains is logged
    and skipped rather than stopping every later update."""
    kind, _, name = change.key[len(RULES) :].partition("/")
    if kind not in KINDS or not name:
        _log.warning("ignoring etcd key %s%s: not a rule key", PREFIX, change.key)
        return rules
    if change.value is None:
        return rules.without(kind, name)
    try:
        return rules.with_rules([_decode(change.key, change.value)])
    except StoreError as exc:
        _log.warning("ignoring a change: %s", exc)
        return rules
