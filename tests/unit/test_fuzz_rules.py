"""A hypothesis fuzz of the rule loader: whatever the text, `read_texts` plus `validate.apply`
either succeed or raise a RuleError of one line per problem naming the file; never another
exception, and never slowly (alias bombs, deep nesting and huge scalars included)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.errors import RuleError
from controlplane.model import RuleSet, apply, load_files, load_text, read_texts

RULES = Path(__file__).resolve().parents[1] / "rules"
GOOD_TEXT = (RULES / "good" / "fund-yield.yaml").read_text(encoding="utf-8")
FILE = "fuzz.yaml"

# No wall-clock deadline: check() bounds each input's CPU time, which other processes on a
# loaded machine do not stretch.
FUZZ = settings(
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)

KEYS = [
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "labels",
    "spec",
    "protocol",
    "groups",
    "minReplicas",
    "maxReplicas",
    "hops",
    "service",
    "group",
    "dye",
    "header",
    "baggageKey",
    "values",
    "fallback",
    "weight",
    "rateLimit",
    "requestsPerSecond",
    "burst",
    "chain",
    "schedule",
    "timezone",
    "expectedDuration",
    "replicas",
    "extra",
]
WORDS = [
    "tasklane.io/v1",
    "tasklane.io/v2",
    "Service",
    "TaskChain",
    "ScheduledTask",
    "fund-facade",
    "account-svc",
    "nav-pricing",
    "fund-yield",
    "task",
    "default",
    "strict",
    "loose",
    "http",
    "grpc",
    "x-task-dye",
    "fund-yield@*",
    "*",
    "0 2 * * *",
    "61 * * * *",
    "Asia/Shanghai",
    "Mars/Olympus",
    "7h",
    "0s",
    "",
]


@pytest.fixture(scope="module")
def stored() -> RuleSet:
    return apply(RuleSet.empty(), load_files([RULES / "good"]))


def scalars() -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(WORDS),
        st.text(max_size=20),
        st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=5),
    )


def values() -> st.SearchStrategy[object]:
    return st.recursive(
        scalars(),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
        ),
        max_leaves=25,
    )


@st.composite
def documents(draw: st.DrawFn) -> object:
    """Rule-shaped documents: the real top level with random (but key-aware) insides."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values())
    document: dict[str, object] = {
        "apiVersion": draw(st.sampled_from(["tasklane.io/v1", "tasklane.io/v1", "v1", 1])),
        "kind": draw(st.sampled_from(["Service", "TaskChain", "ScheduledTask", "Pod", None])),
        "metadata": draw(
            st.one_of(
                st.fixed_dictionaries({"name": st.sampled_from(WORDS[5:12])}),
                values(),
            )
        ),
        "spec": draw(values()),
    }
    for key in draw(st.lists(st.sampled_from(list(document)), max_size=2)):
        document.pop(key, None)
    return document


def dump(docs: list[object]) -> str:
    return yaml.safe_dump_all(docs, allow_unicode=True, sort_keys=False)


def check(stored: RuleSet, text: str) -> None:
    """The property: success, or a RuleError of one line per problem, each naming the file,
    quickly (in CPU time: on a loaded machine wall time also counts other
    processes' turns)."""
    started = time.process_time()
    try:
        apply(stored, *read_texts([(FILE, text)]))
    except RuleError as error:
        lines = str(error).split("\n")
        assert "\r" not in str(error) and all(lines), lines
        # A problem of the file's own documents names them; a stored rule the file broke is
        # named "stored <Kind> <name>", with the document that broke it (model/validate.py).
        assert all(
            line.startswith(f"{FILE}:")
            or (line.startswith("stored ") and f"(changed by {FILE}: " in line)
            for line in lines
        ), lines
    assert time.process_time() - started < 2.0


@FUZZ
@given(docs=st.lists(documents(), min_size=1, max_size=3))
def test_generated_documents(stored: RuleSet, docs: list[object]) -> None:
    check(stored, dump(docs))


def _mutations(text: str) -> st.SearchStrategy[str]:
    at = st.integers(0, len(text))
    return st.one_of(
        at.map(lambda i: text[:i]),  # truncation
        st.tuples(at, st.binary(min_size=1, max_size=8)).map(  # non-UTF-8 bytes
            lambda t: text[: t[0]] + t[1].decode("utf-8", "surrogateescape") + text[t[0] :]
        ),
        st.tuples(at, st.text(st.characters(max_codepoint=0x9F), min_size=1, max_size=4)).map(
            lambda t: text[: t[0]] + t[1] + text[t[0] :]  # control characters
        ),
        st.tuples(at, st.sampled_from(["\ufeff", "\ud800", "\x00", "\x85", "\u2028", "\t"])).map(
            lambda t: text[: t[0]] + t[1] + text[t[0] :]
        ),
        st.tuples(at, at).map(lambda t: text[: min(t)] + text[max(t) :]),  # a cut
    )


@FUZZ
@given(data=st.data())
def test_mutated_good_text(stored: RuleSet, data: st.DataObject) -> None:
    text = GOOD_TEXT
    for _ in range(data.draw(st.integers(1, 3))):
        text = data.draw(_mutations(text))
    check(stored, text)


def _nested(depth: int, opener: str, closer: str) -> str:
    return opener * depth + closer * depth


@settings(deadline=None, max_examples=15, derandomize=True)
@given(
    depth=st.integers(1, 3000),
    shape=st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]),
    where=st.sampled_from(["spec", "metadata", "top"]),
)
def test_deep_nesting(stored: RuleSet, depth: int, shape: tuple[str, str], where: str) -> None:
    opener, closer = shape
    if opener == "- ":  # block sequences nest by indentation
        depth = min(depth, 2000)
        inner = "\n".join(" " * (2 * i) + "-" for i in range(depth)) + " x"
    else:
        inner = _nested(depth, opener, closer)
    if where == "top":
        text = inner
    else:
        text = (
            "apiVersion: tasklane.io/v1\nkind: TaskChain\n"
            + ("metadata: " if where == "metadata" else "metadata: {name: c}\nspec: ")
            + ("\n" + inner if opener == "- " else inner)
            + "\n"
        )
    check(stored, text)


def _alias_bomb(levels: int, fanout: int, where: str) -> str:
    """`levels` anchors, each a list of `fanout` aliases of the previous one (fanout**levels
    leaves if expanded), defined at `where` in a rule and referred to by the rest of it."""
    defs = ["&a0 [lol]"] + [
        f"&a{level} [{', '.join(f'*a{level - 1}' for _ in range(fanout))}]"
        for level in range(1, levels)
    ]
    top = f"*a{levels - 1}"
    head = "apiVersion: tasklane.io/v1\n"
    if where == "top":
        return "".join(f"k{i}: {d}\n" for i, d in enumerate(defs))
    if where == "hops":
        items = "".join(f"    - {d}\n" for d in defs)
        return f"{head}kind: TaskChain\nmetadata: {{name: b}}\nspec:\n  hops:\n{items}" + (
            f"  dye: {{values: {top}}}\n"
        )
    if where == "dye":
        items = "".join(f"      - {d}\n" for d in defs)
        return (
            f"{head}kind: TaskChain\nmetadata: {{name: b}}\nspec:\n  dye:\n    values:\n"
            f"{items}  hops: {top}\n"
        )
    if where == "labels":
        items = "".join(f"    k{i}: {d}\n" for i, d in enumerate(defs))
        return f"{head}kind: TaskChain\nmetadata:\n  name: b\n  labels:\n{items}spec: {top}\n"
    items = "".join(f"    k{i}: {d}\n" for i, d in enumerate(defs))
    return (
        f"{head}kind: ScheduledTask\nmetadata: {{name: t}}\nspec:\n  chain: fund-yield\n"
        f"  schedule: '0 2 * * *'\n  expectedDuration: 1h\n  replicas:\n{items}"
    )


BOMB_PLACES = ["top", "hops", "dye", "labels", "replicas"]


@settings(deadline=None, max_examples=60, derandomize=True)
@given(
    levels=st.integers(2, 12),
    fanout=st.integers(2, 10),
    where=st.sampled_from(BOMB_PLACES),
)
def test_alias_bombs_are_quick(stored: RuleSet, levels: int, fanout: int, where: str) -> None:
    check(stored, _alias_bomb(levels, fanout, where))


@pytest.mark.parametrize("where", BOMB_PLACES)
def test_billion_laughs(stored: RuleSet, where: str) -> None:
    """The classic: 10 levels of 10 aliases, 10**9 leaves if expanded."""
    check(stored, _alias_bomb(10, 10, where))


@pytest.mark.parametrize(
    "text",
    [
        "apiVersion: tasklane.io/v1\nkind: TaskChain\nmetadata: {name: " + "n" * 2_000_000 + "}\n",
        "apiVersion: tasklane.io/v1\nkind: TaskChain\nmetadata: {name: c}\n"
        "spec: {dye: {values: [" + "d" * 2_000_000 + "]}, hops: [{service: a, group: task}]}\n",
        "k: " + "9" * 100_000 + "\n",
        "k: " + "'" + "x" * 3_000_000 + "'\n",
        "k: |\n" + "  line\n" * 200_000,
        "- " * 3 + "x" * 1_000_000,
    ],
    ids=["name", "dye", "integer", "quoted", "block", "sequence"],
)
def test_huge_scalars(stored: RuleSet, text: str) -> None:
    started = time.monotonic()
    try:
        apply(stored, load_text(text, FILE))
    except RuleError as error:
        assert "\n" not in str(error)
        assert str(error).startswith(f"{FILE}:")
        assert len(str(error)) < 2000, "a refusal quotes a bounded part of the input"
    assert time.monotonic() - started < 10.0
