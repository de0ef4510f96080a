"""Rules and registered instances -> the Envoy resources of every sidecar role.

What each sidecar of (service S, group G) gets:

- clusters `D|g` (EDS) for every group g of every service D, and an aggregate `D|G|loose`
  for every `loose` hop (it fails over to `D|default` when the group has no *healthy* host;
  Envoy's subset fallback does not look at health, envoy#25654);
- route config `egress`: one virtual host per destination service D. Chains with a hop on D
  match their dyes in a `VirtualHost.matcher` tree (exact and prefix maps on the dye header:
  lookup cost does not grow with the number of chains, see DESIGN.md), then per chain a
  regex on the `baggage` member behind one cheap `contains <key>` guard; everything else
  goes to `D|default`. A route retries as its hop says (`retries`), else as the Service
  says; a retry goes to another instance when there is one (`previous_hosts`). Any other host
  (`*`) is outside the mesh: passed through, plain HTTP and CONNECT tunnels alike, to the
  sidecar's dynamic forward proxy cluster (`ALLOW_ANY`), or refused with a reason
  (`REGISTRY_ONLY`); the gateway's `egress` has no such host;
- route config `inbound`: on a task group, only dyes of chains that use (S, G) reach the app,
  each with the hop's rate limit; anything else gets 403 and a reason. `default` accepts all.

Only `inbound` differs between roles, so clusters, endpoints and `egress` are built once and
shared by every snapshot (serialised once). Each piece is memoised on its inputs, so after a
change only the touched virtual hosts, clusters and inbound routes are rebuilt.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.config.route.v3 import route_pb2 as route_config_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2, regex_pb2, string_pb2

from controlplane.model.dye import value_pattern
from controlplane.model.rules import DEFAULT_GROUP, Hop, Retries, RuleSet, Service, TaskChain

from . import wire
from .gateway_filter import DyeNames, dye_filter
from .names import (
    ALLOW_ANY,
    BLACK_HOLE_ROUTE,
    EGRESS_ROUTE,
    GATEWAY_DYE_FILTER,
    GATEWAY_ROLE,
    HEALTH_PATH,
    INBOUND_ROUTE,
    LOCAL_APP_CLUSTER,
    LOCAL_RATE_LIMIT,
    OUTBOUND_POLICIES,
    PASSTHROUGH_CLUSTER,
    PASSTHROUGH_HEADER,
    REGISTRY_ONLY,
    cluster_name,
    loose_cluster_name,
    role_name,
)
from .snapshot import Resource, ResourceMap, Snapshot, references
from .types import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE

Address = tuple[str, int]
# (service, group) -> addresses of the registered instances (their inbound listeners).
Endpoints = Mapping[tuple[str, str], Sequence[Address]]

_HEALTH_INTERVAL_S = 1
# Retries in flight per cluster: a share of its active requests, and at least this many.
# Envoy's default is a fixed 3, so an instance dying under load (every request in flight to it
# needing a retry at once) overflows it and fails requests that a retry would have saved.
_RETRY_BUDGET_PERCENT = 25.0
_MIN_RETRY_CONCURRENCY = 32
# How often a retry may pick a host again when the pick is one it already tried.
_HOST_SELECTION_ATTEMPTS = 5
# RE2 refuses a pattern whose compiled program outgrows its memory budget: Envoy 1.40 NACKs
# "pattern too large - compile failed" from ~700 KB of baggage regex (passes at ~400 KB). A
# chain's dye values are split so that each regex's alternation stays within this. (The
# program-size check, runtime `re2.max_program_size.error_level` = 100, applies to route-level
# `safe_regex` only, not to these matcher-tree regexes: checked with the level set to 10.)
_MAX_REGEX_TEXT = 64 * 1024
# Envoy refuses a direct response body over the route config's
# `max_direct_response_body_size_bytes` (default 4096): the inbound 403's lists of chains and
# dye carriers are cut to these many characters each, the rest counted.
_MAX_LISTED_CHAINS = 600
_MAX_LISTED_CARRIERS = 300
T = TypeVar("T")
_EMPTY = ResourceMap()
_GATEWAY_EGRESS = (EGRESS_ROUTE, GATEWAY_ROLE)  # memo key of the gateway's `egress`


@dataclass(frozen=True)
class ChainHop:
    """A chain's hop on one service, with what routing it needs from the chain."""

    chain: TaskChain
    hop: Hop


def _any(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


# ---------------------------------------------------------------------------- clusters


def _protocol_options() -> dict[str, any_pb2.Any]:
    # HTTP/1.1 in, HTTP/1.1 out; h2 (gRPC) in, h2 out: one cluster kind for both protocols.
    options = upstream_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=upstream_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options={}, http2_protocol_options={}
        )
    )
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(options)}


def _retry_budget() -> circuit_breaker_pb2.CircuitBreakers:
    budget = circuit_breaker_pb2.CircuitBreakers.Thresholds.RetryBudget(
        budget_percent=percent_pb2.Percent(value=_RETRY_BUDGET_PERCENT),
        min_retry_concurrency=wrappers_pb2.UInt32Value(value=_MIN_RETRY_CONCURRENCY),
    )
    return circuit_breaker_pb2.CircuitBreakers(
        thresholds=[circuit_breaker_pb2.CircuitBreakers.Thresholds(retry_budget=budget)]
    )


def group_cluster(service: str, group: str) -> cluster_pb2.Cluster:
    """The EDS cluster of (service, group), health-checked through each instance's sidecar."""
    return cluster_pb2.Cluster(
        name=cluster_name(service, group),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=_duration(1),
        # A deregistered instance leaves at once, even while it still passes health checks
        # (Envoy otherwise keeps routing to it: measured 8 s and counting).
        ignore_health_on_host_removal=True,
        # No panic routing: with every host unhealthy, `strict` must answer 503, not try them.
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=0),
            # Health changes take effect at once, not after Envoy's default 1 s merge window:
            # a resumed (keep-alive) instance serves ~85 ms after SIGCONT instead of ~1.1 s.
            update_merge_window=_duration(0),
        ),
        health_checks=[
            health_check_pb2.HealthCheck(
                timeout=_duration(1),
                interval=_duration(_HEALTH_INTERVAL_S),
                no_traffic_interval=_duration(_HEALTH_INTERVAL_S),
                unhealthy_threshold=wrappers_pb2.UInt32Value(value=2),
                healthy_threshold=wrappers_pb2.UInt32Value(value=1),
                # The default Host is the cluster name, whose '|' a sidecar refuses (400).
                http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(
                    host=service, path=HEALTH_PATH
                ),
            )
        ],
        typed_extension_protocol_options=_protocol_options(),
        circuit_breakers=_retry_budget(),
    )


def loose_cluster(service: str, group: str) -> cluster_pb2.Cluster:
    """Aggregate: the group first, `default` when the group has no healthy host."""
    config = aggregate_pb2.ClusterConfig(
        clusters=[cluster_name(service, group), cluster_name(service, DEFAULT_GROUP)]
    )
    return cluster_pb2.Cluster(
        name=loose_cluster_name(service, group),
        connect_timeout=_duration(1),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate", typed_config=_any(config)
        ),
        circuit_breakers=_retry_budget(),  # a route's retries count against its own cluster
    )


def load_assignment(service: str, group: str, addresses: Sequence[Address]):
    """The endpoints of (service, group): the inbound listeners of its instances."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(service, group))
    if addresses:
        locality = cla.endpoints.add()
        for host, port in addresses:
            locality.lb_endpoints.append(
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(
                        address=address_pb2.Address(
                            socket_address=address_pb2.SocketAddress(address=host, port_value=port)
                        )
                    )
                )
            )
    return cla


# ---------------------------------------------------------------------------- dye matching


def _header_input(header: str) -> extension_pb2.TypedExtensionConfig:
    match_input = http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=header)
    return extension_pb2.TypedExtensionConfig(name=header, typed_config=_any(match_input))


def _on_route(route: route_pb2.Route) -> matcher_pb2.Matcher.OnMatch:
    return matcher_pb2.Matcher.OnMatch(
        action=extension_pb2.TypedExtensionConfig(name=route.name, typed_config=_any(route))
    )


def baggage_regexes(chain: TaskChain) -> list[str]:
    """RE2s matching a `baggage` header whose member `<key>` has one of the chain's dyes: one,
    unless the chain has so many values that they must be split (`_MAX_REGEX_TEXT`)."""
    values = [value_pattern(v) for v in chain.dye.exact]
    values += [value_pattern(p, prefix=True) for p in chain.dye.prefixes]
    key = re.escape(chain.dye.baggage_key)
    return [
        rf"(?:^|.*,)\s*{key}\s*=\s*(?:{'|'.join(part)})\s*(?:[;,].*)?"
        for part in _bounded_parts(values, _MAX_REGEX_TEXT, separator="|")
    ]


def _bounded_parts(items: Sequence[str], budget: int, separator: str) -> list[list[str]]:
    """`items` in order, cut into runs that joined by `separator` stay within `budget`
    characters; an item longer than the budget has a run of its own."""
    parts: list[list[str]] = [[]]
    used = 0
    for item in items:
        if parts[-1] and used + len(separator) + len(item) > budget:
            parts.append([])
        if not parts[-1]:
            used = -len(separator)
        parts[-1].append(item)
        used += len(separator) + len(item)
    return parts


def _single_predicate(
    header: str, value: string_pb2.StringMatcher
) -> matcher_pb2.Matcher.MatcherList.Predicate:
    single = matcher_pb2.Matcher.MatcherList.Predicate.SinglePredicate(
        input=_header_input(header), value_match=value
    )
    return matcher_pb2.Matcher.MatcherList.Predicate(single_predicate=single)


def _any_value(header: str) -> matcher_pb2.Matcher.MatcherList.Predicate:
    # The matcher API has no predicate that is always true; "not the empty string" is the
    # cheapest (a string compare). The tree behind it decides.
    never = _single_predicate(header, string_pb2.StringMatcher(exact=""))
    return matcher_pb2.Matcher.MatcherList.Predicate(not_matcher=never)


def _step(
    predicate: matcher_pb2.Matcher.MatcherList.Predicate, nested: matcher_pb2.Matcher
) -> matcher_pb2.Matcher.MatcherList.FieldMatcher:
    return matcher_pb2.Matcher.MatcherList.FieldMatcher(
        predicate=predicate, on_match=matcher_pb2.Matcher.OnMatch(matcher=nested)
    )


def dye_matcher(
    entries: Sequence[tuple[TaskChain, route_pb2.Route]], otherwise: route_pb2.Route
) -> matcher_pb2.Matcher:
    """Route a request by its dye: header trees first (exact, then prefix maps, per header
    name), then the baggage carrier, then `otherwise`.

    The steps are one flat list whose nested matchers have no `on_no_match`: one that finds
    nothing falls through to the next step (xds `Matcher.OnMatch.matcher`). Nesting each step
    in the previous one's `on_no_match` instead made the depth grow with the number of header
    names: past ~20 Envoy's JSON parser and past ~24 protobuf (upb, depth 100) refused it.

    A baggage member cannot be looked up in a map, so each chain has a regex; they sit behind
    a cheap `contains <key>` guard per baggage key, so online requests that carry unrelated
    baggage (OpenTelemetry) do not pay for every chain's regex (bench/dataplane.py).
    """
    steps = matcher_pb2.Matcher.MatcherList()
    by_header: dict[str, list[tuple[TaskChain, route_pb2.Route]]] = {}
    for chain, route in entries:
        by_header.setdefault(chain.dye.header, []).append((chain, route))
    for header in sorted(by_header):
        prefix_map: dict[str, matcher_pb2.Matcher.OnMatch] = {}
        exact_map: dict[str, matcher_pb2.Matcher.OnMatch] = {}
        for chain, route in by_header[header]:
            for value in chain.dye.prefixes:
                prefix_map[value] = _on_route(route)
            for value in chain.dye.exact:
                exact_map[value] = _on_route(route)
        for kind, table in (("exact_match_map", exact_map), ("prefix_match_map", prefix_map)):
            if not table:
                continue
            tree = matcher_pb2.Matcher.MatcherTree(input=_header_input(header))
            for value, on_match in table.items():
                getattr(tree, kind).map[value].CopyFrom(on_match)
            steps.matchers.append(_step(_any_value(header), matcher_pb2.Matcher(matcher_tree=tree)))
    by_key: dict[str, list[tuple[TaskChain, route_pb2.Route]]] = {}
    for chain, route in entries:
        by_key.setdefault(chain.dye.baggage_key, []).append((chain, route))
    for key in sorted(by_key):
        regexes = matcher_pb2.Matcher.MatcherList()
        for chain, route in by_key[key]:
            for pattern in baggage_regexes(chain):
                regex = regex_pb2.RegexMatcher(regex=pattern, google_re2={})
                regexes.matchers.add(
                    predicate=_single_predicate(
                        "baggage", string_pb2.StringMatcher(safe_regex=regex)
                    ),
                    on_match=_on_route(route),
                )
        guard = _single_predicate("baggage", string_pb2.StringMatcher(contains=key))
        steps.matchers.append(_step(guard, matcher_pb2.Matcher(matcher_list=regexes)))
    return matcher_pb2.Matcher(matcher_list=steps, on_no_match=_on_route(otherwise))


# ---------------------------------------------------------------------------- egress


def _route(name: str, action: route_pb2.RouteAction | None = None, **fields) -> route_pb2.Route:
    route = route_pb2.Route(name=name, match=route_pb2.RouteMatch(prefix="/"), **fields)
    if action is not None:
        route.route.CopyFrom(action)
    return route


def retry_policy(retries: Retries) -> route_pb2.RetryPolicy:
    """Envoy's retry policy for `retries`: each retry on a host not tried yet when the
    cluster has one (a hard-killed instance is skipped at once, not tried again)."""
    retry_on = list(retries.retry_on)
    if retries.status_codes:
        retry_on.append("retriable-status-codes")
    policy = route_pb2.RetryPolicy(
        retry_on=",".join(retry_on),
        num_retries=wrappers_pb2.UInt32Value(value=retries.attempts),
        retriable_status_codes=retries.status_codes,
        host_selection_retry_max_attempts=_HOST_SELECTION_ATTEMPTS,
        retry_host_predicate=[
            route_pb2.RetryPolicy.RetryHostPredicate(
                name="envoy.retry_host_predicates.previous_hosts",
                typed_config=_any(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
    )
    if retries.per_try_timeout_ms is not None:
        policy.per_try_timeout.CopyFrom(_duration(retries.per_try_timeout_ms / 1000))
    return policy


def route_retries(service: Service, hop: Hop | None = None) -> Retries | None:
    """What a route to `service` retries by: its hop's retries, else the Service's. The one
    place that decides it, for online and dyed routes alike."""
    if hop is not None and hop.retries is not None:
        return hop.retries
    return service.retries


def _with_retries(action: route_pb2.RouteAction, retries: Retries | None) -> route_pb2.RouteAction:
    if retries is not None and retries.attempts > 0:
        action.retry_policy.CopyFrom(retry_policy(retries))
    return action


def _hop_action(service: Service, entry: ChainHop) -> route_pb2.RouteAction:
    hop, default = entry.hop, cluster_name(service.name, DEFAULT_GROUP)
    target = (
        loose_cluster_name(service.name, hop.group)
        if entry.chain.fallback == "loose" and hop.group != DEFAULT_GROUP
        else cluster_name(service.name, hop.group)
    )
    action = _action(service)
    if hop.weight >= 100 or target == default:
        action.cluster = target
    elif hop.weight <= 0:
        action.cluster = default
    else:
        action.weighted_clusters.clusters.add(
            name=target, weight=wrappers_pb2.UInt32Value(value=hop.weight)
        )
        action.weighted_clusters.clusters.add(
            name=default, weight=wrappers_pb2.UInt32Value(value=100 - hop.weight)
        )
    return _with_retries(action, route_retries(service, hop))


def _action(service: Service) -> route_pb2.RouteAction:
    # gRPC streams may outlive Envoy's 15 s default route timeout.
    return route_pb2.RouteAction(timeout=_duration(0) if service.protocol == "grpc" else None)


def egress_virtual_host(service: Service, hops: Sequence[ChainHop]) -> route_pb2.VirtualHost:
    """How every sidecar reaches `service`: by `Host: <service>` or as an HTTP proxy."""
    online = _route("online", _with_retries(_action(service), route_retries(service)))
    online.route.cluster = cluster_name(service.name, DEFAULT_GROUP)
    host = route_pb2.VirtualHost(name=service.name, domains=[service.name, f"{service.name}:*"])
    if not hops:
        host.routes.append(online)
        return host
    entries = [(e.chain, _route(e.chain.name, _hop_action(service, e))) for e in hops]
    host.matcher.CopyFrom(dye_matcher(entries, online))
    return host


def _local_reply(status: int, text: str) -> route_pb2.DirectResponseAction:
    """A direct response whose body may name what the request asked for (%REQ(...)%)."""
    return route_pb2.DirectResponseAction(
        status=status,
        body_format=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=text)
        ),
    )


def outside_mesh_host(policy: str) -> route_pb2.VirtualHost:
    """Every host that is no service of the mesh (`*`: Envoy tries it after every service's
    domains). `ALLOW_ANY` passes the request to the host the app named, and tunnels a
    CONNECT (HTTPS through `https_proxy`) there; `REGISTRY_ONLY` answers 502 naming the host
    and the policy, so the app's log says why, not a bare 404.

    A request passed through carries PASSTHROUGH_HEADER: one that arrives with it came back
    from the sidecar itself (its own address named as the host) and stops there with 508,
    instead of looping until the route times out."""
    host = route_pb2.VirtualHost(name="outside_mesh", domains=["*"])
    connect = route_pb2.RouteMatch(connect_matcher=route_pb2.RouteMatch.ConnectMatcher())
    if policy == ALLOW_ANY:
        looped = route_pb2.RouteMatch(
            prefix="/",
            headers=[route_pb2.HeaderMatcher(name=PASSTHROUGH_HEADER, present_match=True)],
        )
        host.routes.add(
            name=PASSTHROUGH_CLUSTER,
            match=looped,
            direct_response=_local_reply(
                508, "tasklane: %REQ(:authority)% leads back to this sidecar's egress listener\n"
            ),
        )
        tunnel = route_pb2.RouteAction(
            cluster=PASSTHROUGH_CLUSTER,
            timeout=_duration(0),  # a tunnel lasts as long as the app keeps it
            upgrade_configs=[
                route_pb2.RouteAction.UpgradeConfig(
                    upgrade_type="CONNECT",
                    connect_config=route_pb2.RouteAction.UpgradeConfig.ConnectConfig(),
                )
            ],
        )
        host.routes.add(name=PASSTHROUGH_CLUSTER, match=connect, route=tunnel)
        passed = _route(PASSTHROUGH_CLUSTER, route_pb2.RouteAction(cluster=PASSTHROUGH_CLUSTER))
        passed.request_headers_to_add.add(
            header=base_pb2.HeaderValue(key=PASSTHROUGH_HEADER, value="1"),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        host.routes.append(passed)
        return host
    if policy != REGISTRY_ONLY:
        raise ValueError(f"outbound traffic policy must be one of {', '.join(OUTBOUND_POLICIES)}")
    refuse = _local_reply(
        502,
        "tasklane: %REQ(:authority)% is no service of the mesh, and the outbound traffic "
        f"policy is {REGISTRY_ONLY}\n",
    )
    host.routes.add(name=BLACK_HOLE_ROUTE, match=connect, direct_response=refuse)
    host.routes.append(_route(BLACK_HOLE_ROUTE, direct_response=refuse))
    return host


# ---------------------------------------------------------------------------- inbound


def local_rate_limit(hop: Hop, instances: int) -> local_rate_limit_pb2.LocalRateLimit:
    """This instance's share of the hop's limit: token buckets are per Envoy, so the hop's
    requests per second and burst are split over the group's instances."""
    share = hop.rate_limit.requests_per_second / max(instances, 1)
    interval_ms = max(50, math.ceil(1000 / share))  # Envoy refuses fills under 50 ms
    tokens = max(1, round(share * interval_ms / 1000))
    burst = max(tokens, math.ceil(hop.rate_limit.burst / max(instances, 1)))
    always = base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(numerator=100)
    )
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix="hop_rate_limit",
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=burst,
            tokens_per_fill=wrappers_pb2.UInt32Value(value=tokens),
            fill_interval=_duration(interval_ms / 1000),
        ),
        filter_enabled=always,
        filter_enforced=always,
    )


def refusal(service: str, group: str, hops: Sequence[ChainHop]) -> str:
    """The inbound 403's reason: which dyes the group accepts and where a request carries
    them. Bounded whatever the number of chains (Envoy NACKs a body over 4096 bytes, and
    with it the group's whole inbound route config)."""
    head = f"tasklane: {service} group {group} serves only task traffic"
    if not hops:
        return f"{head}, and no chain uses it\n"
    chains = list({entry.chain.name: entry.chain for entry in hops}.values())
    count = f"{len(chains)} chain" + ("s" if len(chains) > 1 else "")
    names = _listed([c.name for c in chains], _MAX_LISTED_CHAINS)
    headers = _listed(_most_used([c.dye.header for c in chains]), _MAX_LISTED_CARRIERS)
    keys = _listed(_most_used([c.dye.baggage_key for c in chains]), _MAX_LISTED_CARRIERS)
    return (
        f"{head}: a dye of its {count} ({names}) in header {headers} or baggage member "
        f"{keys}; this request carries none\n"
    )


def _most_used(names: Sequence[str]) -> list[str]:
    """The distinct `names`, the most frequent first (then by name)."""
    counts = Counter(names)
    return sorted(counts, key=lambda name: (-counts[name], name))


def _listed(names: Sequence[str], budget: int) -> str:
    """`names` joined by ", " up to `budget` characters, the rest counted: "a, b and 7 more"."""
    shown = _bounded_parts(names, budget, separator=", ")[0]
    rest = len(names) - len(shown)
    return ", ".join(shown)[:budget] + (f" and {rest} more" if rest else "")  # cuts a long one


def inbound_route(
    service: Service, group: str, hops: Sequence[ChainHop], instances: int
) -> route_config_pb2.RouteConfiguration:
    """What the app of (service, group) accepts. The rate limit of a hop applies here, at
    the instances of the hop's group, to that chain's dyed requests only."""
    to_app = _action(service)
    to_app.cluster = LOCAL_APP_CLUSTER
    entries = []
    for entry in hops:
        route = _route(entry.chain.name, to_app)
        if entry.hop.rate_limit is not None:
            route.typed_per_filter_config[LOCAL_RATE_LIMIT].CopyFrom(
                _any(local_rate_limit(entry.hop, instances))
            )
        entries.append((entry.chain, route))
    if group == DEFAULT_GROUP:
        otherwise = _route("online", to_app)
    else:
        otherwise = _route(
            "refused",
            direct_response=route_pb2.DirectResponseAction(
                status=403,
                body=base_pb2.DataSource(inline_string=refusal(service.name, group, hops)),
            ),
        )
    host = route_pb2.VirtualHost(name=INBOUND_ROUTE, domains=["*"])
    if entries:
        host.matcher.CopyFrom(dye_matcher(entries, otherwise))
    else:
        host.routes.append(otherwise)
    return route_config_pb2.RouteConfiguration(name=INBOUND_ROUTE, virtual_hosts=[host])


# ---------------------------------------------------------------------------- assembly


def hops_by_service(rules: RuleSet) -> dict[str, tuple[ChainHop, ...]]:
    """service -> the chains with a hop on it, in chain-name order."""
    out: dict[str, list[ChainHop]] = {}
    for name in sorted(rules.chains):
        chain = rules.chains[name]
        for hop in chain.hops:
            out.setdefault(hop.service, []).append(ChainHop(chain, hop))
    return {service: tuple(entries) for service, entries in out.items()}


class _Memo:
    """Last (key, value) per name: a piece is rebuilt only when its inputs changed."""

    def __init__(self) -> None:
        self._entries: dict[object, tuple[object, object]] = {}

    def get(self, name: object, key: object, build: Callable[..., T], *args: object) -> T:
        """The value built last time for `name` if `key` is unchanged, else build(*args)."""
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key:
            return entry[1]
        value = build(*args)
        self._entries[name] = (key, value)
        return value

    def keep_only(self, names: set) -> None:
        for name in set(self._entries) - names:
            del self._entries[name]


@dataclass(frozen=True)
class _EncodedHost:
    field: bytes  # RouteConfiguration.virtual_hosts entry, already framed
    cluster_refs: frozenset[str]


class Translator:
    """Builds every role's snapshot; keeps the pieces of the last build to reuse them.

    `outbound_policy` says what sidecars do with hosts outside the mesh (ALLOW_ANY or
    REGISTRY_ONLY, as Istio's `outboundTrafficPolicy.mode`)."""

    def __init__(self, outbound_policy: str = ALLOW_ANY) -> None:
        self._outside = _encode(outside_mesh_host(outbound_policy))
        self._hosts = _Memo()
        self._clusters = _Memo()
        self._endpoints = _Memo()
        self._inbound = _Memo()
        self._maps = _Memo()

    def build(self, rules: RuleSet, endpoints: Endpoints) -> dict[str, Snapshot]:
        """{role: snapshot} for every (service, group) of the rules, plus the gateway."""
        hops = hops_by_service(rules)
        services = [rules.services[name] for name in sorted(rules.services)]

        clusters = self._build_clusters(services, hops)
        assignments = self._build_endpoints(services, endpoints)
        egress, gateway_egress = self._build_egress(services, hops)
        # Keys are object ids: a piece that was not rebuilt is the very same object.
        cds = self._maps.get(CLUSTER, tuple(map(id, clusters)), ResourceMap, clusters)
        eds = self._maps.get(ENDPOINT, tuple(map(id, assignments)), ResourceMap, assignments)
        shared = {CLUSTER: cds, ENDPOINT: eds, LISTENER: _EMPTY}

        by_group: dict[tuple[str, str], list[ChainHop]] = {}
        for service_hops in hops.values():
            for entry in service_hops:
                by_group.setdefault((entry.hop.service, entry.hop.group), []).append(entry)
        snapshots: dict[str, Snapshot] = {}
        roles: set[str] = set()
        for service in services:
            for group in service.groups:
                role = role_name(service.name, group.name)
                roles.add(role)
                mine = tuple(by_group.get((service.name, group.name), ()))
                count = len(endpoints.get((service.name, group.name), ()))
                key = (service, mine, count)
                inbound = self._inbound.get(
                    role, key, _inbound_resource, service, group.name, mine, count
                )
                routes = self._maps.get(
                    role, (id(egress), id(inbound)), ResourceMap, (egress, inbound)
                )
                snapshots[role] = Snapshot({**shared, ROUTE: routes})
        gateway_routes = self._maps.get(
            GATEWAY_ROLE, id(gateway_egress), ResourceMap, (gateway_egress,)
        )
        names = DyeNames.of(rules.chains.values())
        filters = self._maps.get(GATEWAY_DYE_FILTER, names, _gateway_filters, names)
        snapshots[GATEWAY_ROLE] = Snapshot(
            {**shared, ROUTE: gateway_routes, EXTENSION_CONFIG: filters}
        )
        self._inbound.keep_only(roles)
        kept = {GATEWAY_ROLE, GATEWAY_DYE_FILTER, CLUSTER, ENDPOINT, EGRESS_ROUTE, _GATEWAY_EGRESS}
        self._maps.keep_only(roles | kept)
        return snapshots

    def _build_clusters(
        self, services: list[Service], hops: dict[str, tuple[ChainHop, ...]]
    ) -> list[Resource]:
        wanted: dict[str, tuple] = {}
        for service in services:
            for group in service.groups:
                name = cluster_name(service.name, group.name)
                wanted[name] = (group_cluster, service.name, group.name)
            for entry in hops.get(service.name, ()):
                if entry.chain.fallback == "loose" and entry.hop.group != DEFAULT_GROUP:
                    name = loose_cluster_name(service.name, entry.hop.group)
                    wanted[name] = (loose_cluster, service.name, entry.hop.group)
        self._clusters.keep_only(set(wanted))
        return [
            self._clusters.get(name, key, lambda k: Resource.of(k[0](*k[1:])), key)
            for name, key in wanted.items()
        ]

    def _build_endpoints(self, services: list[Service], endpoints: Endpoints) -> list[Resource]:
        out, names = [], set()
        for service in services:
            for group in service.groups:
                addresses = tuple(sorted(endpoints.get((service.name, group.name), ())))
                name = cluster_name(service.name, group.name)
                names.add(name)
                out.append(
                    self._endpoints.get(
                        name, addresses, _assignment_resource, service.name, group.name, addresses
                    )
                )
        self._endpoints.keep_only(names)
        return out

    def _build_egress(
        self, services: list[Service], hops: dict[str, tuple[ChainHop, ...]]
    ) -> tuple[Resource, Resource]:
        """`egress` of the sidecars (the services, then every other host as the outbound
        policy says) and of the gateway (the services only: callers from outside must not
        reach past the mesh through it)."""
        hosts = []
        for service in services:
            mine = hops.get(service.name, ())
            hosts.append(
                self._hosts.get(service.name, (service, mine), _encode_host, service, mine)
            )
        self._hosts.keep_only({s.name for s in services})

        def assemble(*extra: _EncodedHost) -> Resource:
            every = (*hosts, *extra)
            payload = wire.text(1, EGRESS_ROUTE) + b"".join(h.field for h in every)
            refs = frozenset().union(*(h.cluster_refs for h in every))
            return Resource.encoded(ROUTE, EGRESS_ROUTE, payload, refs)

        key = tuple(map(id, hosts))
        sidecars = self._maps.get(EGRESS_ROUTE, key, assemble, self._outside)
        return sidecars, self._maps.get(_GATEWAY_EGRESS, key, assemble)


def _gateway_filters(names: DyeNames) -> ResourceMap:
    return ResourceMap([dye_filter(names)])


def _assignment_resource(service: str, group: str, addresses: Sequence[Address]) -> Resource:
    return Resource.of(load_assignment(service, group, addresses))


def _inbound_resource(service: Service, group: str, hops: Sequence[ChainHop], n: int) -> Resource:
    return Resource.of(inbound_route(service, group, hops, n))


def _encode_host(service: Service, hops: Sequence[ChainHop]) -> _EncodedHost:
    return _encode(egress_virtual_host(service, hops))


def _encode(host: route_pb2.VirtualHost) -> _EncodedHost:
    clusters, _ = references(host)
    return _EncodedHost(wire.field(2, host.SerializeToString(deterministic=True)), clusters)
