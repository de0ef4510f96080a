"""A service's profile over HTTP: desired replicas per task group per minute for the next
hours, and the scaler's recent decisions with their reasons (`tasklane get profile`, the
dashboard); `scaler` says whether this control plane runs one (why there may be none).

    GET /api/v1/profile/{service}?minutes=1440  -> 200 {"service", "start", "minutes",
                                                        "groups": {group: [replicas, ...]},
                                                        "decisions": [...], "scaler": bool}
    GET /api/v1/workload                        -> 200 {"workload": a Workload document
                                                        from the stored history, "notes": [...]}
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from controlplane.api.context import ApiContext
from controlplane.api.http import ApiError
from controlplane.scaler.export import export_workload
from controlplane.scaler.profile import profile
from controlplane.store.decisions import list_decisions
from controlplane.store.runs import list_runs
from controlplane.store.startups import list_startups

MAX_MINUTES = 7 * 1440


def service_profile(context: ApiContext, service: str, minutes: int) -> dict[str, Any]:
    """Blocking (etcd reads): the profile from the rules and run history, and decisions."""
    rules = context.rules()
    now = time.time()
    start = now - now % 60
    store = context.store
    per_group = profile(rules, list_runs(store), start, minutes, now)
    return {
        "service": service,
        "start": start,
        "minutes": minutes,
        "groups": {group: counts for (name, group), counts in per_group.items() if name == service},
        "decisions": list_decisions(store, service),
        "scaler": context.scaler_status() is not None,
    }


def history_workload(context: ApiContext) -> dict[str, Any]:
    """Blocking (etcd reads): the rules, runs and measured start-ups as a workload."""
    store = context.store
    exported = export_workload(context.rules(), list_runs(store), list_startups(store), time.time())
    return {"workload": exported.document, "notes": list(exported.notes)}


def routes(context: ApiContext) -> list[web.RouteDef]:
    async def get_profile(request: web.Request) -> web.Response:
        service = request.match_info["service"]
        if service not in context.rules().services:
            raise ApiError(404, f"no service {service!r}")
        try:
            minutes = int(request.query.get("minutes", "1440"))
        except ValueError:
            raise ApiError(400, "minutes must be a whole number") from None
        if not 1 <= minutes <= MAX_MINUTES:
            raise ApiError(400, f"minutes must be within 1..{MAX_MINUTES}")
        body = await asyncio.to_thread(service_profile, context, service, minutes)
        return web.json_response(body)

    async def get_workload(request: web.Request) -> web.Response:
        if not context.rules().tasks:
            raise ApiError(404, "no ScheduledTask: no history to export")
        return web.json_response(await asyncio.to_thread(history_workload, context))

    return [
        web.get("/api/v1/profile/{service}", get_profile),
        web.get("/api/v1/workload", get_workload),
    ]
