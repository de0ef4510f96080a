"""Every xDS protocol rule of the ADS server, observed by an Envoy-like client, SotW and delta."""

import asyncio

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from testkit import resources as rs
from testkit.ads_client import AdsClient
from testkit.ads_server import running_ads
from tests.support.ads import MODES, ROLE, async_test, base, client, eventually, quiet, snap

pytestmark = pytest.mark.in_process  # in-process server and clients: `make test-fast` runs it


@MODES
@async_test
async def test_nonce_on_every_response_and_initial_sync(delta):
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta) as c:
            c.subscribe(CLUSTER)
            c.subscribe(LISTENER)
            await c.wait_for(lambda: len(c.resources(CLUSTER)) == 2 and c.resources(LISTENER))
            c.subscribe(ENDPOINT, ["a", "b"])
            c.subscribe(ROUTE, ["egress"])
            await c.wait_for(lambda: len(c.resources(ENDPOINT)) == 2 and c.resources(ROUTE))
            assert all(r.nonce for r in c.received)
            assert len({r.nonce for r in c.received}) == len(c.received)
            assert await quiet(c) == 0  # every ACK answered by silence


@MODES
@async_test
async def test_one_change_pushes_only_that_resource_to_the_streams_using_it(delta):
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base(), rs.route("other", {"/": "b"})))
        srv.cache.set_snapshot("other|default", snap(*base()))
        async with (
            client(srv.target, delta, "n1") as c1,
            client(srv.target, delta, "n2") as c2,
            client(srv.target, delta, "n3", role="other|default") as c3,
        ):
            for c in (c1, c2, c3):
                c.subscribe(CLUSTER)
                c.subscribe(ENDPOINT, ["a", "b"])
            c1.subscribe(ROUTE, ["egress"])
            c2.subscribe(ROUTE, ["other"])
            c3.subscribe(ROUTE, ["egress"])
            await c1.wait_for(lambda: c1.resources(ROUTE) and len(c1.resources(ENDPOINT)) == 2)
            await c2.wait_for(lambda: c2.resources(ROUTE) and len(c2.resources(ENDPOINT)) == 2)
            await c3.wait_for(lambda: c3.resources(ROUTE) and len(c3.resources(ENDPOINT)) == 2)
            await asyncio.sleep(0.1)
            counts = [c.count() for c in (c1, c2, c3)]
            changed = srv.cache.set_snapshot(
                ROLE, snap(*base({"/": "b"}), rs.route("other", {"/": "b"}))
            )
            assert changed == {ROUTE}
            await c1.wait_for(lambda: c1.count() == counts[0] + 1)
            await asyncio.sleep(0.3)
            assert c1.received[-1].type_url == ROUTE
            assert c1.received[-1].names == ("egress",)  # only the changed resource
            assert c2.count() == counts[1]  # same role, does not use "egress"
            assert c3.count() == counts[2]  # another role


@MODES
@async_test
async def test_nack_is_recorded_and_the_rejected_version_is_never_resent(delta):
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta) as c:
            c.subscribe(ROUTE, ["egress"])
            await c.wait_for(lambda: c.resources(ROUTE))
            good = c.resources(ROUTE)["egress"]
            c.nack_next(ROUTE, "invalid regex")
            srv.cache.set_snapshot(ROLE, snap(*base({"/": "b"})))
            await c.wait_for(lambda: any(r.nacked for r in c.received))
            rejected = c.received[-1].version
            assert c.resources(ROUTE)["egress"] == good  # the client kept its last good config
            assert await quiet(c, 1.0) == 0  # no resend of the rejected version
            status = srv.ads.status.get("n1").types[ROUTE]
            assert status.nacks == 1
            assert status.last_nack.message == "invalid regex"
            assert status.last_nack.version == rejected
            assert status.last_nack.at > 0
            assert status.acked_version != rejected
            # Re-publishing the same content is not a new version: still nothing sent.
            srv.cache.set_snapshot(ROLE, snap(*base({"/": "b"})))
            assert await quiet(c) == 0
            srv.cache.set_snapshot(ROLE, snap(*base({"/": "a", "/x": "b"})))
            await c.wait_for(lambda: c.resources(ROUTE)["egress"] not in (good,))
            acked = lambda: srv.ads.status.get("n1").types[ROUTE].acked_version  # noqa: E731
            await eventually(lambda: acked() == c.received[-1].version)


@async_test
async def test_sotw_stale_nonce_is_ignored():
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, False) as c:
            c.subscribe(ENDPOINT, ["a"])
            await c.wait_for(lambda: c.resources(ENDPOINT))
            # A request that changes the names but echoes an old nonce must be ignored.
            c.send_raw(
                discovery_pb2.DiscoveryRequest(
                    type_url=ENDPOINT, resource_names=["a", "b"], response_nonce="stale-nonce"
                )
            )
            assert await quiet(c) == 0
            assert srv.ads.status.get("n1") is not None  # the stream survived
            c.subscribe(ENDPOINT, ["b"])  # the same change with the current nonce works
            await c.wait_for(lambda: "b" in c.resources(ENDPOINT))


@async_test
async def test_delta_subscription_change_is_honoured_with_a_stale_nonce():
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, True) as c:
            c.subscribe(ENDPOINT, ["a"])
            await c.wait_for(lambda: c.resources(ENDPOINT))
            c.send_raw(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=ENDPOINT, resource_names_subscribe=["b"], response_nonce="stale"
                )
            )
            await c.wait_for(lambda: any(r.names == ("b",) for r in c.received))


@MODES
@async_test
async def test_newly_requested_names_are_sent_even_if_unchanged(delta):
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta) as c:
            c.subscribe(ENDPOINT, ["a", "b"])
            await c.wait_for(lambda: len(c.resources(ENDPOINT)) == 2)
            c.unsubscribe(ENDPOINT, ["b"])
            await asyncio.sleep(0.2)
            n = c.count()
            c.subscribe(ENDPOINT, ["b"])
            await c.wait_for(lambda: c.count() > n and "b" in c.resources(ENDPOINT))
            assert c.received[-1].names == ("b",)


@async_test
async def test_sotw_lds_cds_are_full_state_and_rds_eds_by_name():
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base(clusters=("a", "b", "c"))))
        async with client(srv.target, False) as c:
            c.subscribe(CLUSTER)
            c.subscribe(ENDPOINT, ["a"])
            await c.wait_for(lambda: len(c.resources(CLUSTER)) == 3 and c.resources(ENDPOINT))
            assert set(c.resources(ENDPOINT)) == {"a"}  # only the name asked for
            srv.cache.set_snapshot(ROLE, snap(*base(clusters=("a", "b"))))
            await c.wait_for(lambda: set(c.resources(CLUSTER)) == {"a", "b"})
            last = [r for r in c.received if r.type_url == CLUSTER][-1]
            assert set(last.names) == {"a", "b"}  # full state: absence is the removal


@async_test
async def test_delta_reports_removals_including_names_that_do_not_exist():
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base(clusters=("a", "b", "c"))))
        async with client(srv.target, True) as c:
            c.subscribe(CLUSTER)
            c.subscribe(ENDPOINT, ["a", "ghost"])
            await c.wait_for(lambda: len(c.resources(CLUSTER)) == 3 and c.resources(ENDPOINT))
            await c.wait_for(lambda: any("ghost" in r.removed for r in c.received))
            srv.cache.set_snapshot(ROLE, snap(*base(clusters=("a", "b"))))
            await c.wait_for(lambda: set(c.resources(CLUSTER)) == {"a", "b"})
            last = [r for r in c.received if r.type_url == CLUSTER][-1]
            assert last.removed == ("c",)
            assert last.names == ()  # unchanged clusters are not resent


@MODES
@async_test
async def test_make_before_break_order_and_cluster_kept_until_routes_are_gone(delta):
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base(clusters=("a",))))
        async with AdsClient(srv.target, "n1", ROLE, delta=delta, follow_clusters=True) as c:
            c.subscribe(CLUSTER)
            c.subscribe(LISTENER)
            c.subscribe(ROUTE, ["egress"])
            await c.wait_for(lambda: c.resources(ROUTE) and c.resources(ENDPOINT))
            await asyncio.sleep(0.2)
            start = c.count()
            # One change: cluster a is replaced by b, the listener and the route move to b.
            new = [
                rs.cluster("b"),
                rs.endpoints("b", 9100),
                rs.listener("egress", 15002, "egress"),
                rs.route("egress", {"/": "b"}),
            ]
            srv.cache.set_snapshot(ROLE, snap(*new))
            await c.wait_for(lambda: set(c.resources(CLUSTER)) == {"b"}, timeout=5)
            pushes = [r for r in c.received[start:]]
            kinds = [r.type_url for r in pushes]
            # First CDS still carries a (routes use it), then EDS, LDS, RDS, then a goes.
            assert kinds.index(CLUSTER) < kinds.index(ENDPOINT) < kinds.index(LISTENER)
            assert kinds.index(LISTENER) < kinds.index(ROUTE)
            first_cds = pushes[kinds.index(CLUSTER)]
            assert "b" in first_cds.names
            assert "a" not in first_cds.removed
            if not delta:
                assert "a" in first_cds.names
            last_cds = [r for r in pushes if r.type_url == CLUSTER][-1]
            assert last_cds is not first_cds
            assert pushes.index(last_cds) > kinds.index(ROUTE)


@pytest.mark.parametrize("changed_while_away", [False, True], ids=["same", "changed"])
@async_test
async def test_delta_reconnect_keeps_clusters_until_the_held_routes_are_replaced(
    changed_while_away,
):
    """A reconnecting Envoy holds routes the new stream never sent. Whether their version is
    in the snapshot (content known) or not (changed while away), no cluster they may use is
    removed before they are replaced."""
    new = [
        rs.cluster("b"),
        rs.endpoints("b", 9100),
        rs.listener("egress", 15002, "egress"),
        rs.route("egress", {"/": "b"}),
    ]
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base(clusters=("a",))))
        async with AdsClient(srv.target, "n1", ROLE, delta=True, follow_clusters=True) as c:
            c.subscribe(CLUSTER)
            c.subscribe(LISTENER)
            c.subscribe(ROUTE, ["egress"])
            await c.wait_for(lambda: c.resources(ROUTE) and c.resources(ENDPOINT))
            await asyncio.sleep(0.2)
            held = {t: c.resources(t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
        if changed_while_away:
            srv.cache.set_snapshot(ROLE, snap(*new))
        async with AdsClient(srv.target, "n1", ROLE, delta=True, follow_clusters=True) as c:
            c.subscribe(CLUSTER, held=held[CLUSTER])
            c.subscribe(LISTENER, held=held[LISTENER])
            c.subscribe(ROUTE, ["egress"], held=held[ROUTE])
            await asyncio.sleep(0.3)
            if not changed_while_away:
                srv.cache.set_snapshot(ROLE, snap(*new))
            await c.wait_for(lambda: set(c.resources(CLUSTER)) == {"b"}, timeout=5)
            kinds = [(r.type_url, r) for r in c.received]
            removal = next(i for i, (t, r) in enumerate(kinds) if t == CLUSTER and "a" in r.removed)
            route = next(i for i, (t, r) in enumerate(kinds) if t == ROUTE and "egress" in r.names)
            assert route < removal, [(t.rsplit(".", 1)[-1], r.names, r.removed) for t, r in kinds]


@MODES
@async_test
async def test_resource_that_appears_later_is_sent_and_partial_sets_do_not_deadlock(delta):
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base(clusters=("a",))))
        async with client(srv.target, delta) as c:
            c.subscribe(ENDPOINT, ["a", "late"])
            await c.wait_for(lambda: "a" in c.resources(ENDPOINT))  # no waiting for "late"
            srv.cache.set_snapshot(ROLE, snap(*base(clusters=("a", "late"))))
            await c.wait_for(lambda: "late" in c.resources(ENDPOINT))


@MODES
@async_test
async def test_node_without_snapshot_waits_then_gets_it(delta):
    async with running_ads() as srv, client(srv.target, delta) as c:
        c.subscribe(CLUSTER)
        assert await quiet(c) == 0
        srv.cache.set_snapshot(ROLE, snap(*base()))
        await c.wait_for(lambda: len(c.resources(CLUSTER)) == 2)


@MODES
@async_test
async def test_per_node_status(delta):
    async with running_ads() as srv:
        srv.cache.set_snapshot(ROLE, snap(*base()))
        async with client(srv.target, delta, node="sidecar-7") as c:
            c.subscribe(CLUSTER)
            c.subscribe(ROUTE, ["egress"])
            await c.wait_for(lambda: c.resources(CLUSTER) and c.resources(ROUTE))
            node = srv.ads.status.get("sidecar-7")
            # The server records a push once its write returns, so wait for both entries.
            await eventually(
                lambda: all(
                    t in node.types and node.types[t].acked_version == node.types[t].sent_version
                    for t in (CLUSTER, ROUTE)
                )
            )
            assert node.role == ROLE
            assert node.protocol == ("delta" if delta else "sotw")
            for type_url in (CLUSTER, ROUTE):
                entry = node.types[type_url]
                sent = [r for r in c.received if r.type_url == type_url][-1].version
                assert entry.sent_version == entry.acked_version == sent
                assert entry.last_nack is None
            data = node.to_json()
            assert data["types"]["cds"]["acked_version"] == node.types[CLUSTER].acked_version
        await asyncio.sleep(0.2)
        assert srv.ads.status.get("sidecar-7") is None  # disconnected nodes leave the board


@MODES
@async_test
async def test_role_from_node_metadata(delta):
    async with running_ads() as srv:
        srv.cache.set_snapshot("account-svc|task", snap(*base()))
        meta = {"tasklane.service": "account-svc", "tasklane.group": "task"}
        async with AdsClient(srv.target, "m1", metadata=meta, delta=delta) as c:
            c.subscribe(CLUSTER)
            await c.wait_for(lambda: len(c.resources(CLUSTER)) == 2)
            assert srv.ads.status.get("m1").role == "account-svc|task"
