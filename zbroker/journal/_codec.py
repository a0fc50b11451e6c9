"""How a task record and a list of frames become bytes, and what a record and a
stream write must satisfy.

Shared by both stores, so `MemoryJournal` accepts and returns exactly what
`LmdbJournal` does. Owns the record's encoding (schema version 1); never opens a store.

A record is a msgpack array of 16 fields, 17 when its `uncharged` count is not 0,
18 when it has an `owner`, 19 when its stream has entries (field 19 is
[stream_chunks, stream_bytes]), 20 when it has dependencies or placement and
flow-control options (field 20 is a map: {"d": depends_on, "b": blocked_on, "r":
run_anyway, "i": input, "q": require, "p": prefer, "a": affinity, "k":
concurrency_key}, fields at their defaults left out), 21 when its `crashes` stamp
is not 0 (field 21, an int); the fields before the last one written are then
written too (field 20 possibly {}) (`owner` possibly nil, the stream [0, 0]). Each
field is written only when a record needs it or a later one: a store written
before a field existed reads unchanged (as 0, None, 0, 0, the defaults, 0), and a
record without them is written exactly as before.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import msgpack

from zbroker.journal.base import PRIORITY_MAX, PRIORITY_MIN, TaskRecord, TaskState

# LMDB keys (and DUPSORT values) are limited to 511 bytes; index keys add up to 17.
MAX_ID_BYTES = 480
MAX_SEQ = 2**63 - 1
# A stream entry's attempt is 4 bytes in LMDB; its offset 8 (the next offset too).
MAX_ATTEMPT = 2**32 - 1
MAX_OFFSET = MAX_SEQ

_STATES = {int(s): s for s in TaskState}
_DOUBLE = struct.Struct(">d")
_U64 = struct.Struct(">Q")
_SIGN = 1 << 63
_BYTES_LIKE = (bytes, bytearray, memoryview)
_ALL_ONES = (1 << 64) - 1


def check_record(record: TaskRecord) -> None:
    """Raise ValueError (or TypeError) if `record` cannot be stored and indexed faithfully."""
    task_id = record.id
    if type(task_id) is not str or not task_id:
        raise ValueError(f"task id must be a non-empty str, got {task_id!r}")
    if len(task_id.encode()) > MAX_ID_BYTES:  # also rejects ids that are not valid UTF-8
        raise ValueError(f"task id longer than {MAX_ID_BYTES} bytes: {task_id[:40]!r}...")
    if type(record.service) is not str:
        raise TypeError(f"service must be a str, got {type(record.service).__name__}")
    record.service.encode()
    if record.state not in _STATES:
        raise ValueError(f"unknown task state {record.state!r}")
    priority = record.priority
    if type(priority) is not int or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(
            f"priority must be an int in {PRIORITY_MIN}..{PRIORITY_MAX}, got {priority!r}"
        )
    seq = record.seq
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq must be an int in 0..2**63-1, got {seq!r}")
    # x != x only for NaN, which no index can order.
    not_before, expires_at, keep_until = record.not_before, record.expires_at, record.keep_until
    if (
        not_before != not_before
        or (expires_at is not None and expires_at != expires_at)
        or (keep_until is not None and keep_until != keep_until)
    ):
        raise ValueError("not_before, expires_at and keep_until must not be NaN")
    _check_count("uncharged", record.uncharged)
    _check_count("crashes", record.crashes)
    owner = record.owner
    if owner is not None and (type(owner) is not str or not owner):
        raise ValueError(f"owner must be a non-empty str or None, got {owner!r}")
    stream_chunks, stream_bytes = record.stream_chunks, record.stream_bytes
    if type(stream_chunks) is not int or not 0 <= stream_chunks <= MAX_OFFSET:
        raise ValueError(f"stream_chunks must be an int >= 0, got {stream_chunks!r}")
    if type(stream_bytes) is not int or not 0 <= stream_bytes <= MAX_SEQ:
        raise ValueError(f"stream_bytes must be an int >= 0, got {stream_bytes!r}")
    if stream_bytes and not stream_chunks:  # not stored without entries: it would read as 0
        raise ValueError(f"stream_bytes is {stream_bytes} but stream_chunks is 0")
    _check_scheduling(record)
    key = record.key
    if key is not None:
        if type(key) is not str:
            raise TypeError(f"key must be a str or None, got {type(key).__name__}")
        key.encode()


def _check_count(name: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_scheduling(record: TaskRecord) -> None:
    depends_on, require, prefer = record.depends_on, record.require, record.prefer
    if (
        depends_on == ()
        and require == ()
        and prefer == ()
        and record.affinity is None
        and record.concurrency_key is None
        and record.blocked_on == 0
        and record.run_anyway is False
        and record.input is None
    ):
        return  # none of them set: most tasks, on every write
    for name in ("require", "prefer"):
        tags = getattr(record, name)
        if type(tags) is not tuple or not all(type(t) is str and t for t in tags):
            raise ValueError(f"{name} must be a tuple of non-empty str")
    for name in ("affinity", "concurrency_key"):
        value = getattr(record, name)
        if value is not None and (type(value) is not str or not value):
            raise ValueError(f"{name} must be a non-empty str or None")
    depends_on = record.depends_on
    if type(depends_on) is not tuple or not all(type(d) is str and d for d in depends_on):
        raise ValueError("depends_on must be a tuple of non-empty str")
    blocked_on = record.blocked_on
    if type(blocked_on) is not int or not 0 <= blocked_on <= len(depends_on):
        raise ValueError(f"blocked_on must be an int in 0..len(depends_on), got {blocked_on!r}")
    if not depends_on and (record.run_anyway or record.input is not None):
        raise ValueError("run_anyway and input are only stored with depends_on")


class Packer:
    """Encodes records and frame lists; one per journal (a msgpack Packer is reused,
    which is about twice as fast as `msgpack.packb`, but is not shareable)."""

    __slots__ = ("_pack",)

    def __init__(self) -> None:
        self._pack = msgpack.Packer().pack

    def record(self, record: TaskRecord) -> bytes:
        """The record as a msgpack array, without its id (the id is the storage key)."""
        fields: tuple[Any, ...] = (
            record.service,
            int(record.state),
            record.seq,
            record.created_at,
            record.priority,
            record.not_before,
            record.expires_at,
            record.attempt,
            record.max_attempts,
            record.timeout_s,
            record.key,
            record.headers,
            record.error,
            record.finished_at,
            record.keep_until,
            record.history,
        )
        if record.crashes:  # only records written since the store's first crash
            stream = (record.stream_chunks, record.stream_bytes)
            more = _scheduling_map(record)
            fields += (record.uncharged, record.owner, stream, more, record.crashes)
        elif (
            record.depends_on
            or record.require
            or record.prefer
            or record.affinity is not None
            or record.concurrency_key is not None
        ):
            stream = (record.stream_chunks, record.stream_bytes)
            fields += (record.uncharged, record.owner, stream, _scheduling_map(record))
        elif record.stream_chunks:
            stream = (record.stream_chunks, record.stream_bytes)
            fields += (record.uncharged, record.owner, stream)
        elif record.owner is not None:
            fields += (record.uncharged, record.owner)
        elif record.uncharged:
            fields += (record.uncharged,)
        return self._pack(fields)  # type: ignore[no-any-return]

    def frames(self, frames: Sequence[bytes]) -> bytes:
        """Frames as a msgpack array of bin: 1-5 bytes of overhead per frame."""
        check_frames(frames)
        return self._pack(list(frames))  # type: ignore[no-any-return]


def unpack_record(task_id: str, data: bytes) -> TaskRecord:
    """A fresh TaskRecord from `pack_record`'s bytes."""
    fields = msgpack.unpackb(data, strict_map_key=False)
    uncharged = fields[16] if len(fields) > 16 else 0
    owner = fields[17] if len(fields) > 17 else None  # None also when stored as nil
    stream_chunks, stream_bytes = fields[18] if len(fields) > 18 else (0, 0)
    (
        service,
        state,
        seq,
        created_at,
        priority,
        not_before,
        expires_at,
        attempt,
        max_attempts,
        timeout_s,
        key,
        headers,
        error,
        finished_at,
        keep_until,
        history,
    ) = fields[:16]
    record = TaskRecord(
        task_id,
        service,
        _STATES[state],
        seq,
        created_at,
        priority,
        not_before,
        expires_at,
        attempt,
        max_attempts,
        timeout_s,
        key,
        headers,
        error,
        finished_at,
        keep_until,
        history,
        uncharged,
        owner,
        stream_chunks,
        stream_bytes,
    )
    if len(fields) > 19:  # dependencies, placement, flow control, crashes: a few tasks only
        more = fields[19]
        record.depends_on = tuple(more.get("d", ()))
        record.blocked_on = more.get("b", 0)
        record.run_anyway = more.get("r", False)
        record.input = more.get("i")
        record.require = tuple(more.get("q", ()))
        record.prefer = tuple(more.get("p", ()))
        record.affinity = more.get("a")
        record.concurrency_key = more.get("k")
        if len(fields) > 20:
            record.crashes = fields[20]
    return record


def _scheduling_map(record: TaskRecord) -> dict[str, Any]:
    """Field 20: a record's dependencies, placement and flow-control options, without
    the fields at their defaults."""
    more: dict[str, Any] = {}
    if record.depends_on:
        more["d"] = record.depends_on
    if record.blocked_on:
        more["b"] = record.blocked_on
    if record.run_anyway:
        more["r"] = True
    if record.input is not None:
        more["i"] = record.input
    if record.require:
        more["q"] = record.require
    if record.prefer:
        more["p"] = record.prefer
    if record.affinity is not None:
        more["a"] = record.affinity
    if record.concurrency_key is not None:
        more["k"] = record.concurrency_key
    return more


def check_frames(frames: Sequence[bytes]) -> None:
    if isinstance(frames, (*_BYTES_LIKE, str)):
        raise TypeError("frames must be a sequence of bytes, not a single bytes or str")
    items: Sequence[object] = frames  # bytes-like frames too: checked here, not typed
    for frame in items:
        if type(frame) is not bytes and not isinstance(frame, _BYTES_LIKE):
            raise TypeError(f"frames must be bytes, got {type(frame).__name__}")


def check_stream_write(offset: int, attempt: int, chunks: Sequence[bytes]) -> None:
    """Raise ValueError (or TypeError) if `put_chunks` cannot store these entries."""
    if type(attempt) is not int or not 1 <= attempt <= MAX_ATTEMPT:
        raise ValueError(f"attempt must be an int in 1..{MAX_ATTEMPT}, got {attempt!r}")
    check_frames(chunks)
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET - len(chunks):
        raise ValueError(
            f"offset must be an int >= 0 with room for {len(chunks)} entries, got {offset!r}"
        )


def copy_frames(frames: Sequence[bytes]) -> list[bytes]:
    """Frames as a new list of immutable bytes, checked like `Packer.frames`."""
    check_frames(frames)
    items: Sequence[Any] = frames  # bytearray and memoryview frames become bytes here
    return [bytes(frame) for frame in items]


def unpack_frames(data: bytes) -> list[bytes]:
    frames: Any = msgpack.unpackb(data)
    return frames  # type: ignore[no-any-return]


def time_key(t: float) -> bytes:
    """8 bytes that sort like the float `t` (IEEE bits, sign-flipped); exact, no rounding."""
    (bits,) = _U64.unpack(_DOUBLE.pack(t + 0.0))  # + 0.0 turns -0.0 into 0.0
    return _U64.pack(bits ^ _ALL_ONES if bits & _SIGN else bits | _SIGN)


def time_from_key(key: bytes) -> float:
    (bits,) = _U64.unpack(key[:8])
    (t,) = _DOUBLE.unpack(_U64.pack(bits ^ _SIGN if bits & _SIGN else bits ^ _ALL_ONES))
    return float(t)
