"""Leader election on a real etcd: one leader at a time, handover on stop, resign and key loss,
stepping down when the lease can no longer be renewed; and two real `tasklane up` processes on
one etcd, where SIGKILLing the leader makes the other lead within the lease TTL while both
keep serving HTTP and xDS."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.store.etcd import Store
from controlplane.store.leader import DEFAULT_TTL, Leadership
from controlplane.xds.types import CLUSTER
from testkit.ads_client import AdsClient
from tests.support.up import EXIT_TIMEOUT, Up, get_json, start_up
from tests.support.wait import wait_until

pytestmark = pytest.mark.timeout(120)

# What may pass, beyond the TTL, between a leader's death and its successor leading: etcd
# checks lease expiry every 500 ms, then the watch event and the status poll.
TAKEOVER_MARGIN = 2.0
SHORT_TTL = 2


class Candidates:
    """Leaderships on one etcd, each with its own Store and a record of its callbacks."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.started: list[tuple[Leadership, Store]] = []
        self.changes: dict[str, list[bool]] = {}

    def start(self, ttl: int = SHORT_TTL) -> Leadership:
        store = Store.connect(self.endpoint)
        leadership = Leadership(store, "test", ttl=ttl)
        self.changes[leadership.id] = []
        leadership.on_change(self.changes[leadership.id].append)
        leadership.start()
        self.started.append((leadership, store))
        return leadership

    def close(self) -> None:
        for leadership, store in self.started:
            try:
                leadership.stop()
            finally:
                store.close()


@pytest.fixture
def candidates(etcd_server: EmbeddedEtcd) -> Iterator[Candidates]:
    group = Candidates(etcd_server.endpoint)
    try:
        yield group
    finally:
        group.close()


def test_first_in_line_leads_and_stop_hands_over_at_once(candidates: Candidates) -> None:
    first, second = candidates.start(), candidates.start()
    wait_until(lambda: second.leader_id == first.id, 5, "the second sees the first lead")
    assert first.is_leader and not second.is_leader
    assert first.leader_id == first.id
    assert first.to_json() == {
        "name": "test",
        "id": first.id,
        "leader": True,
        "leader_id": first.id,
    }

    first.stop()
    stopped = time.monotonic()
    wait_until(lambda: second.is_leader, 5, "the second leads")
    # A stop deletes the key: no waiting for the lease to expire.
    assert time.monotonic() - stopped < 1.0
    assert second.leader_id == second.id
    assert candidates.changes == {first.id: [True, False], second.id: [True]}


def test_resign_hands_over_and_rejoins_at_the_back(candidates: Candidates) -> None:
    first, second = candidates.start(), candidates.start()
    wait_until(lambda: first.is_leader, 5, "the first leads")
    first.resign()
    assert not first.is_leader  # at once, before the successor can lead
    wait_until(lambda: second.is_leader, 5, "the second leads")
    wait_until(lambda: first.leader_id == second.id, 5, "the first sees the second lead")
    store = Store.connect(candidates.endpoint)
    try:
        both = sorted([first.key, second.key])
        wait_until(lambda: sorted(store.get_prefix("leader/test/")[0]) == both, 5, "it rejoins")
    finally:
        store.close()

    second.stop()
    wait_until(lambda: first.is_leader, 5, "the first leads again")
    assert candidates.changes[first.id] == [True, False, True]


def test_a_deleted_key_rejoins_the_line(candidates: Candidates) -> None:
    first, second = candidates.start(), candidates.start()
    wait_until(lambda: first.is_leader, 5, "the first leads")
    store = Store.connect(candidates.endpoint)
    try:
        assert store.delete(first.key)  # by hand, as an operator forcing a handover would
        wait_until(lambda: second.is_leader, 5, "the second leads")
        wait_until(lambda: store.get(first.key) is not None, 5, "the first's key is back")
        assert not first.is_leader and first.leader_id == second.id
    finally:
        store.close()


def test_a_leader_that_cannot_renew_steps_down_within_the_ttl(
    candidates: Candidates, etcd_server: EmbeddedEtcd
) -> None:
    leader = candidates.start()
    wait_until(lambda: leader.is_leader, 5, "it leads")
    etcd_server.stop()
    lost = time.monotonic()
    wait_until(lambda: not leader.is_leader, SHORT_TTL + 0.5, "it steps down")
    assert candidates.changes[leader.id] == [True, False]
    assert time.monotonic() - lost <= SHORT_TTL + 0.5
    # etcd back (it keeps leases across restarts): the lease is renewed and it leads again.
    etcd_server.start()
    wait_until(lambda: leader.is_leader, 15, "it leads again")
    assert candidates.changes[leader.id] == [True, False, True]


# --- two `tasklane up` processes on one etcd ----------------------------------------------


def leadership(up: Up) -> dict:
    status, body = get_json(up.url("/api/v1/status"))
    assert status == 200, body
    return body["leadership"]


def serves_xds(up: Up) -> bool:
    """One CDS response on a fresh ADS stream, as a sidecar would get it."""

    async def fetch() -> bool:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{up.ports['xds']}", options=[("grpc.enable_http_proxy", 0)]
        )
        try:
            async with AdsClient("", "leader-test", cluster="@gateway", channel=channel) as client:
                client.subscribe(CLUSTER)
                await client.wait_for(lambda: client.count(CLUSTER) > 0, timeout=5)
            return True
        finally:
            await channel.close()

    return asyncio.run(fetch())


def serves_http(up: Up) -> bool:
    return get_json(up.url("/healthz")) == (200, {"status": "ok"})


@pytest.fixture
def two_ups(etcd_server: EmbeddedEtcd, tmp_path: Path) -> Iterator[tuple[Up, Up]]:
    """Two ready `tasklane up` on one external etcd (an embedded one would die with its
    owner); both killed afterwards."""
    ups: list[Up] = []
    try:
        for _ in range(2):
            ups.append(start_up(tmp_path, etcd=etcd_server.endpoint))
        yield ups[0], ups[1]
    finally:
        for up in ups:
            up.kill()


def settled(ups: tuple[Up, Up]) -> tuple[Up, Up]:
    """(leader, follower) once both agree that exactly one of them leads."""
    views: list[dict] = []

    def agreed() -> bool:
        views[:] = [leadership(up) for up in ups]
        leaders = [view["id"] for view in views if view["leader"]]
        return len(leaders) == 1 and all(view["leader_id"] == leaders[0] for view in views)

    wait_until(agreed, 5, f"one leader both agree on: {views}")
    return (ups[0], ups[1]) if views[0]["leader"] else (ups[1], ups[0])


def test_sigkill_of_the_leader_hands_over_within_the_ttl(two_ups: tuple[Up, Up]) -> None:
    leader, follower = settled(two_ups)
    for up in two_ups:
        assert serves_http(up) and serves_xds(up)

    leader.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    served: list[bool] = []
    stop_polling = threading.Event()

    def poll_follower() -> None:  # the follower keeps serving throughout the handover
        while not stop_polling.is_set():
            served.append(serves_http(follower))
            time.sleep(0.1)

    poller = threading.Thread(target=poll_follower, daemon=True)
    poller.start()
    try:
        wait_until(
            lambda: leadership(follower)["leader"], DEFAULT_TTL + TAKEOVER_MARGIN, "takeover"
        )
    finally:
        stop_polling.set()
        poller.join(timeout=15)
    took = time.monotonic() - killed
    assert took <= DEFAULT_TTL + TAKEOVER_MARGIN
    assert leader.proc.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL
    assert served and all(served)
    assert leadership(follower)["leader_id"] == leadership(follower)["id"]
    assert serves_http(follower) and serves_xds(follower)


def test_sigterm_of_the_leader_hands_over_at_once(two_ups: tuple[Up, Up]) -> None:
    leader, follower = settled(two_ups)
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.proc.wait(timeout=EXIT_TIMEOUT) == 0
    wait_until(lambda: leadership(follower)["leader"], 1.0, "takeover after a clean stop")
    assert "Traceback" not in leader.stderr()
