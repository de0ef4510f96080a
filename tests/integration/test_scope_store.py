"""Sightings in a real etcd (store/scope.py): recorded, refreshed without losing their
reason, read, watched, expired against a racing refresh, skipped when malformed, and still
there after etcd and the store restart."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator

import pytest

from controlplane.model.group import GroupKey
from controlplane.model.scope import LEARNED, ON_DEMAND, Sighting
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.store.etcd import Store
from controlplane.store.scope import (
    ScopeRecorder,
    expire_sightings,
    load_sightings,
    record_sighting,
    sighting_key,
    watch_sightings,
)

pytestmark = pytest.mark.timeout(60)

ROLE = GroupKey("fund-facade", "task")
IDLE = 100.0


@pytest.fixture
def store(etcd_server: EmbeddedEtcd) -> Iterator[Store]:
    s = Store.connect(etcd_server.endpoint)
    try:
        yield s
    finally:
        s.close()


def test_record_creates_then_refreshes_keeping_reason_and_since(store: Store) -> None:
    assert record_sighting(store, ROLE, "account-svc", ON_DEMAND, 1000.0)
    assert record_sighting(store, ROLE, "account-svc", LEARNED, 1050.0)
    assert load_sightings(store) == [Sighting(ROLE, "account-svc", ON_DEMAND, 1000.0, 1050.0)]
    revision = store.mod_revision(sighting_key(ROLE, "account-svc"))
    # Seen 5 s after the last write, with writes at most every 10 s: etcd is left alone.
    assert not record_sighting(store, ROLE, "account-svc", LEARNED, 1055.0, min_interval=10.0)
    assert not record_sighting(store, ROLE, "account-svc", LEARNED, 1040.0)  # older news
    assert store.mod_revision(sighting_key(ROLE, "account-svc")) == revision
    assert record_sighting(store, ROLE, "account-svc", LEARNED, 1061.0, min_interval=10.0)
    assert load_sightings(store)[0].last_seen == 1061.0


def test_bad_arguments_are_refused_before_etcd(store: Store) -> None:
    for role, callee, reason in (
        (ROLE, "account-svc", "declared"),  # rules' reasons are not stored
        (ROLE, "", LEARNED),
        (GroupKey("a/b", "task"), "account-svc", LEARNED),
    ):
        with pytest.raises(ValueError):
            record_sighting(store, role, callee, reason, 1.0)
    assert load_sightings(store) == []


def test_malformed_values_are_logged_and_skipped(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    record_sighting(store, ROLE, "account-svc", LEARNED, 10.0)
    store.put("scope/fund-facade/task/not-json", b"{")
    store.put("scope/fund-facade/task/no-time", b'{"reason":"learned","since":1}')
    store.put("scope/fund-facade/task/bad-reason", b'{"reason":"x","since":1,"lastSeen":1}')
    store.put("scope/fund-facade/too-short", b'{"reason":"learned","since":1,"lastSeen":1}')
    store.put("scope/fund-facade/task/bytes", b"\xff\xfe")
    with caplog.at_level(logging.WARNING, logger="controlplane.store.scope"):
        assert [s.callee for s in load_sightings(store)] == ["account-svc"]
    assert sum("not a sighting" in r.getMessage() for r in caplog.records) == 5
    # A malformed sighting is written over by the next good one; the sweep leaves junk alone.
    assert record_sighting(store, ROLE, "not-json", LEARNED, 20.0)
    assert expire_sightings(store, 20.0, IDLE) == 0
    assert sorted(s.callee for s in load_sightings(store)) == ["account-svc", "not-json"]


def test_load_of_one_service(store: Store) -> None:
    record_sighting(store, ROLE, "account-svc", LEARNED, 10.0)
    record_sighting(store, GroupKey("fund", "default"), "fund-facade", ON_DEMAND, 10.0)
    # `fund` is a prefix of `fund-facade`: the service's roles only, not every prefix match.
    assert [s.role for s in load_sightings(store, "fund")] == [GroupKey("fund", "default")]


def test_watch_delivers_first_read_then_changes(store: Store) -> None:
    record_sighting(store, ROLE, "account-svc", LEARNED, 10.0)
    seen: queue.Queue[list[Sighting]] = queue.Queue()
    cancel = watch_sightings(store, seen.put)
    try:
        assert [s.callee for s in seen.get_nowait()] == ["account-svc"]  # before returning
        record_sighting(store, ROLE, "ledger-svc", ON_DEMAND, 11.0)
        assert [s.callee for s in seen.get(timeout=5)] == ["account-svc", "ledger-svc"]
        store.put(sighting_key(ROLE, "account-svc"), b"junk")  # a bad value leaves the scope
        assert [s.callee for s in seen.get(timeout=5)] == ["ledger-svc"]
        assert expire_sightings(store, 11.0 + IDLE + 1, IDLE) == 1
        assert seen.get(timeout=5) == []
    finally:
        cancel()
    record_sighting(store, ROLE, "account-svc", LEARNED, 500.0)
    with pytest.raises(queue.Empty):
        seen.get(timeout=0.5)


def test_expire_deletes_only_idle_sightings(store: Store) -> None:
    record_sighting(store, ROLE, "account-svc", LEARNED, 0.0)
    record_sighting(store, ROLE, "ledger-svc", ON_DEMAND, 50.0)
    assert expire_sightings(store, IDLE, IDLE) == 0  # idle exactly IDLE: not yet
    assert expire_sightings(store, IDLE + 1, IDLE) == 1
    assert [s.callee for s in load_sightings(store)] == ["ledger-svc"]
    assert expire_sightings(store, IDLE + 1, IDLE) == 0  # a second replica's sweep


class RacingStore(Store):
    """A store where the access logs refresh `account-svc` just after the sweep read it."""

    race = False

    def get_versioned(self, key: str) -> tuple[bytes | None, int]:
        value, revision = super().get_versioned(key)
        if self.race and key == sighting_key(ROLE, "account-svc"):
            self.race = False
            record_sighting(self, ROLE, "account-svc", LEARNED, 1000.0)
        return value, revision


def test_expire_loses_to_a_racing_refresh(etcd_server: EmbeddedEtcd) -> None:
    store = RacingStore.connect(etcd_server.endpoint)
    try:
        record_sighting(store, ROLE, "account-svc", LEARNED, 0.0)
        store.race = True
        assert expire_sightings(store, IDLE + 1, IDLE) == 0
        assert load_sightings(store) == [Sighting(ROLE, "account-svc", LEARNED, 0.0, 1000.0)]
    finally:
        store.close()


def test_sightings_survive_an_etcd_and_store_restart(etcd_server: EmbeddedEtcd) -> None:
    store = Store.connect(etcd_server.endpoint)
    record_sighting(store, ROLE, "account-svc", LEARNED, 10.0)
    store.close()
    etcd_server.stop()
    etcd_server.start()
    again = Store.connect(etcd_server.endpoint)
    try:
        assert load_sightings(again) == [Sighting(ROLE, "account-svc", LEARNED, 10.0, 10.0)]
    finally:
        again.close()


def test_recorder_turns_a_flood_of_logs_into_one_write_per_refresh(store: Store) -> None:
    recorder = ScopeRecorder(store, IDLE)  # refresh every 10 s
    key = sighting_key(ROLE, "account-svc")
    writes = [recorder.record(ROLE, "account-svc", LEARNED, 1000.0 + i / 100) for i in range(500)]
    assert writes.count(True) == 1
    first = store.mod_revision(key)
    assert recorder.record(ROLE, "account-svc", LEARNED, 1010.0)  # 10 s later: refreshed
    assert store.mod_revision(key) > first
    assert load_sightings(store)[0].last_seen == 1010.0
    # Another replica's recorder (its own memory) finds the sighting fresh and does not write.
    other = ScopeRecorder(store, IDLE)
    revision = store.mod_revision(key)
    assert not other.record(ROLE, "account-svc", LEARNED, 1012.0)
    assert store.mod_revision(key) == revision


def test_recorder_writes_offers_from_its_thread(store: Store) -> None:
    recorder = ScopeRecorder(store, IDLE)
    recorder.start()
    try:
        for i in range(1000):
            recorder.offer(ROLE, "account-svc", LEARNED, 1000.0 + i / 1000)
            recorder.offer(GroupKey("fund", "default"), "fund-facade", LEARNED, 1000.0)
        deadline = 100
        while len(load_sightings(store)) < 2 and deadline:
            deadline -= 1
            recorder._wake.wait(0.05)
        assert {(s.role, s.callee) for s in load_sightings(store)} == {
            (ROLE, "account-svc"),
            (GroupKey("fund", "default"), "fund-facade"),
        }
    finally:
        recorder.stop()
