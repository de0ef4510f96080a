"""A role's scope: the services whose routes, clusters and endpoints its sidecars hold.

A sidecar holds the config of the services its app calls, not of the whole mesh, so its
memory and its share of every push do not grow with the mesh. A service is in a role's scope
because
- the Service declares the call (`spec.calls`, like Istio's Sidecar egress hosts): DECLARED;
- a TaskChain will make it: every later hop of a chain that the role's service is a hop of,
  in every group of that service (a weight or a loose fallback sends dyed requests through
  `default` too), so a run's first dyed request never waits for discovery: CHAIN;
- the role's sidecars called it: first ON_DEMAND (a sidecar asked for a host its config
  lacked, and got it within the request), then kept while the access logs show it in use
  (LEARNED), dropped after an idle time. These are stored in etcd as `Sighting`s and survive
  a control-plane restart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet, TaskChain

DECLARED, CHAIN, LEARNED, ON_DEMAND = "declared", "chain", "learned", "on-demand"
SIGHTING_REASONS = (ON_DEMAND, LEARNED)
DEFAULT_IDLE = 24 * 3600.0  # a nightly task's services stay in scope until the next night


@dataclass(frozen=True)
class Sighting:
    """A role's sidecars called `callee`: since when, and when last (from the access logs)."""

    role: GroupKey
    callee: str
    reason: str  # ON_DEMAND or LEARNED: how it first came in
    since: float
    last_seen: float

    def idle(self, now: float, idle_seconds: float) -> bool:
        """Unused for longer than `idle_seconds`: the entry leaves the scope."""
        return now - self.last_seen > idle_seconds


@dataclass(frozen=True)
class Entry:
    """One service of a role's scope and why it is there, as `tasklane get scope` shows it."""

    callee: str
    reason: str  # DECLARED, CHAIN, ON_DEMAND or LEARNED
    detail: str = ""  # the chain's name; "since <time>" for a sighting
    since: float | None = None
    last_seen: float | None = None


def rule_scopes(rules: RuleSet) -> dict[str, dict[str, Entry]]:
    """service -> {callee: why}: what the rules alone put in the scope of every group of a
    service (declared calls first, then chains in name order)."""
    out: dict[str, dict[str, Entry]] = {}
    for service in rules.services.values():
        if service.calls:
            out[service.name] = {c: Entry(c, DECLARED) for c in service.calls}
    for name in sorted(rules.chains):
        for service, later in chain_callees(rules.chains[name]).items():
            mine = out.setdefault(service, {})
            for callee in later:
                mine.setdefault(callee, Entry(callee, CHAIN, name))
    return out


def chain_callees(chain: TaskChain) -> dict[str, tuple[str, ...]]:
    """service of each hop -> the services of the chain's later hops (CHAIN entries)."""
    services = [hop.service for hop in chain.hops]
    return {
        service: tuple(s for s in services[index + 1 :] if s != service)
        for index, service in enumerate(services)
    }


def role_scope(
    rules: RuleSet,
    role: GroupKey,
    sightings: Iterable[Sighting] = (),
    from_rules: Mapping[str, Mapping[str, Entry]] | None = None,
) -> dict[str, Entry]:
    """callee -> why, for one role: the rules' entries, then its sightings of services that
    still exist. `from_rules` is `rule_scopes(rules)` when the caller has it already."""
    static = (from_rules if from_rules is not None else rule_scopes(rules)).get(role.service, {})
    out = dict(static)
    for sighting in sorted(sightings, key=lambda s: s.callee):
        if (
            sighting.role == role
            and sighting.callee not in out
            and sighting.callee in rules.services
        ):
            out[sighting.callee] = Entry(
                sighting.callee,
                sighting.reason,
                since=sighting.since,
                last_seen=sighting.last_seen,
            )
    return out


def sighted_by_role(sightings: Iterable[Sighting]) -> dict[GroupKey, frozenset[str]]:
    """role -> the callees its sidecars were seen calling (the translator's dynamic input)."""
    out: dict[GroupKey, set[str]] = {}
    for sighting in sightings:
        out.setdefault(sighting.role, set()).add(sighting.callee)
    return {role: frozenset(callees) for role, callees in out.items()}
