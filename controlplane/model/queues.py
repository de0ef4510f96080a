"""Message-queue lanes: where a chain's dyed messages wait, drawn from the TaskChains' queue
hops. The plan is data (JSON at `/api/v1/queues`); `controlplane.queues` declares it on a
broker and publishes and consumes by it.

The design, for a work queue `Q` that service `S` consumes (a queue hop `{service: S, group: G,
queue: Q}` of chain `C`):

* publishers publish to the exchange `Q` with the dye in the message headers (`x-task-dye`,
  or the chain's own header), as on HTTP;
* `Q` is a *headers* exchange. Each chain with a hop on `Q` has its lane queue `Q.C`, bound to
  `Q` once per exact dye value (`x-match: all-with-x, x-task-dye: <value>`) and once by chain
  name (`x-tasklane-chain: C`, which the publish helper sets for dyes a chain claims by prefix:
  a headers exchange matches whole values only). `all-with-x` (RabbitMQ 3.10+) because plain
  `all` ignores every `x-` header, which would bind the lane to every message;
* whatever matches no binding (undyed, or a dye of no chain) goes to `Q`'s *alternate
  exchange* `Q.default`, a fanout to the default queue `Q`. So a message published through the
  helper reaches its chain's lane and nothing else: the helper always recomputes the dye and
  chain headers. A message published by hand with a dye a chain claims only by prefix and no
  chain header reaches the default queue (and is counted as a leak there); one with a chain
  header but not that chain's dye reaches the lane, whose consumer refuses it unhandled;
* consumers in `default` consume `Q`; consumers in group `G` consume the lanes of the chains
  whose hop on `Q` names `G`;
* `strict`: a lane queue keeps its messages until its group consumes them (a durable queue);
  `loose`: the publish helper gives a loose chain's messages a per-message TTL
  (`LOOSE_WAIT_MS`) and every lane has `Q.default` as its dead-letter exchange, so a message its
  group did not take in time is served by `default` and carries RabbitMQ's `x-death` header
  (reason `expired`, the lane's queue), which the consumer counts as a fallback. The wait is
  on the message, not the queue, so a chain may change its fallback without redeclaring its
  lane (RabbitMQ refuses to change a queue's arguments); messages already waiting keep theirs;
* `declare` records the lane bindings it made (in the queue `Q:bindings`: AMQP cannot list
  bindings) and removes those of chains and dye values that left the plan; a retired lane is
  drained through `Q` by the new plan and deleted;
* a lane holds at most `max_waiting` messages (`x-max-length`, `x-overflow: reject-publish`):
  with its group scaled to zero a strict lane does not grow without bound; a publisher with
  confirms is refused (nack) past it.

Kafka and RocketMQ follow the same plan with their own primitives: a lane is a topic (Kafka)
or a tag/SQL92 property filter (RocketMQ) chosen from the same headers by the same rules, and
`loose` is a consumer in `default` that takes a lane's messages older than the wait.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.model.dye import DEFAULT_DYE_HEADER
from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.rules import RuleSet, TaskChain

CHAIN_HEADER = "x-tasklane-chain"
LOOSE_WAIT_MS = 1000  # how long a loose chain's message waits for its group
MAX_WAITING = 100_000  # messages a lane holds before refusing more


@dataclass(frozen=True)
class Lane:
    """One chain's lane on a queue: its queue, group and how its messages are recognised."""

    chain: str
    group: str
    fallback: str
    header: str
    exact: tuple[str, ...]
    prefixes: tuple[str, ...]


@dataclass(frozen=True)
class QueueLanes:
    """A work queue and the lanes of the chains with a hop on it."""

    queue: str
    service: str
    lanes: tuple[Lane, ...]
    max_waiting: int = MAX_WAITING  # per lane

    @property
    def default_exchange(self) -> str:
        return f"{self.queue}.{DEFAULT_GROUP}"

    def lane_queue(self, lane: Lane) -> str:
        return f"{self.queue}.{lane.chain}"

    def lane_of(self, headers: Mapping[str, object]) -> Lane | None:
        """The lane whose chain claims the message's dye (exact or by prefix; validation keeps
        chains' dyes disjoint, so at most one does). The exchange routes an exact dye by its
        value and a prefix-claimed one by the chain header the publish helper sets from this."""
        for lane in self.lanes:
            value = headers.get(lane.header)
            if isinstance(value, str) and (
                value in lane.exact or any(value.startswith(p) for p in lane.prefixes)
            ):
                return lane
        return None

    def queues_for(self, group: str) -> list[str]:
        """The queues a consumer in `group` consumes."""
        if group == DEFAULT_GROUP:
            return [self.queue]
        return [self.lane_queue(lane) for lane in self.lanes if lane.group == group]


def queue_plan(rules: RuleSet) -> dict[str, QueueLanes]:
    """Every queue named by a queue hop, with its lanes, by queue name."""
    found: dict[str, tuple[str, list[Lane]]] = {}
    chains: list[TaskChain] = sorted(rules.chains.values(), key=lambda chain: chain.name)
    for chain in chains:
        for hop in chain.hops:
            if hop.queue is None:
                continue
            lane = Lane(
                chain=chain.name,
                group=hop.group,
                fallback=chain.fallback,
                header=chain.dye.header,
                exact=chain.dye.exact,
                prefixes=chain.dye.prefixes,
            )
            found.setdefault(hop.queue, (hop.service, []))[1].append(lane)
    return {
        queue: QueueLanes(queue=queue, service=service, lanes=tuple(lanes))
        for queue, (service, lanes) in sorted(found.items())
    }


def plan_document(plan: Mapping[str, QueueLanes]) -> dict[str, Any]:
    """The plan as JSON (for `/api/v1/queues` and the apps that read it)."""
    return {
        "queues": [
            {
                "queue": lanes.queue,
                "service": lanes.service,
                "lanes": [
                    {
                        "chain": lane.chain,
                        "group": lane.group,
                        "fallback": lane.fallback,
                        "header": lane.header,
                        "exact": list(lane.exact),
                        "prefixes": list(lane.prefixes),
                    }
                    for lane in lanes.lanes
                ],
            }
            for lanes in plan.values()
        ]
    }


def plan_from_document(document: Mapping[str, Any]) -> dict[str, QueueLanes]:
    """The plan an app read from `/api/v1/queues`."""
    return {
        item["queue"]: QueueLanes(
            queue=item["queue"],
            service=item["service"],
            lanes=tuple(
                Lane(
                    chain=lane["chain"],
                    group=lane["group"],
                    fallback=lane["fallback"],
                    header=lane.get("header", DEFAULT_DYE_HEADER),
                    exact=tuple(lane["exact"]),
                    prefixes=tuple(lane["prefixes"]),
                )
                for lane in item["lanes"]
            ),
        )
        for item in document["queues"]
    }
