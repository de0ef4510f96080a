"""Malformed rules are refused with one precise line, never a traceback.

`tests/rules/bad/*.yaml` is a corpus of broken files, each applied on top of the demo rules
(`tests/rules/good`). Its first line says the expected message (`# expect: ...`), its second
the document it must name (`# document: N`). The fuzz tests mangle good documents and text.
"""

from __future__ import annotations

import copy
import random
from datetime import date
from pathlib import Path

import pytest

from controlplane.errors import RuleError
from controlplane.model import (
    RuleSet,
    apply,
    from_document,
    load_files,
    load_text,
    read_texts,
    to_document,
)

RULES = Path(__file__).resolve().parents[1] / "rules"
CORPUS = sorted((RULES / "bad").glob("*.yaml"))


@pytest.fixture(scope="module")
def stored() -> RuleSet:
    return apply(RuleSet.empty(), load_files([RULES / "good"]))


def expectation(path: Path) -> tuple[str, int]:
    first, second = path.read_text(encoding="utf-8").splitlines()[:2]
    assert first.startswith("# expect: ") and second.startswith("# document: "), path
    return first.removeprefix("# expect: "), int(second.removeprefix("# document: "))


def test_corpus_is_large() -> None:
    assert len(CORPUS) >= 35


@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.stem)
def test_bad_file_is_refused_with_its_message(stored: RuleSet, path: Path) -> None:
    expected, document = expectation(path)
    with pytest.raises(RuleError) as caught:
        apply(stored, load_files([path]))
    message = str(caught.value)
    assert "\n" not in message
    assert f"{path}: document {document}" in message
    assert expected in message


def test_message_shape_of_the_brief(stored: RuleSet) -> None:
    path = RULES / "bad" / "ref-unknown-group.yaml"
    with pytest.raises(RuleError) as caught:
        apply(stored, load_files([path]))
    assert str(caught.value) == (
        f"{path}: document 3 (TaskChain fund-ledger): spec.hops[1].group: "
        "service account-svc has no group 'batch' (it has: default, task, debit)"
    )


def test_deep_nesting_is_a_rule_error() -> None:
    with pytest.raises(RuleError, match="r.yaml: document 1: YAML nesting is too deep"):
        load_text("a: " + "[" * 5000 + "]" * 5000, "r.yaml")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: !!int abc\n", "invalid !!int value 'abc'"),
        ("a: !!float x\n", "invalid !!float value 'x'"),
        ("a: !!timestamp 2024-13-45\n", "invalid !!timestamp value '2024-13-45'"),
        ("a: 2024-02-30\n", "invalid !!timestamp value '2024-02-30'"),
        ("a: !foo b\n", "could not determine a constructor for the tag '!foo'"),
        ("? [a]\n: b\n", "found unhashable key"),
        ("a: 1\n<<: 5\n", "expected a mapping or list of mappings for merging"),
    ],
)
def test_yaml_constructor_problems_are_marked(text: str, problem: str) -> None:
    with pytest.raises(RuleError) as caught:
        load_text(text, "r.yaml")
    assert str(caught.value).startswith("r.yaml: document 1: YAML syntax error at line ")
    assert problem in str(caught.value)


def test_merge_keys_are_not_duplicates() -> None:
    text = """
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: c}
spec:
  dye: {values: [c]}
  hops:
    - &hop {service: a, group: task, weight: 50}
    - <<: *hop
      service: b
"""
    [parsed] = load_text(text, "r.yaml")
    assert [(h.service, h.weight) for h in parsed.rule.hops] == [("a", 50), ("b", 50)]


# --- fuzz -------------------------------------------------------------------------------

JUNK: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    7,
    101,
    2**70,
    1.5,
    float("nan"),
    float("inf"),
    -0.0,
    "",
    "x",
    "UPPER",
    "*",
    "a b",
    "\n",
    "é",
    "0 0 30 2 *",
    "1h",
    "x" * 300,
    [],
    [1],
    ["x", None],
    {},
    {"a": 1},
    {"name": None},
    {1: 2},
    date(2024, 1, 1),
    [{"service": "a"}],
    {"values": []},
]


def _paths(node: object, path: tuple = ()) -> list[tuple]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found.extend(_paths(value, (*path, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(_paths(value, (*path, index)))
    return found


def _mutate(document: dict, rng: random.Random) -> object:
    """Replace, delete or add one random node of a good document."""
    target = rng.choice(_paths(document))
    if not target:
        return rng.choice(JUNK)
    parent = document
    for step in target[:-1]:
        parent = parent[step]
    action = rng.random()
    if action < 0.7:
        parent[target[-1]] = copy.deepcopy(rng.choice(JUNK))
    elif action < 0.85:
        del parent[target[-1]]
    elif isinstance(parent, dict):
        parent[rng.choice(["extra", 1, None, "spec"])] = copy.deepcopy(rng.choice(JUNK))
    else:
        parent.append(copy.deepcopy(rng.choice(JUNK)))
    return document


def test_fuzz_documents(stored: RuleSet) -> None:
    rng = random.Random(20240601)
    documents = [to_document(rule) for rule in stored.all()]
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        document = _mutate(copy.deepcopy(rng.choice(documents)), rng)
        try:
            rule = from_document(document, "fuzz.yaml: document 1")
            assert from_document(to_document(rule), "again") == rule
            stored.with_rules([rule])
            outcomes["ok"] += 1
        except RuleError as error:
            assert "\n" not in str(error)
            assert str(error).startswith("fuzz.yaml: document 1 (")
            outcomes["refused"] += 1
    assert outcomes["ok"] > 100 and outcomes["refused"] > 1000


def test_fuzz_text(stored: RuleSet) -> None:
    rng = random.Random(7)
    good = (RULES / "good" / "fund-yield.yaml").read_text(encoding="utf-8")
    alphabet = ":-[]{}*&!|>'\"\t\n#%@`,? abc019\x07\u00e9\ufeff"
    for _ in range(300):
        text = good
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(text))
            choice = rng.random()
            if choice < 0.4:
                text = text[:at] + text[at + rng.randint(1, 20) :]
            elif choice < 0.8:
                insert = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
                text = text[:at] + insert + text[at:]
            else:
                lines = text.split("\n")
                index = rng.randrange(len(lines))
                lines.insert(index, lines[rng.randrange(len(lines))])
                text = "\n".join(lines)
        try:
            apply(stored, load_text(text, "fuzz.yaml"))
        except RuleError as error:  # every problem, one line each, each naming the file
            lines = str(error).split("\n")
            assert all(line.startswith("fuzz.yaml") for line in lines), lines


SEVERAL_PROBLEMS = """\
apiVersion: tasklane.io/v1
kind: Taskchain
metadata: {name: ledger-chain}
spec: {dye: {values: [ledger]}, hops: [{service: account-svc, group: task}]}
---
apiVersion: tasklane.io/v1
kind: Service
metadata: {name: ledger-svc}
spec:
  protocl: http
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: fund-ledger}
spec:
  dye: {values: [fund-ledger]}
  hops:
    - {service: acount-svc, group: task}
    - {service: account-svc, group: batch}
    - {service: ledger-svc, group: task}
---
apiVersion: tasklane.io/v1
kind: ScheduledTask
metadata: {name: nightly-ledger}
spec: {chain: fund-ledgr, schedule: "0 2 * * *", expectedDuration: 1h}
"""


def test_every_problem_of_a_file_at_once_with_suggestions(stored: RuleSet) -> None:
    """One line per problem, each naming its document, with the likely name; a document that
    failed its own checks (ledger-svc) is not also called missing by the chain using it."""
    with pytest.raises(RuleError) as caught:
        apply(stored, *read_texts([("r.yaml", SEVERAL_PROBLEMS)]))
    assert str(caught.value).split("\n") == [
        "r.yaml: document 1 (unknown kind, name ledger-chain): kind: unknown kind 'Taskchain' "
        "(did you mean TaskChain?)",
        "r.yaml: document 2 (Service ledger-svc): spec.protocl: unknown field "
        "(did you mean protocol?)",
        "r.yaml: document 3 (TaskChain fund-ledger): spec.hops[0].service: unknown service "
        "'acount-svc' (did you mean account-svc?)",
        "r.yaml: document 3 (TaskChain fund-ledger): spec.hops[1].group: service account-svc "
        "has no group 'batch' (it has: default, task, debit)",
        "r.yaml: document 4 (ScheduledTask nightly-ledger): spec.chain: unknown chain "
        "'fund-ledgr' (did you mean fund-ledger?)",
    ]


def test_a_yaml_syntax_error_keeps_the_problems_before_it(stored: RuleSet) -> None:
    text = SEVERAL_PROBLEMS.split("---\n")[1] + "---\nkind: [\n"
    with pytest.raises(RuleError) as caught:
        apply(stored, *read_texts([("r.yaml", text)]))
    lines = str(caught.value).split("\n")
    assert len(lines) == 2
    assert "spec.protocl: unknown field (did you mean protocol?)" in lines[0]
    assert lines[1].startswith("r.yaml: document 2: YAML syntax error")


def test_problems_shown_are_bounded(stored: RuleSet) -> None:
    bad = "apiVersion: tasklane.io/v1\nkind: Servce\nmetadata: {name: x}\nspec: {}\n"
    with pytest.raises(RuleError) as caught:
        apply(stored, *read_texts([("r.yaml", "---\n".join([bad] * 80))]))
    lines = str(caught.value).split("\n")
    assert len(lines) == 51 and lines[-1] == "... and 30 more problems"
