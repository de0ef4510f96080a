"""The ADS stream's state machine (`StreamState`), driven as Envoy drives it: requests in,
`next_push` out. tests/integration/test_ads_protocol.py proves these rules through a real gRPC
stream; here each one is isolated, with the edge cases a socket makes awkward (what is held
back, what is never sent, in which order)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.route.v3.route_components_pb2 import VirtualHost
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse

from controlplane.translate.gateway import DyeNames, dye_filter
from controlplane.xds import wire
from controlplane.xds.names import GATEWAY_DYE_FILTER
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.stream import Push, StreamState, Verdict
from controlplane.xds.types import (
    CLUSTER,
    ENDPOINT,
    EXTENSION_CONFIG,
    LISTENER,
    ROUTE,
    VIRTUAL_HOST,
)
from testkit import resources as rs
from tests.support.ads import base, snap

ALL = (CLUSTER, ENDPOINT, LISTENER, ROUTE)


class Envoy:
    """One stream's server state and the client's side of it: the last nonce of each type,
    what the client asked for (SotW requests repeat it), and what it holds."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.state = StreamState(delta)
        self.nonces: dict[str, str] = {}
        self.names: dict[str, list[str]] = {}
        self.snapshot: Snapshot | None = None

    # --- requests
    def ask(self, type_url: str, names: Iterable[str] = (), nonce: str | None = None) -> Verdict:
        """A SotW request for `names` (none: the whole set of a CDS or LDS), echoing the
        latest nonce of the type unless told otherwise."""
        self.names[type_url] = list(names)
        nonce = self.nonces.get(type_url, "") if nonce is None else nonce
        return self.state.on_sotw_request(type_url, self.names[type_url], nonce, False)

    def subscribe(
        self,
        type_url: str,
        names: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        held: Mapping[str, str] | None = None,
        nonce: str | None = None,
    ) -> Verdict:
        """A delta request; `held` is the initial_resource_versions of a reconnect."""
        nonce = self.nonces.get(type_url, "") if nonce is None else nonce
        return self.state.on_delta_request(type_url, names, unsubscribe, held or {}, nonce, False)

    def ack(self, push: Push, error: bool = False) -> Verdict:
        nonce = self.nonces[push.type_url]
        if self.delta:
            return self.state.on_delta_request(push.type_url, (), (), {}, nonce, error)
        return self.state.on_sotw_request(
            push.type_url, self.names.get(push.type_url, ()), nonce, error
        )

    def nack(self, push: Push) -> Verdict:
        return self.ack(push, error=True)

    # --- responses
    def publish(self, snapshot: Snapshot) -> None:
        """The cache's part: a new snapshot marks the types whose content changed."""
        self.state.mark_changed(snapshot.changed_types(self.snapshot))
        self.snapshot = snapshot

    def push(self) -> Push | None:
        """The next response, sent (given a nonce) but not yet answered."""
        push = self.state.next_push(self.snapshot)
        if push is not None:
            self.nonces[push.type_url] = self.state.new_nonce(push.type_url)
        return push

    def sync(self) -> list[Push]:
        """Every response until there is nothing more to say, each ACKed as it arrives."""
        pushes = []
        while (push := self.push()) is not None:
            pushes.append(push)
            self.ack(push)
        return pushes


def assert_routes_replaced_before_removal(pushes: list[Push], cluster: str) -> None:
    """Make-before-break: the new routes went out before `cluster` was removed."""
    removal = next(i for i, p in enumerate(pushes) if cluster in p.removed)
    route = next(i for i, p in enumerate(pushes) if p.type_url == ROUTE)
    assert route < removal


def names(push: Push | None) -> list[str]:
    assert push is not None, "expected a response"
    return [r.name for r in push.resources]


def kinds(pushes: Iterable[Push]) -> list[str]:
    return [p.type_url for p in pushes]


def connected(delta: bool, snapshot: Snapshot | None = None) -> Envoy:
    """An Envoy that asked for everything of `base()` and ACKed it all."""
    envoy = Envoy(delta)
    envoy.publish(snapshot or snap(*base()))
    request = envoy.subscribe if delta else envoy.ask
    request(CLUSTER)
    request(LISTENER)
    request(ENDPOINT, ["a", "b"])
    request(ROUTE, ["egress"])
    envoy.sync()
    return envoy


# ---------------------------------------------------------------------------- SotW


def test_sotw_first_requests_are_answered_in_make_before_break_order() -> None:
    envoy = Envoy(delta=False)
    envoy.publish(snap(*base(), dye_filter(DyeNames(("x-task-dye",), ("task-dye",)))))
    envoy.ask(ROUTE, ["egress"])  # asked for first, sent last
    envoy.ask(LISTENER)
    envoy.ask(ENDPOINT, ["a", "b"])
    envoy.ask(CLUSTER)
    envoy.ask(EXTENSION_CONFIG, [GATEWAY_DYE_FILTER])
    pushes = envoy.sync()
    assert kinds(pushes) == [EXTENSION_CONFIG, CLUSTER, ENDPOINT, LISTENER, ROUTE]
    assert [names(p) for p in pushes] == [
        [GATEWAY_DYE_FILTER], ["a", "b"], ["a", "b"], ["egress"], ["egress"],
    ]  # fmt: skip


def test_routes_and_listeners_wait_for_the_cluster_and_dye_filter_acks() -> None:
    envoy = Envoy(delta=False)
    envoy.publish(snap(*base(), dye_filter(DyeNames(("x-task-dye",), ("task-dye",)))))
    envoy.ask(EXTENSION_CONFIG, [GATEWAY_DYE_FILTER])
    envoy.ask(CLUSTER)
    envoy.ask(ENDPOINT, ["a"])
    envoy.ask(LISTENER)
    envoy.ask(ROUTE, ["egress"])
    ecds, cds, eds = envoy.push(), envoy.push(), envoy.push()
    assert kinds([ecds, cds, eds]) == [EXTENSION_CONFIG, CLUSTER, ENDPOINT]
    assert envoy.push() is None  # LDS and RDS would point at clusters Envoy may not have yet
    envoy.ack(cds)
    assert envoy.push() is None  # nor may a route match a dye the gateway does not strip yet
    envoy.ack(ecds)
    assert kinds([envoy.push(), envoy.push()]) == [LISTENER, ROUTE]


def test_routes_stay_as_they_were_while_the_dye_filter_is_refused() -> None:
    """Fail closed: a route for a new chain's header must never reach a gateway whose filter
    does not strip that header, not even after Envoy refused the new filter."""
    old_filter = dye_filter(DyeNames(("x-task-dye",), ("task-dye",)))
    envoy = connected(delta=False, snapshot=snap(*base(), old_filter))
    envoy.ask(EXTENSION_CONFIG, [GATEWAY_DYE_FILTER])
    envoy.sync()
    new_filter = dye_filter(DyeNames(("x-late", "x-task-dye"), ("task-dye",)))
    envoy.publish(snap(*base(routes={"/": "b"}), new_filter))
    ecds = envoy.push()
    assert ecds.type_url == EXTENSION_CONFIG
    envoy.nack(ecds)
    assert all(p.type_url not in (LISTENER, ROUTE) for p in envoy.sync())
    fixed = dye_filter(DyeNames(("x-late", "x-other", "x-task-dye"), ("task-dye",)))
    envoy.publish(snap(*base(routes={"/": "b"}), fixed))
    assert ROUTE in kinds(envoy.sync())  # an accepted filter lets the routes go


def test_an_ack_is_answered_by_silence() -> None:
    envoy = connected(delta=False)
    assert envoy.push() is None
    for type_url in ALL:  # a repeated ACK, as Envoy sends after a reconnect of its watch
        assert envoy.ask(type_url, envoy.names[type_url]) == Verdict(ack=True)
    assert envoy.push() is None


def test_republishing_the_same_content_sends_nothing() -> None:
    envoy = connected(delta=False)
    envoy.publish(snap(*base()))
    envoy.state.mark_changed(ALL)  # even told every type changed
    assert envoy.push() is None


def test_one_change_sends_only_that_type() -> None:
    envoy = connected(delta=False)
    envoy.publish(snap(*base({"/": "b"})))
    assert kinds(envoy.sync()) == [ROUTE]


def test_sotw_nack_keeps_the_rejected_version_from_being_resent() -> None:
    envoy = connected(delta=False)
    envoy.publish(snap(*base({"/": "b"})))
    rejected = envoy.push()
    assert envoy.nack(rejected) == Verdict(nack=True)
    assert envoy.push() is None
    envoy.state.mark_changed([ROUTE])
    assert envoy.push() is None  # the same content again: the client refused it
    envoy.publish(snap(*base({"/": "a", "/x": "b"})))
    fixed = envoy.push()
    assert names(fixed) == ["egress"] and fixed.version != rejected.version


def test_a_nacked_full_state_type_is_not_resent_either() -> None:
    envoy = connected(delta=False)
    envoy.publish(snap(*base(clusters=("a", "b", "c"))))
    rejected = envoy.push()
    assert rejected.type_url == CLUSTER
    envoy.nack(rejected)
    assert [p for p in envoy.sync() if p.type_url == CLUSTER] == []


def test_sotw_stale_nonce_is_ignored_entirely() -> None:
    envoy = connected(delta=False)
    old = envoy.nonces[ROUTE]
    envoy.publish(snap(*base({"/": "b"})))
    push = envoy.push()
    # A request answering an older response (its nonce), even a NACK that changes names.
    stale = envoy.state.on_sotw_request(ROUTE, ["egress", "other"], old, True)
    assert stale == Verdict(stale=True)
    assert envoy.state.types[ROUTE].names == {"egress"}
    assert envoy.push() is None
    assert envoy.ack(push) == Verdict(ack=True)  # the current nonce still counts


def test_sotw_cds_and_lds_without_names_are_wildcards() -> None:
    envoy = Envoy(delta=False)
    envoy.publish(snap(*base(clusters=("a", "b", "c"))))
    envoy.ask(CLUSTER)
    assert names(envoy.push()) == ["a", "b", "c"]
    named = Envoy(delta=False)
    named.publish(snap(*base(clusters=("a", "b", "c"))))
    named.ask(CLUSTER, ["b"])
    assert names(named.push()) == ["b"]
    named.ask(CLUSTER, ["b", "*"])  # "*" with names: the whole set again
    assert names(named.push()) == ["a", "b", "c"]


def test_sotw_eds_and_rds_send_only_the_names_asked_for() -> None:
    envoy = Envoy(delta=False)
    envoy.publish(snap(*base(clusters=("a", "b", "c"))))
    envoy.ask(ENDPOINT)
    assert envoy.push() is None  # no names: nothing (EDS has no wildcard)
    envoy.ask(ENDPOINT, ["c", "a"])
    assert names(envoy.push()) == ["a", "c"]
    envoy.ask(ENDPOINT, ["a", "b", "c"])
    assert names(envoy.push()) == ["b"]  # only the newly asked name


def test_sotw_full_state_removal_is_absence_and_a_named_return_is_resent() -> None:
    envoy = connected(delta=False, snapshot=snap(*base(clusters=("a", "b", "c"))))
    envoy.ask(ENDPOINT, ["a", "b", "c"])
    envoy.sync()
    envoy.publish(snap(*base(clusters=("a", "b"))))
    pushes = envoy.sync()
    assert [(p.type_url, names(p)) for p in pushes] == [(CLUSTER, ["a", "b"])]  # c: absent
    envoy.publish(snap(*base(clusters=("a", "b", "c"))))
    pushes = {p.type_url: names(p) for p in envoy.sync()}
    assert pushes == {CLUSTER: ["a", "b", "c"], ENDPOINT: ["c"]}  # c's endpoints come back


def test_the_first_full_state_answer_goes_out_even_when_empty() -> None:
    envoy = Envoy(delta=False)
    envoy.publish(snap(rs.listener("egress", 15001, "egress"), rs.route("egress", {})))
    envoy.ask(CLUSTER)
    first = envoy.push()
    assert first is not None and first.type_url == CLUSTER and first.resources == []
    envoy.ack(first)
    assert envoy.push() is None


def test_no_snapshot_means_no_response() -> None:
    envoy = Envoy(delta=False)
    envoy.ask(CLUSTER)
    assert envoy.push() is None
    envoy.publish(snap(*base()))
    assert names(envoy.push()) == ["a", "b"]


# ---------------------------------------------------------------------------- delta


def test_delta_subscribe_sends_and_unsubscribe_forgets() -> None:
    envoy = connected(delta=True)
    envoy.subscribe(ENDPOINT, unsubscribe=["b"])
    assert envoy.push() is None  # the client dropped it; nothing to say
    envoy.subscribe(ENDPOINT, ["b"])
    assert names(envoy.push()) == ["b"]  # unchanged, but newly subscribed: sent again


def test_delta_sends_only_what_changed_and_names_what_left() -> None:
    envoy = connected(delta=True, snapshot=snap(*base(clusters=("a", "b", "c"))))
    envoy.publish(snap(*base(clusters=("a", "b"))))
    [cds] = envoy.sync()
    assert (cds.type_url, names(cds), cds.removed) == (CLUSTER, [], ["c"])


def test_delta_names_a_subscribed_resource_that_does_not_exist_as_removed_once() -> None:
    envoy = connected(delta=True)
    envoy.subscribe(ENDPOINT, ["ghost"])
    push = envoy.push()
    assert (names(push), push.removed) == ([], ["ghost"])
    envoy.ack(push)
    assert envoy.push() is None
    envoy.publish(snap(*base(clusters=("a", "b", "ghost"))))
    assert {p.type_url: names(p) for p in envoy.sync()} == {CLUSTER: ["ghost"], ENDPOINT: ["ghost"]}


def test_delta_a_name_newly_subscribed_is_sent_even_if_the_wildcard_sent_it() -> None:
    envoy = connected(delta=True)
    envoy.subscribe(CLUSTER, ["a"])  # e.g. on-demand CDS next to the wildcard
    assert names(envoy.push()) == ["a"]


def test_delta_stale_nonce_still_changes_the_subscription_but_acks_nothing() -> None:
    envoy = connected(delta=True, snapshot=snap(*base(clusters=("a", "b", "c"))))
    assert envoy.subscribe(ENDPOINT, ["c"], nonce="stale") == Verdict(stale=True)
    assert names(envoy.push()) == ["c"]


def test_delta_nack_keeps_the_rejected_version_from_being_resent() -> None:
    envoy = connected(delta=True)
    envoy.publish(snap(*base({"/": "b"})))
    rejected = envoy.push()
    assert envoy.nack(rejected) == Verdict(nack=True)
    envoy.state.mark_changed(ALL)
    assert envoy.push() is None


def test_delta_reconnect_resends_nothing_the_client_already_holds() -> None:
    snapshot = snap(*base(clusters=("a", "b", "c")))
    envoy = Envoy(delta=True)
    envoy.publish(snapshot)
    held = {t: {n: r.version for n, r in snapshot.resources(t).items()} for t in ALL}
    held[ENDPOINT]["b"] = "an-older-version"
    envoy.subscribe(CLUSTER, held=held[CLUSTER])
    envoy.subscribe(LISTENER, held=held[LISTENER])
    envoy.subscribe(ENDPOINT, ["a", "b", "c"], held=held[ENDPOINT])
    envoy.subscribe(ROUTE, ["egress"], held=held[ROUTE])
    pushes = envoy.sync()
    assert [(p.type_url, names(p)) for p in pushes if p.resources] == [(ENDPOINT, ["b"])]
    assert [p.removed for p in pushes] == [[]] * len(pushes)
    # CDS and LDS (wildcards) still get an empty first answer: Envoy's initial fetch waits for it.
    assert {p.type_url for p in pushes if not p.resources} == {CLUSTER, LISTENER}


# ---------------------------------------------------------------------------- make-before-break

# Cluster a is replaced by b in one change; the listener and the route move to b.
MOVED = snap(
    rs.cluster("b"),
    rs.endpoints("b", 9100),
    rs.listener("egress", 15002, "egress"),
    rs.route("egress", {"/": "b"}),
)


def test_sotw_keeps_a_cluster_until_the_routes_using_it_are_replaced() -> None:
    envoy = connected(delta=False, snapshot=snap(*base(clusters=("a",))))
    envoy.publish(MOVED)
    cds = envoy.push()
    assert names(cds) == ["a", "b"]  # a stays: the held route still points at it
    envoy.ack(cds)
    assert [(p.type_url, names(p)) for p in envoy.sync()] == [
        (ENDPOINT, ["b"]),
        (LISTENER, ["egress"]),
        (ROUTE, ["egress"]),
        (CLUSTER, ["b"]),  # after the route's ACK
    ]


def test_delta_keeps_a_cluster_until_the_routes_using_it_are_replaced() -> None:
    envoy = connected(delta=True, snapshot=snap(*base(clusters=("a",))))
    envoy.publish(MOVED)
    pushes = envoy.sync()
    assert [(p.type_url, names(p), p.removed) for p in pushes if p.type_url != ENDPOINT] == [
        (CLUSTER, ["b"], []),
        (LISTENER, ["egress"], []),
        (ROUTE, ["egress"], []),
        (CLUSTER, [], ["a"]),
    ]
    assert kinds(pushes).index(ENDPOINT) == 1  # b's endpoints before the routes to b


def test_delta_keeps_a_retained_clusters_endpoints_until_the_cluster_goes() -> None:
    """Envoy ignores EDS removals, but a gRPC-xDS client would drop the endpoints of a
    cluster its routes still use."""
    envoy = connected(delta=True, snapshot=snap(*base(clusters=("a",))))
    envoy.publish(MOVED)
    envoy.subscribe(ENDPOINT, ["b"])  # as Envoy does for the new cluster
    pushes = envoy.sync()
    cluster_gone = next(i for i, p in enumerate(pushes) if p.type_url == CLUSTER and p.removed)
    assert all("a" not in p.removed for p in pushes[:cluster_gone] if p.type_url == ENDPOINT)


def test_a_cluster_stays_while_the_new_route_is_unacked_or_nacked() -> None:
    envoy = connected(delta=True, snapshot=snap(*base(clusters=("a",))))
    envoy.publish(MOVED)
    while (push := envoy.push()).type_url != ROUTE:
        envoy.ack(push)
    assert envoy.push() is None  # the route is in flight: the client may still run the old one
    envoy.nack(push)
    assert envoy.push() is None  # refused: the old route, and so cluster a, are still in use


def test_a_cluster_no_route_uses_goes_at_once() -> None:
    envoy = connected(delta=True, snapshot=snap(*base(clusters=("a", "b"))))
    envoy.publish(snap(*base(clusters=("a",))))
    assert [(p.type_url, names(p), p.removed) for p in envoy.sync()] == [
        (CLUSTER, [], ["b"]),
        (ENDPOINT, [], ["b"]),
    ]


def test_delta_reconnect_at_current_versions_lets_an_unused_cluster_go() -> None:
    """The held listener and route are at the snapshot's versions: their content is known,
    so a cluster they do not use is removed at once (not held back as possibly in use)."""
    snapshot = snap(*base(clusters=("a", "b")))
    held = {t: {n: r.version for n, r in snapshot.resources(t).items()} for t in ALL}
    envoy = Envoy(delta=True)
    envoy.publish(snapshot)
    envoy.subscribe(CLUSTER, held=held[CLUSTER])
    envoy.subscribe(LISTENER, held=held[LISTENER])
    envoy.subscribe(ENDPOINT, ["a", "b"], held=held[ENDPOINT])
    envoy.subscribe(ROUTE, ["egress"], held=held[ROUTE])
    envoy.sync()
    envoy.publish(snap(*base(clusters=("a",))))  # the route uses a only
    assert [(p.type_url, p.removed) for p in envoy.sync()] == [(CLUSTER, ["b"]), (ENDPOINT, ["b"])]


def test_delta_reconnect_holds_cluster_removals_until_its_routes_are_known() -> None:
    old = snap(*base(clusters=("a",)))
    held = {t: {n: r.version for n, r in old.resources(t).items()} for t in ALL}
    envoy = Envoy(delta=True)
    envoy.publish(MOVED)  # changed while the client was away: its route is not in the snapshot
    envoy.subscribe(CLUSTER, held=held[CLUSTER])
    cds = envoy.push()
    assert (names(cds), cds.removed) == (["b"], [])  # a may be used by the routes it holds
    envoy.ack(cds)
    envoy.subscribe(LISTENER, held=held[LISTENER])
    envoy.subscribe(ROUTE, ["egress"], held=held[ROUTE])
    envoy.subscribe(ENDPOINT, ["b"])
    assert_routes_replaced_before_removal(envoy.sync(), "a")


def test_delta_reconnect_with_static_listeners_keeps_clusters_until_its_routes_are_known() -> None:
    """Sidecars' listeners are static (bootstrap), so no listener in the snapshot names the
    routes they hold; those routes are live all the same, and their clusters must stay."""
    old = snap(rs.cluster("a"), rs.endpoints("a", 9000), rs.route("egress", {"/": "a"}))
    held = {t: {n: r.version for n, r in old.resources(t).items()} for t in ALL}
    envoy = Envoy(delta=True)
    envoy.publish(snap(rs.cluster("b"), rs.endpoints("b", 9100), rs.route("egress", {"/": "b"})))
    envoy.subscribe(CLUSTER, held=held[CLUSTER])
    envoy.subscribe(LISTENER)  # it holds none: its listeners are in the bootstrap
    cds = envoy.push()
    assert (names(cds), cds.removed) == (["b"], [])  # `a` may be what `egress` still uses
    envoy.ack(cds)
    envoy.subscribe(ROUTE, ["egress"], held=held[ROUTE])
    envoy.subscribe(ENDPOINT, ["b"])
    assert_routes_replaced_before_removal(envoy.sync(), "a")


# ---------------------------------------------------------------------------- VHDS on demand


def vhost(name: str, *domains: str, cluster: str = "a") -> VirtualHost:
    """A VHDS virtual host routing everything to `cluster`."""
    host = VirtualHost(name=name, domains=list(domains))
    route = host.routes.add()
    route.match.prefix = "/"
    route.route.cluster = cluster
    return host


def aliases(push: Push) -> dict[str, list[str]]:
    """resource name -> its aliases, as the Delta response on the wire carries them."""
    data = wire.delta_response(
        push.version, [r.delta_entry for r in push.resources], push.type_url, push.removed, "1"
    )
    response = DeltaDiscoveryResponse.FromString(data)
    return {entry.name: list(entry.aliases) for entry in response.resources}


def on_demand_envoy(*hosts) -> Envoy:
    envoy = connected(True, snap(*base(), *hosts))
    envoy.subscribe(VIRTUAL_HOST)  # Envoy's VHDS: every host of its route config
    envoy.sync()
    return envoy


def test_a_host_asked_on_demand_is_answered_under_its_alias_once_it_exists() -> None:
    envoy = on_demand_envoy(vhost("egress/@a", "a", "a:*"))
    envoy.subscribe(VIRTUAL_HOST, ["egress/b:8080"])
    assert envoy.state.unresolved(envoy.snapshot) == ["egress/b:8080"]
    assert envoy.push() is None  # nothing to say until the control plane has it
    envoy.publish(snap(*base(), vhost("egress/@a", "a", "a:*"), vhost("egress/@b", "b", "b:*")))
    [push] = envoy.sync()
    assert aliases(push) == {"egress/@b": ["egress/b:8080"]}


def test_a_host_the_sidecar_holds_is_resent_under_the_alias_it_asked_for() -> None:
    # A request crossed the push that brought the host: it waits on the alias all the same.
    envoy = on_demand_envoy(vhost("egress/@a", "a", "a:*"))
    envoy.subscribe(VIRTUAL_HOST, ["egress/a"])
    [push] = envoy.sync()
    assert aliases(push) == {"egress/@a": ["egress/a"]}


def test_a_name_declared_missing_is_answered_not_found() -> None:
    envoy = on_demand_envoy()
    envoy.subscribe(VIRTUAL_HOST, ["egress/ghost"])
    envoy.state.declare_missing(["egress/ghost"])
    [push] = envoy.sync()
    assert aliases(push) == {"egress/ghost": ["egress/ghost"]}
    assert push.resources[0].payload == b"" and not push.removed


def test_removing_a_host_removes_the_names_it_answered() -> None:
    envoy = on_demand_envoy(vhost("egress/@a", "a", "a:*"))
    envoy.subscribe(VIRTUAL_HOST, ["egress/a:80"])
    envoy.sync()
    envoy.publish(snap(*base()))
    [push] = [p for p in envoy.sync() if p.type_url == VIRTUAL_HOST]
    assert sorted(push.removed) == ["egress/@a", "egress/a:80"]
    assert envoy.state.unresolved(envoy.snapshot) == []  # no longer asked for
