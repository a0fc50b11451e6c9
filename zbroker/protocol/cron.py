"""When a recurring task fires: cron expressions, fixed intervals, and durations.

A schedule (docs/protocol.md §17) fires at the instants of one rule: `Every`, a
fixed interval counted from an anchor, or `Cron`, a standard five-field cron
expression evaluated in UTC or in an IANA time zone. Both answer the two
questions the broker asks: the first instant strictly after a time, and the last
instant at or before it (the one a late or restarted broker fires, once).
`parse_duration` reads the `30s`, `5m`, `1h30m`, `2d` of the CLI and clients.
Pure: times are seconds since the epoch, passed in; nothing reads the clock.

Cron, as Vixie cron and POSIX have it:
  minute hour day-of-month month day-of-week
  each field `*`, a value, a range `a-b`, a step `*/n`, `a-b/n` or `a/n` (from a
  to the field's end), or a comma-separated list of those; months JAN..DEC and
  days SUN..SAT by name (any case); day-of-week 0..7, 0 and 7 both Sunday.
  When both day fields are restricted (neither is exactly `*`) a day matching
  either fires; otherwise a day must match both. `@yearly` (`@annually`),
  `@monthly`, `@weekly`, `@daily` (`@midnight`) and `@hourly` stand for the
  usual expressions.
In a time zone with daylight saving time, a local time that occurs twice (clocks
go back) fires once, at its first occurrence; a local time that does not exist
(clocks go forward) fires at the change, the first instant after the gap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from zbroker.protocol import limits

_MINUTE = timedelta(minutes=1)
# How far a search for the next or last instant looks before it gives up: past
# the 8 years between two Feb 29ths (2096 to 2104), with room to spare.
_SEARCH_YEARS = 12
# Longest stretch of local time a zone's clock change skips (in practice an hour).
_GAP_MINUTES = 48 * 60

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# Days each month may have (February in a leap year).
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names of low, low+1, ... (months, days)


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, _MONTHS),
    _Field("day-of-week", 0, 7, _DAYS),
)

_TZ_NAME = re.compile(r"[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*")


def zone(name: str | None) -> tzinfo:
    """The time zone of an IANA name (None: UTC); ValueError for one that is unknown."""
    if name is None:
        return UTC
    if (
        not isinstance(name, str)
        or len(name.encode()) > limits.MAX_TZ_BYTES
        or not _TZ_NAME.fullmatch(name)
    ):
        raise ValueError(f"'tz' must be an IANA time zone name such as Europe/Paris, got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _value(text: str, f: _Field) -> int:
    upper = text.upper()
    if f.names and upper in f.names:
        return f.low + f.names.index(upper)
    if not text.isdigit():
        what = "a number or a name" if f.names else "a number"
        raise ValueError(f"{f.name} field: {text!r} is not {what}")
    number = int(text)
    if not f.low <= number <= f.high:
        raise ValueError(f"{f.name} field: {number} is out of {f.low}..{f.high}")
    return number


def _parse_field(text: str, f: _Field) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        if not part:
            raise ValueError(f"{f.name} field: empty list entry in {text!r}")
        span, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"{f.name} field: step {step_text!r} must be a number >= 1")
            step = int(step_text)
        if span == "*":
            low, high = f.low, f.high
        elif "-" in span:
            first, _, last = span.partition("-")
            low, high = _value(first, f), _value(last, f)
            if low > high:
                raise ValueError(f"{f.name} field: range {span!r} runs backwards")
        else:
            low = _value(span, f)
            high = f.high if slash else low
        values.update(range(low, high + 1, step))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class Cron:
    """A five-field cron expression, evaluated in the time zone `tz` (None: UTC)."""

    expr: str
    tz: str | None
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]  # of the month, 1..31
    months: frozenset[int]  # 1..12
    weekdays: frozenset[int]  # 0..6, Sunday 0
    any_day: bool  # day-of-month is `*`
    any_weekday: bool  # day-of-week is `*`
    zone: tzinfo = field(compare=False)
    _sorted_minutes: tuple[int, ...] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, expr: str, tz: str | None = None) -> Cron:
        """ValueError, saying what is wrong, for an expression or zone that cannot be."""
        if not isinstance(expr, str):
            raise ValueError("a cron expression must be a string")
        if len(expr.encode()) > limits.MAX_CRON_BYTES:
            raise ValueError(f"a cron expression has at most {limits.MAX_CRON_BYTES} bytes")
        text = expr.strip()
        text = _MACROS.get(text.lower(), text) if text.startswith("@") else text
        if text.startswith("@"):
            raise ValueError(f"unknown cron macro {expr.strip()!r}; known: {', '.join(_MACROS)}")
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(
                f"a cron expression has 5 fields (minute hour day-of-month month day-of-week),"
                f" {expr.strip()!r} has {len(parts)}"
            )
        minutes, hours, days, months, weekdays = (
            _parse_field(p, f) for p, f in zip(parts, _FIELDS, strict=True)
        )
        weekdays = frozenset(d % 7 for d in weekdays)
        any_day, any_weekday = parts[2] == "*", parts[4] == "*"
        if not any_day and any_weekday and not any(min(days) <= _MONTH_DAYS[m - 1] for m in months):
            raise ValueError(f"cron {expr.strip()!r} names a day no month it names has")
        return cls(
            expr.strip(),
            tz,
            minutes,
            hours,
            days,
            months,
            weekdays,
            any_day,
            any_weekday,
            zone(tz),
            tuple(sorted(minutes)),
        )

    # ------------------------------------------------------------ the instants

    def next_after(self, epoch: float) -> float:
        """The first instant of the rule strictly after `epoch`."""
        wall = self._wall(epoch)
        for _ in range(4 * _GAP_MINUTES):  # skips only the walls that map to <= epoch
            wall = self._next_wall(wall)
            instant = self._instant(wall)
            if instant > epoch:
                return instant
            wall += _MINUTE
        raise ValueError(f"cron {self.expr!r} has no instant after {epoch}")  # pragma: no cover

    def last_at_or_before(self, epoch: float) -> float:
        """The last instant of the rule at or before `epoch` (-inf: none in the last
        years the search reaches)."""
        # Start past any local time whose instant could still be <= epoch (a clock
        # set back repeats local times), then skip those that map after it.
        wall = self._wall(epoch + 7200.0)
        for _ in range(4 * _GAP_MINUTES):
            found = self._prev_wall(wall)
            if found is None:
                return -math.inf
            instant = self._instant(found)
            if instant <= epoch:
                return instant
            wall = found - _MINUTE
        return -math.inf  # pragma: no cover

    # ------------------------------------------------------ private: wall time

    def _wall(self, epoch: float) -> datetime:
        """The local time (naive, to the minute, first occurrence) at `epoch`."""
        local = datetime.fromtimestamp(epoch, self.zone)
        return local.replace(tzinfo=None, second=0, microsecond=0, fold=0)

    def _instant(self, wall: datetime) -> float:
        """The instant of a local time: its first occurrence; for a local time that
        does not exist, the first instant after the gap (a minute at a time, since
        that instant is the first local time that does exist)."""
        for _ in range(_GAP_MINUTES):
            instant = wall.replace(tzinfo=self.zone).timestamp()
            if self.zone is UTC or self._wall(instant) == wall:
                return instant
            wall += _MINUTE
        raise ValueError(f"time zone {self.tz!r} skips more than two days")  # pragma: no cover

    def _day_matches(self, day: datetime) -> bool:
        in_month = day.day in self.days
        in_week = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def _next_wall(self, wall: datetime) -> datetime:
        """The first local time at or after `wall` (to the minute) the fields match."""
        limit = wall.year + _SEARCH_YEARS
        while wall.year <= limit:
            if wall.month not in self.months:
                year, month = divmod(wall.month, 12)  # the first of next month
                wall = datetime(wall.year + year, month + 1, 1)
            elif not self._day_matches(wall):
                wall = wall.replace(hour=0, minute=0) + timedelta(days=1)
            elif wall.hour not in self.hours:
                wall = wall.replace(minute=0) + timedelta(hours=1)
            elif wall.minute not in self.minutes:
                later = [m for m in self._sorted_minutes if m > wall.minute]
                if later:
                    wall = wall.replace(minute=later[0])
                else:
                    wall = wall.replace(minute=0) + timedelta(hours=1)
            else:
                return wall
        raise ValueError(f"cron {self.expr!r} never fires")

    def _prev_wall(self, wall: datetime) -> datetime | None:
        """The last local time at or before `wall` the fields match (None: none in the
        years searched)."""
        limit = wall.year - _SEARCH_YEARS
        while wall.year >= limit:
            if wall.month not in self.months:
                wall = wall.replace(day=1, hour=0, minute=0) - _MINUTE
            elif not self._day_matches(wall):
                wall = wall.replace(hour=0, minute=0) - _MINUTE
            elif wall.hour not in self.hours:
                wall = wall.replace(minute=0) - _MINUTE
            elif wall.minute not in self.minutes:
                earlier = [m for m in self._sorted_minutes if m < wall.minute]
                if earlier:
                    wall = wall.replace(minute=earlier[-1])
                else:
                    wall = wall.replace(minute=0) - _MINUTE
            else:
                return wall
        return None


@dataclass(frozen=True, slots=True)
class Every:
    """Every `every_s` seconds (a whole number), counted from `anchor` (an instant in
    whole seconds since the epoch): anchor + every_s, anchor + 2 every_s, ..."""

    every_s: int
    anchor: int

    def next_after(self, epoch: float) -> float:
        steps = math.floor((epoch - self.anchor) / self.every_s) + 1
        return float(self.anchor + max(1, steps) * self.every_s)

    def last_at_or_before(self, epoch: float) -> float:
        steps = math.floor((epoch - self.anchor) / self.every_s)
        return -math.inf if steps < 1 else float(self.anchor + steps * self.every_s)


def check_every(every_s: object) -> int:
    """`every_s` as a whole number of seconds within the limits; ValueError otherwise."""
    low, high = limits.MIN_SCHEDULE_INTERVAL_S, limits.MAX_SCHEDULE_INTERVAL_S
    if (
        isinstance(every_s, bool)
        or not isinstance(every_s, int | float)
        or not math.isfinite(every_s)
        or every_s != int(every_s)
        or not low <= every_s <= high
    ):
        raise ValueError(f"'every_s' must be a whole number of seconds {low}..{high}")
    return int(every_s)


_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+)([dhms])")


def parse_duration(text: str) -> int:
    """`30s`, `5m`, `1h30m`, `2d` (units d, h, m, s, largest first; a bare number
    is seconds) -> seconds. ValueError for anything else."""
    spec = text.strip().lower() if isinstance(text, str) else ""
    if spec.isdigit():
        return int(spec)
    parts = _DURATION.findall(spec)
    units = [unit for _, unit in parts]
    if (
        not parts
        or "".join(n + u for n, u in parts) != spec
        or len(set(units)) != len(units)
        or units != sorted(units, key=lambda u: -_UNITS[u])
    ):
        raise ValueError(f"{text!r} is not a duration such as 30s, 5m, 1h30m or 2d")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def format_duration(seconds: int) -> str:
    """Seconds as `parse_duration` reads them: 5400 -> "1h30m", 0 -> "0s"."""
    out = []
    for unit, size in _UNITS.items():
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out) or "0s"


__all__ = ["Cron", "Every", "check_every", "format_duration", "parse_duration", "zone"]
