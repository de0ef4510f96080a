"""The propagation probe over HTTP: send one synthetic dyed request into a chain and report,
hop by hop, which group served it and whether the dye got there (telemetry/probe.py).

    POST /api/v1/probe/{chain}  {"path": "/"}?  -> 200 report                     (writes)
    GET  /api/v1/probe/{chain}                  -> 200 the chain's last report, or 404
    GET  /api/v1/probe                          -> 200 {"probes": [last report per chain]}

The request goes where a caller's sidecar would send it: to a registered instance of the
first hop's group, at its sidecar's inbound listener (the registered address), with the
chain's dye and a fresh `x-request-id`. From there the apps and their sidecars carry it on;
the control plane only reads what their access logs say. It waits for the answer, then up to
LOGS_WAIT_S for every hop's entries (sidecars flush their logs every 0.2 s). Reports are this
replica's: they live in memory, not in etcd.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from controlplane.api.context import ApiContext
from controlplane.api.http import ApiError
from controlplane.model.instance import Instance
from controlplane.model.rules import TaskChain
from controlplane.model.text import quote
from controlplane.store.registry import list_instances
from controlplane.telemetry.probe import probe_dye, reached, target, trace

ANSWER_TIMEOUT_S = 10.0  # the whole chain's answer to the probe
LOGS_WAIT_S = 2.0  # after the answer, for the entries of every hop
POLL_S = 0.05
MAX_PATH = 1024


def routes(context: ApiContext) -> list[web.RouteDef]:
    def chain_named(request: web.Request) -> TaskChain:
        name = request.match_info["chain"]
        chain = context.rules().chains.get(name)
        if chain is None:
            raise ApiError(404, f"TaskChain {quote(name)} not found")
        return chain

    async def run(request: web.Request) -> web.Response:
        chain = chain_named(request)
        if chain.hops[0].queue:
            raise ApiError(
                400,
                f"TaskChain {chain.name} starts with a queue hop (queue {chain.hops[0].queue}): "
                "the probe sends an HTTP request, and a message carries no x-request-id to follow",
            )
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError as exc:
            raise ApiError(400, f"the probe's body is not JSON: {exc}") from None
        path = _path(body)
        instances, _ = await asyncio.to_thread(list_instances, context.store)
        return web.json_response(await probe(context, chain, target(chain, instances), path))

    async def last(request: web.Request) -> web.Response:
        chain = chain_named(request)
        report = context.probes.last.get(chain.name)
        if report is None:
            raise ApiError(404, f"TaskChain {chain.name} was not probed yet (by this replica)")
        return web.json_response(report)

    async def every(request: web.Request) -> web.Response:
        chains = context.rules().chains
        kept = [report for name, report in sorted(context.probes.last.items()) if name in chains]
        return web.json_response({"probes": kept})

    return [
        web.get("/api/v1/probe", every),
        web.get("/api/v1/probe/{chain}", last),
        web.post("/api/v1/probe/{chain}", run),
    ]


def _path(body: object) -> str:
    """The request body's `path` (default `/`); ApiError naming the field when it is bad."""
    if not isinstance(body, dict):
        raise ApiError(400, 'the probe\'s body must be a JSON object, e.g. {"path": "/"}')
    path = body.get("path", "/")
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or len(path) > MAX_PATH
        or not path.isascii()
        or not path.isprintable()
        or " " in path
    ):
        raise ApiError(
            400, f"path: {quote(str(path)[:80])} is not a URL path (printable ASCII after a '/')"
        )
    unknown = sorted(set(body) - {"path"})
    if unknown:
        raise ApiError(400, f"unknown field {quote(unknown[0])} in the probe's body")
    return path


async def probe(
    context: ApiContext, chain: TaskChain, instance: Instance | None, path: str
) -> dict[str, Any]:
    """Send the probe to `instance` (None: the first hop has none to send it to), wait for the
    logs, judge them; the report is also the chain's last."""
    request_id, started = str(uuid.uuid4()), time.monotonic()
    first = chain.hops[0]
    dye = probe_dye(chain)
    sent: dict[str, Any] = {"at": time.time(), "dye": dye, "header": chain.dye.header, "path": path}
    if instance is None:
        sent["sentTo"] = None
        sent["answer"] = f"no registered instance of {first.service}|{first.group} to send it to"
    else:
        host = f"[{instance.host}]" if ":" in instance.host else instance.host  # IPv6
        address = f"{host}:{instance.inbound_port}"
        sent["sentTo"] = {"instance": instance.key, "address": address}
        context.probes.start(request_id)
        headers = {"Host": first.service, chain.dye.header: dye, "x-request-id": request_id}
        url = f"http://{address}{path}"
        timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, headers=headers, allow_redirects=False) as response,
            ):
                await response.read()
                sent["answer"] = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent["answer"] = f"no answer: {type(exc).__name__} {exc}".strip()
        deadline = time.monotonic() + LOGS_WAIT_S
        while not reached(chain, context.probes.entries(request_id)):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL_S)
    report = trace(context.rules(), chain, request_id, context.probes.entries(request_id), sent)
    report["tookMs"] = round((time.monotonic() - started) * 1000)  # answer and logs
    context.probes.finish(request_id, report)
    return report
