"""The policy: how many instances each task group should have now, and why.

    desired = clamp(max(predictive, reactive), minReplicas, maxReplicas)

*Predictive* comes from the profile's windows (`profile.windows`): a window of a task's run
needs its replicas from `lead` before it starts until `drain_s` after it ends. The lead is
per task, not per group, because the whole chain must be ready when the cron fires: it is
the time by which *every* instance the task starts on *every* hop is ready with probability
`lead_percentile` %, from the measured start-to-ready durations of those groups, plus one
sync period (a decision is acted on up to one period late). The slowest hop therefore sets
the lead of the whole chain, and since all hops share the run's window they also go down
together. Where the actuator can park (keep-alive), instances started that lead early are
parked once ready and resumed a sync period before the fire, and a run's instances wait
parked for the task's next run when that costs less than a cold start (`_spans_of`): they
hold memory, not CPU, for `parked_cost` a replica-hour. A window ends when the run is
reported finished, never at a predicted end while the run is open (kedacore/keda#6057); a
fire with no reported run keeps its capacity for the task's expected duration, then goes
down (a skipped run costs one expected duration). When capacity that goes down would come
back within the scale-down window (one run ends, the next one's pre-warm is due a few
minutes later), it is kept instead: a stop and a restart that close cost more in start-ups
and risk than the idle minutes, and would flap. For the same reason a group never goes down
within the scale-down window after it went up (a short run, or one task's pre-warm just
before another task's run ends); a lowered maxReplicas still applies at once. A run no cron
announced (an extra run, started by hand) is served at once, even when its group went down
less than the window ago, which counts as a flap: holding it back until the window is over
only moved its cold start or resume later (the shop benchmark week's extra runs waited 38 s
at p50 instead of 0.1 s, up to 500 s), and holding every finished run's capacity for the
window cost 4-6 % more replica-hours and still left 41 of the shop week's 44 (5 of the ETL
week's 13), since they land at random moments (README, the scaler).

*Reactive* is the Kubernetes HPA rule on each signal known: in-flight requests per ready
instance, CPU and memory per instance, the app's own saturation gauge: ceil(ready x metric /
target) outside the tolerance, the current count inside it, the highest of the signals
(named in the reason); scale-up at once, scale-down to the highest recommendation of the last
`scale_down_window_s`. Recommendations made before the group's last run ended are dropped:
they measured traffic that is known to be over, and keeping them would hold a finished
run's capacity for another window.

Managed groups are the non-default hop groups of chains that ScheduledTasks drive. Default
groups serve online traffic and are sized by whoever runs the online service, not by this
scaler.

State: only the reactive stabilisation windows, the last decision per group and when each
group last went up. All are lost when another control plane replica becomes leader: its
first `decide` returns every managed group (the actuators are idempotent), metric-driven
headroom may go down up to one stabilisation window early, and the first changes may
include one flap per group. Everything predictive is recomputed from rules, run history
(etcd) and measured start durations each time.

A caller that knows what changed since its previous call (the simulator, asking ~20,000
times a simulated day at 500 tasks) passes `Changes`: then each task's windows and lead are
kept while they hold, and only the groups whose inputs changed or whose count may change
by time alone are decided again, to the same decisions (tests/unit/test_simulate_changes.py
replays both ways). A rule whose outcome changes with time alone must add that moment to
`_schedule`, or the two ways part.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
import statistics
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from controlplane.model.group import GroupKey
from controlplane.model.rules import Group, RuleSet
from controlplane.model.run import Run
from controlplane.scaler.profile import (
    NEVER_FINISHED,
    History,
    TaskWindows,
    Window,
    extra_runs,
    group_tasks,
    hop_groups,
    managed_groups,
    runs_by_task,
    task_windows,
)

_EPSILON = 1e-9
_DAY_S = 86400.0


@dataclass(frozen=True)
class Observation:
    """What the actuator and telemetry see of a group now. `in_flight` is the mean number
    of in-flight requests per ready instance, `cpu` and `memory` the mean use per ready
    instance as a fraction of its request, `saturation` the mean of the app's own saturation
    gauge (e.g. its thread pool's busy ratio, 0-1); None when unknown. Parked (keep-alive)
    instances serve nothing and count as neither ready nor starting."""

    service: str
    group: str
    ready: int
    starting: int
    parked: int = 0
    in_flight: float | None = None
    cpu: float | None = None
    memory: float | None = None
    saturation: float | None = None


@dataclass(frozen=True)
class Decision:
    """The desired count of a group from `at` (epoch s) on, with the reason people read."""

    service: str
    group: str
    replicas: int
    reason: str
    at: float


@dataclass(frozen=True)
class Changes:
    """What changed since the previous `decide`, from a caller that tracks it (the
    simulator): anything not named is as it was. Given these, `decide` recomputes only the
    groups they touch and those whose decision may change with time alone (`_schedule`):
    asking about all 200 groups of 500 tasks every period and at every run report made a
    30-day simulation take hours. Without them (the live scaler) everything is recomputed.
    Either way the caller asks every period: a group's reactive window holds its latest
    recommendation as of the previous call (`_catch_up`)."""

    tasks: frozenset[str] = frozenset()  # runs reported started or finished
    observed: frozenset[GroupKey] = frozenset()  # observations changed
    measured: frozenset[GroupKey] = frozenset()  # measured start-to-ready durations changed


@dataclass
class PolicyConfig:
    """The knobs; the defaults are the Kubernetes HPA's where one exists."""

    sync_period_s: float = 15
    tolerance: float = 0.1
    scale_down_window_s: float = 300
    drain_s: float = 30
    target_in_flight: float = 8.0
    default_lead_s: float = 30  # before a group's first measured start
    # Chance that a task's whole chain is ready at its fire. The issue asked for p95; on the
    # synthetic week (bench/scaler.py) p95 left 1.9 % of fires short, p99 0.3 % for +1 % of
    # replica-hours, so p99 it is.
    lead_percentile: float = 99
    # With parking, instances started a chain lead early wait parked (at `parked_cost`) for
    # the resume, so a longer lead costs little: on the three benchmark weeks p99.9 against
    # p99 cost 0.3-1 % more replica-hours and took the bank week's fires not short from
    # 99.4 % to 99.7 %.
    parked_percentile: float = 99.9
    target_cpu: float = 0.7
    target_memory: float = 0.8
    target_saturation: float = 0.8
    # A group keeps a parked (keep-alive) pool when its tasks had at least this many extra
    # runs a day in their history: no cron announces those runs, a resume takes ~0.1 s
    # where a start takes minutes, and a parked instance holds memory but no CPU.
    park_min_extra_per_day: float = 1.0
    # Capacity needed again within the scale-down window plus this is kept: a pre-warm's
    # start moves by tens of seconds as new start-ups are measured (2-5 minute JVM starts).
    keep_margin_s: float = 60
    # Seconds a parked (keep-alive) instance takes to serve again, with a margin (the local
    # actuator's resume: p95 96 ms, bench/resume.py); None when the actuator cannot park
    # (Kubernetes' scale subresource), so that no run waits on a resume that never comes.
    resume_s: float | None = 1.0
    # What an hour parked costs against an hour running: memory held, no CPU. A run's
    # instances are parked until the task's next fire when that costs less than a cold
    # start's lead (`_resumes`), for at most `park_max_s`.
    parked_cost: float = 0.25
    park_max_s: float = 3600

    @property
    def hold_s(self) -> float:
        """Capacity needed again within this is kept rather than stopped and restarted."""
        return self.scale_down_window_s + self.sync_period_s + self.keep_margin_s

    @property
    def resume_lead_s(self) -> float | None:
        """A parked instance's lead before a window: a decision is up to a period late."""
        return None if self.resume_s is None else self.sync_period_s + self.resume_s

    def park_reach(self, lead_bound: float) -> float:
        """The longest gap `_resumes` may park through, with leads up to `lead_bound`."""
        if self.resume_s is None:
            return 0.0
        costly = lead_bound / self.parked_cost if self.parked_cost > 0 else math.inf
        return min(max(self.hold_s + lead_bound, costly), self.park_max_s)


def hpa_recommendation(
    ready: int, current: int, usage: float, target: float, tolerance: float
) -> int:
    """The HPA rule: `current` while usage/target is within the tolerance of 1, else
    ceil(ready x usage / target)."""
    ratio = usage / target
    if abs(ratio - 1) <= tolerance:
        return current
    return math.ceil(ready * ratio - _EPSILON)


def chain_lead(
    start_durations: Mapping[GroupKey, Sequence[float]],
    starts: Mapping[GroupKey, int],
    config: PolicyConfig,
) -> float:
    """Seconds before a fire to start `starts[g]` instances on each group g so that all of
    them are ready in time with probability `lead_percentile` % (`parked_percentile` % when
    they wait parked for the resume), plus one sync period.

    A per-instance p95 would be too short: nine instances each ready in time with 95 % are
    all ready with 63 %. So the lead is the x with prod F_g(x)^starts[g] = percentile, where
    F_g is the distribution of group g's measured start-to-ready durations: the smaller of
    their empirical distribution and a log-normal fitted to them (from `MIN_FIT_SAMPLES`
    on). The empirical one alone would promise that nothing is slower than the slowest
    start seen so far, which after a few starts is plainly wrong; the fit continues the
    tail. A group without measurements contributes `default_lead_s`.
    """
    measured = tuple(
        (count, tuple(start_durations[key]))
        for key, count in sorted(starts.items())
        if count > 0 and start_durations.get(key)
    )
    unmeasured = any(count > 0 and not start_durations.get(key) for key, count in starts.items())
    lead = 0.0
    if measured:
        goal = config.lead_percentile if config.resume_s is None else config.parked_percentile
        lead = _ready_by(measured, goal / 100) + config.sync_period_s
    return max(lead, config.default_lead_s) if unmeasured else lead


MIN_FIT_SAMPLES = 3
_LEAD_PRECISION_S = 0.5
_MAX_DOUBLINGS = 10


@lru_cache(maxsize=2048)
def _ready_by(measured: tuple[tuple[int, tuple[float, ...]], ...], goal: float) -> float:
    """The x at which all the instances are ready with probability `goal`. Cached: the
    measurements change only when an instance becomes ready, the policy asks every period,
    and hundreds of tasks each have their own hops and counts."""
    models = [(_start_model(values), count) for count, values in measured]

    def chance(x: float) -> float:
        result = 1.0
        log_x = math.log(x) if x > 0 else 0.0
        for model, count in models:
            result *= model.cdf(x, log_x) ** count
        return result

    low, high = 0.0, max(_LEAD_PRECISION_S, *(model.values[-1] for model, _ in models))
    for _ in range(_MAX_DOUBLINGS):  # a fitted tail never reaches 100 %: stop somewhere
        if chance(high) >= goal - _EPSILON:
            break
        low, high = high, high * 2
    while high - low > _LEAD_PRECISION_S:
        middle = (low + high) / 2
        if chance(middle) >= goal - _EPSILON:
            high = middle
        else:
            low = middle
    return high


@lru_cache(maxsize=1024)
def _start_model(values: tuple[float, ...]) -> _StartModel:
    """One model per group's measurements, shared by every task with a hop there."""
    return _StartModel(values)


class _StartModel:
    """Start-to-ready durations of one group: empirical, with a log-normal tail."""

    def __init__(self, values: tuple[float, ...]) -> None:
        self.values = sorted(values)
        logs = [math.log(max(value, 1e-3)) for value in self.values]
        self.mu = statistics.fmean(logs)
        spread = _stdev(logs) if len(logs) >= MIN_FIT_SAMPLES else 0.0
        self.sigma = spread if spread > 0 else None
        self.scale = 0.0 if self.sigma is None else self.sigma * math.sqrt(2)

    def cdf(self, x: float, log_x: float) -> float:
        """At `x`, whose log (`log_x`) the caller takes once for all the chain's groups."""
        empirical = bisect.bisect_right(self.values, x) / len(self.values)
        if self.sigma is None or x <= 0:
            return empirical
        fitted = 0.5 * math.erfc(-(log_x - self.mu) / self.scale)
        return min(empirical, fitted)


def _stdev(logs: Sequence[float]) -> float:
    """`statistics.stdev` of the logs of durations, to the same bit, ~10x faster: it sums
    exact Fractions, and a simulated day builds ~30,000 start models. Here every value is
    scaled by one power of two to an exact integer (the smallest one's last bit becomes 1;
    logs are far from overflowing), the sums are exact integers, and the square root of
    their ratio is correctly rounded as the standard library does (its `_float_sqrt_of_frac`,
    https://bugs.python.org/msg407078: round-to-odd with spare bits, then to float)."""
    count = len(logs)
    smallest = min((abs(value) for value in logs if value), default=1.0)
    shift = _MANTISSA_BITS - math.frexp(smallest)[1]
    scale = 2.0**shift
    scaled = [int(value * scale) for value in logs]
    total = sum(scaled)
    numerator = count * sum(map(operator.mul, scaled, scaled)) - total * total
    denominator = count * (count - 1) << 2 * shift
    spare = (numerator.bit_length() - denominator.bit_length() - 2 * _MANTISSA_BITS - 3) // 2
    if spare >= 0:
        return float(_isqrt_odd(numerator, denominator << 2 * spare) << spare)
    return _isqrt_odd(numerator << -2 * spare, denominator) / (1 << -spare)


_MANTISSA_BITS = sys.float_info.mant_dig


def _isqrt_odd(numerator: int, denominator: int) -> int:
    """The square root of numerator/denominator as an integer, rounded to odd."""
    root = math.isqrt(numerator // denominator)
    return root | (root * root * denominator != numerator)


@dataclass(frozen=True)
class _Span:
    """A window shifted by its task's lead and the drain: when the policy wants it up.
    `parked`: when the task's previous run's instances were parked to serve this window
    (they resume at `start`, a resume's lead before the window), None for a cold start."""

    start: float
    end: float
    window: Window
    parked: float | None = None


@dataclass(frozen=True)
class _Seen:
    """One task's windows as last computed, and their spans per group by its lead then."""

    windows: TaskWindows
    lead: float | None  # None without windows
    spans: dict[GroupKey, list[_Span]]


class Policy:
    """Decides the desired count of every managed group each sync period."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self._metrics: dict[GroupKey, deque[tuple[float, int, str]]] = {}
        self._last: dict[GroupKey, Decision] = {}
        self._raised: dict[GroupKey, float] = {}  # when each group last went up
        self._pools: dict[GroupKey, int] = {}  # for extra runs
        self._parking: dict[GroupKey, int] = {}  # for the next run of a task (`_resumes`)
        # What `Changes` lets the next decision reuse: the rules and the reach the cached
        # windows were computed for, each task's windows and lead, each group's longest
        # measured start, the tasks with a habit of extra runs, when each group may decide
        # otherwise (a heap with stale entries skipped), when each group was last decided
        # and when the policy was last asked.
        self._rules: RuleSet | None = None
        self._reach = (math.nan, math.nan)
        self._seen: dict[str, _Seen] = {}
        self._leads: dict[str, float] = {}
        self._heard: dict[GroupKey, tuple[float | None, ...] | None] = {}  # `_signals`
        self._longest: dict[GroupKey, float] = {}
        self._habits: dict[str, tuple[int, float]] = {}
        self._wakes: dict[GroupKey, float] = {}
        self._queue: list[tuple[float, GroupKey]] = []
        self._decided: dict[GroupKey, float] = {}
        self._asked = -math.inf

    @property
    def pools(self) -> dict[GroupKey, int]:
        """How many instances each managed group should keep parked (keep-alive) rather
        than stop, as of the latest decision: for extra runs, and for the next runs of tasks
        whose instances wait parked for them (`_resumes`); 0 for most groups."""
        parking = self._parking
        return {key: count + parking.get(key, 0) for key, count in self._pools.items()}

    @property
    def desired(self) -> dict[GroupKey, Decision]:
        """The latest decision of every managed group, for callers that reconcile each
        period rather than act on changes."""
        return dict(self._last)

    def decide(
        self,
        now: float,
        rules: RuleSet,
        history: History,
        observations: Mapping[GroupKey, Observation],
        start_durations: Mapping[GroupKey, Sequence[float]],
        changes: Changes | None = None,
    ) -> list[Decision]:
        """Decisions for the groups whose desired count changed since the previous call
        (every managed group on the first call), ordered by group.

        `history`: each task's open runs and recent finished ones (at least its last
        `profile.HISTORY_RUNS`), all in one sequence or per task. `start_durations`: recent
        measured start-to-ready seconds per group (a few dozen to a hundred each). A group
        that stopped being managed gets one last decision: its minimum, or 0 when the group
        is gone. `changes`: see `Changes`; the decisions are the same with or without.
        """
        config = self.config
        groups = managed_groups(rules)
        runs_of = runs_by_task(history)
        full = changes is None or rules is not self._rules
        known = None if full else changes
        self._pools = self._keep_alive(rules, runs_of, now, known)
        hold = config.hold_s
        reach = _reach(self._lead_bound(start_durations, known), config)
        due = self._due(now, rules, groups, reach, known, observations, start_durations)
        spans = self._spans(rules, due, runs_of, now, reach, start_durations)
        decisions: list[Decision] = []
        for key, bounds in due.items():
            group_spans = spans.get(key, [])
            predictive, soon, coming = _predictive(group_spans, now, hold)
            ended = max((span.end for span in group_spans if span.end <= now), default=-math.inf)
            reactive, metric_reason = self._reactive(key, now, observations.get(key), ended)
            wanted = max(predictive, reactive)
            previous = self._last.get(key)
            kept = False
            if previous is not None and wanted < previous.replicas:
                if now - self._raised.get(key, -math.inf) < config.scale_down_window_s:
                    wanted = previous.replicas  # down this soon after up would be a flap
                elif min(previous.replicas, soon) > wanted:
                    wanted, kept = min(previous.replicas, soon), True
            replicas = min(max(wanted, bounds.min_replicas), bounds.max_replicas)
            parked, waiting = _parked(group_spans, now, replicas - max(predictive, reactive))
            self._parking[key] = parked
            if previous is not None and previous.replicas == replicas:
                continue
            if previous is not None and replicas > previous.replicas:
                self._raised[key] = now
            if kept and coming is not None:
                reason = f"keep for task {coming.window.task}: due within {hold:g}s"
            elif reactive > predictive:
                reason = metric_reason
            else:
                going_down = previous is not None and replicas < previous.replicas
                reason = _explain(rules, group_spans, now, going_down, config.drain_s)
                if going_down and waiting is not None:
                    when = _local(rules, waiting.window.task, waiting.window.start)
                    reason += f"; {parked} parked for task {waiting.window.task} ({when})"
            if wanted > bounds.max_replicas:
                reason = f"bound: max {bounds.max_replicas} ({reason})"
            elif wanted < bounds.min_replicas:
                reason = f"bound: min {bounds.min_replicas}"
            decision = Decision(key[0], key[1], replicas, reason, now)
            self._last[key] = decision
            decisions.append(decision)
        self._schedule(now, rules, due, spans)
        self._asked = now
        for key in [key for key in self._last if key not in groups] if full else ():
            service = rules.services.get(key[0])
            bounds = service.group(key[1]) if service is not None else None
            replicas = bounds.min_replicas if bounds is not None else 0
            reason = "no scheduled task uses this group any more"
            decisions.append(Decision(key[0], key[1], replicas, reason, now))
            del self._last[key]
            self._metrics.pop(key, None)
            self._raised.pop(key, None)
            self._parking.pop(key, None)
        return decisions

    def _keep_alive(
        self,
        rules: RuleSet,
        runs_of: Mapping[str, Sequence[Run]],
        now: float,
        changes: Changes | None,
    ) -> dict[GroupKey, int]:
        """`_pools_of`, from the extra-run habits, renewed for the tasks whose runs changed."""
        if changes is None:
            self._habits.clear()
        for name in runs_of if changes is None else changes.tasks:
            habit = extra_habit(rules, name, runs_of.get(name, ()))
            if habit is None:
                self._habits.pop(name, None)
            else:
                self._habits[name] = habit
        config = self.config
        least = math.inf if config.resume_s is None else config.park_min_extra_per_day
        return _pools_of(rules, self._habits, now, least)  # none when nothing can be parked

    def _lead_bound(
        self, start_durations: Mapping[GroupKey, Sequence[float]], changes: Changes | None
    ) -> float:
        """`_lead_bound` from each group's longest start, kept for the unchanged groups."""
        if changes is None:
            self._longest.clear()
        for key in start_durations if changes is None else changes.measured:
            values = start_durations.get(key)
            if values:
                self._longest[key] = max(values)
            else:
                self._longest.pop(key, None)
        return _lead_bound(self._longest.values(), self.config)

    def _due(
        self,
        now: float,
        rules: RuleSet,
        groups: dict[GroupKey, Group],
        reach: tuple[float, float],
        changes: Changes | None,
        observations: Mapping[GroupKey, Observation],
        start_durations: Mapping[GroupKey, Sequence[float]],
    ) -> dict[GroupKey, Group]:
        """The groups to decide now, by group: every one without `changes` or when the rules
        or the windows' reach changed (nothing cached is reused then); else those whose
        tasks' runs or leads changed, whose observation changed in what `_reactive` reads,
        and those due by time (`_schedule`)."""
        if changes is None or reach != self._reach:
            self._rules, self._reach = rules, reach
            self._seen.clear()
            self._leads.clear()
            self._wakes.clear()
            self._queue.clear()
            due = groups
        else:
            due = self._touched(now, rules, groups, changes, observations, start_durations)
        for key in due:
            self._catch_up(key)
            self._heard[key] = _signals(observations.get(key))
        return due

    def _touched(
        self,
        now: float,
        rules: RuleSet,
        groups: dict[GroupKey, Group],
        changes: Changes,
        observations: Mapping[GroupKey, Observation],
        start_durations: Mapping[GroupKey, Sequence[float]],
    ) -> dict[GroupKey, Group]:
        """`_due` from `changes`. A measured start changes the leads of the tasks with a hop
        there, and a lead moves the start of the task's spans. Spans that started before now
        did so whatever the lead: they are widened anew when next used. Those of windows that
        start later start sooner or later: their groups are decided now if one of them starts
        by now either way, else when the first of them starts (`_schedule` says why nothing
        else they change can change a count)."""
        hops = hop_groups(rules)
        keys = {
            key
            for key in changes.observed
            if _signals(observations.get(key)) != self._heard.get(key)
        }
        touched = set(changes.tasks)
        for name in touched:
            self._seen.pop(name, None)
        leading = {name for key in changes.measured for name in group_tasks(rules).get(key, ())}
        for name in leading:
            self._leads.pop(name, None)
            seen = self._seen.get(name)
            if seen is None or seen.lead is None:
                continue
            if now >= seen.windows.until:  # the windows are due anew: so are their groups
                touched.add(name)
            elif any(window.start > now for window in seen.windows.windows):
                moved = self._respan(rules, name, seen, start_durations)
                if moved.lead != seen.lead:
                    keys.update(self._moved(now, seen, moved))
        for name in touched:
            keys.update((service, group) for service, group, _ in hops.get(name, ()))
        queue = self._queue
        while queue and queue[0][0] <= now:
            wake, key = heapq.heappop(queue)
            if self._wakes.get(key) == wake:
                keys.add(key)
        return {key: groups[key] for key in sorted(keys) if key in groups}

    def _moved(self, now: float, seen: _Seen, moved: _Seen) -> set[GroupKey]:
        """The groups of a task whose lead changed that must be decided now: those where a
        span of a later window starts, or its instances begin to wait parked, by now by one
        lead and not by the other. The others are woken at the first such moment, by either
        lead."""
        due: set[GroupKey] = set()
        for key, spans in moved.spans.items():
            first = math.inf
            for before, after in zip(seen.spans[key], spans, strict=True):
                if after.window.start <= now:
                    continue
                for was, moment in zip(_moments(before), _moments(after), strict=True):
                    if (was <= now) != (moment <= now):
                        due.add(key)
                    first = min((first, *(m for m in (was, moment) if m > now)))
            if key not in due and first < self._wakes.get(key, math.inf):
                self._wakes[key] = first
                heapq.heappush(self._queue, (first, key))
        return due

    def _catch_up(self, key: GroupKey) -> None:
        """Asked every time, a group whose observation did not change would have made the
        same recommendation again at each call: its window holds it as of the previous
        call, which decides when it expires once the observation changes."""
        recommendations = self._metrics.get(key)
        if recommendations and recommendations[-1][0] == self._decided.get(key):
            _, count, text = recommendations.pop()
            recommendations.append((self._asked, count, text))

    def _spans(
        self,
        rules: RuleSet,
        due: Mapping[GroupKey, Group],
        runs_of: Mapping[str, Sequence[Run]],
        now: float,
        reach: tuple[float, float],
        start_durations: Mapping[GroupKey, Sequence[float]],
    ) -> dict[GroupKey, list[_Span]]:
        """The windows of each due group widened by their task's chain lead and the drain,
        in `profile.windows`' order. A task's are reused while `TaskWindows` says they hold,
        but for those that left the reach since."""
        start, end = now - reach[0] - self.config.drain_s, now + reach[1]
        tasks_of = group_tasks(rules)
        spans: dict[GroupKey, list[_Span]] = {}
        for key in due:
            found: list[_Span] = []
            for name in tasks_of.get(key, ()):
                seen = self._seen.get(name)
                if seen is None or seen.windows.grows or now >= seen.windows.until:
                    seen = self._task(rules, name, runs_of, now, start, end, start_durations)
                elif seen.lead is not None and seen.lead != self._leads.get(name):
                    seen = self._respan(rules, name, seen, start_durations)
                found.extend(span for span in seen.spans.get(key, ()) if span.window.end > start)
            found.sort(key=lambda span: (span.window.start, span.window.task))
            spans[key] = found
        return spans

    def _task(
        self,
        rules: RuleSet,
        name: str,
        runs_of: Mapping[str, Sequence[Run]],
        now: float,
        start: float,
        end: float,
        start_durations: Mapping[GroupKey, Sequence[float]],
    ) -> _Seen:
        """One task's windows over [start, end) and their spans, computed afresh."""
        found = task_windows(rules, name, runs_of.get(name, ()), start, end, now)
        lead = self._lead(rules, name, start_durations) if found.windows else None
        spans = _spans_of(found, lead, self.config, self._reach[0])
        seen = self._seen[name] = _Seen(found, lead, spans)
        return seen

    def _respan(
        self,
        rules: RuleSet,
        name: str,
        seen: _Seen,
        start_durations: Mapping[GroupKey, Sequence[float]],
    ) -> _Seen:
        """The task's spans widened by its lead as of now."""
        lead = self._lead(rules, name, start_durations)
        spans = _spans_of(seen.windows, lead, self.config, self._reach[0])
        seen = self._seen[name] = _Seen(seen.windows, lead, spans)
        return seen

    def _lead(
        self, rules: RuleSet, name: str, start_durations: Mapping[GroupKey, Sequence[float]]
    ) -> float:
        """The task's `chain_lead`, kept until a start is measured on one of its groups."""
        lead = self._leads.get(name)
        if lead is None:
            hops = hop_groups(rules)[name]
            starts = {(service, group): count for service, group, count in hops}
            lead = self._leads[name] = chain_lead(start_durations, starts, self.config)
        return lead

    def _schedule(
        self,
        now: float,
        rules: RuleSet,
        due: Mapping[GroupKey, Group],
        spans: Mapping[GroupKey, list[_Span]],
    ) -> None:
        """When each group just decided may first decide otherwise with no new input: a span
        starts or ends, or its window ends (a drain begins); an open run's window changes
        (`TaskWindows.until`); a window enters the reach; the hold after a scale-up ends;
        the reactive window's highest recommendation expires (unless it is the one made now,
        which each period would make again).

        Nothing else can change a count by itself. Windows that leave the reach ended a
        scale-down window ago. A span coming within `hold` only raises `soon`, which counts
        only while the wanted count is below the previous one: then the previous count is
        kept (now, as `soon` was at least that) or bound by minReplicas, either way the
        same count; a kept count is let go when a span ends or the hold ends, both woken.

        The windows change only *after* `enters` and from `until` on, when they are built
        anew: one of those equal to now (a fire exactly at the reach's open end) wakes the
        group at the next call."""
        window_s = self.config.scale_down_window_s
        tasks_of = group_tasks(rules)
        for key in due:
            moments = [self._raised.get(key, -math.inf) + window_s]
            recommendations = self._metrics.get(key)
            if recommendations and (len(recommendations) > 1 or recommendations[0][0] < now):
                moments.append(recommendations[0][0] + window_s)
            rebuilt = [self._seen[name].windows.enters for name in tasks_of.get(key, ())]
            for span in spans[key]:
                window = span.window
                moments.append(span.start)
                if span.parked is not None:  # its instances begin to wait parked
                    moments.append(span.parked)
                if window.open:
                    rebuilt.append(self._seen[window.task].windows.until)
                else:
                    moments += (span.end, window.end)
            wake = min(
                min((moment for moment in moments if moment > now), default=math.inf),
                min((moment for moment in rebuilt if moment >= now), default=math.inf),
            )
            self._wakes[key] = wake
            self._decided[key] = now
            if wake < math.inf:
                heapq.heappush(self._queue, (wake, key))

    def _reactive(
        self, key: GroupKey, now: float, observation: Observation | None, since: float
    ) -> tuple[int, str]:
        """The stabilised HPA recommendation and its reason; 0 without metrics."""
        config = self.config
        recommendations = self._metrics.setdefault(key, deque())
        if observation is not None and observation.ready > 0:
            options: list[tuple[int, str]] = []
            metrics = (
                ("in-flight", observation.in_flight, config.target_in_flight, "{:.1f}"),
                ("cpu", observation.cpu, config.target_cpu, "{:.2f}"),
                ("memory", observation.memory, config.target_memory, "{:.2f}"),
                ("saturation", observation.saturation, config.target_saturation, "{:.2f}"),
            )
            for name, usage, target, shown in metrics:
                if usage is None or not math.isfinite(usage):  # not known: drives nothing
                    continue
                count = hpa_recommendation(
                    observation.ready, observation.ready, usage, target, config.tolerance
                )
                relation = ">" if usage > target else "<" if usage < target else "="
                text = f"metric: {name} {shown.format(usage)} {relation} target {target:g}"
                options.append((count, text))
            if options:
                count, text = max(options)
                # a recommendation no higher than this newer one can never be the window's
                # highest again: dropped, so the window's front is always its highest
                while recommendations and (recommendations[-1][1], recommendations[-1][0]) < (
                    count,
                    now,
                ):
                    recommendations.pop()
                recommendations.append((now, count, text))
        cutoff = max(now - config.scale_down_window_s, since)
        while recommendations and recommendations[0][0] < cutoff:
            recommendations.popleft()
        if not recommendations:
            return 0, ""
        at, count, text = recommendations[0]
        if at < now:
            text += f", held for the {config.scale_down_window_s:g}s scale-down window"
        return count, text


def _spans_of(
    found: TaskWindows, lead: float | None, config: PolicyConfig, longest: float
) -> dict[GroupKey, list[_Span]]:
    """A task's windows widened by the lead and the drain, per group, in the windows' order.

    Without parking (`resume_s` None) a window's span starts a chain lead before it. With
    parking it starts a resume's lead before it (`resume_lead_s`), and its instances wait
    parked until then: started cold a chain lead before it and parked once ready (they cost
    `parked_cost` while they wait, where running they would cost a whole replica), or, when
    the task's previous run ends in time, that run's own instances (`_parks_through`), if it
    ended at most `longest` before they resume: the reach's past, so that it stays among
    the windows while its instances wait (a chain lead may exceed `_lead_bound`, which
    knows only the longest start seen, not the fitted tail)."""
    drain, resume = config.drain_s, config.resume_lead_s
    if lead is None:  # no windows
        return {}
    by_group: dict[GroupKey, list[Window]] = {}
    for window in found.windows:
        by_group.setdefault((window.service, window.group), []).append(window)
    spans: dict[GroupKey, list[_Span]] = {}
    for key, windows in by_group.items():
        moments: dict[int, tuple[float, float | None]] = {}
        last: Window | None = None  # the earlier window that ends last
        busy = False  # an earlier window is open: its end is not known
        for index in sorted(range(len(windows)), key=lambda i: windows[i].start):
            window = windows[index]
            cold = window.start - lead
            if resume is None:
                moments[index] = (cold, None)
            elif (
                last is not None
                and not busy
                and _parks_through(window, last, lead, config, longest)
            ):
                moments[index] = (window.start - resume, last.end + drain)
            else:
                moments[index] = (window.start - resume, cold)
            if last is None or window.end > last.end:
                last = window
            busy = busy or window.open
        spans[key] = [
            _Span(moments[index][0], window.end + drain, window, moments[index][1])
            for index, window in enumerate(windows)
        ]
    return spans


def _parks_through(
    window: Window, previous: Window, lead: float, config: PolicyConfig, longest: float
) -> bool:
    """Whether the instances of the task's previous run serve `window` (kept through the gap,
    or parked for it) instead of new ones started cold a chain lead before it. They must be
    free by the resume. A gap within the hold is kept anyway; a longer one is parked when
    that costs less than the lead (`parked_cost` x the gap against a cold start's running
    time, which the lead bounds); none longer than `longest`. A previous run that has not
    finished may overrun: it is relied on only if its overrun shows (its window reaching
    past its expected end) before a cold start would have to begin."""
    gap = window.start - (config.resume_lead_s or 0.0) - previous.end - config.drain_s
    if not 0 <= gap <= longest:
        return False
    finished = previous.run is not None and not previous.open
    if not finished and window.start - lead < previous.end:
        return False
    return gap <= config.hold_s or config.parked_cost * gap < lead


def _moments(span: _Span) -> tuple[float, float]:
    """When a span's instances begin to wait parked (never: inf) and to serve."""
    return (math.inf if span.parked is None else span.parked, span.start)


def _signals(observation: Observation | None) -> tuple[float | None, ...] | None:
    """What `Policy._reactive` reads of an observation."""
    if observation is None:
        return None
    return (
        observation.ready,
        observation.in_flight,
        observation.cpu,
        observation.memory,
        observation.saturation,
    )


MIN_EXTRA_RUNS = 3


def extra_habit(rules: RuleSet, name: str, runs: Sequence[Run]) -> tuple[int, float] | None:
    """(extra runs, first start) of a task's runs with at least `MIN_EXTRA_RUNS` extra
    runs; None for other tasks, which keep nothing parked."""
    task = rules.tasks.get(name)
    extra = extra_runs(task, runs) if task is not None else ()
    if len(extra) < MIN_EXTRA_RUNS:
        return None
    return len(extra), min(run.started_at for run in runs)


def _pools_of(
    rules: RuleSet, habits: Mapping[str, tuple[int, float]], now: float, min_per_day: float
) -> dict[GroupKey, int]:
    """Per managed group, the instances to keep parked for extra runs: the most replicas
    one extra run needs there, of the tasks (their `extra_habit`s) that had at least
    `min_per_day` extra runs a day over their history (at least a day of it) and at least
    `MIN_EXTRA_RUNS` of them: one or two extra runs are no habit, and a task that is run by
    hand once a month does not keep its capacity parked all month. Other groups get 0."""
    pools = dict.fromkeys(managed_groups(rules), 0)
    hops = hop_groups(rules)
    for name, (count, first) in habits.items():
        days = max(1.0, (now - first) / _DAY_S)
        if count / days < min_per_day - _EPSILON:
            continue
        for service, group, replicas in hops[name]:
            pools[service, group] = max(pools[service, group], replicas)
    return pools


def _lead_bound(longest: Iterable[float], config: PolicyConfig) -> float:
    """No chain lead is longer than this, so windows beyond it cannot matter yet. `longest`:
    each group's longest measured start."""
    return max(config.default_lead_s, max(longest, default=0.0) + config.sync_period_s)


def _reach(lead_bound: float, config: PolicyConfig) -> tuple[float, float]:
    """Seconds before and after now that the windows are taken from: back to those whose
    drain ended a hold ago, or whose instances may still wait parked for a later window
    (`_resumes`), on to the latest a chain lead or a parked gap can reach."""
    hold, parked = config.hold_s, config.park_reach(lead_bound)
    return max(hold, parked), max(hold + lead_bound, parked + (config.resume_lead_s or 0.0))


def _parked(spans: list[_Span], now: float, idle: int) -> tuple[int, _Span | None]:
    """(instances the group keeps parked for the tasks' next runs, the first span they wait
    for): those of the spans whose previous run's instances wait parked now, less the ones
    `idle` (running, needed by nothing now) that will serve them anyway."""
    waiting = [
        span for span in spans if span.parked is not None and span.parked <= now < span.start
    ]
    count = sum(span.window.replicas for span in waiting) - max(0, idle)
    if count <= 0:
        return 0, None
    return count, min(waiting, key=lambda span: span.start)


def _predictive(spans: list[_Span], now: float, hold: float) -> tuple[int, int, _Span | None]:
    """(replicas the spans need now, the most they need at once within the next `hold`, the
    first span starting within it). Open runs count as lasting: their end is unknown."""
    level = _need(spans, now, lasting=False)
    upcoming = [span for span in spans if now < span.start <= now + hold]
    if not upcoming:
        return level, level, None
    soon = max(_need(spans, moment, lasting=True) for moment in {span.start for span in upcoming})
    return level, max(level, soon), min(upcoming, key=lambda span: span.start)


def _need(spans: list[_Span], moment: float, lasting: bool) -> int:
    """Replicas the spans need at `moment` (open runs never end when `lasting`). Tasks add
    up; within a task, a run's drain is served by the instances of the task's other spans
    (the next run's pre-warm, an overrun), so it adds nothing when one of those is active:
    the same instances stay, they are not started twice. A drain served so when its run
    ended stays served when that other span ends (`_served_at_end`)."""
    running: dict[str, int] = {}
    draining: dict[str, int] = {}
    for span in spans:
        window = span.window
        if span.start > moment or not (moment < span.end or (lasting and window.open)):
            continue
        drained = not window.open and window.end <= moment
        if drained and _served_at_end(spans, span):
            continue
        into = draining if drained else running
        into[window.task] = into.get(window.task, 0) + window.replicas
    return sum(running.values()) + sum(
        count for task, count in draining.items() if task not in running
    )


def _served_at_end(spans: list[_Span], drained: _Span) -> bool:
    """Whether another span of the drained run's task was up when the run ended (a run of
    the task open beside it, e.g. one started by hand, or the next fire's pre-warm): those
    instances served the drain. Counting it again once that span ended too let the group go
    down between the two ends and straight back up, a flap."""
    window = drained.window
    return any(
        other is not drained
        and other.window.task == window.task
        and other.start <= window.end
        and (other.window.open or window.end < other.window.end)
        for other in spans
    )


def _explain(
    rules: RuleSet,
    spans: list[_Span],
    now: float,
    going_down: bool,
    drain: float,
) -> str:
    """Why the predictive count is what it is, naming the run or fire behind a change."""
    if going_down:
        ended = max((span for span in spans if span.end <= now), key=lambda s: s.end, default=None)
        if ended is not None:
            return _ended(ended.window, drain)
    active = [span for span in spans if span.start <= now < span.end]
    if not active:
        return "idle: no run open or due"
    newest = max(active, key=lambda span: span.start)
    others = len({span.window.task for span in active} - {newest.window.task})
    suffix = f" (+{others} more task{'s' if others > 1 else ''})" if others else ""
    return _active(rules, newest, now) + suffix


def _ended(window: Window, drain: float) -> str:
    if window.stuck:
        return (
            f"run {window.task}/{window.run} still open after {NEVER_FINISHED} x the task's "
            "expected duration: no longer held (its finish was never reported?)"
        )
    if window.run is None:
        return (
            f"task {window.task}: no run reported by its expected end; down after drain {drain:g}s"
        )
    return f"run {window.task}/{window.run} finished + drain {drain:g}s"


def _active(rules: RuleSet, span: _Span, now: float) -> str:
    window = span.window
    if window.open:
        return f"run {window.task}/{window.run} open"
    if window.stuck:
        return _ended(window, 0)
    if window.run is not None:
        return f"run {window.task}/{window.run} finished, draining"
    when = _local(rules, window.task, window.start)
    if window.start > now:
        done = "resume parked" if span.parked is not None else "pre-warm"
        return f"{done} for task {window.task} (fires {when})"
    return f"task {window.task} fired {when}, no run reported yet"


def _local(rules: RuleSet, task: str, moment: float) -> str:
    """'02:00 Asia/Shanghai': the fire as the task's author wrote it."""
    zone = rules.tasks[task].timezone
    return f"{datetime.fromtimestamp(moment, ZoneInfo(zone)):%H:%M} {zone}"
