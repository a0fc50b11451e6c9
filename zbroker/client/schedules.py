"""Recurring tasks (docs/protocol.md §17) in the Python clients: the calls' plans and
the record a schedule is read into.

The plans are sans-IO, like those of `_calls`, and driven by both clients
(`AsyncClient.schedule`, `.schedules`, `.unschedule` and the generated blocking
ones). Resending is safe: SCHEDULE of a definition the broker already holds
changes nothing, and UNSCHEDULE of a schedule already gone reads as False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zbroker.client import _calls
from zbroker.client._calls import Payload, Plan, Settings
from zbroker.client.errors import ReplyError, TaskNotFound
from zbroker.client.options import TaskOptions, seconds
from zbroker.protocol import cron as rules
from zbroker.protocol import limits, zbc


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as the broker keeps it: its rule, what each firing's task gets, and
    where it stands. Times are seconds since the epoch."""

    name: str
    service: str
    every_s: int | None  # fires every so many seconds, or
    cron: str | None  # at the instants of this cron expression,
    tz: str | None  # evaluated in this IANA time zone (None: UTC)
    priority: int
    ttl_s: float | None
    max_attempts: int | None  # None: the broker's default
    timeout_s: float | None
    headers: dict[str, Any]
    payload_bytes: int
    created_at: float
    next_at: float  # its next firing
    last_at: float | None  # the instant of its last firing (not when it ran)
    last_id: str | None  # the task its last firing enqueued
    fired: int  # firings so far
    error: str | None  # why its last firing was refused (it is tried again), if it was

    @property
    def rule(self) -> str:
        """The rule in words: `every 1h30m`, or `cron */5 * * * * (Europe/Paris)`."""
        if self.every_s is not None:
            return f"every {rules.format_duration(self.every_s)}"
        return f"cron {self.cron}" + (f" ({self.tz})" if self.tz else "")


def parse_schedule(view: Any) -> ScheduleInfo:
    """A schedule map of a SCHEDULE or SCHEDULES answer; ReplyError if it is not one."""
    if not isinstance(view, dict):
        raise ReplyError("bad_meta", "a schedule in the answer is not a map")
    try:
        return ScheduleInfo(
            name=str(view["name"]),
            service=str(view["service"]),
            every_s=view.get("every_s"),
            cron=view.get("cron"),
            tz=view.get("tz"),
            priority=int(view.get("priority", 0)),
            ttl_s=view.get("ttl_s"),
            max_attempts=view.get("max_attempts"),
            timeout_s=view.get("timeout_s"),
            headers=dict(view.get("headers") or {}),
            payload_bytes=int(view.get("payload_bytes", 0)),
            created_at=float(view["created_at"]),
            next_at=float(view["next_at"]),
            last_at=view.get("last_at"),
            last_id=view.get("last_id"),
            fired=int(view.get("fired", 0)),
            error=view.get("error"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplyError("bad_meta", f"a schedule in the answer is malformed: {exc}") from None


def check_name(name: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name.encode()) > limits.MAX_SCHEDULE_NAME_BYTES
        or not name.isprintable()
    ):
        raise ValueError(
            f"a schedule name is 1..{limits.MAX_SCHEDULE_NAME_BYTES} bytes of printable text"
        )
    return name


def plan_schedule(
    s: Settings,
    name: str,
    service: str | bytes,
    payload: Payload,
    every_s: float | None,
    cron: str | None,
    tz: str | None,
    options: TaskOptions,
) -> Plan[ScheduleInfo]:
    """SCHEDULE, its arguments checked now (the broker's rules, so a mistake is a
    ValueError here rather than a BadRequest later)."""
    check_name(name)
    target = _calls.service_name(service)
    frames = _calls.payload_frames(payload)
    if sum(map(len, frames)) > limits.MAX_SCHEDULE_PAYLOAD_BYTES:
        cap = limits.MAX_SCHEDULE_PAYLOAD_BYTES
        raise ValueError(f"a schedule's payload is at most {cap} bytes")
    if (every_s is None) == (cron is None):
        raise ValueError("give exactly one of every_s and cron")
    every = None
    if every_s is not None:
        if tz is not None:
            raise ValueError("tz goes with cron only: an interval is the same in any zone")
        every = rules.check_every(every_s)
    else:
        assert cron is not None
        rules.Cron.parse(cron, tz)
    wire = zbc.TaskOptions(
        priority=options.priority,
        ttl_s=seconds("ttl_s", options.ttl_s),
        max_attempts=options.max_attempts,
        timeout_s=seconds("timeout_s", options.timeout_s),
        headers=dict(options.headers) if options.headers else {},
    )
    return _schedule(s, name, target, frames, wire, every, cron, tz)


def _schedule(
    s: Settings,
    name: str,
    service: str,
    frames: tuple[bytes, ...],
    options: zbc.TaskOptions,
    every_s: int | None,
    cron: str | None,
    tz: str | None,
) -> Plan[ScheduleInfo]:
    def build(rid: int) -> list[bytes]:
        return zbc.schedule(rid, name, service, frames, options, every_s=every_s, cron=cron, tz=tz)

    answer = yield from _calls.call(s, "schedule", build, service=service)
    return parse_schedule(answer.meta.get("schedule"))


def plan_schedules(s: Settings) -> Plan[list[ScheduleInfo]]:
    """SCHEDULES: every schedule, by name."""
    meta = yield from _calls.plan_control(s, zbc.SCHEDULES)
    views = meta.get("schedules")
    if not isinstance(views, list):
        raise ReplyError("bad_meta", "SCHEDULES answer without a 'schedules' list")
    return [parse_schedule(view) for view in views]


def plan_unschedule(s: Settings, name: str) -> Plan[bool]:
    """UNSCHEDULE: True when the schedule was removed, False when there was none
    (also when a lost answer's call had removed it: resending is harmless)."""
    check_name(name)
    try:
        yield from _calls.plan_control(s, zbc.UNSCHEDULE, name=name)
    except TaskNotFound:
        return False
    return True


__all__ = ["ScheduleInfo", "parse_schedule", "plan_schedule", "plan_schedules", "plan_unschedule"]
