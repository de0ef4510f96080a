"""The ADS server: StreamAggregatedResources (SotW) and DeltaAggregatedResources over grpc.aio.

Responses are written as pre-assembled bytes (see `wire`), so each resource is serialised
once per version no matter how many streams receive it. Each stream is one reader task and
one writer loop; a slow or stuck client only ever blocks its own writer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from controlplane.model.group import DEFAULT_GROUP, GroupKey

from . import wire
from .cache import SnapshotCache
from .names import META_GROUP, META_SERVICE, canary_view
from .status import NodeStatus, StatusBoard
from .stream import Push, StreamState, authority_of
from .types import MESSAGE_CLASS, PUSH_ORDER, SHORT_NAME, VIRTUAL_HOST

log = logging.getLogger(__name__)
_ALL_TYPES = frozenset(PUSH_ORDER)  # what a stream moved to another view is told changed

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# A response the client has not taken off the wire after this long is logged: the stream's
# writer waits for it, and later versions are coalesced (never queued) meanwhile.
SLOW_WRITE_SECONDS = 10.0


class OnDemand(Protocol):
    """Hears of the hosts Delta sidecars ask for on demand (sync.Sync)."""

    def asked(self, node: str, role: str, authority: str) -> bool:
        """A sidecar's stream (`node`: its node id and stream) asked for a host its scope
        lacks: whether one will come (False: it is answered "not found" now)."""

    def gone(self, node: str) -> None:
        """That stream ended."""


def role_of(node: base_pb2.Node) -> str:
    """The role a node plays: "service|group", from its metadata or from `node.cluster`
    (written "service" or "service|group")."""
    fields = node.metadata.fields
    if META_SERVICE in fields:
        group = fields[META_GROUP].string_value if META_GROUP in fields else ""
        return str(GroupKey(fields[META_SERVICE].string_value, group or DEFAULT_GROUP))
    service, group = GroupKey.parse(node.cluster)
    return str(GroupKey(service or node.id, group or DEFAULT_GROUP))


class Observer:
    """Synchronous hooks on stream events (go-control-plane's callbacks): metrics, benchmarks
    and tests subclass it. Called on the event loop; must not block."""

    def opened(self, node: NodeStatus, identity: base_pb2.Node) -> None:
        """A stream began; `identity` is the node its first request carried."""

    def closed(self, node: NodeStatus) -> None:
        """The stream of `node` ended."""

    def pushed(self, node: NodeStatus, push: Push) -> None:
        """A response was written to the node's stream."""

    def acked(self, node: NodeStatus, type_url: str, version: str) -> None:
        """The node accepted the last response of this type."""

    def nacked(self, node: NodeStatus, type_url: str, version: str, message: str) -> None:
        """The node rejected the last response of this type."""


class Observers(Observer):
    """Several observers as one: each hook is called on each, in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def opened(self, node: NodeStatus, identity: base_pb2.Node) -> None:
        for observer in self.observers:
            observer.opened(node, identity)

    def closed(self, node: NodeStatus) -> None:
        for observer in self.observers:
            observer.closed(node)

    def pushed(self, node: NodeStatus, push: Push) -> None:
        for observer in self.observers:
            observer.pushed(node, push)

    def acked(self, node: NodeStatus, type_url: str, version: str) -> None:
        for observer in self.observers:
            observer.acked(node, type_url, version)

    def nacked(self, node: NodeStatus, type_url: str, version: str, message: str) -> None:
        for observer in self.observers:
            observer.nacked(node, type_url, version, message)


class _Stream:
    """One ADS stream: applies requests, wakes on snapshot changes, writes pushes."""

    def __init__(self, server: AdsServer, context: grpc.aio.ServicerContext, delta: bool):
        self.server = server
        self.context = context
        self.delta = delta
        self.state = StreamState(delta)
        self.wake = asyncio.Event()
        self.closed = False
        self.role = ""
        self.view = ""  # the snapshot key: the role's scoped view (Delta) or full view (SotW)
        self.status: NodeStatus | None = None
        self.writing: tuple[float, Push, int] | None = None  # (since, push, bytes) in flight
        self.slow_reported = False
        self.unreadable = ""  # why a request could not be decoded, if one could not
        self.asked = False  # for a host on demand

    def snapshot_changed(self, types: frozenset[str]) -> None:
        self.state.mark_changed(types)
        self.wake.set()

    async def run(self, requests: AsyncIterator) -> None:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        except DecodeError as exc:
            log.warning("stream refused: undecodable first request: %s", exc)
            await self.context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {exc}"
            )
        if not first.HasField("node") or not first.node.id:
            log.warning("stream refused: the first request carries no node id")
            await self.context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry a node with an id"
            )
        self.role = role_of(first.node)
        cache, board = self.server.cache, self.server.status
        self.status = board.connect(first.node.id, self.role, "delta" if self.delta else "sotw")
        self.view = self.server.view_of(self)
        cache.watch(self.view, self)
        self.server.observer.opened(self.status, first.node)
        reader = asyncio.create_task(self._read(first, requests))
        try:
            await self._write_loop()
        finally:
            reader.cancel()
            cache.unwatch(self.view, self)
            if self.asked:
                self.server.on_demand.gone(self._asker())
            board.disconnect(self.status)
            self.server.observer.closed(self.status)
            log.info("stream closed: node %s (%s)", first.node.id, self.role)
        if self.unreadable:
            await self.context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request: {self.unreadable}"
            )

    async def _read(self, first, requests: AsyncIterator) -> None:
        try:
            self._apply(first)
            async for request in requests:
                self._apply(request)
        except asyncio.CancelledError:
            raise
        except DecodeError as exc:
            self.unreadable = str(exc)
            log.warning("stream of %s closed: undecodable request: %s", self.status.node_id, exc)
        except Exception as exc:  # a broken client must not take the server down
            log.info("stream of %s ended: %s", self.status.node_id if self.status else "?", exc)
        finally:
            self.closed = True
            self.wake.set()

    def _apply(self, request) -> None:
        type_url = request.type_url
        if type_url not in MESSAGE_CLASS:
            log.warning("node %s asked for unknown type %r: ignored", self.status.node_id, type_url)
            return
        error = request.HasField("error_detail")
        known = self.state.types.get(type_url)
        before = set(known.names) if known is not None else set()
        if self.delta:
            verdict = self.state.on_delta_request(
                type_url,
                request.resource_names_subscribe,
                request.resource_names_unsubscribe,
                request.initial_resource_versions,
                request.response_nonce,
                error,
            )
        else:
            verdict = self.state.on_sotw_request(
                type_url, request.resource_names, request.response_nonce, error
            )
        state = self.state.types[type_url]
        if type_url == VIRTUAL_HOST:
            self._ask_on_demand()
        else:
            self._log_absent(type_url, state.names - before)
        if verdict.stale:
            log.debug(
                "node %s: stale nonce %r for %s",
                self.status.node_id,
                request.response_nonce,
                SHORT_NAME[type_url],
            )
        elif verdict.nack:
            message = request.error_detail.message
            log.warning(
                "node %s rejected %s version %s: %s",
                self.status.node_id,
                SHORT_NAME[type_url],
                state.version,
                message,
            )
            self.status.nacked(type_url, state.version, message)
            self.server.observer.nacked(self.status, type_url, state.version, message)
        elif verdict.ack:
            self.status.acked(type_url, state.version)
            self.server.observer.acked(self.status, type_url, state.version)
        self.wake.set()

    def _ask_on_demand(self) -> None:
        """Hosts asked for on demand that the snapshot lacks: the control plane adds them to
        the role's scope (they come with a later snapshot) or says they never will."""
        on_demand, node = self.server.on_demand, self._asker()
        missing = []
        for name in self.state.unresolved(self.server.cache.snapshot(self.view)):
            if on_demand is None or not on_demand.asked(node, self.role, authority_of(name)):
                missing.append(name)
            self.asked = on_demand is not None
        if missing:
            self.state.declare_missing(missing)

    def _asker(self) -> str:
        """Who asked, for OnDemand: this stream (a reconnecting sidecar's old stream may end
        after its new one asked again)."""
        return f"{self.status.node_id}#{self.status.stream_id}"

    def _log_absent(self, type_url: str, new_names: set[str]) -> None:
        """Newly requested names the role's snapshot lacks: sent when they appear (delta
        also lists them in removed_resources)."""
        snapshot = self.server.cache.snapshot(self.view)
        present = snapshot.resources(type_url) if snapshot is not None else {}
        absent = sorted(n for n in new_names if n not in present)
        if absent:
            log.info(
                "node %s asked for %s %s, absent from its snapshot: sent when they appear",
                self.status.node_id,
                SHORT_NAME[type_url],
                ", ".join(absent),
            )

    async def _write(self, data: bytes, push: Push) -> None:
        """Write one response. A plain await: the server's watchdog notices unread writes
        (a timer per write cost a third of the server's CPU at 5000 streams)."""
        self.writing = (time.monotonic(), push, len(data))
        try:
            await self.context.write(data)
        finally:
            self.writing = None
            self.slow_reported = False

    def report_if_slow(self, now: float) -> None:
        """Log (once per write) a client that leaves a response unread."""
        if self.writing is None or self.slow_reported:
            return
        started, push, size = self.writing
        if now - started >= SLOW_WRITE_SECONDS:
            self.slow_reported = True
            log.warning(
                "node %s is not reading: a %s response of %d bytes is unread after %.1fs;"
                " newer versions are coalesced until it is",
                self.status.node_id,
                SHORT_NAME[push.type_url],
                size,
                now - started,
            )

    async def _write_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.closed:
                return
            # The snapshot is read afresh for every push: one that changed while a write was
            # blocked has marked its types dirty, and planning them against the snapshot of
            # before the write would clear the flag and never send the new version.
            while (push := self.state.next_push(self.server.cache.snapshot(self.view))) is not None:
                await self._write(self._encode(push), push)
                self.status.sent(push.type_url, push.version)
                self.server.observer.pushed(self.status, push)
                if self.closed:
                    return

    def _encode(self, push: Push) -> bytes:
        nonce = self.state.new_nonce(push.type_url)
        if self.delta:
            entries = [r.delta_entry for r in push.resources]
            return wire.delta_response(push.version, entries, push.type_url, push.removed, nonce)
        entries = [r.sotw_entry for r in push.resources]
        return wire.sotw_response(push.version, entries, push.type_url, nonce)


class AdsServer:
    """Serves the cache's snapshots to every connected sidecar over ADS."""

    def __init__(
        self,
        cache: SnapshotCache,
        status: StatusBoard | None = None,
        observer: Observer | None = None,
        on_demand: OnDemand | None = None,
        sotw_view: Callable[[str], str] = str,
        canary: Callable[[str, str], bool] = lambda node, role: False,
    ) -> None:
        """`on_demand` hears of hosts Delta streams ask for on demand; `sotw_view(role)` is
        the snapshot key state-of-the-world streams of a role watch (names.full_view when the
        Delta streams' snapshots are scoped; by default the same key). `canary(node, role)`
        says whether a node (just connected) is one of a rollout's canaries, which watch
        their view's names.canary_view: asked when a stream opens and by `rekey`."""
        self.cache = cache
        self.status = status or StatusBoard()
        self.observer = observer or Observer()
        self.on_demand = on_demand
        self.sotw_view = sotw_view
        self.canary = canary
        self._streams: set[_Stream] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    def view_of(self, stream: _Stream) -> str:
        """The snapshot key a stream watches."""
        view = stream.role if stream.delta else self.sotw_view(stream.role)
        assert stream.status is not None, "asked once the stream is connected"
        return canary_view(view) if self.canary(stream.status.node_id, stream.role) else view

    def rekey(self) -> None:
        """Move every stream whose view changed (a rollout started or ended) to its new
        snapshot; it is sent what differs, in the usual make-before-break order."""
        for stream in list(self._streams):
            if stream.status is None or stream.closed:
                continue
            view = self.view_of(stream)
            if view != stream.view:
                self.cache.unwatch(stream.view, stream)
                stream.view = view
                self.cache.watch(view, stream)
                stream.snapshot_changed(_ALL_TYPES)

    async def _serve(self, stream: _Stream, requests: AsyncIterator) -> None:
        self._streams.add(stream)
        if self._watchdog is None:
            self._schedule_watchdog()
        try:
            await stream.run(requests)
        finally:
            self._streams.discard(stream)

    def _schedule_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(SLOW_WRITE_SECONDS / 4, self._report_slow_writes)

    def _report_slow_writes(self) -> None:
        """One timer for all streams (not one per write); it stops with the last stream."""
        now = time.monotonic()
        for stream in tuple(self._streams):
            stream.report_if_slow(now)
        if self._streams:
            self._schedule_watchdog()
        else:
            self._watchdog = None

    async def _sotw(self, requests: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
        await self._serve(_Stream(self, context, delta=False), requests)

    async def _delta(self, requests: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
        await self._serve(_Stream(self, context, delta=True), requests)

    def handler(self) -> grpc.GenericRpcHandler:
        """The gRPC handler; responses are pre-encoded bytes, hence the identity serializer."""
        identity = bytes
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=identity,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=identity,
                ),
            },
        )


async def serve(
    ads: AdsServer,
    address: str,
    extra_handlers: tuple = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for ADS (and any extra handlers) on address ("host:port";
    port 0 picks a free one), over TLS with `credentials`, else plaintext. Returns the
    server and the bound port."""
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.max_concurrent_streams", 100_000),
            # grpcio binds with SO_REUSEPORT by default: a second control plane on the same
            # port would silently share connections with the first instead of failing.
            ("grpc.so_reuseport", 0),
            # grpc.aio admits one new call per loop turn and refuses calls queued beyond
            # 1000/3000 by default: a fleet of sidecars reconnecting at once (a control-plane
            # restart) must wait, not fail (measured: bench/xds_push.py, 5000 streams).
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ]
    )
    server.add_generic_rpc_handlers((ads.handler(), *extra_handlers))
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
