"""The rules' history, read back: one record per revision (when, who, what changed) and the
rules of any revision still kept, for `tasklane history` and `tasklane rollback`.

store/rules.py writes it: every flip adds `rules/history/<N>` naming the generation that
became current, whose record says when, who and what. Those are current etcd keys, kept for
the last `--history-limit` revisions whatever etcd compacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from controlplane.errors import TasklaneError
from controlplane.model.rules import RuleSet
from controlplane.store.etcd import Store
from controlplane.store.rules import (
    GENERATIONS,
    HISTORY,
    generation_documents,
    generation_rules,
    read_generation,
    read_pointer,
)


class RevisionNotKept(TasklaneError):
    """The revision was never made or is older than the history keeps."""


@dataclass(frozen=True)
class Record:
    """One revision: when (epoch seconds), who, the action, and the rules it created,
    configured and deleted ('Kind/name')."""

    revision: int
    at: float
    who: str
    action: str
    created: tuple[str, ...]
    configured: tuple[str, ...]
    deleted: tuple[str, ...]

    def touches(self, kind: str | None, name: str | None) -> bool:
        """Whether the revision changed a rule of `kind` (named `name`), None matching all."""
        return any(
            (kind is None or label.partition("/")[0] == kind)
            and (name is None or label.partition("/")[2] == name)
            for label in (*self.created, *self.configured, *self.deleted)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "at": self.at,
            "who": self.who,
            "action": self.action,
            "created": list(self.created),
            "configured": list(self.configured),
            "deleted": list(self.deleted),
        }


def records(store: Store) -> list[Record]:
    """Every kept revision, oldest first."""
    history, _ = store.get_prefix(HISTORY)
    generations = {key: value.decode() for key, value in history.items()}
    values = store.get_many([GENERATIONS + g for g in generations.values()])
    found = []
    for key, generation in sorted(generations.items()):
        value = values.get(GENERATIONS + generation)
        if value is not None:  # collected between the two reads
            found.append(_record(int(key[len(HISTORY) :]), json.loads(value)))
    return found


def record(store: Store, revision: int) -> Record:
    return _record(revision, read_generation(store, _generation(store, revision)).record)


def revision_documents(store: Store, revision: int) -> list[Any]:
    """The stored documents of a kept revision, as stored (a rollback checks them again)."""
    return [doc for _, doc in generation_documents(store, _generation(store, revision))]


def revision_rules(store: Store, revision: int) -> RuleSet:
    """The rules as they were at a kept revision (empty at revision 0)."""
    return generation_rules(store, _generation(store, revision)) if revision else RuleSet.empty()


def current_revision(store: Store) -> int:
    return read_pointer(store).revision


def _generation(store: Store, revision: int) -> str:
    value = store.get(f"{HISTORY}{revision:010d}") if revision > 0 else None
    if value is None:
        kept = store.keys(HISTORY)
        span = (
            f"revisions {int(kept[0][len(HISTORY) :])}-{int(kept[-1][len(HISTORY) :])} are kept"
            if kept
            else "no revision is kept yet"
        )
        raise RevisionNotKept(f"revision {revision} is not in the history ({span})")
    return value.decode()


def _record(revision: int, data: dict[str, Any]) -> Record:
    return Record(
        revision=revision,
        at=float(data["at"]),
        who=str(data["who"]),
        action=str(data["action"]),
        created=tuple(data["created"]),
        configured=tuple(data["configured"]),
        deleted=tuple(data["deleted"]),
    )
