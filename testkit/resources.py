"""Builders for Envoy resources that real Envoy accepts, shared by the xDS tests."""

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _any(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def cluster(name: str, connect_timeout_s: int = 1) -> cluster_pb2.Cluster:
    """An EDS cluster fed over ADS."""
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(seconds=connect_timeout_s),
    )


def endpoints(
    name: str, *ports: int, host: str = "127.0.0.1"
) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    group = cla.endpoints.add()
    for port in ports:
        lb = group.lb_endpoints.add()
        lb.endpoint.address.socket_address.CopyFrom(
            address_pb2.SocketAddress(address=host, port_value=port)
        )
    return cla


def listener(name: str, port: int, route_name: str) -> listener_pb2.Listener:
    """An HTTP listener on 127.0.0.1:port whose routes come from RDS over ADS."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(route_config_name=route_name, config_source=_ads()),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())
            )
        ],
    )
    out = listener_pb2.Listener(name=name)
    out.address.socket_address.CopyFrom(
        address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )
    chain = out.filter_chains.add()
    chain.filters.add(
        name="envoy.filters.network.http_connection_manager", typed_config=_any(manager)
    )
    return out


def route(name: str, routes: dict[str, str]) -> route_pb2.RouteConfiguration:
    """A route configuration: path prefix -> cluster, one virtual host for every domain."""
    config = route_pb2.RouteConfiguration(name=name)
    host = config.virtual_hosts.add(name="all", domains=["*"])
    for prefix, target in sorted(routes.items(), key=lambda kv: -len(kv[0])):
        entry = host.routes.add()
        entry.match.prefix = prefix
        entry.route.cluster = target
    return config


def regex_route(name: str, pattern: str, target: str) -> route_pb2.RouteConfiguration:
    """A route whose path regex Envoy will (or will not) compile: used to provoke a NACK."""
    config = route_pb2.RouteConfiguration(name=name)
    host = config.virtual_hosts.add(name="all", domains=["*"])
    entry = host.routes.add()
    entry.match.safe_regex.regex = pattern
    entry.route.cluster = target
    return config
