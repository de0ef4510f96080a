"""`Asked`: what connected sidecars asked for on demand. A host stays in its role's scope
while a sidecar that asked for it is connected (Envoy asks once per xDS stream), leaves with
the last of them, and hosts outside the mesh are bounded per role."""

from __future__ import annotations

from controlplane.model import RuleSet, apply, load_text
from controlplane.model.group import GroupKey
from controlplane.translate.scope import MAX_OUTSIDE_HOSTS, Answer, Asked
from tests.support.rules import service

RULES = apply(RuleSet.empty(), load_text(service("front") + service("ledger"), "r.yaml"))
FRONT = GroupKey("front", "default")


def test_a_service_joins_once_and_leaves_with_the_last_sidecar_that_asked() -> None:
    asked = Asked()
    assert asked.ask(RULES, "n1", "front|default", "ledger:8080") == Answer(True, True, "ledger")
    assert asked.ask(RULES, "n2", "front|default", "LEDGER") == Answer(True, False)
    assert asked.scopes().sighted == {FRONT: frozenset({"ledger"})}
    assert asked.gone("n1") is False  # n2 still holds it
    assert asked.gone("n2") is True
    assert asked.scopes().sighted == {}


def test_other_hosts_join_the_outside_host_of_their_role() -> None:
    asked = Asked()
    assert asked.ask(RULES, "n1", "front|task", "example.com") == Answer(True, True)
    assert asked.ask(RULES, "n1", "front|task", "example.com:443") == Answer(True, True)
    scopes = asked.scopes(sighted={FRONT: ["ledger"]})
    assert scopes.outside == {GroupKey("front", "task"): ("example.com", "example.com:443")}
    assert scopes.sighted == {FRONT: frozenset({"ledger"})}


def test_nothing_comes_for_a_role_no_rule_defines() -> None:
    asked = Asked()
    assert asked.ask(RULES, "n1", "ghost|default", "ledger") == Answer(False, False)
    assert asked.ask(RULES, "n1", "front|batch", "ledger") == Answer(False, False)
    assert asked.scopes().sighted == {}


def test_a_flood_of_outside_names_is_bounded_per_role() -> None:
    asked = Asked()
    answers = [asked.ask(RULES, "n1", "front|default", f"h{i}.example") for i in range(10_000)]
    assert sum(a.comes for a in answers) == MAX_OUTSIDE_HOSTS
    assert len(asked.scopes().outside[FRONT]) == MAX_OUTSIDE_HOSTS
    assert asked.gone("n1") is True
    assert asked.scopes().outside == {}
