"""The chain-isolation dashboard: one static page at `/` that polls the read-only API.

    GET /                -> static/index.html
    GET /static/{name}   -> app.js (with its modules dom.js, timeline.js) and app.css;
                            nothing else: no path from the request reaches the file system

Plain HTML, CSS and JavaScript with no build step and nothing from another origin: the
control plane often runs where there is no internet, and the Content-Security-Policy below
makes a stray external font or script fail loudly in the browser instead of hanging. The page
reads `/api/v1/status`, `/api/v1/instances`, `/api/v1/isolation`, `/api/v1/scope`,
`/api/v1/rules/...` and `/api/v1/profile/{service}`; it writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "dom.js": "text/javascript",
    "timeline.js": "text/javascript",
    "app.css": "text/css",
}
HEADERS = {
    # Assets change with the control plane's version; a reload must never show stale code.
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _asset(name: str) -> web.StreamResponse:
    content_type = ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound(reason=f"no asset {name!r}")
    response = web.FileResponse(STATIC / name, headers=HEADERS)
    response.content_type = content_type
    response.charset = "utf-8"
    return response


def routes() -> list[web.RouteDef]:
    async def index(request: web.Request) -> web.StreamResponse:
        return _asset("index.html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "index.html":  # served at / only
            raise web.HTTPNotFound(reason=f"no asset {name!r}")
        return _asset(name)

    return [web.get("/", index), web.get("/static/{name}", asset)]
