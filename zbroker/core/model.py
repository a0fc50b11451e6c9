"""The broker's bookkeeping records: services, workers, requests, settings, counters.

Plain mutable records with __slots__, owned and mutated only by `core.broker`.
No I/O, no clock: every time here is a float passed in by the caller.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass


class WorkerDialect(enum.Enum):
    """The protocol a worker registered with."""

    MDP = "MDPW01"  # stock 7/MDP: one request at a time, no ids
    ZBW = "ZBW01"  # zbroker's extension: credit, task ids, attempts, ACK, DONE/FAIL


@dataclass(frozen=True, slots=True)
class CoreSettings:
    """Tunables of the state machine. Times in seconds, sizes in bytes."""

    heartbeat_interval_s: float = 2.5
    # A worker (idle or busy) is dead after this many intervals without any traffic.
    heartbeat_liveness: int = 3
    # A request still queued after this long is dropped and counted.
    request_expiry_s: float = 60.0
    # Per-service cap on queued requests; beyond it new requests are refused and counted.
    max_queued_per_service: int = 100_000
    # Whole-message cap (sum of frame sizes); larger messages are dropped and counted.
    max_message_bytes: int = 16 * 1024 * 1024
    max_frames: int = 64
    # A task pushed to a ZBW01 worker must be acknowledged within this time, or the
    # broker takes it back (CANCEL) and gives it to another worker.
    ack_timeout_s: float = 10.0
    # Attempts a request may make when ZBW01 workers report retryable failures.
    request_max_attempts: int = 3

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be positive")
        if self.heartbeat_liveness < 1:
            raise ValueError("heartbeat_liveness must be at least 1")
        if self.request_expiry_s <= 0:
            raise ValueError("request_expiry_s must be positive")
        if self.ack_timeout_s <= 0:
            raise ValueError("ack_timeout_s must be positive")
        if self.request_max_attempts < 1:
            raise ValueError("request_max_attempts must be at least 1")

    @property
    def worker_expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness

    @property
    def tick_interval_s(self) -> float:
        # Timers are checked this often: fine enough for heartbeats, cheap enough to ignore.
        return min(self.heartbeat_interval_s / 2, 0.5)


class Request:
    """One client request while the broker holds it (queued or at a worker)."""

    __slots__ = ("ack_by", "attempt", "body", "client", "enqueued_at", "id", "service", "tid")

    def __init__(
        self, id: int, client: bytes, service: bytes, body: tuple[bytes, ...], now: float
    ) -> None:
        self.id = id
        self.tid = f"m{id:x}"  # the task id ZBW01 workers see
        self.client = client
        self.service = service
        self.body = body
        self.enqueued_at = now
        self.attempt = 0  # attempts handed to a worker so far (the fencing token)
        self.ack_by = 0.0  # ZBW01: taken back unless acknowledged by then; 0 once acked


class Worker:
    """A registered worker: one routing id serving one service, holding up to `credit` tasks."""

    __slots__ = (
        "credit",
        "dialect",
        "expires_at",
        "heartbeat_at",
        "identity",
        "metrics",
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
        dialect: WorkerDialect = WorkerDialect.MDP,
        credit: int = 1,
        tags: tuple[str, ...] = (),
    ):
        self.identity = identity
        self.service = service
        self.dialect = dialect
        self.credit = credit
        self.tags = tags
        self.metrics: dict[str, object] = {}
        # The attempts this worker holds, by task id, in delivery order.
        self.tasks: dict[str, Request] = {}
        self.expires_at = now + settings.worker_expiry_s
        self.heartbeat_at = now + settings.heartbeat_interval_s


class Service:
    """A named queue of requests and the workers that serve it."""

    __slots__ = ("name", "queue", "ready", "workers")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.queue: deque[Request] = deque()
        # Workers with spare credit, insertion-ordered: the front has waited longest
        # (fair rotation); a worker that still has credit after a delivery goes to the back.
        self.ready: dict[bytes, Worker] = {}
        self.workers: dict[bytes, Worker] = {}


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
    malformed: Counter[str] | None = None

    def __post_init__(self) -> None:
        if self.malformed is None:
            self.malformed = Counter()

    @property
    def malformed_total(self) -> int:
        assert self.malformed is not None
        return sum(self.malformed.values())
