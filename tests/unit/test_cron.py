"""Cron parsing and fire times: field syntax, Vixie day semantics, month/year boundaries and
the cronie DST rules in zones that change clocks at different hours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from controlplane.errors import RuleError
from controlplane.model.cron import (
    fires_between,
    format_duration,
    next_fire,
    parse_cron,
    parse_duration,
)

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")
SHANGHAI = ZoneInfo("Asia/Shanghai")
SAO_PAULO = ZoneInfo("America/Sao_Paulo")


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def fires(expr: str, start: datetime, end: datetime, tz: ZoneInfo) -> list[datetime]:
    return list(fires_between(expr, start, end, tz))


# --- fields -----------------------------------------------------------------------------


def test_star_list_range_and_steps() -> None:
    cron = parse_cron("*/15 1,3-5 1-10/3 * *")
    assert cron.minutes == {0, 15, 30, 45}
    assert cron.hours == {1, 3, 4, 5}
    assert cron.days == {1, 4, 7, 10}
    assert cron.months == set(range(1, 13))


def test_single_value_with_step_runs_to_the_end_of_the_field() -> None:
    assert parse_cron("7/15 * * * *").minutes == {7, 22, 37, 52}


def test_names_any_case_and_in_ranges() -> None:
    cron = parse_cron("0 0 * JAN,mar-May Mon-fri")
    assert cron.months == {1, 3, 4, 5}
    assert cron.weekdays == {1, 2, 3, 4, 5}


def test_day_of_week_seven_is_sunday() -> None:
    assert parse_cron("0 0 * * 7").weekdays == {0}
    assert parse_cron("0 0 * * 5-7").weekdays == {5, 6, 0}


def test_macros() -> None:
    assert parse_cron("@daily") == parse_cron("0 0 * * *")
    assert parse_cron("@hourly") == parse_cron("0 * * * *")
    assert parse_cron("@weekly") == parse_cron("0 0 * * 0")


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "minute field '61' out of range 0-59"),
        ("0 24 * * *", "hour field '24' out of range 0-23"),
        ("0 0 0 * *", "day-of-month field '0' out of range 1-31"),
        ("0 0 * 13 *", "month field '13' out of range 1-12"),
        ("0 0 * * 8", "day-of-week field '8' out of range 0-7"),
        ("0 1-61 * * *", "hour field '61' out of range 0-23"),
        ("0 0 * * mun", "day-of-week field 'mun' is not a number or name"),
        ("x * * * *", "minute field 'x' is not a number"),
        ("1,,2 * * * *", "minute field '' is not a number"),
        ("*/0 * * * *", "minute field '*/0': step must be a number from 1 to 59"),
        ("30-10 * * * *", "minute field '30-10': range start 30 is after its end 10"),
        ("0 0 * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
        ("", "expected 5 fields (minute hour day-of-month month day-of-week), got 0"),
        ("@often", "unknown macro '@often'"),
        ("0 0 31 4,6 *", "'0 0 31 4,6 *' never fires"),
    ],
)
def test_errors_name_the_field(expr: str, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_cron(expr)
    assert message in str(caught.value)


def test_day_that_exists_only_in_leap_years_is_accepted() -> None:
    assert next_fire("0 0 29 2 *", utc(2024, 3, 1), UTC) == utc(2028, 2, 29)


# --- day-of-month / day-of-week -----------------------------------------------------------


def test_both_days_restricted_fire_on_either() -> None:
    # the 13th (a Monday in May 2024) and every Friday: Vixie OR
    days = [t.day for t in fires("0 0 13 * 5", utc(2024, 5, 1), utc(2024, 6, 1), UTC)]
    assert days == [3, 10, 13, 17, 24, 31]


def test_or_includes_days_that_match_only_day_of_month() -> None:
    days = [t.day for t in fires("0 0 1 * 3", utc(2024, 5, 1), utc(2024, 5, 31), UTC)]
    assert days == [1, 8, 15, 22, 29]  # Wed the 1st, then Wednesdays
    days = [t.day for t in fires("0 0 2 * 3", utc(2024, 5, 1), utc(2024, 5, 31), UTC)]
    assert days == [1, 2, 8, 15, 22, 29]


def test_a_star_in_either_day_field_means_and() -> None:
    # dom '*/2' starts with '*': odd days that are also Mondays
    days = [t.day for t in fires("0 0 */2 * 1", utc(2024, 4, 1), utc(2024, 5, 1), UTC)]
    assert days == [1, 15, 29]
    days = [t.day for t in fires("0 0 10 * *", utc(2024, 1, 1), utc(2024, 4, 1), UTC)]
    assert days == [10, 10, 10]


# --- next_fire ----------------------------------------------------------------------------


def test_next_fire_is_strictly_after() -> None:
    assert next_fire("0 2 * * *", utc(2024, 5, 1, 2), UTC) == utc(2024, 5, 2, 2)
    assert next_fire("0 2 * * *", utc(2024, 5, 1, 1, 59, 59), UTC) == utc(2024, 5, 1, 2)


def test_next_fire_across_month_and_year() -> None:
    assert next_fire("0 0 1 * *", utc(2024, 1, 31, 12), UTC) == utc(2024, 2, 1)
    assert next_fire("* * * * *", utc(2024, 12, 31, 23, 59), UTC) == utc(2025, 1, 1)
    assert next_fire("30 4 31 * *", utc(2024, 4, 1), UTC) == utc(2024, 5, 31, 4, 30)
    assert next_fire("0 0 1 1 *", utc(2024, 1, 1, 0, 0, 1), UTC) == utc(2025, 1, 1)


def test_next_fire_in_a_zone_without_dst() -> None:
    # 02:00 in Shanghai is 18:00 UTC the day before
    assert next_fire("0 2 * * *", utc(2024, 6, 1), SHANGHAI) == utc(2024, 6, 1, 18)
    assert next_fire("0 2 * * *", utc(2024, 6, 1, 18), SHANGHAI) == utc(2024, 6, 2, 18)
    assert next_fire("30 6 * * mon-fri", utc(2024, 6, 7, 23), SHANGHAI) == utc(2024, 6, 9, 22, 30)


def test_results_are_aware_utc_and_input_may_be_in_any_zone() -> None:
    after = datetime(2024, 6, 1, 10, tzinfo=SHANGHAI)
    fire = next_fire("0 12 * * *", after, SHANGHAI)
    assert fire.tzinfo is UTC
    assert fire == datetime(2024, 6, 1, 12, tzinfo=SHANGHAI)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_fire("* * * * *", datetime(2024, 1, 1), UTC)


# --- daylight saving time -----------------------------------------------------------------


def test_new_york_spring_forward_fixed_time_runs_at_end_of_gap() -> None:
    # 2024-03-10 02:00 EST -> 03:00 EDT (07:00 UTC); 02:30 does not exist
    assert next_fire("30 2 * * *", utc(2024, 3, 9, 12), NEW_YORK) == utc(2024, 3, 10, 7)
    assert next_fire("30 2 * * *", utc(2024, 3, 10, 7), NEW_YORK) == utc(2024, 3, 11, 6, 30)
    # two skipped times of one schedule run once
    assert fires("0,30 2 * * *", utc(2024, 3, 10), utc(2024, 3, 11), NEW_YORK) == [
        utc(2024, 3, 10, 7)
    ]


def test_new_york_spring_forward_wildcard_skips_the_gap() -> None:
    got = fires("*/30 * * * *", utc(2024, 3, 10, 6), utc(2024, 3, 10, 8), NEW_YORK)
    local = [t.astimezone(NEW_YORK).strftime("%H:%M") for t in got]
    assert local == ["01:00", "01:30", "03:00", "03:30"]


def test_new_york_fall_back_fixed_time_runs_once() -> None:
    # 2024-11-03 02:00 EDT -> 01:00 EST: 01:30 happens at 05:30 and 06:30 UTC
    got = fires("30 1 * * *", utc(2024, 11, 2, 12), utc(2024, 11, 4, 12), NEW_YORK)
    assert got == [utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6, 30)]


def test_new_york_fall_back_wildcard_runs_in_both_hours() -> None:
    got = fires("0,30 * * * *", utc(2024, 11, 3, 4), utc(2024, 11, 3, 7, 1), NEW_YORK)
    assert got == [utc(2024, 11, 3, 4) + timedelta(minutes=30 * i) for i in range(7)]


def test_day_length_on_change_days() -> None:
    def count(day_start: datetime, day_end: datetime) -> int:
        return len(fires("*/15 * * * *", day_start, day_end, NEW_YORK))

    spring = (datetime(2024, 3, 10, tzinfo=NEW_YORK), datetime(2024, 3, 11, tzinfo=NEW_YORK))
    autumn = (datetime(2024, 11, 3, tzinfo=NEW_YORK), datetime(2024, 11, 4, tzinfo=NEW_YORK))
    assert count(*spring) == 23 * 4
    assert count(*autumn) == 25 * 4


def test_berlin_changes_at_two_and_three() -> None:
    # 2024-03-31 02:00 CET -> 03:00 CEST (01:00 UTC)
    assert next_fire("15 2 * * *", utc(2024, 3, 30, 12), BERLIN) == utc(2024, 3, 31, 1)
    # 2024-10-27 03:00 CEST -> 02:00 CET: 02:30 is 00:30 and 01:30 UTC
    got = fires("30 2 * * *", utc(2024, 10, 26, 12), utc(2024, 10, 28, 12), BERLIN)
    assert got == [utc(2024, 10, 27, 0, 30), utc(2024, 10, 28, 1, 30)]
    got = fires("30 * * * *", utc(2024, 10, 27, 0), utc(2024, 10, 27, 3), BERLIN)
    assert got == [utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 1, 30), utc(2024, 10, 27, 2, 30)]


def test_change_at_midnight() -> None:
    # 2018-11-04 00:00 -03 -> 01:00 -02: midnight does not exist
    assert next_fire("0 0 * * *", utc(2018, 11, 3, 12), SAO_PAULO) == utc(2018, 11, 4, 3)
    # 2019-02-17 00:00 -02 -> 2019-02-16 23:00 -03: 23:30 on the 16th happens twice
    got = fires("30 * * * *", utc(2019, 2, 17, 1), utc(2019, 2, 17, 4), SAO_PAULO)
    assert got == [utc(2019, 2, 17, 1, 30), utc(2019, 2, 17, 2, 30), utc(2019, 2, 17, 3, 30)]
    assert fires("30 23 * * *", utc(2019, 2, 16, 12), utc(2019, 2, 18, 12), SAO_PAULO) == [
        utc(2019, 2, 17, 1, 30),
        utc(2019, 2, 18, 2, 30),
    ]


def test_fires_between_is_half_open() -> None:
    got = fires("0 * * * *", utc(2024, 1, 1, 0), utc(2024, 1, 1, 3), UTC)
    assert got == [utc(2024, 1, 1, 0), utc(2024, 1, 1, 1), utc(2024, 1, 1, 2)]


# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1h30m", 5400),
        ("7h", 25200),
        ("1.5h", 5400),
        ("0", 0),
        ("1h0m30s", 3630),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "1d", "-1h", "1h 30m", "h", "0.5s", "1e3s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(RuleError):
        parse_duration(text)


def test_format_duration_round_trips() -> None:
    for seconds in (1, 59, 60, 90, 3600, 5400, 25200, 86400 + 61):
        assert parse_duration(format_duration(seconds)) == seconds
    assert format_duration(5400) == "1h30m"
    assert format_duration(0) == "0s"
