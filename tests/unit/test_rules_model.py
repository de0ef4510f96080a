"""The rule model: documents round-trip, defaults are written out, RuleSet is immutable, the
demo rules load, and cross-reference checks name the rule that refers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from controlplane.errors import RuleError
from controlplane.model import (
    API_VERSION,
    DEFAULT_GROUP,
    KINDS,
    Dye,
    Group,
    Hop,
    RateLimit,
    RuleSet,
    ScheduledTask,
    Service,
    TaskChain,
    apply,
    check,
    check_delete,
    from_document,
    load_files,
    load_text,
    to_document,
)
from controlplane.model.rules import RunSpec

GOOD = Path(__file__).resolve().parents[1] / "rules" / "good" / "fund-yield.yaml"


@pytest.fixture(scope="module")
def stored() -> RuleSet:
    return apply(RuleSet.empty(), load_files([GOOD]))


def one(text: str):
    [parsed] = load_text(text, "t.yaml")
    return parsed.rule


# --- the demo file ---------------------------------------------------------------------


def test_demo_file_loads_with_origins() -> None:
    parsed = load_files([GOOD])
    assert [(p.kind, p.name, p.document) for p in parsed] == [
        ("Service", "fund-facade", 1),
        ("Service", "account-svc", 2),
        ("Service", "nav-pricing", 3),
        ("TaskChain", "fund-yield", 4),
        ("TaskChain", "batch-debit", 5),
        ("ScheduledTask", "nightly-fund-yield", 6),
        ("ScheduledTask", "weekday-batch-debit", 7),
    ]
    assert parsed[3].where == f"{GOOD}: document 4 (TaskChain fund-yield)"


def test_demo_rules(stored: RuleSet) -> None:
    chain = stored.chains["fund-yield"]
    assert [hop.service for hop in chain.hops] == ["fund-facade", "account-svc", "nav-pricing"]
    assert chain.dye == Dye("x-task-dye", "task-dye", ("fund-yield",), ("fund-yield@",))
    assert chain.hop_for("account-svc") == Hop("account-svc", "task", 100, RateLimit(100.0, 100))
    assert chain.hop_for("ledger") is None
    debit = stored.chains["batch-debit"]
    assert debit.fallback == "loose"
    assert debit.hop_for("account-svc").group == "debit"
    assert debit.hop_for("nav-pricing") == Hop(
        "nav-pricing", DEFAULT_GROUP, 100, RateLimit(20.5, 21)
    )
    assert stored.services["account-svc"].group("debit") == Group("debit", 0, 4)
    assert stored.services["account-svc"].group("batch") is None
    task = stored.tasks["nightly-fund-yield"]
    assert task.expected_duration_s == 7 * 3600
    assert dict(task.replicas) == {"fund-facade": 4, "account-svc": 3, "nav-pricing": 2}


# --- documents --------------------------------------------------------------------------


def test_round_trip_through_json_and_yaml(stored: RuleSet) -> None:
    for rule in stored.all():
        document = to_document(rule)
        assert from_document(document, "x") == rule
        assert from_document(json.loads(json.dumps(document)), "x") == rule
        assert from_document(yaml.safe_load(yaml.safe_dump(document)), "x") == rule


def test_defaults_are_written_out() -> None:
    service = one(f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: a}}\nspec: {{}}\n")
    assert to_document(service) == {
        "apiVersion": API_VERSION,
        "kind": "Service",
        "metadata": {"name": "a"},
        "spec": {
            "protocol": "http",
            "groups": [{"name": "default", "minReplicas": 1, "maxReplicas": 1}],
        },
    }
    chain = one(
        f"apiVersion: {API_VERSION}\nkind: TaskChain\nmetadata: {{name: c}}\nspec:\n"
        '  dye: {values: ["c@*", c]}\n'
        "  hops: [{service: a, group: task, rateLimit: {requestsPerSecond: 2.5}}]\n"
    )
    assert to_document(chain)["spec"] == {
        "dye": {"header": "x-task-dye", "baggageKey": "task-dye", "values": ["c", "c@*"]},
        "fallback": "strict",
        "hops": [
            {
                "service": "a",
                "group": "task",
                "weight": 100,
                "rateLimit": {"requestsPerSecond": 2.5, "burst": 3},
            }
        ],
    }
    task = one(
        f"apiVersion: {API_VERSION}\nkind: ScheduledTask\nmetadata: {{name: t}}\nspec:\n"
        "  chain: c\n  schedule: '@daily'\n  expectedDuration: 90m\n"
    )
    assert to_document(task)["spec"] == {
        "chain": "c",
        "schedule": "@daily",
        "timezone": "UTC",
        "expectedDuration": "1h30m",
        "replicas": {},
    }


def test_default_group_is_added_first_and_group_defaults() -> None:
    service = one(
        f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: a}}\nspec:\n"
        "  protocol: grpc\n  groups: [{name: task, minReplicas: 3}, {name: default}, "
        "{name: spare}]\n"
    )
    assert service == Service(
        "a", "grpc", (Group("default", 1, 1), Group("task", 3, 3), Group("spare", 0, 1))
    )
    service = one(
        f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: a}}\nspec:\n"
        "  groups: [{name: task, maxReplicas: 8}]\n"
    )
    assert [g.name for g in service.groups] == ["default", "task"]


def test_prefix_is_stored_without_star() -> None:
    chain = one(
        f"apiVersion: {API_VERSION}\nkind: TaskChain\nmetadata: {{name: c}}\nspec:\n"
        '  dye: {header: x-batch, baggageKey: Batch.Id, values: [a, "b-*", c]}\n'
        "  hops: [{service: a, group: default, weight: 0}]\n"
    )
    assert chain.dye == Dye("x-batch", "Batch.Id", ("a", "c"), ("b-",))
    assert chain.hops == (Hop("a", "default", 0, None),)


def test_from_document_names_the_origin() -> None:
    with pytest.raises(RuleError) as caught:
        from_document(
            {
                "apiVersion": API_VERSION,
                "kind": "Service",
                "metadata": {"name": "a"},
                "spec": {"protocol": 1},
            },
            "etcd rules/x",
        )
    assert str(caught.value) == (
        "etcd rules/x (Service a): spec.protocol: expected a string, got integer 1"
    )


def service_with_run(run: str) -> str:
    """Two documents, so messages name the second: where a Service's spec.run is."""
    return (
        f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: a}}\nspec: {{}}\n---\n"
        f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: x}}\nspec:\n"
        f"  run: {run}\n"
    )


def test_service_run_round_trips_and_is_optional() -> None:
    run = "{command: [python, -m, demo.chain_app, --next, ''], env: {Z_LAST: z, A_FIRST: '1'}}"
    service = load_text(service_with_run(run), "rules.yaml")[1].rule
    assert service.run == RunSpec(
        ("python", "-m", "demo.chain_app", "--next", ""), (("A_FIRST", "1"), ("Z_LAST", "z"))
    )
    assert to_document(service)["spec"]["run"] == {
        "command": ["python", "-m", "demo.chain_app", "--next", ""],
        "env": {"A_FIRST": "1", "Z_LAST": "z"},
    }
    for document in (
        to_document(service),
        json.loads(json.dumps(to_document(service))),
        yaml.safe_load(yaml.safe_dump(to_document(service))),
    ):
        assert from_document(document, "x") == service
    bare = load_text(service_with_run("{command: [app]}"), "rules.yaml")[1].rule
    assert bare.run == RunSpec(("app",), ())
    assert to_document(bare)["spec"]["run"] == {"command": ["app"], "env": {}}
    without = one(f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: a}}\nspec: {{}}\n")
    assert without.run is None and "run" not in to_document(without)["spec"]


@pytest.mark.parametrize(
    ("run", "problem"),
    [
        ("[app]", "spec.run: expected a mapping, got a list"),
        ("{}", "spec.run.command: missing required field"),
        ("{command: app}", "spec.run.command: expected a list, got string 'app'"),
        ("{command: []}", "spec.run.command: at least the program to run is required"),
        ("{command: [app, 8080]}", "spec.run.command[1]: expected a string, got integer 8080"),
        ("{command: ['', x]}", "spec.run.command[0]: the program must not be empty"),
        ('{command: ["a\\0b"]}', "spec.run.command[0]: contains a NUL character"),
        (
            "{command: [app], cmd: [b]}",
            "spec.run.cmd: unknown field (expected one of: command, env)",
        ),
        ("{command: [app], env: [A]}", "spec.run.env: expected a mapping, got a list"),
        (
            "{command: [app], env: {DEBUG: 1}}",
            "spec.run.env.DEBUG: expected a string, got integer 1",
        ),
        ("{command: [app], env: {1X: a}}", "spec.run.env: '1X' is not a valid variable name"),
        ("{command: [app], env: {PORT: '1'}}", "spec.run.env.PORT: PORT is set by `tasklane run`"),
        (
            "{command: [app], env: {TASKLANE_GROUP: g}}",
            "spec.run.env.TASKLANE_GROUP: TASKLANE_GROUP is set by `tasklane run`",
        ),
    ],
)
def test_service_run_problems(run: str, problem: str) -> None:
    with pytest.raises(RuleError) as caught:
        load_text(service_with_run(run), "rules.yaml")
    assert str(caught.value).startswith(f"rules.yaml: document 2 (Service x): {problem}")
    assert "\n" not in str(caught.value)


# --- RuleSet ----------------------------------------------------------------------------


def test_ruleset_operations_return_new_sets(stored: RuleSet) -> None:
    assert RuleSet.empty().all() == ()
    changed = Service("nav-pricing", "grpc", (Group("default", 1, 1),))
    replaced = stored.with_rules([changed])
    assert replaced.get("Service", "nav-pricing") == changed
    assert stored.get("Service", "nav-pricing").protocol == "http"
    smaller = stored.without("ScheduledTask", "nightly-fund-yield")
    assert smaller.get("ScheduledTask", "nightly-fund-yield") is None
    assert stored.get("ScheduledTask", "nightly-fund-yield") is not None
    assert smaller.without("ScheduledTask", "nightly-fund-yield") == smaller
    assert stored.get("TaskChain", "missing") is None


def test_ruleset_all_is_ordered_by_kind_then_name(stored: RuleSet) -> None:
    keys = [(rule.kind, rule.name) for rule in stored.all()]
    assert keys == sorted(keys, key=lambda key: (KINDS.index(key[0]), key[1]))
    assert len(keys) == 7


def test_ruleset_cannot_be_mutated(stored: RuleSet) -> None:
    with pytest.raises(TypeError):
        stored.services["x"] = Service("x", "http", ())  # type: ignore[index]
    source = {"a": Service("a", "http", (Group("default", 1, 1),))}
    ruleset = RuleSet(source, {}, {})
    source.clear()
    assert "a" in ruleset.services


def test_unknown_kind_is_a_rule_error(stored: RuleSet) -> None:
    with pytest.raises(RuleError, match="unknown kind 'Chain'"):
        stored.get("Chain", "fund-yield")
    with pytest.raises(RuleError, match="unknown kind"):
        stored.without("chain", "fund-yield")


# --- loading ----------------------------------------------------------------------------


def test_directory_loads_yaml_and_yml_sorted(tmp_path: Path) -> None:
    def service(name: str) -> str:
        return f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{}}\n"

    (tmp_path / "b.yml").write_text(service("b"))
    (tmp_path / "a.yaml").write_text(service("a"))
    (tmp_path / "notes.txt").write_text("not rules")
    (tmp_path / "sub.yaml").mkdir()
    parsed = load_files([tmp_path])
    assert [(Path(p.file).name, p.name) for p in parsed] == [("a.yaml", "a"), ("b.yml", "b")]


def test_empty_documents_count(tmp_path: Path) -> None:
    text = (
        "---\n# nothing\n---\n"
        f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: a}}\nspec: {{}}\n"
        "---\n---\n"
        f"apiVersion: {API_VERSION}\nkind: Service\nmetadata: {{name: b}}\nspec: {{}}\n"
    )
    assert [(p.name, p.document) for p in load_text(text, "r.yaml")] == [("a", 2), ("b", 4)]
    assert load_text("", "r.yaml") == []
    assert load_text("# only a comment\n", "r.yaml") == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.yaml", "missing.yaml: no such file or directory"),
        (lambda d: d, "no *.yaml or *.yml files in this directory"),
    ],
)
def test_file_problems(tmp_path: Path, setup, message: str) -> None:
    with pytest.raises(RuleError, match=message.replace("*", r"\*")):
        load_files([setup(tmp_path)])


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"kind: Service\nmetadata: {name: \xff}\n")
    with pytest.raises(RuleError, match=r"r.yaml: not UTF-8 text \(byte 31\)"):
        load_files([path])


# --- validation ---------------------------------------------------------------------------


def chain_text(name: str, values: str, hops: str = "[{service: fund-facade, group: task}]") -> str:
    return (
        f"apiVersion: {API_VERSION}\nkind: TaskChain\nmetadata: {{name: {name}}}\n"
        f"spec: {{dye: {{values: {values}}}, hops: {hops}}}\n"
    )


@pytest.mark.parametrize(
    "values",
    ['["fund-yield-2*"]', "[fund-yiel]", '["fund-yieldx*"]', '["batch-debit2"]', "[fund]"],
)
def test_values_that_do_not_overlap(stored: RuleSet, values: str) -> None:
    apply(stored, load_text(chain_text("ledger", values), "r.yaml"))


def test_reapplying_a_chain_does_not_conflict_with_itself(stored: RuleSet) -> None:
    hops = (
        "[{service: fund-facade, group: task}, {service: account-svc, group: task}, "
        "{service: nav-pricing, group: task}]"
    )
    text = chain_text("fund-yield", '[fund-yield, "fund-yield@*", "fund-yield@2024"]', hops)
    result = apply(stored, load_text(text, "r.yaml"))
    assert result.chains["fund-yield"].dye.exact == ("fund-yield", "fund-yield@2024")


def test_changing_a_stored_chain_into_a_conflict_names_the_document(stored: RuleSet) -> None:
    text = chain_text("batch-debit", '["fund-*"]', "[{service: account-svc, group: debit}]")
    with pytest.raises(RuleError) as caught:
        apply(stored, load_text(text, "r.yaml"))
    assert str(caught.value) == (
        "r.yaml: document 1 (TaskChain batch-debit): spec.dye.values: 'fund-*' overlaps "
        "'fund-yield' of TaskChain fund-yield (stored): both would claim dye 'fund-yield'"
    )


def test_refused_apply_changes_nothing(stored: RuleSet) -> None:
    before = stored.all()
    text = chain_text("ledger", "[ledger]", "[{service: account-svc, group: batch}]")
    with pytest.raises(RuleError, match="service account-svc has no group 'batch'"):
        apply(stored, load_text(text, "r.yaml"))
    assert stored.all() == before


def test_check_names_stored_rules_without_origins(stored: RuleSet) -> None:
    broken = stored.with_rules([Service("nav-pricing", "http", (Group("default", 1, 2),))])
    with pytest.raises(RuleError) as caught:
        check(broken)
    assert str(caught.value) == (
        "stored TaskChain fund-yield: spec.hops[2].group: service nav-pricing has no group 'task' "
        "(it has: default)"
    )
    check(stored)


def test_check_delete(stored: RuleSet) -> None:
    with pytest.raises(RuleError) as caught:
        check_delete(stored, "Service", "account-svc")
    assert str(caught.value) == (
        "cannot delete Service account-svc: still referred to by "
        "TaskChain batch-debit (spec.hops[0].service), TaskChain fund-yield (spec.hops[1].service)"
    )
    with pytest.raises(RuleError, match=r"ScheduledTask nightly-fund-yield \(spec.chain\)"):
        check_delete(stored, "TaskChain", "fund-yield")
    check_delete(stored, "ScheduledTask", "nightly-fund-yield")
    check_delete(stored.without("ScheduledTask", "nightly-fund-yield"), "TaskChain", "fund-yield")
    check_delete(stored, "Service", "not-there")
    with pytest.raises(RuleError, match="unknown kind"):
        check_delete(stored, "Pod", "x")


def test_dataclasses_are_frozen() -> None:
    task = ScheduledTask("t", "c", "@daily", "UTC", 60, ())
    with pytest.raises(AttributeError):
        task.chain = "d"  # type: ignore[misc]
    chain = TaskChain("c", Dye("x-task-dye", "task-dye", ("c",), ()), "strict", ())
    assert chain.kind == "TaskChain" and task.kind == "ScheduledTask"
