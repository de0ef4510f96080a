"""An ADS client that behaves like Envoy, for tests and benchmarks.

It subscribes (SotW or delta), ACKs every response unless told to NACK the next one, and
records when each response arrived, so protocol rules and push latency are observed from
outside the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from controlplane.xds.server import SERVICE
from controlplane.xds.types import CLUSTER, ENDPOINT, FULL_STATE, MESSAGE_CLASS


@dataclass(frozen=True)
class Received:
    at: float
    type_url: str
    version: str
    nonce: str
    names: tuple[str, ...]
    removed: tuple[str, ...] = ()
    nacked: bool = False


@dataclass
class _TypeView:
    names: set[str] = field(default_factory=set)
    version: str = ""  # last accepted version_info (SotW)
    resources: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # name -> (version, Any)


class AdsClient:
    """One ADS stream. Use `async with AdsClient(...) as client:`."""

    def __init__(
        self,
        target: str,
        node_id: str,
        cluster: str = "",
        metadata: dict[str, str] | None = None,
        delta: bool = False,
        channel: grpc.aio.Channel | None = None,
        follow_clusters: bool = False,
    ) -> None:
        """follow_clusters: like Envoy, subscribe to the endpoints of every cluster received
        (and drop those of removed clusters) before ACKing the cluster response."""
        self.target = target
        self.delta = delta
        self.follow_clusters = follow_clusters
        self.node = base_pb2.Node(id=node_id, cluster=cluster)
        if metadata:
            self.node.metadata.CopyFrom(
                struct_pb2.Struct(
                    fields={k: struct_pb2.Value(string_value=v) for k, v in metadata.items()}
                )
            )
        self._own_channel = channel is None
        self._channel = channel
        self._requests: asyncio.Queue = asyncio.Queue()
        self._node_sent = False
        self._views: dict[str, _TypeView] = {}
        self._nack_next: dict[str, str] = {}
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task | None = None
        self.received: list[Received] = []
        self.on_response: Callable[[Received], None] | None = None
        self.error: BaseException | None = None

    async def __aenter__(self) -> AdsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
        if self.delta:
            method = self._channel.stream_stream(
                f"/{SERVICE}/DeltaAggregatedResources",
                request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
            )
        else:
            method = self._channel.stream_stream(
                f"/{SERVICE}/StreamAggregatedResources",
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
        self._call = method(self._request_stream())
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        self._requests.put_nowait(None)
        if self._reader is not None:
            self._call.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._own_channel and self._channel is not None:
            await self._channel.close()

    # --- what a test does -----------------------------------------------------------------

    def subscribe(
        self, type_url: str, names: Iterable[str] = (), held: Mapping[str, str] | None = None
    ) -> None:
        """Ask for names of a type (none = wildcard for LDS/CDS). `held` (delta): versions
        kept from an earlier stream, sent as initial_resource_versions like a reconnecting
        Envoy does."""
        view = self._views.setdefault(type_url, _TypeView())
        new = set(names) - view.names
        view.names |= new
        if self.delta:
            for name, version in (held or {}).items():
                view.resources[name] = (version, b"")
            self._send(type_url, subscribe=sorted(new), initial=held or {})
        else:
            self._send(type_url, version=view.version)

    def unsubscribe(self, type_url: str, names: Iterable[str]) -> None:
        view = self._views[type_url]
        gone = set(names) & view.names
        view.names -= gone
        for name in gone:
            view.resources.pop(name, None)
        if self.delta:
            self._send(type_url, unsubscribe=sorted(gone))
        else:
            self._send(type_url, version=view.version)

    def nack_next(self, type_url: str, message: str = "rejected by test") -> None:
        """Reject the next response of this type, as Envoy does with an invalid resource."""
        self._nack_next[type_url] = message

    def send_raw(self, request) -> None:
        """Send a request exactly as given (for malformed-input tests)."""
        self._requests.put_nowait(request)

    def resources(self, type_url: str) -> dict[str, str]:
        """What the client holds: name -> version."""
        view = self._views.get(type_url)
        return {n: v for n, (v, _) in view.resources.items()} if view else {}

    def payload(self, type_url: str, name: str) -> bytes:
        return self._views[type_url].resources[name][1]

    def count(self, type_url: str | None = None) -> int:
        return sum(1 for r in self.received if type_url in (None, r.type_url))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until predicate() holds after some response; TimeoutError otherwise."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    # --- the stream -----------------------------------------------------------------------

    def _send(
        self,
        type_url: str,
        *,
        version: str = "",
        nonce: str = "",
        error: str = "",
        subscribe=(),
        unsubscribe=(),
        initial: Mapping[str, str] | None = None,
    ) -> None:
        if self.delta:
            request = discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url,
                response_nonce=nonce,
                resource_names_subscribe=subscribe,
                resource_names_unsubscribe=unsubscribe,
                initial_resource_versions=initial or {},
            )
        else:
            names = self._views[type_url].names
            request = discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=version,
                response_nonce=nonce,
                resource_names=sorted(names),
            )
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        if not self._node_sent:
            request.node.CopyFrom(self.node)
            self._node_sent = True
        self._requests.put_nowait(request)

    async def _request_stream(self):
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self._on_response(response)
                async with self._changed:
                    self._changed.notify_all()
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            self.error = exc
        finally:
            async with self._changed:
                self._changed.notify_all()

    def _on_response(self, response) -> None:
        type_url = response.type_url
        view = self._views.setdefault(type_url, _TypeView())
        nack = self._nack_next.pop(type_url, "")
        if self.delta:
            version = response.system_version_info
            names = tuple(r.name for r in response.resources)
            removed = tuple(response.removed_resources)
            if not nack:
                for res in response.resources:
                    view.resources[res.name] = (res.version, res.resource.SerializeToString())
                for name in removed:
                    view.resources.pop(name, None)
        else:
            version = response.version_info
            names = tuple(_name_of(a) for a in response.resources)
            removed = ()
            if not nack:
                entries = {
                    name: (version, a.SerializeToString())
                    for name, a in zip(names, response.resources, strict=True)
                }
                if type_url in FULL_STATE:
                    view.resources = entries
                else:
                    view.resources.update(entries)
                view.version = version
        record = Received(
            time.monotonic(), type_url, version, response.nonce, names, removed, bool(nack)
        )
        self.received.append(record)
        if self.on_response is not None:
            self.on_response(record)
        if self.follow_clusters and type_url == CLUSTER and not nack:
            self._follow(set(view.resources))
        self._send(type_url, version=view.version, nonce=response.nonce, error=nack)

    def _follow(self, clusters: set[str]) -> None:
        eds = self._views.get(ENDPOINT)
        held = eds.names if eds else set()
        if clusters - held:
            self.subscribe(ENDPOINT, clusters - held)
        if held - clusters:
            self.unsubscribe(ENDPOINT, held - clusters)


def _name_of(resource) -> str:
    """The name inside a packed resource (ClusterLoadAssignment calls it cluster_name)."""
    message = MESSAGE_CLASS[resource.type_url]()
    resource.Unpack(message)
    return message.cluster_name if resource.type_url == ENDPOINT else message.name
