"""The broker core's tunables: one frozen record, validated once when it is made.

Every bound a setting must keep is checked in `CoreSettings.__post_init__`; the
command line, the environment and the TOML file reach it through `zbroker.config`
and report its ValueError as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    # Frames per message: a ZBC01 batch carries one frame per task (up to 10000 tasks).
    max_frames: int = 16_384
    # A task pushed to a ZBW01 worker must be acknowledged within this time, or the
    # broker takes it back (CANCEL) and gives it to another worker.
    ack_timeout_s: float = 10.0
    # Attempts a request may make when ZBW01 workers report retryable failures.
    request_max_attempts: int = 3
    # --- durable tasks (ZBC01) ---
    # Attempts a durable task may make unless its enqueue says otherwise. Every
    # delivery is an attempt; the last one ending without DONE dead-letters the task.
    default_max_attempts: int = 3
    # Retry backoff after FAIL or a timed-out attempt: base * 2**(attempt-1), capped,
    # with "equal jitter" (half fixed, half random). A FAIL's own delay_s wins.
    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    # Finished tasks (results, and their idempotency keys) are kept this long.
    retention_s: float = 3600.0
    # Per-service cap on durable tasks waiting (ready + delayed); beyond it ENQUEUE
    # is refused with queue_full. The queue itself lives on disk, not in memory.
    max_tasks_per_service: int = 10_000_000
    # Ready tasks of one service kept in memory at a time (the rest stay in the journal).
    window_per_service: int = 512
    # Calls waiting for a task's result (REQUEST, RESULT with wait_s), broker-wide.
    max_waiters: int = 100_000
    # How long a REQUEST waits for its result before answering with the task's state.
    request_wait_s: float = 300.0
    # Entries kept in a task's history (oldest dropped first).
    history_limit: int = 32
    # Seed of the retry jitter (None: unpredictable). Tests pin it.
    seed: int | None = None

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
        if self.default_max_attempts < 1:
            raise ValueError("default_max_attempts must be at least 1")
        if self.retry_base_s < 0 or self.retry_max_s < self.retry_base_s:
            raise ValueError("need 0 <= retry_base_s <= retry_max_s")
        if self.retention_s < 0:
            raise ValueError("retention_s must not be negative")
        if self.window_per_service < 1 or self.max_tasks_per_service < 1:
            raise ValueError("window_per_service and max_tasks_per_service must be positive")

    @property
    def worker_expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness

    @property
    def tick_interval_s(self) -> float:
        # Timers are checked this often: fine enough for heartbeats, cheap enough to ignore.
        return min(self.heartbeat_interval_s / 2, 0.5)
