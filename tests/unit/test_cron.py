"""When schedules fire (zbroker/protocol/cron.py): cron expressions, intervals, durations.

Instants are checked against hand-written calendars: month ends, leap years, and the
daylight saving changes of Europe/Paris and America/New_York.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbroker.protocol.cron import (
    Cron,
    Every,
    check_every,
    format_duration,
    parse_duration,
    zone,
)

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()  # type: ignore[misc]


def local(tz: ZoneInfo, *fields: int, fold: int = 0) -> float:
    return datetime(*fields, tzinfo=tz, fold=fold).timestamp()  # type: ignore[misc]


def shown(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M %a")


def firings(cron: Cron, start: float, n: int) -> list[str]:
    out, t = [], start
    for _ in range(n):
        t = cron.next_after(t)
        out.append(shown(t))
    return out


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("expr", "field", "values"),
    [
        ("* * * * *", "minutes", set(range(60))),
        ("*/15 * * * *", "minutes", {0, 15, 30, 45}),
        ("5-20/5 * * * *", "minutes", {5, 10, 15, 20}),
        ("50/5 * * * *", "minutes", {50, 55}),
        ("1,2,40-42 * * * *", "minutes", {1, 2, 40, 41, 42}),
        ("0 9-17 * * *", "hours", set(range(9, 18))),
        ("0 0 * jan,MAR-may *", "months", {1, 3, 4, 5}),
        ("0 0 * * mon-fri", "weekdays", {1, 2, 3, 4, 5}),
        ("0 0 * * 7", "weekdays", {0}),
        ("0 0 * * 5-7", "weekdays", {5, 6, 0}),
        ("0 0 * * Sun", "weekdays", {0}),
    ],
)
def test_fields_read_values_ranges_steps_lists_and_names(
    expr: str, field: str, values: set[int]
) -> None:
    assert getattr(Cron.parse(expr), field) == values


@pytest.mark.parametrize(
    ("macro", "same_as"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@ANNUALLY", "0 0 1 1 *"),
    ],
)
def test_macros_stand_for_their_expressions(macro: str, same_as: str) -> None:
    a, b = Cron.parse(macro), Cron.parse(same_as)
    assert (a.minutes, a.hours, a.days, a.months, a.weekdays) == (
        b.minutes,
        b.hours,
        b.days,
        b.months,
        b.weekdays,
    )


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("* * * *", "5 fields"),
        ("* * * * * *", "5 fields"),
        ("60 * * * *", "out of 0..59"),
        ("* 24 * * *", "out of 0..23"),
        ("* * 0 * *", "out of 1..31"),
        ("* * * 13 *", "out of 1..12"),
        ("* * * * 8", "out of 0..7"),
        ("*/0 * * * *", "step"),
        ("*/x * * * *", "step"),
        ("10-5 * * * *", "backwards"),
        ("1,,2 * * * *", "empty"),
        ("x * * * *", "not a number"),
        ("* * * foo *", "not a number or a name"),
        ("0 0 30 2 *", "no month"),
        ("0 0 31 4,6,9,11 *", "no month"),
        ("@often", "unknown cron macro"),
        ("", "5 fields"),
        ("1 " * 200, "at most 256 bytes"),
    ],
)
def test_a_bad_expression_says_what_is_wrong(expr: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Cron.parse(expr)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "../../etc/passwd", "/etc/localtime", "", "a b"])
def test_an_unknown_time_zone_is_refused(tz: str) -> None:
    with pytest.raises(ValueError):
        Cron.parse("* * * * *", tz)
    with pytest.raises(ValueError):
        zone(tz)


# -------------------------------------------------------- next and last in UTC


def test_every_five_minutes_from_a_time_between_instants() -> None:
    cron = Cron.parse("*/5 * * * *")
    start = utc(2024, 1, 1, 12, 3, 20)
    assert firings(cron, start, 3) == [
        "2024-01-01 12:05 Mon",
        "2024-01-01 12:10 Mon",
        "2024-01-01 12:15 Mon",
    ]
    assert shown(cron.last_at_or_before(start)) == "2024-01-01 12:00 Mon"


def test_an_instant_itself_is_at_or_before_it_and_not_after_it() -> None:
    cron = Cron.parse("0 * * * *")
    on_the_hour = utc(2024, 5, 5, 10, 0)
    assert cron.last_at_or_before(on_the_hour) == on_the_hour
    assert cron.next_after(on_the_hour) == utc(2024, 5, 5, 11, 0)


def test_across_the_end_of_a_month_and_of_a_year() -> None:
    cron = Cron.parse("30 23 * * *")
    assert firings(cron, utc(2023, 12, 30, 23, 31), 3) == [
        "2023-12-31 23:30 Sun",
        "2024-01-01 23:30 Mon",
        "2024-01-02 23:30 Tue",
    ]


def test_the_31st_fires_only_in_months_that_have_one() -> None:
    cron = Cron.parse("0 0 31 * *")
    assert firings(cron, utc(2024, 1, 31, 1, 0), 4) == [
        "2024-03-31 00:00 Sun",
        "2024-05-31 00:00 Fri",
        "2024-07-31 00:00 Wed",
        "2024-08-31 00:00 Sat",
    ]
    assert shown(cron.last_at_or_before(utc(2024, 3, 30))) == "2024-01-31 00:00 Wed"


def test_february_29th_fires_in_leap_years_only_and_skips_2100() -> None:
    cron = Cron.parse("0 12 29 2 *")
    assert firings(cron, utc(2023, 1, 1), 2) == ["2024-02-29 12:00 Thu", "2028-02-29 12:00 Tue"]
    assert shown(cron.next_after(utc(2097, 1, 1))) == "2104-02-29 12:00 Fri"
    assert shown(cron.last_at_or_before(utc(2027, 6, 1))) == "2024-02-29 12:00 Thu"


def test_last_day_of_february_in_leap_and_common_years() -> None:
    cron = Cron.parse("0 0 28,29 2 *")
    assert firings(cron, utc(2023, 2, 27), 3) == [
        "2023-02-28 00:00 Tue",
        "2024-02-28 00:00 Wed",
        "2024-02-29 00:00 Thu",
    ]


def test_day_fields_both_restricted_fire_on_either() -> None:
    # The 13th, and every Friday: the usual OR of cron
    cron = Cron.parse("0 0 13 * fri")
    assert firings(cron, utc(2024, 9, 1), 4) == [
        "2024-09-06 00:00 Fri",
        "2024-09-13 00:00 Fri",
        "2024-09-20 00:00 Fri",
        "2024-09-27 00:00 Fri",
    ]
    assert firings(cron, utc(2024, 10, 5), 3) == [
        "2024-10-11 00:00 Fri",
        "2024-10-13 00:00 Sun",
        "2024-10-18 00:00 Fri",
    ]


def test_a_day_field_left_at_star_restricts_nothing() -> None:
    # Weekdays at 9:00 (day-of-month `*`): weekends skipped
    cron = Cron.parse("0 9 * * 1-5")
    assert firings(cron, utc(2024, 6, 7, 10, 0), 2) == [
        "2024-06-10 09:00 Mon",
        "2024-06-11 09:00 Tue",
    ]


def test_last_at_or_before_after_a_long_gap_is_the_latest_instant() -> None:
    cron = Cron.parse("*/5 * * * *")
    assert shown(cron.last_at_or_before(utc(2024, 3, 3, 3, 59, 59))) == "2024-03-03 03:55 Sun"
    yearly = Cron.parse("@yearly")
    assert shown(yearly.last_at_or_before(utc(2031, 7, 1))) == "2031-01-01 00:00 Wed"


def test_the_last_leap_day_is_found_years_back() -> None:
    assert shown(Cron.parse("0 0 29 2 *").last_at_or_before(utc(1990, 1, 1))) == (
        "1988-02-29 00:00 Mon"
    )


@given(
    st.sampled_from(["* * * * *", "*/7 3-5 * * *", "0 0 1,15 * *", "15 */6 * * mon,thu"]),
    st.integers(min_value=int(utc(2000, 1, 1)), max_value=int(utc(2040, 1, 1))),
)
def test_next_and_last_agree(expr: str, epoch: int) -> None:
    cron = Cron.parse(expr)
    following = cron.next_after(epoch)
    assert following > epoch
    assert cron.last_at_or_before(following) == following
    assert cron.last_at_or_before(following - 1) <= epoch
    assert cron.next_after(cron.last_at_or_before(epoch)) == following


# ------------------------------------------------------- time zones and DST


def test_a_time_zone_moves_the_instants_with_its_offset() -> None:
    cron = Cron.parse("0 9 * * *", "Europe/Paris")
    # Winter: UTC+1; summer: UTC+2
    assert cron.next_after(utc(2024, 1, 10)) == local(PARIS, 2024, 1, 10, 9, 0)
    assert shown(cron.next_after(utc(2024, 1, 10))) == "2024-01-10 08:00 Wed"
    assert shown(cron.next_after(utc(2024, 7, 10))) == "2024-07-10 07:00 Wed"


def test_a_local_time_the_clocks_skip_fires_at_the_change() -> None:
    # Paris, 2024-03-31: 02:00 CET becomes 03:00 CEST (01:00 UTC): 02:30 does not exist
    cron = Cron.parse("30 2 * * *", "Europe/Paris")
    assert firings(cron, utc(2024, 3, 30, 12), 2) == [
        "2024-03-31 01:00 Sun",  # the change itself, 03:00 CEST
        "2024-04-01 00:30 Mon",  # 02:30 CEST
    ]
    assert cron.last_at_or_before(utc(2024, 3, 31, 1, 30)) == utc(2024, 3, 31, 1, 0)


def test_a_local_time_the_clocks_repeat_fires_once_at_its_first_occurrence() -> None:
    # Paris, 2024-10-27: 03:00 CEST becomes 02:00 CET (01:00 UTC): 02:30 happens twice
    cron = Cron.parse("30 2 * * *", "Europe/Paris")
    first = local(PARIS, 2024, 10, 27, 2, 30, fold=0)
    assert firings(cron, utc(2024, 10, 26, 12), 2) == [
        "2024-10-27 00:30 Sun",  # 02:30 CEST, the first one
        "2024-10-28 01:30 Mon",  # 02:30 CET
    ]
    # From within the repeated hour, the next is tomorrow's, and the last the first one
    second = local(PARIS, 2024, 10, 27, 2, 40, fold=1)
    assert shown(cron.next_after(second)) == "2024-10-28 01:30 Mon"
    assert cron.last_at_or_before(second) == first


def test_every_half_hour_through_both_changes_stays_in_order() -> None:
    cron = Cron.parse("*/30 * * * *", "America/New_York")
    # 2024-03-10: 02:00 EST -> 03:00 EDT; 2024-11-03: 02:00 EDT -> 01:00 EST
    spring = firings(cron, local(NEW_YORK, 2024, 3, 10, 1, 0), 4)
    assert spring == [
        "2024-03-10 06:30 Sun",  # 01:30 EST
        "2024-03-10 07:00 Sun",  # 02:00 and 02:30 do not exist: 03:00 EDT, once
        "2024-03-10 07:30 Sun",  # 03:30 EDT
        "2024-03-10 08:00 Sun",
    ]
    fall = firings(cron, local(NEW_YORK, 2024, 11, 3, 0, 45), 4)
    assert fall == [
        "2024-11-03 05:00 Sun",  # 01:00 EDT
        "2024-11-03 05:30 Sun",  # 01:30 EDT; 01:00 and 01:30 EST are the same local times
        "2024-11-03 07:00 Sun",  # 02:00 EST
        "2024-11-03 07:30 Sun",
    ]


# ------------------------------------------------------------ fixed intervals


def test_every_counts_from_its_anchor() -> None:
    every = Every(30, 1000)
    assert every.next_after(1000.0) == 1030.0
    assert every.next_after(1029.9) == 1030.0
    assert every.next_after(1030.0) == 1060.0
    assert every.next_after(500.0) == 1030.0  # never before the first instant
    assert every.last_at_or_before(1029.0) == -math.inf
    assert every.last_at_or_before(1030.0) == 1030.0
    assert every.last_at_or_before(1000 + 30 * 1000 + 7) == 1000 + 30 * 1000


@pytest.mark.parametrize("value", [0, 0.5, 1.5, -1, 366 * 86400 + 1, math.nan, math.inf, True, "5"])
def test_an_interval_out_of_bounds_or_not_whole_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="every_s"):
        check_every(value)


def test_an_interval_is_whole_seconds() -> None:
    assert check_every(30.0) == 30 and type(check_every(30.0)) is int
    assert check_every(1) == 1


# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("2d", 172800), ("1d2h3m4s", 93784), ("90", 90)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "s", "1.5h", "1x", "30m1h", "1h1h", "-5s", "1h 30m", "h1"])
def test_a_bad_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_durations_are_shown_largest_unit_first() -> None:
    assert format_duration(5400) == "1h30m"
    assert format_duration(86400 + 1) == "1d1s"
    assert format_duration(0) == "0s"
