"""Recurring tasks: the schedules the broker keeps, and their firings.

Rules it keeps (docs/protocol.md §17):
  1. A schedule lives in the journal; SCHEDULE and UNSCHEDULE write it in the pass
     that answers them, so what a client was told survives `kill -9`.
  2. A firing is an ordinary durable task, enqueued through `DurableTasks.submit`
     with the idempotency key `schedule:<name>:<instant>` (the instant it was due,
     not when it ran); the schedule's `next_at` moves on in the same pass, so one
     commit holds both or neither: a restart neither skips a firing nor repeats it.
  3. When several instants of a schedule have passed by the time it fires (the
     broker was stopped, or its enqueues were refused), it fires once, for the
     latest; the next firing is then the rule's first instant after now.
  4. A refused firing (queue full, journal nearly full) moves nothing: it is
     counted, logged, and tried again at the next tick.
Never reads the clock (times come in as arguments) and never moves a task itself:
what becomes of a firing is DurableTasks' business.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from datetime import UTC, datetime
from typing import Any

from zbroker.core.model import Stats
from zbroker.core.settings import CoreSettings
from zbroker.core.sink import EventSink, Outputs
from zbroker.core.tasks import DurableTasks
from zbroker.protocol import limits, mdp, zbc
from zbroker.protocol.cron import Cron, Every

log = logging.getLogger("zbroker.core")

When = Cron | Every


def firing_key(name: str, instant: float) -> str:
    """The idempotency key of the firing of schedule `name` due at `instant`:
    `schedule:<name>:<instant in UTC, YYYY-MM-DDTHH:MM:SSZ>`."""
    stamp = datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"schedule:{name}:{stamp}"


@dataclasses.dataclass(slots=True)
class Rule:
    """One schedule: its definition, where it is (`next_at`), what it did."""

    name: str
    service: str
    when: When
    payload: tuple[bytes, ...]
    options: zbc.TaskOptions  # priority, ttl_s, max_attempts, timeout_s, headers
    created_at: float  # seconds since the epoch, as every time below
    next_at: float  # its next instant: what a firing moves on, in the same commit
    last_at: float | None = None  # the instant of its last firing
    last_id: str | None = None  # the task that firing enqueued
    fired: int = 0
    # Memory only: why its last firing was refused, and (monotonic) not before when
    # it is tried again.
    error: str | None = None
    retry_at: float = -math.inf

    def defined_as(self) -> tuple[Any, ...]:
        """What the caller chose (not the anchor of an interval, nor the progress)."""
        when = self.when
        rule = (when.every_s,) if isinstance(when, Every) else (when.expr, when.tz)
        options = self.options
        return (
            self.service,
            rule,
            self.payload,
            options.priority,
            options.ttl_s,
            options.max_attempts,
            options.timeout_s,
            options.headers,
        )

    def view(self) -> dict[str, Any]:
        """The schedule as SCHEDULE and SCHEDULES answer (docs/protocol.md §17)."""
        when, options = self.when, self.options
        every_s, expr, tz = (
            (when.every_s, None, None) if isinstance(when, Every) else (None, when.expr, when.tz)
        )
        return {
            "name": self.name,
            "service": self.service,
            "every_s": every_s,
            "cron": expr,
            "tz": tz,
            "priority": options.priority,
            "ttl_s": options.ttl_s,
            "max_attempts": options.max_attempts,
            "timeout_s": options.timeout_s,
            "headers": options.headers,
            "payload_bytes": sum(map(len, self.payload)),
            "created_at": self.created_at,
            "next_at": self.next_at,
            "last_at": self.last_at,
            "last_id": self.last_id,
            "fired": self.fired,
            "error": self.error,
        }

    def stored(self) -> dict[str, Any]:
        """The schedule as the journal keeps it (`loaded` reads it back)."""
        when, options = self.when, self.options
        data: dict[str, Any] = {
            "service": self.service,
            "payload": list(self.payload),
            "priority": options.priority,
            "ttl_s": options.ttl_s,
            "max_attempts": options.max_attempts,
            "timeout_s": options.timeout_s,
            "headers": options.headers,
            "created_at": self.created_at,
            "next_at": self.next_at,
            "last_at": self.last_at,
            "last_id": self.last_id,
            "fired": self.fired,
        }
        if isinstance(when, Every):
            data["every_s"], data["anchor"] = when.every_s, when.anchor
        else:
            data["cron"], data["tz"] = when.expr, when.tz
        return data

    @classmethod
    def loaded(cls, name: str, data: dict[str, Any]) -> Rule:
        """A schedule from the journal; KeyError, TypeError or ValueError if it is not one."""
        when: When
        if data.get("every_s") is not None:
            when = Every(int(data["every_s"]), int(data["anchor"]))
        else:
            when = Cron.parse(data["cron"], data.get("tz"))
        options = zbc.TaskOptions(
            priority=int(data.get("priority", 0)),
            ttl_s=data.get("ttl_s"),
            max_attempts=data.get("max_attempts"),
            timeout_s=data.get("timeout_s"),
            headers=dict(data.get("headers") or {}),
        )
        return cls(
            name,
            str(data["service"]),
            when,
            tuple(bytes(frame) for frame in data["payload"]),
            options,
            float(data["created_at"]),
            float(data["next_at"]),
            data.get("last_at"),
            data.get("last_id"),
            int(data.get("fired", 0)),
        )


class Schedules:
    """The schedules, loaded from the journal at start, and their firings. `wake_at`
    (monotonic) is when the next one is due, for the broker's tick."""

    def __init__(
        self,
        settings: CoreSettings,
        stats: Stats,
        out: Outputs,
        sink: EventSink,
        tasks: DurableTasks,
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._out = out
        self._sink = sink
        self._tasks = tasks
        self._rules: dict[str, Rule] = {}
        self.wake_at = math.inf

    def __len__(self) -> int:
        return len(self._rules)

    def load(self, now: float) -> None:
        """The schedules kept in the journal; those whose instants passed while the
        broker was stopped fire at the first tick, once each."""
        journal = self._tasks.journal
        assert journal is not None
        epoch = self._tasks.epoch(now)
        missed = 0
        for name, data in sorted(journal.schedules().items()):
            try:
                rule = Rule.loaded(name, data)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("schedule %r in the journal cannot be read (%s): left out", name, exc)
                continue
            self._rules[name] = rule
            missed += rule.next_at <= epoch
        if self._rules:
            log.info(
                "%d schedule(s) kept from the last run, %d due while the broker was stopped",
                len(self._rules),
                missed,
            )
        self._rewake()

    # --------------------------------------------------------------- calls

    def add(self, identity: bytes, msg: zbc.Schedule, now: float) -> None:
        """SCHEDULE: a new schedule, or one replacing the schedule of that name (the
        same definition again changes nothing: a resend is harmless)."""
        tasks = self._tasks
        if msg.service.encode().startswith(mdp.MMI_PREFIX):
            tasks.refuse(identity, msg.rid, zbc.E_BAD_REQUEST, "mmi.* names are reserved")
            return
        old = self._rules.get(msg.name)
        if old is None and len(self._rules) >= limits.MAX_SCHEDULES:
            why = f"the broker keeps {len(self._rules)} schedules (cap {limits.MAX_SCHEDULES})"
            tasks.refuse(identity, msg.rid, zbc.E_QUEUE_FULL, why)
            return
        epoch = tasks.epoch(now)
        when: When
        try:
            if msg.every_s is not None:
                when = Every(msg.every_s, math.floor(epoch))
            else:
                assert msg.cron is not None
                when = Cron.parse(msg.cron, msg.tz)
            next_at = when.next_after(epoch)
        except ValueError as exc:
            tasks.refuse(identity, msg.rid, zbc.E_BAD_REQUEST, str(exc))
            return
        options = msg.options
        rule = Rule(
            msg.name,
            msg.service,
            when,
            msg.payload,
            zbc.TaskOptions(
                priority=options.priority,
                ttl_s=options.ttl_s,
                max_attempts=options.max_attempts,
                timeout_s=options.timeout_s,
                headers=options.headers,
            ),
            epoch,
            next_at,
        )
        if old is not None and old.defined_as() == rule.defined_as():
            self._reply(identity, msg.rid, {"schedule": old.view(), "was": "unchanged"})
            return
        self._rules[msg.name] = rule
        self._store(rule)
        log.info(
            "schedule %s %s: %s to %s, next at %s",
            msg.name,
            "replaced" if old else "added",
            _rule_text(when),
            msg.service,
            _utc(next_at),
        )
        was = "new" if old is None else "replaced"
        self._reply(identity, msg.rid, {"schedule": rule.view(), "was": was})
        self._emit("schedule.added.", rule, {"next_at": next_at, "replaced": old is not None})
        self._rewake()

    def list(self, identity: bytes, msg: zbc.ListSchedules, now: float) -> None:
        """SCHEDULES: every schedule, by name."""
        views = [self._rules[name].view() for name in sorted(self._rules)]
        self._reply(identity, msg.rid, {"schedules": views})

    def remove(self, identity: bytes, msg: zbc.Unschedule, now: float) -> None:
        """UNSCHEDULE: the schedule goes (the tasks it enqueued stay)."""
        rule = self._rules.pop(msg.name, None)
        if rule is None:
            self._tasks.refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no schedule {msg.name!r}")
            return
        journal = self._tasks.journal
        assert journal is not None
        journal.delete_schedule(msg.name)
        log.info("schedule %s removed (it fired %d time(s))", msg.name, rule.fired)
        self._reply(identity, msg.rid, {"name": msg.name, "removed": True})
        self._emit("schedule.removed.", rule, {"fired": rule.fired})
        self._rewake()

    def summary(self) -> dict[str, Any]:
        """What STATS shows of the schedules: how many, and the next firing (epoch)."""
        next_at = min((r.next_at for r in self._rules.values()), default=None)
        return {"count": len(self._rules), "next_at": next_at}

    # -------------------------------------------------------------- timers

    def tick(self, now: float) -> None:
        """Fire the schedules that are due (each once, for its latest instant)."""
        if self.wake_at > now:
            return
        epoch = self._tasks.epoch(now)
        for rule in list(self._rules.values()):
            if rule.next_at <= epoch and rule.retry_at <= now:
                self._fire(rule, now, epoch)
        self._rewake()

    def _fire(self, rule: Rule, now: float, epoch: float) -> None:
        """Enqueue the firing of `rule`'s latest instant up to `epoch`, and move its
        `next_at` past `epoch` in the same pass; if the enqueue is refused, nothing
        moves and it is tried again at the next tick."""
        due = max(rule.next_at, rule.when.last_at_or_before(epoch))
        options = dataclasses.replace(rule.options, key=firing_key(rule.name, due))
        outcome = self._tasks.submit(rule.service, (rule.payload,), options, now)
        if isinstance(outcome, str):
            self._stats.schedule_firings_refused += 1
            if rule.error != outcome:
                log.warning(
                    "schedule %s: firing due at %s refused (%s); tried again at every tick",
                    rule.name,
                    _utc(due),
                    outcome,
                )
            rule.error = outcome
            rule.retry_at = now + self._settings.tick_interval_s
            return
        if rule.error is not None:
            log.info("schedule %s: firing due at %s enqueued after all", rule.name, _utc(due))
        rule.error, rule.retry_at = None, -math.inf
        rule.last_at, rule.last_id, rule.fired = due, outcome[0], rule.fired + 1
        rule.next_at = rule.when.next_after(max(epoch, due))
        self._store(rule)
        self._stats.schedules_fired += 1
        fired = {"id": outcome[0], "due_at": due, "late_s": epoch - due}
        self._emit("schedule.fired.", rule, fired)

    # ------------------------------------------------------------- private

    def _store(self, rule: Rule) -> None:
        journal = self._tasks.journal
        assert journal is not None
        journal.put_schedule(rule.name, rule.stored())

    def _rewake(self) -> None:
        """`wake_at`: the earliest (monotonic) time a schedule is due or retried."""
        offset = self._tasks.epoch(0.0)
        self.wake_at = min(
            (max(r.next_at - offset, r.retry_at) for r in self._rules.values()),
            default=math.inf,
        )

    def _reply(self, identity: bytes, rid: int, fields: dict[str, Any]) -> None:
        self._out.outbox.append([identity, *zbc.reply(rid, fields)])

    def _emit(self, kind: str, rule: Rule, fields: dict[str, Any]) -> None:
        """A schedule.* lifecycle event of `rule`, if a subscriber wants it."""
        sink = self._sink
        if sink.prefixes:
            sink.emit(kind + rule.name, {"name": rule.name, "service": rule.service, **fields})


def _utc(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rule_text(when: When) -> str:
    if isinstance(when, Every):
        return f"every {when.every_s}s"
    return f"cron {when.expr!r}" + (f" ({when.tz})" if when.tz else "")


__all__ = ["Rule", "Schedules", "firing_key"]
