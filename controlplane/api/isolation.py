"""Read-only telemetry endpoints: `GET /api/v1/isolation` (the dashboard's and `tasklane top`'s
view of the accounting) and `GET /metrics` (Prometheus).

`/api/v1/isolation` answers `Accounting.snapshot()`:

    {"at", "since", "window_s",
     "chains": [{"name", "dyes", "dye_header", "baggage_key", "fallback",
                 "hops": [{"service", "group", "weight", "rate_limit",
                           "groups": [{"group", "hop_group", "requests", "dyed", "online",
                                       "errors_5xx", "p50_ms", "p99_ms", "rate_dyed",
                                       "rate_online", "leaks", "fallbacks": {reason: n},
                                       "rate_limited", "refused", "flags": {code: n}}]}]}],
     "online": {service: {group: {"requests", "online", "dyed", "errors_5xx", "p50_ms",
                                  "p99_ms", "rate_online", "rate_dyed", "leaks", "refused",
                                  "flags"}}},
     "uncovered": [{"chain", "service", "group", "requests", "rate", "last_at"}],
     "propagation_breaks": [{"chain", "service", "group", "to", "count", "last_request_id",
                             "last_at"}],
     "outside_mesh": [{"service", "group", "requests", "refused", "errors_5xx", "rate",
                       "last_at"}],
     "totals": {"entries", "entries_by_direction", "requests", "dyed", "online", "errors_5xx",
                "leaks", "fallbacks", "rate_limited", "refused", "uncovered",
                "propagation_breaks", "outside_mesh", "outside_mesh_refused", "rate_dyed",
                "rate_online", "pending", "unmatched"}}

Counts are since the control plane started; rates are per second over the last `window_s`
complete seconds; p50/p99 are of the last requests (telemetry/accounting.py says how each
number is derived from the access logs).
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
