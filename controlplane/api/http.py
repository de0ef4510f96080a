"""The HTTP API (aiohttp): health and status now; rules, runs and the dashboard add routes here.

Every error leaves as JSON `{"error": "..."}` so the CLI and the dashboard parse one shape.
A later API module adds itself with one line in `build_app`, e.g.
`app.add_routes(rules.routes(control_plane))`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from controlplane.errors import StoreError

if TYPE_CHECKING:
    from controlplane.app import ControlPlane

log = logging.getLogger(__name__)

# A key nobody writes: reading it is the cheapest round trip that proves etcd answers.
HEALTH_KEY = "healthz"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    """The one error shape of the API."""
    return web.json_response({"error": message}, status=status)


# How a malformed request body surfaces while a handler reads it (bad_input tests, issue 6).
_UNREADABLE = (
    RecursionError,
    LookupError,
    UnicodeDecodeError,
    HttpProcessingError,
    RequestPayloadError,
)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTML/plain-text errors and unexpected exceptions into JSON errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason)
    except _UNREADABLE as exc:  # the client's body, not our bug: nesting, charset, encoding
        return error_response(400, f"the request body cannot be read: {type(exc).__name__}")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error; see the control plane log")


def build_app(control_plane: ControlPlane) -> web.Application:
    """The aiohttp application of one control plane; add routes before it starts."""
    app = web.Application(middlewares=[json_errors])

    async def healthz(request: web.Request) -> web.Response:
        """200 only when etcd answers: without it no rule change or registration works."""
        try:
            await asyncio.to_thread(control_plane.store.get, HEALTH_KEY)
        except StoreError as exc:
            return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
        return web.json_response({"status": "ok"})

    async def livez(request: web.Request) -> web.Response:
        """200 while the process serves, etcd or not: a liveness probe restarting replicas
        when etcd is down would only cut every sidecar's xDS stream."""
        return web.json_response({"status": "ok"})

    async def status(request: web.Request) -> web.Response:
        """What the control plane serves and to whom: `tasklane status` and the dashboard."""
        return web.json_response(
            {
                "etcd": {
                    "endpoint": control_plane.etcd_endpoint,
                    "embedded": control_plane.etcd is not None,
                },
                "xds": control_plane.xds_status(),
                "roles": control_plane.cache.roles(),
                "nodes": [
                    node.to_json(unknown_service=not control_plane.cache.published(node.role))
                    for node in control_plane.status.nodes()
                ],
                "sync": control_plane.sync.status(),
                "leadership": control_plane.leadership.to_json(),
                "scaler": control_plane.scaler.status() if control_plane.scaler else None,
            }
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/api/v1/status", status)
    return app
