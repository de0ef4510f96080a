"""Rules in etcd: every change is a new *generation*, made visible by flipping one pointer.

Why this shape: an apply is all-or-nothing at any size, but etcd takes at most 128 operations
and 1.5 MiB per transaction (the defaults an external etcd keeps), so 10,000 rules cannot be
written in one transaction. An apply therefore writes its generation first where no reader
looks, in as many transactions as it takes (staging), and then makes it current with ONE
small transaction that rewrites the pointer, guarded by the pointer's mod revision:

    meta/rules-revision      the pointer {"revision": N, "generation": G}. Its mod revision is
                             the *rules revision*: a writer passes the one it read at and
                             loses (ConcurrentChange) if any other change flipped since, so
                             two applies serialise; runs.py guards run writes with it too.
    rules/generations/<G>    a generation: its chunks and its history record (when, who,
                             action, which rules were created, configured, deleted)
    rules/chunks/<sha256>    canonical documents as one JSON list: the rules whose
                             kind/name hash into one of BUCKETS buckets. Content-addressed,
                             so a chunk whose rules did not change is shared with the
                             generation before (a one-rule change writes one chunk), and a
                             10,000-rule generation is ~256 values (tens of transactions).
    rules/history/<N>        revision N -> its generation G; written by the flip
    rules/staging/<G>        present while G is being staged; on a lease, so an apply killed
                             mid-way leaves a marker that expires. The flip compares it: a
                             generation whose marker expired can never be made current.
    meta/rules-staging       rewritten by each staging start; collection's deletes compare it
    meta/rules-candidate     a *candidate* generation under a staged rollout
                             (model/rollout.py, store/rollout.py): staged like an apply, but
                             parked here instead of flipped; its promotion is the flip. While
                             it exists an apply's flip fails (one change in flight at a time).

Readers (load_rules, watch_rules, other replicas) go through the pointer, so they see a
whole generation or the one before, never a part; a watch follows only the pointer and the
candidate (one prefix, WATCHED: a promotion changes both in one revision, so they arrive
together).
Collection (after every apply) keeps the last `keep` revisions
and removes older ones, and generations, chunks and markers nothing kept refers to: staged
generations that never got their flip included. History entries are current keys, not old
etcd revisions, so etcd's compaction does not touch them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from controlplane.errors import RuleError, StoreError
from controlplane.model.rollout import Rollout
from controlplane.model.rules import KINDS, Rule, RuleSet, from_document, to_document
from controlplane.store.etcd import PREFIX, Change, Lease, Store
from controlplane.store.follow import Follower

RULES = "rules/"
REVISION_KEY = "meta/rules-revision"
CANDIDATE_KEY = "meta/rules-candidate"
# What the rules watch follows: the pointer and the candidate (and the staging guard, which
# it skips). Not the pointer's own prefix: a replica of an older tasklane follows that, and
# must never read a candidate as a pointer.
WATCHED = "meta/rules-"
STAGING_GUARD = "meta/rules-staging"
CHUNKS = f"{RULES}chunks/"
GENERATIONS = f"{RULES}generations/"
HISTORY = f"{RULES}history/"
STAGING = f"{RULES}staging/"
# Rules per generation spread over this many chunks: ~40 rules (12 KB) each at 10,000 rules,
# a few hundred KB each at 100,000, always well under etcd's 1.5 MiB value limit.
BUCKETS = 256
# A staged generation not flipped within this long is garbage (its apply died).
STAGING_TTL = 60
DEFAULT_HISTORY_LIMIT = 100
# The generation of rules stored by tasklane before generations, one key per rule at
# rules/<Kind>/<name> with an empty pointer: read as they are until the first apply, then
# collected.
LEGACY = "legacy"
# A read that meets a generation collected under it (keep revisions flipped meanwhile)
# starts again from the pointer this many times.
READ_ATTEMPTS = 3
_log = logging.getLogger(__name__)


class ConcurrentChange(StoreError):
    """The rules changed between reading them and writing; read again and redo the change."""


class RolloutRunning(StoreError):
    """A staged rollout holds a candidate: the rules change only through it until it ends."""

    def __init__(self) -> None:
        super().__init__(
            "a rollout is in progress: see `tasklane rollout status`, then `tasklane rollout "
            "promote` or `abort` before changing the rules"
        )


@dataclass(frozen=True)
class Pointer:
    """What the pointer says: the current revision number and generation (0 and '': no rules
    were ever written), and the pointer's mod revision (the rules revision)."""

    revision: int
    generation: str
    mod_revision: int


@dataclass(frozen=True)
class Generation:
    """One stored generation: its chunks' hashes and its history record."""

    chunks: tuple[str, ...]
    record: dict[str, Any]


def rule_label(rule: Rule) -> str:
    """'Service/foo': how history records name a rule."""
    return f"{rule.kind}/{rule.name}"


def load_rules(store: Store) -> tuple[RuleSet, int]:
    """Every stored rule, and the rules revision to pass to `apply_rules` (0: never written)."""
    rules, pointer, _ = _read_current(store)
    return rules, pointer.mod_revision


def _read_current(store: Store) -> tuple[RuleSet, Pointer, int]:
    """(current rules, the pointer, the etcd revision the pointer was read at)."""
    for attempt in range(READ_ATTEMPTS):
        value, mod_revision, read_at = store.entry(REVISION_KEY)
        pointer = _pointer(value, mod_revision)
        try:
            return generation_rules(store, pointer.generation), pointer, read_at
        except _Collected:
            if attempt == READ_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def apply_rules(
    store: Store,
    new: RuleSet,
    old: RuleSet,
    expect_revision: int,
    *,
    who: str = "",
    action: str = "apply",
    keep: int = DEFAULT_HISTORY_LIMIT,
) -> int:
    """Make `new` current in place of `old` (read at rules revision `expect_revision`).

    Returns the new revision number, 0 when there was nothing to write (and nothing was
    written). Raises ConcurrentChange when another writer changed the rules since `old` was
    read, RolloutRunning while a rollout holds a candidate. `who` and `action` go into the
    history record; the last `keep` revisions are kept.
    """
    return stage_change(store, new, old, expect_revision, _flip, who=who, action=action, keep=keep)


# What makes a staged generation count: the flip, or parking it as a rollout's candidate.
# Called with (store, the pointer read, the generation, its staging marker's mod revision).
Finish = Callable[[Store, "Pointer", str, int], None]


def stage_change(
    store: Store,
    new: RuleSet,
    old: RuleSet,
    expect_revision: int,
    finish: Finish,
    *,
    who: str,
    action: str,
    keep: int,
) -> int:
    """Stage `new` as a generation and `finish` it; the revision number it is (or will be
    when promoted), 0 when nothing changed."""
    created, configured, deleted = _changes(new, old)
    if not (created or configured or deleted):
        return 0
    pointer = read_pointer(store)
    if pointer.mod_revision != expect_revision:
        raise _conflict(expect_revision)
    base = set()
    if pointer.generation not in ("", LEGACY):
        base = set(read_generation(store, pointer.generation).chunks)
    chunks = _chunks(new)
    record = {
        "at": time.time(),
        "who": who,
        "action": action,
        "created": created,
        "configured": configured,
        "deleted": deleted,
    }
    generation = secrets.token_hex(8)
    lease = store.lease(STAGING_TTL)
    try:
        values = {chunk: value for chunk, (value, _) in chunks.items()}
        marker = stage(store, generation, values, base, record, lease)
        finish(store, pointer, generation, marker)
        _decoded.keep({chunk: members for chunk, (_, members) in chunks.items()})
    finally:
        housekeeping(lease.revoke)  # the marker is gone when finished; this frees the lease
    housekeeping(lambda: collect(store, keep))
    return pointer.revision + 1


def stage(
    store: Store,
    generation: str,
    chunks: dict[str, bytes],
    base: set[str],
    record: dict[str, Any],
    lease: Lease,
) -> int:
    """Write a generation where no reader looks: its marker (on `lease`), the chunks that
    `base` (the current generation's) lacks, then its record. Returns the marker's mod
    revision, which the flip compares."""
    marker = store.put(STAGING + generation, b"", lease)
    store.put(STAGING_GUARD, generation)
    store.txn_batches({CHUNKS + h: v for h, v in chunks.items() if h not in base}, [])
    store.put(GENERATIONS + generation, compact_json({"chunks": sorted(chunks), **record}))
    return marker


def _flip(store: Store, pointer: Pointer, generation: str, marker: int) -> None:
    """The one transaction that makes `generation` current; on a lost race the staged record
    is removed at once (its chunks wait for collection)."""
    flipped = store.txn(
        flip_puts(pointer, generation),
        [STAGING + generation],
        {REVISION_KEY: pointer.mod_revision, STAGING + generation: marker, CANDIDATE_KEY: 0},
    )
    if not flipped:
        lost_race(store, pointer, generation)


def lost_race(store: Store, pointer: Pointer, generation: str) -> None:
    """Why a guarded finish of a staged generation failed, raised; the staged record is
    removed at once (its chunks wait for collection)."""
    store.txn({}, [GENERATIONS + generation, STAGING + generation])
    if store.mod_revision(REVISION_KEY) != pointer.mod_revision:
        raise _conflict(pointer.mod_revision)
    if store.mod_revision(CANDIDATE_KEY):
        raise RolloutRunning()
    raise StoreError(
        f"the apply was not made current within {STAGING_TTL} s of staging it, so its staged "
        "rules expired; nothing changed, retry"
    )


def flip_puts(pointer: Pointer, generation: str) -> dict[str, bytes]:
    """The puts that make `generation` the revision after `pointer`'s."""
    revision = pointer.revision + 1
    return {
        REVISION_KEY: compact_json({"revision": revision, "generation": generation}),
        f"{HISTORY}{revision:010d}": generation.encode(),
    }


def _conflict(expect_revision: int) -> ConcurrentChange:
    return ConcurrentChange(
        f"rules changed concurrently (they were read at rules revision {expect_revision}); retry"
    )


def collect(store: Store, keep: int) -> None:
    """Remove revisions beyond the last `keep`, and generations and chunks that nothing kept
    refers to, in batches. A staging that starts meanwhile stops it (its deletes compare
    STAGING_GUARD); what is left is collected next time."""
    guard = store.mod_revision(STAGING_GUARD)
    keys = store.keys(RULES)  # one read: a staged generation here has its marker here too
    live = {key[len(STAGING) :] for key in keys if key.startswith(STAGING)}
    history = sorted(key for key in keys if key.startswith(HISTORY))
    kept = history[-keep:] if keep > 0 else []
    kept_generations = {value.decode() for value in store.get_many(kept).values()}
    # The candidate before the pointer: a promotion between the two reads then shows its
    # generation in one or the other (promotions also rewrite STAGING_GUARD).
    candidate = store.get(CANDIDATE_KEY)
    if candidate is not None:  # a rollout's candidate is kept while it runs
        kept_generations.add(decode_rollout(candidate).generation)
    kept_generations.add(read_pointer(store).generation)
    deletes = history[: len(history) - len(kept)]
    if LEGACY not in kept_generations:  # upgraded: the old layout's rules are history now
        deletes += [key for key in keys if key.split("/")[1] in KINDS]
    deletes += [
        key
        for key in keys
        if key.startswith(GENERATIONS) and key[len(GENERATIONS) :] not in kept_generations | live
    ]
    if not live:  # a staging in flight may be reusing any chunk: leave them all
        records = store.get_many([GENERATIONS + g for g in sorted(kept_generations) if g])
        used = {CHUNKS + h for value in records.values() for h in json.loads(value)["chunks"]}
        deletes += [key for key in keys if key.startswith(CHUNKS) and key not in used]
    if deletes:
        store.txn_batches({}, deletes, {STAGING_GUARD: guard})


def read_pointer(store: Store) -> Pointer:
    value, mod_revision, _ = store.entry(REVISION_KEY)
    return _pointer(value, mod_revision)


def _pointer(value: bytes | None, mod_revision: int) -> Pointer:
    if value is None:
        return Pointer(0, "", 0)
    if value == b"":  # the marker of the layout before generations: its rules are current
        return Pointer(0, LEGACY, mod_revision)
    try:
        data = json.loads(value)
        return Pointer(int(data["revision"]), str(data["generation"]), mod_revision)
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"etcd key {PREFIX}{REVISION_KEY} does not hold a rules pointer") from exc


class _Collected(StoreError):
    """A generation or chunk a read needs is gone: collected since the pointer was read."""


def read_generation(store: Store, generation: str) -> Generation:
    value = store.get(GENERATIONS + generation)
    if value is None:
        raise _Collected(f"etcd key {PREFIX}{GENERATIONS}{generation} is missing")
    try:
        record = json.loads(value)
        return Generation(tuple(record.pop("chunks")), record)
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"etcd key {PREFIX}{GENERATIONS}{generation} is not a generation") from exc


def generation_documents(store: Store, generation: str) -> list[tuple[str, Any]]:
    """(etcd key, document) of every rule of a generation, as stored (not yet checked)."""
    chunks = read_generation(store, generation).chunks
    fetched = _fetch(store, chunks)
    return [(CHUNKS + chunk, doc) for chunk in chunks for doc in fetched[chunk]]


def _fetch(store: Store, chunks: tuple[str, ...] | list[str]) -> dict[str, list[Any]]:
    """The documents of each chunk, read from etcd; _Collected when one is gone."""
    values = store.get_many([CHUNKS + chunk for chunk in chunks])
    fetched = {}
    for chunk in chunks:
        key = CHUNKS + chunk
        if key not in values:
            raise _Collected(f"etcd key {PREFIX}{key} is missing")
        fetched[chunk] = _chunk_documents(key, values[key])
    return fetched


def _chunk_documents(key: str, value: bytes) -> list[Any]:
    try:
        documents = json.loads(value)
    except ValueError as exc:
        raise StoreError(f"etcd key {PREFIX}{key} does not hold rules: {exc}") from exc
    if not isinstance(documents, list):
        raise StoreError(f"etcd key {PREFIX}{key} does not hold rules: not a list")
    return documents


class _Decoded:
    """Chunks decoded lately, by hash. A chunk never changes, so a hit is always right: a
    read (an apply's, a get's, a watch's) decodes only the chunks that changed since the
    last one (all 10,000 rules: 0.75 s). Holds the chunks of the last few generations."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._chunks: dict[str, tuple[Rule, ...]] = {}
        self._lock = threading.Lock()

    def get(self, chunk: str) -> tuple[Rule, ...] | None:
        return self._chunks.get(chunk)

    def keep(self, decoded: dict[str, tuple[Rule, ...]]) -> None:
        with self._lock:
            for chunk, rules in decoded.items():
                self._chunks.pop(chunk, None)
                self._chunks[chunk] = rules  # the newest last
            while len(self._chunks) > self._size:
                del self._chunks[next(iter(self._chunks))]


_decoded = _Decoded(4 * BUCKETS)


def generation_rules(store: Store, generation: str) -> RuleSet:
    """The RuleSet of a generation; chunks decoded lately are not read again."""
    if not generation:
        return RuleSet.empty()
    if generation == LEGACY:
        items, _ = store.get_prefix(RULES)
        legacy = [(key, value) for key, value in items.items() if key.split("/")[1] in KINDS]
        return RuleSet.empty().with_rules(
            decode_rule(key, _legacy_document(key, value)) for key, value in legacy
        )
    chunks = read_generation(store, generation).chunks
    cached = {chunk: _decoded.get(chunk) for chunk in chunks}
    fetched = _fetch(store, [chunk for chunk, rules in cached.items() if rules is None])
    decoded = {
        chunk: rules
        if rules is not None
        else tuple(decode_rule(CHUNKS + chunk, doc) for doc in fetched[chunk])
        for chunk, rules in cached.items()
    }
    _decoded.keep(decoded)
    return RuleSet.empty().with_rules(rule for rules in decoded.values() for rule in rules)


def _legacy_document(key: str, value: bytes) -> object:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise StoreError(f"etcd key {PREFIX}{key} does not hold a valid rule: {exc}") from exc


def decode_rule(key: str, document: object) -> Rule:
    """A stored rule; StoreError names the key if it holds something else."""
    where = f"etcd key {PREFIX}{key}"
    try:
        return from_document(document, where)
    except RuleError as exc:
        raise StoreError(f"{where} does not hold a valid rule: {exc}") from exc


def _chunks(rules: RuleSet) -> dict[str, tuple[bytes, tuple[Rule, ...]]]:
    """hash -> (chunk, its rules): the rules' canonical documents, bucketed by kind/name."""
    buckets: dict[int, list[Rule]] = {}
    for rule in rules.all():
        bucket = zlib.crc32(rule_label(rule).encode()) % BUCKETS
        buckets.setdefault(bucket, []).append(rule)
    chunks = {}
    for members in buckets.values():
        members.sort(key=lambda rule: (rule.kind, rule.name))
        value = compact_json([to_document(rule) for rule in members])
        chunks[hashlib.sha256(value).hexdigest()] = (value, tuple(members))
    return chunks


def _changes(new: RuleSet, old: RuleSet) -> tuple[list[str], list[str], list[str]]:
    """The rules created, configured and deleted from `old` to `new`, as 'Kind/name'."""
    created, configured = [], []
    for rule in new.all():
        before = old.get(rule.kind, rule.name)
        if before is None:
            created.append(rule_label(rule))
        elif before != rule:
            configured.append(rule_label(rule))
    deleted = [rule_label(r) for r in old.all() if new.get(r.kind, r.name) is None]
    return created, configured, deleted


def compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def housekeeping(step: Callable[[], object]) -> None:
    """Housekeeping after the change is made (or refused): a failure is logged, not raised."""
    try:
        step()
    except StoreError as exc:
        _log.warning("rules housekeeping failed (retried after the next apply): %s", exc)


@dataclass(frozen=True)
class Candidate:
    """A rollout's candidate rules, as the watch hands them over."""

    rollout: Rollout
    rules: RuleSet


# (current rules, the candidate of a rollout in progress or None)
RulesCallback = Callable[[RuleSet, Candidate | None], None]


@dataclass(frozen=True)
class _Watched:
    rules: RuleSet
    generation: str
    candidate: Candidate | None = None


def watch_rules(store: Store, callback: RulesCallback) -> Callable[[], None]:
    """Call `callback` with the current rules (and a rollout's candidate) now and after each
    change.

    Only the pointer and the candidate are watched, so each call is one whole generation;
    a promotion (both change in one revision) is one call. Returns a cancel function. If the
    watch breaks (etcd restarted, history compacted) the rules are read again, passed to
    `callback`, and watched from there, retrying until etcd answers or the watch is
    cancelled. Callbacks come from one thread at a time; keep them short. StoreError if etcd
    does not answer the first read.
    """

    def read(store: Store) -> tuple[_Watched, int]:
        rules, pointer, read_at = _read_current(store)
        value, _ = store.get_versioned(CANDIDATE_KEY)
        return _Watched(rules, pointer.generation, _candidate(store, value)), read_at

    def fold(state: _Watched, batch: list[Change]) -> _Watched:
        for change in batch:
            state = _followed(store, state, change)
        return state

    delivered: list[_Watched] = []

    def deliver(state: _Watched, _: object) -> None:
        if delivered and delivered[0] is state:  # e.g. the staging guard moved
            return
        delivered[:] = [state]
        callback(state.rules, state.candidate)

    return Follower(store, WATCHED, read, fold, deliver).start()


def decode_rollout(value: bytes) -> Rollout:
    """The rollout a candidate key holds; StoreError naming the key if it holds another thing."""
    try:
        return Rollout.from_json(json.loads(value))
    except (ValueError, KeyError, TypeError, RuleError) as exc:
        where = f"etcd key {PREFIX}{CANDIDATE_KEY}"
        raise StoreError(f"{where} does not hold a rollout: {exc}") from exc


def _candidate(store: Store, value: bytes | None) -> Candidate | None:
    """The candidate a key holds; one that cannot be read is logged and followed as none
    (`tasklane rollout abort` removes it), so the current rules are still served."""
    if value is None:
        return None
    try:
        rollout = decode_rollout(value)
        return Candidate(rollout, generation_rules(store, rollout.generation))
    except StoreError as exc:
        _log.error("the rollout's candidate is ignored: %s", exc)
        return None


def _followed(store: Store, state: _Watched, change: Change) -> _Watched:
    """The state after a flip or a rollout's start or end; a change that cannot be read is
    logged and skipped rather than stopping every later update (a broken watch re-reads
    everything)."""
    try:
        if change.key == CANDIDATE_KEY:
            return replace(state, candidate=_candidate(store, change.value))
        if change.key != REVISION_KEY:
            return state
        pointer = _pointer(change.value, change.revision)
        if pointer.generation == state.generation:
            return state
        rules = generation_rules(store, pointer.generation)
        return replace(state, rules=rules, generation=pointer.generation)
    except (StoreError, ValueError, KeyError, TypeError) as exc:
        _log.warning("ignoring a change of the rules: %s", exc)
        return state
