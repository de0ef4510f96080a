"""The API token: who may change the control plane.

Reads stay open (the dashboard, status, rules, profiles): they change nothing and the
dashboard must load without setup. Every write must carry `Authorization: Bearer <token>`:
an HTTP request whose method is not GET/HEAD/OPTIONS, and a TaskService RPC that is not a
Get*/List* (gRPC metadata `authorization`). New endpoints are guarded by default; one that
only writes when its request asks to (an apply's `dryRun` does not) is marked `writes_on_request`
and calls `require_token` before it writes, so a read-only or CI user can diff.

The token itself and its file are api/token.py's.
"""

from __future__ import annotations

import logging

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from controlplane.api.http import Handler, error_response
from controlplane.api.token import ApiToken

log = logging.getLogger(__name__)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
READ_RPC_PREFIXES = ("Get", "List")
_TOKEN_ACCEPTED = web.RequestKey("token_accepted", bool)  # set by the middleware
_WRITES_ON_REQUEST = "_tasklane_writes_on_request"


class TokenRequired(Exception):
    """A handler marked `writes_on_request` is about to write without the token."""


def writes_on_request(handler: Handler) -> Handler:
    """Let `handler` in without the token: it calls require_token() before it writes."""
    setattr(handler, _WRITES_ON_REQUEST, True)
    return handler


def require_token(request: web.Request) -> None:
    """TokenRequired unless the request carried this control plane's token (an app served
    without the middleware guards no write, this one neither)."""
    if not request.get(_TOKEN_ACCEPTED, True):
        raise TokenRequired


def middleware(token: ApiToken) -> Middleware:
    """aiohttp middleware: writes without this control plane's token get 401 and never reach
    their handler, so nothing changes."""

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        authorization = request.headers.get("Authorization")
        request[_TOKEN_ACCEPTED] = accepted = token.accepts(authorization)
        if request.method in READ_METHODS or accepted:
            return await handler(request)
        if getattr(request.match_info.handler, _WRITES_ON_REQUEST, False):
            try:
                return await handler(request)
            except TokenRequired:
                pass
        log.warning(
            "refused %s %s from %s: %s",
            request.method,
            request.path,
            request.remote,
            "wrong API token" if authorization else "no API token",
        )
        response = error_response(401, token.refusal(authorization))
        response.headers["WWW-Authenticate"] = 'Bearer realm="tasklane"'
        return response

    return require_token


class _Guarded(grpc.GenericRpcHandler):
    """A gRPC service whose write RPCs need the token in the `authorization` metadata."""

    def __init__(self, inner: grpc.GenericRpcHandler, token: ApiToken) -> None:
        self._inner, self._token = inner, token

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None or details.method.rpartition("/")[2].startswith(READ_RPC_PREFIXES):
            return handler
        authorization = dict(details.invocation_metadata or ()).get("authorization")
        if self._token.accepts(authorization):
            return handler
        log.warning(
            "refused %s: %s", details.method, "wrong API token" if authorization else "no API token"
        )
        message = self._token.refusal(authorization)

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(refuse)


def guard(handler: grpc.GenericRpcHandler, token: ApiToken) -> grpc.GenericRpcHandler:
    """`handler` with its write RPCs refused (UNAUTHENTICATED, before the request is even
    decoded) without the token. For unary RPCs, which is all TaskService has."""
    return _Guarded(handler, token)
