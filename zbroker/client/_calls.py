"""Durable-task calls (ZBC01) as sans-IO plans, shared by Client and AsyncClient.

A plan is a generator that says what to do next and is told what happened:

- it yields `Send(rid, frames, kind)`: put this message on the current
  connection; from now on, answers quoting `rid` on that connection are for
  this call. The driver sends back None.
- it yields `Wait(timeout_s)`: the driver sends back the next answer to one
  of this call's rids on the current connection (a `zbc.Answer`), `TIMEOUT`
  when none came within `timeout_s`, or `REPLACED` when the connection was
  replaced under the call (AsyncClient: another call found the broker silent),
  so its answers will never come and it should send again at once. An answer
  that arrived before the replacement is still handed over first.
- it yields `Reconnect()`: the broker did not answer; close the connection
  and open a fresh one (unless that already happened since this call last
  sent). The driver sends back None.

The plan returns the call's outcome, or raises the client error it ends in.
Plans read the monotonic clock for their own deadlines but do no I/O, so the
blocking Client and the asyncio AsyncClient run exactly the same logic.

Retry rules, which make every resend safe:
- ENQUEUE and REQUEST always carry idempotency keys (generated when the
  caller gave none), so a resend after a lost answer never stores a task twice.
- Once a task's id is known, waiting for its end is resumed with RESULT by id,
  never by enqueueing again.
- STATUS, CANCEL, DEAD and REDRIVE are resent as they are.
- Every rid is used once, so a late answer to an abandoned attempt can never
  be taken for the answer to another call.

Bounds, which hold whatever other calls on the same connection do:
- An attempt ends unanswered when its wait runs out (TIMEOUT), or when the
  connection is replaced under it (REPLACED) while the call has heard nothing
  since it last sent: the broker was silent to another call on that
  connection for a whole `timeout_s`, and this call's answer is lost with it.
  Either counts against the call's `retries`, and every attempt waits at most
  its own window (`timeout_s`, or `wait_s + timeout_s` for a long poll), so
  a silent broker fails the call within `retries + 1` windows.
- A wait with a deadline (`request`, `result` with `timeout_s`) ends by the
  deadline plus one `timeout_s` for the last answer, answered or not.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgpack

from zbroker.client.durable import (
    DeadLetter,
    TaskId,
    TaskState,
    TaskStatus,
    parse_dead_letter,
    parse_existing,
    parse_ids,
    parse_state,
    parse_status,
)
from zbroker.client.errors import (
    CallTimeout,
    MessageTooLarge,
    ReplyError,
    TaskPending,
    broker_error,
    task_failure,
)
from zbroker.client.options import TaskOptions, check_key, seconds
from zbroker.protocol import ext, zbc
from zbroker.protocol.limits import (
    BATCH_BYTES,
    BATCH_FRAMES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_FRAMES,
    MAX_PREVIEW_BYTES,
    MAX_QUEUES_PAGE,
    MIN_MESSAGE_BYTES,
    STREAM_WINDOW_DEFAULT,
    STREAM_WINDOW_MAX,
)
from zbroker.protocol.limits import ZBC_MAX_BATCH as MAX_BATCH
from zbroker.protocol.states import FAILED_STATES

T = TypeVar("T")

Payload = bytes | Sequence[bytes]
SendKind = Literal["first", "resend", "resume", "poll", "credit"]


@dataclass(frozen=True, slots=True)
class Send:
    """Put `frames` on the wire; answers quoting `rid` belong to the call from now on.

    `kind`: first (a call's first message), resend (the same call again after
    no answer), resume (RESULT or READ by id on a fresh connection), poll (RESULT
    or READ again after the broker answered that the task is still running),
    credit (a stream's MORE: no answer comes, and `rid` is the stream call's).
    """

    rid: int
    frames: list[bytes]
    kind: SendKind = "first"


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait up to `timeout_s` for an answer to one of the call's rids."""

    timeout_s: float


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The broker went silent: replace the connection before sending again."""


@dataclass(frozen=True, slots=True)
class Deliver:
    """Stream plans only: hand `chunks` (offsets `offset`.., of `attempt`) of task
    `task_id` to the consumer, and resume the plan once it wants more. The first
    Deliver of a STREAM has no chunks: it says the task was accepted."""

    task_id: str
    offset: int
    attempt: int
    chunks: tuple[bytes, ...]


class _Signal:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


TIMEOUT = _Signal("TIMEOUT")
REPLACED = _Signal("REPLACED")

Op = Send | Wait | Reconnect | Deliver
Event = zbc.Answer | _Signal | None
Plan = Generator[Op, Event, T]

# ERROR codes that mean "the broker will be back": a wait for a known task rides them out.
_TRANSIENT = (zbc.E_SHUTTING_DOWN,)


def check_message_bytes(max_message_bytes: int) -> None:
    """Raise unless `max_message_bytes` (the broker's --max-message-bytes) is usable."""
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int):
        raise TypeError("max_message_bytes must be an int")
    if max_message_bytes < MIN_MESSAGE_BYTES:
        raise ValueError(f"max_message_bytes must be at least {MIN_MESSAGE_BYTES}")


def check_fits(s: Settings, command: str, frames: Sequence[bytes]) -> None:
    """Refuse, before it is sent, a message the broker would refuse as too_large.

    One far over the cap would not even be read: the broker's libzmq drops the
    connection, and resending it on a fresh one would only repeat that.
    """
    size = sum(map(len, frames))
    if size > s.max_message_bytes or len(frames) >= MAX_FRAMES:
        raise MessageTooLarge(
            zbc.E_TOO_LARGE,
            f"{command} of {size} bytes in {len(frames)} frames is over the broker's cap "
            f"({s.max_message_bytes} bytes, client max_message_bytes; {MAX_FRAMES} frames)",
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """What a client's plans need from it."""

    timeout_s: float  # how long each attempt waits for an answer
    retries: int  # resends after an unanswered attempt
    poll_s: float  # longest RESULT wait asked of the broker in one go
    next_rid: Callable[[], int]
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the broker's --max-message-bytes


# ------------------------------------------------------------ arguments


def service_name(service: str | bytes) -> str:
    """A service name as the ZBC01 meta carries it: a non-empty str."""
    if isinstance(service, bytes):
        try:
            service = service.decode()
        except UnicodeDecodeError:
            raise ValueError("service name must be UTF-8") from None
    if not isinstance(service, str) or not service:
        raise ValueError("service name must be a non-empty str or bytes")
    return service


def payload_frames(payload: Payload, what: str = "payload") -> tuple[bytes, ...]:
    """One bytes frame, or a sequence of bytes frames, as a tuple of frames; `what`
    names the argument in the TypeError for anything else."""
    if isinstance(payload, bytes):
        return (payload,)
    if isinstance(payload, str):
        raise TypeError(f"{what} must be bytes or a sequence of bytes, not str: encode it first")
    frames = tuple(payload)
    for frame in frames:
        if not isinstance(frame, bytes):
            raise TypeError(f"{what} frames must be bytes, got {type(frame).__name__}")
    return frames


def task_id_arg(task_id: str) -> str:
    if not isinstance(task_id, str) or not task_id:
        raise ValueError("task id must be a non-empty str")
    return task_id


def new_key() -> str:
    """A fresh idempotency key: unique, so it only ever matches a resend of the same call
    (128 random bits in hex, as a uuid4's hex without its object)."""
    return secrets.token_hex(16)


def wire_options(
    options: TaskOptions, *, keys: Sequence[str | None] | None = None, n_tasks: int = 1
) -> zbc.TaskOptions:
    """The options as ZBC01 carries them, with idempotency keys where none were given.

    One task (`keys` None): `options.key`, or a generated one. A batch (`keys`
    given, or `n_tasks` > 1): `keys`, whose None entries get generated keys.
    """
    batch_keys: tuple[str | None, ...] | None = None
    if keys is not None or n_tasks != 1:
        if options.key is not None:
            raise ValueError("a batch takes keys=[...], one per task, not key=")
        given = list(keys) if keys is not None else [None] * n_tasks
        if len(given) != n_tasks:
            raise ValueError(f"keys must give one key (or None) per payload: {n_tasks}")
        base = new_key()
        batch_keys = tuple(
            check_key(k) if k is not None else f"{base}.{i}" for i, k in enumerate(given)
        )
        single_key = None
    else:
        single_key = options.key if options.key is not None else new_key()
    return zbc.TaskOptions(
        priority=options.priority,
        delay_s=seconds("delay_s", options.delay_s),
        not_before=seconds("not_before", options.not_before_s),
        ttl_s=seconds("ttl_s", options.ttl_s),
        max_attempts=options.max_attempts,
        timeout_s=seconds("timeout_s", options.timeout_s),
        key=single_key,
        keys=batch_keys,
        headers=dict(options.headers) if options.headers else {},
        depends_on=options.depends_on,
        run_anyway=options.run_anyway,
        input=options.input,
        require=options.require,
        prefer=options.prefer,
        affinity=options.affinity,
        concurrency_key=options.concurrency_key,
        debounce_s=seconds("debounce_s", options.debounce_s),
    )


def graph_base(options: TaskOptions | None, call: str) -> TaskOptions:
    """The options every task of a `chain()` or `fan_in()` shares: the caller's,
    which may not set what the call sets itself."""
    base = options or TaskOptions()
    if base.depends_on or base.input is not None or base.key is not None:
        raise ValueError(f"{call} sets depends_on and input itself; give key= to it, not options")
    return base


def depending(options: TaskOptions, deps: tuple[str, ...], input: str) -> TaskOptions:
    """`options` for a task that waits for `deps` and is handed their results."""
    return dataclasses.replace(options, depends_on=deps, input=input)


def unpack_results(frame: bytes) -> list[list[bytes] | None]:
    """The frame `input="results"` appends to a task's payload (docs/protocol.md
    §15.3): each dependency's result frames, in `depends_on` order (None for one
    that did not end done)."""
    results = msgpack.unpackb(frame)
    if not isinstance(results, list) or not all(
        r is None or (isinstance(r, list) and all(isinstance(f, bytes) for f in r)) for r in results
    ):
        raise ValueError("not a results frame: a msgpack list of lists of bytes or nil")
    return results


def deadline_of(timeout_s: float | None) -> float | None:
    """The monotonic deadline `timeout_s` from now (None: no deadline)."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
        raise TypeError("timeout_s must be a number of seconds or None")
    if not timeout_s >= 0:
        raise ValueError("timeout_s must be zero or more (None: no limit)")
    return time.monotonic() + timeout_s


# ------------------------------------------------------------------ plans


def call(
    s: Settings,
    command: str,
    build: Callable[[int], list[bytes]],
    *,
    key: str | None = None,
    service: str = "",
) -> Plan[zbc.Answer]:
    """One call with one answer: resent (new rid, fresh connection) until the broker answers.

    Returns the REPLY; an ERROR answer raises its BrokerError; no answer to
    `retries + 1` attempts raises CallTimeout. An attempt whose connection is
    replaced under it (REPLACED) went unanswered too: it counts, and the call
    sends again at once on the new connection.
    """
    attempts = 1
    kind: SendKind = "first"
    while True:
        rid = s.next_rid()
        frames = build(rid)
        if kind == "first":
            check_fits(s, command, frames)
        yield Send(rid, frames, kind)
        event = yield Wait(s.timeout_s)
        if isinstance(event, zbc.Answer):
            if not event.ok:
                raise broker_error(event.code, event.message)
            return event
        if attempts > s.retries:
            raise CallTimeout(command, s.timeout_s, attempts, key=key, service=service.encode())
        attempts += 1
        if event is not REPLACED:
            yield Reconnect()
        kind = "resend"


def enqueue(
    s: Settings,
    service: str,
    payloads: Sequence[tuple[bytes, ...]],
    options: zbc.TaskOptions,
    *,
    batch: bool,
    own_keys: Sequence[bool],
) -> Plan[list[TaskId]]:
    """ENQUEUE one task or a batch of at most MAX_BATCH: their ids, in payload order.

    `own_keys` says, per task, whether its key is the caller's (not generated):
    only those can be reported as matching a stored task (`TaskId.existing`).
    """
    key = options.key if options.key is not None else (options.keys or (None,))[0]

    def build(rid: int) -> list[bytes]:
        return zbc.enqueue(rid, service, payloads, options, batch=batch)

    answer = yield from call(s, "ENQUEUE", build, key=key, service=service)
    ids = parse_ids(answer.meta, len(payloads))
    existing = parse_existing(answer.meta, len(payloads))
    return [TaskId(id_, i in existing and own_keys[i]) for i, id_ in enumerate(ids)]


# Meta bytes per task of a batch besides its key: the key's msgpack header, its entry
# in `counts`, slack. And what a batch's meta holds besides keys, counts and headers.
_TASK_META_BYTES = 16
_BATCH_META_BYTES = 4096


def batch_bounds(
    payloads: Sequence[tuple[bytes, ...]],
    keys: Sequence[str | None] = (),
    budget: int = BATCH_BYTES,
) -> list[tuple[int, int]]:
    """Split `payloads` into [start, end) runs that each fit one ENQUEUE: at most
    MAX_BATCH tasks, BATCH_FRAMES frames and `budget` bytes of payload and per-task
    meta (its key, its count). A single task larger than that goes alone, and is
    refused before it is sent if the whole message is over the cap."""
    bounds: list[tuple[int, int]] = []
    start = frames = size = 0
    for i, payload in enumerate(payloads):
        key = keys[i] if i < len(keys) else None
        n = len(payload)
        b = sum(map(len, payload)) + _TASK_META_BYTES + (len(key.encode()) if key else 0)
        if i > start and (i - start >= MAX_BATCH or frames + n > BATCH_FRAMES or size + b > budget):
            bounds.append((start, i))
            start, frames, size = i, 0, 0
        frames += n
        size += b
    if start < len(payloads):
        bounds.append((start, len(payloads)))
    return bounds


def enqueue_batches(
    s: Settings,
    service: str,
    payloads: Sequence[tuple[bytes, ...]],
    options: zbc.TaskOptions,
    own_keys: Sequence[bool],
) -> Plan[list[TaskId]]:
    """ENQUEUE a batch of any size, MAX_BATCH tasks per message, one message after the other."""
    ids: list[TaskId] = []
    keys = options.keys or ()
    # What one message may carry besides the shared meta (headers are in every one).
    shared = _BATCH_META_BYTES + (len(ext.pack_meta(options.headers)) if options.headers else 0)
    budget = min(BATCH_BYTES, s.max_message_bytes - shared)
    for start, end in batch_bounds(payloads, keys, budget):
        chunk = payloads[start:end]
        # Every option of the call, each message with its own part of the keys.
        chunk_options = dataclasses.replace(options, keys=tuple(keys[start:end]) if keys else None)
        ids += yield from enqueue(
            s, service, chunk, chunk_options, batch=True, own_keys=own_keys[start:end]
        )
    return ids


def request(
    s: Settings,
    service: str,
    payload: tuple[bytes, ...],
    options: zbc.TaskOptions,
    deadline: float | None,
    timeout_s: float | None,
) -> Plan[list[bytes]]:
    """REQUEST: enqueue one task and wait for its end on the same call.

    The REQUEST asks the broker to hold the call for at most `poll_s` (or
    what is left of the deadline), so its second answer is due by then. The
    receipt (`ids`) is awaited like any answer (resent with the same key when
    lost); after it, the wait for the task's end is `await_result`, which
    resumes with RESULT by id whenever the connection is replaced.

    The receipt is retried as `call` retries (REPLACED counts as an unanswered
    attempt), and no later than the deadline plus one `timeout_s`.
    """
    attempts = 1
    kind: SendKind = "first"
    stop_at = _stop_at(s, deadline)
    while True:
        rid = s.next_rid()
        wait_s = _poll_wait(s, deadline)
        frames = zbc.request(rid, service, payload, options, wait_s)
        if kind == "first":
            check_fits(s, "REQUEST", frames)
        yield Send(rid, frames, kind)
        sent_at = time.monotonic()
        event = yield Wait(_until(sent_at + s.timeout_s, stop_at))
        if isinstance(event, zbc.Answer):
            if not event.ok:
                raise broker_error(event.code, event.message)
            due: float | None = sent_at + wait_s + s.timeout_s  # the second answer
            if "ids" in event.meta:
                task_id = parse_ids(event.meta, 1)[0]
            else:  # the second answer came first: the receipt was lost
                found = event.meta.get("id")
                if not isinstance(found, str):
                    raise ReplyError("bad_answer", "REQUEST answer without 'ids' or 'id'")
                task_id = found
                outcome = settle(event, task_id)
                if outcome is not None:
                    return outcome
                due = None  # nothing more to come on this rid: poll
            plan = await_result(s, task_id, deadline, timeout_s, answer_due=due)
            return (yield from plan)
        if attempts > s.retries or _past(stop_at):
            raise CallTimeout(
                "REQUEST", s.timeout_s, attempts, key=options.key, service=service.encode()
            )
        attempts += 1
        if event is not REPLACED:
            yield Reconnect()
        kind = "resend"


def settle(answer: zbc.Answer, task_id: str) -> list[bytes] | None:
    """A RESULT-shaped answer: the result frames when done, a TaskFailed raised when the
    task ended otherwise, None while it is still queued or running."""
    state = parse_state(answer.meta.get("state"))
    if state is TaskState.DONE:
        return list(answer.frames)
    if state in FAILED_STATES:
        error = answer.meta.get("error")
        raise task_failure(state.value, task_id, error if isinstance(error, str) else None)
    return None


def _poll_wait(s: Settings, deadline: float | None) -> float:
    """How long the broker may hold the next wait: poll_s, or what is left before `deadline`."""
    left = math.inf if deadline is None else deadline - time.monotonic()
    return max(0.0, min(s.poll_s, left))


def _stop_at(s: Settings, deadline: float | None) -> float | None:
    """When a wait with `deadline` gives up on an answer: one `timeout_s` after it."""
    return None if deadline is None else deadline + s.timeout_s


def _until(wake: float, stop_at: float | None) -> float:
    """Seconds from now until `wake`, or until `stop_at` if that comes first."""
    end = wake if stop_at is None else min(wake, stop_at)
    return max(0.0, end - time.monotonic())


def _past(stop_at: float | None) -> bool:
    return stop_at is not None and time.monotonic() >= stop_at


def _left(deadline: float | None) -> float:
    """Seconds until `deadline` (monotonic); infinite without one."""
    return math.inf if deadline is None else deadline - time.monotonic()


def await_result(
    s: Settings,
    task_id: str,
    deadline: float | None,
    timeout_s: float | None,
    *,
    answer_due: float | None = None,
) -> Plan[list[bytes]]:
    """Wait until task `task_id` ends or `deadline` passes, surviving connection losses.

    Long-polls with RESULT {id, wait_s <= poll_s}: the broker answers each poll
    when the task ends or when wait_s has passed, so an unanswered poll (past
    wait_s + timeout_s) means the connection is lost: the wait resumes with
    RESULT on a fresh connection, up to `retries` times in a row. A poll whose
    connection is replaced under it (REPLACED) before the call heard anything
    since it last sent counts as unanswered too (another call found the broker
    silent), so other calls' replacements cannot keep the wait alive forever.
    With `answer_due`, a wait is already outstanding (the REQUEST whose receipt
    came) and its answer is due by then: no poll is sent before.

    With a deadline, the wait ends by the deadline plus one `timeout_s` for the
    last answer: CallTimeout when that answer does not come.
    """
    silent = 0  # polls in a row with no answer, or answered "shutting down"
    # Whether an answer came since the call last sent: a receipt, when the
    # REQUEST is still outstanding.
    heard = answer_due is not None
    poll_answer_by: float | None = answer_due  # answer deadline of the outstanding wait
    next_poll_at = 0.0  # when to poll, while no wait is outstanding
    stop_at = _stop_at(s, deadline)

    def poll(kind: SendKind) -> Plan[float]:
        nonlocal heard
        rid = s.next_rid()
        wait_s = _poll_wait(s, deadline)
        yield Send(rid, zbc.call(zbc.RESULT, rid, id=task_id, wait_s=wait_s), kind)
        heard = False
        return time.monotonic() + wait_s + s.timeout_s

    if answer_due is None:
        poll_answer_by = yield from poll("first")
    while True:
        wake = poll_answer_by if poll_answer_by is not None else next_poll_at
        event = yield Wait(_until(wake, stop_at))
        if not isinstance(event, zbc.Answer):  # TIMEOUT or REPLACED
            if poll_answer_by is None:  # pausing after "shutting down": nothing outstanding
                if event is REPLACED:
                    continue  # the pause goes on; the poll after it uses the new connection
                yield Reconnect()  # the pause is over
                poll_answer_by = yield from poll("resume")
                continue
            if event is TIMEOUT or not heard:
                silent += 1  # the wait went unanswered: presume the connection lost
            if silent > s.retries or _past(stop_at):
                raise CallTimeout("RESULT", s.timeout_s, max(silent, 1), task_id=task_id)
            if event is TIMEOUT:
                yield Reconnect()
            poll_answer_by = yield from poll("resume")
            continue
        heard = True
        if not event.ok:
            if event.code in _TRANSIENT and silent < s.retries:
                # The broker is stopping: the task is durable, so ask again on a
                # fresh connection after a pause instead of giving up.
                silent += 1
                poll_answer_by = None
                next_poll_at = time.monotonic() + min(s.timeout_s, max(0.0, _left(deadline)))
                continue
            raise broker_error(event.code, event.message)
        silent = 0
        if "state" not in event.meta:
            continue  # a duplicate receipt of the REQUEST: nothing to learn
        outcome = settle(event, task_id)
        if outcome is not None:
            return outcome
        state = parse_state(event.meta.get("state"))
        if _left(deadline) <= 0:
            raise TaskPending(task_id, state.value, timeout_s or 0.0)
        poll_answer_by = yield from poll("poll")


@dataclass(frozen=True, slots=True)
class Follow:
    """How a stream wants its chunks (docs/protocol.md §13)."""

    window: int = STREAM_WINDOW_DEFAULT
    attempts: Literal["all", "current"] = "all"
    cancel_on_abandon: bool = False


def follow(window: int, attempts: str, cancel_on_abandon: bool) -> Follow:
    """The stream options, checked."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError("window must be an int")
    if not 1 <= window <= STREAM_WINDOW_MAX:
        raise ValueError(f"window must be 1..{STREAM_WINDOW_MAX}")
    if attempts not in ("all", "current"):
        raise ValueError('attempts must be "all" or "current"')
    if not isinstance(cancel_on_abandon, bool):
        raise TypeError("cancel_on_abandon must be a bool")
    return Follow(window, attempts, cancel_on_abandon)  # type: ignore[arg-type]


def _read(rid: int, task_id: str, offset: int, how: Follow, wait_s: float) -> list[bytes]:
    return zbc.read(
        rid,
        task_id,
        offset,
        wait_s=wait_s,
        window=how.window,
        attempts=how.attempts,
        cancel_on_abandon=how.cancel_on_abandon,
    )


def _accepted(
    s: Settings,
    task: tuple[str, tuple[bytes, ...], zbc.TaskOptions],
    how: Follow,
    stop_at: float | None,
) -> Plan[tuple[int, str]]:
    """A STREAM sent until accepted (resent with its key when unanswered, as REQUEST
    is): the rid that was, and the task's id."""
    service, payload, options = task
    attempts = 1
    kind: SendKind = "first"
    while True:
        rid = s.next_rid()
        frames = zbc.stream(
            rid,
            service,
            payload,
            options,
            wait_s=s.poll_s,
            window=how.window,
            attempts=how.attempts,
            cancel_on_abandon=how.cancel_on_abandon,
        )
        if kind == "first":
            check_fits(s, "STREAM", frames)
        yield Send(rid, frames, kind)
        while True:
            event = yield Wait(_until(time.monotonic() + s.timeout_s, stop_at))
            if not isinstance(event, zbc.Answer):
                break
            if not event.ok:
                raise broker_error(event.code, event.message)
            if "ids" in event.meta:
                return rid, parse_ids(event.meta, 1)[0]
        if attempts > s.retries or _past(stop_at):
            raise CallTimeout(
                "STREAM", s.timeout_s, attempts, key=options.key, service=service.encode()
            )
        attempts += 1
        if event is not REPLACED:
            yield Reconnect()
        kind = "resend"


def _fresh(answer: zbc.Answer, offset: int) -> tuple[int, int, tuple[bytes, ...]]:
    """A CHUNKS answer's (first offset, attempt, chunks at `offset` and after)."""
    first, attempt = answer.meta.get("offset"), answer.meta.get("attempt")
    if type(first) is not int or type(attempt) is not int:
        raise ReplyError("bad_answer", "CHUNKS without an integer offset and attempt")
    return max(first, offset), attempt, answer.frames[max(0, offset - first) :]


def stream(
    s: Settings,
    task_id: str | None,
    offset: int,
    how: Follow,
    deadline: float | None,
    timeout_s: float | None,
    task: tuple[str, tuple[bytes, ...], zbc.TaskOptions] | None = None,
) -> Plan[list[bytes]]:
    """STREAM (`task`: service, payload, options; `task_id` None) or READ (`task_id`
    from `offset`): deliver the task's chunks as they come, return its result.

    The STREAM's acceptance is awaited like REQUEST's (resent with the same key
    when lost) and delivered as an empty `Deliver`. From then on the plan waits
    for CHUNKS, delivers them, and credits the broker (MORE) once half the window
    was consumed. When the broker ends the call without an end (nothing came for
    `poll_s`), or the connection is lost or replaced, the plan follows again with
    READ from the next offset it has not delivered: no chunk is lost, none is
    delivered twice (a chunk sent again after a resume is dropped here). A
    silent broker fails it after `retries` resumes in a row (CallTimeout); with
    a deadline, TaskPending once it passes.
    """
    stop_at = _stop_at(s, deadline)
    if task is not None:
        rid, task_id = yield from _accepted(s, task, how, stop_at)
        yield Deliver(task_id, offset, 0, ())
    else:
        assert task_id is not None
        rid = s.next_rid()
        yield Send(rid, _read(rid, task_id, offset, how, s.poll_s), "first")
    silent = 0
    uncredited = 0  # chunks the broker sent this call that no MORE credited yet
    half = max(1, how.window // 2)
    while True:
        event = yield Wait(_until(time.monotonic() + s.poll_s + s.timeout_s, stop_at))
        kind: SendKind = "poll"
        if isinstance(event, zbc.Answer):
            if not event.ok:
                raise broker_error(event.code, event.message)
            silent = 0
            if event.chunks:
                start, attempt, fresh = _fresh(event, offset)
                uncredited += len(event.frames)
                if fresh:
                    offset = start + len(fresh)
                    yield Deliver(task_id, start, attempt, fresh)
                if uncredited >= half:
                    yield Send(rid, zbc.call(zbc.MORE, rid, credit=uncredited), "credit")
                    uncredited = 0
                continue
            if "state" not in event.meta:
                continue  # a duplicate acceptance
            outcome = settle(event, task_id)
            if outcome is not None:
                return outcome
            # Nothing came for poll_s: the broker ended the call; follow again.
            if _left(deadline) <= 0:
                state = parse_state(event.meta.get("state")).value
                raise TaskPending(task_id, state, timeout_s or 0.0)
        else:
            silent += 1
            if silent > s.retries or _past(stop_at):
                raise CallTimeout("READ", s.timeout_s, silent, task_id=task_id)
            if event is TIMEOUT:
                yield Reconnect()
            kind = "resume"
        rid = s.next_rid()
        uncredited = 0
        yield Send(rid, _read(rid, task_id, offset, how, s.poll_s), kind)


def status(s: Settings, task_id: str, preview: int) -> Plan[TaskStatus]:
    # No `preview` key at all when 0: a broker that predates it answers as before.
    answer = yield from call(
        s, "STATUS", lambda rid: zbc.call(zbc.STATUS, rid, id=task_id, preview=preview or None)
    )
    return parse_status(answer.meta)


def cancel(s: Settings, task_id: str) -> Plan[TaskState]:
    answer = yield from call(s, "CANCEL", lambda rid: zbc.call(zbc.CANCEL, rid, id=task_id))
    return parse_state(answer.meta.get("was"))


def dead_letters(s: Settings, service: str, limit: int | None) -> Plan[list[DeadLetter]]:
    """Up to `limit` dead letters (None: all), oldest first, a page of at most MAX_LIST per call."""
    found: list[DeadLetter] = []
    after: int | None = None
    while limit is None or len(found) < limit:
        page = zbc.MAX_LIST if limit is None else min(zbc.MAX_LIST, limit - len(found))

        def build(rid: int, page: int = page, after: int | None = after) -> list[bytes]:
            return zbc.call(zbc.DEAD, rid, service=service, limit=page, after=after)

        answer = yield from call(s, "DEAD", build, service=service)
        tasks = answer.meta.get("tasks")
        if not isinstance(tasks, list):
            raise ReplyError("bad_answer", "DEAD answer without a 'tasks' list")
        found += (parse_dead_letter(entry) for entry in tasks[:page])
        following = answer.meta.get("next")
        if following is None or not tasks:
            break
        if type(following) is not int:
            raise ReplyError("bad_answer", "DEAD answer 'next' is not an integer")
        after = following
    return found


def redrive(s: Settings, service: str, ids: Sequence[str] | None) -> Plan[list[str]]:
    """REDRIVE every dead letter of `service` (ids None) or those listed, MAX_BATCH per call."""
    if ids is None:
        answer = yield from call(
            s, "REDRIVE", lambda rid: zbc.call(zbc.REDRIVE, rid, service=service), service=service
        )
        return parse_ids(answer.meta)
    wanted = list(ids)
    redriven: list[str] = []
    for start in range(0, len(wanted), MAX_BATCH):
        chunk = wanted[start : start + MAX_BATCH]

        def build(rid: int, chunk: list[str] = chunk) -> list[bytes]:
            return zbc.call(zbc.REDRIVE, rid, service=service, ids=chunk)

        answer = yield from call(s, "REDRIVE", build, service=service)
        redriven += parse_ids(answer.meta)
    return redriven


# ------------------------------------------------- the public calls, checked


def plan_enqueue(
    s: Settings, service: str | bytes, payload: Payload, options: TaskOptions
) -> Plan[TaskId]:
    """`enqueue()`: arguments checked now, the plan returns the task's id."""
    wire = wire_options(options)
    frames = (payload_frames(payload),)
    own_keys = (options.key is not None,)
    return _first(enqueue(s, service_name(service), frames, wire, batch=False, own_keys=own_keys))


def _first(plan: Plan[list[TaskId]]) -> Plan[TaskId]:
    ids = yield from plan
    return ids[0]


def plan_enqueue_many(
    s: Settings,
    service: str | bytes,
    payloads: Sequence[Payload],
    keys: Sequence[str | None] | None,
    options: TaskOptions,
) -> Plan[list[TaskId]]:
    """`enqueue_many()`: arguments checked now, the plan returns the ids in payload order."""
    if isinstance(payloads, bytes | str):
        raise TypeError("payloads must be a sequence of payloads, not one bytes or str")
    frames = [payload_frames(p) for p in payloads]
    name = service_name(service)
    if not frames:
        if keys:
            raise ValueError("keys must give one key (or None) per payload: 0")
        return _nothing([])
    # Always keys, one per task (a batch of one too): a single key would not
    # survive the split into messages, and the task would go without one.
    wire = wire_options(
        options, keys=keys if keys is not None else [None] * len(frames), n_tasks=len(frames)
    )
    own_keys = [k is not None for k in keys] if keys is not None else [False] * len(frames)
    return enqueue_batches(s, name, frames, wire, own_keys)


def _nothing(value: T) -> Plan[T]:
    return value
    yield  # a generator that ends at once


def plan_request(
    s: Settings,
    service: str | bytes,
    payload: Payload,
    timeout_s: float | None,
    options: TaskOptions,
) -> Plan[list[bytes]]:
    """`request_frames()`: arguments checked now, the plan returns the result frames."""
    deadline = deadline_of(timeout_s)
    wire = wire_options(options)
    return request(s, service_name(service), payload_frames(payload), wire, deadline, timeout_s)


def plan_result(s: Settings, task_id: str, timeout_s: float | None) -> Plan[list[bytes]]:
    deadline = deadline_of(timeout_s)
    return await_result(s, task_id_arg(task_id), deadline, timeout_s)


def plan_stream(
    s: Settings,
    service: str | bytes,
    payload: Payload,
    timeout_s: float | None,
    options: TaskOptions,
    how: Follow,
) -> Plan[list[bytes]]:
    """`stream()`: arguments checked now; the plan delivers chunks, returns the result."""
    deadline = deadline_of(timeout_s)
    task = (service_name(service), payload_frames(payload), wire_options(options))
    return stream(s, None, 0, how, deadline, timeout_s, task)


def plan_read_stream(
    s: Settings, task_id: str, offset: int, timeout_s: float | None, how: Follow
) -> Plan[list[bytes]]:
    """`read_stream()`: arguments checked now."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError("offset must be an int >= 0")
    deadline = deadline_of(timeout_s)
    return stream(s, task_id_arg(task_id), offset, how, deadline, timeout_s)


def plan_status(s: Settings, task_id: str, preview: int = 0) -> Plan[TaskStatus]:
    if type(preview) is not int or not 0 <= preview <= MAX_PREVIEW_BYTES:
        raise ValueError(f"preview must be an int 0..{MAX_PREVIEW_BYTES} (bytes)")
    return status(s, task_id_arg(task_id), preview)


def plan_admin(s: Settings, command: bytes, key: str) -> Plan[list[dict[str, Any]]]:
    """QUEUES or WORKERS: the list the broker answers under `key`."""
    meta = yield from plan_control(s, command)
    rows = meta.get(key)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        name = zbc.COMMAND_NAMES[command]
        raise ReplyError("bad_meta", f"{name} answer without a '{key}' list of maps")
    return rows


def plan_queues_page(
    s: Settings, limit: int, after: str | None
) -> Plan[tuple[list[dict[str, Any]], str | None]]:
    """One QUEUES page: (rows, the `after` of the next page or None on the last)."""
    if type(limit) is not int or not 1 <= limit <= MAX_QUEUES_PAGE:
        raise ValueError(f"limit must be an integer 1..{MAX_QUEUES_PAGE}")
    if after is not None and not isinstance(after, str):
        raise TypeError("after must be a service name (str) or None")
    fields: dict[str, Any] = {"limit": limit}
    if after is not None:
        fields["after"] = after
    meta = yield from plan_control(s, zbc.QUEUES, **fields)
    rows = meta.get("queues")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ReplyError("bad_meta", "QUEUES answer without a 'queues' list of maps")
    following = meta.get("next")
    if following is not None and not isinstance(following, str):
        raise ReplyError("bad_meta", "QUEUES answer with a 'next' that is not a name")
    return rows, following


def plan_queues(s: Settings, page_size: int) -> Plan[list[dict[str, Any]]]:
    """Every service's QUEUES row, page after page (each page is exact when it is
    read; the whole list is not one atomic read)."""
    rows: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page, after = yield from plan_queues_page(s, page_size, after)
        rows += page
        if after is None:
            return rows


def plan_control(s: Settings, command: bytes, **fields: Any) -> Plan[dict[str, Any]]:
    """An admin call (DRAIN, PAUSE, RESUME, LIMIT, STATS): the broker's answer fields."""
    name = zbc.COMMAND_NAMES[command]
    # nil is meaningful here (LIMIT without a limit): keep None fields in the meta.
    meta = {"rid": 0, **fields}

    def build(rid: int) -> list[bytes]:
        meta["rid"] = rid
        return [zbc.EMPTY, zbc.ZBC01, command, ext.pack_meta(meta)]

    answer = yield from call(s, name, build)
    return dict(answer.meta)


def plan_purge(s: Settings, service: str) -> Plan[int]:
    """PURGE until nothing waiting is left (the broker purges a bounded number per call)."""
    total = 0
    while True:
        answer = yield from plan_control(s, zbc.PURGE, service=service)
        total += int(answer["purged"])
        if not answer.get("more") or not answer["purged"]:
            return total


def plan_drop(s: Settings, service: str, ids: Sequence[str] | None) -> Plan[int]:
    """DROP the dead letters listed, or (ids None) all of them, a bounded number per call."""
    total = 0
    if ids is not None:
        # MAX_BATCH ids per call: the broker refuses a longer list whole.
        wanted = list(ids)
        for start in range(0, len(wanted), MAX_BATCH):
            chunk = wanted[start : start + MAX_BATCH]
            answer = yield from plan_control(s, zbc.DROP, service=service, ids=chunk)
            total += int(answer["dropped"])
        return total
    while True:
        answer = yield from plan_control(s, zbc.DROP, service=service)
        total += int(answer["dropped"])
        if not answer.get("more") or not answer["dropped"]:
            return total


def plan_tasks(
    s: Settings, service: str, state: str, limit: int, after: int, older_than_s: float
) -> Plan[tuple[list[dict[str, Any]], int | None]]:
    """One page of TASKS: (records, the `after` of the next page or None)."""
    answer = yield from plan_control(
        s,
        zbc.TASKS,
        service=service,
        state=state,
        limit=limit,
        after=after,
        older_than_s=older_than_s,
    )
    return list(answer["tasks"]), answer.get("next")


def plan_cancel(s: Settings, task_id: str) -> Plan[TaskState]:
    return cancel(s, task_id_arg(task_id))


def plan_dead_letters(
    s: Settings, service: str | bytes, limit: int | None
) -> Plan[list[DeadLetter]]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise TypeError("limit must be an int or None")
    if limit is not None and limit < 1:
        raise ValueError("limit must be at least 1 (None: all)")
    return dead_letters(s, service_name(service), limit)


def plan_redrive(s: Settings, service: str | bytes, ids: Sequence[str] | None) -> Plan[list[str]]:
    if isinstance(ids, str | bytes):
        raise TypeError("ids must be a sequence of task ids, not one str")
    name = service_name(service)
    return redrive(s, name, None if ids is None else [task_id_arg(i) for i in ids])


def one_frame(frames: list[bytes]) -> bytes:
    """The single frame of a result (b"" for a result of no frames, as a handler that
    returns nothing gives); ReplyError (the result stays fetchable) for several."""
    if not frames:
        return b""
    if len(frames) != 1:
        raise ReplyError(
            "result_frames",
            f"expected a one-frame result, got {len(frames)} frames "
            "(the result stays available: fetch it with result_frames())",
        )
    return frames[0]


def check_settings(timeout_s: float, retries: int, poll_s: float) -> None:
    """The constructor arguments every client shares."""
    if not timeout_s > 0:
        raise ValueError("timeout_s must be positive")
    if retries < 0:
        raise ValueError("retries must be zero or more")
    if not 0 < poll_s <= zbc.MAX_WAIT_S:
        raise ValueError(f"poll_s must be positive and at most {zbc.MAX_WAIT_S:g}")
