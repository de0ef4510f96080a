"""Quoting user input inside one-line error messages.

Every RuleError must stay on one line and readable whatever a rule file contains, so any
user-written value goes through these helpers before it reaches a message.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

_MAX_SHOWN = 60
# difflib's ratio from which a name counts as a likely typo of another (its default, 0.6,
# also matches unrelated short names such as 'task' and 'fast').
_CLOSE = 0.75


def quote(text: str) -> str:
    """A user string quoted and escaped (no newline survives), cut when long."""
    shown = text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."
    return repr(shown)


def describe(value: object) -> str:
    """What a YAML value is, for "expected X, got Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}" if abs(value) < 10**18 else "a very large integer"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {quote(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {quote(str(value))}"


def byte_size(size: int) -> str:
    """A byte count for messages about sizes: "512 bytes", "220 KiB", "3.1 MiB"."""
    if size < 1024:
        return f"{size} bytes"
    if size < 2**20:
        return f"{size / 1024:.0f} KiB"
    return f"{size / 2**20:.1f} MiB"


def did_you_mean(word: object, options: Iterable[str]) -> str:
    """' (did you mean TaskChain?)' when `word` is close to one of `options` (case aside), else
    '': a typo is the usual cause of an unknown name, and a round trip per guess is slow."""
    if not isinstance(word, str) or not word:
        return ""
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=_CLOSE)
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""
