"""Applies of any size, still all-or-nothing, on an etcd that keeps its default limit of 128
operations per transaction: readers and watchers see all of an apply or none of it, a bad
document anywhere changes nothing, concurrent applies serialise, and a writer killed between
staging and flip (a store-level writer, and a real `tasklane up`) leaves nothing visible, its
staging collected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import StoreError
from controlplane.model.rules import RuleSet
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.store import rules as rules_store
from controlplane.store.etcd import Change, Store
from controlplane.store.rules import (
    CHUNKS,
    GENERATIONS,
    HISTORY,
    STAGING,
    load_rules,
    watch_rules,
)
from tests.support.plane import Plane, api_opener
from tests.support.rules import chain, mesh, service
from tests.support.stored import stored_documents
from tests.support.up import Up, start_up

REPO = Path(__file__).resolve().parents[2]
GOOD = REPO / "tests" / "rules" / "good" / "fund-yield.yaml"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def plane(etcd_server: EmbeddedEtcd) -> Iterator[Plane]:
    running = Plane(etcd_server.endpoint)
    try:
        yield running
    finally:
        running.stop()


def snapshot(store: Store) -> dict[str, bytes]:
    """Everything tasklane keeps in etcd but the leader-election keys."""
    items, _ = store.get_prefix("")
    return {key: value for key, value in items.items() if not key.startswith("leader/")}


class Watched:
    """The names of every RuleSet a rules watch delivers."""

    def __init__(self, store: Store) -> None:
        self.sets: list[frozenset[str]] = []
        self.cancel = watch_rules(store, self._seen)

    def _seen(self, rules: RuleSet, candidate: object) -> None:
        self.sets.append(frozenset(f"{r.kind}/{r.name}" for r in rules.all()))

    def until(self, size: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.sets and len(self.sets[-1]) == size):
            assert time.monotonic() < deadline, [len(s) for s in self.sets]
            time.sleep(0.05)


def labels(documents: list[str]) -> frozenset[str]:
    """'Kind/name' of generated documents."""
    found = set()
    for doc in documents:
        kind = doc.split("kind: ", 1)[1].split("\n", 1)[0]
        name = doc.split("metadata: {name: ", 1)[1].split("}", 1)[0]
        found.add(f"{kind}/{name}")
    return frozenset(found)


def test_10000_documents_apply_whole_and_a_bad_last_one_changes_nothing(
    plane: Plane, etcd_server: EmbeddedEtcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No decoded chunks shared with the writer in this process: readers read etcd, as
    # another replica does.
    monkeypatch.setattr(rules_store, "_decoded", rules_store._Decoded(0))
    reader = Store.connect(etcd_server.endpoint)
    # This etcd keeps its default limit: a transaction of 129 operations is refused.
    with pytest.raises(StoreError, match="too many operations in txn request"):
        reader.txn({f"probe/{n}": b"" for n in range(129)}, [])
    watched = Watched(reader)
    polled: list[int] = []
    stop = threading.Event()

    def poll() -> None:  # another reader, reading the rules again and again meanwhile
        while not stop.is_set():
            polled.append(len(load_rules(reader)[0].all()))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    documents = mesh(9_800, 200)
    try:
        status, body = plane.apply_files({"mesh.yaml": "".join(documents)})
        assert status == 200, body
        assert len(body["results"]) == 10_000
        assert {r["action"] for r in body["results"]} == {"created"}
        watched.until(10_000)
        time.sleep(0.2)
    finally:
        stop.set()
        poller.join()
        watched.cancel()
    try:
        # Readers saw none of it, then all of it: one RuleSet per flip, never a part.
        assert watched.sets == [frozenset(), labels(documents)]
        assert set(polled) == {0, 10_000}, sorted(set(polled))
        stored = stored_documents(reader)
        assert set(stored) == labels(documents)
        chunks = [key for key in snapshot(reader) if key.startswith(CHUNKS)]
        assert len(chunks) > 127  # more writes than one transaction of this etcd takes

        # A change of every Service, whose 10,000th document is bad: named, nothing written.
        before = snapshot(reader)
        changed = mesh(9_800, 200, task_max=5)
        changed[-1] = changed[-1].replace("group: task}]", "group: nope}]")
        status, body = plane.apply_files({"mesh.yaml": "".join(changed)})
        assert status == 400
        assert body == {
            "error": "mesh.yaml: document 10000 (TaskChain svc-chain-00199): "
            "spec.hops[2].group: service svc-00599 has no group 'nope' (it has: default, task)"
        }
        assert snapshot(reader) == before
    finally:
        reader.close()


class HeldAfterStaging:
    """Holds the apply whose history record creates `label` between its staging and its flip
    until released (once): the window in which another control plane's apply lands."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, label: str) -> None:
        self.staged, self.released = threading.Event(), threading.Event()
        stage = rules_store.stage

        def held(*args: Any, **kwargs: Any) -> int:
            marker = stage(*args, **kwargs)
            if label in args[4]["created"] and not self.released.is_set():
                self.staged.set()
                assert self.released.wait(30)
            return marker

        monkeypatch.setattr(rules_store, "stage", held)


def in_background(plane: Plane, files: dict[str, str]) -> tuple[threading.Thread, list[Any]]:
    """An apply running in a thread; its (status, body) lands in the list."""
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(plane.apply_files(files)))
    thread.start()
    return thread, results


def test_concurrent_applies_serialise(
    etcd_server: EmbeddedEtcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two control planes apply at once; the one that staged first loses the flip, validates
    again against the other's rules and applies after it. Nobody sees a part of either."""
    first, second = Plane(etcd_server.endpoint), Plane(etcd_server.endpoint)
    a, b = mesh(280, 20, prefix="a"), mesh(280, 20, prefix="b")
    held = HeldAfterStaging(monkeypatch, "Service/a-00000")
    watched = Watched(first.store)
    try:
        applying_a, results = in_background(first, {"a.yaml": "".join(a)})
        assert held.staged.wait(60)
        status, body = second.apply_files({"b.yaml": "".join(b)})
        assert status == 200, body
        held.released.set()
        applying_a.join(60)
        assert results[0][0] == 200, results
        assert results[0][1]["revision"] == 2
        watched.until(600)
        assert watched.sets == [frozenset(), labels(b), labels(a) | labels(b)]

        status, history = first.request("GET", "/api/v1/history")
        assert status == 200
        assert [(item["revision"], len(item["created"])) for item in history["items"]] == [
            (2, 300),
            (1, 300),
        ]
        assert set(history["items"][0]["created"]) == labels(a)
        assert set(stored_documents(first.store)) == labels(a) | labels(b)
        assert not first.store.keys(STAGING)
    finally:
        held.released.set()
        watched.cancel()
        first.stop()
        second.stop()


def test_an_apply_that_loses_the_race_and_no_longer_validates_changes_nothing(
    etcd_server: EmbeddedEtcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a chain using ledger-svc is staged, another control plane deletes ledger-svc
    (no stored rule refers to it yet): validated again, the staged apply is refused whole."""
    first, second = Plane(etcd_server.endpoint), Plane(etcd_server.endpoint)
    held = HeldAfterStaging(monkeypatch, "TaskChain/ledger")
    try:
        assert first.apply_files({"s.yaml": service("ledger-svc")})[0] == 200
        documents = [*mesh(280, 20), chain("ledger", "[{service: ledger-svc, group: task}]")]
        applying, results = in_background(first, {"a.yaml": "".join(documents)})
        assert held.staged.wait(60)
        assert second.request("DELETE", "/api/v1/rules/svc/ledger-svc")[0] == 200
        held.released.set()
        applying.join(60)
        assert results == [
            (
                400,
                {
                    "error": "a.yaml: document 301 (TaskChain ledger): spec.hops[0].service: "
                    "unknown service 'ledger-svc'"
                },
            )
        ]
        assert stored_documents(first.store) == {}
        status, history = first.request("GET", "/api/v1/history")
        assert [item["action"] for item in history["items"]] == ["delete", "apply"]
        assert not first.store.keys(STAGING)
    finally:
        held.released.set()
        first.stop()
        second.stop()


# A writer that dies between staging and flip: the flip is replaced by SIGKILL, and the
# staging lease is short so that the test need not wait a minute for it to expire.
CRASHING_WRITER = """
import os, signal, sys
from controlplane.model.load import load_text
from controlplane.model.validate import apply as validate
from controlplane.store import rules
from controlplane.store.etcd import Store

rules.STAGING_TTL = 2
rules._flip = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
store = Store.connect(sys.argv[1])
current, revision = rules.load_rules(store)
new = validate(current, load_text(sys.stdin.read(), "mesh.yaml"))
rules.apply_rules(store, new, current, revision)
"""


def test_a_writer_killed_between_staging_and_flip_leaves_nothing_visible(
    plane: Plane, etcd_server: EmbeddedEtcd
) -> None:
    assert plane.apply_files({"rules.yaml": GOOD.read_text()})[0] == 200
    before = load_rules(plane.store)
    watched = Watched(plane.store)
    try:
        crashed = subprocess.run(
            [sys.executable, "-c", CRASHING_WRITER, etcd_server.endpoint],
            input="".join(mesh(1_000, 10)),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert crashed.returncode == -9, crashed.stderr
        staged = snapshot(plane.store)
        assert any(key.startswith(STAGING) for key in staged)  # it did stage, then died
        assert len([key for key in staged if key.startswith(GENERATIONS)]) == 2
        assert load_rules(plane.store) == before
        assert plane.request("GET", "/api/v1/rules/svc")[1]["items"][0]["metadata"]["name"] == (
            "account-svc"
        )
        time.sleep(0.5)
        assert len(watched.sets) == 1  # the first read only: no flip happened

        # The marker expires with its lease; the next apply collects the staging.
        deadline = time.monotonic() + 15
        while plane.store.keys(STAGING):
            assert time.monotonic() < deadline, "the staging marker did not expire"
            time.sleep(0.2)
        changed = GOOD.read_text().replace("fallback: strict", "fallback: loose")
        assert plane.apply_files({"rules.yaml": changed})[0] == 200
        left = snapshot(plane.store)
        generations = {key[len(GENERATIONS) :] for key in left if key.startswith(GENERATIONS)}
        kept = {left[key].decode() for key in left if key.startswith(HISTORY)}
        assert generations == kept  # the crashed writer's generation is gone
        used = {
            CHUNKS + chunk
            for generation in generations
            for chunk in json.loads(left[GENERATIONS + generation])["chunks"]
        }
        assert {key for key in left if key.startswith(CHUNKS)} == used  # and its chunks
        assert len(stored_documents(plane.store)) == 7
    finally:
        watched.cancel()


def up_call(up: Up, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """(status, JSON body) of one API call to a `tasklane up`, writes with its token."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {up.token}"} if method != "GET" else {}
    request = urllib.request.Request(up.url(path), data, headers, method=method)
    try:
        with api_opener.open(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_control_plane_killed_mid_apply_shows_the_rules_before_it_after_restart(
    etcd_server: EmbeddedEtcd, tmp_path: Path
) -> None:
    """`tasklane up` is SIGKILLed the moment its 10,000-document apply starts staging; the
    restarted control plane (and etcd) holds the rules as they were, whole."""
    store = Store.connect(etcd_server.endpoint)
    up = start_up(tmp_path, etcd=etcd_server.endpoint)
    killed = threading.Event()

    def kill_at_staging(changes: list[Change]) -> None:
        if any(change.value is not None for change in changes) and not killed.is_set():
            os.kill(up.proc.pid, signal.SIGKILL)
            killed.set()

    restarted = None
    cancel = None
    try:
        files = [{"name": "rules.yaml", "text": GOOD.read_text()}]
        assert up_call(up, "POST", "/api/v1/apply", {"files": files})[0] == 200
        before = stored_documents(store)
        cancel = store.watch_prefix(STAGING, None, kill_at_staging)
        files = [{"name": "mesh.yaml", "text": "".join(mesh(9_800, 200))}]
        applying = threading.Thread(
            target=lambda: pytest.raises(
                OSError, up_call, up, "POST", "/api/v1/apply", {"files": files}
            )
        )
        applying.start()
        assert killed.wait(60), "the apply never started staging"
        up.kill()
        applying.join(60)
        assert store.keys(STAGING)  # killed mid-way: its staging is still there, unflipped

        restarted = start_up(tmp_path, etcd=etcd_server.endpoint)
        assert stored_documents(store) == before
        status, services = up_call(restarted, "GET", "/api/v1/rules/svc")
        assert status == 200
        assert len(services["items"]) == 3
        status, history = up_call(restarted, "GET", "/api/v1/history")
        assert [item["revision"] for item in history["items"]] == [1]
    finally:
        if cancel is not None:
            cancel()
        up.kill()
        if restarted is not None:
            restarted.kill()
        store.close()
