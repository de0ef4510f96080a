"""What a rollout's canary and stable sidecars did with their requests, from the access logs.

Each egress (or gateway) entry is one routing decision of the sidecar that logged it; the
sidecar is a canary or not (controlplane/canary.py says), and its decision is judged against
the rules it was given: the candidate's for a canary, the current ones for the rest. That is
all a rule change can alter, and it is known from one entry, without waiting for the hop's
inbound entry (a routing leak is a request sent to a group the rules give no such request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from controlplane.model.dye import DyeIndex
from controlplane.model.group import DEFAULT_GROUP
from controlplane.model.rollout import CANARY, STABLE, Tally
from controlplane.model.rules import RuleSet
from controlplane.telemetry.accounting import (
    EGRESS,
    FALLEN_BACK,
    GATEWAY,
    OUTSIDE_MESH_ROUTES,
    LogEntry,
    destination,
    may_serve,
)


def tally(into: Tally, judged: Sequence[tuple[RuleSet, DyeIndex]], entry: LogEntry) -> None:
    """Count one routing decision, judged against the rules its sidecar was given (first) and
    any it may still hold: a canary routes by the current rules until the candidate reaches
    it, and what those rules explain is not the change's doing (no leak)."""
    into.requests += 1
    into.errors += entry.status >= 500
    if entry.route in OUTSIDE_MESH_ROUTES:
        return
    first = _routed(*judged[0], entry)
    into.rejected += first == "rejected"
    into.fallbacks += first == "fallback"
    into.leaks += first == "leak" and all(_routed(*each, entry) == "leak" for each in judged[1:])


def _routed(rules: RuleSet, dyes: DyeIndex, entry: LogEntry) -> str:
    """What one egress entry's routing was under `rules`: rejected, fallback, leak or ok."""
    chain = rules.chains.get(entry.route) or dyes.chain_of(entry.dye, entry.baggage)
    service, picked = destination(rules, entry)
    hop = chain.hop_for(service) if chain is not None else None
    if hop is None:  # online traffic (or a chain's call to no hop of it): `default` only
        return "leak" if chain is None and picked not in ("", DEFAULT_GROUP) else "ok"
    if "UH" in entry.flags:
        return "rejected" if chain.fallback == "strict" else "fallback"
    if picked == DEFAULT_GROUP and entry.fallback in FALLEN_BACK:  # the caller was told
        return "fallback"
    if picked and picked != hop.group and not may_serve(chain, hop, picked):
        return "leak"
    return "ok"


class CanaryTallies:
    """The two cohorts' tallies of the rollout in progress (none between rollouts)."""

    def __init__(self) -> None:
        self.generation = ""  # the rollout's candidate; "" when none runs
        self.tallies = {CANARY: Tally(), STABLE: Tally()}
        self.since = 0.0  # when the counting started
        self._judged: dict[str, list[tuple[RuleSet, DyeIndex]]] = {}
        self._cohort_of: Callable[[str], str | None] = lambda node: None

    def start(
        self,
        generation: str,
        current: RuleSet,
        candidate: RuleSet,
        cohort_of: Callable[[str], str | None],
        now: float,
    ) -> None:
        """Count from zero for a new rollout (the same one again keeps its counts).
        `cohort_of(node)`: CANARY, STABLE, or None for a node whose logs are left out."""
        if generation == self.generation:
            return
        self.generation, self._cohort_of, self.since = generation, cohort_of, now
        self.tallies = {CANARY: Tally(), STABLE: Tally()}
        now = (current, DyeIndex(current.chains))
        self._judged = {CANARY: [(candidate, DyeIndex(candidate.chains)), now], STABLE: [now]}

    def stop(self) -> None:
        self.generation, self._judged = "", {}

    def ingest(self, entries: Iterable[LogEntry]) -> None:
        if not self.generation:
            return
        for entry in entries:
            if entry.direction in (EGRESS, GATEWAY):
                cohort = self._cohort_of(entry.node)
                if cohort is not None:
                    tally(self.tallies[cohort], self._judged[cohort], entry)
