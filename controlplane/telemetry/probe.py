"""The propagation probe, from the access logs: which group served one synthetic dyed request
at each hop of its chain, and whether the dye was still on it when it arrived there.

Pure (no I/O): `Probes` keeps the access-log entries of the probes in flight, by their fresh
`x-request-id` (fed from Telemetry's ingest, like the accounting), and the last report per
chain; `trace()` judges one probe's entries against its chain. api/probe.py sends the request
and waits for the entries.

How each hop is judged, in the chain's order (the probe is sent dyed into the first hop):

- **arrived**: the *inbound* entry of the instance that served it; its node metadata says which
  group served, its logged dye and baggage (or the chain's route name) whether it was dyed.
- **ok**: dyed, served by the hop's group.
- **fallback**: dyed, served by `default` where the config sends some of the hop's requests
  there (a weight under 100, a loose chain's fallback): not a fault of propagation.
- **wrong group**: dyed, served by another group.
- **dye lost**: it arrived (or was sent by the previous hop's sidecar) without the dye. The app
  of the previous hop dropped it: it forwarded x-request-id, but not the dye.
- **not reached**: no sidecar logged a request with this id to the hop's service. The previous
  hop's app either never called it or dropped x-request-id too (with or without the dye): the
  logs cannot tell which. A caller's egress entry with no instance behind it (a strict 503)
  is also `not reached`, with what the caller's sidecar answered.
- **undyed**: a hop after the one where the dye was lost (what follows from that loss).
- **not followed**: a queue hop and every hop after it. A message carries no x-request-id that
  the access logs could follow; the queue hops' own accounting (deliveries by chain and group,
  in /api/v1/isolation) covers them. A chain that starts with a queue hop cannot be probed.

Every probe request is a real request: the isolation accounting counts it like any other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from controlplane.model.dye import DyeIndex
from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.instance import Instance
from controlplane.model.rules import Hop, RuleSet, TaskChain
from controlplane.telemetry.accounting import INBOUND, Expiring, LogEntry, destination, may_serve

OK, FALLBACK, WRONG_GROUP, DYE_LOST, NOT_REACHED, UNDYED, NOT_FOLLOWED = (
    "ok",
    "fallback",
    "wrong group",
    "dye lost",
    "not reached",
    "undyed",
    "not followed",
)
PASSING = frozenset({OK, FALLBACK, NOT_FOLLOWED})
IN_FLIGHT_MAX = 64  # probes whose entries are kept at once; the oldest is dropped first
# A probe is in flight for its answer and its logs (api/probe.py: 12 s at most); one never
# finished (its HTTP request was cancelled under it) is dropped this long after its start.
IN_FLIGHT_S = 60.0
PROBE_VALUE = "probe"  # appended to a prefix dye when a chain has no exact value


class Probes:
    """The entries of the probes in flight (by request id) and the last report per chain."""

    def __init__(
        self,
        cap: int = IN_FLIGHT_MAX,
        ttl: float = IN_FLIGHT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._flying: Expiring[str, list[LogEntry]] = Expiring(ttl, cap)
        self._clock = clock
        self.last: dict[str, dict[str, Any]] = {}

    def start(self, request_id: str) -> None:
        """Keep the entries of `request_id` from now on."""
        now = self._clock()
        self._flying.put(request_id, [], now)
        self._flying.expire(now)

    def entries(self, request_id: str) -> list[LogEntry]:
        return list(self._flying.get(request_id) or ())

    def finish(self, request_id: str, report: dict[str, Any]) -> None:
        """Stop keeping the probe's entries and remember its report as its chain's last."""
        self._flying.pop(request_id)
        self.last[report["chain"]] = report

    def ingest(self, entries: Iterable[LogEntry]) -> None:
        self._flying.expire(self._clock())
        if not self._flying:
            return
        for entry in entries:
            kept = self._flying.get(entry.request_id)
            if kept is not None:
                kept.append(entry)


def probe_dye(chain: TaskChain) -> str:
    """A dye value of the chain: its first exact value, else its first prefix + `probe`."""
    return chain.dye.exact[0] if chain.dye.exact else chain.dye.prefixes[0] + PROBE_VALUE


def target(chain: TaskChain, instances: Sequence[Instance]) -> Instance | None:
    """The registered instance the probe enters the chain by: one of the first hop's group,
    else (where the config sends the hop's requests to `default` too) one of `default`."""
    hop = chain.hops[0]
    for group in (hop.group, DEFAULT_GROUP):
        found = sorted(
            (i for i in instances if (i.service, i.group) == (hop.service, group)),
            key=lambda i: i.id,
        )
        if found and (group == hop.group or may_serve(chain, hop, group)):
            return found[0]
    return None


def followed(chain: TaskChain) -> tuple[Hop, ...]:
    """The hops an HTTP request reaches: those before the first queue hop."""
    queued = next((i for i, hop in enumerate(chain.hops) if hop.queue), len(chain.hops))
    return chain.hops[:queued]


def reached(chain: TaskChain, entries: Sequence[LogEntry]) -> bool:
    """Whether every followed hop has its inbound entry: nothing more is to come."""
    served = {e.service for e in entries if e.direction == INBOUND}
    return all(hop.service in served for hop in followed(chain))


def trace(
    rules: RuleSet,
    chain: TaskChain,
    request_id: str,
    entries: Sequence[LogEntry],
    sent: dict[str, Any],
) -> dict[str, Any]:
    """The report of one probe: each hop's verdict and the first hop that failed, if any.
    `sent` says how it was sent (its target and the answer), and goes into the report."""
    dyes = DyeIndex(rules.chains)

    def dyed(entry: LogEntry) -> bool:
        return entry.route == chain.name or dyes.chain_of(entry.dye, entry.baggage) is chain

    ordered = sorted(entries, key=lambda e: e.at)
    hops: list[dict[str, Any]] = []
    problem: str | None = None
    http_hops = len(followed(chain))
    for index, hop in enumerate(chain.hops, start=1):
        row: dict[str, Any] = {
            "hop": index,
            "service": hop.service,
            "expected": hop.group,
            "servedBy": None,
            "node": None,
            "dyed": None,
            "status": None,
        }
        if index > http_hops:
            queue = chain.hops[http_hops].queue
            row["verdict"], row["detail"] = NOT_FOLLOWED, f"behind queue {queue}"
            hops.append(row)
            continue
        inbound = next(
            (e for e in ordered if e.direction == INBOUND and e.service == hop.service), None
        )
        calls = [
            e for e in ordered if e.direction != INBOUND and destination(rules, e)[0] == hop.service
        ]
        seen = inbound if inbound is not None else (calls[0] if calls else None)
        previous = f"hop {index - 1} ({chain.hops[index - 2].service})" if index > 1 else ""
        if seen is None:
            verdict = NOT_REACHED
            row["detail"] = (
                f"no sidecar saw a request with id {request_id} to {hop.service}: the app at "
                f"{previous} did not call it, or dropped x-request-id too (with or without "
                "the dye)"
                if previous
                else "the probe was not sent"
            )
        else:
            row["dyed"], row["status"] = dyed(seen), seen.status
            if inbound is not None:
                row["servedBy"], row["node"] = inbound.group, inbound.node
            if problem is not None and not row["dyed"]:
                verdict = UNDYED
            elif not row["dyed"]:
                verdict = DYE_LOST
                row["detail"] = (
                    f"came without the dye: the app at {previous} forwarded x-request-id but "
                    "not the dye"
                    if previous
                    else "the probe's own request came without the dye"
                )
            elif inbound is None:
                verdict = NOT_REACHED
                flags = ",".join(sorted(seen.flags)) or "-"
                row["detail"] = (
                    f"the caller's sidecar ({seen.node}) answered {seen.status} ({flags}): no "
                    "instance served it"
                )
            elif inbound.group == hop.group:
                verdict = OK
            elif may_serve(chain, hop, inbound.group):
                verdict = FALLBACK
            else:
                verdict = WRONG_GROUP
        row["verdict"] = verdict
        hops.append(row)
        if problem is None and verdict not in PASSING:
            problem = _problem(verdict, index, chain, row)
    return {
        "chain": chain.name,
        "requestId": request_id,
        **sent,
        "hops": hops,
        "ok": problem is None,
        "problem": problem,
    }


def _problem(verdict: str, index: int, chain: TaskChain, row: dict[str, Any]) -> str:
    """One line naming where the probe went wrong."""
    here = f"hop {index} ({chain.hops[index - 1].service})"
    if verdict == DYE_LOST and index > 1:
        before = f"hop {index - 1} ({chain.hops[index - 2].service})"
        return f"dye lost between {before} and {here}"
    if verdict == WRONG_GROUP:
        return f"{here} served by group {row['servedBy']}, not {row['expected']}"
    return f"{here}: {verdict}: {row.get('detail', '')}"
