"""The reference journal: every task in process memory, nothing survives the process.

Used by tests, by the `memory` durability mode and by benchmarks, so it stays cheap
at a million tasks: records are kept msgpack-encoded (as in LMDB) and each index is
a blocked sorted list, so put, ready, due and lapsed cost O(log n), never O(n).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgpack

from zbroker.journal._codec import (
    Packer,
    check_record,
    check_stream_write,
    copy_frames,
    unpack_record,
)
from zbroker.journal.base import (
    FINISHED_STATES,
    PRIORITY_MAX,
    PRIORITY_MIN,
    Durability,
    Journal,
    JournalError,
    JournalStats,
    TaskRecord,
    TaskState,
    check_schedule_name,
)

# An index entry: the sort key, ending with the task id so entries are unique.
IndexKey = tuple[Any, ...]

_STATES = {int(s): s for s in TaskState}
_READY, _DELAYED, _INFLIGHT, _DEAD, _BLOCKED = (
    int(TaskState.READY),
    int(TaskState.DELAYED),
    int(TaskState.INFLIGHT),
    int(TaskState.DEAD),
    int(TaskState.BLOCKED),
)
_WAITING = (_READY, _DELAYED, _BLOCKED)  # their expires_at lapses
_FINISHED = frozenset(int(s) for s in FINISHED_STATES)

# What decides a record's index entries: (service, state, key, priority, seq,
# not_before, expires_at, keep_until). Kept as a tuple of atoms per task so the
# cyclic GC untracks it: a million tracked containers make every collection slow.
_Where = tuple[str, int, str | None, int, int, float, float | None, float | None]


def _where(record: TaskRecord) -> _Where:
    expires_at, keep_until = record.expires_at, record.keep_until
    return (
        record.service,
        int(record.state),
        record.key,
        record.priority,
        record.seq,
        record.not_before + 0.0,  # -0.0 -> 0.0, int -> float: one order with LMDB
        None if expires_at is None else expires_at + 0.0,
        None if keep_until is None else keep_until + 0.0,
    )


class SortedKeys:
    """A sorted collection of unique tuples, stored as blocks of at most 2 * BLOCK.

    A plain sorted list costs O(n) per insert or removal at the front (a million-task
    queue moves megabytes per pop); blocks bound that to O(BLOCK) plus a bisect over
    the block maxima.
    """

    BLOCK = 512

    __slots__ = ("_blocks", "_len", "_maxes")

    def __init__(self) -> None:
        self._blocks: list[list[IndexKey]] = []
        self._maxes: list[IndexKey] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, key: IndexKey) -> None:
        maxes = self._maxes
        if not maxes:
            self._blocks.append([key])
            maxes.append(key)
            self._len = 1
            return
        i = bisect_left(maxes, key)
        if i == len(maxes):
            i -= 1
            block = self._blocks[i]
            block.append(key)
            maxes[i] = key
        else:
            block = self._blocks[i]
            insort(block, key)
        self._len += 1
        if len(block) > 2 * self.BLOCK:
            half = self.BLOCK
            self._blocks[i : i + 1] = [block[:half], block[half:]]
            maxes[i : i + 1] = [block[half - 1], block[-1]]

    def remove(self, key: IndexKey) -> None:
        """Remove `key`, which must be present."""
        i = bisect_left(self._maxes, key)
        block = self._blocks[i]
        j = bisect_left(block, key)
        if block[j] != key:
            raise KeyError(key)  # an index out of step with the records: a bug
        del block[j]
        self._len -= 1
        if not block:
            del self._blocks[i]
            del self._maxes[i]
        elif j == len(block):
            self._maxes[i] = block[-1]

    def iter_from(self, start: IndexKey | None = None) -> Iterator[IndexKey]:
        """Keys in order, from the first one >= `start` (from the first key if None)."""
        blocks = self._blocks
        if start is None:
            i, j = 0, 0
        else:
            i = bisect_left(self._maxes, start)
            if i == len(blocks):
                return
            j = bisect_left(blocks[i], start)
        for block in blocks[i:]:
            yield from block[j:] if j else block
            j = 0

    def first(self) -> IndexKey | None:
        return self._blocks[0][0] if self._blocks else None


class MemoryJournal(Journal):
    """Everything in dicts and sorted lists; `commit` only counts. Durability.MEMORY."""

    def __init__(self) -> None:
        self.kind = "memory"
        self.durability = Durability.MEMORY
        self.stats = JournalStats()
        self._closed = False
        self._records: dict[str, bytes] = {}
        self._where: dict[str, _Where] = {}
        self._payloads: dict[str, tuple[bytes, ...]] = {}
        self._results: dict[str, tuple[bytes, ...]] = {}
        # task id -> offset -> (attempt, data); a task without entries is absent
        self._streams: dict[str, dict[int, tuple[int, bytes]]] = {}
        self._ready: dict[str, SortedKeys] = {}  # service -> (-priority, seq, id)
        self._dead: dict[str, SortedKeys] = {}  # service -> (seq, id)
        self._blocked: dict[str, SortedKeys] = {}  # service -> (seq, id)
        # task id -> the ids of the tasks waiting for it (edges of task graphs)
        self._dependents: dict[str, dict[str, None]] = {}
        self._edges = 0
        self._delayed = SortedKeys()  # (not_before, seq, id)
        self._lapse = SortedKeys()  # (expires_at or keep_until, seq, id)
        self._inflight = SortedKeys()  # (seq, id)
        self._keys: dict[tuple[str, str], str] = {}
        self._counts: dict[str, dict[int, int]] = {}
        self._options: dict[str, dict[str, Any]] = {}
        self._schedules: dict[str, bytes] = {}  # name -> msgpack map (recurring tasks)
        self._seq = 0
        self._dirty = False
        self._bytes = 0  # records, payloads, results, streams: what `stats.bytes_used` reports
        self._packer = Packer()

    # ----------------------------------------------------------------- writes

    def put(self, record: TaskRecord, payload: Sequence[bytes] | None = None) -> None:
        self._store(record, payload)
        self.stats.record_writes += 1

    def hold(self, record: TaskRecord) -> None:
        """Stored like a put (nothing here survives the process anyway), but not
        counted as a record write: the LMDB store writes none for it."""
        self._check_open()
        if record.state is not TaskState.INFLIGHT:
            raise ValueError(f"only an INFLIGHT record is held, not {record.state!r}")
        if record.id not in self._records:
            raise KeyError(f"no task {record.id!r} to hold")
        self._store(record, None)

    def _store(self, record: TaskRecord, payload: Sequence[bytes] | None) -> None:
        self._check_open()
        check_record(record)
        task_id, service, key = record.id, record.service, record.key
        if key is not None:
            holder = self._keys.get((service, key))
            if holder is not None and holder != task_id:
                raise ValueError(
                    f"idempotency key {key!r} of service {service!r} is held by task {holder!r}"
                )
        packed = self._packer.record(record)
        frames = None if payload is None else tuple(copy_frames(payload))

        where = _where(record)
        old = self._where.get(task_id)
        if old is None:
            for index, entry in self._places(task_id, where):
                index.add(entry)
            self._bytes += len(packed)
            self._count(service, where[1], +1)
            if frames is None:
                frames = ()
        elif old != where:
            places = self._places(task_id, where)
            old_places = self._places(task_id, old)
            for index, entry in old_places:
                if (index, entry) not in places:
                    index.remove(entry)
            for index, entry in places:
                if (index, entry) not in old_places:
                    index.add(entry)
            self._count(old[0], old[1], -1)
            self._count(service, where[1], +1)
            if old[2] is not None:
                del self._keys[(old[0], old[2])]
        if old is not None:
            self._bytes += len(packed) - len(self._records[task_id])
        if key is not None:
            self._keys[(service, key)] = task_id
        self._records[task_id] = packed
        self._where[task_id] = where
        if frames is not None:
            self._bytes += _size(frames) - _size(self._payloads.get(task_id))
            self._payloads[task_id] = frames
        self._dirty = True

    def put_result(self, task_id: str, frames: Sequence[bytes]) -> None:
        self._check_open()
        if task_id not in self._records:
            raise KeyError(f"no task {task_id!r} to store a result for")
        stored = tuple(copy_frames(frames))
        self._bytes += _size(stored) - _size(self._results.get(task_id))
        self._results[task_id] = stored
        self._dirty = True

    def put_chunks(self, task_id: str, offset: int, attempt: int, chunks: Sequence[bytes]) -> None:
        self._check_open()
        check_stream_write(offset, attempt, chunks)  # fail here, before any entry is stored
        if task_id not in self._records:
            raise KeyError(f"no task {task_id!r} to store stream chunks for")
        if not chunks:
            return
        stream = self._streams.get(task_id)
        if stream is None:
            stream = self._streams[task_id] = {}
        for n, data in enumerate(copy_frames(chunks)):
            old = stream.get(offset + n)
            self._bytes += len(data) - (0 if old is None else len(old[1]))
            stream[offset + n] = (attempt, data)
        self._dirty = True

    def delete(self, task_id: str) -> None:
        self._check_open()
        packed = self._records.pop(task_id, None)
        if packed is None:
            return
        self.stats.record_writes += 1
        where = self._where.pop(task_id)
        for index, entry in self._places(task_id, where):
            index.remove(entry)
        self._count(where[0], where[1], -1)
        if where[2] is not None:
            del self._keys[(where[0], where[2])]
        payload = self._payloads.pop(task_id, None)
        result = self._results.pop(task_id, None)
        stream = self._streams.pop(task_id, None)
        if stream is not None:
            self._bytes -= sum(len(data) for _, data in stream.values())
        self._bytes -= len(packed) + _size(payload) + _size(result)
        self._drop_edges(task_id)
        self._dirty = True

    def add_dependent(self, task_id: str, dependent_id: str) -> None:
        self._check_open()
        if task_id not in self._records:
            raise KeyError(f"no task {task_id!r} to store a dependent of")
        if type(dependent_id) is not str or not dependent_id:
            raise ValueError(f"dependent id must be a non-empty str, got {dependent_id!r}")
        edges = self._dependents.get(task_id)
        if edges is None:
            edges = self._dependents[task_id] = {}
        if dependent_id not in edges:
            edges[dependent_id] = None
            self._edges += 1
            self._bytes += len(task_id) + len(dependent_id)
        self._dirty = True

    def drop_dependents(self, task_id: str) -> None:
        self._check_open()
        if self._drop_edges(task_id):
            self._dirty = True

    def _drop_edges(self, task_id: str) -> bool:
        edges = self._dependents.pop(task_id, None)
        if not edges:
            return False
        self._edges -= len(edges)
        self._bytes -= sum(len(task_id) + len(d) for d in edges)
        return True

    def put_service_options(self, service: str, options: Mapping[str, Any]) -> None:
        self._check_open()
        stored = msgpack.unpackb(msgpack.packb(dict(options)))  # msgpack-able, a copy
        if stored:
            self._options[service] = stored
        else:
            self._options.pop(service, None)
        self._dirty = True

    def service_options(self) -> dict[str, dict[str, Any]]:
        self._check_open()
        return {name: dict(options) for name, options in self._options.items()}

    def next_seq(self) -> int:
        self._check_open()
        self._seq += 1
        return self._seq

    def commit(self) -> None:
        self._check_open()
        if self._dirty:
            self.stats.commits += 1
            self.stats.bytes_used = self.stats.bytes_live = self._bytes
            self._dirty = False

    def close(self) -> None:
        self._closed = True
        self._records.clear()
        self._where.clear()
        self._payloads.clear()
        self._results.clear()
        self._streams.clear()
        self._dependents.clear()

    # ------------------------------------------------------------------ reads

    def get(self, task_id: str) -> TaskRecord | None:
        self._check_open()
        packed = self._records.get(task_id)
        return None if packed is None else unpack_record(task_id, packed)

    def payload(self, task_id: str) -> list[bytes] | None:
        self._check_open()
        frames = self._payloads.get(task_id)
        return None if frames is None else list(frames)

    def result(self, task_id: str) -> list[bytes] | None:
        self._check_open()
        frames = self._results.get(task_id)
        return None if frames is None else list(frames)

    def chunks(
        self, task_id: str, offset: int, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        self._check_open()
        out: list[tuple[int, bytes]] = []
        stream = self._streams.get(task_id)
        if stream is None:
            return out
        size = 0
        while len(out) < limit:
            entry = stream.get(offset + len(out))
            if entry is None:
                break
            out.append(entry)
            size += len(entry[1])
            if size >= max_bytes:
                break
        return out

    def stream_size(self, task_id: str) -> tuple[int, int]:
        self._check_open()
        stream = self._streams.get(task_id)
        if not stream:
            return 0, 0
        return max(stream) + 1, sum(len(data) for _, data in stream.values())

    def ready(
        self, service: str, limit: int, after: tuple[int, int] | None = None
    ) -> list[TaskRecord]:
        self._check_open()
        index = self._ready.get(service)
        if index is None or limit <= 0:
            return []
        start = None
        if after is not None:
            if not PRIORITY_MIN <= after[0] <= PRIORITY_MAX:
                raise ValueError(f"priority out of range in after={after!r}")
            start = (-after[0], after[1] + 1)
        return self._records_of(index.iter_from(start), limit)

    def due(self, now: float, limit: int) -> list[TaskRecord]:
        self._check_open()
        return self._records_of(_until(self._delayed.iter_from(), now), limit)

    def next_due_at(self) -> float | None:
        self._check_open()
        first = self._delayed.first()
        return None if first is None else float(first[0])

    def lapsed(self, now: float, limit: int) -> list[TaskRecord]:
        self._check_open()
        return self._records_of(_until(self._lapse.iter_from(), now), limit)

    def inflight(self) -> list[TaskRecord]:
        self._check_open()
        return self._records_of(self._inflight.iter_from(), len(self._inflight))

    def dead(self, service: str, limit: int, after_seq: int | None = None) -> list[TaskRecord]:
        self._check_open()
        index = self._dead.get(service)
        if index is None or limit <= 0:
            return []
        start = None if after_seq is None else (after_seq + 1,)
        return self._records_of(index.iter_from(start), limit)

    def blocked(self, service: str, limit: int, after_seq: int | None = None) -> list[TaskRecord]:
        self._check_open()
        index = self._blocked.get(service)
        if index is None or limit <= 0:
            return []
        start = None if after_seq is None else (after_seq + 1,)
        return self._records_of(index.iter_from(start), limit)

    def dependents(self, task_id: str, limit: int) -> list[str]:
        self._check_open()
        edges = self._dependents.get(task_id)
        return [] if not edges or limit <= 0 else list(edges)[:limit]

    def dependent_count(self) -> int:
        self._check_open()
        return self._edges

    def find_key(self, service: str, key: str) -> str | None:
        self._check_open()
        return self._keys.get((service, key))

    def counts(self) -> dict[str, dict[TaskState, int]]:
        self._check_open()
        return {
            service: {_STATES[state]: n for state, n in by_state.items()}
            for service, by_state in self._counts.items()
        }

    # --------------------------------------------------------------- private

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError("the journal is closed")

    def _places(self, task_id: str, where: _Where) -> list[tuple[SortedKeys, IndexKey]]:
        """The index entries a record must hold, by its state (rule 2)."""
        service, state, _, priority, seq, not_before, expires_at, keep_until = where
        places: list[tuple[SortedKeys, IndexKey]] = []
        if state == _READY:
            index = self._ready.get(service)
            if index is None:
                index = self._ready[service] = SortedKeys()
            places.append((index, (-priority, seq, task_id)))
        elif state == _DELAYED:
            places.append((self._delayed, (not_before, seq, task_id)))
        elif state == _INFLIGHT:
            places.append((self._inflight, (seq, task_id)))
        elif state == _DEAD:
            index = self._dead.get(service)
            if index is None:
                index = self._dead[service] = SortedKeys()
            places.append((index, (seq, task_id)))
        elif state == _BLOCKED:
            index = self._blocked.get(service)
            if index is None:
                index = self._blocked[service] = SortedKeys()
            places.append((index, (seq, task_id)))
        if state in _WAITING:
            if expires_at is not None:
                places.append((self._lapse, (expires_at, seq, task_id)))
        elif state in _FINISHED and keep_until is not None:
            places.append((self._lapse, (keep_until, seq, task_id)))
        return places

    def _count(self, service: str, state: int, delta: int) -> None:
        by_state = self._counts.get(service)
        if by_state is None:
            by_state = self._counts[service] = {}
        n = by_state.get(state, 0) + delta
        if n:
            by_state[state] = n
        else:
            del by_state[state]
            if not by_state:
                del self._counts[service]

    def _records_of(self, keys: Iterator[IndexKey], limit: int) -> list[TaskRecord]:
        out: list[TaskRecord] = []
        if limit <= 0:
            return out
        records = self._records
        for key in keys:
            task_id = key[-1]
            out.append(unpack_record(task_id, records[task_id]))
            if len(out) >= limit:
                break
        return out

    # ------------------------------------------------- recurring tasks (schedules)

    def put_schedule(self, name: str, data: Mapping[str, Any]) -> None:
        self._check_open()
        check_schedule_name(name)
        packed = msgpack.packb(dict(data), use_bin_type=True)  # msgpack-able, a copy
        self._bytes += len(packed) - len(self._schedules.get(name, b""))
        self._schedules[name] = packed
        self._dirty = True

    def delete_schedule(self, name: str) -> None:
        self._check_open()
        packed = self._schedules.pop(name, None)
        if packed is not None:
            self._bytes -= len(packed)
            self._dirty = True

    def schedules(self) -> dict[str, dict[str, Any]]:
        self._check_open()
        return {name: msgpack.unpackb(packed) for name, packed in self._schedules.items()}


def _until(keys: Iterator[IndexKey], now: float) -> Iterator[IndexKey]:
    for key in keys:
        if key[0] > now:
            return
        yield key


def _size(frames: tuple[bytes, ...] | None) -> int:
    return 0 if frames is None else sum(map(len, frames))
