"""The core's records: services, workers, the work a worker holds, counters.

Plain mutable records with __slots__. Each part of the core owns the records it
creates (docs/architecture.md, "The core's parts"); no record does I/O or reads a
clock: every time here is a float passed in by the caller.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from zbroker.core.settings import CoreSettings
from zbroker.journal.base import TaskRecord

_INF = float("inf")


class AttemptOwner(Protocol):
    """The part that decides what happens when a worker's hold on some work ends."""

    def complete(self, held: Held, body: tuple[bytes, ...], now: float) -> None:
        """The worker answered (DONE, or an MDP REPLY)."""

    def fail(self, held: Held, reason: str, delay_s: float | None, retry: bool, now: float) -> None:
        """The worker reported a failure (FAIL), or the attempt ran out of time."""

    def not_acknowledged(self, held: Held, now: float) -> None:
        """A ZBW01 worker did not acknowledge it in time; the broker took it back."""

    def take_back(self, held: Held, reason: str, now: float) -> None:
        """The broker stopped letting the worker hold it (the worker is gone)."""

    def timed_out(self, held: Held, now: float) -> None:
        """It ran past its time limit (`deadline`); the broker took it back."""

    def progress(self, held: Held, data: tuple[bytes, ...], now: float) -> None:
        """The worker reported progress on it (which also proves it holds it)."""

    def chunk(self, held: Held, data: tuple[bytes, ...], now: float) -> None:
        """The worker sent chunks of its stream (which also proves it holds it)."""


class Delivery(Protocol):
    """What the parts that own work ask of the routing (core/routing.py)."""

    def dispatch(self, service: Service, now: float) -> None:
        """Deliver what `service` has to its ready workers (now, or at the end of the
        pass's dispatch block)."""

    def catch_up(self, service: Service, now: float) -> None:
        """Make a dispatch of `service` deferred to the end of the block now."""

    def withdraw(
        self, worker: Worker, held: Held, now: float, why: str, tell: bool = False
    ) -> None:
        """Take `held` from `worker` without an outcome (its owner decided already);
        `tell`: its CANCEL says `why`."""


class WorkerDialect(Protocol):
    """How the broker speaks to a worker (core/dialects.py has the three there are)."""

    @property
    def value(self) -> str:
        """The protocol's name, as operators see it."""

    @property
    def acknowledges(self) -> bool:
        """Whether the worker ACKs each task (and holds up to a credit of them)."""

    @property
    def heartbeat(self) -> list[bytes]:
        """A HEARTBEAT, without the routing id."""

    def disconnect(self, why: str) -> list[bytes]:
        """A DISCONNECT, without the routing id."""

    def task(self, held: Held, service_name: str) -> list[bytes]:
        """One delivery, without the routing id."""

    def cancel(self, held: Held, reason: str | None = None) -> list[bytes] | None:
        """A CANCEL of `held`, without the routing id; None where there is none."""


class MdpRequest:
    """An MDP client's request: queued in its service, or held by one worker.
    It lives in memory only; a broker restart forgets it (7/MDP promises no more)."""

    __slots__ = (
        "ack_by",
        "attempt",
        "body",
        "client",
        "deadline",
        "enqueued_at",
        "id",
        "owner",
        "service",
        "size",
        "tid",
    )

    def __init__(
        self,
        owner: AttemptOwner,
        id: int,
        client: bytes,
        service: bytes,
        body: tuple[bytes, ...],
        now: float,
        size: int,
    ) -> None:
        self.owner = owner
        self.id = id
        self.tid = f"m{id:x}"  # the task id ZBW01 workers see
        self.client = client  # the MDP client's routing id: the reply goes there
        self.service = service
        self.body = body
        self.size = size  # the bytes of `body`: what it holds in memory while queued
        self.enqueued_at = now
        self.attempt = 0  # attempts handed to a worker so far (the fencing token)
        self.ack_by = 0.0  # ZBW01: taken back unless acknowledged by then; 0 once acked
        self.deadline = 0.0  # requests have no time limit of their own


class TaskAttempt:
    """One attempt of a durable task, while a worker holds it. The task itself lives
    in the journal; this exists from delivery until the attempt ends."""

    __slots__ = (
        "ack_by",
        "attempt",
        "body",
        "client",
        "deadline",
        "owner",
        "record",
        "service",
        "started_at",
        "tid",
    )

    def __init__(
        self,
        owner: AttemptOwner,
        record: TaskRecord,
        service: bytes,
        body: tuple[bytes, ...],
        now: float,
    ) -> None:
        self.owner = owner
        self.record = record  # the task's record, as last written
        self.tid = record.id
        self.attempt = record.attempt
        # What an MDP worker must echo in its REPLY (7/MDP's client address frame).
        self.client = b"\0" + record.id.encode()
        self.service = service
        self.body = body
        self.started_at = now
        self.ack_by = 0.0
        self.deadline = 0.0  # with the task's timeout_s: the attempt fails at this time


# What a worker holds: either kind of work, each ended by its own owner.
Held = MdpRequest | TaskAttempt


class Worker:
    """A registered worker: one routing id serving one service, holding up to `credit` tasks."""

    __slots__ = (
        "alias",
        "batch",
        "credit",
        "dialect",
        "draining",
        "expires_at",
        "heartbeat_at",
        "identity",
        "metrics",
        "principal",
        "service",
        "tags",
        "tasks",
    )

    def __init__(
        self,
        identity: bytes,
        service: Service,
        now: float,
        settings: CoreSettings,
        dialect: WorkerDialect,
        credit: int = 1,
        tags: tuple[str, ...] = (),
    ):
        self.identity = identity
        # What operators, events and histories call this worker: never its routing
        # id, which a peer could use to make libzmq abort (runtime/routing_ids.py).
        self.alias = identity.hex()
        self.service = service
        self.dialect = dialect
        self.credit = credit
        self.tags = tags
        self.batch = False  # ZBW01: accepts TASKS (several tasks per message)
        self.draining = False  # an operator asked: no new tasks, current ones finish
        self.metrics: dict[str, object] = {}
        # The principal that registered it (authenticated brokers): only messages
        # of that principal are taken as this worker's.
        self.principal: str | None = None
        # What this worker holds, by task id, in delivery order.
        self.tasks: dict[str, Held] = {}
        self.expires_at = now + settings.worker_expiry_s
        self.heartbeat_at = now + settings.heartbeat_interval_s


class ServiceFigures:
    """What operators see of a service's durable tasks over time: totals since the
    broker started, rates over the last minute, and wait and run times over the
    last SAMPLES tasks. Bounded memory."""

    SAMPLES = 1000
    RATE_WINDOW_S = 60.0
    SNAPSHOT_EVERY_S = 5.0

    # Histogram bucket bounds (seconds) for wait and run times, Prometheus style.
    BUCKETS: ClassVar[tuple[float, ...]] = (
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
        30.0,
        60.0,
        300.0,
    )

    __slots__ = (
        "dead",
        "done",
        "enqueued",
        "failed",
        "redeliveries",
        "run_hist",
        "runs",
        "snapshot_at",
        "snapshots",
        "wait_hist",
        "waits",
    )

    def __init__(self) -> None:
        self.enqueued = 0
        self.done = 0
        self.failed = 0  # attempts that ended without DONE
        self.dead = 0
        self.redeliveries = 0  # deliveries after the first of a task
        # Enqueue (or due) to start, and start to DONE: made at the first sample (an
        # empty deque costs hundreds of bytes, and most names never run a task).
        self.waits: deque[float] | None = None
        self.runs: deque[float] | None = None
        # Since start: counts per bucket (the last one is +Inf) and the sum of seconds.
        self.wait_hist: list[float] = [0.0] * (len(self.BUCKETS) + 2)
        self.run_hist: list[float] = [0.0] * (len(self.BUCKETS) + 2)
        # (time, enqueued, done, failed), at most one per SNAPSHOT_EVERY_S, for the
        # rates. Taken lazily (`snapshot`), when the service is used or viewed: totals
        # move only when the service is used, so one missed while nothing moved is
        # worth the one before it.
        self.snapshots: deque[tuple[float, int, int, int]] = deque(
            maxlen=int(self.RATE_WINDOW_S / self.SNAPSHOT_EVERY_S) + 1
        )
        self.snapshot_at = -_INF  # no snapshot is due before this time

    def observe_wait(self, seconds: float) -> None:
        waits = self.waits
        if waits is None:
            waits = self.waits = deque(maxlen=self.SAMPLES)
        waits.append(seconds)
        self._observe(self.wait_hist, seconds)

    def observe_run(self, seconds: float) -> None:
        runs = self.runs
        if runs is None:
            runs = self.runs = deque(maxlen=self.SAMPLES)
        runs.append(seconds)
        self._observe(self.run_hist, seconds)

    def _observe(self, hist: list[float], seconds: float) -> None:
        i = bisect.bisect_left(self.BUCKETS, seconds)
        hist[i] += 1  # index len(BUCKETS): above every bound
        hist[-1] += seconds

    @property
    def counted(self) -> bool:
        """Whether any total has moved: such figures outlive an idle Service object."""
        return bool(self.enqueued or self.done or self.failed or self.redeliveries)

    def snapshot(self, now: float) -> None:
        """Sample the totals for the rates, if SNAPSHOT_EVERY_S has passed since the
        last sample (callers check `snapshot_at` first: it is on the hot path)."""
        if now >= self.snapshot_at:
            self.snapshots.append((now, self.enqueued, self.done, self.failed))
            self.snapshot_at = now + self.SNAPSHOT_EVERY_S

    def view(self, now: float) -> dict[str, Any]:
        self.snapshot(now)
        snapshots = self.snapshots
        # Samples are lazy: one older than the window (and the sampling step) says the
        # totals have not moved within it, since any move would have taken a newer one.
        horizon = now - self.RATE_WINDOW_S - self.SNAPSHOT_EVERY_S
        while len(snapshots) > 1 and snapshots[0][0] < horizon:
            snapshots.popleft()
        rates: tuple[float, float, float] = (0.0, 0.0, 0.0)
        if snapshots:
            t0, e0, d0, f0 = snapshots[0]
            span = now - t0
            if span > 0:
                rates = (
                    (self.enqueued - e0) / span,
                    (self.done - d0) / span,
                    (self.failed - f0) / span,
                )
        return {
            "enqueued_total": self.enqueued,
            "done_total": self.done,
            "failed_total": self.failed,
            "dead_total": self.dead,
            "redeliveries_total": self.redeliveries,
            "enqueue_rate": round(rates[0], 3),
            "done_rate": round(rates[1], 3),
            "fail_rate": round(rates[2], 3),
            "wait_s_mean": _mean(self.waits),
            "wait_s_p95": _p95(self.waits),
            "run_s_mean": _mean(self.runs),
            "run_s_p95": _p95(self.runs),
            "wait_histogram": self._histogram(self.wait_hist),
            "run_histogram": self._histogram(self.run_hist),
        }

    def _histogram(self, hist: list[float]) -> dict[str, Any]:
        """Cumulative counts per upper bound, as Prometheus wants them."""
        counts = list(map(int, itertools.accumulate(hist[:-1])))
        # Pairs as tuples (msgpack arrays all the same): tuples of numbers leave the
        # garbage collector's lists, and QUEUES builds thousands of them per page.
        buckets = list(zip(_SHOWN_BOUNDS, counts, strict=True))
        return {"buckets": buckets, "sum": round(hist[-1], 6), "count": counts[-1]}


# The histograms' upper bounds as QUEUES shows them.
_SHOWN_BOUNDS: tuple[float | str, ...] = (*ServiceFigures.BUCKETS, "+Inf")


def _mean(values: deque[float] | None) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _p95(values: deque[float] | None) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 6)


class TokenBucket:
    """At most `rate` per second on average, up to `burst` at once. Times are the
    core's monotonic `now`."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.at = now

    def available(self, now: float) -> int:
        """Whole tokens there are now (refilled for the time gone by)."""
        if now > self.at:
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
            self.at = now
        return int(self.tokens)

    def spend(self, n: int) -> None:
        self.tokens -= n

    def due_at(self, now: float) -> float:
        """When the next whole token is there."""
        return now + max(0.0, 1.0 - self.tokens) / self.rate


class Service:
    """A named queue of requests and the workers that serve it."""

    __slots__ = (
        "affinity",
        "beyond_at",
        "creator",
        "expire_at",
        "figures",
        "key_buckets",
        "key_limit",
        "key_rate",
        "key_turns",
        "limit",
        "name",
        "paused",
        "placing",
        "queue",
        "rate",
        "ready",
        "ready_count",
        "records",
        "turn",
        "waiting_count",
        "window",
        "workers",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        # The principal whose message made it exist (authenticated brokers), which it
        # counts against until it is let go (--max-services-per-principal).
        self.creator: str | None = None
        self.queue: deque[MdpRequest] = deque()
        # When MdpRequests' timer next looks at this queue (inf: no look scheduled).
        self.expire_at = _INF
        # Durable tasks: the best READY ones, as (priority, -seq, id), sorted so the
        # next to deliver is last. Always exactly the top len(window) READY tasks of
        # the journal; `ready_count` counts all of them (the rest stay on disk).
        self.window: list[tuple[int, int, str]] = []
        # The window's records as last written (saves a journal read per delivery).
        self.records: dict[str, TaskRecord] = {}
        self.ready_count = 0
        self.waiting_count = 0  # READY + DELAYED durable tasks: what the cap applies to
        self.paused = False  # an operator paused deliveries (kept in the journal)
        # At most this many tasks and requests at this service's workers together.
        self.limit: int | None = None
        # Placement and flow control (core/placement.py): how many tasks of the window
        # have rules (require, prefer, affinity, concurrency_key); the most tasks of one
        # concurrency key its workers may hold (the operator's, kept in the journal);
        # the turn each key was last served at (round robin between keys); and the
        # worker that last ran each affinity key.
        self.placing = 0
        self.key_limit: int | None = None
        self.key_turns: dict[str | None, int] = {}
        self.turn = 0
        self.affinity: dict[str, bytes] = {}
        # Rates (the operator's, kept in the journal): the service's token bucket, and
        # each key's (rate, burst) with the buckets of the keys seen lately.
        self.rate: TokenBucket | None = None
        self.key_rate: tuple[float, int] | None = None
        self.key_buckets: dict[str, TokenBucket] = {}
        # No read of READY tasks past the window before this time (core/placement.py).
        self.beyond_at = -_INF
        self.figures = ServiceFigures()
        # Workers with spare credit, insertion-ordered: the front has waited longest
        # (fair rotation); a worker that still has credit after a delivery goes to the back.
        self.ready: dict[bytes, Worker] = {}
        self.workers: dict[bytes, Worker] = {}

    @property
    def configured(self) -> bool:
        """Whether an operator gave it settings (kept in the journal): such a service
        is never let go while idle, or it would come back without them."""
        return (
            self.paused
            or self.limit is not None
            or self.key_limit is not None
            or self.rate is not None
            or self.key_rate is not None
        )

    def set_rate(self, rate: float | None, burst: int, per_key: bool, now: float) -> None:
        """Hand out at most `rate` tasks per second (bursts of `burst`; None: no rate),
        of the service as a whole or (`per_key`) of each concurrency key."""
        if per_key:
            self.key_rate = None if rate is None else (rate, burst)
            self.key_buckets.clear()
        else:
            self.rate = None if rate is None else TokenBucket(rate, burst, now)


@dataclass(slots=True)
class Stats:
    """Counters the operator sees. Only ever incremented."""

    requests: int = 0
    replies: int = 0
    mmi_requests: int = 0
    requeued: int = 0
    expired: int = 0
    refused_queue_full: int = 0
    replies_undeliverable: int = 0
    workers_registered: int = 0
    workers_expired: int = 0
    workers_disconnected: int = 0
    workers_unreachable: int = 0
    disconnects_sent: int = 0
    late_replies_dropped: int = 0
    stale_refused: int = 0  # ZBW01 messages about an attempt the broker took back
    ack_timeouts: int = 0
    failures: int = 0  # FAIL reports from ZBW01 workers
    failed_permanently: int = 0  # requests dropped after a final failure
    bad_metrics: int = 0  # heartbeats whose metrics could not be read (liveness still kept)
    # Durable tasks.
    tasks_enqueued: int = 0
    tasks_deduplicated: int = 0  # enqueues answered with an existing task's id (same key)
    tasks_debounced: int = 0  # enqueues that replaced a waiting task's payload (debounce_s)
    tasks_done: int = 0
    tasks_retried: int = 0  # attempts that failed or timed out and will run again
    tasks_timed_out: int = 0  # attempts that ran past the task's timeout_s
    tasks_dead: int = 0  # moved to a dead-letter queue
    tasks_cancelled: int = 0
    tasks_expired: int = 0  # TTL passed before they started
    tasks_upstream_failed: int = 0  # ended without running: a dependency ended without done
    tasks_redriven: int = 0
    tasks_recovered: int = 0  # in flight at the last stop: requeued at start
    # Attempt numbers skipped at a start because the journal crashed since the task was
    # last numbered: one may have been handed out unwritten (not charged).
    attempts_fenced: int = 0
    calls_refused: int = 0  # ZBC01 calls answered with ERROR
    # Task streams (§13).
    chunks_received: int = 0  # stored in a task's stream, or passed to an MDP client
    chunks_sent: int = 0  # to stream calls (a chunk read by two calls counts twice)
    chunks_dropped: int = 0  # for an MDP client that cannot take them (MDPC01)
    streams_abandoned: int = 0  # stream calls closed, or whose connection went, early
    streams_capped: int = 0  # tasks dead-lettered for a stream past its cap
    forbidden: int = 0  # messages refused because their sender's roles do not allow them
    # Recurring tasks (§17).
    schedules_fired: int = 0  # firings enqueued (one per schedule and due instant)
    schedule_firings_refused: int = 0  # firings refused (queue full...), tried again later
    malformed: Counter[str] | None = None

    def __post_init__(self) -> None:
        if self.malformed is None:
            self.malformed = Counter()

    @property
    def malformed_total(self) -> int:
        assert self.malformed is not None
        return sum(self.malformed.values())
