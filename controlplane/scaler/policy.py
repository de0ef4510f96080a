"""The policy: how many instances each task group should have now, and why.

    desired = clamp(max(predictive, reactive), minReplicas, maxReplicas)

*Predictive* comes from the profile's windows (`profile.windows`): a window of a task's run
needs its replicas from `lead` before it starts until `drain_s` after it ends. The lead is
per task, not per group, because the whole chain must be ready when the cron fires: it is
the time by which *every* instance the task starts on *every* hop is ready with probability
`lead_percentile` %, from the measured start-to-ready durations of those groups, plus one
sync period (a decision is acted on up to one period late). The slowest hop therefore sets
the lead of the whole chain, and since all hops share the run's window they also go down
together. A window ends when the run is reported finished, never at a predicted end while
the run is open (kedacore/keda#6057); a fire with no reported run keeps its capacity for
the task's expected duration, then goes down (a skipped run costs one expected duration).
When capacity that goes down would come back within the scale-down window (one run ends,
the next one's pre-warm is due a few minutes later), it is kept instead: a stop and a
restart that close cost more in start-ups and risk than the idle minutes, and would flap.
For the same reason a group never goes down within the scale-down window after it went up
(a short run, or one task's pre-warm just before another task's run ends); a lowered
maxReplicas still applies at once. A run no cron announced (an extra run, started by hand)
is served at once, even when its group went down less than the window ago, which counts as
a flap: holding it back until the window is over only moved its cold start or resume later
(the shop benchmark week's extra runs waited 38 s at p50 instead of 0.1 s, up to 500 s),
and holding every finished run's capacity for the window cost 4-6 % more replica-hours and
still left most of them, since they land at random moments (README, the scaler).

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
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from controlplane.model.group import GroupKey
from controlplane.model.rules import RuleSet
from controlplane.model.run import Run
from controlplane.scaler.profile import (
    NEVER_FINISHED,
    Window,
    extra_runs,
    managed_groups,
    task_hops,
    windows,
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
    them are ready in time with probability `lead_percentile` %, plus one sync period.

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
        lead = _ready_by(measured, config.lead_percentile / 100) + config.sync_period_s
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
        for model, count in models:
            result *= model.cdf(x) ** count
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
        spread = statistics.stdev(logs) if len(logs) >= MIN_FIT_SAMPLES else 0.0
        self.sigma = spread if spread > 0 else None

    def cdf(self, x: float) -> float:
        empirical = bisect.bisect_right(self.values, x) / len(self.values)
        if self.sigma is None or x <= 0:
            return empirical
        fitted = 0.5 * math.erfc(-(math.log(x) - self.mu) / (self.sigma * math.sqrt(2)))
        return min(empirical, fitted)


@dataclass(frozen=True)
class _Span:
    """A window shifted by its task's lead and the drain: when the policy wants it up."""

    start: float
    end: float
    window: Window


class Policy:
    """Decides the desired count of every managed group each sync period."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self._metrics: dict[GroupKey, deque[tuple[float, int, str]]] = {}
        self._last: dict[GroupKey, Decision] = {}
        self._raised: dict[GroupKey, float] = {}  # when each group last went up
        self._pools: dict[GroupKey, int] = {}

    @property
    def pools(self) -> dict[GroupKey, int]:
        """How many instances each managed group should keep parked (keep-alive) rather
        than stop, as of the latest decision; 0 for most groups."""
        return dict(self._pools)

    @property
    def desired(self) -> dict[GroupKey, Decision]:
        """The latest decision of every managed group, for callers that reconcile each
        period rather than act on changes."""
        return dict(self._last)

    def decide(
        self,
        now: float,
        rules: RuleSet,
        history: Sequence[Run],
        observations: Mapping[GroupKey, Observation],
        start_durations: Mapping[GroupKey, Sequence[float]],
    ) -> list[Decision]:
        """Decisions for the groups whose desired count changed since the previous call
        (every managed group on the first call), ordered by group.

        `history`: each task's open runs and recent finished ones (at least its last
        `profile.HISTORY_RUNS`). `start_durations`: recent measured start-to-ready seconds
        per group (a few dozen to a hundred each). A group that stopped being managed gets
        one last decision: its minimum, or 0 when the group is gone.
        """
        config = self.config
        groups = managed_groups(rules)
        self._pools = keep_alive_pools(rules, history, now, config.park_min_extra_per_day)
        hold = config.scale_down_window_s + config.sync_period_s + config.keep_margin_s
        horizon = hold + _lead_bound(start_durations, config)
        spans = self._spans(
            rules,
            windows(rules, history, now - hold - config.drain_s, now + horizon, now),
            start_durations,
        )
        decisions: list[Decision] = []
        for key, bounds in groups.items():
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
            if wanted > bounds.max_replicas:
                reason = f"bound: max {bounds.max_replicas} ({reason})"
            elif wanted < bounds.min_replicas:
                reason = f"bound: min {bounds.min_replicas}"
            decision = Decision(key[0], key[1], replicas, reason, now)
            self._last[key] = decision
            decisions.append(decision)
        for key in [key for key in self._last if key not in groups]:
            service = rules.services.get(key[0])
            bounds = service.group(key[1]) if service is not None else None
            replicas = bounds.min_replicas if bounds is not None else 0
            reason = "no scheduled task uses this group any more"
            decisions.append(Decision(key[0], key[1], replicas, reason, now))
            del self._last[key]
            self._metrics.pop(key, None)
            self._raised.pop(key, None)
        return decisions

    def _spans(
        self,
        rules: RuleSet,
        found: list[Window],
        start_durations: Mapping[GroupKey, Sequence[float]],
    ) -> dict[GroupKey, list[_Span]]:
        """Windows widened by their task's chain lead and the drain, per group."""
        starts_of: dict[str, dict[GroupKey, int]] = {}
        for window in found:
            starts_of.setdefault(window.task, {})[(window.service, window.group)] = window.replicas
        leads = {
            task: chain_lead(start_durations, starts, self.config)
            for task, starts in starts_of.items()
        }
        spans: dict[GroupKey, list[_Span]] = {}
        for window in found:
            span = _Span(
                window.start - leads[window.task], window.end + self.config.drain_s, window
            )
            spans.setdefault((window.service, window.group), []).append(span)
        return spans

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
                if usage is None:
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


MIN_EXTRA_RUNS = 3


def keep_alive_pools(
    rules: RuleSet, history: Sequence[Run], now: float, min_per_day: float
) -> dict[GroupKey, int]:
    """Per managed group, the instances to keep parked for extra runs: the most replicas
    one extra run needs there, of the tasks that had at least `min_per_day` extra runs a
    day over their history (at least a day of it) and at least `MIN_EXTRA_RUNS` of them:
    one or two extra runs are no habit, and a task that is run by hand once a month does not keep
    its capacity parked all month. Other groups get 0."""
    runs_of: dict[str, list[Run]] = {}
    for run in history:
        runs_of.setdefault(run.task, []).append(run)
    pools = dict.fromkeys(managed_groups(rules), 0)
    for name, runs in runs_of.items():
        task = rules.tasks.get(name)
        extra = extra_runs(task, runs) if task is not None else ()
        if len(extra) < MIN_EXTRA_RUNS:
            continue
        days = max(1.0, (now - min(run.started_at for run in runs)) / _DAY_S)
        if len(extra) / days < min_per_day - _EPSILON:
            continue
        for service, group, replicas in task_hops(rules, task):
            pools[service, group] = max(pools[service, group], replicas)
    return pools


def _lead_bound(start_durations: Mapping[GroupKey, Sequence[float]], config: PolicyConfig) -> float:
    """No chain lead is longer than this, so windows beyond it cannot matter yet."""
    longest = max((max(values) for values in start_durations.values() if values), default=0.0)
    return max(config.default_lead_s, longest + config.sync_period_s)


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
    return _active(rules, newest.window, now) + suffix


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


def _active(rules: RuleSet, window: Window, now: float) -> str:
    if window.open:
        return f"run {window.task}/{window.run} open"
    if window.stuck:
        return _ended(window, 0)
    if window.run is not None:
        return f"run {window.task}/{window.run} finished, draining"
    when = _local(rules, window.task, window.start)
    if window.start > now:
        return f"pre-warm for task {window.task} (fires {when})"
    return f"task {window.task} fired {when}, no run reported yet"


def _local(rules: RuleSet, task: str, moment: float) -> str:
    """'02:00 Asia/Shanghai': the fire as the task's author wrote it."""
    zone = rules.tasks[task].timezone
    return f"{datetime.fromtimestamp(moment, ZoneInfo(zone)):%H:%M} {zone}"
