"""What the durable-task calls of Client and AsyncClient return: task states, status, dead letters.

Plain data, decoded from the broker's ZBC01 answers (see docs/protocol.md);
times are seconds since the Unix epoch, as the broker's clock saw them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zbroker.client.errors import ReplyError

# The protocol's own enum, handed to callers as it is (a str: `TaskState.DONE == "done"`).
from zbroker.protocol.states import TaskState as TaskState


class TaskId(str):
    """A task id as `enqueue()` and `enqueue_many()` return it: a str, and whether
    the call's idempotency key matched a task the broker already held.

    `existing` is True when the broker stored nothing for this task because a
    task of the service with the same key was stored already (queued, running,
    dead, or finished and still retained): the id is that task's. It is only
    ever True for a key the caller gave. A generated key is new to the broker,
    except when the client resent the call after a lost answer, and a match
    then is this call's own first send: `existing` stays False. With a key of
    the caller's, a resent call is ambiguous the same way: `existing` may mean
    that the call's own first send stored the task.
    """

    existing: bool

    def __new__(cls, value: str, existing: bool = False) -> TaskId:
        self = super().__new__(cls, value)
        self.existing = existing
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskId, (str(self), self.existing))


@dataclass(frozen=True, slots=True)
class PayloadPreview:
    """The start of a task's payload, as STATUS(preview=n) returns it."""

    frames: int  # frames of the whole payload
    total_bytes: int  # bytes of the whole payload, every frame
    preview: bytes  # the first frame's first n bytes (all of it when shorter)


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """A durable task as the broker holds it, from `status()`.

    Times are seconds since the epoch; None where the task has no such time.
    """

    id: str
    service: str
    state: TaskState
    attempt: int  # deliveries so far; 0 before the first one
    max_attempts: int
    priority: int
    created_at: float
    not_before: float | None = None  # not delivered before this time
    expires_at: float | None = None  # expires unless started by then (ttl_s)
    timeout_s: float | None = None  # run-time limit of one attempt
    key: str | None = None  # idempotency key (the generated one when none was given)
    headers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the last failure reason, if any
    finished_at: float | None = None  # when it reached a final state
    keep_until: float | None = None  # its record (and result) is kept until then
    history: tuple[Any, ...] = ()  # the broker's log of the task's transitions
    # Attempts the broker cut short by stopping or dying: not counted against
    # max_attempts (0 from a broker that predates the field).
    uncharged: int = 0
    # The principal that enqueued it, on a broker started with --auth (else None).
    owner: str | None = None
    # Its stream (docs/protocol.md §13): chunks kept, and their bytes.
    stream_chunks: int = 0
    stream_bytes: int = 0
    # Its dependencies (docs/protocol.md §15): their ids, how many have not ended,
    # and the options they were enqueued with.
    depends_on: tuple[str, ...] = ()
    blocked_on: int = 0
    run_anyway: bool = False
    input: str | None = None
    # Its placement and flow-control options (§16).
    require: tuple[str, ...] = ()
    prefer: tuple[str, ...] = ()
    affinity: str | None = None
    concurrency_key: str | None = None
    # The start of its payload, when `status(preview=n)` asked for it (None when it
    # did not, or when the broker no longer holds the payload).
    payload: PayloadPreview | None = None

    @property
    def final(self) -> bool:
        """True once the task has ended (done, dead, cancelled, expired, upstream_failed)."""
        return self.state.final


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One task in a service's dead-letter queue, from `dead_letters()`."""

    id: str
    seq: int  # its place in the dead-letter queue (pages are ordered by it)
    attempt: int  # attempts made before it died
    error: str | None  # why its last attempt failed
    created_at: float
    finished_at: float | None  # when it died


# ----------------------------------------------------------------- decoding


def parse_state(value: Any) -> TaskState:
    """A TaskState from an answer's `state`; ReplyError for anything else."""
    try:
        return TaskState(value)
    except ValueError:
        raise ReplyError("bad_state", f"unknown task state {value!r}") from None


def parse_status(meta: dict[str, Any]) -> TaskStatus:
    """The `task` map of a STATUS answer."""
    task = meta.get("task")
    if not isinstance(task, dict):
        raise ReplyError("bad_answer", "STATUS answer without a 'task' map")
    headers = task.get("headers")
    history = task.get("history")
    return TaskStatus(
        id=_text(task, "id"),
        service=_text(task, "service"),
        state=parse_state(task.get("state")),
        attempt=_whole(task, "attempt"),
        max_attempts=_whole(task, "max_attempts"),
        priority=_whole(task, "priority"),
        created_at=_time(task, "created_at") or 0.0,
        not_before=_time(task, "not_before") or None,  # the broker says 0 for none
        expires_at=_time(task, "expires_at"),
        timeout_s=_time(task, "timeout_s"),
        key=_optional_text(task, "key"),
        headers=headers if isinstance(headers, dict) else {},
        error=_optional_text(task, "error"),
        finished_at=_time(task, "finished_at"),
        keep_until=_time(task, "keep_until"),
        history=tuple(history) if isinstance(history, list | tuple) else (),
        uncharged=_whole(task, "uncharged"),
        owner=_optional_text(task, "owner"),
        stream_chunks=_whole(task, "stream_chunks"),
        stream_bytes=_whole(task, "stream_bytes"),
        depends_on=_texts(task, "depends_on"),
        blocked_on=_whole(task, "blocked_on"),
        run_anyway=task.get("run_anyway") is True,
        input=_optional_text(task, "input"),
        require=_texts(task, "require"),
        prefer=_texts(task, "prefer"),
        affinity=_optional_text(task, "affinity"),
        concurrency_key=_optional_text(task, "concurrency_key"),
        payload=_payload_preview(meta.get("payload")),
    )


def _payload_preview(payload: Any) -> PayloadPreview | None:
    """The `payload` map of a STATUS answer (None when absent or nil)."""
    if payload is None:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("preview"), bytes):
        raise ReplyError("bad_answer", "STATUS answer with a malformed 'payload' map")
    return PayloadPreview(
        frames=_whole(payload, "frames"),
        total_bytes=_whole(payload, "bytes"),
        preview=payload["preview"],
    )


def _texts(task: dict[str, Any], name: str) -> tuple[str, ...]:
    """A list of strings (empty when absent: a broker that predates the field)."""
    value = task.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReplyError("bad_answer", f"task field {name!r} is not a list of strings")
    return tuple(value)


def parse_dead_letter(entry: Any) -> DeadLetter:
    """One entry of a DEAD answer's `tasks`."""
    if not isinstance(entry, dict):
        raise ReplyError("bad_answer", "DEAD answer entry is not a map")
    return DeadLetter(
        id=_text(entry, "id"),
        seq=_whole(entry, "seq"),
        attempt=_whole(entry, "attempt"),
        error=_optional_text(entry, "error"),
        created_at=_time(entry, "created_at") or 0.0,
        finished_at=_time(entry, "finished_at"),
    )


def parse_ids(meta: dict[str, Any], expected: int | None = None) -> list[str]:
    """The `ids` list of an answer, checked to hold `expected` task ids when given."""
    ids = meta.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ReplyError("bad_answer", "answer without an 'ids' list of task ids")
    if expected is not None and len(ids) != expected:
        raise ReplyError("bad_answer", f"expected {expected} task ids, got {len(ids)}")
    return ids


def parse_existing(meta: dict[str, Any], n: int) -> frozenset[int]:
    """The `existing` indexes of an ENQUEUE answer for `n` tasks (none when absent)."""
    existing = meta.get("existing")
    if existing is None:
        return frozenset()
    if (
        not isinstance(existing, list)
        or not all(type(i) is int and 0 <= i < n for i in existing)
        or len(set(existing)) != len(existing)
    ):
        raise ReplyError("bad_answer", f"'existing' is not a list of distinct task indexes < {n}")
    return frozenset(existing)


def _text(meta: dict[str, Any], name: str) -> str:
    value = meta.get(name)
    if not isinstance(value, str):
        raise ReplyError("bad_answer", f"answer field {name!r} is not a string")
    return value


def _optional_text(meta: dict[str, Any], name: str) -> str | None:
    value = meta.get(name)
    return value if isinstance(value, str) else None


def _whole(meta: dict[str, Any], name: str) -> int:
    value = meta.get(name)
    if value is None:
        return 0
    if type(value) is not int:
        raise ReplyError("bad_answer", f"answer field {name!r} is not an integer")
    return value


def _time(meta: dict[str, Any], name: str) -> float | None:
    value = meta.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
