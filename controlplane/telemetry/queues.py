"""Queue hops in the isolation accounting: the deliveries consumers report
(`controlplane.queues.Delivery`, through `POST /api/v1/deliveries`) judged like access-log
entries, per (queue, chain or "" for online, group that consumed).

A leak is an undyed message consumed by a task group, or a chain's message consumed outside
its hop's group without a fallback reason; a loose lane's message that waited out its group and
was dead-lettered to `default` is a fallback (`no_consumer`). Broken dyes are counted per
queue, and how many were rejected; messages whose handler raised are counted as failed.

The keys come from what consumers send, so only what the rules know is kept by name: a queue of
a queue hop, its consuming service and one of that service's groups. Anything else is counted
under one `unknown` row, so a buggy or hostile reporter cannot grow memory or metric series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from controlplane.model.dye import DyeIndex
from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.queues import QueueLanes, queue_plan
from controlplane.model.rules import RuleSet
from controlplane.queues import Delivery
from controlplane.telemetry.accounting import Rate

UNKNOWN = "unknown"  # the queue, service and group of a delivery the rules do not know
NO_CONSUMER = "no_consumer"  # a loose lane's message its group did not take in time
QueueKey = tuple[str, str, str, str]  # chain ("" online), queue, consuming service, group


@dataclass
class QueueStats:
    """What one (queue, chain, service, group) consumed."""

    messages: int = 0
    leaks: int = 0
    fallbacks: int = 0
    bad_dyes: int = 0
    rejected: int = 0
    failed: int = 0  # the handler raised: dead-lettered
    rate: Rate = field(default_factory=Rate)
    last_at: float = 0.0


class QueueAccounting(Collector):
    """Judges reported deliveries against the current rules; a Prometheus collector too."""

    def __init__(self, rules: Callable[[], RuleSet], clock: Callable[[], float]) -> None:
        self._rules_source, self._clock = rules, clock
        self._rules: RuleSet | None = None
        self._dyes = DyeIndex({})
        self._plan: dict[str, QueueLanes] = {}
        self.stats: dict[QueueKey, QueueStats] = {}

    def ingest(self, deliveries: Iterable[Delivery]) -> None:
        rules, now = self._rules_source(), self._clock()
        if rules is not self._rules:
            self._rules, self._dyes = rules, DyeIndex(rules.chains)
            self._plan = queue_plan(rules)
        for delivery in deliveries:
            if not self._known(rules, delivery):
                self._count(("", UNKNOWN, UNKNOWN, UNKNOWN), delivery, now)
                continue
            chain = self._dyes.chain_of(delivery.dye, "") if delivery.dye else None
            hop = None
            if chain is not None:
                hop = next((h for h in chain.hops if h.queue == delivery.queue), None)
            key = (
                chain.name if chain is not None else "",
                delivery.queue,
                delivery.service,
                delivery.group,
            )
            stats = self._count(key, delivery, now)
            if delivery.rejected:
                continue
            if chain is None or hop is None:  # online, or a chain without a hop on this queue
                stats.leaks += chain is None and delivery.group != DEFAULT_GROUP
            elif delivery.group != hop.group:
                loose = chain.fallback == "loose" and delivery.group == DEFAULT_GROUP
                if loose and delivery.fell_back:
                    stats.fallbacks += 1
                else:
                    stats.leaks += 1

    def _known(self, rules: RuleSet, delivery: Delivery) -> bool:
        """Whether the delivery's queue, service and group are the rules' own."""
        lanes = self._plan.get(delivery.queue)
        if lanes is None or lanes.service != delivery.service:
            return False
        service = rules.services.get(delivery.service)
        return service is not None and service.group(delivery.group) is not None

    def _count(self, key: QueueKey, delivery: Delivery, now: float) -> QueueStats:
        stats = self.stats.get(key) or self.stats.setdefault(key, QueueStats())
        stats.messages += 1
        stats.bad_dyes += delivery.bad_dye is not None
        stats.rejected += delivery.rejected
        stats.failed += delivery.failed
        stats.rate.add(now)
        stats.last_at = now
        return stats

    def report(self, now: float) -> list[dict[str, Any]]:
        """The `queues` list of `/api/v1/isolation`."""
        rules = self._rules or RuleSet.empty()
        out = []
        for (chain, queue, service, group), stats in sorted(self.stats.items()):
            hop = None
            if chain in rules.chains:
                hop = next((h for h in rules.chains[chain].hops if h.queue == queue), None)
            out.append(
                {
                    "queue": queue,
                    "chain": chain,
                    "service": service,
                    "group": group,
                    "hop_group": hop is not None and hop.group == group,
                    "messages": stats.messages,
                    "leaks": stats.leaks,
                    "fallbacks": {NO_CONSUMER: stats.fallbacks} if stats.fallbacks else {},
                    "bad_dyes": stats.bad_dyes,
                    "rejected": stats.rejected,
                    "failed": stats.failed,
                    "rate": round(stats.rate.per_second(now), 3),
                    "last_at": stats.last_at,
                }
            )
        return out

    def totals(self) -> dict[str, int]:
        every = self.stats.values()
        return {
            "queue_messages": sum(s.messages for s in every),
            "queue_leaks": sum(s.leaks for s in every),
            "queue_fallbacks": sum(s.fallbacks for s in every),
            "queue_bad_dyes": sum(s.bad_dyes for s in every),
        }

    def collect(self) -> Iterator[Metric]:
        labels = ["queue", "chain", "service", "group"]
        families = {
            "messages": CounterMetricFamily(
                "tasklane_queue_messages", "Messages consumed per queue hop", labels=labels
            ),
            "leaks": CounterMetricFamily(
                "tasklane_queue_leaks",
                "Messages consumed outside their lane: undyed by a task group, or a chain's "
                "outside its hop's group without a fallback",
                labels=labels,
            ),
            "fallbacks": CounterMetricFamily(
                "tasklane_queue_fallbacks",
                "A loose chain's messages consumed by default after waiting for their group",
                labels=[*labels, "reason"],
            ),
            "bad_dyes": CounterMetricFamily(
                "tasklane_queue_bad_dyes",
                "Messages whose dye header was malformed or too long (stripped or rejected)",
                labels=labels,
            ),
            "failed": CounterMetricFamily(
                "tasklane_queue_failed",
                "Messages whose handler raised (dead-lettered, not requeued)",
                labels=labels,
            ),
        }
        for (chain, queue, service, group), stats in sorted(self.stats.items()):
            values = [queue, chain, service, group]
            families["messages"].add_metric(values, stats.messages)
            families["leaks"].add_metric(values, stats.leaks)
            families["fallbacks"].add_metric([*values, NO_CONSUMER], stats.fallbacks)
            families["bad_dyes"].add_metric(values, stats.bad_dyes)
            families["failed"].add_metric(values, stats.failed)
        yield from families.values()
