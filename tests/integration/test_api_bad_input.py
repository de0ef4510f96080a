"""Malformed HTTP API requests against a real control plane on a real etcd: each is refused
with a 4xx and a one-line JSON `{"error"}` (never a 500 or a traceback), and etcd is unchanged
afterwards."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.api.rules import MAX_APPLY_BODY
from controlplane.model.instance import Instance
from tests.support.plane import Plane as BasePlane
from tests.support.plane import api_opener

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "tests" / "rules" / "good" / "fund-yield.yaml"
TASK = "nightly-fund-yield"
MIB = 1024 * 1024

pytestmark = pytest.mark.timeout(120)


class Plane(BasePlane):
    def snapshot(self) -> dict[str, bytes]:
        """Everything tasklane keeps in etcd but the leader-election keys."""
        items, _ = self.store.get_prefix("")
        return {k: v for k, v in items.items() if not k.startswith("leader/")}

    def raw(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, str]:
        """(status, body bytes, content type) of a request with exactly these bytes."""
        sent = {**self.auth_headers(), **(headers or {})}
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=sent)
        try:
            with api_opener.open(request, timeout=30) as response:
                return response.status, response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers.get_content_type()


@pytest.fixture(scope="module")
def plane(etcd_endpoint_module: str) -> Iterator[Plane]:
    """A control plane with the fund-yield rules applied."""
    plane = Plane(etcd_endpoint_module)
    try:
        assert plane.apply_files({"rules.yaml": RULES.read_text()})[0] == 200
        yield plane
    finally:
        plane.stop()


def instance(**changes: Any) -> dict[str, Any]:
    document = Instance(
        id="127.0.0.1-41001",
        service="account-svc",
        group="default",
        host="127.0.0.1",
        inbound_port=41001,
        app_port=41002,
        admin_port=41003,
        egress_port=41004,
        pid=0,
        started_at=time.time(),
    ).to_json()
    document.update(changes)
    return document


def chain(dye_values: list[str], name: str = "bad-dye") -> str:
    return (
        "apiVersion: tasklane.io/v1\nkind: TaskChain\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  dye: {{values: {json.dumps(dye_values)}}}\n"
        "  hops: [{service: nav-pricing, group: task}]\n"
    )


def apply_body(text: str, name: str = "r.yaml", **extra: Any) -> bytes:
    return json.dumps({"files": [{"name": name, "text": text}], **extra}).encode()


def assert_refused(
    plane: Plane, method: str, path: str, data: bytes | None, headers: dict[str, str] | None = None
) -> str:
    """Send it, check the one-line JSON 4xx and that etcd did not change; the error text."""
    before = plane.snapshot()
    status, body, content_type = plane.raw(method, path, data, headers)
    after = plane.snapshot()
    assert 400 <= status < 500, (status, body[:500])
    assert content_type == "application/json", (content_type, body[:500])
    answer = json.loads(body)
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    error = answer["error"]
    assert isinstance(error, str) and error, answer
    assert "\n" not in error and "Traceback" not in error, error
    assert after == before, "a refused request changed etcd"
    return error


JSON = {"Content-Type": "application/json"}
APPLY = "/api/v1/apply"
INSTANCES = "/api/v1/instances"
RUNS = f"/api/v1/tasks/{TASK}/runs"

# Bodies every JSON endpoint must refuse: (id, bytes, headers).
MALFORMED = [
    ("not-json", b"{files: nope", JSON),
    ("truncated", b'{"files": [{"name": "r.yaml", "te', JSON),
    ("list", b"[]", JSON),
    ("string", b'"files"', JSON),
    ("null", b"null", JSON),
    ("number", b"42", JSON),
    ("non-utf8", b'{"files": "\xff\xfe\xc3("}', JSON),
    ("latin1-declared", b'{"id": "\xe9\xff"}', {"Content-Type": "application/json; charset=bogus"}),
    ("form", b"files=a&dryRun=1", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("nan", b'{"id": NaN, "files": NaN}', JSON),
    ("deep", b"[" * 100_000 + b"]" * 100_000, JSON),
]
# Known bugs (see the report in issue 6): strict xfails, so a fix turns them into failures that
# ask for the mark to go.
KNOWN: dict[tuple[str, str], str] = {}  # (endpoint, case) -> open bug; none left here


def bug(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(reason=f"bug: {reason}", strict=True)


def malformed(endpoint: str, skip: tuple[str, ...] = ()) -> list[Any]:
    return [
        pytest.param(
            data,
            headers,
            id=name,
            marks=[bug(KNOWN[endpoint, name])] if (endpoint, name) in KNOWN else [],
        )
        for name, data, headers in MALFORMED
        if name not in skip
    ]


@pytest.mark.parametrize(("data", "headers"), malformed("apply"))
def test_apply_refuses_malformed_bodies(plane: Plane, data: bytes, headers: dict[str, str]) -> None:
    assert_refused(plane, "POST", APPLY, data, headers)


@pytest.mark.parametrize(("data", "headers"), malformed("instances"))
def test_instances_refuse_malformed_bodies(
    plane: Plane, data: bytes, headers: dict[str, str]
) -> None:
    assert_refused(plane, "POST", INSTANCES, data, headers)


@pytest.mark.parametrize(("data", "headers"), malformed("runs", skip=("form",)))
def test_runs_refuse_malformed_bodies(plane: Plane, data: bytes, headers: dict[str, str]) -> None:
    assert_refused(plane, "POST", RUNS, data, headers)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"files": []},
        {"files": "r.yaml"},
        {"files": None},
        {"files": [{"name": "r.yaml"}]},
        {"files": [{"text": "a: 1"}]},
        {"files": [{"name": 1, "text": "a: 1"}]},
        {"files": [{"name": "r.yaml", "text": ["a"]}]},
        {"files": [{"name": "r.yaml", "text": None}]},
        {"files": [{"name": "r.yaml", "text": "a: 1", "extra": 1}]},
        {"files": [["r.yaml", "a: 1"]]},
        {"files": [{"name": "r.yaml", "text": RULES.read_text()}], "dryRun": "yes"},
        {"files": [{"name": "r.yaml", "text": RULES.read_text()}], "dryRun": None},
        {"files": [{"name": "r.yaml", "text": RULES.read_text()}], "unknown": 1},
    ],
    ids=lambda body: json.dumps(body)[:40],
)
def test_apply_refuses_wrong_shapes(plane: Plane, body: object) -> None:
    assert_refused(plane, "POST", APPLY, json.dumps(body).encode(), JSON)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "a: [\n",
        "apiVersion: tasklane.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n",
        "apiVersion: tasklane.io/v9\nkind: Service\nmetadata: {name: s}\nspec: {groups: []}\n",
        "apiVersion: tasklane.io/v1\nkind: Service\nmetadata: {name: ../../etc}\n"
        "spec: {groups: [{name: default, minReplicas: 1, maxReplicas: 1}]}\n",
        "apiVersion: tasklane.io/v1\nkind: Service\nmetadata: {name: 'a/b'}\n"
        "spec: {groups: [{name: default, minReplicas: 1, maxReplicas: 1}]}\n",
        "a: \x07\n",
        "a: &a [*a, *a]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b]\n",
        pytest.param(
            chain(["d" * 10_000]),
        ),
        chain(["fund\x00yield"]),
        chain(["fund\nyield"]),
        chain(["fund\x1byield"]),
        chain(["a,b"]),
        chain(["a;b=c"]),
        chain(["é"]),
        chain(["fund-yield"]),  # already claimed by the stored chain
    ],
    ids=[
        "empty",
        "comment",
        "yaml-syntax",
        "unknown-kind",
        "api-version",
        "name-traversal",
        "name-slash",
        "control-char",
        "alias",
        "dye-10kb",
        "dye-nul",
        "dye-newline",
        "dye-escape",
        "dye-comma",
        "dye-semicolon",
        "dye-non-ascii",
        "dye-conflict",
    ],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["apply", "dry-run"])
def test_apply_refuses_bad_rules(plane: Plane, text: str, dry_run: bool) -> None:
    try:
        error = assert_refused(plane, "POST", APPLY, apply_body(text, dryRun=dry_run), JSON)
    finally:  # if it was accepted, take it out again so later tests see the same etcd
        plane.raw("DELETE", "/api/v1/rules/chain/bad-dye", None)
    assert len(error) < 2000, "the error quotes a bounded part of the input"


def test_apply_refuses_a_bad_file_name_cleanly(plane: Plane) -> None:
    error = assert_refused(plane, "POST", APPLY, apply_body("a: [\n", name="x\ny\x00.yaml"), JSON)
    assert error


@pytest.mark.parametrize("path", [APPLY, INSTANCES, RUNS])
def test_huge_bodies_are_refused(plane: Plane, path: str) -> None:
    limit = MAX_APPLY_BODY if path == APPLY else MIB  # aiohttp's default elsewhere
    text = "# " + "x" * (limit + 10) + "\n" + RULES.read_text()
    error = assert_refused(plane, "POST", path, apply_body(text), JSON)
    assert len(error) < 500


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/rules/task/..%2F..%2Fleader",
        "/api/v1/rules/task/..%2F" + TASK,
        "/api/v1/rules/..%2Ftask/" + TASK,
        "/api/v1/rules/svc/..%2F..%2Ffund-facade",
        "/api/v1/rules/svc/fund-facade%00",
        "/api/v1/rules/svc/%2E%2E",
        "/api/v1/rules/Gateway/x",
        "/api/v1/rules/pods/x",
        "/api/v1/rules/svc/" + "n" * 10_000,
        "/api/v1/rules/svc/fund-facade",  # still referred to by chains: 409
        "/api/v1/rules/chain/fund-yield",  # still referred to by a task: 409
    ],
    ids=lambda path: path.removeprefix("/api/v1/rules/")[:40],
)
def test_delete_refuses_bad_names(plane: Plane, path: str) -> None:
    assert_refused(plane, "DELETE", path, None)


@pytest.mark.parametrize(
    "body",
    [
        {},
        instance(id=None),
        instance(pid="0"),
        instance(inbound_port=True),
        instance(inbound_port=1.5),
        instance(started_at="now"),
        instance(host=["127.0.0.1"]),
        instance(id=""),
        instance(id="../../rules/Service/fund-facade"),
        instance(service="../rules"),
        instance(service="no-such-service"),
        instance(group="no-such-group"),
        instance(extra="x"),
        {k: v for k, v in instance().items() if k != "host"},
        instance(host="fund-facade.local"),  # Envoy takes only IPs as endpoints
    ],
    ids=[
        "empty",
        "id-null",
        "pid-string",
        "port-bool",
        "port-float",
        "started-string",
        "host-list",
        "id-empty",
        "id-traversal",
        "service-traversal",
        "unknown-service",
        "unknown-group",
        "unknown-field",
        "missing-host",
        "host-name",
    ],
)
def test_instances_refuse_bad_registrations(plane: Plane, body: dict[str, Any]) -> None:
    assert_refused(plane, "POST", INSTANCES, json.dumps(body).encode(), JSON)


OVERSIZED = [
    pytest.param({"id": "i" * 100_000}, id="id"),
    pytest.param({"host": "h" * 100_000}, id="host"),
    pytest.param({"group": "g" * 100_000}, id="group"),
    pytest.param({"inbound_port": 2**80}, id="port"),
    pytest.param({"inbound_port": -1}, id="negative-port"),
    pytest.param({"id": "a\nb\x00c"}, id="control-chars"),
]


@pytest.mark.parametrize("changes", OVERSIZED)
def test_instances_refuse_oversized_fields(plane: Plane, changes: dict[str, Any]) -> None:
    body = instance(**changes)
    try:
        assert_refused(plane, "POST", INSTANCES, json.dumps(body).encode(), JSON)
    finally:  # if it was accepted, take it out again so later tests see the same etcd
        plane.raw("DELETE", f"{INSTANCES}/{urllib.request.quote(body['id'], safe='')}", None)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (RUNS, {"id": 1}),
        (RUNS, {"id": None}),
        (RUNS, {"at": "yesterday"}),
        (RUNS, {"at": "2024-03-01T02:00:00"}),  # no timezone
        (RUNS, {"at": True}),
        (RUNS, {"at": [1]}),
        (RUNS, {"outcome": "ok"}),  # only finish takes an outcome
        (RUNS, {"task": TASK}),
        ("/api/v1/tasks/no-such-task/runs", {}),
        ("/api/v1/tasks/..%2F..%2Frules%2FService%2Ffund-facade/runs", {}),
        ("/api/v1/tasks/..%2F" + TASK + "/runs", {}),
        ("/api/v1/tasks/%00/runs", {}),
        ("/api/v1/tasks/" + "t" * 10_000 + "/runs", {}),
    ],
    ids=[
        "id-int",
        "id-null",
        "at-word",
        "at-naive",
        "at-bool",
        "at-list",
        "outcome",
        "unknown-field",
        "unknown-task",
        "task-traversal",
        "task-traversal-2",
        "task-nul",
        "task-10kb",
    ],
)
def test_runs_refuse_bad_starts(plane: Plane, path: str, body: dict[str, Any]) -> None:
    assert_refused(plane, "POST", path, json.dumps(body).encode(), JSON)


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer \u00e9"},
        {"Authorization": "Bearer " + "x" * 7000},
        pytest.param(
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ),
        {"Content-Type": "multipart/form-data; boundary=zz"},
    ],
    ids=["bearer-empty", "bearer-non-ascii", "bearer-huge", "gzip-lie", "multipart"],
)
@pytest.mark.parametrize("path", [APPLY, INSTANCES, RUNS])
def test_bad_headers_are_refused(plane: Plane, headers: dict[str, str], path: str) -> None:
    body = apply_body("a: [\n")
    if headers.get("Authorization", "").startswith("Bearer \u00e9"):
        headers = {"Authorization": "Bearer \u00e9".encode().decode("latin-1")}
    assert_refused(plane, "POST", path, body, headers)


def test_a_request_line_beyond_the_limit_is_a_400_that_changes_nothing(plane: Plane) -> None:
    """Past MAX_REQUEST_LINE aiohttp answers before any handler: a plain-text 400, still a
    clear refusal, and nothing stored."""
    before = plane.snapshot()
    status, body, _ = plane.raw("DELETE", "/api/v1/rules/svc/" + "n" * 100_000, None)
    assert status == 400, (status, body[:200])
    assert plane.snapshot() == before
    assert plane.raw("GET", "/api/v1/rules/Service", None)[0] == 200  # still serving
