"""The HTTP handlers served from a small fake context, with no etcd behind it: the API's one
seam (api/context.py) and its one error mapping (the json_errors middleware)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from controlplane.api import instances, isolation, profile, rules, tasks
from controlplane.api.http import ApiError, build_app, http_status
from controlplane.errors import RuleError, RuntimeFailure, StoreError
from controlplane.model.rules import RuleSet
from controlplane.store.etcd import Store
from controlplane.store.rules import ConcurrentChange
from controlplane.store.runs import DuplicateRun, RunConflict, RunError, RunNotFound, UnknownTask


class FakeContext:
    """Rules empty, etcd unreachable: what a control plane looks like when etcd is down."""

    @property
    def store(self) -> Store:
        raise StoreError("etcd at 127.0.0.1:1 is unavailable")

    def rules(self) -> RuleSet:
        return RuleSet.empty()

    async def published(self, key: str, present: bool, timeout: float) -> bool:
        return False

    def status(self) -> dict[str, Any]:
        return {"nodes": [], "roles": ["a|default"]}

    def isolation(self) -> dict[str, Any]:
        return {"totals": {"requests": 7}}

    def metrics(self) -> tuple[bytes, str]:
        return b"# nothing\n", "text/plain; version=0.0.4; charset=utf-8"


def serve(*requests: tuple[str, str, Any]) -> list[tuple[int, Any]]:
    """Each (method, path, json body) against the API built on FakeContext, in process."""

    async def main() -> list[tuple[int, Any]]:
        context = FakeContext()
        app = build_app(context)
        for module in (rules, instances, tasks, profile, isolation):
            app.add_routes(module.routes(context))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            answers = []
            for method, path, body in requests:
                response = await client.request(method, path, json=body)
                is_json = response.content_type == "application/json"
                answers.append(
                    (response.status, await (response.json() if is_json else response.text()))
                )
            return answers

    return asyncio.run(main())


def test_etcd_down_is_503_with_one_json_error_on_every_etcd_route() -> None:
    answers = serve(
        ("GET", "/healthz", None),
        ("GET", "/api/v1/rules/svc", None),
        ("POST", "/api/v1/apply", {"files": [{"name": "a.yaml", "text": "kind: Service"}]}),
        ("DELETE", "/api/v1/rules/svc/a", None),
        ("GET", "/api/v1/instances", None),
        ("POST", "/api/v1/tasks/t/runs", {}),
        ("GET", "/api/v1/tasks/t/runs", None),
    )
    assert answers[0] == (
        503,
        {"status": "unavailable", "error": "etcd at 127.0.0.1:1 is unavailable"},
    )
    for status, body in answers[1:]:
        assert (status, body) == (503, {"error": "etcd at 127.0.0.1:1 is unavailable"})


def test_refusals_of_the_handlers_themselves() -> None:
    answers = serve(
        ("POST", "/api/v1/apply", {"files": "nope"}),
        ("POST", "/api/v1/instances", {"service": 7}),
        ("POST", "/api/v1/instances/x/keepalive", None),
        ("GET", "/api/v1/profile/ghost", None),
        ("POST", "/api/v1/tasks/t/runs", {"colour": "red"}),
    )
    assert [status for status, _ in answers] == [400, 400, 404, 404, 400]
    assert answers[0][1]["error"].startswith("bad apply request")
    assert answers[1][1]["error"].startswith("bad instance")
    assert answers[2][1] == {"error": "instance 'x' is not registered here"}
    assert answers[3][1] == {"error": "no service 'ghost'"}
    assert answers[4][1]["error"].startswith("unknown field 'colour'")


def test_views_come_from_the_context() -> None:
    status, isolation_view, metrics = serve(
        ("GET", "/api/v1/status", None),
        ("GET", "/api/v1/isolation", None),
        ("GET", "/metrics", None),
    )
    assert status == (200, {"nodes": [], "roles": ["a|default"]})
    assert isolation_view == (200, {"totals": {"requests": 7}})
    assert metrics == (200, "# nothing\n")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ApiError(418, "x"), 418),
        (UnknownTask("x"), 404),
        (RunNotFound("x"), 404),
        (DuplicateRun("x"), 409),
        (RunConflict("x"), 409),
        (RunError("x"), 400),
        (RuleError("x"), 400),
        (ConcurrentChange("x"), 409),
        (StoreError("x"), 503),
        (RuntimeFailure("x"), None),  # ours to fix: a 500 and a log line
    ],
)
def test_one_status_per_error_class(error: Exception, status: int | None) -> None:
    assert http_status(error) == status


def test_a_failure_of_ours_is_a_500_without_details() -> None:
    async def main() -> tuple[int, dict]:
        app = build_app(FakeContext())

        async def broken(request: web.Request) -> web.Response:
            raise RuntimeFailure("secret detail")

        app.router.add_get("/broken", broken)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            response = await client.get("/broken")
            return response.status, await response.json()

    assert asyncio.run(main()) == (500, {"error": "internal error; see the control plane log"})
