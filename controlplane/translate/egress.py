"""The `egress` route config: one virtual host per destination service, whose dyed requests
go to their hop's group (with its weight, fallback and retries), and the host for
everything outside the mesh (the outbound traffic policy).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import (
    base_pb2,
    substitution_format_string_pb2,
)
from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from google.protobuf import struct_pb2, wrappers_pb2

from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.rules import Hop, Retries, Service
from controlplane.translate.common import ChainHop, duration, named_route, packed, service_action
from controlplane.translate.matcher import dye_host
from controlplane.xds.names import (
    ALLOW_ANY,
    BLACK_HOLE_ROUTE,
    FALLBACK_HEADER,
    NO_INSTANCE,
    OUTBOUND_POLICIES,
    PASSTHROUGH_CLUSTER,
    PASSTHROUGH_HEADER,
    REGISTRY_ONLY,
    STRICT_REJECT,
    TASKLANE_METADATA,
    UNAVAILABLE,
    UNHEALTHY,
    cluster_name,
    loose_cluster_name,
)

# How often a retry may pick a host again when the pick is one it already tried.
_HOST_SELECTION_ATTEMPTS = 5


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
                typed_config=packed(previous_hosts_pb2.PreviousHostsPredicate()),
            )
        ],
    )
    if retries.per_try_timeout_ms is not None:
        policy.per_try_timeout.CopyFrom(duration(retries.per_try_timeout_ms / 1000))
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


def _target(service: Service, entry: ChainHop) -> str:
    """The cluster a hop's dyed requests go to (but the share a weight leaves `default`)."""
    hop = entry.hop
    if entry.chain.fallback == "loose" and hop.group != DEFAULT_GROUP:
        return loose_cluster_name(service.name, hop.group)
    return cluster_name(service.name, hop.group)


def host_clusters(service: Service, hops: Sequence[ChainHop]) -> frozenset[str]:
    """The clusters egress_virtual_host(service, hops) routes to, known without walking it."""
    targets = {_target(service, entry) for entry in hops if entry.hop.weight > 0}
    return frozenset({cluster_name(service.name, DEFAULT_GROUP), *targets})


def _fallback_header(reason: str) -> base_pb2.HeaderValueOption:
    """FALLBACK_HEADER: `reason` on a response that a loose cluster's `default` member served
    (its endpoints say their group: clusters.load_assignment); on any other, no header."""
    by_default = (
        f"xds.upstream_host_metadata.filter_metadata['{TASKLANE_METADATA}']['group']"
        f" == '{DEFAULT_GROUP}'"
    )
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(
            key=FALLBACK_HEADER, value=f"%CEL({by_default} ? '{reason}' : '')%"
        ),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        keep_empty_value=False,
    )


def _unreached(entry: ChainHop) -> struct_pb2.Struct:
    """Route metadata for the listeners' local reply when the route's cluster has no healthy
    host (templates/sidecar.yaml): FALLBACK_HEADER's value and the hop and group the 503's
    body names."""
    hop, chain = entry.hop, entry.chain
    group = hop.group
    if hop.weight <= 0:
        group = DEFAULT_GROUP
    elif hop.weight < 100 and hop.group != DEFAULT_GROUP:
        group = f"{hop.group} ({hop.weight} %) or {DEFAULT_GROUP}"
    elif chain.fallback == "loose" and hop.group != DEFAULT_GROUP:
        group = f"{hop.group}, then {DEFAULT_GROUP}"
    reason = STRICT_REJECT if chain.fallback == "strict" else UNAVAILABLE
    metadata = struct_pb2.Struct()
    metadata.update({"unreached": reason, "hop": hop.service, "group": group})
    return metadata


def _hop_route(service: Service, entry: ChainHop, empty: frozenset[str]) -> route_pb2.Route:
    """Where a chain's dyed requests to `service` go, and what the caller is told when its
    hop's group did not serve them: a loose fallback's reason (`no_instance` when the group
    has no registered instance, else `unhealthy`) in FALLBACK_HEADER, or a 503 naming the
    chain, hop and group (the listeners' local reply reads the route's metadata)."""
    hop, default = entry.hop, cluster_name(service.name, DEFAULT_GROUP)
    loose = entry.chain.fallback == "loose" and hop.group != DEFAULT_GROUP
    target = _target(service, entry)
    action = service_action(service)
    route = named_route(entry.chain.name)
    route.metadata.filter_metadata[TASKLANE_METADATA].CopyFrom(_unreached(entry))
    told = route  # where the fallback header goes: the route, or the loose cluster's share
    if hop.weight >= 100 or target == default:
        action.cluster = target
    elif hop.weight <= 0:
        action.cluster = default
        loose = False
    else:
        told = action.weighted_clusters.clusters.add(
            name=target, weight=wrappers_pb2.UInt32Value(value=hop.weight)
        )
        action.weighted_clusters.clusters.add(
            name=default, weight=wrappers_pb2.UInt32Value(value=100 - hop.weight)
        )
    if loose:  # an app's own header of that name is not the mesh's word
        told.response_headers_to_remove.append(FALLBACK_HEADER)
        reason = NO_INSTANCE if hop.group in empty else UNHEALTHY
        told.response_headers_to_add.append(_fallback_header(reason))
    route.route.CopyFrom(_with_retries(action, route_retries(service, hop)))
    return route


def egress_virtual_host(
    service: Service, hops: Sequence[ChainHop], empty: frozenset[str] = frozenset()
) -> route_pb2.VirtualHost:
    """How every sidecar reaches `service`: by `Host: <service>` or as an HTTP proxy. `empty`:
    the service's groups with no registered instance (a loose fallback's reason)."""
    online = named_route("online", _with_retries(service_action(service), route_retries(service)))
    online.route.cluster = cluster_name(service.name, DEFAULT_GROUP)
    host = route_pb2.VirtualHost(name=service.name, domains=[service.name, f"{service.name}:*"])
    if not hops:
        host.routes.append(online)
        return host
    entries = [(e.chain, _hop_route(service, e, empty)) for e in hops]
    dye_host(host, entries, online)
    return host


def _local_reply(status: int, text: str) -> route_pb2.DirectResponseAction:
    """A direct response whose body may name what the request asked for (%REQ(...)%)."""
    return route_pb2.DirectResponseAction(
        status=status,
        body_format=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=text)
        ),
    )


def outside_mesh_host(
    policy: str, domains: Sequence[str] = ("*",), name: str = "outside_mesh"
) -> route_pb2.VirtualHost:
    """Hosts that are no service of the mesh: every other host (`*`, tried after every
    service's domains), or the ones a scoped sidecar asked for on demand. `ALLOW_ANY`
    passes the request to the host the app named, and tunnels a CONNECT (HTTPS through
    `https_proxy`) there; `REGISTRY_ONLY` answers 502 naming the host
    and the policy, so the app's log says why, not a bare 404.

    A request passed through carries PASSTHROUGH_HEADER: one that arrives with it came back
    from the sidecar itself (its own address named as the host) and stops there with 508,
    instead of looping until the route times out."""
    host = route_pb2.VirtualHost(name=name, domains=domains)
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
            timeout=duration(0),  # a tunnel lasts as long as the app keeps it
            upgrade_configs=[
                route_pb2.RouteAction.UpgradeConfig(
                    upgrade_type="CONNECT",
                    connect_config=route_pb2.RouteAction.UpgradeConfig.ConnectConfig(),
                )
            ],
        )
        host.routes.add(name=PASSTHROUGH_CLUSTER, match=connect, route=tunnel)
        passed = named_route(
            PASSTHROUGH_CLUSTER, route_pb2.RouteAction(cluster=PASSTHROUGH_CLUSTER)
        )
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
    host.routes.append(named_route(BLACK_HOLE_ROUTE, direct_response=refuse))
    return host
