"""Reading rule files: YAML streams of documents into rules that remember where they came from.

Every failure, whatever the bytes, is a one-line problem that names the file and the
document ("rules.yaml: document 2: YAML syntax error at line 14, column 3: ..."), because
this is what `tasklane apply` prints; a file's every broken document is reported, not only
the first (a YAML syntax error ends what can be read of its file).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.errors import RuleError, rule_errors
from controlplane.model.rules import KINDS, Rule, from_document
from controlplane.model.text import quote

RULE_SUFFIXES = (".yaml", ".yml")

_DOCUMENT_START = re.compile(r"---(?:[ \t]|$)")

Key = tuple[str, str]  # (kind, name)


@dataclass(frozen=True)
class Parsed:
    """A rule plus its origin, so later checks can point at the document that is wrong."""

    rule: Rule
    file: str
    document: int  # 1-based; empty documents count too

    @property
    def kind(self) -> str:
        return self.rule.kind

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def where(self) -> str:
        """'rules.yaml: document 3 (TaskChain fund-yield)': the start of every message."""
        return f"{self.file}: document {self.document} ({self.kind} {self.name})"


@dataclass
class Unread:
    """The documents of rule files that are no rule: one problem line each, and the (kind,
    name) each meant, so that rules referring to them are not also told they are missing."""

    problems: list[str] = field(default_factory=list)
    claimed: set[Key] = field(default_factory=set)
    complete: bool = True  # False: a YAML syntax error hid the rest of a file

    def add(self, problem: str, doc: object = None) -> None:
        self.problems.append(problem)
        key = _claim(doc)
        if key is not None:
            self.claimed.add(key)


def _claim(doc: object) -> Key | None:
    """The (kind, name) a document that failed its checks meant to define, if it says."""
    if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
        return None
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return (doc["kind"], name) if isinstance(name, str) else None


def load_files(paths: list[Path]) -> list[Parsed]:
    """Load rule files in order; a directory stands for its *.yaml and *.yml files, sorted
    by name (not recursive, like `kubectl apply -f DIR`). RuleError names every problem."""
    files: list[tuple[str, str]] = []
    for path in paths:
        for file in _expand(path):
            try:
                data = file.read_bytes()
            except OSError as error:
                raise RuleError(f"{file}: cannot read: {error.strerror or error}") from None
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as error:
                raise RuleError(f"{file}: not UTF-8 text (byte {error.start})") from None
            files.append((str(file), text))
    parsed, unread = read_texts(files)
    if unread.problems:
        raise rule_errors(unread.problems)
    return parsed


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in RULE_SUFFIXES and p.is_file())
        if not files:
            raise RuleError(f"{path}: no *.yaml or *.yml files in this directory")
        return files
    if not path.exists():
        raise RuleError(f"{path}: no such file or directory")
    return [path]


def load_text(text: str, filename: str) -> list[Parsed]:
    """Load every non-empty document of one YAML stream; `filename` is used in messages.
    RuleError names every document that is no rule."""
    parsed, unread = read_texts([(filename, text)])
    if unread.problems:
        raise rule_errors(unread.problems)
    return parsed


def read_rules(files: list[tuple[str, str]]) -> tuple[list[Parsed], Unread]:
    """read_texts() of what an apply (or `tasklane validate`) was given: RuleError when the
    files hold no document at all."""
    parsed, unread = read_texts(files)
    if not parsed and not unread.problems:
        raise RuleError(f"no rules in {', '.join(name for name, _ in files)}")
    return parsed, unread


def read_texts(files: Iterable[tuple[str, str]]) -> tuple[list[Parsed], Unread]:
    """The rules of (name, text) files, and what is wrong with the documents that are none:
    every problem is collected, so a user fixes a file in one round trip."""
    parsed: list[Parsed] = []
    unread = Unread()
    for filename, text in files:
        documents = yaml_documents(text, filename)
        while True:
            try:
                number, doc = next(documents)
            except StopIteration:
                break
            except RuleError as error:  # YAML syntax: nothing after it can be read
                unread.add(str(error))
                unread.complete = False
                break
            if doc is None:
                continue
            try:
                parsed.append(
                    Parsed(from_document(doc, f"{filename}: document {number}"), filename, number)
                )
            except RuleError as error:
                unread.add(str(error), doc)
    return parsed, unread


def yaml_documents(text: str, filename: str) -> Iterator[tuple[int, object]]:
    """(number, data) per document, data None for an empty one; a RuleError naming the file
    and document for YAML that cannot be read (syntax, depth, aliases: see _Loader).

    libyaml reads a 10,000-document file about 8x faster than the pure-Python parser (1 s
    against 8.6 s here), so it reads first; text it refuses or doubts (see _FastChecks), or
    that holds characters the Python reader refuses up front, is read again by the Python
    parser, whose messages are the ones users see. One verdict differs: libyaml takes nesting
    up to its limit of 1,000 levels, where the Python parser's recursion may stop sooner; the
    rule's own checks then refuse such a document, in one line as well.
    """
    if _FAST is not None and not yaml.reader.Reader.NON_PRINTABLE.search(text):
        try:
            documents = list(_read(_FAST(text)))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            if getattr(error, "problem", None) == _LIBYAML_TOO_DEEP and mark is not None:
                # The Python parser would recurse into it for ~1 s of CPU to say the same.
                number = _document_at(text, mark.line, mark.column)
                raise RuleError(f"{filename}: document {number}: {_TOO_DEEP}") from None
        except (RecursionError, ValueError, LookupError, TypeError, _Unsure):
            pass
        else:
            yield from documents
            return
    completed = 0
    try:
        loader = _Loader(text)
    except yaml.YAMLError as error:  # the reader refuses control characters up front
        raise _syntax_error(error, text, filename, completed) from None
    try:
        for completed, data in _read(loader):
            yield completed, data
    except yaml.YAMLError as error:
        raise _syntax_error(error, text, filename, completed) from None
    except RecursionError:
        raise RuleError(f"{filename}: document {completed + 1}: {_TOO_DEEP}") from None


def _syntax_error(error: yaml.YAMLError, text: str, filename: str, completed: int) -> RuleError:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None)
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position)
        column = error.position - (text.rfind("\n", 0, error.position) + 1)
        problem = f"unacceptable character #x{error.character:04x}: {error.reason}"
    elif mark is not None:
        line, column = mark.line, mark.column
    else:  # PyYAML always marks its errors; keep a message if one day it does not
        return RuleError(f"{filename}: YAML syntax error: {quote(str(error))}")
    number = max(_document_at(text, line, column), completed, 1)
    problem_text = " ".join(str(problem).split())
    return RuleError(
        f"{filename}: document {number}: YAML syntax error at line {line + 1}, "
        f"column {column + 1}: {problem_text}"
    )


def _document_at(text: str, line: int, column: int) -> int:
    """Which document a 0-based position is in, by the `---` markers before it.

    The parser may notice an error only after reading ahead into the next document (or
    while finishing the previous one), so counting parsed documents alone can be off by one.
    """
    number = 0
    seen_content = False
    for index, content in enumerate(text.split("\n")[: line + 1]):
        if _DOCUMENT_START.match(content):
            if index == line and column == 0:
                break  # an error at a marker belongs to the document the marker ends
            number += 1
            seen_content = True
        elif not seen_content and content.strip() and not content.lstrip().startswith(("#", "%")):
            number += 1  # content before any marker: an implicit first document
            seen_content = True
    return number


def _read(loader: Any) -> Iterator[tuple[int, object]]:
    try:
        number = 0
        while loader.check_node():
            number += 1
            yield number, loader.construct_document(loader.get_node())
    finally:
        loader.dispose()


class _Checks:
    """Refuses duplicate keys (a second `group:` must not silently win) and turns a bad
    explicitly tagged value (`!!int abc`) into a marked error instead of a raw ValueError or
    KeyError. Mixed into both loaders so they accept the same documents."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: SafeConstructor reports it with its mark
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {quote(str(key))}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc]

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)  # type: ignore[misc]
        except (ValueError, KeyError, TypeError, OverflowError) as error:
            shown = quote(node.value) if isinstance(node.value, str) else "value"
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid {tag} value {shown}", node.start_mark
            ) from error


class _Loader(_Checks, yaml.SafeLoader):
    """The pure-Python loader: the reference for what is accepted and for every message."""


class _Unsure(Exception):
    """The fast loader met something only _Loader may judge (a merge key, a duplicate key)."""


class _FastChecks:
    """What the fast loader adds to libyaml: it gives up, rather than judge, on a mapping with
    a merge key or a duplicate key, leaving both (and their messages) to _Loader. Lighter
    than _Checks, whose per-node wrapper would cost a third of the time saved."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if any(key.tag == _MERGE for key, _ in node.value):
            raise _Unsure
        mapping = super().construct_mapping(node, deep=deep)  # type: ignore[misc]
        if len(mapping) != len(node.value):
            raise _Unsure
        return mapping


_MERGE = "tag:yaml.org,2002:merge"
_TOO_DEEP = "YAML nesting is too deep"
_LIBYAML_TOO_DEEP = "exceeded maximum nesting depth"  # libyaml's limit: 1,000 levels
_FAST = type("_FastLoader", (_FastChecks, yaml.CSafeLoader), {}) if yaml.__with_libyaml__ else None
