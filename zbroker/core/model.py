"""The broker's bookkeeping records: services, workers, requests, settings, counters.

Plain mutable records with __slots__, owned and mutated only by `core.broker`.
No I/O, no clock: every time here is a float passed in by the caller.
"""

from __future__ import annotations

import enum
from collections import Counter, deque
from dataclasses import dataclass


class PeerProtocol(enum.Enum):
    """Which dialect a peer speaks; replies are encoded in the dialect of the request."""

    MDP1 = "MDP/0.1"


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

    def __post_init__(self) -> None:
        if self.heartbeat_interval_s <= 0:
            raise ValueError("heartbeat_interval_s must be positive")
        if self.heartbeat_liveness < 1:
            raise ValueError("heartbeat_liveness must be at least 1")
        if self.request_expiry_s <= 0:
            raise ValueError("request_expiry_s must be positive")

    @property
    def worker_expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness

    @property
    def tick_interval_s(self) -> float:
        # Timers are checked this often: fine enough for heartbeats, cheap enough to ignore.
        return min(self.heartbeat_interval_s / 2, 0.5)


class Request:
    """One client request while the broker holds it (queued or at a worker)."""

    __slots__ = ("body", "client", "delivered", "enqueued_at", "id", "service")

    def __init__(
        self, id: int, client: bytes, service: bytes, body: tuple[bytes, ...], now: float
    ) -> None:
        self.id = id
        self.client = client
        self.service = service
        self.body = body
        self.enqueued_at = now
        self.delivered = 0  # how many times it was handed to a worker


class Worker:
    """A registered worker: one routing id serving one service."""

    __slots__ = ("expires_at", "heartbeat_at", "identity", "request", "service")

    def __init__(self, identity: bytes, service: Service, now: float, settings: CoreSettings):
        self.identity = identity
        self.service = service
        self.request: Request | None = None
        self.expires_at = now + settings.worker_expiry_s
        self.heartbeat_at = now + settings.heartbeat_interval_s


class Service:
    """A named queue of requests and the workers that serve it."""

    __slots__ = ("idle", "name", "queue", "workers")

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.queue: deque[Request] = deque()
        # Insertion-ordered: the front is the worker that has waited longest (fair rotation).
        self.idle: dict[bytes, Worker] = {}
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
    malformed: Counter[str] | None = None

    def __post_init__(self) -> None:
        if self.malformed is None:
            self.malformed = Counter()

    @property
    def malformed_total(self) -> int:
        assert self.malformed is not None
        return sum(self.malformed.values())
