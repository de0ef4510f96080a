"""Clusters and endpoints: one EDS cluster per group of every service, and the aggregate
`loose` clusters that fail over from a task group to `default`.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    health_check_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, wrappers_pb2

from controlplane.model.group import DEFAULT_GROUP
from controlplane.translate.common import Address, ads_source, duration, packed
from controlplane.xds import wire
from controlplane.xds.names import (
    HEALTH_PATH,
    TASKLANE_METADATA,
    cluster_name,
    loose_cluster_name,
)

_HEALTH_INTERVAL_S = 1


# Retries in flight per cluster: a share of its active requests, and at least this many.
# Envoy's default is a fixed 3, so an instance dying under load (every request in flight to it
# needing a retry at once) overflows it and fails requests that a retry would have saved.
_RETRY_BUDGET_PERCENT = 25.0


_MIN_RETRY_CONCURRENCY = 32


def _protocol_options() -> dict[str, any_pb2.Any]:
    # HTTP/1.1 in, HTTP/1.1 out; h2 (gRPC) in, h2 out: one cluster kind for both protocols.
    options = upstream_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=upstream_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options={}, http2_protocol_options={}
        )
    )
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": packed(options)}


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
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
        connect_timeout=duration(1),
        # A deregistered instance leaves at once, even while it still passes health checks
        # (Envoy otherwise keeps routing to it: measured 8 s and counting).
        ignore_health_on_host_removal=True,
        # No panic routing: with every host unhealthy, `strict` must answer 503, not try them.
        common_lb_config=cluster_pb2.Cluster.CommonLbConfig(
            healthy_panic_threshold=percent_pb2.Percent(value=0),
            # Health changes take effect at once, not after Envoy's default 1 s merge window:
            # a resumed (keep-alive) instance serves ~85 ms after SIGCONT instead of ~1.1 s.
            update_merge_window=duration(0),
        ),
        health_checks=[
            health_check_pb2.HealthCheck(
                timeout=duration(1),
                interval=duration(_HEALTH_INTERVAL_S),
                no_traffic_interval=duration(_HEALTH_INTERVAL_S),
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
        connect_timeout=duration(1),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.aggregate", typed_config=packed(config)
        ),
        circuit_breakers=_retry_budget(),  # a route's retries count against its own cluster
    )


def _group_label(group: str) -> base_pb2.Metadata:
    label = base_pb2.Metadata()
    label.filter_metadata[TASKLANE_METADATA].update({"group": group})
    return label


def load_assignment(service: str, group: str, addresses: Sequence[Address]):
    """The endpoints of (service, group): the inbound listeners of its instances, each
    labelled with its group (a loose route's fallback header asks which group served)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(service, group))
    if addresses:
        label = _group_label(group)
        locality = cla.endpoints.add()
        for host, port in addresses:
            locality.lb_endpoints.append(
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(
                        address=address_pb2.Address(
                            socket_address=address_pb2.SocketAddress(address=host, port_value=port)
                        )
                    ),
                    metadata=label,
                )
            )
    return cla


# --- the same, serialised without building messages ------------------------------------------
#
# A mesh has three clusters and three assignments per service, ~60,000 at 10,000 services,
# and building each as a protobuf message to serialise it cost a third of a full build. Every
# group cluster is the same message but for its name and its health check's Host, so it is
# assembled from bytes: protobuf's deterministic serialisation writes fields in number order,
# and a message is its fields one after another, so the bytes before and after a varying
# field are serialised once. tests/unit/test_translate_encoded.py checks the result is
# byte-for-byte what SerializeToString(deterministic=True) gives.

_NAME, _HEALTH_CHECKS = 1, 8  # Cluster
_HTTP_HEALTH_CHECK = 8  # HealthCheck
_HOST = 1  # HealthCheck.HttpHealthCheck


def _split(message, number: int) -> tuple[bytes, bytes]:
    """Deterministic bytes of `message`'s fields numbered below `number`, and above it."""
    below, above = type(message)(), type(message)()
    below.CopyFrom(message)
    above.CopyFrom(message)
    for field, _ in message.ListFields():
        if field.number >= number:
            below.ClearField(field.name)
        if field.number <= number:
            above.ClearField(field.name)
    return below.SerializeToString(deterministic=True), above.SerializeToString(deterministic=True)


def _cluster_template() -> tuple[bytes, bytes, bytes, bytes, bytes]:
    cluster = group_cluster("s", "g")
    check = cluster.health_checks[0]
    cluster_before, cluster_after = _split(cluster, _HEALTH_CHECKS)
    cluster_before = cluster_before[len(wire.text(_NAME, cluster.name)) :]  # name goes first
    check_before, check_after = _split(check, _HTTP_HEALTH_CHECK)
    http_after = _split(check.http_health_check, _HOST)[1]
    return cluster_before, cluster_after, check_before, check_after, http_after


_CLUSTER = _cluster_template()


def group_cluster_bytes(service: str, group: str) -> bytes:
    """group_cluster(service, group), serialised."""
    cluster_before, cluster_after, check_before, check_after, http_after = _CLUSTER
    http = wire.text(_HOST, service) + http_after
    check = check_before + wire.field(_HTTP_HEALTH_CHECK, http) + check_after
    return (
        wire.text(_NAME, cluster_name(service, group))
        + cluster_before
        + wire.field(_HEALTH_CHECKS, check)
        + cluster_after
    )


def load_assignment_bytes(service: str, group: str, addresses: Sequence[Address]) -> bytes:
    """load_assignment(service, group, addresses), serialised: ClusterLoadAssignment
    {cluster_name = 1, endpoints = 2 {lb_endpoints = 2 {endpoint = 1 {address = 1
    {socket_address = 1 {address = 2, port_value = 3}}}, metadata = 3}}}."""
    out = wire.text(1, cluster_name(service, group))
    if not addresses:
        return out
    label = wire.field(3, _group_label(group).SerializeToString(deterministic=True))
    endpoints = b"".join(
        wire.field(
            2, wire.field(1, wire.field(1, wire.field(1, _socket_address(host, port)))) + label
        )
        for host, port in addresses
    )
    return out + wire.field(2, endpoints)


def _socket_address(host: str, port: int) -> bytes:
    return wire.text(2, host) + (wire.varint(3 << 3) + wire.varint(port) if port else b"")
