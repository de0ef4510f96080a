"""A staged rollout in etcd: its candidate generation, and how it ends.

Starting one stages the new rules exactly like an apply (store/rules.py), then *parks* the
generation under CANDIDATE_KEY instead of flipping the pointer to it, in one transaction
guarded by the pointer (nothing changed since the rules were read) and by the candidate key
(no other rollout runs). Promotion is the flip, made in one transaction with the candidate's
removal, so a watch sees both at once; abort removes the candidate. Either outcome is kept
under LAST_KEY for `tasklane rollout status`. Every step is guarded by the candidate's mod
revision, so when several replicas judge the same rollout, one ends it and the others' calls
change nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from controlplane.errors import StoreError
from controlplane.model.rollout import ABORTED, PROMOTED, Rollout
from controlplane.model.rules import RuleSet
from controlplane.store.etcd import Store
from controlplane.store.rules import (
    CANDIDATE_KEY,
    DEFAULT_HISTORY_LIMIT,
    GENERATIONS,
    REVISION_KEY,
    STAGING,
    STAGING_GUARD,
    ConcurrentChange,
    Pointer,
    collect,
    compact_json,
    decode_rollout,
    flip_puts,
    housekeeping,
    lost_race,
    read_pointer,
    stage_change,
)

LAST_KEY = "meta/rollout-last"


class NoRollout(StoreError):
    """No rollout is in progress (it ended, or never started)."""

    def __init__(self) -> None:
        super().__init__("no rollout is in progress (`tasklane rollout status` shows the last)")


def start_rollout(
    store: Store,
    new: RuleSet,
    old: RuleSet,
    expect_revision: int,
    rollout: Rollout,
    *,
    keep: int = DEFAULT_HISTORY_LIMIT,
) -> Rollout | None:
    """Stage `new` (read against `old` at `expect_revision`) as the candidate of `rollout`
    (its generation, base and revision are filled in here). None when nothing changes.
    ConcurrentChange or RolloutRunning when the guard fails; nothing is left behind."""
    started: list[Rollout] = []

    def park(store: Store, pointer: Pointer, generation: str, marker: int) -> None:
        parked = replace(
            rollout, generation=generation, base=pointer.mod_revision, revision=pointer.revision + 1
        )
        if not store.txn(
            {CANDIDATE_KEY: compact_json(parked.to_json())},
            [STAGING + generation],
            {REVISION_KEY: pointer.mod_revision, STAGING + generation: marker, CANDIDATE_KEY: 0},
        ):
            lost_race(store, pointer, generation)
        started.append(parked)

    action = f"apply --canary {rollout.percent}%"
    stage_change(store, new, old, expect_revision, park, who=rollout.who, action=action, keep=keep)
    return started[0] if started else None


def read_rollout(store: Store) -> tuple[Rollout, int] | None:
    """The rollout in progress and its candidate key's mod revision (what ending it compares)."""
    value, mod_revision = store.get_versioned(CANDIDATE_KEY)
    if value is None:
        return None
    return decode_rollout(value), mod_revision


def last_outcome(store: Store) -> dict[str, Any] | None:
    """How the last rollout ended: {"outcome", "reason", "by", "at", "rollout"}."""
    value = store.get(LAST_KEY)
    return None if value is None else json.loads(value)


def promote(
    store: Store, reason: str, by: str, expect: str | None = None, keep: int = DEFAULT_HISTORY_LIMIT
) -> Rollout:
    """Make the candidate current (a new revision); `expect` (a candidate's generation, as a
    judge saw it) ends only that rollout. NoRollout when it is gone."""
    rollout, mod_revision = _current(store, expect)
    pointer = read_pointer(store)
    puts = flip_puts(pointer, rollout.generation)
    puts[LAST_KEY] = _outcome(rollout, PROMOTED, reason, by)
    puts[STAGING_GUARD] = rollout.generation.encode()  # a collection under way stops
    guard = {CANDIDATE_KEY: mod_revision, REVISION_KEY: rollout.base}
    if not store.txn(puts, [CANDIDATE_KEY], guard):
        if store.mod_revision(CANDIDATE_KEY) != mod_revision:
            raise NoRollout()
        raise ConcurrentChange(
            f"the rules changed under the rollout (it was staged on rules revision "
            f"{rollout.base}); abort it and start again"
        )
    housekeeping(lambda: collect(store, keep))
    return rollout


def abort(
    store: Store, reason: str, by: str, expect: str | None = None, keep: int = DEFAULT_HISTORY_LIMIT
) -> Rollout | None:
    """Drop the candidate: every sidecar goes back to the current rules. NoRollout when gone.
    A candidate key that holds no rollout is removed too (None), unless `expect` names one."""
    value, mod_revision = store.get_versioned(CANDIDATE_KEY)
    if value is None:
        raise NoRollout()
    try:
        rollout = decode_rollout(value)
    except StoreError:
        if expect is not None or not store.txn({}, [CANDIDATE_KEY], {CANDIDATE_KEY: mod_revision}):
            raise
        return None
    if expect is not None and rollout.generation != expect:
        raise NoRollout()
    puts = {LAST_KEY: _outcome(rollout, ABORTED, reason, by)}
    deletes = [CANDIDATE_KEY, GENERATIONS + rollout.generation]
    if not store.txn(puts, deletes, {CANDIDATE_KEY: mod_revision}):
        raise NoRollout()
    housekeeping(lambda: collect(store, keep))
    return rollout


def _current(store: Store, expect: str | None) -> tuple[Rollout, int]:
    found = read_rollout(store)
    if found is None or (expect is not None and found[0].generation != expect):
        raise NoRollout()
    return found


def _outcome(rollout: Rollout, outcome: str, reason: str, by: str) -> bytes:
    return compact_json(
        {
            "outcome": outcome,
            "reason": reason,
            "by": by,
            "at": time.time(),
            "rollout": rollout.to_json(),
        }
    )
