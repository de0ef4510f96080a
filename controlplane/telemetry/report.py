"""The isolation report: the accounting's counters as the JSON of `GET /api/v1/isolation`
(the dashboard's and `tasklane top`'s view). The accounting judges; this renders.

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
     "queues": [{"queue", "chain", "service", "group", "hop_group", "messages", "leaks",
                 "fallbacks": {reason: n}, "bad_dyes", "rejected", "rate", "last_at"}],
     "totals": {"entries", "entries_by_direction", "requests", "dyed", "online", "errors_5xx",
                "leaks", "fallbacks", "rate_limited", "refused", "uncovered",
                "propagation_breaks", "outside_mesh", "outside_mesh_refused", "rate_dyed",
                "rate_online", "pending", "unmatched", "queue_messages", "queue_leaks",
                "queue_fallbacks", "queue_bad_dyes"}}

Counts are since the control plane started; rates are per second over the last `window_s`
complete seconds; p50/p99 are of the last requests (telemetry/accounting.py says how each
number is derived from the access logs).
"""

from __future__ import annotations

from typing import Any

from controlplane.model.group import DEFAULT_GROUP, GroupKey
from controlplane.model.rules import TaskChain
from controlplane.telemetry.accounting import RATE_WINDOW_S, Accounting, Stats, percentiles
from controlplane.telemetry.queues import QueueAccounting


def isolation_report(
    accounting: Accounting, queues: QueueAccounting | None = None
) -> dict[str, Any]:
    """The JSON of GET /api/v1/isolation (the shape is in this module's docstring); queue
    hops from `queues`, whose leaks and fallbacks count in the totals too."""
    rules, now = accounting.settle(), accounting.now()
    chains = [_chain_json(accounting, rules.chains[name], now) for name in sorted(rules.chains)]
    dyed_at: dict[GroupKey, list[Stats]] = {}
    for (chain, service, group), stats in accounting.stats.items():
        dyed_at.setdefault((service, group), [])
        if chain:
            dyed_at[service, group].append(stats)
    online: dict[str, dict[str, dict[str, Any]]] = {}
    for (service, group), dyed in sorted(dyed_at.items()):
        stats = accounting.stats.get(("", service, group)) or Stats()
        online.setdefault(service, {})[group] = {
            "requests": stats.requests + sum(s.requests for s in dyed),
            "online": stats.requests,
            "dyed": sum(s.requests for s in dyed),
            "errors_5xx": stats.errors_5xx,
            "p50_ms": percentiles(stats.latency_ms, 0.5)[0],
            "p99_ms": percentiles(stats.latency_ms, 0.99)[0],
            "rate_online": round(stats.rate.per_second(now), 3),
            "rate_dyed": round(float(sum(s.rate.per_second(now) for s in dyed)), 3),
            "leaks": stats.leaks,
            "refused": stats.refused,
            "flags": dict(stats.flags),
        }
    uncovered = [
        {
            "chain": chain,
            "service": service,
            "group": group,
            "requests": stats.requests,
            "rate": round(stats.rate.per_second(now), 3),
            "last_at": stats.last_at,
        }
        for (chain, service, group), stats in sorted(accounting.uncovered.items())
    ]
    breaks = [
        {
            "chain": chain,
            "service": service,
            "group": group,
            "to": target,
            "count": b.count,
            "last_request_id": b.last_request_id,
            "last_at": b.last_at,
        }
        for (chain, service, group, target), b in sorted(accounting.breaks.items())
    ]
    return {
        "at": now,
        "since": accounting.started_at,
        "window_s": RATE_WINDOW_S,
        "chains": chains,
        "online": online,
        "uncovered": uncovered,
        "propagation_breaks": breaks,
        "outside_mesh": [
            {
                "service": service,
                "group": group,
                "requests": stats.requests,
                "refused": stats.refused,
                "errors_5xx": stats.errors_5xx,
                "rate": round(stats.rate.per_second(now), 3),
                "last_at": stats.last_at,
            }
            for (service, group), stats in sorted(accounting.outside.items())
        ],
        "queues": [] if queues is None else queues.report(now),
        "totals": _totals(accounting, queues, now),
    }


def _chain_json(accounting: Accounting, chain: TaskChain, now: float) -> dict[str, Any]:
    hops = []
    for hop in chain.hops:
        groups = [hop.group] + ([DEFAULT_GROUP] if hop.group != DEFAULT_GROUP else [])
        groups += sorted(
            g
            for (c, s, g) in accounting.stats
            if c == chain.name and s == hop.service and g not in groups
        )
        hops.append(
            {
                "service": hop.service,
                "group": hop.group,
                "weight": hop.weight,
                "rate_limit": (
                    {
                        "requests_per_second": hop.rate_limit.requests_per_second,
                        "burst": hop.rate_limit.burst,
                    }
                    if hop.rate_limit is not None
                    else None
                ),
                "groups": [
                    _group_json(accounting, chain.name, hop.service, g, g == hop.group, now)
                    for g in groups
                ],
            }
        )
    return {
        "name": chain.name,
        "dyes": chain.dye.written(),
        "dye_header": chain.dye.header,
        "baggage_key": chain.dye.baggage_key,
        "fallback": chain.fallback,
        "hops": hops,
    }


def _group_json(
    accounting: Accounting, chain: str, service: str, group: str, hop_group: bool, now: float
) -> dict[str, Any]:
    """A chain's view of one group: the chain's dyed requests and the group's online
    traffic (the same online numbers appear under every chain with a hop there)."""
    dyed = accounting.stats.get((chain, service, group)) or Stats()
    online = accounting.stats.get(("", service, group)) or Stats()
    p50, p99 = percentiles([*dyed.latency_ms, *online.latency_ms], 0.5, 0.99)
    return {
        "group": group,
        "hop_group": hop_group,
        "requests": dyed.requests + online.requests,
        "dyed": dyed.requests,
        "online": online.requests,
        "errors_5xx": dyed.errors_5xx + online.errors_5xx,
        "p50_ms": p50,
        "p99_ms": p99,
        "rate_dyed": round(dyed.rate.per_second(now), 3),
        "rate_online": round(online.rate.per_second(now), 3),
        "leaks": dyed.leaks + online.leaks,
        "fallbacks": dict(dyed.fallbacks),
        "rate_limited": dyed.rate_limited,
        "refused": dyed.refused,
        "flags": dict(dyed.flags + online.flags),
    }


def _totals(accounting: Accounting, queues: QueueAccounting | None, now: float) -> dict[str, Any]:
    dyed = [s for (c, _, _), s in accounting.stats.items() if c] + [*accounting.uncovered.values()]
    online = [s for (c, _, _), s in accounting.stats.items() if not c]
    every = [*dyed, *online]
    totals = {
        "entries": sum(accounting.entries.values()),
        "entries_by_direction": dict(accounting.entries),
        "requests": sum(s.requests for s in every),
        "dyed": sum(s.requests for s in dyed),
        "online": sum(s.requests for s in online),
        "errors_5xx": sum(s.errors_5xx for s in every),
        "leaks": sum(s.leaks for s in every),
        "fallbacks": sum(sum(s.fallbacks.values()) for s in every),
        "rate_limited": sum(s.rate_limited for s in every),
        "refused": sum(s.refused for s in every),
        "uncovered": sum(s.requests for s in accounting.uncovered.values()),
        "propagation_breaks": sum(b.count for b in accounting.breaks.values()),
        "outside_mesh": sum(s.requests for s in accounting.outside.values()),
        "outside_mesh_refused": sum(s.refused for s in accounting.outside.values()),
        "rate_dyed": round(float(sum(s.rate.per_second(now) for s in dyed)), 3),
        "rate_online": round(float(sum(s.rate.per_second(now) for s in online)), 3),
        "pending": accounting.pending(),
        "unmatched": accounting.unmatched,
    }
    if queues is not None:
        totals.update(queues.totals())
        totals["leaks"] += totals["queue_leaks"]
        totals["fallbacks"] += totals["queue_fallbacks"]
    return totals
