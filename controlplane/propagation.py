"""Carry the task dye from the request an app serves to the requests it makes.

The mesh routes a dyed request into its task group at every hop of a call chain, but only if each
app copies the dye from its inbound request to its outbound ones. This module does the copying:

* ``WsgiMiddleware`` / ``AsgiMiddleware`` read the inbound dye into a context variable for the
  duration of the request;
* ``install_requests()``, ``httpx_event_hooks()`` and ``install_urllib()`` write the current dye
  onto every outbound request, both as the ``x-task-dye`` header and as the ``task-dye`` member
  of the W3C ``baggage`` header. The other members, the request's own and those of the
  inbound ``baggage`` (``tenant=7``), go on too: baggage is meant to travel the whole chain.

Apps that already propagate OpenTelemetry baggage (server and client instrumented, the baggage
propagator on) need none of this: the mesh routes on the baggage member as well.

Precedence: when a request has both, ``x-task-dye`` wins over the baggage member. It is the
mesh's own header, set for this purpose alone, while baggage is shared with (and rewritten by)
other tooling. An empty or malformed header counts as absent.

A dye is a non-empty run of visible ASCII characters (``fund-yield@v2``); anything else is
treated as malformed and ignored, so a hostile inbound baggage value (say ``%0D%0A``) can never
turn into an invalid outbound header. A baggage member's value is percent-decoded and cut at its
first ``;``, written or encoded (OpenTelemetry forwards ``x;src=cron`` as ``x%3Bsrc%3Dcron``), as
the mesh reads it (``controlplane.model.dye``).

Threads and asyncio: context variables flow into asyncio tasks (and ``asyncio.to_thread``)
automatically, but not into ``ThreadPoolExecutor.submit`` or ``loop.run_in_executor``; hand those
``wrap(fn)`` instead of ``fn``.

This module imports nothing else of tasklane because it runs inside user apps; ``requests`` is
imported only when ``install_requests`` is called, httpx never.
"""

from __future__ import annotations

import contextvars
import functools
import re
import urllib.request
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar
from urllib.parse import quote, unquote
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "BAGGAGE_KEY",
    "DYE_HEADER",
    "MAX_BAGGAGE_BYTES",
    "MAX_BAGGAGE_MEMBERS",
    "AsgiMiddleware",
    "UrllibHandler",
    "WsgiMiddleware",
    "current_dye",
    "dye_scope",
    "dye_var",
    "extract",
    "httpx_event_hooks",
    "inject",
    "install_requests",
    "install_urllib",
    "uninstall_requests",
    "uninstall_urllib",
    "wrap",
]

DYE_HEADER = "x-task-dye"
"""The header the mesh routes on; read at call time, so apps may reassign it."""
BAGGAGE_KEY = "task-dye"
"""The baggage member the mesh routes on; read at call time, so apps may reassign it."""
MAX_BAGGAGE_MEMBERS = 64
"""W3C limits: members past these are dropped (the spec allows it) instead of failing."""
MAX_BAGGAGE_BYTES = 8192

_BAGGAGE = "baggage"
_OWS = " \t"
_DYE = re.compile(r"[\x21-\x7e]+")
_BAGGAGE_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")
# baggage-octets that stay literal when encoding; "%" is one but must be encoded itself
_BAGGAGE_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\%')

dye_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_dye", default=None)
"""The dye of the request being served (None: undyed); set by the middlewares or ``dye_scope``."""
# The inbound baggage members of the request being served, but the dye's; set by the middlewares.
_inbound_var: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "task_baggage", default=()
)

Headers = Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]
_H = TypeVar("_H", bound=MutableMapping[str, str])
_P = ParamSpec("_P")
_R = TypeVar("_R")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def current_dye() -> str | None:
    """The dye outbound requests made here should carry."""
    return dye_var.get()


@contextmanager
def dye_scope(dye: str | None) -> Iterator[str | None]:
    """Make ``dye`` current inside the block (None: undyed), e.g. for a batch job's own calls."""
    token = dye_var.set(None if dye is None else _checked(dye))
    try:
        yield dye
    finally:
        dye_var.reset(token)


def extract(
    headers: Headers, *, header: str | None = None, baggage_key: str | None = None
) -> str | None:
    """The dye of an inbound request: the dye header, else the baggage member, else None.

    ``headers`` is anything with ``items()`` (dict, multidict, ``email.message.Message``) or a
    list of (name, value) pairs, str or bytes (ASGI); names match case-insensitively and repeated
    ``baggage`` headers form one list, as in RFC 7230.
    """
    return _read(headers, header, baggage_key)[0]


def _read(
    headers: Headers, header: str | None, baggage_key: str | None
) -> tuple[str | None, tuple[str, ...]]:
    """The dye of an inbound request (as ``extract``) and its other baggage members."""
    wanted, key = (header or DYE_HEADER).lower(), baggage_key or BAGGAGE_KEY
    dye, baggage = None, []
    items = headers.items() if hasattr(headers, "items") else headers
    for raw_name, raw_value in items:
        name, value = _text(raw_name).lower(), _text(raw_value)
        if name == wanted and dye is None:
            dye = value.strip(_OWS)
            dye = dye if _DYE.fullmatch(dye) else None
        elif name == _BAGGAGE:
            baggage.append(value)
    members = list(_within_limits(_members(baggage)))
    others = tuple(member for member in members if _member_key(member) != key)
    return dye or _baggage_dye(members, key), others


def inject(
    headers: _H,
    dye: str | None = None,
    *,
    header: str | None = None,
    baggage_key: str | None = None,
) -> _H:
    """Write ``dye`` (default: the current one) and the served request's other baggage members
    onto outbound headers, in place; with neither, no change.

    Replaces any dye header (whatever its case) and puts the dye first in the baggage header,
    dropping an older dye member, so that it survives hops that trim baggage to the W3C limits.
    The request's own members come next, then the inbound ones it does not set itself. Works on
    any mutable mapping: dict, requests' and httpx's headers.
    """
    dye = current_dye() if dye is None else _checked(dye)
    inbound = _inbound_var.get()
    if dye is None and not inbound:
        return headers
    name = header or DYE_HEADER
    key = baggage_key or BAGGAGE_KEY
    baggage_name, old = _BAGGAGE, []
    for existing in list(headers):
        if existing.lower() == name.lower() and dye is not None:
            del headers[existing]
        elif existing.lower() == _BAGGAGE:
            baggage_name = existing
            old.append(headers.pop(existing))
    members = list(_members(old))
    if dye is not None:
        headers[name] = dye
        first = f"{key}={quote(dye, safe=_BAGGAGE_SAFE)}"
        members = [first, *(member for member in members if _member_key(member) != key)]
    own = {_member_key(member) for member in members}
    members += (member for member in inbound if _member_key(member) not in own)
    headers[baggage_name] = ",".join(_within_limits(members))
    return headers


def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` bound to the caller's context (dye included), for ``pool.submit(wrap(fn), ...)``.

    Every call runs in a fresh copy of that context: one Context cannot be entered by two threads
    at once, and a call's own changes must not leak into the next.
    """
    context = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return context.copy().run(fn, *args, **kwargs)

    return run


class WsgiMiddleware:
    """Serves each request with its dye current, including while the response body is iterated
    (streamed bodies make outbound calls too); nothing leaks into the server's thread."""

    def __init__(
        self, app: WSGIApplication, *, header: str | None = None, baggage_key: str | None = None
    ) -> None:
        self.app = app
        self.header = header
        self.baggage_key = baggage_key

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        header = self.header or DYE_HEADER
        pairs = [
            (name, environ[key])
            for name in (header, _BAGGAGE)
            if (key := "HTTP_" + name.upper().replace("-", "_")) in environ
        ]
        context = contextvars.copy_context()
        context.run(_enter, _read(pairs, header, self.baggage_key))
        body = context.run(self.app, environ, start_response)
        if isinstance(body, list | tuple):  # runs no code when iterated; servers may take its len
            return body
        return _InContext(context, body)


def _enter(inbound: tuple[str | None, tuple[str, ...]]) -> tuple[contextvars.Token, ...]:
    """Make an inbound request's dye and other baggage members current."""
    dye, members = inbound
    return dye_var.set(dye), _inbound_var.set(members)


class _InContext:
    """A WSGI response iterable whose iteration and ``close`` run in the request's context."""

    def __init__(self, context: contextvars.Context, body: Iterable[bytes]) -> None:
        self._context = context
        self._body = body
        self._iterator = context.run(iter, body)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            self._context.run(close)


class AsgiMiddleware:
    """ASGI 3: serves each http and websocket connection with its dye current; other scopes
    (lifespan) pass through untouched."""

    def __init__(
        self, app: AsgiApp, *, header: str | None = None, baggage_key: str | None = None
    ) -> None:
        self.app = app
        self.header = header
        self.baggage_key = baggage_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        tokens = _enter(_read(scope.get("headers", []), self.header, self.baggage_key))
        try:
            await self.app(scope, receive, send)
        finally:
            dye_var.reset(tokens[0])
            _inbound_var.reset(tokens[1])


_requests_send: Callable[..., Any] | None = None  # our wrapper of Session.send while installed


def install_requests() -> None:
    """Make every ``requests`` call carry the current dye; idempotent, undone by
    ``uninstall_requests``.

    Wraps ``requests.Session.send``: the one method all requests pass through (``requests.get``,
    sessions, redirects), so one small patch covers them all without touching app code.
    """
    global _requests_send
    import requests

    if _requests_send is not None and requests.Session.send is _requests_send:
        return
    original = requests.Session.send

    @functools.wraps(original)
    def send(session: requests.Session, request: Any, **kwargs: Any) -> Any:
        if send is _requests_send:  # dormant once uninstalled, even if wrapped again since
            inject(request.headers)
        return original(session, request, **kwargs)

    requests.Session.send = send  # type: ignore[method-assign]
    _requests_send = send


def uninstall_requests() -> None:
    """Undo ``install_requests``: restore ``Session.send``, or, if someone wrapped it since,
    leave their wrapper and make ours inert."""
    global _requests_send
    if _requests_send is None:
        return
    import requests

    if requests.Session.send is _requests_send:
        requests.Session.send = _requests_send.__wrapped__  # type: ignore[attr-defined]
    _requests_send = None


def httpx_event_hooks() -> dict[str, list[Callable[[Any], Any]]]:
    """Hooks that put the current dye on every request of an ``httpx.Client`` or ``AsyncClient``:
    ``httpx.Client(event_hooks=httpx_event_hooks())``; extend the lists to add hooks of your own.
    """
    return {"request": [_httpx_request_hook], "response": []}


def _httpx_request_hook(request: Any) -> _Done:
    """One hook for both clients: AsyncClient awaits what a hook returns, Client ignores it."""
    inject(request.headers)
    return _DONE


class _Done:
    """An awaitable that is already finished."""

    def __await__(self) -> Iterator[None]:
        return iter(())


_DONE = _Done()


class UrllibHandler(urllib.request.BaseHandler):
    """Puts the current dye on every HTTP(S) request of an opener:
    ``urllib.request.build_opener(UrllibHandler())`` for apps that build their own."""

    def __init__(self) -> None:
        self.enabled = True

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        if self.enabled:
            inject(request.headers)
        return request

    https_request = http_request


_urllib_handler: UrllibHandler | None = None  # the handler install_urllib added


def install_urllib() -> None:
    """Make ``urllib.request.urlopen`` carry the current dye; idempotent, undone by
    ``uninstall_urllib``. Call it after any ``install_opener`` of the app's own.

    Adds a ``UrllibHandler`` to the installed global opener (building the default one if none is
    installed yet) rather than replacing it, so an app's proxy, auth or cookie handlers stay.
    """
    global _urllib_handler
    opener = urllib.request._opener  # no public getter; replacing it would drop app handlers
    if opener is None:
        opener = urllib.request.build_opener()
        urllib.request.install_opener(opener)
    if _urllib_handler is not None:
        if _urllib_handler in opener.handlers:
            return
        _urllib_handler.enabled = False  # left behind in an opener the app replaced
    _urllib_handler = UrllibHandler()
    opener.add_handler(_urllib_handler)


def uninstall_urllib() -> None:
    """Undo ``install_urllib``: OpenerDirector cannot remove a handler, so disable it."""
    global _urllib_handler
    if _urllib_handler is not None:
        _urllib_handler.enabled = False
        _urllib_handler = None


def _text(value: str | bytes) -> str:
    """Header names and values as str; bytes (ASGI) are latin-1 per RFC 7230."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _checked(dye: str) -> str:
    """``dye`` if it can travel as a header value, else ValueError (a caller's bug)."""
    if not _DYE.fullmatch(dye):
        raise ValueError(f"a dye is a non-empty run of visible ASCII characters, got {dye!r}")
    return dye


def _members(values: Iterable[str]) -> Iterator[str]:
    """The list-members of baggage header values, whitespace-trimmed, empty ones skipped."""
    for value in values:
        for member in value.split(","):
            member = member.strip(_OWS)
            if member:
                yield member


def _within_limits(members: Iterable[str]) -> Iterator[str]:
    """``members`` up to the W3C limits (64 members, 8192 bytes joined by commas); header text is
    latin-1, one character per byte."""
    size = -1
    for count, member in enumerate(members, 1):
        size += len(member) + 1
        if count > MAX_BAGGAGE_MEMBERS or size > MAX_BAGGAGE_BYTES:
            return
        yield member


def _member_key(member: str) -> str:
    return member.split("=", 1)[0].split(";", 1)[0].strip(_OWS)


def _baggage_dye(members: list[str], key: str) -> str | None:
    """The first well-formed ``key`` member's value, percent-decoded and cut at its first ``;``
    (properties OpenTelemetry encoded into the value); malformed ones skipped."""
    for member in members:
        name, equals, rest = member.partition("=")
        if not equals or name.rstrip(_OWS) != key:
            continue
        value = rest.split(";", 1)[0].strip(_OWS)
        if _BAGGAGE_VALUE.fullmatch(value):
            # invalid UTF-8 becomes U+FFFD, which fails the dye check
            dye = unquote(value).split(";", 1)[0]
            if _DYE.fullmatch(dye):
                return dye
    return None
