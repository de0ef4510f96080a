"""`Translator.build`: rules as a user writes them and instances as the sync registers them,
in; every role's snapshot, out. Read back as the Envoy messages a sidecar decodes: which roles
exist, which clusters each has, where a chain's dye goes, what a task group refuses, whose
endpoints are where, and what a rebuild changes (content-hash versions, memoised pieces)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.route.v3.route_components_pb2 import Route, VirtualHost
from envoy.extensions.clusters.aggregate.v3.cluster_pb2 import ClusterConfig
from envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2 import LocalRateLimit
from google.protobuf.message import Message

from controlplane.model import RuleSet, apply, load_text
from controlplane.model.group import GroupKey
from controlplane.model.instance import Instance
from controlplane.sync import endpoints_of
from controlplane.translate import Endpoints, Scopes, Translator
from controlplane.xds.names import (
    BAGGAGE_DYE_HEADER,
    BAGGAGE_FILTER,
    EGRESS_ROUTE,
    FALLBACK_HEADER,
    GATEWAY_ROLE,
    INBOUND_ROUTE,
    LOCAL_APP_CLUSTER,
    full_view,
)
from controlplane.xds.snapshot import Snapshot, references
from controlplane.xds.types import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    MESSAGE_CLASS,
    ROUTE,
    VIRTUAL_HOST,
)
from tests.support.rules import chain, service

SERVICES = (
    service("front") + service("account", groups=("default", "task", "debit")) + service("pricing")
)
# `yield` isolates every hop in a task group, `strict`; `debit` shares pricing's default group
# and may fall back from account's debit group, `loose`.
YIELD = chain(
    "yield",
    "[{service: front, group: task},"
    " {service: account, group: task, weight: 60},"
    " {service: pricing, group: task, rateLimit: {requestsPerSecond: 10}}]",
)
DEBIT = chain(
    "debit",
    "[{service: account, group: debit}, {service: pricing, group: default}]",
    fallback="loose",
    dye="{header: x-debit, baggageKey: debit, values: [debit]}",
)
ROLES = {
    "front|default", "front|task",
    "account|default", "account|task", "account|debit",
    "pricing|default", "pricing|task",
}  # fmt: skip
GROUP_CLUSTERS = ROLES  # each (service, group) has a role and an EDS cluster of the same name


def ruleset(*documents: str) -> RuleSet:
    return apply(RuleSet.empty(), load_text("".join(documents), "rules.yaml"))


def instance(service: str, group: str, port: int) -> Instance:
    return Instance(f"{service}-{port}", service, group, "127.0.0.1", port, 0, 0, 0, 1, 0.0)


def endpoints(*instances: Instance) -> Endpoints:
    return endpoints_of(instances)


NO_ENDPOINTS = endpoints()
EVERY_ROLE = frozenset(GroupKey.parse(role) for role in ROLES | {GATEWAY_ROLE})


def full(translator: Translator, rules: RuleSet, eps: Endpoints) -> dict[str, Snapshot]:
    """role -> the full view (what state-of-the-world sidecars and gateways hold)."""
    snapshots = translator.build(rules, eps, Scopes(full=EVERY_ROLE))
    return {role: snapshots[full_view(role)] for role in ROLES | {GATEWAY_ROLE}}


ACCOUNT_TASKS = endpoints(instance("account", "task", 7001), instance("account", "task", 7002))


@pytest.fixture(scope="module")
def built() -> dict[str, Snapshot]:
    return full(Translator(), ruleset(SERVICES, YIELD, DEBIT), ACCOUNT_TASKS)


@pytest.fixture(scope="module")
def scoped() -> dict[str, Snapshot]:
    return Translator().build(ruleset(SERVICES, YIELD, DEBIT), ACCOUNT_TASKS)


def decoded(snapshot: Snapshot, type_url: str) -> dict[str, Message]:
    """name -> the Envoy message a sidecar decodes from the resource."""
    return {
        name: MESSAGE_CLASS[type_url].FromString(resource.payload)
        for name, resource in snapshot.resources(type_url).items()
    }


def virtual_host(snapshot: Snapshot, service: str) -> VirtualHost:
    [host] = [h for h in decoded(snapshot, ROUTE)[EGRESS_ROUTE].virtual_hosts if h.name == service]
    return host


def _route(on_match) -> Route:
    route = Route()
    assert on_match.action.typed_config.Unpack(route)
    return route


def dye_routes(host: VirtualHost, baggage: bool = False) -> dict[tuple[str, str], Route]:
    """(header, value) -> the route a request carrying that dye header takes: the exact and
    prefix (value written with its '*') maps of the host's dye matcher; `baggage` the header
    the baggage filter fills in."""
    found: dict[tuple[str, str], Route] = {}
    for step in host.matcher.matcher_list.matchers:
        tree = step.on_match.matcher.matcher_tree
        header = tree.input.name
        if (header == BAGGAGE_DYE_HEADER) != baggage:
            continue
        for value, on_match in tree.exact_match_map.map.items():
            found[header, value] = _route(on_match)
        for value, on_match in tree.prefix_match_map.map.items():
            found[header, value + "*"] = _route(on_match)
    return found


def baggage_routes(host: VirtualHost) -> dict[str, str]:
    """`<baggage key>=<dye>` -> the route name a request with that baggage dye takes."""
    return {value: route.name for (_, value), route in dye_routes(host, baggage=True).items()}


def otherwise(host: VirtualHost) -> Route:
    """The route of a request that carries no dye the host knows."""
    if not host.HasField("matcher"):
        [route] = host.routes
        return route
    return _route(host.matcher.on_no_match)


def targets(route: Route) -> dict[str, int]:
    """cluster -> the weight (in %) of the route's traffic that it gets."""
    action = route.route
    if action.cluster:
        return {action.cluster: 100}
    return {c.name: c.weight.value for c in action.weighted_clusters.clusters}


def inbound(snapshots: Mapping[str, Snapshot], role: str) -> VirtualHost:
    [host] = decoded(snapshots[role], ROUTE)[INBOUND_ROUTE].virtual_hosts
    return host


def addresses(snapshot: Snapshot, cluster: str) -> list[tuple[str, int]]:
    assignment = decoded(snapshot, ENDPOINT)[cluster]
    return [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for locality in assignment.endpoints
        for e in locality.lb_endpoints
    ]


def versions(snapshots: Mapping[str, Snapshot]) -> dict[tuple[str, str, str], str]:
    """(role, type, name) -> version of every resource of every role."""
    return {
        (role, type_url, name): resource.version
        for role, snapshot in snapshots.items()
        for type_url in (EXTENSION_CONFIG, CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST)
        for name, resource in snapshot.resources(type_url).items()
    }


def changed(before: Mapping[str, Snapshot], after: Mapping[str, Snapshot]) -> set[tuple]:
    """(role, type, name) of every resource added, removed or at a new version."""
    old, new = versions(before), versions(after)
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def short(keys: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """The same keys with the type URL cut to its message name, for readable failures."""
    return {(role, t.rsplit(".", 1)[-1], name) for role, t, name in keys}


# ---------------------------------------------------------------------------- roles, clusters


def test_one_snapshot_per_service_group_plus_the_gateway(scoped: dict[str, Snapshot]) -> None:
    # Full views are built only when asked for; the gateway holds the whole mesh in both:
    # every host over VHDS (Delta), or inline (its full view).
    assert set(scoped) == ROLES | {GATEWAY_ROLE}
    assert set(scoped[GATEWAY_ROLE].resources(VIRTUAL_HOST)) == {
        "egress/@account", "egress/@front", "egress/@pricing"
    }  # fmt: skip


def test_every_role_has_every_group_cluster_and_the_loose_aggregates(
    built: dict[str, Snapshot],
) -> None:
    for role, snapshot in built.items():
        assert set(decoded(snapshot, CLUSTER)) == GROUP_CLUSTERS | {"account|debit|loose"}, role
        assert not snapshot.resources(LISTENER), role  # the sidecars' listeners are static


def test_group_clusters_take_their_endpoints_from_ads(built: dict[str, Snapshot]) -> None:
    clusters = decoded(built["front|default"], CLUSTER)
    for name in GROUP_CLUSTERS:
        assert clusters[name].type == Cluster.EDS, name
        assert clusters[name].eds_cluster_config.eds_config.HasField("ads"), name
    assert set(decoded(built["front|default"], ENDPOINT)) == GROUP_CLUSTERS


def test_a_loose_hop_fails_over_from_its_group_to_default(built: dict[str, Snapshot]) -> None:
    loose = decoded(built["front|default"], CLUSTER)["account|debit|loose"]
    assert loose.cluster_type.name == "envoy.clusters.aggregate"
    config = ClusterConfig()
    assert loose.cluster_type.typed_config.Unpack(config)
    assert list(config.clusters) == ["account|debit", "account|default"]


def test_strict_chains_and_default_hops_get_no_aggregate() -> None:
    strict = full(Translator(), ruleset(SERVICES, YIELD), NO_ENDPOINTS)
    assert set(decoded(strict["front|default"], CLUSTER)) == GROUP_CLUSTERS
    loose = full(Translator(), ruleset(SERVICES, YIELD.replace("strict", "loose")), NO_ENDPOINTS)
    wanted = {f"{s}|task|loose" for s in ("front", "account", "pricing")}
    assert set(decoded(loose["front|default"], CLUSTER)) == GROUP_CLUSTERS | wanted


# ---------------------------------------------------------------------------- egress


def test_every_service_has_an_egress_virtual_host(built: dict[str, Snapshot]) -> None:
    services = {s: [s, f"{s}:*"] for s in ("account", "front", "pricing")}
    for role in ROLES | {GATEWAY_ROLE}:
        hosts = decoded(built[role], ROUTE)[EGRESS_ROUTE].virtual_hosts
        # Sidecars end with every other host (outside the mesh); callers through the gateway
        # reach only the mesh's services.
        outside = {} if role == GATEWAY_ROLE else {"outside_mesh": ["*"]}
        assert {h.name: list(h.domains) for h in hosts} == services | outside, role


def test_a_dye_goes_to_its_hops_group_with_the_hop_weight(built: dict[str, Snapshot]) -> None:
    snapshot = built["front|default"]
    for value in ("yield", "yield@*"):
        front = dye_routes(virtual_host(snapshot, "front"))[("x-task-dye", value)]
        assert targets(front) == {"front|task": 100}, value
        account = dye_routes(virtual_host(snapshot, "account"))[("x-task-dye", value)]
        assert targets(account) == {"account|task": 60, "account|default": 40}, value


def test_a_loose_dye_goes_to_the_aggregate_and_a_default_hop_to_default(
    built: dict[str, Snapshot],
) -> None:
    snapshot = built["front|task"]
    account = dye_routes(virtual_host(snapshot, "account"))[("x-debit", "debit")]
    assert targets(account) == {"account|debit|loose": 100}
    pricing = dye_routes(virtual_host(snapshot, "pricing"))[("x-debit", "debit")]
    assert targets(pricing) == {"pricing|default": 100}


def test_the_baggage_carrier_routes_to_the_same_chains(built: dict[str, Snapshot]) -> None:
    host = virtual_host(built["front|default"], "account")
    assert baggage_routes(host) == {
        "debit=debit": "debit",
        "task-dye=yield": "yield",
        "task-dye=yield@*": "yield",
    }
    # The baggage filter reads the keys from the route it finds first, the undyed one's.
    keys = otherwise(host).metadata.filter_metadata[BAGGAGE_FILTER]
    assert set(keys["keys"]) == {"debit", "task-dye"}
    assert list(host.request_headers_to_remove) == [BAGGAGE_DYE_HEADER]


def test_undyed_traffic_goes_to_default_and_unchained_services_have_no_matcher(
    built: dict[str, Snapshot],
) -> None:
    for name in ("front", "account", "pricing"):
        route = otherwise(virtual_host(built["front|default"], name))
        assert targets(route) == {f"{name}|default": 100}, name
    lone = full(Translator(), ruleset(SERVICES), NO_ENDPOINTS)
    host = virtual_host(lone["front|default"], "account")
    assert not host.HasField("matcher")
    assert targets(otherwise(host)) == {"account|default": 100}


# ---------------------------------------------------------------------------- inbound


def test_a_task_group_accepts_only_its_chains_and_refuses_the_rest(
    built: dict[str, Snapshot],
) -> None:
    host = inbound(built, "account|task")
    accepted = dye_routes(host)
    assert set(accepted) == {("x-task-dye", "yield"), ("x-task-dye", "yield@*")}
    assert all(targets(r) == {LOCAL_APP_CLUSTER: 100} for r in accepted.values())
    refused = otherwise(host)
    assert refused.direct_response.status == 403
    body = refused.direct_response.body.inline_string
    assert "account group task" in body and "yield" in body and "debit" not in body


def test_a_task_group_no_chain_uses_refuses_everything() -> None:
    snapshots = Translator().build(ruleset(SERVICES), NO_ENDPOINTS)
    host = inbound(snapshots, "account|task")
    assert not host.HasField("matcher")
    assert otherwise(host).direct_response.status == 403
    assert "no chain uses it" in otherwise(host).direct_response.body.inline_string


def test_default_accepts_online_traffic_and_meters_its_chains(built: dict[str, Snapshot]) -> None:
    for role in ("front|default", "account|default", "pricing|default"):
        assert targets(otherwise(inbound(built, role))) == {LOCAL_APP_CLUSTER: 100}, role
    # debit's hop on pricing is in the default group: its dye is matched there (as online
    # traffic would be), so a rate limit on that hop would apply to it alone.
    assert set(dye_routes(inbound(built, "pricing|default"))) == {("x-debit", "debit")}


def test_a_hop_rate_limit_is_split_over_its_groups_instances() -> None:
    # One translator for both builds: a new instance count must rebuild the inbound route.
    translator, rules = Translator(), ruleset(SERVICES, YIELD)
    one = inbound(
        translator.build(rules, endpoints(instance("pricing", "task", 1))), "pricing|task"
    )
    two = inbound(
        translator.build(
            rules, endpoints(instance("pricing", "task", 1), instance("pricing", "task", 2))
        ),
        "pricing|task",
    )

    def rate(host: VirtualHost) -> float:
        route = dye_routes(host)[("x-task-dye", "yield")]
        limit = LocalRateLimit()
        route.typed_per_filter_config["envoy.filters.http.local_ratelimit"].Unpack(limit)
        bucket = limit.token_bucket
        return bucket.tokens_per_fill.value / bucket.fill_interval.ToMilliseconds() * 1000

    assert rate(one) == pytest.approx(10)
    assert rate(two) == pytest.approx(5)


# ---------------------------------------------------------------------------- endpoints


def test_endpoints_appear_only_in_their_groups_assignment(built: dict[str, Snapshot]) -> None:
    for role, snapshot in built.items():
        for cluster in GROUP_CLUSTERS:
            expected = (
                [("127.0.0.1", 7001), ("127.0.0.1", 7002)] if cluster == "account|task" else []
            )
            assert addresses(snapshot, cluster) == expected, (role, cluster)


# ---------------------------------------------------------------------------- gateway


def test_the_gateway_gets_egress_and_the_dye_filter_but_no_inbound(
    built: dict[str, Snapshot],
) -> None:
    gateway = built[GATEWAY_ROLE]
    assert set(gateway.resources(ROUTE)) == {EGRESS_ROUTE}
    [dye_filter] = gateway.resources(EXTENSION_CONFIG).values()
    assert b"x-debit" in dye_filter.payload and b"x-task-dye" in dye_filter.payload
    for role in ROLES:
        assert set(built[role].resources(ROUTE)) == {EGRESS_ROUTE, INBOUND_ROUTE}, role
        assert not built[role].resources(EXTENSION_CONFIG), role


# ---------------------------------------------------------------------------- rebuilds


def test_an_unchanged_build_has_identical_versions() -> None:
    rules, eps = ruleset(SERVICES, YIELD, DEBIT), endpoints(instance("account", "task", 7001))
    first = Translator().build(rules, eps)
    translator = Translator()
    translator.build(rules, eps)
    again = translator.build(
        ruleset(SERVICES, YIELD, DEBIT), endpoints(instance("account", "task", 7001))
    )
    assert versions(again) == versions(first)  # content hashes: any translator, any time
    assert all(again[r].changed_types(first[r]) == frozenset() for r in first)


def test_a_new_chain_weight_changes_only_the_egress_route() -> None:
    translator = Translator()
    before = full(translator, ruleset(SERVICES, YIELD, DEBIT), NO_ENDPOINTS)
    after = full(
        translator,
        ruleset(SERVICES, YIELD.replace("weight: 60", "weight: 30"), DEBIT),
        NO_ENDPOINTS,
    )
    assert short(changed(before, after)) == {
        (role, "RouteConfiguration", EGRESS_ROUTE) for role in ROLES | {GATEWAY_ROLE}
    }
    # The other virtual hosts were not rebuilt: the clusters and endpoints are the same maps.
    for role in after:
        assert after[role].resources(CLUSTER) is before[role].resources(CLUSTER)
        assert after[role].resources(ENDPOINT) is before[role].resources(ENDPOINT)


def test_a_new_rate_limit_changes_only_that_hops_inbound_route() -> None:
    translator = Translator()
    before = translator.build(ruleset(SERVICES, YIELD, DEBIT), NO_ENDPOINTS)
    after = translator.build(
        ruleset(SERVICES, YIELD.replace("requestsPerSecond: 10", "requestsPerSecond: 20"), DEBIT),
        NO_ENDPOINTS,
    )
    assert short(changed(before, after)) == {("pricing|task", "RouteConfiguration", INBOUND_ROUTE)}


def test_a_chain_turning_loose_adds_its_aggregates_and_moves_its_routes() -> None:
    translator = Translator()
    before = full(translator, ruleset(SERVICES, YIELD, DEBIT), NO_ENDPOINTS)
    after = full(
        translator, ruleset(SERVICES, YIELD.replace("strict", "loose"), DEBIT), NO_ENDPOINTS
    )
    aggregates = {f"{s}|task|loose" for s in ("front", "account", "pricing")}
    assert short(changed(before, after)) == {
        (role, kind, name)
        for role in ROLES | {GATEWAY_ROLE}
        for kind, name in [("RouteConfiguration", EGRESS_ROUTE)]
        + [("Cluster", a) for a in aggregates]
    }


def test_new_endpoints_change_only_that_groups_assignment() -> None:
    translator = Translator()
    rules = ruleset(SERVICES, YIELD, DEBIT)
    first = (instance("account", "task", 7001), instance("account", "debit", 7002))
    before = full(translator, rules, endpoints(*first))
    after = full(translator, rules, endpoints(*first, instance("account", "debit", 7003)))
    # account|debit's inbound route is rebuilt (a hop's rate limit is split by the instance
    # count) but no hop there has one: same content, same version. Only the group's EDS moves.
    assert short(changed(before, after)) == {
        (role, "ClusterLoadAssignment", "account|debit") for role in ROLES | {GATEWAY_ROLE}
    }
    for role in after:
        assert after[role].resources(CLUSTER) is before[role].resources(CLUSTER)
        before_routes, after_routes = before[role].resources(ROUTE), after[role].resources(ROUTE)
        assert after_routes[EGRESS_ROUTE] is before_routes[EGRESS_ROUTE]


def test_a_loose_group_that_empties_changes_its_fallback_reason() -> None:
    """The callers are told `no_instance` rather than `unhealthy` once the loose chain's group
    has no instance left: the host's routes say it, its clusters stay."""
    translator = Translator()
    rules = ruleset(SERVICES, YIELD, DEBIT)
    before = full(translator, rules, endpoints(instance("account", "debit", 7002)))
    after = full(translator, rules, NO_ENDPOINTS)
    assert short(changed(before, after)) == {
        (role, kind, name)
        for role in ROLES | {GATEWAY_ROLE}
        for kind, name in [
            ("RouteConfiguration", EGRESS_ROUTE),
            ("ClusterLoadAssignment", "account|debit"),
        ]
    }
    for snapshot, reason in ((before, "unhealthy"), (after, "no_instance")):
        route = dye_routes(virtual_host(snapshot["front|default"], "account"))[("x-debit", "debit")]
        [header] = route.response_headers_to_add
        assert header.header.key == FALLBACK_HEADER and f"'{reason}'" in header.header.value


def test_a_removed_group_leaves_its_role_cluster_and_assignment() -> None:
    translator = Translator()
    before = translator.build(ruleset(SERVICES, YIELD, DEBIT), NO_ENDPOINTS)
    after = translator.build(
        ruleset(service("front"), service("account"), service("pricing"), YIELD), NO_ENDPOINTS
    )
    assert "account|debit" in before
    assert "account|debit" not in after
    for role, snapshot in after.items():
        assert "account|debit" not in snapshot.resources(CLUSTER), role
        assert "account|debit|loose" not in snapshot.resources(CLUSTER), role
        assert "account|debit" not in snapshot.resources(ENDPOINT), role


def test_the_gateway_keeps_stripping_a_deleted_chains_carriers() -> None:
    """The dye filter goes out before the routes; were it to forget a deleted chain's header
    first, an outsider's header would reach routes that still honour it for a round trip."""
    translator = Translator()
    translator.build(ruleset(SERVICES, YIELD, DEBIT), NO_ENDPOINTS)
    after = translator.build(ruleset(SERVICES, YIELD), NO_ENDPOINTS)[GATEWAY_ROLE]
    [dye_filter] = after.resources(EXTENSION_CONFIG).values()
    assert b"x-debit" in dye_filter.payload  # the header of the deleted chain `debit`
    assert all(b"x-debit" not in r.payload for r in after.resources(ROUTE).values())


# ---------------------------------------------------------------------------- scoped views


def names(snapshot: Snapshot, type_url: str) -> set[str]:
    return set(snapshot.resources(type_url))


def domains(snapshot: Snapshot) -> dict[str, list[str]]:
    return {name: list(h.domains) for name, h in decoded(snapshot, VIRTUAL_HOST).items()}


def test_a_chain_hop_holds_the_later_hops_of_its_chains_and_nothing_else(
    scoped: dict[str, Snapshot],
) -> None:
    # front is yield's first hop: account and pricing come later. Every group of front holds
    # them (a weight or a loose fallback sends dyed requests through default too).
    for role in ("front|default", "front|task"):
        snapshot = scoped[role]
        assert names(snapshot, CLUSTER) == {
            "account|default", "account|task", "account|debit", "account|debit|loose",
            "pricing|default", "pricing|task",
        }  # fmt: skip
        assert names(snapshot, ENDPOINT) == names(snapshot, CLUSTER) - {"account|debit|loose"}
        assert domains(snapshot) == {
            "egress/@account": ["account", "account:*"],
            "egress/@pricing": ["pricing", "pricing:*"],
            "egress/@outside_mesh": ["outside-mesh.tasklane.invalid"],
        }
        [egress] = [r for n, r in decoded(snapshot, ROUTE).items() if n == EGRESS_ROUTE]
        assert not egress.virtual_hosts and egress.vhds.config_source.HasField("ads")
    # pricing is the last hop of both chains: it calls nothing, as far as the rules say.
    assert not names(scoped["pricing|task"], CLUSTER)
    assert set(domains(scoped["pricing|task"])) == {"egress/@outside_mesh"}


def test_a_scoped_host_routes_dyes_as_the_full_one(
    scoped: dict[str, Snapshot], built: dict[str, Snapshot]
) -> None:
    host = decoded(scoped["front|default"], VIRTUAL_HOST)["egress/@account"]
    assert dye_routes(host) == dye_routes(virtual_host(built["front|default"], "account"))
    assert baggage_routes(host) == {
        "debit=debit": "debit",
        "task-dye=yield": "yield",
        "task-dye=yield@*": "yield",
    }
    # The baggage filter reads the keys from the route it finds first, the undyed one's.
    keys = otherwise(host).metadata.filter_metadata[BAGGAGE_FILTER]
    assert set(keys["keys"]) == {"debit", "task-dye"}
    assert list(host.request_headers_to_remove) == [BAGGAGE_DYE_HEADER]


def test_declared_calls_sightings_and_outside_hosts_join_a_scope() -> None:
    declared = service("front", calls="[pricing]") + service("account") + service("pricing")
    scopes = Scopes(
        sighted={GroupKey("pricing", "default"): frozenset({"account", "gone"})},
        outside={GroupKey("pricing", "default"): ("example.com", "example.org:8080")},
    )
    snapshots = Translator().build(ruleset(declared), NO_ENDPOINTS, scopes)
    assert names(snapshots["front|default"], CLUSTER) == {"pricing|default", "pricing|task"}
    pricing = snapshots["pricing|default"]
    # a service no rule has is left out
    assert names(pricing, CLUSTER) == {"account|default", "account|task"}
    assert domains(pricing)["egress/@outside_mesh"] == ["example.com", "example.org:8080"]
    assert names(snapshots["account|default"], CLUSTER) == set()


def test_roles_with_one_scope_share_its_maps(scoped: dict[str, Snapshot]) -> None:
    front, task = scoped["front|default"], scoped["front|task"]
    for type_url in (CLUSTER, ENDPOINT, VIRTUAL_HOST):
        assert front.resources(type_url) is task.resources(type_url), type_url


def test_a_weight_change_moves_one_host_of_the_scopes_that_hold_it() -> None:
    translator = Translator()
    before = translator.build(ruleset(SERVICES, YIELD, DEBIT), NO_ENDPOINTS)
    after = translator.build(
        ruleset(SERVICES, YIELD.replace("weight: 60", "weight: 30"), DEBIT), NO_ENDPOINTS
    )
    moved = {
        (role, type_url, name)
        for role in ROLES
        for type_url in (CLUSTER, ENDPOINT, ROUTE, VIRTUAL_HOST)
        for name, res in after[role].resources(type_url).items()
        if before[role].resources(type_url).get(name) is None
        or before[role].resources(type_url)[name].version != res.version
    }
    holders = {"front|default", "front|task"}  # account is in front's scope only
    assert moved == {(role, VIRTUAL_HOST, "egress/@account") for role in holders}


def test_rebuilding_change_after_change_gives_what_a_fresh_build_gives() -> None:
    # The translator redoes only what a change touched (the services of a changed chain, the
    # roles holding a changed host): after each step it must agree with a fresh one. Each
    # step changes the rules of the step before, as an apply does: the rules it does not
    # name stay the same objects.
    more = chain(
        "more",
        "[{service: pricing, group: task}, {service: front, group: task}]",
        dye="{header: x-more, values: [more]}",
    )
    steps = [
        lambda r: r,
        lambda r: apply(r, load_text(YIELD.replace("weight: 60", "weight: 30"), "a.yaml")),
        lambda r: apply(r, load_text(more, "a.yaml")),
        lambda r: apply(
            r, load_text(YIELD.replace("{service: front, group: task},", ""), "a.yaml")
        ),
        lambda r: apply(r, load_text(DEBIT.replace("loose", "strict"), "a.yaml")).without(
            "TaskChain", "yield"
        ),
        lambda r: apply(r, load_text(service("pricing", calls="[front]"), "a.yaml")),
        lambda r: apply(r, load_text(YIELD, "a.yaml")),
    ]
    translator, eps = Translator(), endpoints(instance("account", "task", 7001))

    def routing(snapshots: Mapping[str, Snapshot]) -> dict[tuple[str, str, str], str]:
        # (The gateway's dye filter keeps stripping deleted chains' carriers: it differs.)
        return {k: v for k, v in versions(snapshots).items() if k[1] != EXTENSION_CONFIG}

    rules = ruleset(SERVICES, YIELD, DEBIT)
    for step in steps:
        rules = step(rules)
        assert routing(translator.build(rules, eps)) == routing(Translator().build(rules, eps))


def test_a_scope_that_shrinks_back_to_the_rules_is_rebuilt() -> None:
    # pricing's sidecars asked for front, then nothing (their sidecars reconnected): the
    # next build holds what the rules say again, not the last build's view.
    translator, rules = Translator(), ruleset(SERVICES, YIELD, DEBIT)
    asked = Scopes(sighted={GroupKey("pricing", "default"): frozenset({"front"})})
    assert "front|default" in translator.build(rules, NO_ENDPOINTS, asked)[
        "pricing|default"
    ].resources(CLUSTER)
    again = translator.build(rules, NO_ENDPOINTS)["pricing|default"]
    assert "front|default" not in again.resources(CLUSTER)


def test_the_references_a_build_declares_are_what_its_resources_name() -> None:
    # The translator declares what some pieces refer to instead of walking them (a walk of
    # every inbound route cost half a full build): a walk must find the same.
    snapshots = Translator().build(
        ruleset(SERVICES, YIELD.replace("strict", "loose"), DEBIT),
        ACCOUNT_TASKS,
        Scopes(full=EVERY_ROLE),
    )
    for key, snapshot in snapshots.items():
        for type_url in (CLUSTER, ENDPOINT, ROUTE, VIRTUAL_HOST):
            for name, resource in snapshot.resources(type_url).items():
                message = MESSAGE_CLASS[type_url].FromString(resource.payload)
                assert (resource.cluster_refs, resource.route_refs) == references(message), (
                    key,
                    name,
                )
