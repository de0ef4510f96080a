"""Roles' scopes over HTTP: which services each group's sidecars hold the config of, and why
(model/scope.py), for `tasklane get scope` and the dashboard's sidecars table.

    GET /api/v1/scope/{service} -> 200 {"service", "groups": {group: [entry, ...]}}
    GET /api/v1/scope           -> 200 {"services": {service: {group: [entry, ...]}}}

An entry is {"callee", "reason" (declared | chain | on-demand | learned), "detail" (a
chain's name), "since", "lastSeen"} (epoch seconds, null for the rules' entries). Sightings
are read from etcd on each request: every replica answers the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from controlplane.api.context import ApiContext
from controlplane.api.http import ApiError
from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet
from controlplane.model.scope import Entry, Sighting, role_scope, rule_scopes
from controlplane.store.scope import load_sightings


def entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "callee": entry.callee,
        "reason": entry.reason,
        "detail": entry.detail,
        "since": entry.since,
        "lastSeen": entry.last_seen,
    }


def service_scopes(
    rules: RuleSet, services: Iterable[str], sightings: list[Sighting]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """service -> group -> the scope's entries, for each of `services` (of the rules)."""
    static = rule_scopes(rules)
    by_role: dict[GroupKey, list[Sighting]] = {}  # each role looks at its own sightings only
    for sighting in sightings:
        by_role.setdefault(sighting.role, []).append(sighting)
    return {
        name: {
            group.name: [
                entry_json(entry)
                for entry in role_scope(rules, key, by_role.get(key, ()), static).values()
            ]
            for group in rules.services[name].groups
            for key in (GroupKey(name, group.name),)
        }
        for name in services
    }


def routes(context: ApiContext) -> list[web.RouteDef]:
    async def get_scope(request: web.Request) -> web.Response:
        service = request.match_info["service"]
        rules = context.rules()
        if service not in rules.services:
            raise ApiError(404, f"no service {service!r}")
        sightings = await asyncio.to_thread(load_sightings, context.store, service)
        groups = service_scopes(rules, [service], sightings)[service]
        return web.json_response({"service": service, "groups": groups})

    async def get_scopes(request: web.Request) -> web.Response:
        rules = context.rules()
        sightings = await asyncio.to_thread(load_sightings, context.store)
        return web.json_response(
            {"services": service_scopes(rules, sorted(rules.services), sightings)}
        )

    return [web.get("/api/v1/scope", get_scopes), web.get("/api/v1/scope/{service}", get_scope)]
