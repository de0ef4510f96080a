"""The rules API and the rules store against a real etcd: applies are all-or-nothing, write only
what changed, refuse conflicts and stale reads; deletes respect references; watches recover."""

from __future__ import annotations

import hashlib
import json
import queue
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.api import rules as rules_api
from controlplane.errors import StoreError
from controlplane.model.load import load_files, load_text
from controlplane.model.rollout import Rollout
from controlplane.model.rules import RuleSet, to_document
from controlplane.model.validate import apply as validate_apply
from controlplane.runtime.etcd import EmbeddedEtcd
from controlplane.store.etcd import PREFIX, Store
from controlplane.store.rollout import promote, start_rollout
from controlplane.store.rules import (
    CHUNKS,
    GENERATIONS,
    HISTORY,
    REVISION_KEY,
    STAGING_GUARD,
    Candidate,
    ConcurrentChange,
    apply_rules,
    load_rules,
    watch_rules,
)
from tests.support.plane import Plane as BasePlane
from tests.support.plane import api_opener
from tests.support.stored import stored_documents

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(90)

GOOD = REPO / "tests" / "rules" / "good" / "fund-yield.yaml"


class Plane(BasePlane):
    """The control plane, and what etcd holds of the rules."""

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        return self.request(method, path, body)

    def apply(self, files: dict[str, str], dry_run: bool = False) -> tuple[int, Any]:
        return self.apply_files(files, dry_run)

    def snapshot(self) -> tuple[dict[str, bytes], int]:
        """Everything tasklane keeps in etcd but the leader-election keys (live state of the
        running control planes), and etcd's revision."""
        items, revision = self.store.get_prefix("")
        return {k: v for k, v in items.items() if not k.startswith("leader/")}, revision

    def mod_revisions(self) -> dict[str, int]:
        """key -> mod revision under the tasklane prefix (not part of the Store API)."""
        response = self.store._client.get_prefix_response(PREFIX)
        return {kv.key.decode()[len(PREFIX) :]: kv.mod_revision for kv in response.kvs}


@pytest.fixture
def plane(etcd_server: EmbeddedEtcd) -> Iterator[Plane]:  # noqa: F811
    running = Plane(etcd_server.endpoint)
    try:
        yield running
    finally:
        running.stop()


def good_labels() -> set[str]:
    return {f"{p.kind}/{p.name}" for p in load_files([GOOD])}


def service_doc(name: str, task_max: int = 4) -> str:
    return (
        f"apiVersion: tasklane.io/v1\nkind: Service\nmetadata: {{name: {name}}}\n"
        f"spec:\n  groups:\n    - {{name: task, minReplicas: 0, maxReplicas: {task_max}}}\n"
    )


def test_apply_writes_exactly_the_rules_and_only_changes(plane: Plane) -> None:
    status, body = plane.apply({"rules.yaml": GOOD.read_text()})
    assert status == 200, body
    parsed = load_files([GOOD])
    assert body["results"] == [
        {"kind": p.kind, "name": p.name, "action": "created"} for p in parsed
    ]
    assert "--- /dev/null\n+++ new/TaskChain/fund-yield\n" in body["diff"]

    items, revision = plane.snapshot()
    assert stored_documents(plane.store) == {
        f"{p.kind}/{p.name}": to_document(p.rule) for p in parsed
    }
    status, chains = plane.call("GET", "/api/v1/rules/chains")
    assert status == 200
    assert chains["kind"] == "TaskChain"
    assert [doc["metadata"]["name"] for doc in chains["items"]] == ["batch-debit", "fund-yield"]

    # The same file again: nothing to write, so etcd's revision does not move.
    status, body = plane.apply({"rules.yaml": GOOD.read_text()})
    assert status == 200
    assert {r["action"] for r in body["results"]} == {"unchanged"}
    assert body["diff"] == ""
    assert plane.snapshot() == (items, revision)

    # One chain changed: one new chunk (its bucket's), the generation naming it, and the
    # flip: one transaction writing the pointer and the history entry.
    changed = GOOD.read_text().replace("weight: 80", "weight: 60")
    status, body = plane.apply({"rules.yaml": changed})
    assert status == 200
    actions = {(r["kind"], r["name"]): r["action"] for r in body["results"]}
    assert actions.pop(("TaskChain", "batch-debit")) == "configured"
    assert set(actions.values()) == {"unchanged"}
    assert body["diff"].startswith("--- live/TaskChain/batch-debit\n+++ new/TaskChain/batch-debit")
    assert "-    weight: 80\n+    weight: 60\n" in body["diff"]
    after, _ = plane.snapshot()
    added = set(after) - set(items)
    assert {key.rpartition("/")[0] + "/" for key in added} == {CHUNKS, GENERATIONS, HISTORY}
    assert len(added) == 3
    assert {key for key in items if after.get(key) != items[key]} == {
        REVISION_KEY,
        STAGING_GUARD,
    }
    mod_revisions = plane.mod_revisions()
    flip = mod_revisions[REVISION_KEY]
    assert {key for key, rev in mod_revisions.items() if rev == flip} == {
        REVISION_KEY,
        f"{HISTORY}{2:010d}",
    }
    assert load_rules(plane.store)[1] == flip
    assert stored_documents(plane.store)["TaskChain/batch-debit"]["spec"]["hops"][0]["weight"] == 60


def test_dry_run_shows_the_diff_and_writes_nothing(plane: Plane) -> None:
    assert plane.apply({"rules.yaml": GOOD.read_text()})[0] == 200
    before = plane.snapshot()
    changed = (
        GOOD.read_text().replace('"0 2 * * *"', '"0 3 * * *"') + "---\n" + service_doc("ledger-svc")
    )
    status, body = plane.apply({"rules.yaml": changed}, dry_run=True)
    assert status == 200
    actions = {r["name"]: r["action"] for r in body["results"]}
    assert actions["nightly-fund-yield"] == "configured"
    assert actions["ledger-svc"] == "created"
    assert "-  schedule: 0 2 * * *\n+  schedule: 0 3 * * *\n" in body["diff"]
    assert "--- /dev/null\n+++ new/Service/ledger-svc\n" in body["diff"]
    assert plane.snapshot() == before


def test_refused_apply_writes_nothing_of_any_file(plane: Plane) -> None:
    assert plane.apply({"rules.yaml": GOOD.read_text()})[0] == 200
    before = plane.snapshot()
    chain = (
        "apiVersion: tasklane.io/v1\nkind: TaskChain\nmetadata: {name: ledger}\n"
        "spec:\n  dye: {values: [ledger]}\n  hops:\n    - {service: ledger-svc, group: batch}\n"
    )
    status, body = plane.apply({"a.yaml": service_doc("ledger-svc"), "b.yaml": chain})
    assert status == 400
    assert body == {
        "error": "b.yaml: document 1 (TaskChain ledger): spec.hops[0].group: "
        "service ledger-svc has no group 'batch' (it has: default, task)"
    }
    assert plane.snapshot() == before

    broken_yaml = service_doc("one") + "---\n" + service_doc("two") + "---\nkind: [\n"
    status, body = plane.apply({"three.yaml": broken_yaml})
    assert status == 400
    assert body["error"].startswith("three.yaml: document 3: YAML syntax error at line")
    assert plane.snapshot() == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not JSON"),
        (b"[]", "bad apply request"),
        (b'{"files": []}', "bad apply request"),
        (b'{"files": [{"name": "a.yaml"}]}', "bad apply request"),
        (b'{"files": [{"name": "a.yaml", "text": ""}], "dryRun": "yes"}', "bad apply request"),
        (b'{"files": [{"name": "a.yaml", "text": "# nothing\\n"}]}', "no rules in a.yaml"),
    ],
)
def test_malformed_apply_requests_are_refused(plane: Plane, body: bytes, message: str) -> None:
    url = f"http://127.0.0.1:{plane.control_plane.http_port}/api/v1/apply"
    with pytest.raises(urllib.error.HTTPError) as caught:
        request = urllib.request.Request(url, body, plane.auth_headers(), method="POST")
        api_opener.open(request, timeout=10)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"].startswith(message)
    assert plane.snapshot()[0] == {}


def test_oversized_apply_is_refused_with_the_limit(plane: Plane) -> None:
    status, body = plane.apply({"huge.yaml": "# " + "x" * (16 * 1024 * 1024) + "\n"})
    assert status == 413
    assert re.fullmatch(
        r"too large for one apply \(16,777,[0-9]{3} bytes\): the control plane takes up to "
        r"16,777,216 bytes \(16\.0 MiB\)",
        body["error"],
    ), body
    assert plane.snapshot()[0] == {}


def test_get_accepts_kind_aliases_and_reports_unknown(plane: Plane) -> None:
    assert plane.apply({"rules.yaml": GOOD.read_text()})[0] == 200
    for alias, kind in [
        ("Service", "Service"),
        ("SVC", "Service"),
        ("services", "Service"),
        ("taskchain", "TaskChain"),
        ("Chains", "TaskChain"),
        ("scheduledtasks", "ScheduledTask"),
        ("task", "ScheduledTask"),
    ]:
        status, body = plane.call("GET", f"/api/v1/rules/{alias}")
        assert (status, body["kind"]) == (200, kind), alias
    status, body = plane.call("GET", "/api/v1/rules/chain/fund-yield")
    assert status == 200
    assert body == to_document(load_rules(plane.store)[0].chains["fund-yield"])
    assert plane.call("GET", "/api/v1/rules/chain/nope") == (
        404,
        {"error": "TaskChain 'nope' not found"},
    )
    status, body = plane.call("GET", "/api/v1/rules/pods")
    assert status == 404
    assert body["error"].startswith("unknown kind 'pods' (expected one of: Service, TaskChain")


def test_delete_respects_references(plane: Plane) -> None:
    assert plane.apply({"rules.yaml": GOOD.read_text()})[0] == 200
    before = plane.snapshot()
    status, body = plane.call("DELETE", "/api/v1/rules/svc/nav-pricing")
    assert status == 409
    assert body["error"] == (
        "cannot delete Service nav-pricing: still referred to by "
        "TaskChain batch-debit (spec.hops[1].service), TaskChain fund-yield (spec.hops[2].service)"
    )
    status, body = plane.call("DELETE", "/api/v1/rules/chain/fund-yield")
    assert status == 409
    assert "ScheduledTask nightly-fund-yield (spec.chain)" in body["error"]
    assert plane.snapshot() == before

    assert plane.call("DELETE", "/api/v1/rules/task/nightly-fund-yield") == (
        200,
        {"kind": "ScheduledTask", "name": "nightly-fund-yield", "action": "deleted", "revision": 2},
    )
    assert plane.call("DELETE", "/api/v1/rules/chain/fund-yield")[0] == 200
    assert set(stored_documents(plane.store)) == good_labels() - {
        "ScheduledTask/nightly-fund-yield",
        "TaskChain/fund-yield",
    }
    assert plane.call("DELETE", "/api/v1/rules/chain/fund-yield") == (
        404,
        {"error": "TaskChain 'fund-yield' not found"},
    )


def test_stale_writer_is_refused(plane: Plane) -> None:
    """A writer that read before another one wrote must not overwrite, even when the other
    created a rule the stale writer never saw (a chain using the service it deletes)."""
    store = plane.store
    base = validate_apply(RuleSet.empty(), load_text(service_doc("ledger-svc"), "s.yaml"))
    apply_rules(store, base, RuleSet.empty(), 0)
    stale, stale_revision = load_rules(store)

    chain = load_text(
        "apiVersion: tasklane.io/v1\nkind: TaskChain\nmetadata: {name: ledger}\n"
        "spec:\n  dye: {values: [ledger]}\n  hops:\n    - {service: ledger-svc, group: task}\n",
        "c.yaml",
    )
    current, revision = load_rules(store)
    apply_rules(store, validate_apply(current, chain), current, revision)
    before = plane.snapshot()

    with pytest.raises(ConcurrentChange, match="rules changed concurrently"):
        apply_rules(store, stale.without("Service", "ledger-svc"), stale, stale_revision)
    assert plane.snapshot() == before


def test_api_retries_once_after_a_concurrent_change(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another control plane writes between our read and our write: the apply is validated
    again against its rules; when it keeps happening the user gets a clear 409."""
    other = Store.connect(plane.store.endpoint)
    reads = []

    def racing_load(store: Store) -> tuple[RuleSet, int]:
        loaded = load_rules(store)
        reads.append(loaded)
        current, revision = load_rules(other)
        name = f"racer-{len(reads)}"
        new = validate_apply(current, load_text(service_doc(name), "racer.yaml"))
        apply_rules(other, new, current, revision)
        return loaded

    monkeypatch.setattr(rules_api, "load_rules", racing_load)
    try:
        status, body = plane.apply({"rules.yaml": service_doc("ledger-svc")})
        assert status == 409
        assert body["error"].startswith("rules changed concurrently")
        assert len(reads) == 2
        assert set(stored_documents(plane.store)) == {"Service/racer-1", "Service/racer-2"}

        # Racing only once: the second attempt writes; it sees the racer's own rule.
        def race_once(store: Store) -> tuple[RuleSet, int]:
            return racing_load(store) if len(reads) == 2 else load_rules(store)

        monkeypatch.setattr(rules_api, "load_rules", race_once)
        status, body = plane.apply({"rules.yaml": service_doc("racer-3")})
        assert status == 200, body
        assert body["results"] == [{"kind": "Service", "name": "racer-3", "action": "unchanged"}]
        status, body = plane.apply({"rules.yaml": service_doc("racer-3", task_max=5)})
        assert status == 200, body
        assert body["results"] == [{"kind": "Service", "name": "racer-3", "action": "configured"}]
        assert stored_documents(plane.store)["Service/racer-3"]["spec"]["groups"][1] == {
            "name": "task",
            "minReplicas": 0,
            "maxReplicas": 5,
        }
    finally:
        other.close()


def plant(store: Store, chunk: bytes) -> str:
    """Make a generation of one chunk current by hand, as a foreign or broken writer would;
    returns the chunk's key."""
    name = hashlib.sha256(chunk).hexdigest()
    record = {"chunks": [name], "at": 0, "who": "", "action": "", "created": []}
    store.put(CHUNKS + name, chunk)
    store.put(f"{GENERATIONS}planted-{name[:8]}", json.dumps(record))
    store.put(REVISION_KEY, json.dumps({"revision": 9, "generation": f"planted-{name[:8]}"}))
    return CHUNKS + name


def test_load_names_a_key_that_holds_no_rule(plane: Plane) -> None:
    chunk = plant(plane.store, b"{not json")
    with pytest.raises(StoreError, match=f"etcd key {PREFIX}{chunk} does not hold rules"):
        load_rules(plane.store)
    chunk = plant(plane.store, b'[{"kind": "Service"}]')
    with pytest.raises(StoreError, match=f"etcd key {PREFIX}{chunk} does not hold a valid rule"):
        load_rules(plane.store)


# --- watch_rules ---------------------------------------------------------------------------


class Seen:
    """Collects what a rules watch delivers (rules, a rollout's candidate), for the test
    thread."""

    def __init__(self) -> None:
        self.sets: queue.Queue[RuleSet] = queue.Queue()
        self.delivered: list[tuple[RuleSet, Candidate | None]] = []  # in order

    def __call__(self, rules: RuleSet, candidate: Candidate | None) -> None:
        self.delivered.append((rules, candidate))
        self.sets.put(rules)

    def until(self, check: Callable[[RuleSet], bool], timeout: float = 10.0) -> RuleSet:
        """The first delivered set that passes check (earlier ones are skipped)."""
        while True:
            rules = self.sets.get(timeout=timeout)
            if check(rules):
                return rules


def test_watch_delivers_each_change_and_survives_an_etcd_restart(
    etcd_server: EmbeddedEtcd,  # noqa: F811
) -> None:
    store = Store.connect(etcd_server.endpoint)
    writer = Store.connect(etcd_server.endpoint)
    seen = Seen()
    cancel = watch_rules(store, seen)
    try:
        assert seen.sets.get(timeout=5).all() == ()

        good = validate_apply(RuleSet.empty(), load_files([GOOD]))
        apply_rules(writer, good, RuleSet.empty(), 0)
        assert seen.until(lambda r: len(r.all()) == 7) == good

        current, revision = load_rules(writer)
        fewer = current.without("ScheduledTask", "weekday-batch-debit")
        apply_rules(writer, fewer, current, revision)
        assert seen.until(lambda r: "weekday-batch-debit" not in r.tasks) == fewer

        etcd_server.stop()
        etcd_server.start()
        current, revision = load_rules(writer)
        more = validate_apply(current, load_text(service_doc("after-restart"), "s.yaml"))
        apply_rules(writer, more, current, revision)
        assert seen.until(lambda r: "after-restart" in r.services, timeout=20) == more

        # A rollout's candidate comes beside the current rules; its promotion, both at once.
        staged = more.without("ScheduledTask", "nightly-fund-yield")
        settings = Rollout("", 10, 60, 20, started_at=0.0, who="t", base=0, revision=0)
        started = start_rollout(writer, staged, more, load_rules(writer)[1], settings)
        assert started is not None and started.revision == 4
        seen.until(lambda r: seen.delivered[-1][1] is not None)
        candidate = seen.delivered[-1][1]
        assert candidate.rules == staged and candidate.rollout == started
        promote(writer, "test", "me")
        assert seen.until(lambda r: r == staged) == staged
        # In the same delivery: the promoted rules are never current and candidate at once.
        assert all(c is None for r, c in seen.delivered if r == staged)
    finally:
        cancel()
        store.close()
        writer.close()


def test_rules_stored_one_key_each_by_an_older_tasklane_are_read_then_collected(
    plane: Plane,
) -> None:
    """The layout before generations: one JSON document per rule and an empty marker."""
    old = validate_apply(RuleSet.empty(), load_files([GOOD]))
    for rule in old.all():
        document = json.dumps(to_document(rule))
        plane.store.put(f"rules/{rule.kind}/{rule.name}", document)
    plane.store.put(REVISION_KEY, b"")
    assert load_rules(plane.store)[0] == old
    assert plane.call("GET", "/api/v1/rules/svc/fund-facade")[0] == 200

    status, body = plane.apply({"s.yaml": service_doc("ledger-svc")})
    assert status == 200, body
    assert body["revision"] == 1
    assert set(stored_documents(plane.store)) == good_labels() | {"Service/ledger-svc"}
    assert not [key for key in plane.snapshot()[0] if key.split("/")[:2] == ["rules", "Service"]]
