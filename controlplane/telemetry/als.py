"""Envoy's AccessLogService on the control plane's xDS port: every sidecar and the gateway
stream their HTTP access logs here (templates/sidecar.yaml, templates/gateway.yaml: the
`envoy.access_loggers.http_grpc` logger on the static `xds` cluster).

Each stream is one Envoy's one logger: its first message names the node (id and the
`tasklane.service` / `tasklane.group` metadata the ADS server reads too); later messages carry
only entries. Entries are flattened into `LogEntry` (plain values, no protobuf) so the
accounting stays pure and testable without Envoy.

Which listener logged an entry is the literal custom tag `tasklane.direction` (`egress`,
`inbound` or `gateway`) set in the templates: one logger config per HCM, so it is exact, and it
needs neither a log name per direction nor metadata from the translator.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from controlplane.model.group import GroupKey
from controlplane.telemetry.accounting import LogEntry
from controlplane.xds.names import FALLBACK_HEADER
from controlplane.xds.server import role_of

log = logging.getLogger(__name__)

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
DIRECTION_TAG = "tasklane.direction"
DYE_HEADER, BAGGAGE, REQUEST_ID = "x-task-dye", "baggage", "x-request-id"

# ResponseFlags field -> Envoy's short code (%RESPONSE_FLAGS%), as the docs and `tasklane top`
# name them. Fields missing here are new in Envoy and shown by their proto name.
FLAG_CODES = {
    "failed_local_healthcheck": "LH",
    "no_healthy_upstream": "UH",
    "unauthorized_details": "UAEX",
    "upstream_request_timeout": "UT",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_overflow": "UO",
    "no_route_found": "NR",
    "delay_injected": "DI",
    "fault_injected": "FI",
    "rate_limited": "RL",
    "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC",
    "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI",
    "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF",
    "no_filter_config_found": "NFCF",
    "duration_timeout": "DT",
    "upstream_protocol_error": "UPE",
    "no_cluster_found": "NC",
    "overload_manager": "OM",
    "dns_resolution_failure": "DF",
    "downstream_remote_reset": "DR",
}


@dataclass(frozen=True, slots=True)
class Source:
    """The Envoy a stream comes from, as its first message names it."""

    node: str
    service: str
    group: str


def source_of(identifier: als_pb2.StreamAccessLogsMessage.Identifier) -> Source:
    """The node of a stream's first message (metadata as the ADS server reads it)."""
    service, group = GroupKey.parse(role_of(identifier.node))
    return Source(identifier.node.id, service, group)


def _flags(flags: accesslog_pb2.ResponseFlags) -> frozenset[str]:
    # ListFields() holds only the set ones: true bools and a present `unauthorized_details`.
    return frozenset(FLAG_CODES.get(field.name, field.name) for field, _ in flags.ListFields())


def _address(address) -> str:
    socket = address.socket_address
    return f"{socket.address}:{socket.port_value}" if socket.address else ""


def parse_entry(source: Source, entry: accesslog_pb2.HTTPAccessLogEntry) -> LogEntry:
    """A LogEntry from one protobuf entry of `source`'s stream."""
    common, request = entry.common_properties, entry.request
    headers = request.request_headers
    total = common.time_to_last_downstream_tx_byte
    if not common.HasField("time_to_last_downstream_tx_byte"):
        total = common.duration
    return LogEntry(
        node=source.node,
        service=source.service,
        group=source.group,
        direction=common.custom_tags.get(DIRECTION_TAG, ""),
        route=common.route_name,
        cluster=common.upstream_cluster,
        upstream=_address(common.upstream_remote_address),
        authority=request.authority,
        request_id=request.request_id or headers.get(REQUEST_ID, ""),
        dye=headers.get(DYE_HEADER, ""),
        baggage=headers.get(BAGGAGE, ""),
        fallback=entry.response.response_headers.get(FALLBACK_HEADER, ""),
        status=entry.response.response_code.value,
        flags=_flags(common.response_flags),
        duration_ms=total.ToNanoseconds() / 1e6,
        at=common.start_time.seconds + common.start_time.nanos / 1e9,
    )


class AccessLogServer:
    """Serves StreamAccessLogs and hands each message's entries, parsed, to `sink`.

    `sink` runs on the event loop for every message (Envoy sends one per flush, ~200 ms per
    logger), so it must be quick; the accounting is.
    """

    def __init__(self, sink: Callable[[Sequence[LogEntry]], None]) -> None:
        self.sink = sink
        self.streams = 0  # open now
        self.entries: Counter[str] = Counter()  # by direction, since start
        self.undecodable = 0  # messages without a node first, or without HTTP entries

    async def _stream(
        self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage], context
    ) -> als_pb2.StreamAccessLogsResponse:
        self.streams += 1
        source: Source | None = None
        try:
            async for message in requests:
                if message.HasField("identifier"):
                    source = source_of(message.identifier)
                if source is None:
                    self.undecodable += 1
                    log.warning("access log stream without a node identifier: message ignored")
                    continue
                entries = [parse_entry(source, e) for e in message.http_logs.log_entry]
                if not entries:
                    continue
                for entry in entries:
                    self.entries[entry.direction] += 1
                try:
                    self.sink(entries)
                except Exception:  # a bug in the accounting must not close Envoy's stream
                    log.exception("access log entries of %s could not be accounted", source.node)
        finally:
            self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    def handler(self) -> grpc.GenericRpcHandler:
        """The gRPC handler, to serve beside ADS (`xds.server.serve(extra_handlers=...)`)."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self._stream,
                    request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )
