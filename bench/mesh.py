"""The generated mesh the scale benchmarks share (bench/translate.py, bench/xds_push.py).

Seeded synthetic rules: N services x 3 groups (`default` + 2 task groups), M chains of 3-6
hops over random services (exact dyes plus one prefix each; some `loose`, some weights under
100, some rate limits); every dye is unique so `check` accepts them. Each service declares
the services its app calls (`spec.calls`, 4 by default), drawn with Zipf weights as in a real
mesh, where a few services (accounts, pricing) are called by many; its chains' later hops
join its scope too, so a role's scope averages ~5-6 services.
"""

from __future__ import annotations

import random
from dataclasses import replace

from controlplane.model.dye import DEFAULT_BAGGAGE_KEY, DEFAULT_DYE_HEADER, Dye
from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.rules import (
    Group,
    Hop,
    RateLimit,
    RuleSet,
    Service,
    TaskChain,
)
from controlplane.model.validate import check

TASK_GROUPS = ("task-a", "task-b")
GROUPS = (DEFAULT_GROUP, *TASK_GROUPS)


def service_names(services: int) -> list[str]:
    """The services' names, so that a client can name the roles without building the rules."""
    return [f"svc-{i:04d}" for i in range(services)]


def make_rules(services: int, chains: int, seed: int, calls: int = 4) -> RuleSet:
    """Seeded synthetic rules, accepted by `check`."""
    rng = random.Random(seed)
    names = service_names(services)
    groups = (Group(DEFAULT_GROUP, 1, 4), *(Group(g, 0, 4) for g in TASK_GROUPS))
    zipf = [1 / (rank + 1) for rank in range(services)]
    service_rules = []
    for n in names:
        callees = {c for c in rng.choices(names, weights=zipf, k=calls) if c != n}
        service_rules.append(
            Service(name=n, protocol="http", groups=groups, calls=tuple(sorted(callees)))
        )
    chain_rules = []
    for c in range(chains):
        hops = []
        for service in rng.sample(names, rng.randint(3, 6)):
            weight = 100 if rng.random() < 0.7 else rng.choice((10, 25, 50, 90))
            limit = None
            if rng.random() < 0.3:
                rate = rng.choice((5.0, 50.0, 200.0))
                limit = RateLimit(requests_per_second=rate, burst=int(rate) * 2)
            hops.append(Hop(service, rng.choice(TASK_GROUPS), weight, limit))
        dye = Dye(
            header=DEFAULT_DYE_HEADER,
            baggage_key=DEFAULT_BAGGAGE_KEY,
            exact=tuple(f"task-{c:04d}-{k}" for k in range(rng.randint(1, 3))),
            prefixes=(f"run-{c:04d}-",),
        )
        fallback = "loose" if rng.random() < 0.3 else "strict"
        chain_rules.append(TaskChain(f"chain-{c:04d}", dye, fallback, tuple(hops)))
    rules = RuleSet.empty().with_rules([*service_rules, *chain_rules])
    check(rules)
    return rules


def make_endpoints(rules: RuleSet, per_group: int) -> dict[tuple[str, str], list[tuple[str, int]]]:
    """`per_group` instances of every group, each with a distinct fake inbound address."""
    out: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for s, service in enumerate(sorted(rules.services.values(), key=lambda x: x.name)):
        for g, group in enumerate(service.groups):
            out[(service.name, group.name)] = [
                (f"10.{s // 250}.{s % 250}.{g * 10 + i}", 15006) for i in range(per_group)
            ]
    return out


def busiest_chain(rules: RuleSet) -> str:
    """The chain whose first hop (the one change_weight changes) the most services call: a
    change there reaches the most scoped sidecars."""
    callers: dict[str, int] = {}
    for service in rules.services.values():
        for callee in service.calls:
            callers[callee] = callers.get(callee, 0) + 1
    return max(sorted(rules.chains), key=lambda c: callers.get(rules.chains[c].hops[0].service, 0))


def change_weight(rules: RuleSet, chain_name: str, rep: int) -> RuleSet:
    """The chain with its first hop's weight set to a value that differs from every rep's."""
    chain = rules.chains[chain_name]
    first = replace(chain.hops[0], weight=1 + rep % 98)
    return rules.with_rules([replace(chain, hops=(first, *chain.hops[1:]))])
