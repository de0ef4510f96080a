"""What a sidecar whose role no rule defines is served: its listeners answer 503 and say why.

A sidecar's listeners are static (templates/sidecar.yaml) and wait for their route configs; with
no answer at all its Envoy never becomes ready and nothing tells the operator that the Service
(or the group) is missing. So the snapshot cache serves such a role this minimal snapshot:
the route configs `egress` and `inbound`, each answering every request with 503 and a
one-line reason naming the missing Service, and no cluster. When the rules define the role,
its real snapshot replaces this one.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.config.route.v3 import route_pb2 as route_config_pb2

from controlplane.model.group import DEFAULT_GROUP, GroupKey
from controlplane.xds.names import EGRESS_ROUTE, INBOUND_ROUTE
from controlplane.xds.snapshot import Snapshot

UNKNOWN_STATUS = 503


def missing_rule(role: str) -> str:
    """What the rules lack for `role`, e.g. `the rules have no Service "ghost"`."""
    service, group = GroupKey.parse(role)
    if group == DEFAULT_GROUP:
        return f'the rules have no Service "{service}"'
    return f'the rules have no Service "{service}" with a group "{group}"'


def unknown_reason(role: str) -> str:
    """The one-line answer of an unknown role's listeners."""
    return f"tasklane: {missing_rule(role)}: apply it to serve this sidecar ({role})\n"


def _answering(name: str, reason: str) -> route_config_pb2.RouteConfiguration:
    route = route_pb2.Route(
        name="unknown-service",
        match=route_pb2.RouteMatch(prefix="/"),
        direct_response=route_pb2.DirectResponseAction(
            status=UNKNOWN_STATUS, body=base_pb2.DataSource(inline_string=reason)
        ),
    )
    host = route_pb2.VirtualHost(name=name, domains=["*"], routes=[route])
    return route_config_pb2.RouteConfiguration(name=name, virtual_hosts=[host])


def unknown_role_snapshot(role: str) -> Snapshot:
    """The snapshot of a role no rule defines: both listeners answer 503 with the reason."""
    reason = unknown_reason(role)
    return Snapshot.of(_answering(name, reason) for name in (EGRESS_ROUTE, INBOUND_ROUTE))
