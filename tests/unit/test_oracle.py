"""The oracles' arithmetic on tiny hand-made needs: what the plain oracle and the flap-free
oracle each cost, worked out by hand, and that never flapping never costs less."""

from __future__ import annotations

import itertools
import random

import pytest

from controlplane.scaler.oracle import Terms, level_cost, need_levels

WINDOW = 300.0
RESUME = 0.1
PLAIN = Terms(0.0, RESUME, 0.25, 0.0, 1e6)
FLAP_FREE = Terms(WINDOW, RESUME, 0.25, 0.0, 1e6)


def test_levels_of_a_need() -> None:
    steps = [(100.0, 2), (150.0, 1), (200.0, 0), (900.0, 1), (960.0, 0)]
    assert need_levels(steps) == {1: [(100.0, 200.0), (900.0, 960.0)], 2: [(100.0, 150.0)]}


def test_a_short_run_is_held_for_the_window() -> None:
    """Needed 100 s, a 50 s start-up: the oracle pays 150 s; a schedule that does not flap
    cannot go down within 300 s of going up, so it pays 300 s."""
    assert level_cost([(1000.0, 1100.0)], [50.0], PLAIN) == pytest.approx(150.0)
    assert level_cost([(1000.0, 1100.0)], [50.0], FLAP_FREE) == pytest.approx(300.0)


def test_a_gap_inside_the_window_is_kept() -> None:
    """A 200 s gap: the oracle stops and starts again (50 s), the flap-free one keeps the
    instance through it (200 s); 100 s of need on each side, the first 50 s start-up."""
    needed = [(1000.0, 1100.0), (1300.0, 1400.0)]
    assert level_cost(needed, [50.0, 50.0], PLAIN) == pytest.approx(300.0)
    assert level_cost(needed, [50.0, 50.0], FLAP_FREE) == pytest.approx(450.0)


def test_a_gap_that_leaves_the_window_after_the_start_up_is_a_restart() -> None:
    """A 400 s gap with 50 s start-ups: down at the end of the first run, up 350 s later is
    no flap, and each block is held for the window: 300 + 300, not 650 kept through."""
    needed = [(1000.0, 1100.0), (1500.0, 1600.0)]
    assert level_cost(needed, [50.0, 50.0], FLAP_FREE) == pytest.approx(600.0)


def test_a_parked_instance_bridges_a_gap_too_short_to_restart() -> None:
    """A 500 s gap with 250 s start-ups: a restart would come up 250 s after going down (a
    flap), keeping costs 500 s, parking costs a quarter of the gap plus the resume. With
    parking as dear as running, an instance started into the pool (no scale event) and
    resumed at the run costs its start-up and the resume."""
    needed = [(1000.0, 1400.0), (1900.0, 2300.0)]
    parked = 0.25 * (500 - RESUME) + RESUME
    expected = 250 + 400 + parked + 400
    assert level_cost(needed, [250.0, 250.0], FLAP_FREE) == pytest.approx(expected)
    assert level_cost(needed, [250.0, 250.0], PLAIN) == pytest.approx(expected)  # < a restart
    no_pool = Terms(WINDOW, RESUME, 1.0, 0.0, 1e6)
    filled = 250 + RESUME
    assert level_cost(needed, [250.0, 250.0], no_pool) == pytest.approx(250 + 400 + filled + 400)


def test_only_the_measured_days_count_and_bind() -> None:
    """Before the measured days nothing is paid and the window binds nothing; a block that
    reaches past their end is paid up to it."""
    late = Terms(WINDOW, RESUME, 0.25, 2000.0, 1e6)
    assert level_cost([(1000.0, 1100.0)], [50.0], late) == 0.0
    needed = [(1000.0, 1100.0), (2200.0, 2210.0)]  # the second stretch is measured
    assert level_cost(needed, [50.0, 50.0], late) == pytest.approx(300.0)
    early_end = Terms(WINDOW, RESUME, 0.25, 0.0, 1100.0)
    assert level_cost([(1000.0, 1100.0)], [50.0], early_end) == pytest.approx(150.0)


def test_never_flapping_never_costs_less() -> None:
    rng = random.Random(7)
    for _ in range(200):
        moment, needed = 0.0, []
        for _ in range(rng.randint(1, 8)):
            moment += rng.uniform(1, 900)
            length = rng.uniform(1, 900)
            needed.append((moment, moment + length))
            moment += length
        startups = [rng.uniform(5, 300) for _ in needed]
        plain = level_cost(needed, startups, PLAIN)
        flap_free = level_cost(needed, startups, FLAP_FREE)
        kept = needed[-1][1] - needed[0][0] + startups[0]  # one instance, never stopped
        assert plain <= flap_free + 1e-6 <= max(kept, WINDOW) + 2e-6


def _enumerated(needed: list[tuple[float, float]], startups: list[float], terms: Terms) -> float:
    """The same bound by brute force: every way to split the stretches into held blocks
    and to begin each block (cold, or a resume of a parked or pre-started instance)."""
    best = float("inf")
    count = len(needed)
    for cuts in itertools.product((False, True), repeat=count - 1):
        firsts = [0, *(i + 1 for i, cut in enumerate(cuts) if cut)]
        lasts = [*(i - 1 for i in firsts[1:]), count - 1]
        options = []
        for first in firsts:
            low = needed[first][0]
            ways = [(low - startups[first], 0.0)]  # cold: reached at the start-up
            if first:
                gap = low - terms.resume - needed[first - 1][1]
                if low - startups[first] - needed[first - 1][1] < terms.window:
                    ways = []
                if gap >= terms.window:
                    price = min(terms.parked_cost * gap, startups[first])
                    ways.append((low - terms.resume, price))
            options.append(ways)
        for chosen in itertools.product(*options):
            total = 0.0
            for (at, outside), last in zip(chosen, lasts, strict=True):
                total += outside + max(needed[last][1] - at, terms.window)
            best = min(best, total)
    return best


def test_the_dynamic_programme_finds_the_cheapest_split() -> None:
    rng = random.Random(11)
    for _ in range(300):
        moment, needed = 0.0, []
        for _ in range(rng.randint(1, 6)):
            moment += rng.uniform(1, 700)
            length = rng.uniform(1, 400)
            needed.append((moment, moment + length))
            moment += length
        startups = [rng.uniform(5, 300) for _ in needed]
        for window in (0.0, WINDOW):  # measured days around it all: no edge effects
            terms = Terms(window, RESUME, 0.25, -1e6, 1e6)
            expected = _enumerated(needed, startups, terms)
            assert level_cost(needed, startups, terms) == pytest.approx(expected), needed
