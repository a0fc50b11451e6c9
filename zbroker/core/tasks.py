"""Durable tasks: every state change of a task, kept in the journal.

Rules it keeps (DESIGN.md, "Delivery semantics"):
  1. The journal holds the tasks themselves. Memory holds only a bounded window
     of each service's best READY tasks (by priority, then enqueue order) and
     the attempts workers hold right now. Every state change is written to the
     journal in the same pass that decides it; the runtime commits once per
     pass and sends the outbox only after the commit, so nothing is confirmed
     (ids, results, TASKs) that a crash could take back. One exception: a
     START is only held by the journal (Journal.hold, lost by a crash), so a
     plain task costs two writes, its enqueue and its end; rule 3 fences the
     attempts a crash may have lost.
  2. A task moves only through `apply`, by a transition of the lifecycle table
     (core/lifecycle.py); `apply` keeps the service's counters and window, the
     history, the Stats counters, lifecycle events and waiters in step.
  3. Every delivery is an attempt with a new number (the fencing token). An
     attempt that ends without DONE (FAIL, timeout, the worker died or did not
     acknowledge) counts against max_attempts and is retried while attempts
     remain: after a FAIL or a timeout with exponential backoff and jitter (a
     FAIL's own delay_s wins), otherwise at once. The last allowed attempt
     ending without DONE dead-letters the task. An attempt cut short by the
     broker itself (it stopped or died while the attempt ran) is not charged:
     `recover` puts the task back at once and counts it in `uncharged`.
     Attempt numbers are never handed out twice, across crashes too: a START
     is not written, so after a crash a task may read READY with an attempt
     number that was handed out since. Each crashed life of the journal can
     have lost at most one such attempt per task (handing the task out again
     in the same life needs a write first: a requeue or a retry, committed
     before the TASK goes out), so `fence` skips one number per crash since
     the task's attempts were last numbered (its `crashes` stamp), uncharged.
  4. Final states (done, cancelled, expired) are kept for `retention_s`, with
     the result, so a requester can fetch it by id later; dead letters stay
     until redriven or dropped.
  5. Anything that waits on a task (REQUEST, RESULT with wait_s) is answered
     exactly once: when the task reaches a final state (dead included), or
     with its current state when the wait runs out.
A journal failure raises out of the core: the runtime stops the broker without
sending anything from that pass, and a restart recovers from the last commit.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from itertools import chain
from typing import Any

from zbroker.core import lifecycle
from zbroker.core.graph import Refusal, TaskGraph
from zbroker.core.lifecycle import (
    BLOCKED,
    DEAD,
    DELAYED,
    DONE,
    FINAL,
    INFLIGHT,
    LIVE,
    READY,
    STATE_NAMES,
    WAITING,
    IllegalTransition,
    Transition,
)
from zbroker.core.model import Delivery, Held, Service, Stats, TaskAttempt, Worker
from zbroker.core.placement import BEYOND_EVERY_S, BEYOND_WINDOW, Placement
from zbroker.core.services import ServiceDirectory
from zbroker.core.settings import CoreSettings
from zbroker.core.sink import EventSink, Outputs
from zbroker.core.streams import TaskStreams
from zbroker.core.waiters import Waiters
from zbroker.core.window import ReadyWindows
from zbroker.journal.base import Journal, JournalStats, TaskRecord, TaskState
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.events import DONE_FIELDS, ENQUEUED_FIELDS, STARTED_FIELDS
from zbroker.protocol.limits import MAX_BATCH_EVENTS, ZBC_MAX_BATCH

log = logging.getLogger("zbroker.core")

# Payloads up to this size stay in memory with their record while it waits in the
# window (at most window_per_service of them per service), so delivering it needs
# no read of the store.
_MEMO_PAYLOAD_BYTES = 4096
# Journal reads per timer pass (due delays, lapsed TTLs and retentions).
TIMER_BATCH = 1000
# Share of a size-limited journal that enqueues may not take (see _journal_refuses).
JOURNAL_RESERVE = 0.1
# Share of it that results may fill (the rest: what retries and deletions write).
RESULTS_LIMIT = 0.98
# Random bytes read from the OS at once for task ids (8 per id).
ID_NOISE_BLOCK = 4096
# "Any time from now on", for scans of the time-ordered indexes.
FAR_FUTURE_S = 100 * 365 * 86400.0


def record_view(record: TaskRecord) -> dict[str, Any]:
    """A task's record as STATUS shows it."""
    return {
        "id": record.id,
        "service": record.service,
        "state": STATE_NAMES[record.state],
        "attempt": record.attempt,
        "uncharged": record.uncharged,
        "max_attempts": record.max_attempts,
        "priority": record.priority,
        "created_at": record.created_at,
        "not_before": record.not_before,
        "expires_at": record.expires_at,
        "timeout_s": record.timeout_s,
        "key": record.key,
        "headers": record.headers,
        "stream_chunks": record.stream_chunks,
        "stream_bytes": record.stream_bytes,
        "error": record.error,
        "finished_at": record.finished_at,
        "keep_until": record.keep_until,
        "history": record.history,
        "owner": record.owner,
        "depends_on": record.depends_on,
        "blocked_on": record.blocked_on,
        "run_anyway": record.run_anyway,
        "input": record.input,
        "require": record.require,
        "prefer": record.prefer,
        "affinity": record.affinity,
        "concurrency_key": record.concurrency_key,
    }


def fence(record: TaskRecord, crashes: int) -> int:
    """Rule 3: before a start, skip the attempt numbers the journal's crashes since the
    task's attempts were last numbered may have handed out unwritten, one per crash,
    and count them in `uncharged` (never against max_attempts). `crashes` is the
    journal's now. Returns how many were skipped; the record is numbered as of now."""
    lost = crashes - record.crashes
    if lost > 0:
        record.attempt += lost
        record.uncharged += lost
    record.crashes = crashes
    return max(lost, 0)


def backoff_s(settings: CoreSettings, attempt: int, rng: random.Random) -> float:
    """Delay before the attempt after `attempt` (1-based): exponential, capped, equal jitter."""
    full = min(settings.retry_max_s, settings.retry_base_s * 2.0 ** min(attempt - 1, 60))
    return full / 2.0 + rng.uniform(0.0, full / 2.0)


class DurableTasks:
    """Durable tasks from ENQUEUE to their end: the journal, each service's window of
    ready tasks, the attempts workers hold, and the calls waiting for a task. The
    owner of every TaskAttempt."""

    def __init__(
        self,
        settings: CoreSettings,
        stats: Stats,
        out: Outputs,
        sink: EventSink,
        directory: ServiceDirectory,
        journal: Journal | None,
        epoch_offset: float,
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._out = out
        self._sink = sink
        self._directory = directory
        self.journal = journal
        self._routing: Delivery | None = None
        self._epoch_offset = epoch_offset
        self._rng = random.Random(settings.seed)
        # Random suffixes that make task ids unguessable: a peer that learns one id
        # (its own task's) cannot name another task. Read from the OS in blocks.
        self._noise: list[str] = []
        self._history_limit = settings.history_limit
        self._admitted = 0  # bytes of enqueues admitted since the journal's last commit
        self._admitted_at = -1  # the journal's commit count when that was reset
        # Task id -> the attempt a worker holds now, and that worker.
        self._attempts: dict[str, tuple[TaskAttempt, Worker]] = {}
        # Task id -> calls waiting for it to end: (client, rid, deadline).
        self._waiters = Waiters(
            out,
            journal,
            settings.max_waiters,
            settings.max_waiters_per_peer,
            settings.max_waiters_per_principal,
        )
        # Calls reading task streams (STREAM, READ).
        self.streams = TaskStreams(settings, stats, out, journal, self.record_of)
        # Authenticated brokers: tasks not yet finished (waiting or running) per owner,
        # kept in step by `apply` and counted from the journal at start.
        self.live_by_owner: dict[str, int] = {}
        self._windows = ReadyWindows(journal, settings.window_per_service)
        self.placement = Placement(self._windows)
        # READY tasks past a window read this pass, for its next choices: (service,
        # the pass's now, the records not taken yet).
        self._beyond: tuple[Service, float, list[TaskRecord]] | None = None
        # Tasks that wait for other tasks (depends_on).
        self.graph = TaskGraph(
            settings,
            journal,
            directory,
            sink,
            self.record_of,
            self.apply,
            lambda at: self._schedule_at(at - self._epoch_offset),
            self._unblocked,
        )
        self._next_due_at = math.inf  # monotonic time of the earliest delayed task
        # The broker is stopping (core/stopping.py): no task starts any more.
        self.stopping = False
        # The earliest time this part needs a tick (a due task, a deadline, a wait).
        self.wake_at = math.inf

    def connect(self, routing: Delivery) -> None:
        """The routing that delivers this part's tasks (made after it)."""
        self._routing = routing

    @property
    def waiter_count(self) -> int:
        """Calls waiting for a task to end, broker-wide."""
        return self._waiters.count

    def epoch(self, now: float) -> float:
        """The wall-clock time (written into records) at monotonic `now`."""
        return now + self._epoch_offset

    # ------------------------------------------------------- the one mover

    def apply(
        self,
        record: TaskRecord,
        move: Transition,
        epoch: float,
        service: Service | None = None,
        payload: tuple[bytes, ...] | None = None,
        result: tuple[bytes, ...] | None = None,
        detail: tuple[Any, ...] = (),
        new_record: bool = False,
    ) -> None:
        """Move `record` by `move` (a transition of core/lifecycle.py) and keep in step
        what follows: the service's waiting and ready counts and its window, the
        history entry, the Stats counter, the journal write (with `payload` or
        `result`), finished_at and retention, lifecycle events, waiters. The caller
        has set the record's own fields (attempt, error, not_before...) before.
        `new_record`: the record is not stored yet (its state is not read)."""
        journal = self.journal
        assert journal is not None
        old = None if new_record else record.state
        if old not in move.sources:
            raise IllegalTransition(old, move.event)
        new = move.target
        history = record.history
        history.append([move.history, epoch, *detail])
        if len(history) > self._history_limit:
            del history[0]
        counter = move.counter
        if counter is not None:
            stats = self._stats
            setattr(stats, counter, getattr(stats, counter) + 1)
        if record.owner is not None:
            self._count_owner(record.owner, old, new)
        if new is None:  # forgotten: a finished task, no longer counted anywhere
            journal.delete(record.id)
            return
        if service is None:
            service = self._directory.get(record.service.encode())
        if old is READY:
            service.ready_count -= 1
            service.waiting_count -= 1
            self._windows.remove(service, record.id)
        elif old is DELAYED or old is BLOCKED:
            service.waiting_count -= 1
        record.state = new
        if move.final:
            self._finish(record, epoch, old, service, result)
            return
        if move.held:
            journal.hold(record)  # a START: lost by a crash, fenced by rule 3
        else:
            journal.put(record, payload)
        if new is READY:
            service.waiting_count += 1
            service.ready_count += 1
            if payload is not None and sum(map(len, payload)) <= _MEMO_PAYLOAD_BYTES:
                # Goes with the record if the window keeps it: delivered from memory.
                record.frames_memo = payload
            self._windows.insert(service, record)
        elif new is DELAYED or new is BLOCKED:
            service.waiting_count += 1

    def _count_owner(self, owner: str, old: TaskState | None, new: TaskState | None) -> None:
        """Keep `live_by_owner` in step with one move of a task `owner` enqueued."""
        change = (new in LIVE) - (old in LIVE)
        if change:
            left = self.live_by_owner.get(owner, 0) + change
            if left > 0:
                self.live_by_owner[owner] = left
            else:
                self.live_by_owner.pop(owner, None)

    def _finish(
        self,
        record: TaskRecord,
        epoch: float,
        old: TaskState | None,
        service: Service,
        result: tuple[bytes, ...] | None,
    ) -> None:
        """What follows a task's end (part of `apply`): retention, the result kept,
        its figures, its lifecycle event, its waiters."""
        journal = self.journal
        assert journal is not None
        record.finished_at = epoch
        keep = record.state is not DEAD  # dead letters stay until redriven or dropped
        record.keep_until = epoch + self._settings.retention_s if keep else None
        journal.put(record)
        forget = keep and self._settings.retention_s <= 0  # counted already; nothing to keep
        if keep and not forget and result is not None:
            journal.put_result(record.id, result)
        new = record.state
        sink = self._sink
        if new is DEAD:
            service.figures.dead += 1
            log.warning(
                "task %s of %s dead after %d attempt(s): %s",
                record.id,
                record.service,
                record.attempt,
                record.error,
            )
        elif new is not DONE and sink.prefixes:
            sink.emit(
                f"task.{STATE_NAMES[new]}.{record.service}",
                {"id": record.id, "was": STATE_NAMES[old] if old is not None else None},
            )
        self._waiters.notify(record, result)
        if self.streams.count:
            self.streams.ended(record, result, epoch - self._epoch_offset)
        if new is DEAD and sink.prefixes:
            sink.emit(
                "task.dead." + record.service,
                {"id": record.id, "attempt": record.attempt, "reason": record.error},
            )
        if self.graph.edges:
            # After this task's own events, before its record may go: what waits for it.
            self.graph.ended(record, result, epoch)
        if forget:
            journal.delete(record.id)

    # ------------------------------------------------------------ delivery

    def next_ready(self, service: Service, now: float) -> TaskRecord | None:
        """Take the best READY task of `service` out of its window (the caller starts
        it at once); a task whose ttl passed meanwhile expires instead. None once
        the broker is stopping."""
        if self.stopping:
            return None
        take = self._windows.take
        while True:
            record = take(service)
            if record is None:
                return None
            epoch = now + self._epoch_offset
            if record.expires_at is not None and record.expires_at <= epoch:
                record.error = "its ttl passed before it started"
                self.apply(record, lifecycle.EXPIRE, epoch, service)
                continue
            return record

    def next_placed(self, service: Service, now: float) -> tuple[TaskRecord, Worker] | None:
        """The next task of `service` and its worker by the placement and flow-control
        rules (core/placement.py), the task out of its window (the caller starts it at
        once); a task whose ttl passed meanwhile expires instead. None once stopping."""
        if self.stopping:
            return None
        placement = self.placement
        windows = self._windows
        while True:
            windows.fill(service)
            chosen = placement.choose(service, now)
            if chosen is None:
                chosen = self._beyond_window(service, now)
            if chosen is None:
                return None  # placement.throttled_until: when to look again
            record, worker = chosen
            self._windows.remove(service, record.id)
            epoch = now + self._epoch_offset
            if record.expires_at is not None and record.expires_at <= epoch:
                record.error = "its ttl passed before it started"
                self.apply(record, lifecycle.EXPIRE, epoch, service)
                continue
            placement.started(service, record, worker, now)
            return record, worker

    def _beyond_window(self, service: Service, now: float) -> tuple[TaskRecord, Worker] | None:
        """Nothing of the window may run now: a choice among READY tasks past it. They
        are read from the journal at most once per BEYOND_EVERY_S, and the tasks of a
        read serve every choice of the same pass (`placement.throttled_until` says when
        to look again): a dispatch of many deliveries costs one read, not one each."""
        placement = self.placement
        throttled = placement.throttled_until
        if service.ready_count <= len(service.window):
            return None
        cached = self._beyond
        if cached is not None and cached[0] is service and cached[1] == now:
            beyond = cached[2]
        elif now < service.beyond_at:
            placement.throttled_until = min(throttled, service.beyond_at)
            return None
        else:
            beyond = self._windows.beyond(service, BEYOND_WINDOW)
            self._beyond = (service, now, beyond)
            service.beyond_at = now + BEYOND_EVERY_S
        chosen = placement.choose(service, now, beyond) if beyond else None
        placement.throttled_until = min(throttled, placement.throttled_until, service.beyond_at)
        if chosen is not None:
            beyond.remove(chosen[0])  # taken: not to be chosen again this pass
        return chosen

    def start(self, record: TaskRecord, worker: Worker, now: float) -> TaskAttempt:
        """Hold `record` (from next_ready) as delivered to `worker` (rule 1: written only
        when it ends a ttl); the attempt to hand over."""
        epoch = now + self._epoch_offset
        service = worker.service
        figures = service.figures
        ends_ttl = False
        if record.attempt == 0:
            figures.observe_wait(max(0.0, epoch - max(record.created_at, record.not_before)))
            # ttl_s bounds the wait for a first start: once started, a task no longer
            # expires (a retry, or a take-back from a dead worker, runs). That start
            # is written, not held: a crash must not make it read as never started,
            # and expire, when it ran.
            ends_ttl = record.expires_at is not None
            record.expires_at = None
        else:
            figures.redeliveries += 1
        assert self.journal is not None
        skipped = fence(record, self.journal.crashes)
        if skipped:
            self._stats.attempts_fenced += skipped
        record.attempt += 1
        worker_hex = worker.alias
        self.apply(
            record, lifecycle.START, epoch, service, None, None, (record.attempt, worker_hex)
        )
        if ends_ttl:
            self.journal.put(record)
        body = record.frames_memo
        if body is None:
            body = tuple(self.journal.payload(record.id) or ())
        else:
            record.frames_memo = None  # the attempt holds it from here
        attempt = TaskAttempt(self, record, service.name, body, now)
        if record.timeout_s is not None:
            attempt.deadline = now + record.timeout_s
            if attempt.deadline < self.wake_at:
                self.wake_at = attempt.deadline
        self._attempts[record.id] = (attempt, worker)
        sink = self._sink
        if sink.prefixes:
            # Rows appended inline (as in complete): a call per event cost about
            # 2,400 instructions more (bench/instructions.py --shape events).
            topic = sink.started_topics.get(record.service, "")
            if topic == "":
                topic = sink.task_topic(sink.started_topics, "task.started.", record.service)
            if topic is not None:
                row = (record.id, record.attempt, worker_hex)
                events = self._out.events
                if events and events[-1][0] is topic and len(events[-1][2]) < MAX_BATCH_EVENTS:
                    events[-1][2].append(row)
                else:
                    events.append((topic, STARTED_FIELDS, [row]))
        return attempt

    # --------------------------------- the end of a worker's hold (AttemptOwner)

    def complete(self, held: Held, body: tuple[bytes, ...], now: float) -> None:
        """DONE: the task is done and its result kept."""
        assert type(held) is TaskAttempt
        record = held.record
        del self._attempts[record.id]
        size = sum(map(len, body))
        if not self._journal_takes(size):
            js = self._journal_stats()
            reason = (
                f"its result ({size} bytes) did not fit in the journal "
                f"({js.bytes_live >> 20} of {js.bytes_max >> 20} MiB in use)"
            )
            self._end_attempt(record, reason, now, None)  # runs again after a backoff
            return
        epoch = now + self._epoch_offset
        service = self._directory.get(held.service)
        figures = service.figures
        figures.done += 1
        figures.observe_run(max(0.0, now - held.started_at))
        record.error = None
        sink = self._sink
        if sink.prefixes:
            topic = sink.done_topics.get(record.service, "")
            if topic == "":
                topic = sink.task_topic(sink.done_topics, "task.done.", record.service)
            if topic is not None:
                row = (record.id, held.attempt, record.headers)
                events = self._out.events
                if events and events[-1][0] is topic and len(events[-1][2]) < MAX_BATCH_EVENTS:
                    events[-1][2].append(row)
                else:
                    events.append((topic, DONE_FIELDS, [row]))
        self.apply(record, lifecycle.COMPLETE, epoch, service, None, body, (held.attempt,))

    def fail(self, held: Held, reason: str, delay_s: float | None, retry: bool, now: float) -> None:
        """The worker's FAIL: retried after `delay_s` (None: backoff), or dead-lettered
        when no attempt is left or the worker said no retry can succeed."""
        assert type(held) is TaskAttempt
        del self._attempts[held.tid]
        self._end_attempt(held.record, reason, now, delay_s, final=not retry)

    def timed_out(self, held: Held, now: float) -> None:
        """The attempt ran past the task's timeout_s: retried after a backoff."""
        assert type(held) is TaskAttempt
        timeout = held.record.timeout_s or 0.0
        reason = f"attempt {held.attempt} timed out after {timeout:g}s"
        del self._attempts[held.tid]
        self._end_attempt(held.record, reason, now, None)

    def not_acknowledged(self, held: Held, now: float) -> None:
        """Not acknowledged in time: runs again at once (the attempt counts)."""
        self._stats.requeued += 1
        self.take_back(held, "not acknowledged in time", now)

    def take_back(self, held: Held, reason: str, now: float) -> None:
        """The worker is gone: runs again at once (the attempt counts)."""
        assert type(held) is TaskAttempt
        del self._attempts[held.tid]
        self._end_attempt(held.record, reason, now, 0.0)

    def progress(self, held: Held, data: tuple[bytes, ...], now: float) -> None:
        """PROGRESS goes into the task's history (with up to 200 bytes of its first
        frame) and out as a task.progress event."""
        assert type(held) is TaskAttempt
        record = held.record
        note = data[0][:200].decode(errors="replace") if data else ""
        epoch = now + self._epoch_offset
        self.apply(record, lifecycle.PROGRESS, epoch, None, None, None, (held.attempt, note))
        if self._sink.prefixes:
            self._sink.emit(
                "task.progress." + record.service,
                {"id": held.tid, "attempt": held.attempt, "data": list(data)},
            )

    def chunk(self, held: Held, data: tuple[bytes, ...], now: float) -> None:
        """CHUNK: appended to the task's stream (its readers are sent them after the
        commit). Past a stream cap: nothing is stored, the worker is told why and the
        task is dead-lettered; past the journal's room: the attempt fails (a retry)."""
        assert type(held) is TaskAttempt
        record = held.record
        journal = self.journal
        assert journal is not None
        size = sum(map(len, data))
        settings = self._settings
        chunks, total = record.stream_chunks + len(data), record.stream_bytes + size
        capped = None
        if chunks > settings.max_stream_chunks:
            capped = f"its stream went past the cap of {settings.max_stream_chunks} chunks"
        elif total > settings.max_stream_bytes:
            capped = f"its stream went past the cap of {settings.max_stream_bytes} bytes"
        if capped is not None:
            self._stats.streams_capped += 1
            self._stop_attempt(record, capped, now, final=True)
            return
        if not self._journal_takes(size):
            js = self._journal_stats()
            reason = (
                f"its stream's chunks ({size} bytes) did not fit in the journal "
                f"({js.bytes_live >> 20} of {js.bytes_max >> 20} MiB in use)"
            )
            self._stop_attempt(record, reason, now, final=False)
            return
        offset = record.stream_chunks
        journal.put_chunks(record.id, offset, held.attempt, data)
        record.stream_chunks, record.stream_bytes = chunks, total
        self._stats.chunks_received += len(data)
        if self.streams.count:
            self.streams.appended(record, offset, held.attempt, data, now)

    def _stop_attempt(self, record: TaskRecord, why: str, now: float, final: bool) -> None:
        """The broker ends a running attempt itself: its worker is told why (CANCEL
        with the reason), and the task retries or, `final`, is dead-lettered."""
        attempt, worker = self._attempts.pop(record.id)
        routing = self._routing
        assert routing is not None
        routing.withdraw(worker, attempt, now, why, tell=True)
        self._end_attempt(record, why, now, None, final=final)

    def _end_attempt(
        self,
        record: TaskRecord,
        reason: str,
        now: float,
        delay_s: float | None,
        final: bool = False,
    ) -> None:
        """An attempt ended without DONE: retry (after `delay_s`; None: backoff) or
        dead-letter (no attempts left, or `final`: the worker said no retry can succeed)."""
        epoch = now + self._epoch_offset
        record.error = reason
        charged = record.attempt - record.uncharged
        dead = final or charged >= record.max_attempts
        service = self._directory.get(record.service.encode())
        service.figures.failed += 1
        if self._sink.prefixes:
            self._sink.emit(
                "task.failed." + record.service,
                {"id": record.id, "attempt": record.attempt, "reason": reason, "retry": not dead},
            )
        if dead:
            self.apply(record, lifecycle.DEAD_LETTER, epoch, service, None, None, (reason,))
            return
        if delay_s is None:
            delay_s = backoff_s(self._settings, charged, self._rng)
        if delay_s > 0:
            record.not_before = epoch + delay_s
            detail = (reason, round(delay_s, 3))
            self.apply(record, lifecycle.RETRY_LATER, epoch, service, None, None, detail)
            self._schedule_at(now + delay_s)
        else:
            self.apply(record, lifecycle.REQUEUE, epoch, service, None, None, (reason,))

    def caller_gone(self, identity: bytes, now: float) -> None:
        """A ZBC01 answer to `identity` could not be sent, or its connection closed: its
        waiting calls end, and its stream calls are abandoned."""
        dropped = self._waiters.forget_peer(identity)
        if dropped:
            log.info("%d waiting call(s) of %s dropped: connection gone", dropped, identity.hex())
        if self.streams.count:
            for call in self.streams.forget_peer(identity):
                self._abandoned(call.task_id, call.cancel_on_abandon, now)

    # ------------------------------------------------------------ streams

    def read(
        self, identity: bytes, msg: zbc.Read, now: float, principal: str | None = None
    ) -> None:
        """READ: follow a task's stream from an offset (its chunks, then its end)."""
        record = self.record_of(msg.id)
        if record is None:
            self.refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no task {msg.id!r}")
        elif (why := self.streams.full(identity, principal)) is not None:
            self.refuse(identity, msg.rid, zbc.E_TOO_MANY_WAITERS, why)
        else:
            self.streams.open(
                identity, msg.rid, record, msg.offset, msg.wait_s, msg.follow, principal, now
            )

    def close(self, identity: bytes, msg: zbc.Close, now: float) -> None:
        """CLOSE: a stream call abandoned (its task cancelled if the call asked)."""
        call = self.streams.close(identity, msg.rid)
        if call is not None:
            self._abandoned(call.task_id, call.cancel_on_abandon, now)

    def _abandoned(self, task_id: str, cancel: bool, now: float) -> None:
        """A stream call ended before its task: the task is cancelled if it asked, and
        the task has not ended (another call of it may still read)."""
        self._stats.streams_abandoned += 1
        if not cancel:
            return
        record = self.record_of(task_id)
        if record is not None and record.state not in FINAL:
            record.error = "abandoned by its reader"
            self._cancel(record, now)

    def record_of(self, task_id: str) -> TaskRecord | None:
        """The task's record: the live one while a worker holds it, else the stored one."""
        held = self._attempts.get(task_id)
        if held is not None:
            return held[0].record
        journal = self.journal
        assert journal is not None
        return journal.get(task_id)

    def _unblocked(self, service: Service, epoch: float) -> None:
        """A task of `service` left BLOCKED for READY: its workers may take it now."""
        if service.ready:
            routing = self._routing
            assert routing is not None
            routing.dispatch(service, epoch - self._epoch_offset)

    def holder(self, task_id: str) -> tuple[TaskAttempt, Worker] | None:
        """The attempt of `task_id` a worker holds now, and that worker."""
        return self._attempts.get(task_id)

    # ------------------------------------------------------------ start

    def recover(self, now: float) -> None:
        """Rebuild the counters from the journal; attempts in flight at the last stop
        go back to their queues, not charged against max_attempts."""
        journal = self.journal
        assert journal is not None
        epoch = now + self._epoch_offset
        directory = self._directory
        for name, per_state in journal.counts().items():
            service = directory.get(name.encode())
            service.ready_count = per_state.get(READY, 0)
            service.waiting_count = (
                service.ready_count + per_state.get(DELAYED, 0) + per_state.get(BLOCKED, 0)
            )
        for name, options in journal.service_options().items():
            service = directory.get(name.encode())
            service.paused = options.get("paused") is True
            limit = options.get("limit")
            service.limit = limit if type(limit) is int and limit > 0 else None
            key_limit = options.get("key_limit")
            service.key_limit = key_limit if type(key_limit) is int and key_limit > 0 else None
            for name, per_key in (("rate", False), ("key_rate", True)):
                rate = options.get(name)
                if isinstance(rate, list) and len(rate) == 2:
                    service.set_rate(float(rate[0]), int(rate[1]), per_key, now)
            log.info(
                "service %s: %s, concurrency limit %s, per key %s, rate %s, per key %s "
                "(kept from the last run)",
                name,
                "paused" if service.paused else "not paused",
                service.limit or "none",
                service.key_limit or "none",
                f"{service.rate.rate:g}/s" if service.rate is not None else "none",
                f"{service.key_rate[0]:g}/s" if service.key_rate is not None else "none",
            )
        recovered = journal.inflight()
        for record in recovered:
            # The broker cut the attempt short, not the task or its worker: it runs
            # again at once, and the attempt is not charged against max_attempts.
            # Its number stays used, so a late result of it is still refused.
            record.uncharged += 1
            # The stored attempt was the last one handed out (another needs a
            # written requeue first): numbered as of now, nothing to fence.
            record.crashes = journal.crashes
            record.error = "the broker stopped during the attempt"
            # Chunks of the attempt were committed without their record: count them.
            record.stream_chunks, record.stream_bytes = journal.stream_size(record.id)
            self.apply(record, lifecycle.RECOVER, epoch, None, None, None, (record.attempt,))
        if recovered:
            log.info(
                "%d task(s) in flight at the last stop requeued (attempts not charged)",
                len(recovered),
            )
        if journal.crashed:
            log.warning(
                "the journal's last life (%d) ended without a clean stop: tasks stored "
                "before it skip one attempt number at their next start, not charged",
                journal.life - 1,
            )
        self._schedule_due(now)

    def count_owners(self) -> None:
        """Count each principal's tasks not yet finished (`live_by_owner`) from the
        journal: an authenticated broker's start reads every waiting task once."""
        journal = self.journal
        assert journal is not None
        counts = self.live_by_owner
        counts.clear()

        def count(records: list[TaskRecord]) -> None:
            for record in records:
                if record.owner is not None:
                    counts[record.owner] = counts.get(record.owner, 0) + 1

        delayed = 0
        for name, per_state in journal.counts().items():
            delayed += per_state.get(DELAYED, 0)
            after: tuple[int, int] | None = None
            while True:
                page = journal.ready(name, TIMER_BATCH, after)
                count(page)
                if len(page) < TIMER_BATCH:
                    break
                after = (page[-1].priority, page[-1].seq)
            after_seq: int | None = None
            while per_state.get(BLOCKED, 0):
                blocked = journal.blocked(name, TIMER_BATCH, after_seq)
                count(blocked)
                if len(blocked) < TIMER_BATCH:
                    break
                after_seq = blocked[-1].seq
        if delayed:
            count(journal.due(FAR_FUTURE_S * 2, delayed))
        count(journal.inflight())

    # --------------------------------------------------------- client calls

    def refuse(self, identity: bytes, rid: int, code: str, message: str) -> None:
        """Answer a ZBC01 call with ERROR (and count it)."""
        self._stats.calls_refused += 1
        if code != zbc.E_NOT_FOUND:
            log.info("call %d from %s refused (%s): %s", rid, identity.hex(), code, message)
        self._out.outbox.append([identity, *zbc.error(rid, code, message)])

    def _journal_stats(self) -> JournalStats:
        assert self.journal is not None
        js = self.journal.stats
        if js.commits != self._admitted_at:  # figures moved: what was admitted is in them
            self._admitted_at, self._admitted = js.commits, 0
        return js

    def _journal_takes(self, size: int) -> bool:
        """Whether a result of `size` bytes fits in the journal, reserve included (it
        is what the reserve is for); counted as admitted if so. A result that does not
        fit would fail the pass's commit and stop the broker."""
        assert self.journal is not None
        js = self.journal.stats  # as _journal_stats, inline: this runs for every DONE
        if js.commits != self._admitted_at:
            self._admitted_at, self._admitted = js.commits, 0
        if not js.bytes_max:
            return True
        need = 2 * size + 1024  # the result, its key and B-tree slack
        if js.bytes_live + self._admitted + need <= js.bytes_max * RESULTS_LIMIT:
            self._admitted += need
            return True
        return False

    def _journal_refuses(self, identity: bytes, msg: zbc.Enqueue, new: int) -> bool:
        """Refuse (queue_full) an ENQUEUE that would bring a size-limited journal near
        its limit: JOURNAL_RESERVE of it stays for what finishing, retrying and
        requeueing tasks write, so the broker never has to stop for a full journal
        because of what clients sent. Counts what this pass admitted already, since
        the journal's figures move only at commits."""
        js = self._journal_stats()
        if not js.bytes_max:
            return False
        # A record, its index entries and B-tree slack, besides its payload; every
        # record repeats the call's headers (one small call can ask for many tasks).
        headers = msg.options.headers
        per_task = 512 + (len(ext.pack_meta(headers)) if headers else 0)
        incoming = 2 * (sum(map(len, chain.from_iterable(msg.payloads))) + per_task * new)
        allowed = js.bytes_max * (1.0 - JOURNAL_RESERVE)
        if js.bytes_live + self._admitted + incoming <= allowed:
            self._admitted += incoming
            return False
        self.refuse(
            identity,
            msg.rid,
            zbc.E_QUEUE_FULL,
            f"the journal is nearly full ({js.bytes_live >> 20} of {js.bytes_max >> 20} MiB "
            f"in use; {JOURNAL_RESERVE:.0%} is kept for finishing tasks): nothing was stored; "
            "raise --journal-max-mib, or let tasks finish",
        )
        return True

    def _stored_keys(
        self, service_name: str, keys: Sequence[str | None]
    ) -> tuple[dict[int, str], int]:
        """The ids of tasks already stored under the call's idempotency keys (by the
        key's index), and how many tasks the call will store."""
        journal = self.journal
        assert journal is not None
        held: dict[int, str] = {}
        new = len(keys)
        fresh: set[str] = set()  # keys new to the journal: a repeat within the call is one task
        for i, key in enumerate(keys):
            if key is not None:
                if (task_id := journal.find_key(service_name, key)) is not None:
                    held[i] = task_id
                    new -= 1
                elif key in fresh:
                    new -= 1
                else:
                    fresh.add(key)
        return held, new

    def _admits(
        self, identity: bytes, msg: zbc.Enqueue, service: Service, new: int, owner: str | None
    ) -> bool:
        """Whether the call may store `new` tasks (else it is refused, and answered).
        Tasks already stored under their key never count: a resend is not refused."""
        if owner is not None and new:
            mine, cap = self.live_by_owner.get(owner, 0), self._settings.max_tasks_per_principal
            if mine + new > cap:
                self.refuse(
                    identity,
                    msg.rid,
                    zbc.E_QUEUE_FULL,
                    f"principal {owner} has {mine} tasks not yet finished (cap {cap})",
                )
                return False
        cap = self._settings.max_tasks_per_service
        if new and service.waiting_count + new > cap:
            self.refuse(
                identity,
                msg.rid,
                zbc.E_QUEUE_FULL,
                f"{msg.service} holds {service.waiting_count} waiting tasks (cap {cap})",
            )
            return False
        if new and self._journal_refuses(identity, msg, new):
            return False
        if msg.wait:
            full = self._waiters.full if msg.follow is None else self.streams.full
            if (why := full(identity, owner)) is not None:
                self.refuse(identity, msg.rid, zbc.E_TOO_MANY_WAITERS, why)
                return False
        return True

    def _more_noise(self) -> list[str]:
        """A block of id suffixes: 64 random bits each, in hex."""
        block = os.urandom(ID_NOISE_BLOCK).hex()
        self._noise = [block[i : i + 16] for i in range(0, len(block), 16)]
        return self._noise

    def enqueue(
        self, identity: bytes, msg: zbc.Enqueue, now: float, owner: str | None = None
    ) -> None:
        """ENQUEUE (and REQUEST, which waits): store the tasks, answer with their ids.
        `owner`: the principal that sent it (authenticated brokers), kept with each
        task."""
        journal = self.journal
        assert journal is not None
        name = msg.service.encode()
        if name.startswith(mdp.MMI_PREFIX):
            self.refuse(identity, msg.rid, zbc.E_BAD_REQUEST, "mmi.* names are reserved")
            return
        service = self._directory.get(name)
        count = len(msg.payloads)
        options = msg.options
        keys = options.keys or (options.key,) * count
        if options.debounce_s is not None and self._debounced(identity, msg, service, now, owner):
            return
        held, new = self._stored_keys(msg.service, keys)
        deps = self._dependencies(identity, msg, new) if options.depends_on else []
        if deps is None or not self._admits(identity, msg, service, new, owner):
            return
        epoch = now + self._epoch_offset
        not_before, expires_at, move = self._timing(options, epoch)
        max_attempts = options.max_attempts or self._settings.default_max_attempts
        ids: list[str] = []
        existing: list[int] = []
        stored_keys: dict[str, str] = {}  # keys of the tasks this call stores -> their ids
        topic = "task.enqueued." + msg.service
        sink = self._sink
        enqueued: list[Any] | None = [] if sink.prefixes and sink.wants(topic) else None
        priority, event_not_before, headers = options.priority, not_before or None, options.headers
        apply = self.apply
        noise = self._noise
        crashes = journal.crashes
        for i, payload in enumerate(msg.payloads):
            key = keys[i]
            if key is not None:
                # Stored before this call (looked up above), or by an earlier task of it.
                task_id = held.get(i) or stored_keys.get(key)
                if task_id is not None:
                    ids.append(task_id)
                    existing.append(i)
                    continue
            seq = journal.next_seq()
            if not noise:
                noise = self._more_noise()
            record = TaskRecord(
                # `t<seq>-<64 random bits>`, in hex: ordered by enqueue, unguessable.
                id=f"t{seq:x}-{noise.pop()}",
                service=msg.service,
                state=READY,  # set by apply
                seq=seq,
                created_at=epoch,
                priority=priority,
                not_before=not_before,
                expires_at=expires_at,
                max_attempts=max_attempts,
                timeout_s=options.timeout_s,
                key=key,
                headers=headers,
                owner=owner,
                require=options.require,
                prefer=options.prefer,
                affinity=options.affinity,
                concurrency_key=options.concurrency_key,
                crashes=crashes,  # no attempt to fence yet
            )
            if enqueued is not None:
                enqueued.append((record.id, priority, event_not_before, headers))
            if not deps:
                apply(record, move, epoch, service, payload, None, (), True)
            else:
                enqueued = self._attach(record, deps, msg, service, payload, epoch, enqueued)
            ids.append(record.id)
            if key is not None:
                stored_keys[key] = record.id
        if enqueued:
            sink.add(topic, ENQUEUED_FIELDS, enqueued)
        self._stats.tasks_enqueued += count - len(existing)
        service.figures.enqueued += count - len(existing)
        self._stats.tasks_deduplicated += len(existing)
        if not_before > epoch:
            self._schedule_due(now)
        self._answer_enqueue(identity, msg, ids, existing, now, owner)
        if service.ready:
            routing = self._routing
            assert routing is not None
            routing.dispatch(service, now)

    def _attach(
        self,
        record: TaskRecord,
        deps: list[TaskRecord],
        msg: zbc.Enqueue,
        service: Service,
        payload: tuple[bytes, ...],
        epoch: float,
        enqueued: list[Any] | None,
    ) -> list[Any] | None:
        """Store a new task with dependencies (core/graph.py), its `task.enqueued` event
        (with those of the call before it) ahead of what attaching it announces."""
        if enqueued:
            self._sink.add("task.enqueued." + msg.service, ENQUEUED_FIELDS, enqueued)
            enqueued = []
        self.graph.attach(record, deps, msg.options, service, payload, epoch)
        return enqueued

    def _debounced(
        self,
        identity: bytes,
        msg: zbc.Enqueue,
        service: Service,
        now: float,
        owner: str | None,
    ) -> bool:
        """ENQUEUE with `debounce_s` of a key a task holds: while that task still waits,
        its payload (and headers) become this call's, and the call is answered with its
        id (True). A task of the key that has started or ended gives the key up, and
        the call stores a new task (False), as it does when no task holds the key."""
        journal = self.journal
        assert journal is not None and msg.options.key is not None
        task_id = journal.find_key(msg.service, msg.options.key)
        record = None if task_id is None else self.record_of(task_id)
        if task_id is None or record is None:
            return False
        if record.owner != owner:
            # Another principal's task: its payload is not the caller's to replace.
            self.refuse(
                identity,
                msg.rid,
                zbc.E_FORBIDDEN,
                f"key {msg.options.key!r} of {msg.service} is held by another principal's task",
            )
            return True
        if record.state not in WAITING:
            record.key = None  # the key now names the next debounced task
            journal.put(record)
            return False
        if self._journal_refuses(identity, msg, 1):
            return True
        live = service.records.get(task_id, record)  # the window's copy, if there
        payload = msg.payloads[0]
        live.headers = msg.options.headers
        small = sum(map(len, payload)) <= _MEMO_PAYLOAD_BYTES
        live.frames_memo = payload if small and live is not record else None
        live.history.append(["debounced", now + self._epoch_offset])
        if len(live.history) > self._history_limit:
            del live.history[0]
        journal.put(live, payload)
        self._stats.tasks_debounced += 1
        self._answer_enqueue(identity, msg, [task_id], [0], now, owner, replaced=True)
        return True

    def _dependencies(self, identity: bytes, msg: zbc.Enqueue, new: int) -> list[TaskRecord] | None:
        """The tasks the call's new tasks depend on ([] for none); None when the call
        is refused for them (and answered)."""
        if not msg.options.depends_on or not new:
            return []
        try:
            return self.graph.resolve(msg.options.depends_on)
        except Refusal as refusal:
            self.refuse(identity, msg.rid, refusal.code, refusal.message)
            return None

    @staticmethod
    def _timing(options: zbc.TaskOptions, epoch: float) -> tuple[float, float | None, Transition]:
        """A new task's not_before and expires_at, and how it is stored (due or later)."""
        not_before = options.not_before or 0.0
        if options.delay_s:
            not_before = epoch + options.delay_s
        elif options.debounce_s:
            not_before = epoch + options.debounce_s
        expires_at = None if options.ttl_s is None else epoch + options.ttl_s
        move = lifecycle.ENQUEUE_DELAYED if not_before > epoch else lifecycle.ENQUEUE
        return not_before, expires_at, move

    def _answer_enqueue(
        self,
        identity: bytes,
        msg: zbc.Enqueue,
        ids: list[str],
        existing: list[int],
        now: float,
        owner: str | None,
        replaced: bool = False,
    ) -> None:
        """The ids (and which were stored before); a REQUEST also waits for the first.
        `replaced`: a debounced enqueue replaced the payload of the one task."""
        fields: dict[str, Any] = {"ids": ids}
        if existing:
            fields["existing"] = existing
        if replaced:
            fields["replaced"] = [0]
        self._out.outbox.append([identity, *zbc.reply(msg.rid, fields)])
        if msg.follow is not None:
            record = self.record_of(ids[0])
            assert record is not None
            self.streams.open(identity, msg.rid, record, 0, msg.wait_s, msg.follow, owner, now)
        elif msg.wait:
            assert self.journal is not None
            stored = self.journal.get(ids[0]) if existing else None
            if stored is not None and stored.state in FINAL:
                self._waiters.answer(
                    identity, msg.rid, stored
                )  # a resent REQUEST of a finished task
            else:
                wait_s = self._settings.request_wait_s if msg.wait_s is None else msg.wait_s
                self._wait(identity, msg.rid, ids[0], now + wait_s, owner)

    def result(
        self, identity: bytes, msg: zbc.Result, now: float, principal: str | None = None
    ) -> None:
        """RESULT: the task's outcome now, or when it ends (within wait_s). `principal`:
        who asks, on an authenticated broker (its waiting calls are capped)."""
        assert self.journal is not None
        record = self.journal.get(msg.id)
        if record is None:
            self.refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no task {msg.id!r}")
        elif record.state in FINAL or msg.wait_s <= 0:
            self._waiters.answer(identity, msg.rid, record)
        elif (why := self._waiters.full(identity, principal)) is not None:
            self.refuse(identity, msg.rid, zbc.E_TOO_MANY_WAITERS, why)
        else:
            self._wait(identity, msg.rid, msg.id, now + msg.wait_s, principal)

    def cancel(self, identity: bytes, msg: zbc.Cancel, now: float) -> None:
        """CANCEL: a waiting or running task ends as cancelled (its worker is told)."""
        record = self.record_of(msg.id)
        if record is None:
            self.refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no task {msg.id!r}")
            return
        was = record.state
        if was in FINAL:
            self.refuse(
                identity, msg.rid, zbc.E_CONFLICT, f"task {msg.id} already {STATE_NAMES[was]}"
            )
            return
        self._cancel(record, now)
        self._out.outbox.append(
            [
                identity,
                *zbc.reply(msg.rid, {"id": msg.id, "state": "cancelled", "was": STATE_NAMES[was]}),
            ]
        )

    def _cancel(self, record: TaskRecord, now: float) -> None:
        """A task not yet ended (`record` from `record_of`: the live one while it runs)
        is cancelled; a worker running it is told (CANCEL)."""
        holder = self._attempts.pop(record.id, None)
        if holder is not None:
            attempt, worker = holder
            routing = self._routing
            assert routing is not None
            routing.withdraw(worker, attempt, now, f"task {record.id} was cancelled")
        self.apply(record, lifecycle.CANCEL, now + self._epoch_offset)

    # ------------------------------------------------ operators' actions

    def waiting_to_purge(self, service_name: str, now: float) -> list[TaskRecord]:
        """Up to MAX_BATCH waiting (blocked, ready, then delayed) tasks of the service.
        Blocked ones first: purging a task they wait for would fail them one by one."""
        journal = self.journal
        assert journal is not None
        epoch = now + self._epoch_offset
        records = journal.blocked(service_name, ZBC_MAX_BATCH)
        records += journal.ready(service_name, ZBC_MAX_BATCH - len(records))
        service = self._directory.services.get(service_name.encode())
        need = ZBC_MAX_BATCH - len(records)
        if need > 0 and service is not None and service.waiting_count > len(records):
            # Delayed tasks are indexed by time across services: read them in a wider
            # and wider window until it holds enough of ours or the whole index, so a
            # service's delayed tasks are reached however many other services have.
            scan = 10 * ZBC_MAX_BATCH
            while True:
                later = journal.due(epoch + FAR_FUTURE_S, scan)
                ours = [r for r in later if r.service == service_name]
                if len(ours) >= need or len(later) < scan:
                    break
                scan *= 4
            records += ours[:need]
        return records

    def dead_letters(self, service: str, ids: Sequence[str] | None) -> list[TaskRecord]:
        """The dead letters of `service` named by `ids` (others are skipped), or with ids
        None the oldest MAX_BATCH of them: what DROP and REDRIVE act on."""
        journal = self.journal
        assert journal is not None
        if ids is None:
            return journal.dead(service, ZBC_MAX_BATCH)
        # An id listed twice is one task: acting on it twice would count it twice.
        found = (journal.get(task_id) for task_id in dict.fromkeys(ids))
        return [r for r in found if r is not None and r.state is DEAD and r.service == service]

    def redrive(self, record: TaskRecord, service: Service, now: float) -> None:
        """A dead letter goes back to its queue with its attempts reset."""
        record.attempt = 0
        record.uncharged = 0
        assert self.journal is not None
        record.crashes = self.journal.crashes  # numbered afresh: nothing to fence
        record.finished_at = None
        record.expires_at = None  # it had started: its ttl no longer applies
        self.apply(record, lifecycle.REDRIVE, now + self._epoch_offset, service)

    # ---------------------------------------------------------- waiting

    def _wait(
        self, identity: bytes, rid: int, task_id: str, deadline: float, principal: str | None
    ) -> None:
        self._waiters.add(identity, rid, task_id, deadline, principal)
        if deadline < self.wake_at:
            self.wake_at = deadline

    # ------------------------------------------------------------ timers

    def _schedule_at(self, when: float) -> None:
        if when < self._next_due_at:
            self._next_due_at = when
        if when < self.wake_at:
            self.wake_at = when

    def _schedule_due(self, now: float) -> None:
        assert self.journal is not None
        due = self.journal.next_due_at()
        self._next_due_at = math.inf
        if due is not None:
            self._schedule_at(now + max(0.0, due - (now + self._epoch_offset)))

    def tick(self, now: float) -> None:
        """Delays that are over, ttls and retentions that lapsed, waits that ran out."""
        journal = self.journal
        if journal is None:
            return
        epoch = now + self._epoch_offset
        touched: dict[bytes, Service] = {}
        if self._next_due_at <= now:
            records = journal.due(epoch, TIMER_BATCH)
            for record in records:
                service = self._directory.get(record.service.encode())
                self.apply(record, lifecycle.DUE, epoch, service)
                touched[service.name] = service
            self._schedule_due(now)
            if len(records) == TIMER_BATCH:
                self._schedule_at(now)  # more are due: next pass
        lapsed = journal.lapsed(epoch, TIMER_BATCH)
        for record in lapsed:
            if record.state in FINAL:
                self.apply(record, lifecycle.FORGET, epoch)
                continue
            if self.graph.edges:
                # Read again: an expiry earlier in the batch may have ended it.
                again = journal.get(record.id)
                if again is None or again.state in FINAL:
                    continue
                record = again
            record.error = "its ttl passed before it started"
            self.apply(record, lifecycle.EXPIRE, epoch)
        if len(lapsed) == TIMER_BATCH:
            # More have lapsed: the next pass ticks again, so retention keeps up with
            # any rate of finished tasks (a batch per tick interval would cap it).
            self.wake_at = now
        if self._waiters.count:
            self._waiters.expire(now, self.refuse)
        if self.streams.count:
            self.streams.expire(now, self.refuse)
        routing = self._routing
        assert routing is not None
        for name, service in touched.items():
            if self._directory.services.get(name) is service and service.ready:
                routing.dispatch(service, now)

    # ------------------------------------------------ the broker's own enqueues

    def submit(
        self,
        service: str,
        payloads: Sequence[tuple[bytes, ...]],
        options: zbc.TaskOptions,
        now: float,
        owner: str | None = None,
    ) -> list[str] | str:
        """Enqueue tasks for the broker itself (a schedule's firing, core/schedules.py):
        exactly as an ENQUEUE (its checks, caps, idempotency keys, storage, events and
        dispatch), answering nobody. Returns the tasks' ids (that of the stored task
        where a key matched one), or why the enqueue was refused ("code: message")."""
        caller = b""  # never a peer's routing id (ZeroMQ's are 1..255 bytes)
        call = zbc.Enqueue(0, service, tuple(tuple(p) for p in payloads), options)
        before = len(self._out.outbox)
        self.enqueue(caller, call, now, owner)
        outbox = self._out.outbox
        answers = [m for m in outbox[before:] if m[0] == caller]
        outbox[before:] = [m for m in outbox[before:] if m[0] != caller]
        answer = zbc.decode_answer(answers[0][1:])
        if answer.ok:
            return [str(i) for i in answer.meta["ids"]]
        return f"{answer.code}: {answer.message}"


__all__ = [
    "FAR_FUTURE_S",
    "INFLIGHT",
    "TIMER_BATCH",
    "DurableTasks",
    "backoff_s",
    "fence",
    "record_view",
]
