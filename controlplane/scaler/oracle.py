"""The oracles' arithmetic: the fewest replica-seconds that serve a group's known need.

The need of a group is split into levels: level k is needed while k or more replicas are.
Instances are interchangeable, so a schedule's cost is the sum over k of the time it holds k
or more instances, and each level can be bounded on its own: between two stretches of need
the k-th instance is kept (a gap costs its length), stopped and started again (its start-up,
which must end by the next need), or parked and resumed (the gap at the parked cost, plus
the resume). A parked instance is out of the count, as in the replay.

`level_cost` with `window=0` is the oracle's bound: every choice is free. With the
simulator's flap window it bounds every schedule that never flaps (a scale event reversed
within the window). A level that the count leaves and regains within the window (or
reaches and leaves) makes the group flap: between those two moments its count turns from
going down to going up, so two consecutive scale events reverse within the window. So a
flap-free schedule obeys two rules at every level: it cannot go below k and back to k or
more within the window (a level comes back from a stop only if the gap leaves the window
after the start-up, and from a pool only if it leaves it after the resume; an instance
started into the pool beforehand is no scale event and costs its start-up), and it cannot
reach k and leave it within the window (a level held at all is held for the window). A
dynamic programme over which stretches of need share a held block finds the least cost
under those rules, charging a block its span or the window, whichever is longer, but not
where that hold falls: a hold that would crowd the next block is not charged for it, so
the result can only be lower than the level's cheapest schedule. Summing the levels drops
one more rule, that they nest (k + 1 or more only while k or more), which can only lower it
further. Hence no schedule that is never short and never flaps costs less. Three limits:
the start-ups are the group's seeded draws taken level by level, not those of the instances
a policy happens to start, so the bound holds for the start-up distribution rather than
draw by draw (as the oracle's always has); the rules bind only events inside the measured
days, as the flap count does; and the programme picks each level's cheapest choices over
the warm-up and the measured days together while only the measured part is counted, so
at the start of the measured days a schedule may undercut it by up to about one start-up
per level (the benchmark's check that no policy does would show it).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

Interval = tuple[float, float]


@dataclass(frozen=True)
class Terms:
    """What a level's schedule is bound by: the flap window (0: none), a resume's seconds,
    a parked second's price in running seconds, and the measured days [start, end)."""

    window: float
    resume: float
    parked_cost: float
    start: float
    end: float

    def overlap(self, low: float, high: float) -> float:
        return max(0.0, min(high, self.end) - max(low, self.start))


def need_levels(steps: Sequence[tuple[float, int]]) -> dict[int, list[Interval]]:
    """Per level k, the stretches [from, until) during which k or more replicas are needed,
    from (time, need from then on) steps; a level never left again stays open (inf)."""
    levels: dict[int, list[list[float]]] = {}
    previous = 0
    for moment, level in steps:
        for k in range(previous + 1, level + 1):
            levels.setdefault(k, []).append([moment, float("inf")])
        for k in range(level + 1, previous + 1):
            levels[k][-1][1] = moment
        previous = level
    return {k: [(low, high) for low, high in spans] for k, spans in levels.items()}


@dataclass(frozen=True)
class _Start:
    """How a held block begins at stretch `first`: when the level is reached (`at`), and
    what bringing its instance costs outside the block, as (from, until, price) pieces."""

    first: int
    at: float
    pieces: tuple[tuple[float, float, float], ...]

    def outside(self) -> float:
        return sum(price * (high - low) for low, high, price in self.pieces)


def level_cost(needed: Sequence[Interval], startups: Sequence[float], terms: Terms) -> float:
    """The measured replica-seconds of one level's cheapest schedule: `needed` are its
    stretches of need (sorted, apart), `startups[i]` the start-up of the instance that a
    cold start for stretch i would take."""
    if not needed:
        return 0.0
    best = [0.0] * (len(needed) + 1)  # best[i]: stretches before i served, a block ended
    chosen: list[_Start] = []  # per stretch j: where the block ending at j begins
    waiting: list[tuple[float, int, _Start, float]] = []  # by `at`: start, best before it
    settled: tuple[float, _Start] | None = None  # the cheapest start whose block is linear
    order = 0
    for j, (_, until) in enumerate(needed):
        for start in _starts(needed, startups, j, terms):
            heapq.heappush(waiting, (start.at, order, start, best[j] + start.outside()))
            order += 1
        while waiting and waiting[0][0] <= until - terms.window:
            at, _, start, before = heapq.heappop(waiting)
            if settled is None or before - at < settled[0]:
                settled = (before - at, start)
        options = [(before + _held(start.at, until, terms), start) for *_, start, before in waiting]
        if settled is not None:
            options.append((settled[0] + until, settled[1]))
        cost, start = min(options, key=lambda option: option[0])
        best[j + 1] = cost
        chosen.append(start)
    return _measured(needed, chosen, terms)


def _starts(
    needed: Sequence[Interval], startups: Sequence[float], i: int, terms: Terms
) -> list[_Start]:
    """The ways a block can begin at stretch i after the previous one ended at stretch i-1:
    a cold start, a resume of an instance parked since then, or of one started to be parked.
    The flap window applies when the previous stretch ended inside the measured days."""
    low, _ = needed[i]
    cold = _Start(i, low - startups[i], ())
    if i == 0:
        return [cold]
    ended = needed[i - 1][1]
    window = terms.window if ended >= terms.start else 0.0
    starts = []
    if cold.at - ended >= window:
        starts.append(cold)
    resumed = low - terms.resume
    if resumed - ended >= window:
        parked = (ended, resumed, terms.parked_cost)
        filled = (resumed - startups[i], resumed, 1.0)
        cheaper = min(parked, filled, key=lambda piece: piece[2] * (piece[1] - piece[0]))
        starts.append(_Start(i, resumed, (cheaper,)))
    return starts


def _held(at: float, until: float, terms: Terms) -> float:
    """Seconds a block reached at `at` and needed until `until` is held: at least the
    window when it is reached inside the measured days (or until they end)."""
    if at < terms.start:
        return until - at
    return max(until - at, min(terms.window, terms.end - at))


def _measured(needed: Sequence[Interval], chosen: list[_Start], terms: Terms) -> float:
    """The cheapest schedule's seconds inside the measured days, walked back from the end."""
    seconds = 0.0
    j = len(needed) - 1
    while j >= 0:
        start = chosen[j]
        until = needed[j][1]
        seconds += terms.overlap(start.at, start.at + _held(start.at, until, terms))
        seconds += sum(price * terms.overlap(low, high) for low, high, price in start.pieces)
        j = start.first - 1
    return seconds
