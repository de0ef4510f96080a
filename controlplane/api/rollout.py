"""A staged rollout over HTTP (model/rollout.py): its status, and ending it by hand.

    GET  /api/v1/rollout          -> 200 {"current": rollout|null, "last": outcome|null}
    POST /api/v1/rollout/promote  -> 200 {"outcome": "promoted", "revision": N}   (writes)
    POST /api/v1/rollout/abort    -> 200 {"outcome": "aborted", "revision": N}    (writes)

`revision` names the rollout by the revision its promotion makes (or made); an aborted one's
never exists. It is null for a candidate that could not be read, which abort removes.

A rollout starts with an apply that asks for it (api/rules.py, `"canary": {...}`).
`current` is what this replica judges: its canary and stable sidecars' tallies, the
canaries per role, and the verdict so far; `last` is how the last rollout ended, from etcd.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from controlplane.api.context import ApiContext
from controlplane.api.rules import who
from controlplane.model.rollout import ABORTED, PROMOTED
from controlplane.store.rollout import abort, last_outcome, promote
from controlplane.store.rules import DEFAULT_HISTORY_LIMIT


def routes(context: ApiContext, keep: int = DEFAULT_HISTORY_LIMIT) -> list[web.RouteDef]:
    async def status(request: web.Request) -> web.Response:
        last = await asyncio.to_thread(last_outcome, context.store)
        return web.json_response({"current": context.rollout(), "last": last})

    async def end(request: web.Request, outcome: str) -> web.Response:
        step = promote if outcome == PROMOTED else abort
        reason = f"{outcome} by hand"
        rollout = await asyncio.to_thread(step, context.store, reason, who(request), None, keep)
        revision = rollout.revision if rollout is not None else None  # None: unreadable
        body: dict[str, Any] = {"outcome": outcome, "revision": revision}
        return web.json_response(body)

    async def promote_it(request: web.Request) -> web.Response:
        return await end(request, PROMOTED)

    async def abort_it(request: web.Request) -> web.Response:
        return await end(request, ABORTED)

    return [
        web.get("/api/v1/rollout", status),
        web.post("/api/v1/rollout/promote", promote_it),
        web.post("/api/v1/rollout/abort", abort_it),
    ]
