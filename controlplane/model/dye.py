"""The dye: its grammar, how it reads in a W3C `baggage` member, and which chain a dye belongs
to. One definition for every part that recognises a dye: the rules (what a value may be),
validation (which values overlap), the sidecars' and the gateway's Lua (translate/baggage.py
reads a member as `member_dye` does) and the accounting (which chain a request's dye names).
The app library `controlplane.propagation` imports nothing of tasklane, so it repeats
`member_dye` in its `_baggage_dye`; tests/unit/test_dye.py holds them to the same answers.

Baggage values are percent-encoded (https://www.w3.org/TR/baggage/#value), and OpenTelemetry
re-encodes what it forwards: its Python propagator quotes every character but letters, digits
and `_.-~` (`urllib.parse.quote_plus`), so the per-run dye `fund-yield@<run id>` leaves an
instrumented app as `fund-yield%40<run id>`. It also keeps a member's properties inside the
value, so `task-dye=x;src=cron` goes on as `task-dye=x%3Bsrc%3Dcron`. A member therefore
carries the dye its value *decodes* to, up to the first `;`. Dyes never contain `%` (the rules
refuse it), so a literal `%` in a member is always the start of an encoding.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from controlplane.model.text import quote

if TYPE_CHECKING:
    from controlplane.model.rules import TaskChain

DEFAULT_DYE_HEADER = "x-task-dye"
DEFAULT_BAGGAGE_KEY = "task-dye"
# Headers the mesh sets itself (e.g. the baggage dye the sidecars read): never a chain's dye.
MESH_HEADER_PREFIX = "x-tasklane-"
# Dyes ride on every request of a task (header and baggage member, which W3C caps at 8 KB).
MAX_DYE_LENGTH = 256
PREFIX_MARK = "*"  # a value written `batch-*` claims every dye starting with `batch-`

# W3C baggage-octet: printable ASCII except space, '"', ',', ';' and '\'.
BAGGAGE_OCTETS = r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]"
_VALUE = re.compile(BAGGAGE_OCTETS + "*")
_OWS = " \t"
# W3C baggage-octets less '%': a dye value must read the same in the header and in the member.
_DYE_CHAR = re.compile(BAGGAGE_OCTETS)


@dataclass(frozen=True)
class Dye:
    """Which requests belong to a chain: header or baggage value, exact or by prefix."""

    header: str
    baggage_key: str
    exact: tuple[str, ...]
    prefixes: tuple[str, ...]  # written with a trailing '*', stored without it

    def written(self) -> list[str]:
        """The values as a rule writes them: exact ones, then prefixes with their '*'."""
        return [*self.exact, *(prefix + PREFIX_MARK for prefix in self.prefixes)]


def value_problem(value: str) -> str | None:
    """Why `value` (as written, a trailing '*' for a prefix) cannot be a dye; None if it can."""
    if not value:
        return "must not be empty"
    if len(value) > MAX_DYE_LENGTH:
        return f"{len(value)} characters; a dye is at most {MAX_DYE_LENGTH}"
    if "%" in value:
        return (
            f"{quote(value)} contains '%', which starts a percent-encoded character in a W3C"
            " baggage value (OpenTelemetry sends '@' as %40), so a dye cannot carry it"
        )
    bad = next((c for c in value if not _DYE_CHAR.fullmatch(c)), None)
    if bad is not None:
        return f"{quote(value)} contains {bad!r}, which a header or baggage value cannot carry"
    if PREFIX_MARK in value.removesuffix(PREFIX_MARK):
        return f"{quote(value)}: '*' is only allowed at the end (a prefix match)"
    if value == PREFIX_MARK:
        return "'*' alone would claim every request; put a prefix before the '*'"
    return None


def member_dye(value: str) -> str | None:
    """The dye a baggage member's value (what follows `key=`) carries, or None when it is not a
    valid baggage value: cut at the first `;`, trimmed of the whitespace W3C allows around it,
    percent-decoded, cut again at the first `;` it decodes to."""
    raw = value.split(";", 1)[0].strip(_OWS)
    if not _VALUE.fullmatch(raw):
        return None
    return unquote(raw).split(";", 1)[0] or None


# ---------------------------------------------------------------- which chain a dye names


class DyeIndex:
    """Which chain a request's dye belongs to, as the routes decide it: the header (exact,
    then the longest prefix), then the baggage member. Validation keeps dyes disjoint."""

    def __init__(self, chains: Mapping[str, TaskChain]) -> None:
        self.exact: dict[str, TaskChain] = {}
        self.prefixes: list[tuple[str, TaskChain]] = []
        self.baggage: dict[str, tuple[dict[str, TaskChain], list[tuple[str, TaskChain]]]] = {}
        for name in sorted(chains):
            chain = chains[name]
            exact, prefixes = self.baggage.setdefault(chain.dye.baggage_key, ({}, []))
            for value in chain.dye.exact:
                exact[value] = chain
                if chain.dye.header == DEFAULT_DYE_HEADER:
                    self.exact[value] = chain
            for value in chain.dye.prefixes:
                prefixes.append((value, chain))
                if chain.dye.header == DEFAULT_DYE_HEADER:
                    self.prefixes.append((value, chain))
        self.prefixes.sort(key=lambda item: -len(item[0]))
        for _, prefixes in self.baggage.values():
            prefixes.sort(key=lambda item: -len(item[0]))

    @staticmethod
    def _lookup(
        value: str, exact: Mapping[str, TaskChain], prefixes: list[tuple[str, TaskChain]]
    ) -> TaskChain | None:
        chain = exact.get(value)
        if chain is not None:
            return chain
        return next((c for prefix, c in prefixes if value.startswith(prefix)), None)

    def chain_of(self, dye: str, baggage: str) -> TaskChain | None:
        """The chain of a request with this x-task-dye and baggage header, or None."""
        if dye:
            chain = self._lookup(dye, self.exact, self.prefixes)
            if chain is not None:
                return chain
        if not baggage:
            return None
        for member in baggage.split(","):
            key, sep, rest = member.partition("=")
            tables = self.baggage.get(key.strip()) if sep else None
            if tables is None:
                continue
            value = member_dye(rest)
            if value is None:
                continue
            chain = self._lookup(value, *tables)
            if chain is not None:
                return chain
        return None


class DyeClaims:
    """Every chain's dye values, indexed so each overlap check costs about the value's length
    rather than the number of chains (a mesh may hold thousands of chains)."""

    def __init__(self, chains: Iterable[TaskChain]) -> None:
        self.exact: dict[str, list[str]] = {}
        self.prefixes: dict[str, list[str]] = {}
        sorted_exact: list[tuple[str, str]] = []
        sorted_prefixes: list[tuple[str, str]] = []
        for chain in chains:
            for value in chain.dye.exact:
                self.exact.setdefault(value, []).append(chain.name)
                sorted_exact.append((value, chain.name))
            for prefix in chain.dye.prefixes:
                self.prefixes.setdefault(prefix, []).append(chain.name)
                sorted_prefixes.append((prefix, chain.name))
        self.sorted_exact = sorted(sorted_exact)
        self.sorted_prefixes = sorted(sorted_prefixes)

    def conflict(self, chain: str, value: str) -> tuple[str, str] | None:
        """(other chain, its value as written) claiming a dye that `value` also claims."""
        if value.endswith(PREFIX_MARK):
            prefix = value[:-1]
            # an exact value or a longer-or-equal prefix of another chain starting with ours
            for other, theirs in self._starting_with(self.sorted_exact, prefix, chain):
                return other, theirs
            for other, theirs in self._starting_with(self.sorted_prefixes, prefix, chain):
                return other, theirs + PREFIX_MARK
            # a shorter prefix of another chain that ours starts with
            return self._prefix_of(prefix, chain, include_full=False)
        for other in self.exact.get(value, []):
            if other != chain:
                return other, value
        return self._prefix_of(value, chain, include_full=True)

    def _prefix_of(self, text: str, chain: str, include_full: bool) -> tuple[str, str] | None:
        """Another chain's prefix that `text` starts with."""
        for length in range(len(text) + (1 if include_full else 0)):
            for other in self.prefixes.get(text[:length], []):
                if other != chain:
                    return other, text[:length] + PREFIX_MARK
        return None

    @staticmethod
    def _starting_with(
        entries: list[tuple[str, str]], prefix: str, chain: str
    ) -> Iterator[tuple[str, str]]:
        """(other chain, value) for entries whose value starts with `prefix`."""
        index = bisect.bisect_left(entries, (prefix, ""))
        while index < len(entries) and entries[index][0].startswith(prefix):
            value, other = entries[index]
            if other != chain:
                yield other, value
            index += 1
