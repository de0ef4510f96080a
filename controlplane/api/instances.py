"""The instances API: `tasklane run` registers, keeps alive and deregisters through it.

The control plane holds each instance's etcd lease; the client renews it with a keep-alive
every ~1.5 s, and the lease itself is the client's deadline: if `tasklane run` dies hard, no
keep-alive comes and the instance leaves etcd one TTL later. Sidecars and apps therefore
never need to reach etcd, which stays private to the control plane (no auth, loopback).

Registering and deregistering answer once the sync has published a build with (without) the
instance, so a client that deregisters and then stops its app knows callers were told first.
A control plane that restarts forgets its registrations: the client's next keep-alive gets
404 and it registers again, before its old lease (still in etcd) has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from aiohttp import web

from controlplane.api.context import ApiContext
from controlplane.api.http import ApiError
from controlplane.errors import StoreError
from controlplane.model.instance import DEFAULT_TTL, Instance
from controlplane.model.text import quote
from controlplane.store.registry import Registration, list_instances, register
from controlplane.store.rules import load_rules

# How long a (de)registration waits for the sync to publish it before answering anyway.
PUBLISH_TIMEOUT = 2.0


def routes(context: ApiContext) -> list[web.RouteDef]:
    """The instances routes, sharing their registrations by instance id."""
    ttl = DEFAULT_TTL
    registrations: dict[str, Registration] = {}

    def forget_expired() -> None:
        """Drop registrations nobody renewed for two TTLs: their client is gone and etcd has
        already deleted them; a late keep-alive gets 404 and registers again."""
        now = time.monotonic()
        for instance_id, registration in list(registrations.items()):
            if now - registration.renewed_at > 2 * ttl:
                del registrations[instance_id]

    def check_known(instance: Instance) -> None:
        rules, _ = load_rules(context.store)
        service = rules.services.get(instance.service)
        if service is None:
            raise ApiError(404, f"Service {quote(instance.service)} not found")
        if instance.group not in {group.name for group in service.groups}:
            raise ApiError(404, f"service {instance.service} has no group {quote(instance.group)}")

    def not_registered(instance_id: str) -> ApiError:
        return ApiError(404, f"instance {quote(instance_id)} is not registered here")

    async def create(request: web.Request) -> web.Response:
        try:
            instance = Instance.from_json(await request.json())
        except ValueError as exc:  # not JSON, or not an instance
            raise ApiError(400, f"bad instance: {exc}") from None
        await asyncio.to_thread(check_known, instance)
        registration = await asyncio.to_thread(
            register, context.store, instance, ttl, keepalive=False
        )
        forget_expired()
        previous = registrations.get(instance.id)
        registrations[instance.id] = registration
        if previous is not None:
            # Its key now belongs to the new lease, so revoking the old one deletes nothing
            # unless the instance moved to another service or group.
            with contextlib.suppress(StoreError):  # the old lease then expires by itself
                await asyncio.to_thread(previous.close)
        published = await context.published(instance.key, True, PUBLISH_TIMEOUT)
        return web.json_response(
            {"id": instance.id, "lease": registration.lease_id, "ttl": ttl, "published": published}
        )

    async def keepalive(request: web.Request) -> web.Response:
        instance_id = request.match_info["id"]
        registration = registrations.get(instance_id)
        if registration is None:
            raise not_registered(instance_id)
        if not await asyncio.to_thread(registration.renew):  # deregistered meanwhile
            raise not_registered(instance_id)
        return web.json_response({"id": instance_id, "lease": registration.lease_id, "ttl": ttl})

    async def delete(request: web.Request) -> web.Response:
        instance_id = request.match_info["id"]
        registration = registrations.pop(instance_id, None)
        if registration is None:
            raise not_registered(instance_id)
        try:
            await asyncio.to_thread(registration.close)
        except StoreError as exc:
            raise StoreError(f"{exc}; the instance expires in {ttl}s") from exc
        published = await context.published(registration.instance.key, False, PUBLISH_TIMEOUT)
        return web.json_response(
            {"id": instance_id, "action": "deregistered", "published": published}
        )

    async def list_all(request: web.Request) -> web.Response:
        instances, revision = await asyncio.to_thread(list_instances, context.store)
        return web.json_response(
            {"items": [instance.to_json() for instance in instances], "revision": revision}
        )

    return [
        web.get("/api/v1/instances", list_all),
        web.post("/api/v1/instances", create),
        web.post("/api/v1/instances/{id}/keepalive", keepalive),
        web.delete("/api/v1/instances/{id}", delete),
    ]
