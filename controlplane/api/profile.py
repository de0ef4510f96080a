"""A service's profile over HTTP: desired replicas per task group per minute for the next
hours, and the scaler's recent decisions with their reasons (`tasklane get profile`, the
dashboard).

    GET /api/v1/profile/{service}?minutes=1440  -> 200 {"service", "start", "minutes",
                                                        "groups": {group: [replicas, ...]},
                                                        "decisions": [...]}
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controlplane.api.http import error_response
from controlplane.errors import StoreError
from controlplane.scaler.profile import profile
from controlplane.store.decisions import list_decisions
from controlplane.store.runs import list_runs

if TYPE_CHECKING:
    from controlplane.app import ControlPlane

MAX_MINUTES = 7 * 1440


def service_profile(control_plane: ControlPlane, service: str, minutes: int) -> dict[str, Any]:
    """Blocking (etcd reads): the profile from the rules and run history, and decisions."""
    rules = control_plane.sync.rules
    now = time.time()
    start = now - now % 60
    store = control_plane.store
    per_group = profile(rules, list_runs(store), start, minutes, now)
    return {
        "service": service,
        "start": start,
        "minutes": minutes,
        "groups": {group: counts for (name, group), counts in per_group.items() if name == service},
        "decisions": list_decisions(store, service),
    }


def routes(control_plane: ControlPlane) -> list[web.RouteDef]:
    async def get_profile(request: web.Request) -> web.Response:
        service = request.match_info["service"]
        if service not in control_plane.sync.rules.services:
            return error_response(404, f"no service {service!r}")
        try:
            minutes = int(request.query.get("minutes", "1440"))
        except ValueError:
            return error_response(400, "minutes must be a whole number")
        if not 1 <= minutes <= MAX_MINUTES:
            return error_response(400, f"minutes must be within 1..{MAX_MINUTES}")
        try:
            body = await asyncio.to_thread(service_profile, control_plane, service, minutes)
        except StoreError as exc:
            return error_response(503, str(exc))
        return web.json_response(body)

    return [web.get("/api/v1/profile/{service}", get_profile)]
