"""Read-only telemetry endpoints: `GET /api/v1/isolation` (the dashboard's and `tasklane top`'s
view of the accounting) and `GET /metrics` (Prometheus).

`/api/v1/isolation` answers the isolation report (its shape is in telemetry/report.py).
"""

from __future__ import annotations

from aiohttp import web

from controlplane.api.context import ApiContext


def routes(context: ApiContext) -> list[web.RouteDef]:
    async def isolation(request: web.Request) -> web.Response:
        return web.json_response(context.isolation())

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = context.metrics()
        # aiohttp refuses a charset inside content_type; the exposition format's is utf-8.
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    return [
        web.get("/api/v1/isolation", isolation),
        web.get("/metrics", metrics),
    ]
