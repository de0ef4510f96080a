"""Cron expressions and Go-style durations, pure and local-time aware.

The scaler must know when a task's run starts in the task's own time zone, including on the
nights clocks change, so this follows cronie (the cron of most Linux hosts) rather than a
naive "add one minute until it matches":

- 5 fields: minute hour day-of-month month day-of-week; `*`, lists `1,5`, ranges `1-5`, steps
  `*/5`, `1-30/2` and `7/15` (= 7-59/15); names `jan`-`dec`, `sun`-`sat` (any case); day of
  week 0-7 where 7 is Sunday. Macros `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily`
  (`@midnight`) and `@hourly` stand for their usual 5 fields.
- Day of month and day of week: when both are restricted a day matching either fires (Vixie
  OR); when either field starts with `*` (`*/2` included) a day must match both.
- Daylight saving time. A *fixed-time* schedule (neither minute nor hour starts with `*`)
  whose local time falls into a spring-forward gap fires once at the end of the gap (e.g.
  02:30 in New York on the March change fires at 03:00 EDT); in a fall-back overlap it fires
  once, at the first of the two instants. A *wildcard* schedule (minute or hour starts with
  `*`) follows the wall clock: times in a gap do not exist and are skipped, times in an
  overlap fire at both instants.

Fire times are returned in UTC: Python compares and subtracts two datetimes that share a
tzinfo by wall-clock time, ignoring `fold`, which would misorder the instants of an overlap.
Use `.astimezone(tz)` to display them.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from functools import lru_cache

from controlplane.errors import RuleError
from controlplane.model.text import quote

FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (low, high, names mapped to numbers) per field, in FIELDS order.
_LIMITS: tuple[tuple[int, int, dict[str, int]], ...] = (
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, {name: i + 1 for i, name in enumerate(_MONTHS)}),
    (0, 7, {name: i for i, name in enumerate(_WEEKDAYS)}),
)
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # leap February: it exists
_NUMBER = re.compile(r"[0-9]{1,6}")


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression: the allowed values of each field plus the two cronie flags."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    day_and: bool  # day-of-month or day-of-week starts with '*': a day must match both
    wildcard: bool  # minute or hour starts with '*': gaps skip, overlaps fire twice

    def day_matches(self, day: date) -> bool:
        """Whether the schedule fires on some time of this calendar day."""
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = day.isoweekday() % 7 in self.weekdays
        return in_days and in_weekdays if self.day_and else in_days or in_weekdays


def parse_cron(expr: str) -> Cron:
    """Parse a 5-field expression or macro; RuleError names the field that is wrong."""
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in MACROS:
            known = ", ".join(MACROS)
            raise RuleError(f"unknown macro {quote(text)} (expected one of: {known})")
        text = MACROS[text.lower()]
    parts = text.split()
    if len(parts) != len(FIELDS):
        raise RuleError(
            f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(parts)}"
        )
    values = [
        _parse_field(field, part, *limits)
        for field, part, limits in zip(FIELDS, parts, _LIMITS, strict=True)
    ]
    weekdays = frozenset(v % 7 for v in values[4])
    cron = Cron(
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        day_and=parts[2].startswith("*") or parts[4].startswith("*"),
        wildcard=parts[0].startswith("*") or parts[1].startswith("*"),
    )
    if cron.day_and and not any(
        day <= _DAYS_IN_MONTH[month - 1] for month in cron.months for day in cron.days
    ):
        raise RuleError(
            f"{quote(expr.strip())} never fires: no month in the month field has a day "
            "in the day-of-month field"
        )
    return cron


def _parse_field(
    field: str, text: str, low: int, high: int, names: dict[str, int]
) -> frozenset[int]:
    """One field: a comma list of `*`, N, N-M, each with an optional /step."""
    result: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not _NUMBER.fullmatch(step_text) or not 1 <= int(step_text) <= high:
                raise RuleError(
                    f"{field} field {quote(item)}: step must be a number from 1 to {high}"
                )
            step = int(step_text)
        if base == "*":
            start, end = low, high
        else:
            first, dash, last = base.partition("-")
            start = _value(field, item, first, low, high, names)
            end = (
                _value(field, item, last, low, high, names) if dash else (high if slash else start)
            )
            if start > end:
                raise RuleError(
                    f"{field} field {quote(item)}: range start {start} is after its end {end}"
                )
        result.update(range(start, end + 1, step))
    return frozenset(result)


def _value(field: str, item: str, text: str, low: int, high: int, names: dict[str, int]) -> int:
    """One number or name of a field, checked against the field's range."""
    if text.lower() in names:
        return names[text.lower()]
    shown = quote(text or item)
    if not _NUMBER.fullmatch(text):
        what = "a number or name" if names else "a number"
        raise RuleError(f"{field} field {shown} is not {what}")
    number = int(text)
    if not low <= number <= high:
        raise RuleError(f"{field} field {shown} out of range {low}-{high}")
    return number


@lru_cache(maxsize=512)
def _cached(expr: str) -> Cron:
    return parse_cron(expr)


def next_fire(expr: str | Cron, after: datetime, tz: tzinfo) -> datetime:
    """The first fire time strictly after `after` (aware), as an aware UTC datetime."""
    start = _utc(after, "after")
    return next(t for t in _fires(_as_cron(expr), start, tz) if t > start)


def fires_between(
    expr: str | Cron, start: datetime, end: datetime, tz: tzinfo
) -> Iterator[datetime]:
    """Fire times t with start <= t < end (both aware), ascending, as aware UTC datetimes."""
    low, high = _utc(start, "start"), _utc(end, "end")
    for t in _fires(_as_cron(expr), low, tz):
        if t >= high:
            return
        if t >= low:
            yield t


def _as_cron(expr: str | Cron) -> Cron:
    return expr if isinstance(expr, Cron) else _cached(expr)


def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {moment!r}")
    return moment.astimezone(UTC)


def _fires(cron: Cron, start: datetime, tz: tzinfo) -> Iterator[datetime]:
    """Fire instants (UTC, ascending, no repeats) from about a day before `start` on.

    Local days are walked in order; a day's instants wait in a heap until the next local
    midnight has passed, because a fall-back overlap may cross midnight.
    """
    day = start.astimezone(tz).date() - timedelta(days=1)
    times = sorted(time(hour, minute) for hour in cron.hours for minute in cron.minutes)
    pending: list[datetime] = []
    last: datetime | None = None
    while True:
        if cron.day_matches(day):
            for clock in times:
                for instant in _instants(datetime.combine(day, clock), tz, cron.wildcard):
                    heapq.heappush(pending, instant)
        day += timedelta(days=1)
        midnight = _instants(datetime.combine(day, time()), tz, wildcard=False)[0]
        while pending and pending[0] < midnight:
            instant = heapq.heappop(pending)
            if instant != last:
                last = instant
                yield instant


def _instants(local: datetime, tz: tzinfo, wildcard: bool) -> list[datetime]:
    """The UTC instants at which a naive local time fires, by the DST rules above."""
    first = local.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = local.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    if first.astimezone(tz).replace(tzinfo=None) == local:  # exists twice: an overlap
        return [first, second] if wildcard else [first]
    # Does not exist: a gap. fold=1 applies the offset after the change, so `second` lies
    # before the change and `first` after it.
    return [] if wildcard else [_change_instant(second, first, tz)]


def _change_instant(before: datetime, after: datetime, tz: tzinfo) -> datetime:
    """The first second at which `tz` has the UTC offset it has at `after`."""
    target = after.astimezone(tz).utcoffset()
    low, high = before, after  # offset differs at low, equals target at high
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) // 2
        middle -= timedelta(microseconds=middle.microsecond)
        if middle.astimezone(tz).utcoffset() == target:
            high = middle
        else:
            low = middle
    return high


_DURATION = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)[hms])+")
_DURATION_PART = re.compile(r"([0-9.]+)([hms])")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}
_MAX_DURATION_S = 2**63 // 10**9  # Go's time.Duration limit


def parse_duration(text: str) -> int:
    """Go-style duration ("90s", "15m", "1h30m", "1.5h", "0") to whole seconds.

    Only h, m and s: task durations are never shorter than a second, and rejecting "d" keeps
    the syntax exactly Go's.
    """
    if text == "0":
        return 0
    if not _DURATION.fullmatch(text):
        raise RuleError(f"{quote(text)} is not a duration (expected e.g. 90s, 15m, 1h30m)")
    total = sum(
        (Decimal(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(text)),
        Decimal(0),
    )
    if total != total.to_integral_value():
        raise RuleError(f"{quote(text)} is not a whole number of seconds")
    if total > _MAX_DURATION_S:
        raise RuleError(f"{quote(text)} is too long")
    return int(total)


def format_duration(seconds: int) -> str:
    """Whole seconds back to the shortest Go-style text, e.g. 5400 -> "1h30m"."""
    if seconds == 0:
        return "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "m"), (secs, "s")]
    return "".join(f"{amount}{unit}" for amount, unit in parts if amount)
