"""The run lifecycle over HTTP: schedulers (and `tasklane task`) report starts and finishes.

    POST /api/v1/tasks/{task}/runs         {"id"?, "at"?}             -> 201 the run
    POST /api/v1/tasks/{task}/runs/finish  {"id"?, "at"?, "outcome"?} -> 200 the run
    GET  /api/v1/tasks/{task}/runs                                    -> 200 {"task", "items"}

A run is {"task", "id", "started_at", "finished_at", "outcome"}, times in epoch seconds
(UTC); `at` may also be an ISO 8601 time with a timezone. The body may be empty. Errors are
one-line `{"error"}`: 400 malformed, 404 no such task or run, 409 against the stored runs
(duplicate id, no open run, already finished), 503 etcd. etcd calls run in a worker thread:
the event loop also serves xDS.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from controlplane.api.context import ApiContext
from controlplane.model.text import describe
from controlplane.store import runs as runs_store
from controlplane.store.etcd import Store
from controlplane.store.runs import RunError


def parse_time(value: object) -> float:
    """Epoch seconds, or an ISO 8601 time with a timezone; RunError otherwise."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise RunError(
                f"invalid time {describe(value)}: epoch seconds or ISO 8601 with a timezone, "
                "e.g. 2024-03-01T02:00:00Z"
            )
        return parsed.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunError(f"invalid time {describe(value)}: epoch seconds or ISO 8601")
    return float(value)


async def _body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The optional JSON object of a request; RunError for anything else."""
    text = await request.text()
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except ValueError:
        raise RunError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise RunError(f"the request body must be a JSON object with {', '.join(allowed)}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RunError(f"unknown field {unknown[0]!r}; expected {', '.join(allowed)}")
    if "id" in body and not isinstance(body["id"], str):
        raise RunError(f"invalid run id {describe(body['id'])}: expected a string")
    if "at" in body:
        body["at"] = parse_time(body["at"])
    return body


def routes(context: ApiContext) -> list[web.RouteDef]:
    """The run routes."""

    async def answer(status: int, call: Callable[..., Any], *args: Any) -> web.Response:
        result = await asyncio.to_thread(call, context.store, *args)
        return web.json_response(result, status=status)

    def start(store: Store, task: str, body: dict[str, Any]) -> dict[str, Any]:
        run = runs_store.start_run(store, task, body.get("id"), body.get("at"))
        return runs_store.to_json(run)

    def finish(store: Store, task: str, body: dict[str, Any]) -> dict[str, Any]:
        outcome = body.get("outcome", runs_store.DEFAULT_OUTCOME)
        run = runs_store.finish_run(store, task, body.get("id"), body.get("at"), outcome)
        return runs_store.to_json(run)

    def listing(store: Store, task: str) -> dict[str, Any]:
        runs = runs_store.list_runs(store, task)
        if not runs:
            runs_store.require_task(store, task)  # 404 for a task that does not exist
        return {"task": task, "items": [runs_store.to_json(run) for run in runs]}

    async def post_start(request: web.Request) -> web.Response:
        body = await _body(request, ("id", "at"))
        return await answer(201, start, request.match_info["task"], body)

    async def post_finish(request: web.Request) -> web.Response:
        body = await _body(request, ("id", "at", "outcome"))
        return await answer(200, finish, request.match_info["task"], body)

    async def get_runs(request: web.Request) -> web.Response:
        return await answer(200, listing, request.match_info["task"])

    return [
        web.post("/api/v1/tasks/{task}/runs", post_start),
        web.post("/api/v1/tasks/{task}/runs/finish", post_finish),
        web.get("/api/v1/tasks/{task}/runs", get_runs),
    ]
