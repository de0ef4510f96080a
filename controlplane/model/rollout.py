"""A staged rollout: a rule change served to a share of each role's sidecars first, judged on
what those sidecars' routers then did, and promoted or reverted.

Why a share of each role and not of the mesh: a routing rule is applied by the sidecars of the
services that call a hop, so every role that routes differently under the change must have
canary sidecars *and* stable ones to compare. A role with one sidecar has no stable one: it
keeps the old rules until promotion, which `rollout status` shows ("0 of 1").

Why the canary's requests are judged against the candidate rules and the stable ones against
the current rules: a change may move a hop to another group on purpose, and that is no leak.
What a change must not do is make its sidecars' requests fail, be rejected, fall back or leak
more often than the same roles' stable sidecars do over the same window.

Pure: the store keeps the `Rollout`, canary.py admits sidecars with `admits`, telemetry
counts a `Tally` per cohort, and `verdict` decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from controlplane.errors import RuleError
from controlplane.model.cron import format_duration, parse_duration

CANARY, STABLE = "canary", "stable"
DEFAULT_WINDOW_S = 60
DEFAULT_MIN_REQUESTS = 20
PROMOTED, ABORTED = "promoted", "aborted"
# (signal, its label, and how the canary's rate may exceed the stable sidecars': up to
# `factor` times theirs plus `margin`, absolute). No more leaks than the stable sidecars have;
# the others allow for the noise of a few requests.
SIGNALS = (
    ("leaks", "leaks", 1.0, 0.0),
    ("rejected", "strict rejections", 2.0, 0.01),
    ("errors", "5xx", 2.0, 0.01),
    ("fallbacks", "fallbacks", 2.0, 0.05),
)
# A rollout whose canaries get too few requests to judge is aborted after this many windows,
# so that it does not hold every other change of the rules for ever.
WINDOWS_TO_WAIT = 3


@dataclass(frozen=True)
class Rollout:
    """A candidate generation of the rules, staged beside the current one."""

    generation: str  # the candidate's generation in etcd (store/rules.py)
    percent: int  # share of each role's sidecars that get it
    window_s: int  # how long the canary is watched before promotion
    min_requests: int  # canary requests needed to judge
    started_at: float
    who: str
    base: int  # the rules revision it was staged on: promotion needs it still current
    revision: int  # the revision number promotion makes

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "percent": self.percent,
            "window": format_duration(self.window_s),
            "minRequests": self.min_requests,
            "startedAt": self.started_at,
            "who": self.who,
            "base": self.base,
            "revision": self.revision,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Rollout:
        return Rollout(
            generation=str(data["generation"]),
            percent=int(data["percent"]),
            window_s=parse_duration(str(data["window"])),
            min_requests=int(data["minRequests"]),
            started_at=float(data["startedAt"]),
            who=str(data["who"]),
            base=int(data["base"]),
            revision=int(data["revision"]),
        )


def parse_percent(text: str | int) -> int:
    """`10%`, `10` or 10 -> 10; a share of 1-99 % (0 is no canary, 100 is a plain apply)."""
    raw = str(text).strip()
    number = raw[:-1] if raw.endswith("%") else raw
    if not number.isdigit() or not 1 <= int(number) <= 99:
        raise RuleError(f"canary: {raw!r} is not a share of 1-99 % (e.g. 10%)")
    return int(number)


def parse_window(text: str) -> int:
    """The watch window, a Go-style duration of at least one second."""
    try:
        seconds = parse_duration(text)
    except RuleError as exc:
        raise RuleError(f"canary window: {exc}") from None
    if seconds < 1:
        raise RuleError(f"canary window: {text!r} is shorter than a second")
    return seconds


def canary_count(sidecars: int, percent: int) -> int:
    """How many of a role's `sidecars` get the candidate: the share rounded up, leaving at
    least one stable sidecar to compare with (none of a role with one sidecar)."""
    if sidecars < 2:
        return 0
    return min(math.ceil(sidecars * percent / 100), sidecars - 1)


def admits(canaries: int, sidecars: int, percent: int) -> bool:
    """Whether a sidecar connecting to a role of `sidecars` (itself included), `canaries` of
    them canaries already, becomes one. Decided once, when its stream opens (or when the
    rollout starts), and kept while it is connected: a sidecar is never moved between the
    two configs in the middle of a rollout, so its requests are judged on the config they
    ran with."""
    return canaries < canary_count(sidecars, percent)


@dataclass
class Tally:
    """What the routers of one cohort did with their requests (egress and gateway entries)."""

    requests: int = 0
    errors: int = 0  # answered 5xx (strict rejections included)
    rejected: int = 0  # strict rejections: 503, no healthy host in the hop's group
    fallbacks: int = 0  # sent to `default` in place of the hop's group, or nowhere (loose)
    leaks: int = 0  # sent to a group the rules give no such request

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rejected": self.rejected,
            "fallbacks": self.fallbacks,
            "leaks": self.leaks,
        }


@dataclass(frozen=True)
class Verdict:
    action: str  # "wait", PROMOTED or ABORTED
    reason: str


def _rate(count: int, requests: int) -> float:
    return count / requests if requests else 0.0


def verdict(rollout: Rollout, canary: Tally, stable: Tally, now: float) -> Verdict:
    """Abort as soon as the canary is worse on any signal; promote once the window is over
    with enough canary requests seen; else wait."""
    for attr, label, factor, margin in SIGNALS:
        bad = getattr(canary, attr)
        enough = canary.requests >= (1 if attr == "leaks" else rollout.min_requests)
        if not bad or not enough:
            continue
        mine, theirs = _rate(bad, canary.requests), _rate(getattr(stable, attr), stable.requests)
        if mine > factor * theirs + margin:
            return Verdict(
                ABORTED,
                f"canary {label} {mine:.1%} ({bad} of {canary.requests}) against "
                f"{theirs:.1%} ({getattr(stable, attr)} of {stable.requests}) on the stable "
                "sidecars",
            )
    left = rollout.started_at + rollout.window_s - now
    if canary.requests < rollout.min_requests:
        if now >= rollout.started_at + WINDOWS_TO_WAIT * rollout.window_s:
            return Verdict(
                ABORTED,
                f"too few canary requests to judge in {WINDOWS_TO_WAIT} windows "
                f"({canary.requests} of {rollout.min_requests}); nothing changed",
            )
        return Verdict(
            "wait",
            f"{canary.requests} of {rollout.min_requests} canary requests seen"
            + (
                ""
                if left > 0
                else f"; the window is over: promote or abort by hand, or it is aborted "
                f"after {WINDOWS_TO_WAIT} windows"
            ),
        )
    if left > 0:
        return Verdict("wait", f"no worse than the stable sidecars so far; {left:.0f} s left")
    return Verdict(
        PROMOTED,
        f"no worse than the stable sidecars over {format_duration(rollout.window_s)} "
        f"({canary.requests} canary, {stable.requests} stable requests)",
    )
