"""The `inbound` route config: what the app of (service, group) accepts. A task group takes
only its chains' dyes, each with the hop's rate limit; anything else gets a bounded 403
that says why. `default` accepts all.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from envoy.config.core.v3 import (
    base_pb2,
)
from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.config.route.v3 import route_pb2 as route_config_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import wrappers_pb2

from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.rules import Hop, Service
from controlplane.translate.common import ChainHop, duration, named_route, packed, service_action
from controlplane.translate.matcher import bounded_parts, dye_host
from controlplane.xds.names import (
    INBOUND_ROUTE,
    LOCAL_APP_CLUSTER,
    LOCAL_RATE_LIMIT,
)

# Envoy refuses a direct response body over the route config's
# `max_direct_response_body_size_bytes` (default 4096): the inbound 403's lists of chains and
# dye carriers are cut to these many characters each, the rest counted.
_MAX_LISTED_CHAINS = 600


_MAX_LISTED_CARRIERS = 300


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
            fill_interval=duration(interval_ms / 1000),
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
    shown = bounded_parts(names, budget, separator=", ")[0]
    rest = len(names) - len(shown)
    return ", ".join(shown)[:budget] + (f" and {rest} more" if rest else "")  # cuts a long one


def inbound_route(
    service: Service, group: str, hops: Sequence[ChainHop], instances: int
) -> route_config_pb2.RouteConfiguration:
    """What the app of (service, group) accepts. The rate limit of a hop applies here, at
    the instances of the hop's group, to that chain's dyed requests only."""
    to_app = service_action(service)
    to_app.cluster = LOCAL_APP_CLUSTER
    entries = []
    for entry in hops:
        route = named_route(entry.chain.name, to_app)
        if entry.hop.rate_limit is not None:
            route.typed_per_filter_config[LOCAL_RATE_LIMIT].CopyFrom(
                packed(local_rate_limit(entry.hop, instances))
            )
        entries.append((entry.chain, route))
    if group == DEFAULT_GROUP:
        otherwise = named_route("online", to_app)
    else:
        otherwise = named_route(
            "refused",
            direct_response=route_pb2.DirectResponseAction(
                status=403,
                body=base_pb2.DataSource(inline_string=refusal(service.name, group, hops)),
            ),
        )
    host = route_pb2.VirtualHost(name=INBOUND_ROUTE, domains=["*"])
    if entries:
        dye_host(host, entries, otherwise)
    else:
        host.routes.append(otherwise)
    return route_config_pb2.RouteConfiguration(name=INBOUND_ROUTE, virtual_hosts=[host])
