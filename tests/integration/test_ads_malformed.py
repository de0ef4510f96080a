"""Malformed DiscoveryRequests and hostile clients, SotW and delta: the server never crashes,
never lets one stream slow the others, and logs a reason for each. Also: each resource is
serialised once per version, whatever the number of streams that receive it.

Protocol rules already covered by test_ads_protocol.py (a stale nonce changing SotW names is
ignored, honoured in delta; delta lists absent EDS names as removed; partial EDS sets) are not
repeated here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.xds import server as xds_server
from controlplane.xds import wire
from controlplane.xds.server import SERVICE
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.types import CLUSTER, ENDPOINT, ROUTE
from testkit import resources as rs
from testkit.ads_server import running_ads
from tests.support.ads import MODES, ROLE, async_test, base, client, eventually, quiet, snap

pytestmark = pytest.mark.in_process  # in-process server and clients: `make test-fast` runs it

LOGGER = "controlplane.xds.server"


def logged(caplog, *parts: str) -> list[str]:
    """Messages of the server's logger that contain every one of `parts`."""
    return [
        m
        for r in caplog.records
        if r.name == LOGGER and all(p in (m := r.getMessage()) for p in parts)
    ]


def request(delta: bool, type_url: str, names=(), node: base_pb2.Node | None = None, **fields):
    """A first or later request, built by hand (no help from AdsClient)."""
    if delta:
        out = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=names, **fields
        )
    else:
        out = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, **fields)
    if node is not None:
        out.node.CopyFrom(node)
    return out


class RawStream:
    """One ADS stream with nothing Envoy-like about it: requests are sent as given (protobuf
    messages through the generated stub, or raw bytes), and responses are only read when
    the test asks."""

    def __init__(self, target: str, delta: bool, raw_bytes: bool = False) -> None:
        self.channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", -1)]
        )
        self._queue: asyncio.Queue = asyncio.Queue()
        if raw_bytes:  # no serialisers: bytes go on the wire as they are
            method = "DeltaAggregatedResources" if delta else "StreamAggregatedResources"
            rpc = self.channel.stream_stream(f"/{SERVICE}/{method}")
        else:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
            rpc = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.call = rpc(self._requests())

    async def _requests(self):
        while (item := await self._queue.get()) is not None:
            yield item

    def send(self, item) -> None:
        self._queue.put_nowait(item)

    async def read(self, timeout: float = 5.0):
        return await asyncio.wait_for(self.call.read(), timeout)

    async def code(self, timeout: float = 5.0) -> grpc.StatusCode:
        """The status the stream ended with (responses before it are read and dropped: gRPC
        gives the status only once they are consumed)."""

        async def drain() -> grpc.StatusCode:
            try:
                async for _ in self.call:
                    pass
            except grpc.aio.AioRpcError:
                pass
            return await self.call.code()

        return await asyncio.wait_for(drain(), timeout)

    async def __aenter__(self) -> RawStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.call.cancel()
        self._queue.put_nowait(None)
        await self.channel.close()


def rss_bytes() -> int:
    """Resident memory of this process (server and clients both run in it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- 1. unknown type_url -------------------------------------------------------------------


@MODES
@pytest.mark.parametrize(
    "bad_type",
    [
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",  # not served
        "type.googleapis.com/no.such.Message",
        "",
    ],
    ids=["sds", "nonsense", "empty"],
)
@async_test
async def test_unknown_type_url_is_logged_and_ignored_and_the_stream_keeps_working(
    delta, bad_type, caplog
):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta) as c:
            c.subscribe(bad_type, ["x"])  # the first request: carries the node
            await eventually(lambda: logged(caplog, "n1", repr(bad_type)))
            assert await quiet(c) == 0
            assert srv.ads.status.get("n1") is not None  # the stream is open and registered
            c.subscribe(CLUSTER)
            c.subscribe(ROUTE, ["egress"])
            await c.wait_for(lambda: len(c.resources(CLUSTER)) == 2 and c.resources(ROUTE))
            c.subscribe(bad_type, ["y"])  # again, mid-stream
            await eventually(lambda: len(logged(caplog, "n1", repr(bad_type))) >= 2)
            srv.cache.set_snapshot(ROLE, snap(*base({"/": "b"})))
            await c.wait_for(lambda: c.count(ROUTE) >= 2)
            assert c.count(bad_type) == 0
            assert bad_type not in srv.ads.status.get("n1").types
            assert c.error is None


# --- 2. first request without a node id ----------------------------------------------------


@MODES
@pytest.mark.parametrize(
    "node",
    [None, base_pb2.Node(id="", cluster=ROLE, user_agent_name="envoy")],
    ids=["no-node", "empty-node-id"],
)
@async_test
async def test_first_request_without_node_id_is_refused_and_others_keep_their_updates(
    delta, node, caplog
):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta, "good") as good:
            good.subscribe(ROUTE, ["egress"])
            await good.wait_for(lambda: good.resources(ROUTE))
            async with client(srv.target, delta, "ignored") as bad:
                bad.send_raw(request(delta, CLUSTER, node=node))
                await bad.wait_for(lambda: bad.error is not None)
                assert bad.error.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "node" in bad.error.details()
                assert bad.count() == 0
            assert logged(caplog, "refused", "no node id")
            assert [n.node_id for n in srv.ads.status.nodes()] == ["good"]
            before = good.resources(ROUTE)["egress"]
            srv.cache.set_snapshot(ROLE, snap(*base({"/": "b"})))
            await good.wait_for(lambda: good.resources(ROUTE)["egress"] != before, timeout=1.0)
            assert good.error is None


# --- 3. garbage nonce ----------------------------------------------------------------------


@MODES
@async_test
async def test_ack_and_nack_with_a_garbage_nonce_are_logged_not_recorded_not_answered(
    delta, caplog
):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta) as c:
            c.subscribe(ROUTE, ["egress"])
            await c.wait_for(lambda: c.resources(ROUTE))
            node = srv.ads.status.get("n1")
            # (the server records what it sent once the write returns: maybe after the read)
            await eventually(lambda: ROUTE in node.types)
            status = node.types[ROUTE]
            await eventually(lambda: status.acked_version == status.sent_version != "")
            acked = status.acked_version
            names = () if delta else ["egress"]  # SotW repeats the names it holds
            forged_nack = request(delta, ROUTE, names, response_nonce="garbage-nonce")
            forged_nack.error_detail.message = "forged rejection"
            c.send_raw(forged_nack)
            forged_ack = request(delta, ROUTE, names, response_nonce="other-garbage")
            if not delta:
                forged_ack.version_info = "forged-version"
            c.send_raw(forged_ack)
            await eventually(lambda: logged(caplog, "n1", "'other-garbage'"))
            assert logged(caplog, "n1", "'garbage-nonce'")
            assert await quiet(c) == 0
            assert status.nacks == 0 and status.last_nack is None
            assert status.acked_version == acked
            # The stream's state is intact: the next change is pushed and ACKed as usual.
            srv.cache.set_snapshot(ROLE, snap(*base({"/": "b"})))
            await c.wait_for(lambda: c.count(ROUTE) == 2)
            await eventually(lambda: status.acked_version == c.received[-1].version != acked)
            assert status.nacks == 0


# --- 4. names of absent resources ----------------------------------------------------------


@MODES
@pytest.mark.parametrize("type_url", [ROUTE, ENDPOINT], ids=["rds", "eds"])
@async_test
async def test_request_for_only_absent_names_is_logged_and_answered_when_they_appear(
    delta, type_url, caplog
):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    ghost = rs.route("ghost", {"/": "a"}) if type_url == ROUTE else rs.endpoints("ghost", 9500)
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta) as c:
            c.subscribe(type_url, ["ghost"])
            await eventually(lambda: logged(caplog, "n1", "ghost", "absent"))
            if delta:  # delta can say "absent": the name is listed as removed
                await c.wait_for(lambda: c.count() == 1)
                assert c.received[0].removed == ("ghost",)
                assert c.received[0].names == ()
            else:  # SotW cannot: nothing at all is sent
                assert await quiet(c) == 0
            assert await quiet(c) == 0
            assert srv.ads.status.get("n1") is not None
            srv.cache.set_snapshot(ROLE, snap(*base(), ghost))
            await c.wait_for(lambda: "ghost" in c.resources(type_url))
            assert c.received[-1].names == ("ghost",)
            assert c.error is None


# --- 5. a client that never reads ----------------------------------------------------------

BIG_MB = 3
UPDATES = 40


def big_route(version: int) -> route_pb2.RouteConfiguration:
    """A RouteConfiguration of about BIG_MB megabytes whose virtual host names its version."""
    config = rs.route("big", {"/": "a"})
    host = config.virtual_hosts[0]
    host.name = f"v{version}"
    chunk = 10_000
    for i in range(BIG_MB * 1_000_000 // chunk):
        entry = host.routes.add()
        entry.match.prefix = f"/{version}/{i}/" + "x" * chunk
        entry.route.cluster = "a"
    return config


def with_big(version: int) -> Snapshot:
    return snap(*base({"/": "a", f"/v{version}": "b"}), big_route(version))


def big_version_of(response, delta: bool) -> str:
    """The virtual host name ("v<n>") of the big route in a raw response."""
    packed = response.resources[0].resource if delta else response.resources[0]
    config = route_pb2.RouteConfiguration()
    assert packed.Unpack(config)
    return config.virtual_hosts[0].name


@MODES
@async_test
async def test_client_that_never_reads_neither_slows_others_nor_makes_the_server_queue(
    delta, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    monkeypatch.setattr(xds_server, "SLOW_WRITE_SECONDS", 0.5)
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, with_big(0))
        size = len(srv.cache.snapshot(ROLE).resources(ROUTE)["big"].payload)
        assert size >= BIG_MB * 1_000_000
        async with (
            RawStream(srv.target, delta) as stuck,
            client(srv.target, delta, "good") as good,
        ):
            stuck.send(request(delta, ROUTE, ["big"], node=base_pb2.Node(id="stuck", cluster=ROLE)))
            good.subscribe(ROUTE, ["egress"])
            await good.wait_for(lambda: good.resources(ROUTE))
            await eventually(lambda: srv.ads.status.get("stuck") is not None)
            await asyncio.sleep(0.2)
            rss_before = rss_bytes()
            latencies = []
            for version in range(1, UPDATES + 1):
                seen = good.count(ROUTE)
                published = time.monotonic()
                srv.cache.set_snapshot(ROLE, with_big(version))
                await good.wait_for(lambda n=seen: good.count(ROUTE) > n, timeout=1.0)
                latencies.append(good.received[-1].at - published)
            growth = rss_bytes() - rss_before
            assert max(latencies) < 1.0, latencies
            # Queueing every version for the stuck stream would hold UPDATES * size bytes.
            assert growth < UPDATES * size // 2, f"RSS grew {growth >> 20} MiB"
            await eventually(lambda: logged(caplog, "stuck", "not reading", "rds"))
            assert srv.ads.status.get("stuck") is not None  # slow is not a reason to drop it
            # Now it reads: what was already on the wire, then straight to the latest version.
            # The versions published meanwhile were coalesced, never queued.
            versions = []
            while not versions or versions[-1] != f"v{UPDATES}":
                versions.append(big_version_of(await stuck.read(), delta))
            assert len(versions) <= UPDATES // 2, versions
            assert versions[0] == "v0"


# --- 6. undecodable and oversized requests -------------------------------------------------


@MODES
@pytest.mark.parametrize("case", ["garbage-first", "truncated-first", "garbage-later"])
@async_test
async def test_undecodable_request_closes_only_its_stream_with_invalid_argument(
    delta, case, caplog
):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    valid = request(delta, CLUSTER, node=base_pb2.Node(id="bad", cluster=ROLE))
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta, "good") as good:
            good.subscribe(ROUTE, ["egress"])
            await good.wait_for(lambda: good.resources(ROUTE))
            async with RawStream(srv.target, delta, raw_bytes=True) as bad:
                if case == "garbage-first":
                    bad.send(b"\xff\xff\xff\xff\xff")
                elif case == "truncated-first":
                    bad.send(valid.SerializeToString()[:-3])
                else:
                    bad.send(valid.SerializeToString())
                    await eventually(lambda: srv.ads.status.get("bad") is not None)
                    bad.send(b"\x0a\xff\xff\xff\xff\x0f")
                assert await bad.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "undecodable" in await bad.call.details()
            assert logged(caplog, "undecodable")
            await eventually(lambda: srv.ads.status.get("bad") is None)
            before = good.resources(ROUTE)["egress"]
            srv.cache.set_snapshot(ROLE, snap(*base({"/": "b"})))
            await good.wait_for(lambda: good.resources(ROUTE)["egress"] != before, timeout=1.0)
            assert good.error is None


@MODES
@async_test
async def test_oversized_request_closes_only_its_stream(delta, caplog):
    """gRPC itself refuses a message over its 4 MiB limit before the server sees it: the
    reason reaches the client as RESOURCE_EXHAUSTED; the server logs the closed stream."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    node = base_pb2.Node(id="bad", cluster=ROLE)
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta, "good") as good:
            good.subscribe(ROUTE, ["egress"])
            await good.wait_for(lambda: good.resources(ROUTE))
            async with RawStream(srv.target, delta) as bad:
                bad.send(request(delta, CLUSTER, node=node))
                await eventually(lambda: srv.ads.status.get("bad") is not None)
                bad.send(request(delta, ROUTE, ["r" * 1000] * 5000))  # about 5 MB
                assert await bad.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await eventually(lambda: srv.ads.status.get("bad") is None)
            assert logged(caplog, "stream closed", "bad")
            before = good.resources(ROUTE)["egress"]
            srv.cache.set_snapshot(ROLE, snap(*base({"/": "b"})))
            await good.wait_for(lambda: good.resources(ROUTE)["egress"] != before, timeout=1.0)
            assert good.error is None


# --- 7. byte sharing -----------------------------------------------------------------------

STREAMS = 20


@MODES
@async_test
async def test_each_resource_is_serialised_once_per_version_whatever_the_streams(
    delta, monkeypatch
):
    # Observers only: count RouteConfiguration serialisations, and record the entry bytes
    # every response is assembled from. Both wrap the real function and return its result.
    serialised: dict[str, int] = {}
    real_serialise = route_pb2.RouteConfiguration.SerializeToString

    def counting_serialise(message, *args, **kwargs):
        serialised[message.name] = serialised.get(message.name, 0) + 1
        return real_serialise(message, *args, **kwargs)

    monkeypatch.setattr(route_pb2.RouteConfiguration, "SerializeToString", counting_serialise)
    entries: list[tuple[str, list[bytes]]] = []
    real_response = wire.delta_response if delta else wire.sotw_response

    def recording_response(version, sent_entries, type_url, *rest):
        entries.append((type_url, list(sent_entries)))
        return real_response(version, sent_entries, type_url, *rest)

    monkeypatch.setattr(wire, "delta_response" if delta else "sotw_response", recording_response)

    async with running_ads() as srv:
        first = snap(*base())
        srv.cache.set_snapshot(ROLE, first)
        clients = [client(srv.target, delta, f"n{i}") for i in range(STREAMS)]
        for c in clients:
            await c.start()
        try:
            for c in clients:
                c.subscribe(ROUTE, ["egress"])
            for c in clients:
                await c.wait_for(lambda c=c: c.resources(ROUTE))
            second = snap(*base({"/": "b"}))
            assert srv.cache.set_snapshot(ROLE, second) == {ROUTE}
            for c in clients:
                await c.wait_for(lambda c=c: c.count(ROUTE) == 2)
            payloads = {c.payload(ROUTE, "egress") for c in clients}
        finally:
            for c in clients:
                await c.close()

    assert serialised == {"egress": 2}  # one per version: 40 responses, 2 serialisations
    route_entries = [e for type_url, sent in entries if type_url == ROUTE for e in sent]
    assert len(route_entries) == 2 * STREAMS
    kind = "delta_entry" if delta else "sotw_entry"
    shared = [getattr(s.resources(ROUTE)["egress"], kind) for s in (first, second)]
    # Every stream's response was built from the very bytes object of the version's Resource.
    assert all(any(e is s for s in shared) for e in route_entries)
    assert sum(e is shared[0] for e in route_entries) == STREAMS
    assert len(payloads) == 1  # and every client holds byte-identical content
