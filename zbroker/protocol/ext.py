"""zbroker's extension worker protocol (ZBW01): what 7/MDP cannot say.

A ZBW01 worker declares a credit (how many tasks it may hold at once), gets
tasks with an id and an attempt number, acknowledges them, may report
progress, and ends each attempt with DONE (result frames) or FAIL. Every
worker message about a task names (id, attempt): the attempt is a fencing
token, so messages about an attempt the broker has already taken back are
refused.

Frames after the ROUTER routing id: ["", "ZBW01", command, meta?, payload...].
`meta` is one msgpack map; payload and result frames follow it and are never
decoded by the broker. Pure codec: no sockets, no clock, no broker state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from zbroker.protocol import limits
from zbroker.protocol.errors import ProtocolError

ZBW01 = b"ZBW01"
EMPTY = b""

# Commands (one byte). Direction: w = worker -> broker, b = broker -> worker.
READY = b"\x01"  # w: {service, credit, tags?}
TASK = b"\x02"  # b: {id, attempt, service, headers?, timeout_s?, deps?}, payload...
ACK = b"\x03"  # w: {tasks: [[id, attempt], ...]}
PROGRESS = b"\x04"  # w: {id, attempt}, data...
DONE = b"\x05"  # w: {id, attempt}, result...
FAIL = b"\x06"  # w: {id, attempt, reason, retry?, delay_s?}
HEARTBEAT = b"\x07"  # both; from a worker optionally {metrics}
DISCONNECT = b"\x08"  # both; from the broker optionally {reason}
CANCEL = b"\x09"  # b: {id, attempt}: stop working on this attempt
TASKS = b"\x0a"  # b: {tasks: [{id, attempt, service, headers?, timeout_s?, deps?, n}, ...]}, ...
DONES = b"\x0b"  # w: {tasks: [[id, attempt, n], ...]}, result frames of each in order
STOPPING = b"\x0c"  # b: {drain_s}: the broker is stopping; no new task; results still taken
CHUNK = b"\x0d"  # w: {id, attempt}, one frame per chunk: appended to the task's stream
TAGS = b"\x0e"  # w: {tags}: the worker's tags from now on (a model loaded or unloaded)

COMMAND_NAMES = {
    READY: "READY",
    TASK: "TASK",
    ACK: "ACK",
    PROGRESS: "PROGRESS",
    DONE: "DONE",
    FAIL: "FAIL",
    HEARTBEAT: "HEARTBEAT",
    DISCONNECT: "DISCONNECT",
    CANCEL: "CANCEL",
    TASKS: "TASKS",
    DONES: "DONES",
    STOPPING: "STOPPING",
    CHUNK: "CHUNK",
}

# The limits of ZBW01, under the names this module has always given them (their
# home, with the reason for each, is zbroker.protocol.limits).
MAX_CREDIT = limits.MAX_CREDIT
MAX_TAGS = limits.MAX_TAGS
MAX_BATCH = limits.ZBW_MAX_BATCH  # tasks per TASKS or DONES message

_packb = msgpack.Packer(use_bin_type=True).pack


def pack_meta(meta: dict[str, Any]) -> bytes:
    packed: bytes = _packb(meta)
    return packed


def unpack_meta(frame: bytes) -> dict[str, Any]:
    """msgpack map -> dict; anything else is the peer's fault."""
    try:
        meta = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_meta", f"metadata is not msgpack: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError("bad_meta", "metadata is not a map")
    return meta


# --------------------------------------------------------- worker -> broker


@dataclass(frozen=True, slots=True)
class Ready:
    """The worker offers `service` and may hold up to `credit` tasks at once."""

    service: str
    credit: int
    tags: tuple[str, ...] = ()
    batch: bool = False  # the worker accepts TASKS (several tasks in one message)


@dataclass(frozen=True, slots=True)
class Tags:
    """The worker's tags from now on, replacing those of its READY (§16)."""

    tags: tuple[str, ...]


# Built once per message (or task) on the hot path: not frozen, whose __init__ costs
# about 3x more in CPython 3.11 (bench/instructions.py). Treat it as a value all the same
# (it hashes by its fields, as a frozen one would).
@dataclass(slots=True, unsafe_hash=True)
class Ack:
    """The worker has taken these attempts: (task id, attempt) pairs."""

    tasks: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Progress:
    """The attempt is still running (renews its lease); optional data frames."""

    id: str
    attempt: int
    data: tuple[bytes, ...] = ()


# Built once per message on the hot path of a stream: not frozen (see Done).
@dataclass(slots=True, unsafe_hash=True)
class Chunk:
    """Chunks for the attempt's task stream (§13), one per frame, in order."""

    id: str
    attempt: int
    data: tuple[bytes, ...]


# Built once per message (or task) on the hot path: not frozen, whose __init__ costs
# about 3x more in CPython 3.11 (bench/instructions.py). Treat it as a value all the same
# (it hashes by its fields, as a frozen one would).
@dataclass(slots=True, unsafe_hash=True)
class Done:
    """The attempt finished; `result` frames go to whoever waits for the task."""

    id: str
    attempt: int
    result: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Fail:
    """The attempt failed; `retry` False means no further attempt can succeed."""

    id: str
    attempt: int
    reason: str
    retry: bool = True
    delay_s: float | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness; a worker may attach a small map of its own metrics.

    `metrics_ok` is False when metrics were attached but unreadable: the
    heartbeat still counts as a sign of life, only the metrics are lost."""

    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_ok: bool = True


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The peer is leaving (worker) or no longer knows the peer (broker)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Dones:
    """Several DONEs in one message (any worker may send it)."""

    items: tuple[Done, ...]


WorkerMessage = Ready | Ack | Progress | Chunk | Done | Dones | Fail | Heartbeat | Disconnect | Tags
_EMPTY_HEARTBEAT = Heartbeat()
_EMPTY_DISCONNECT = Disconnect()


def _task_ref(meta: dict[str, Any]) -> tuple[str, int]:
    task_id = meta.get("id")
    attempt = meta.get("attempt")
    if not isinstance(task_id, str) or type(attempt) is not int:
        raise ProtocolError("bad_meta", "needs a string id and an integer attempt")
    return task_id, attempt


# One decoder per worker command, each given the frames after the routing id and
# their number (decode_worker has checked that there are at least 3, the first
# empty). The checks inside a decoder run in the order they always have: when a
# message breaks several rules, the same one is reported.


def _decode_done(frames: Sequence[bytes], n: int) -> Done:
    if n < 4:
        raise ProtocolError("missing_frames", "DONE needs a metadata frame")
    task_id, attempt = _task_ref(unpack_meta(frames[3]))
    return Done(task_id, attempt, tuple(frames[4:]))


def _decode_dones(frames: Sequence[bytes], n: int) -> Dones:
    if n < 4:
        raise ProtocolError("missing_frames", "DONES needs a metadata frame")
    entries = unpack_meta(frames[3]).get("tasks")
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_BATCH:
        raise ProtocolError("bad_meta", f"DONES needs a 'tasks' list of 1..{MAX_BATCH}")
    items = []
    at = 4
    # Checked inline, not through a helper: this loop runs once per task the broker's
    # workers finish.
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or type(entry[1]) is not int
            or type(entry[2]) is not int
            or entry[2] < 0
        ):
            raise ProtocolError("bad_meta", "DONES entries are [id, attempt, frames]")
        items.append(Done(entry[0], entry[1], tuple(frames[at : at + entry[2]])))
        at += entry[2]
    if at != n:
        raise ProtocolError("bad_meta", "DONES frame counts do not add up")
    return Dones(tuple(items))


def _decode_ack(frames: Sequence[bytes], n: int) -> Ack:
    if n != 4:
        raise ProtocolError("missing_frames" if n < 4 else "extra_frames", "ACK: one map")
    tasks = unpack_meta(frames[3]).get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ProtocolError("bad_meta", "ACK needs a non-empty 'tasks' list")
    refs = []
    for ref in tasks:  # inline checks, as in DONES: once per task
        if (
            not isinstance(ref, list)
            or len(ref) != 2
            or not isinstance(ref[0], str)
            or type(ref[1]) is not int
        ):
            raise ProtocolError("bad_meta", "ACK entries are [id, attempt]")
        refs.append((ref[0], ref[1]))
    return Ack(tuple(refs))


def _decode_heartbeat(frames: Sequence[bytes], n: int) -> Heartbeat:
    if n == 3:
        return _EMPTY_HEARTBEAT
    if n > 4:
        raise ProtocolError("extra_frames", "HEARTBEAT has at most one metadata frame")
    # Unreadable metrics lose only the metrics: the heartbeat still counts.
    try:
        metrics = unpack_meta(frames[3]).get("metrics", {})
    except ProtocolError:
        return Heartbeat({}, metrics_ok=False)
    if not isinstance(metrics, dict):
        return Heartbeat({}, metrics_ok=False)
    return Heartbeat(metrics)


def _decode_progress(frames: Sequence[bytes], n: int) -> Progress:
    if n < 4:
        raise ProtocolError("missing_frames", "PROGRESS needs a metadata frame")
    task_id, attempt = _task_ref(unpack_meta(frames[3]))
    return Progress(task_id, attempt, tuple(frames[4:]))


def _decode_chunk(frames: Sequence[bytes], n: int) -> Chunk:
    if n < 5:
        raise ProtocolError("missing_frames", "CHUNK needs a metadata frame and a chunk")
    task_id, attempt = _task_ref(unpack_meta(frames[3]))
    return Chunk(task_id, attempt, tuple(frames[4:]))


def _decode_fail(frames: Sequence[bytes], n: int) -> Fail:
    if n != 4:
        raise ProtocolError("missing_frames" if n < 4 else "extra_frames", "FAIL: one map")
    meta = unpack_meta(frames[3])
    task_id, attempt = _task_ref(meta)
    reason = meta.get("reason", "")
    retry = meta.get("retry", True)
    delay_s = meta.get("delay_s")
    if not isinstance(reason, str) or not isinstance(retry, bool):
        raise ProtocolError("bad_meta", "FAIL: 'reason' is a string, 'retry' a boolean")
    if delay_s is None:
        return Fail(task_id, attempt, reason, retry)
    if (
        not isinstance(delay_s, int | float)
        or isinstance(delay_s, bool)
        or not 0 <= delay_s < math.inf  # also refuses NaN
    ):
        raise ProtocolError("bad_meta", "FAIL: 'delay_s' is a finite non-negative number")
    return Fail(task_id, attempt, reason, retry, float(delay_s))


def _decode_ready(frames: Sequence[bytes], n: int) -> Ready:
    if n != 4:
        raise ProtocolError("missing_frames" if n < 4 else "extra_frames", "READY: one map")
    meta = unpack_meta(frames[3])
    service = meta.get("service")
    credit = meta.get("credit", 1)
    tags = meta.get("tags", [])
    batch = meta.get("batch", False)
    if not isinstance(batch, bool):
        raise ProtocolError("bad_meta", "READY 'batch' must be a boolean")
    if not isinstance(service, str) or not service:
        raise ProtocolError("bad_meta", "READY needs a non-empty 'service' string")
    if type(credit) is not int or not 1 <= credit <= MAX_CREDIT:
        raise ProtocolError("bad_meta", f"READY 'credit' must be an integer 1..{MAX_CREDIT}")
    return Ready(service, credit, _tags(tags, "READY"), batch)


def _tags(tags: Any, command: str) -> tuple[str, ...]:
    if (
        not isinstance(tags, list)
        or len(tags) > MAX_TAGS
        or not all(isinstance(t, str) for t in tags)
    ):
        raise ProtocolError("bad_meta", f"{command} 'tags' must be at most {MAX_TAGS} strings")
    return tuple(tags)


def _decode_tags(frames: Sequence[bytes], n: int) -> Tags:
    if n != 4:
        raise ProtocolError("missing_frames" if n < 4 else "extra_frames", "TAGS: one map")
    meta = unpack_meta(frames[3])
    if "tags" not in meta:
        raise ProtocolError("bad_meta", "TAGS needs 'tags'")
    return Tags(_tags(meta["tags"], "TAGS"))


def _decode_disconnect(frames: Sequence[bytes], n: int) -> Disconnect:
    if n > 4:
        raise ProtocolError("extra_frames", "DISCONNECT has at most one metadata frame")
    return _EMPTY_DISCONNECT


_WORKER_DECODERS: dict[bytes, Callable[[Sequence[bytes], int], WorkerMessage]] = {
    DONE: _decode_done,
    DONES: _decode_dones,
    ACK: _decode_ack,
    HEARTBEAT: _decode_heartbeat,
    PROGRESS: _decode_progress,
    CHUNK: _decode_chunk,
    FAIL: _decode_fail,
    READY: _decode_ready,
    DISCONNECT: _decode_disconnect,
    TAGS: _decode_tags,
}


def decode_worker(frames: Sequence[bytes]) -> WorkerMessage:
    """Broker side: frames after the routing id, from a ZBW01 worker."""
    n = len(frames)
    if n < 3:
        raise ProtocolError("missing_frames", "ZBW01 message needs a command frame")
    if frames[0]:
        raise ProtocolError("bad_delimiter", "first frame must be empty")
    decode = _WORKER_DECODERS.get(frames[2])
    if decode is None:
        raise ProtocolError("unknown_command", f"unknown ZBW01 command {frames[2][:8]!r}")
    return decode(frames, n)


def ready(
    service: str, credit: int, tags: Sequence[str] = (), *, batch: bool = False
) -> list[bytes]:
    meta: dict[str, Any] = {"service": service, "credit": credit}
    if tags:
        meta["tags"] = list(tags)
    if batch:
        meta["batch"] = True
    return [EMPTY, ZBW01, READY, pack_meta(meta)]


def tags(tags: Sequence[str]) -> list[bytes]:
    """TAGS: the worker's tags from now on (an empty list clears them)."""
    return [EMPTY, ZBW01, TAGS, pack_meta({"tags": list(tags)})]


def ack(tasks: Sequence[tuple[str, int]]) -> list[bytes]:
    return [EMPTY, ZBW01, ACK, pack_meta({"tasks": [list(t) for t in tasks]})]


def progress(task_id: str, attempt: int, data: Sequence[bytes] = ()) -> list[bytes]:
    return [EMPTY, ZBW01, PROGRESS, pack_meta({"id": task_id, "attempt": attempt}), *data]


def done(task_id: str, attempt: int, result: Sequence[bytes]) -> list[bytes]:
    return [EMPTY, ZBW01, DONE, pack_meta({"id": task_id, "attempt": attempt}), *result]


def dones(results: Sequence[tuple[str, int, Sequence[bytes]]]) -> list[bytes]:
    """Several DONEs in one message: (id, attempt, result frames) each."""
    entries = [[task_id, attempt, len(frames)] for task_id, attempt, frames in results]
    out = [EMPTY, ZBW01, DONES, pack_meta({"tasks": entries})]
    for _, _, frames in results:
        out.extend(frames)
    return out


def fail(
    task_id: str, attempt: int, reason: str, *, retry: bool = True, delay_s: float | None = None
) -> list[bytes]:
    meta: dict[str, Any] = {"id": task_id, "attempt": attempt, "reason": reason, "retry": retry}
    if delay_s is not None:
        meta["delay_s"] = delay_s
    return [EMPTY, ZBW01, FAIL, pack_meta(meta)]


def heartbeat(metrics: dict[str, Any] | None = None) -> list[bytes]:
    if metrics:
        return [EMPTY, ZBW01, HEARTBEAT, pack_meta({"metrics": metrics})]
    return [EMPTY, ZBW01, HEARTBEAT]


def disconnect(reason: str = "") -> list[bytes]:
    if reason:
        return [EMPTY, ZBW01, DISCONNECT, pack_meta({"reason": reason})]
    return [EMPTY, ZBW01, DISCONNECT]


# --------------------------------------------------------- broker -> worker


# Built once per message (or task) on the hot path: not frozen, whose __init__ costs
# about 3x more in CPython 3.11 (bench/instructions.py). Treat it as a value all the same
# (it hashes by its fields, as a frozen one would).
@dataclass(slots=True, unsafe_hash=True)
class Task:
    """One attempt of a task, as a worker receives it."""

    id: str
    attempt: int
    service: str
    payload: tuple[bytes, ...]
    headers: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    # The ids of the tasks it depended on (`depends_on`, §15), in the enqueue's order.
    deps: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Cancel:
    """The broker took this attempt back (cancelled, timed out, or reassigned)."""

    id: str
    attempt: int
    reason: str | None = None  # why, when the broker says (a stream past its cap)


@dataclass(frozen=True, slots=True)
class Tasks:
    """Several TASKs in one message (sent only to workers whose READY said batch)."""

    tasks: tuple[Task, ...]


@dataclass(frozen=True, slots=True)
class Stopping:
    """The broker is stopping: it sends no new task, and takes the results of the
    attempts the worker holds for up to `drain_s` seconds more."""

    drain_s: float


BrokerMessage = Task | Tasks | Cancel | Heartbeat | Disconnect | Stopping


def task_meta(
    task_id: str,
    attempt: int,
    service: str,
    headers: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    deps: Sequence[str] | None = None,
) -> bytes:
    meta: dict[str, Any] = {"id": task_id, "attempt": attempt, "service": service}
    if headers:
        meta["headers"] = headers
    if timeout_s is not None:
        meta["timeout_s"] = timeout_s
    if deps:
        meta["deps"] = deps
    return pack_meta(meta)


def task_entry(
    task_id: str,
    attempt: int,
    service: str,
    frames: int,
    headers: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    deps: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One task's entry in a TASKS message; `frames` counts its payload frames."""
    entry: dict[str, Any] = {"id": task_id, "attempt": attempt, "service": service, "n": frames}
    if headers:
        entry["headers"] = headers
    if timeout_s is not None:
        entry["timeout_s"] = timeout_s
    if deps:
        entry["deps"] = deps
    return entry


def tasks_header(entries: list[dict[str, Any]]) -> list[bytes]:
    """TASKS without its payload frames (the caller appends each task's, in order)."""
    return [EMPTY, ZBW01, TASKS, pack_meta({"tasks": entries})]


def cancel(task_id: str, attempt: int, reason: str | None = None) -> list[bytes]:
    """CANCEL of an attempt; `reason` when the worker should know why (a stream cap)."""
    meta: dict[str, Any] = {"id": task_id, "attempt": attempt}
    if reason is not None:
        meta["reason"] = reason
    return [EMPTY, ZBW01, CANCEL, pack_meta(meta)]


def chunk(task_id: str, attempt: int, data: Sequence[bytes]) -> list[bytes]:
    """Worker -> broker: chunks for the stream of the task of this attempt (§13)."""
    return [EMPTY, ZBW01, CHUNK, pack_meta({"id": task_id, "attempt": attempt}), *data]


def stopping(drain_s: float) -> list[bytes]:
    """STOPPING: the broker waits up to `drain_s` seconds for results, then stops."""
    return [EMPTY, ZBW01, STOPPING, pack_meta({"drain_s": float(drain_s)})]


# One decoder per broker command, each given all the frames (decode_for_worker has
# checked the header: empty, ZBW01, command).


def _task(meta: dict[str, Any], task_id: str, attempt: int, payload: tuple[bytes, ...]) -> Task:
    """The Task a TASK meta or a TASKS entry describes (its id and attempt read already)."""
    service = meta.get("service", "")
    headers = meta.get("headers", {})
    timeout_s = meta.get("timeout_s")
    deps = meta.get("deps", ())
    if not isinstance(service, str) or not isinstance(headers, dict):
        raise ProtocolError("bad_meta", "TASK 'service' is a string, 'headers' a map")
    if not isinstance(deps, list | tuple) or not all(isinstance(d, str) for d in deps):
        raise ProtocolError("bad_meta", "TASK 'deps' is a list of task ids")
    return Task(
        task_id,
        attempt,
        service,
        payload,
        headers,
        float(timeout_s) if isinstance(timeout_s, int | float) else None,
        tuple(deps),
    )


def _decode_task(frames: Sequence[bytes]) -> Task:
    if len(frames) < 4:
        raise ProtocolError("missing_frames", "TASK needs a metadata frame")
    meta = unpack_meta(frames[3])
    task_id, attempt = _task_ref(meta)
    return _task(meta, task_id, attempt, tuple(frames[4:]))


def _decode_tasks(frames: Sequence[bytes]) -> Tasks:
    if len(frames) < 4:
        raise ProtocolError("missing_frames", "TASKS needs a metadata frame")
    entries = unpack_meta(frames[3]).get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ProtocolError("bad_meta", "TASKS needs a non-empty 'tasks' list")
    tasks = []
    at = 4
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError("bad_meta", "TASKS entries are maps")
        task_id, attempt = _task_ref(entry)
        count = entry.get("n")
        if type(count) is not int or count < 0:
            raise ProtocolError("bad_meta", "TASKS entry needs a frame count 'n'")
        tasks.append(_task(entry, task_id, attempt, tuple(frames[at : at + count])))
        at += count
    if at != len(frames):
        raise ProtocolError("bad_meta", "TASKS frame counts do not add up")
    return Tasks(tuple(tasks))


def _decode_heartbeat_for_worker(frames: Sequence[bytes]) -> Heartbeat:
    return _EMPTY_HEARTBEAT


def _decode_cancel(frames: Sequence[bytes]) -> Cancel:
    if len(frames) < 4:
        raise ProtocolError("missing_frames", "CANCEL needs a metadata frame")
    meta = unpack_meta(frames[3])
    reason = meta.get("reason")
    return Cancel(*_task_ref(meta), reason if isinstance(reason, str) else None)


def _decode_disconnect_for_worker(frames: Sequence[bytes]) -> Disconnect:
    reason = ""
    if len(frames) > 3:
        value = unpack_meta(frames[3]).get("reason", "")
        reason = value if isinstance(value, str) else ""
    return Disconnect(reason)


def _decode_stopping(frames: Sequence[bytes]) -> Stopping:
    if len(frames) < 4:
        raise ProtocolError("missing_frames", "STOPPING needs a metadata frame")
    drain_s = unpack_meta(frames[3]).get("drain_s")
    if not isinstance(drain_s, int | float) or not 0 <= drain_s < math.inf:
        raise ProtocolError("bad_meta", "STOPPING needs a finite 'drain_s' >= 0")
    return Stopping(float(drain_s))


_BROKER_DECODERS: dict[bytes, Callable[[Sequence[bytes]], BrokerMessage]] = {
    TASK: _decode_task,
    TASKS: _decode_tasks,
    HEARTBEAT: _decode_heartbeat_for_worker,
    CANCEL: _decode_cancel,
    DISCONNECT: _decode_disconnect_for_worker,
    STOPPING: _decode_stopping,
}


def decode_for_worker(frames: Sequence[bytes]) -> BrokerMessage:
    """Worker side: what a DEALER worker receives (empty, ZBW01, command, ...)."""
    if len(frames) < 3 or frames[0] or frames[1] != ZBW01:
        raise ProtocolError("bad_header", "not a ZBW01 message")
    decode = _BROKER_DECODERS.get(frames[2])
    if decode is None:
        raise ProtocolError("unknown_command", f"unexpected command {frames[2][:8]!r} for a worker")
    return decode(frames)
