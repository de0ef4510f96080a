"""controlplane.propagation over real HTTP on 127.0.0.1: a WSGI app (wsgiref, threaded) and an
ASGI app (served by aiohttp through a minimal ASGI adapter) call a downstream echo server with
requests, httpx and urllib on every inbound request; the echo tells which headers arrived.

Dyed inbound requests must reach downstream with both the dye header and the baggage member,
undyed ones with neither, both with the other members of the inbound baggage, and 50
concurrent requests with different dyes must never cross."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from aiohttp import web

from controlplane.propagation import (
    AsgiMiddleware,
    WsgiMiddleware,
    httpx_event_hooks,
    install_requests,
    install_urllib,
    uninstall_requests,
    uninstall_urllib,
    wrap,
)

REPO = Path(__file__).resolve().parents[2]

try:
    from tests.support.echo_app import EchoHandler
except ModuleNotFoundError:  # pytest put only tests/integration on sys.path
    sys.path.insert(0, str(REPO))
    from tests.support.echo_app import EchoHandler

pytestmark = [pytest.mark.timeout(120), pytest.mark.in_process]

CONCURRENCY = 50
BACKLOG = 128  # socketserver's default of 5 would make 50 simultaneous connects retry SYNs


# --- downstream ------------------------------------------------------------------------------


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = BACKLOG
    app_name = "downstream"


@pytest.fixture(scope="module")
def downstream() -> Iterator[str]:
    """URL of an echo server that answers with the headers it received."""
    server = _EchoServer(("127.0.0.1", 0), EchoHandler)
    yield from _serving(server, f"http://127.0.0.1:{server.server_address[1]}/echo")


def _serving(server: Any, url: str) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module", autouse=True)
def _hooks() -> Iterator[None]:
    """The global hooks, installed over an opener that ignores proxy settings, as an app might."""
    opener = urllib.request._opener
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))
    install_requests()
    install_urllib()
    yield
    uninstall_requests()
    uninstall_urllib()
    urllib.request.install_opener(opener)


# --- the ways an app calls downstream (each returns the headers downstream saw) --------------


def _via_requests(url: str) -> dict[str, str]:
    import requests

    with requests.Session() as session:
        session.trust_env = False  # never a proxy, whatever the environment says
        response = session.get(url, headers={"baggage": "hop=app"}, timeout=10)
        response.raise_for_status()
        return response.json()["headers"]


def _via_httpx(url: str) -> dict[str, str]:
    import httpx

    with httpx.Client(event_hooks=httpx_event_hooks(), trust_env=False, timeout=10) as client:
        response = client.get(url, headers={"baggage": "hop=app"})
        response.raise_for_status()
        return response.json()["headers"]


def _via_urllib(url: str) -> dict[str, str]:
    request = urllib.request.Request(url, headers={"Baggage": "hop=app"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["headers"]


async def _via_httpx_async(url: str) -> dict[str, str]:
    import httpx

    async with httpx.AsyncClient(
        event_hooks=httpx_event_hooks(), trust_env=False, timeout=10
    ) as client:
        response = await client.get(url, headers={"baggage": "hop=app"})
        response.raise_for_status()
        return response.json()["headers"]


async def _via_requests_in_to_thread(url: str) -> dict[str, str]:
    return await asyncio.to_thread(_via_requests, url)  # to_thread copies the context itself


async def _via_urllib_in_executor(url: str) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, wrap(_via_urllib), url)  # run_in_executor does not


WSGI_CALLS: dict[str, Callable[[str], dict[str, str]]] = {
    "/requests": _via_requests,
    "/httpx": _via_httpx,
    "/urllib": _via_urllib,
}
ASGI_CALLS = {
    "/httpx-async": _via_httpx_async,
    "/requests-to-thread": _via_requests_in_to_thread,
    "/urllib-executor": _via_urllib_in_executor,
}


# --- the WSGI app --------------------------------------------------------------------------


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = BACKLOG


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Silent: tests read responses, not logs."""


def _wsgi_app(downstream: str) -> Callable[..., list[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        seen = WSGI_CALLS[environ["PATH_INFO"]](downstream)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(seen).encode()]

    return app


@pytest.fixture(scope="module")
def wsgi_app(downstream: str) -> Iterator[str]:
    """Base URL of the WSGI app behind WsgiMiddleware."""
    server = make_server(
        "127.0.0.1",
        0,
        WsgiMiddleware(_wsgi_app(downstream)),
        server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    yield from _serving(server, f"http://127.0.0.1:{server.server_address[1]}")


# --- the ASGI app, served by aiohttp through a minimal ASGI 3 adapter ------------------------


def _asgi_app(downstream: str) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await receive()
        seen = await ASGI_CALLS[scope["path"]](downstream)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(seen).encode()})

    return app


def _asgi_on_aiohttp(asgi_app: Callable[..., Any]) -> web.Application:
    """Serve one ASGI app with aiohttp: no ASGI server ships with the project."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.raw_path.encode(),
            "query_string": request.query_string.encode(),
            "headers": [(name.lower(), value) for name, value in request.raw_headers],
        }
        response: dict[str, Any] = {"status": 500, "headers": [], "body": b""}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["headers"] = [(k.decode(), v.decode()) for k, v in message["headers"]]
            else:
                response["body"] += message.get("body", b"")

        await asgi_app(scope, receive, send)
        return web.Response(
            status=response["status"], headers=response["headers"], body=response["body"]
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture(scope="module")
def asgi_app(downstream: str) -> Iterator[str]:
    """Base URL of the ASGI app behind AsgiMiddleware, served from a loop in its own thread."""
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(_asgi_on_aiohttp(AsgiMiddleware(_asgi_app(downstream))))

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock, backlog=BACKLOG).start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


# --- the tests -----------------------------------------------------------------------------


def _ask(base: str, path: str, headers: dict[str, str]) -> dict[str, str]:
    """What downstream saw when the app served ``path`` with these inbound headers."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, body
        return json.loads(body)
    finally:
        connection.close()


APPS = [("wsgi", path) for path in WSGI_CALLS] + [("asgi", path) for path in ASGI_CALLS]


@pytest.fixture
def base(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_app")


@pytest.mark.parametrize(("base", "path"), APPS, indirect=["base"])
def test_a_dye_header_reaches_downstream_as_header_and_baggage(base: str, path: str) -> None:
    seen = _ask(base, path, {"x-task-dye": "fund-yield@v2"})
    assert seen["x-task-dye"] == "fund-yield@v2"
    assert seen["baggage"] == "task-dye=fund-yield@v2,hop=app"


@pytest.mark.parametrize(("base", "path"), APPS, indirect=["base"])
def test_a_baggage_dye_reaches_downstream_as_header_and_baggage(base: str, path: str) -> None:
    seen = _ask(base, path, {"baggage": "userId=1, task-dye=fund%2Cyield ;ttl=3"})
    assert seen["x-task-dye"] == "fund,yield"
    assert seen["baggage"] == "task-dye=fund%2Cyield,hop=app,userId=1"


@pytest.mark.parametrize(("base", "path"), APPS, indirect=["base"])
def test_the_other_inbound_baggage_members_reach_downstream(base: str, path: str) -> None:
    seen = _ask(base, path, {"baggage": "tenant=7,task-dye=fund-yield%40r1%3Bsrc%3Dcron"})
    assert seen["x-task-dye"] == "fund-yield@r1"
    assert seen["baggage"] == "task-dye=fund-yield@r1,hop=app,tenant=7"
    seen = _ask(base, path, {"x-task-dye": "fund-yield", "baggage": "hop=client, tenant=7"})
    assert seen["baggage"] == "task-dye=fund-yield,hop=app,tenant=7"  # the app's hop wins


@pytest.mark.parametrize(("base", "path"), APPS, indirect=["base"])
def test_an_undyed_request_stays_undyed_downstream(base: str, path: str) -> None:
    for headers, baggage in (
        ({}, "hop=app"),  # the app's own baggage, no dye member
        ({"baggage": "userId=1"}, "hop=app,userId=1"),
        ({"x-task-dye": ""}, "hop=app"),
    ):
        seen = _ask(base, path, headers)
        assert "x-task-dye" not in seen
        assert seen["baggage"] == baggage


@pytest.mark.parametrize(("base", "path"), APPS, indirect=["base"])
def test_concurrent_requests_never_cross_dyes(base: str, path: str) -> None:
    def one(i: int) -> tuple[int, dict[str, str]]:
        if i % 5 == 0:
            return i, _ask(base, path, {})
        if i % 2:
            return i, _ask(base, path, {"x-task-dye": f"task-{i}"})
        return i, _ask(base, path, {"baggage": f"userId={i},task-dye=task-{i}"})

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(one, range(CONCURRENCY)))
    for i, seen in results:
        if i % 5 == 0:
            assert "x-task-dye" not in seen, i
            assert seen["baggage"] == "hop=app", i
        else:
            assert seen["x-task-dye"] == f"task-{i}", i
            others = "" if i % 2 else f",userId={i}"
            assert seen["baggage"] == f"task-dye=task-{i},hop=app{others}", i
