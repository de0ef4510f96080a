"""The HTTP API (aiohttp): health and status here; rules, instances, runs, profiles,
isolation and the dashboard add their routes (app.py wires them, each given the ApiContext).

Every error leaves as JSON `{"error": "..."}` so the CLI and the dashboard parse one shape,
and our exceptions become HTTP statuses in one place, the `json_errors` middleware: handlers
raise (ApiError for a refusal of their own) and never map errors themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from controlplane.api.context import ApiContext
from controlplane.errors import RuleError, StoreError, TasklaneError
from controlplane.store.history import RevisionNotKept
from controlplane.store.rollout import NoRollout
from controlplane.store.rules import ConcurrentChange, RolloutRunning
from controlplane.store.runs import RunConflict, RunError, RunNotFound, UnknownTask

log = logging.getLogger(__name__)

# A key nobody writes: reading it is the cheapest round trip that proves etcd answers.
HEALTH_KEY = "healthz"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, message: str) -> web.Response:
    """The one error shape of the API."""
    return web.json_response({"error": message}, status=status)


class ApiError(TasklaneError):
    """A handler's own refusal with its HTTP status; the message is the `error`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Our exceptions by HTTP status; the first class that matches wins, so subclasses come first
# (ConcurrentChange is a StoreError, the run refusals are RunErrors).
STATUS_OF_ERROR: tuple[tuple[type[TasklaneError], int], ...] = (
    (UnknownTask, 404),
    (RunNotFound, 404),
    (RunConflict, 409),
    (RunError, 400),
    (RevisionNotKept, 404),
    (RuleError, 400),
    (ConcurrentChange, 409),
    (RolloutRunning, 409),
    (NoRollout, 404),
    (StoreError, 503),
)


def http_status(exc: TasklaneError) -> int | None:
    """The HTTP status of one of our exceptions; None for a failure of ours (a 500)."""
    if isinstance(exc, ApiError):
        return exc.status
    return next((status for cls, status in STATUS_OF_ERROR if isinstance(exc, cls)), None)


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
    """Our exceptions, aiohttp's HTML/plain-text errors and unexpected exceptions become
    JSON errors with their status."""
    try:
        return await handler(request)
    except TasklaneError as exc:
        status = http_status(exc)
        if status is None:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, "internal error; see the control plane log")
        return error_response(status, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason)
    except _UNREADABLE as exc:  # the client's body, not our bug: nesting, charset, encoding
        return error_response(400, f"the request body cannot be read: {type(exc).__name__}")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal error; see the control plane log")


def build_app(context: ApiContext) -> web.Application:
    """The aiohttp application with health and status; add routes before it starts."""
    app = web.Application(middlewares=[json_errors])

    async def healthz(request: web.Request) -> web.Response:
        """200 only when etcd answers: without it no rule change or registration works."""
        try:
            await asyncio.to_thread(lambda: context.store.get(HEALTH_KEY))
        except StoreError as exc:
            return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
        return web.json_response({"status": "ok"})

    async def livez(request: web.Request) -> web.Response:
        """200 while the process serves, etcd or not: a liveness probe restarting replicas
        when etcd is down would only cut every sidecar's xDS stream."""
        return web.json_response({"status": "ok"})

    async def status(request: web.Request) -> web.Response:
        """What the control plane serves and to whom: `tasklane status` and the dashboard."""
        return web.json_response(context.status())

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    app.router.add_get("/api/v1/status", status)
    return app
