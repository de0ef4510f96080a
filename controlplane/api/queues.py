"""Queue hops: `GET /api/v1/queues` (the lanes plan apps declare and publish by,
model/queues.py) and `POST /api/v1/deliveries` (what consumers received, for the accounting;
`controlplane.queues.DeliveryReporter` posts it). A malformed report is refused whole with a
one-line 400 and counts nothing; refusals are ApiErrors, mapped by the `json_errors` middleware
like the rest of the API.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from aiohttp import web

from controlplane.api.context import ApiContext
from controlplane.api.http import ApiError
from controlplane.model.queues import plan_document, queue_plan
from controlplane.queues import Delivery

MAX_DELIVERIES = 10_000  # per report; the reporter sends every half second
# A delivery with the longest dye is ~500 bytes of JSON: room for MAX_DELIVERIES of them, where
# aiohttp's 1 MiB default would refuse a report of ~6,000 (413).
MAX_REPORT_BODY = MAX_DELIVERIES * 600
_TYPES = {
    "queue": str,
    "service": str,
    "group": str,
    "fell_back": bool,
    "rejected": bool,
    "failed": bool,
    "misrouted": bool,
}
_OPTIONAL = {"dye": str, "bad_dye": str}


def _delivery(item: object, index: int) -> Delivery:
    """One reported delivery, or ValueError naming what is wrong with it."""
    where = f"deliveries[{index}]"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object")
    known = {f.name for f in fields(Delivery)}
    unknown = sorted(set(item) - known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field")
    for name, kind in _TYPES.items():
        if name in item and not isinstance(item[name], kind):
            raise ValueError(f"{where}.{name}: expected a {kind.__name__}")
    for name in ("queue", "service", "group", "fell_back"):
        if name not in item:
            raise ValueError(f"{where}.{name}: missing required field")
    for name, kind in _OPTIONAL.items():
        if item.get(name) is not None and not isinstance(item[name], kind):
            raise ValueError(f"{where}.{name}: expected a string or null")
    return Delivery(**{name: item.get(name) for name in _OPTIONAL} | item)


def routes(context: ApiContext) -> list[web.RouteDef]:
    async def plan(request: web.Request) -> web.Response:
        return web.json_response(plan_document(queue_plan(context.rules())))

    async def deliveries(request: web.Request) -> web.Response:
        try:
            body: Any = await request.clone(client_max_size=MAX_REPORT_BODY).json()
        except ValueError as exc:  # JSONDecodeError, or a body that is not UTF-8
            raise ApiError(400, f"request body is not JSON: {exc}") from None
        items = body.get("deliveries") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise ApiError(400, "deliveries: expected a list")
        if len(items) > MAX_DELIVERIES:
            raise ApiError(400, f"deliveries: at most {MAX_DELIVERIES} per report")
        try:
            parsed = [_delivery(item, index) for index, item in enumerate(items)]
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        context.deliveries(parsed)
        return web.json_response({"accepted": len(parsed)})

    return [
        web.get("/api/v1/queues", plan),
        web.post("/api/v1/deliveries", deliveries),
    ]
