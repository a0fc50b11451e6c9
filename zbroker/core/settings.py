"""The broker core's tunables: one frozen record, validated once when it is made.

Every bound a setting must keep is checked here, in `CoreSettings.__post_init__`,
and nowhere else: the command line, the environment and the TOML file only parse
types, and report a `SettingError` with their own option names and sources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from zbroker.protocol import limits


class SettingError(ValueError):
    """A setting is outside its bounds (raised when a settings record is made).

    `template` says what is wrong with a `{field}` placeholder for each setting
    involved, the one to change first; `values` holds those settings' values.
    `str()` fills each placeholder with `name (value)`; a caller that knows the
    settings by other names (the command line's options) fills them with `render`.
    """

    def __init__(self, template: str, **values: object) -> None:
        self.template = template
        self.values = values
        super().__init__(self.render(lambda name, value: f"{name} ({shown(value)})"))

    def render(self, describe: Callable[[str, object], str]) -> str:
        """The message, each setting described by `describe(name, value)`."""
        return self.template.format_map({n: describe(n, v) for n, v in self.values.items()})


def shown(value: object) -> str:
    """A setting's value in a message: a whole float without its `.0` (5, 0.25, 1e+300)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def at_least(name: str, value: float, least: float) -> None:
    """Refuse `value` below `least` (NaN too: it is below every bound)."""
    if not value >= least:
        raise SettingError(f"{{{name}}} must be at least {shown(least)}", **{name: value})


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
    # MDP requests live in memory: their bodies are capped in bytes too, broker-wide.
    max_queued_bytes: int = 256 << 20
    # Whole-message cap (sum of frame sizes); larger messages are dropped and counted.
    max_message_bytes: int = limits.DEFAULT_MAX_MESSAGE_BYTES
    # Frames per message: a ZBC01 batch carries one frame per task (up to 10000 tasks).
    max_frames: int = limits.MAX_FRAMES
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
    # Calls waiting for a task's result (REQUEST, RESULT with wait_s), broker-wide,
    # and from one connection: no peer can park calls until nobody else may wait.
    max_waiters: int = 100_000
    max_waiters_per_peer: int = 1_000
    # Authenticated brokers (--auth): what one principal may hold however many
    # connections it opens: calls waiting, tasks not yet finished (waiting or
    # running), services that exist because of it.
    max_waiters_per_principal: int = 10_000
    max_tasks_per_principal: int = 1_000_000
    max_services_per_principal: int = 1_000
    # Each task's stream (§13), over all its attempts: chunks and bytes it may hold in
    # the journal. A CHUNK past either ends the task in the dead letters.
    max_stream_chunks: int = limits.DEFAULT_MAX_STREAM_CHUNKS
    max_stream_bytes: int = limits.DEFAULT_MAX_STREAM_BYTES
    # How long a REQUEST waits for its result before answering with the task's state.
    request_wait_s: float = 300.0
    # Services gone idle whose figures (totals, rates, wait and run times) are kept, so
    # their counters carry on if they come back; beyond this many, the figures of the
    # longest gone are dropped (their Prometheus series end).
    max_departed_services: int = 10_000
    # Entries kept in a task's history (oldest dropped first).
    history_limit: int = 32
    # Seed of the retry jitter (None: unpredictable). Tests pin it.
    seed: int | None = None

    def __post_init__(self) -> None:
        at_least("heartbeat_interval_s", self.heartbeat_interval_s, 0.01)
        at_least("heartbeat_liveness", self.heartbeat_liveness, 1)
        at_least("request_expiry_s", self.request_expiry_s, 0.001)
        at_least("max_queued_per_service", self.max_queued_per_service, 1)
        if not self.max_queued_bytes >= 1 << 20:
            # Said in MiB: the option that sets it (max_queued_mib) counts in MiB.
            raise SettingError(
                "{max_queued_bytes} must be at least 1 MiB", max_queued_bytes=self.max_queued_bytes
            )
        # Room for the smallest MDP and ZBC01 messages, with their envelopes.
        at_least("max_message_bytes", self.max_message_bytes, 64)
        at_least("max_frames", self.max_frames, 1)
        at_least("ack_timeout_s", self.ack_timeout_s, 0.001)
        at_least("request_max_attempts", self.request_max_attempts, 1)
        at_least("default_max_attempts", self.default_max_attempts, 1)
        at_least("retry_base_s", self.retry_base_s, 0.0)
        if not self.retry_max_s >= self.retry_base_s:
            raise SettingError(
                "{retry_max_s} must be at least {retry_base_s}",
                retry_max_s=self.retry_max_s,
                retry_base_s=self.retry_base_s,
            )
        at_least("retention_s", self.retention_s, 0.0)
        at_least("max_tasks_per_service", self.max_tasks_per_service, 1)
        at_least("window_per_service", self.window_per_service, 1)
        at_least("max_waiters", self.max_waiters, 0)
        at_least("max_waiters_per_peer", self.max_waiters_per_peer, 0)
        at_least("max_waiters_per_principal", self.max_waiters_per_principal, 0)
        at_least("max_tasks_per_principal", self.max_tasks_per_principal, 1)
        at_least("max_services_per_principal", self.max_services_per_principal, 1)
        at_least("max_stream_chunks", self.max_stream_chunks, 1)
        at_least("max_stream_bytes", self.max_stream_bytes, 1)
        at_least("request_wait_s", self.request_wait_s, 0.0)
        at_least("max_departed_services", self.max_departed_services, 0)
        # The newest entry is always kept: a task's history is never empty.
        at_least("history_limit", self.history_limit, 1)

    @property
    def worker_expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness

    @property
    def tick_interval_s(self) -> float:
        # Timers are checked this often: fine enough for heartbeats, cheap enough to ignore.
        return min(self.heartbeat_interval_s / 2, 0.5)
