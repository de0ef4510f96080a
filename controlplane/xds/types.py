"""xDS protocol constants: type URLs, which types are full state, and the push order."""

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# VHDS: the virtual hosts of a route config that names `vhds`, one resource each, named
# "<route config>/<host>"; the sidecars' scoped `egress` (Delta only, translate/scope).
VIRTUAL_HOST = "type.googleapis.com/envoy.config.route.v3.VirtualHost"
# ECDS: an HTTP filter's config served on its own (the gateway's dye filter, translate/gateway.py).
EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"

# The order of this tuple MATTERS: make-before-break. A new cluster must exist (CDS) and
# have endpoints (EDS) before a listener (LDS) or route (RDS) points at it, otherwise Envoy
# answers 503 "no cluster" for the gap (xDS protocol, "Eventual consistency considerations").
# The gateway's dye filter (ECDS) goes first: a route matching a new chain's dye header must
# not reach the gateway before the filter that strips that header from outside callers.
# Virtual hosts come last: they point at clusters, and belong to a route config.
PUSH_ORDER: tuple[str, ...] = (EXTENSION_CONFIG, CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST)
# Types that routes of the client point at clusters through (make-before-break waits for CDS).
ROUTING: frozenset[str] = frozenset({LISTENER, ROUTE, VIRTUAL_HOST})

# In the state-of-the-world protocol, LDS and CDS responses carry every resource and an
# absent name means "removed"; RDS and EDS are requested by name and sent one by one.
FULL_STATE: frozenset[str] = frozenset({CLUSTER, LISTENER})

SHORT_NAME: dict[str, str] = {
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    ROUTE: "rds",
    EXTENSION_CONFIG: "ecds",
    VIRTUAL_HOST: "vhds",
}

MESSAGE_CLASS = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    EXTENSION_CONFIG: extension_pb2.TypedExtensionConfig,
    VIRTUAL_HOST: route_components_pb2.VirtualHost,
}


def type_url_of(message) -> str:
    """The type URL of an Envoy resource message."""
    return "type.googleapis.com/" + message.DESCRIPTOR.full_name
