"""Retries in the rules (a Service's `spec.retries`, a hop's `retries`) and what they become at
the sidecars: the egress route's `retry_policy`, the hop's own winning over the Service's, a
retry going to another instance (`previous_hosts`), and a retry budget on every cluster so
retries are not capped at Envoy's default of 3 in flight."""

from __future__ import annotations

import pytest
import yaml
from envoy.config.route.v3 import route_components_pb2 as route_pb2

from controlplane.errors import RuleError
from controlplane.model import apply, from_document, load_text, to_document
from controlplane.model.rules import DEFAULT_RETRY_ON, Retries, RuleSet, parse_millis
from controlplane.translate.clusters import group_cluster, loose_cluster
from controlplane.translate.egress import egress_virtual_host
from controlplane.translate.inbound import inbound_route
from controlplane.translate.translator import hops_by_service

RULES = """
apiVersion: tasklane.io/v1
kind: Service
metadata: {name: front}
spec:
  groups: [{name: task}]
  retries: {attempts: 1, retryOn: [connect-failure]}
---
apiVersion: tasklane.io/v1
kind: Service
metadata: {name: back}
spec:
  groups: [{name: task}]
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: with-retries}
spec:
  dye: {values: [with-retries]}
  fallback: loose
  hops:
    - service: front
      group: task
      weight: 50
      retries: {attempts: 3, retryOn: [connect-failure, reset, refused-stream, 503, 429],
                perTryTimeout: 250ms}
    - {service: back, group: task, retries: {attempts: 2}}
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: inherits}
spec:
  dye: {values: [inherits]}
  hops: [{service: front, group: task}, {service: back, group: task}]
---
apiVersion: tasklane.io/v1
kind: TaskChain
metadata: {name: opts-out}
spec:
  dye: {values: [opts-out]}
  hops: [{service: front, group: task, retries: {attempts: 0}}]
"""


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return apply(RuleSet.empty(), load_text(RULES, "retries.yaml"))


def _routes(rules: RuleSet, service: str) -> dict[str, route_pb2.Route]:
    """Route name -> route, from the egress virtual host's dye matcher (and its fallback)."""
    host = egress_virtual_host(rules.services[service], hops_by_service(rules).get(service, ()))

    found: dict[str, route_pb2.Route] = {}

    def walk(matcher) -> None:
        on_matches = []
        if matcher.HasField("matcher_tree"):
            tree = matcher.matcher_tree
            for table in (tree.exact_match_map, tree.prefix_match_map):
                on_matches += list(table.map.values())
        if matcher.HasField("matcher_list"):
            on_matches += [entry.on_match for entry in matcher.matcher_list.matchers]
        if matcher.HasField("on_no_match"):
            on_matches.append(matcher.on_no_match)
        for on_match in on_matches:
            if on_match.HasField("matcher"):
                walk(on_match.matcher)
            else:
                route = route_pb2.Route()
                on_match.action.typed_config.Unpack(route)
                found[route.name] = route

    if host.HasField("matcher"):
        walk(host.matcher)
    for route in host.routes:
        found[route.name] = route
    return found


def test_parsed_with_defaults_and_round_trips(rules: RuleSet) -> None:
    hop = rules.chains["with-retries"].hop_for("front")
    assert hop.retries == Retries(
        attempts=3,
        retry_on=("connect-failure", "reset", "refused-stream"),
        status_codes=(503, 429),
        per_try_timeout_ms=250,
    )
    back = rules.chains["with-retries"].hop_for("back")
    assert back.retries == Retries(2, DEFAULT_RETRY_ON, (), None)
    assert rules.chains["inherits"].hop_for("front").retries is None
    assert rules.services["back"].retries is None
    for rule in rules.all():
        document = to_document(rule)
        again = yaml.safe_load(yaml.safe_dump(document))
        assert from_document(again, "stored") == rule
    written = to_document(rules.chains["with-retries"])["spec"]["hops"][0]["retries"]
    assert written == {
        "attempts": 3,
        "retryOn": ["connect-failure", "reset", "refused-stream", 503, 429],
        "perTryTimeout": "250ms",
    }


@pytest.mark.parametrize(
    ("text", "millis"), [("1s", 1000), ("250ms", 250), ("1.5s", 1500), ("0.001s", 1)]
)
def test_per_try_timeout_text(text: str, millis: int) -> None:
    assert parse_millis(text) == millis


@pytest.mark.parametrize("text", ["1", "1m", "1.5ms", "-1s", "s", "1 s", "1e3ms"])
def test_per_try_timeout_refused(text: str) -> None:
    with pytest.raises(RuleError):
        parse_millis(text)


def test_hop_retries_become_the_dyed_route_policy(rules: RuleSet) -> None:
    route = _routes(rules, "front")["with-retries"]
    policy = route.route.retry_policy
    assert policy.retry_on == "connect-failure,reset,refused-stream,retriable-status-codes"
    assert list(policy.retriable_status_codes) == [503, 429]
    assert policy.num_retries.value == 3
    assert policy.per_try_timeout.ToMilliseconds() == 250
    [predicate] = policy.retry_host_predicate
    assert predicate.name == "envoy.retry_host_predicates.previous_hosts"
    assert predicate.typed_config.type_url.endswith("PreviousHostsPredicate")
    assert policy.host_selection_retry_max_attempts > 1
    # 50 %: split between the loose group cluster and default; the policy covers both picks.
    names = [c.name for c in route.route.weighted_clusters.clusters]
    assert names == ["front|task|loose", "front|default"]


def test_service_retries_cover_online_and_hops_without_their_own(rules: RuleSet) -> None:
    routes = _routes(rules, "front")
    for name in ("online", "inherits"):
        policy = routes[name].route.retry_policy
        assert policy.retry_on == "connect-failure", name
        assert policy.num_retries.value == 1
        assert not policy.HasField("per_try_timeout")
        assert policy.retry_host_predicate[0].name.endswith("previous_hosts")


def test_attempts_zero_turns_the_service_retries_off(rules: RuleSet) -> None:
    assert not _routes(rules, "front")["opts-out"].route.HasField("retry_policy")


def test_no_retries_anywhere_means_no_policy(rules: RuleSet) -> None:
    routes = _routes(rules, "back")
    assert not routes["online"].route.HasField("retry_policy")
    assert not routes["inherits"].route.HasField("retry_policy")
    assert routes["with-retries"].route.retry_policy.num_retries.value == 2


def test_inbound_routes_do_not_retry(rules: RuleSet) -> None:
    front = rules.services["front"]
    hops = hops_by_service(rules)["front"]
    text = inbound_route(front, "task", hops, 2).SerializeToString()
    assert b"previous_hosts" not in text


def test_every_cluster_has_a_retry_budget() -> None:
    for cluster in (group_cluster("front", "task"), loose_cluster("front", "task")):
        [threshold] = cluster.circuit_breakers.thresholds
        assert threshold.retry_budget.budget_percent.value > 0
        assert threshold.retry_budget.min_retry_concurrency.value >= 10
