"""The durable journal: tasks, their frames and their indexes in one LMDB environment.

Owns the on-disk layout (see docs/architecture.md, "The journal"). Every write
between two commits goes into one LMDB write transaction, so a commit is atomic
and a crash leaves exactly the last commit. Never reads the clock, except to
time its own commits for `stats`.

Layout (named databases; "svc" is a 4-byte service number, "seq" 8 bytes big-endian,
"time" 8 bytes that sort like the float; index values are the task id):

  tasks     id -> msgpack record             payloads  id -> msgpack list of frames
  results   id -> msgpack list of frames     keys      svc + key -> id
  ready     svc + (127 - priority) + seq     delayed   time(not_before) + seq
  inflight  seq                              dead      svc + seq
  lapse     time(expires_at of READY/DELAYED/BLOCKED, or keep_until of finished) + seq
  chunks    len(id) (2 bytes) + id + offset (8 bytes) -> attempt (4 bytes) + data:
            a task's stream entries, together and in offset order under its prefix
  blocked   svc + seq
  dependents len(id) (2 bytes) + id + dependent's id -> b"": the tasks waiting for it
  schedules name -> msgpack map of a recurring task's rule and progress
  meta      schema_version, next_seq, service/<svc> -> name, count/<svc><state> -> n,
            life (8 bytes: opens so far), crashes (8 bytes: lives that ended without a
            clean close; absent while 0), clean (present from a clean close to the next
            open),
            options/<service name> -> msgpack map of the operator's options (paused, limit);
            a name over 400 bytes: options/0xFF + sha256(name) -> msgpack [name, map]

The indexes are DUPSORT, so two tasks with an equal key (a caller reusing a seq)
keep an entry each instead of overwriting one another.

Held records (the START of an attempt, `hold`) are not written: they live in an
overlay in memory, {id: the INFLIGHT record}, that every read consults. The store
below still holds the task as it was last put (READY), so a crash loses exactly
the overlay; its index entries, its counters and the record memos all describe
what is stored, and the reads hide the difference: `get` and `inflight` return
the held record, every scan of an index skips held ids, and `counts` moves each
held task from its stored state to INFLIGHT. A `put` or `delete` of a held task
ends its hold; `put_chunks` writes it first; a clean `close` writes them all.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from zbroker.journal._codec import (
    MAX_ID_BYTES,
    MAX_SEQ,
    Packer,
    check_record,
    check_stream_write,
    copy_frames,
    time_from_key,
    time_key,
    unpack_frames,
    unpack_record,
)
from zbroker.journal.base import (
    FINISHED_STATES,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SCHEMA_VERSION,
    Durability,
    Journal,
    JournalError,
    JournalFull,
    JournalStats,
    SchemaMismatch,
    TaskRecord,
    TaskState,
    check_schedule_name,
)

MiB = 1 << 20
TiB = 1 << 40

_META_SCHEMA = b"schema_version"
_META_SEQ = b"next_seq"
_META_LIFE = b"life"
_META_CRASHES = b"crashes"
_META_CLEAN = b"clean"
_SERVICE = b"service/"
_OPTIONS = b"options/"
_COUNT = b"count/"
_LOCK_FILE = "zbroker.lock"

# Grow the map after a commit once this share of it is used, so a write rarely
# meets MapFullError (which costs replaying the whole pass).
_GROW_AT = 0.75
# Past this share of max_map_size, usage is counted page by page (stats.bytes_live).
_COUNT_LIVE_AT = 0.5
# Idempotency keys longer than this are indexed by their SHA-256 (LMDB keys <= 511 bytes).
_MAX_KEY_BYTES = 400
# Marks a service options key made from the hash of a name longer than that.
_HASHED_NAME = b"\xff"

_READY = int(TaskState.READY)
_DELAYED = int(TaskState.DELAYED)
_INFLIGHT = int(TaskState.INFLIGHT)
_DEAD = int(TaskState.DEAD)
_BLOCKED = int(TaskState.BLOCKED)
_WAITING = (_READY, _DELAYED, _BLOCKED)  # their expires_at lapses
_FINISHED = frozenset(int(s) for s in FINISHED_STATES)
_PRIORITY_BYTE = {p: bytes([PRIORITY_MAX - p]) for p in range(PRIORITY_MIN, PRIORITY_MAX + 1)}

# A write as it is kept for replay after the map grew: (kind, task id, data...).
_Op = tuple[Any, ...]
_PUT, _RESULT, _DELETE, _SERVICE_OPTIONS, _CHUNKS, _EDGE, _DROP_EDGES = 1, 2, 3, 4, 5, 6, 7
_SCHEDULE = 8  # (kind, name, packed map or None to delete)

Db = Any  # lmdb's database handle type is private (lmdb._Database)


def _seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def _stream_prefix(idb: bytes) -> bytes:
    """What every key of a task's stream entries starts with: no id's prefix is
    another's, as the length comes first."""
    return len(idb).to_bytes(2, "big") + idb


def _options_key(name: bytes) -> tuple[bytes, bool]:
    """The meta key of a service's options, and whether it is a long name's hash.

    A name too long for an LMDB key is indexed by its SHA-256 behind a 0xFF byte
    (never the first byte of a UTF-8 name), and the value then holds the name.
    """
    if len(name) > _MAX_KEY_BYTES:
        return _OPTIONS + _HASHED_NAME + hashlib.sha256(name).digest(), True
    return _OPTIONS + name, False


def _key_bytes(key: str) -> bytes:
    raw = key.encode()
    if len(raw) > _MAX_KEY_BYTES:
        return b"\x01" + hashlib.sha256(raw).digest()
    return b"\x00" + raw


def _failed(message: str, cause: BaseException) -> JournalError:
    """A JournalError caused by `cause`. (Set by hand: mypyc's compiled `raise ...
    from exc` drops the cause, and the cause is what an operator reads first.)"""
    error = JournalError(message)
    error.__cause__ = cause
    return error


class LmdbJournal(Journal):
    """Tasks in LMDB at `path` (a directory, created if missing).

    SYNC fsyncs at every commit; ASYNC does not (it survives a crash of the process,
    not of the machine). The map starts at `map_size` and doubles when full, up to
    `max_map_size`; past that a write raises JournalFull. A write transaction belongs
    to the thread that made the first write after a commit: use the journal from one
    thread. Only one LmdbJournal may have a store open at a time (a file lock).

    If a write or a commit raises JournalError (JournalFull included), every write
    since the last commit is discarded: the journal reads as of the last commit.
    """

    def __init__(
        self,
        path: Path,
        durability: Durability = Durability.SYNC,
        *,
        map_size: int = 256 * MiB,
        max_map_size: int = 1 * TiB,
    ) -> None:
        self.kind = "lmdb"
        if durability is Durability.MEMORY:
            raise ValueError("LmdbJournal stores to disk: use MemoryJournal for Durability.MEMORY")
        if not 0 < map_size <= max_map_size:
            raise ValueError(f"need 0 < map_size <= max_map_size, got {map_size}, {max_map_size}")
        self.durability = durability
        self.stats = JournalStats()
        self.path = Path(path)
        self.max_map_size = max_map_size
        self._packer = Packer()
        self._wtxn: lmdb.Transaction[bytes] | None = None
        self._ops: list[_Op] = []
        self._services: dict[str, bytes] = {}  # name -> svc
        self._service_names: dict[bytes, str] = {}  # svc -> name
        self._new_services: list[str] = []  # created in the open write transaction
        self._next_service = 1
        self._counts: Counter[tuple[bytes, int]] = Counter()  # as of the last commit
        self._deltas: Counter[tuple[bytes, int]] = Counter()  # since the last commit
        self._next_seq = 1
        self._stored_seq = 1
        self._last_put: str | None = None  # the id of the last record put in this pass
        # Held records (rule 7 of base.py): id -> (the packed INFLIGHT record, its
        # service's number, its stored state); and how to undo this pass's changes
        # to it if the pass is discarded: (id, the entry before, or None).
        self._held: dict[bytes, tuple[bytes, bytes, int]] = {}
        self._held_undo: list[tuple[bytes, tuple[bytes, bytes, int] | None]] = []
        self._closing = False  # close() commits the clean-stop marker with the held records

        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JournalError(
                f"the journal at {self.path} is in use (open in this or another process)"
            ) from None
        data_file = self.path / "data.mdb"
        if data_file.exists() and data_file.stat().st_size == 0:
            os.close(self._lock_fd)
            raise JournalError(
                f"the journal at {self.path} is damaged: data.mdb is empty. Starting on it "
                "would lose every task silently; if this directory never held tasks, remove "
                "data.mdb and start again"
            )
        sync = durability is Durability.SYNC
        # SYNC: one flush per commit. LMDB flushes a commit's pages, then writes its
        # meta page without flushing it (MDB_NOMETASYNC); the next commit's flush
        # carries that page, or settle() does. A power cut can take back only the
        # last commit, whose confirms the runtime has not sent yet (durable_commits),
        # and never corrupts the store: the meta page is still written after the
        # pages it points to are on the disk. docs/performance.md, "Why zbroker
        # `sync` flushes once per commit under load".
        self._deferred = 0  # commits whose meta page is not flushed yet (0 or 1)
        try:
            self._env: lmdb.Environment | None = lmdb.open(
                str(self.path),
                map_size=map_size,
                max_dbs=16,
                sync=sync,
                metasync=False,
            )
        except lmdb.Error as exc:
            os.close(self._lock_fd)
            raise _failed(f"cannot open the journal at {self.path}: {exc}", exc)
        try:
            self._page_size = int(self._env.stat()["psize"])
            self._open_store()
        except BaseException:
            self._env.close()
            self._env = None
            os.close(self._lock_fd)
            raise

    # ----------------------------------------------------------------- writes

    def put(self, record: TaskRecord, payload: Sequence[bytes] | None = None) -> None:
        self._check_open()
        check_record(record)  # fail here, not halfway through the write
        if record.key is not None:
            holder = self.find_key(record.service, record.key)
            if holder is not None and holder != record.id:
                raise ValueError(
                    f"idempotency key {record.key!r} of service {record.service!r} "
                    f"is held by task {holder!r}"
                )
        packed = self._packer.record(record)
        frames = None if payload is None else self._packer.frames(payload)
        self._write((_PUT, record.id, packed, frames), record)
        self.stats.record_writes += 1
        if self._held:
            self._unhold(record.id.encode())

    def hold(self, record: TaskRecord) -> None:
        """Held in the overlay, nothing written. A record this store put or read last
        (its memo) is taken as stored without a read: the KeyError for an unknown
        task comes only for a record without such a memo."""
        self._check_open()
        if record.state is not TaskState.INFLIGHT:
            raise ValueError(f"only an INFLIGHT record is held, not {record.state!r}")
        idb = record.id.encode()
        held = self._held
        before = held.get(idb)
        memo = record.store_memo
        if before is not None:
            svc, state = before[1], before[2]
        elif memo is not None and memo[0] is self:
            # What this object last wrote to or read from this store: the stored
            # state, known without a read (a hold reads nothing, as it writes nothing).
            svc, state = memo[2], memo[3]
        else:
            stored = self._get_raw(record.id)
            if stored is None:
                raise KeyError(f"no task {record.id!r} to hold")
            old = unpack_record(record.id, stored)
            svc, state = self._services[old.service], int(old.state)
        # Packed now (it is checked when it is written, if ever): a snapshot, so
        # what the caller changes afterwards is never written by `close`.
        held[idb] = (self._packer.record(record), svc, state)
        self._held_undo.append((idb, before))

    def _unhold(self, idb: bytes) -> None:
        """The held record of `idb`, if any, is held no more (a write replaced it)."""
        before = self._held.pop(idb, None)
        if before is not None:
            self._held_undo.append((idb, before))

    def put_result(self, task_id: str, frames: Sequence[bytes]) -> None:
        self._check_open()
        packed = self._packer.frames(frames)
        # The common case, a result stored right after its record: no lookup needed.
        if task_id != self._last_put and self._get_raw(task_id) is None:
            raise KeyError(f"no task {task_id!r} to store a result for")
        self._write((_RESULT, task_id, packed))

    def put_chunks(self, task_id: str, offset: int, attempt: int, chunks: Sequence[bytes]) -> None:
        self._check_open()
        check_stream_write(offset, attempt, chunks)  # fail here, not halfway through the write
        if task_id != self._last_put and self._get_raw(task_id) is None:
            raise KeyError(f"no task {task_id!r} to store stream chunks for")
        if not chunks:
            return
        if self._held and (held := self._held.get(task_id.encode())) is not None:
            # Never chunks of an attempt without its INFLIGHT record: after a crash,
            # recovery counts the stream and charges nothing, as before holds.
            self._write((_PUT, task_id, held[0], None))
            self.stats.record_writes += 1
            self._unhold(task_id.encode())
        prefix = _stream_prefix(task_id.encode())
        tag = attempt.to_bytes(4, "big")
        entries = tuple(
            (prefix + (offset + n).to_bytes(8, "big"), tag + chunk)
            for n, chunk in enumerate(copy_frames(chunks))  # bytes-like chunks as bytes
        )
        self._write((_CHUNKS, task_id, entries))

    def delete(self, task_id: str) -> None:
        self._check_open()
        if self._get_raw(task_id) is not None:
            self._write((_DELETE, task_id))
            self.stats.record_writes += 1
            if self._held:
                self._unhold(task_id.encode())

    def add_dependent(self, task_id: str, dependent_id: str) -> None:
        self._check_open()
        if type(dependent_id) is not str or _id_bytes(dependent_id) is None:
            raise ValueError(f"dependent id must be a task id, got {dependent_id!r}")
        if task_id != self._last_put and self._get_raw(task_id) is None:
            raise KeyError(f"no task {task_id!r} to store a dependent of")
        self._write((_EDGE, task_id, _stream_prefix(task_id.encode()) + dependent_id.encode()))

    def drop_dependents(self, task_id: str) -> None:
        self._check_open()
        if _id_bytes(task_id) is not None:
            self._write((_DROP_EDGES, task_id))

    def put_service_options(self, service: str, options: Mapping[str, Any]) -> None:
        self._check_open()
        packed = msgpack.packb(dict(options)) if options else None
        self._write((_SERVICE_OPTIONS, service, packed))

    def service_options(self) -> dict[str, dict[str, Any]]:
        self._check_open()
        out: dict[str, dict[str, Any]] = {}
        with self._reading() as txn:
            cursor = txn.cursor(db=self._meta)
            if cursor.set_range(_OPTIONS):
                for key, value in cursor.iternext():
                    if not key.startswith(_OPTIONS):
                        break
                    if key[len(_OPTIONS) :].startswith(_HASHED_NAME):
                        name, packed = msgpack.unpackb(value)
                        out[name] = msgpack.unpackb(packed)
                    else:
                        out[key[len(_OPTIONS) :].decode()] = msgpack.unpackb(value)
        return out

    def next_seq(self) -> int:
        self._check_open()
        seq = self._next_seq
        if seq > MAX_SEQ:
            raise JournalError("sequence numbers exhausted")
        self._next_seq = seq + 1
        return seq

    def commit(self) -> None:
        env = self._check_open()
        if self._wtxn is None and self._next_seq == self._stored_seq and not self._closing:
            self._held_undo.clear()  # the pass stands: so do its holds
            return
        started = time.perf_counter()
        while True:
            try:
                txn = self._wtxn or self._begin_write()
                self._write_meta(txn)
                txn.commit()
            except lmdb.MapFullError:
                self._grow_and_replay(self._ops)
                continue
            except BaseException as exc:
                self._discard()
                if isinstance(exc, lmdb.Error):
                    raise _failed(f"commit to {self.path} failed: {exc}", exc)
                raise
            self._wtxn = None
            break
        self._counts.update(self._deltas)
        self._counts = +self._counts  # drop zeros
        self._deltas.clear()
        self._held_undo.clear()  # the pass stands: so do its holds
        self._new_services.clear()
        self._ops.clear()
        self._stored_seq = self._next_seq
        elapsed = time.perf_counter() - started
        stats = self.stats
        stats.commits += 1
        if self.durability is Durability.SYNC:
            stats.flushes += 1
            self._deferred = 1  # this flush carried the last commit's meta page, not its own
        stats.commit_seconds_total += elapsed
        stats.last_commit_seconds = elapsed
        self._update_usage(env, grow=True)

    def durable_commits(self) -> int:
        return self.stats.commits - self._deferred

    def settle(self) -> None:
        if not self._deferred:
            return
        env = self._check_open()
        started = time.perf_counter()
        try:
            env.sync(True)
        except lmdb.Error as exc:
            raise _failed(f"flush of {self.path} failed: {exc}", exc)
        self._deferred = 0
        self.stats.flushes += 1
        self.stats.commit_seconds_total += time.perf_counter() - started

    def close(self) -> None:
        env = self._env
        if env is None:
            return
        try:
            self._discard()
            # What is held is written as it reads (INFLIGHT: the next start requeues
            # it, not charged), with the marker of a clean stop, in one commit.
            for idb, (packed, _, _) in list(self._held.items()):
                self._write((_PUT, idb.decode(), packed, None))
                self.stats.record_writes += 1
            self._held.clear()
            self._closing = True
            self.commit()  # also the sequence: numbers handed out stay used
            # A clean stop should not depend on the OS flushing later (async), nor
            # leave the last meta page unflushed (sync).
            env.sync(True)
            self._deferred = 0
        except lmdb.Error as exc:
            raise _failed(f"closing the journal at {self.path} failed: {exc}", exc)
        finally:
            self._env = None
            env.close()
            os.close(self._lock_fd)

    # ------------------------------------------------------------------ reads

    def get(self, task_id: str) -> TaskRecord | None:
        if self._held:
            held = self._held.get(task_id.encode())
            if held is not None:
                self._check_open()
                return unpack_record(task_id, held[0])
        data = self._get_raw(task_id)
        return None if data is None else self._unpack(task_id, data)

    def payload(self, task_id: str) -> list[bytes] | None:
        idb = _id_bytes(task_id)
        if idb is None:
            return None
        data = self._get(idb, self._payloads)
        if data is None:
            return [] if self._get(idb, self._tasks) is not None else None
        return unpack_frames(data)

    def result(self, task_id: str) -> list[bytes] | None:
        idb = _id_bytes(task_id)
        if idb is None:
            return None
        with self._reading() as txn:
            data = txn.get(idb, db=self._results)
        return None if data is None else unpack_frames(data)

    def chunks(
        self, task_id: str, offset: int, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        self._check_open()
        out: list[tuple[int, bytes]] = []
        idb = _id_bytes(task_id)
        if idb is None or limit <= 0 or not 0 <= offset <= MAX_SEQ:
            return out
        prefix = _stream_prefix(idb)
        size = 0
        with self._reading() as txn:
            cursor = txn.cursor(db=self._chunks)
            if not cursor.set_key(prefix + offset.to_bytes(8, "big")):
                return out
            while True:
                value = cursor.value()
                out.append((int.from_bytes(value[:4], "big"), value[4:]))
                size += len(value) - 4
                offset += 1
                if len(out) >= limit or size >= max_bytes or not cursor.next():
                    break
                if cursor.key() != prefix + offset.to_bytes(8, "big"):
                    break  # a gap, or the next task's stream
        return out

    def stream_size(self, task_id: str) -> tuple[int, int]:
        self._check_open()
        idb = _id_bytes(task_id)
        if idb is None:
            return 0, 0
        prefix = _stream_prefix(idb)
        entries = size = 0
        with self._reading() as txn:
            cursor = txn.cursor(db=self._chunks)
            if cursor.set_range(prefix):
                for key, value in cursor.iternext():
                    if not key.startswith(prefix):
                        break
                    entries = int.from_bytes(key[-8:], "big") + 1
                    size += len(value) - 4
        return entries, size

    def ready(
        self, service: str, limit: int, after: tuple[int, int] | None = None
    ) -> list[TaskRecord]:
        self._check_open()
        svc = self._services.get(service)
        if svc is None or limit <= 0:
            return []
        start = svc
        if after is not None:
            priority, seq = after
            if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
                raise ValueError(f"priority out of range in after={after!r}")
            start = svc + _PRIORITY_BYTE[priority] + _seq_after(seq)
        return self._scan(self._ready, start, svc, limit)

    def due(self, now: float, limit: int) -> list[TaskRecord]:
        return self._scan_until(self._delayed, time_key(now), limit)

    def next_due_at(self) -> float | None:
        self._check_open()
        with self._reading() as txn:
            cursor = txn.cursor(db=self._delayed)
            if not cursor.first():
                return None
            return time_from_key(cursor.key())

    def lapsed(self, now: float, limit: int) -> list[TaskRecord]:
        return self._scan_until(self._lapse, time_key(now), limit)

    def inflight(self) -> list[TaskRecord]:
        self._check_open()
        found = self._scan(self._inflight, b"", b"", -1)
        if self._held:
            found += [unpack_record(idb.decode(), h[0]) for idb, h in self._held.items()]
            found.sort(key=_by_seq)
        return found

    def dead(self, service: str, limit: int, after_seq: int | None = None) -> list[TaskRecord]:
        self._check_open()
        svc = self._services.get(service)
        if svc is None or limit <= 0:
            return []
        start = svc
        if after_seq is not None:
            start = svc + _seq_after(after_seq)
        return self._scan(self._dead, start, svc, limit)

    def blocked(self, service: str, limit: int, after_seq: int | None = None) -> list[TaskRecord]:
        self._check_open()
        svc = self._services.get(service)
        if svc is None or limit <= 0:
            return []
        start = svc
        if after_seq is not None:
            start = svc + _seq_after(after_seq)
        return self._scan(self._blocked, start, svc, limit)

    def dependents(self, task_id: str, limit: int) -> list[str]:
        self._check_open()
        idb = _id_bytes(task_id)
        out: list[str] = []
        if idb is None or limit <= 0:
            return out
        prefix = _stream_prefix(idb)
        with self._reading() as txn:
            cursor = txn.cursor(db=self._dependents)
            if not cursor.set_range(prefix):
                return out
            for key in cursor.iternext(values=False):
                if not key.startswith(prefix):
                    break
                out.append(key[len(prefix) :].decode())
                if len(out) == limit:
                    break
        return out

    def dependent_count(self) -> int:
        with self._reading() as txn:
            return int(txn.stat(self._dependents)["entries"])

    def find_key(self, service: str, key: str) -> str | None:
        self._check_open()
        svc = self._services.get(service)
        if svc is None:
            return None
        idb = self._get(svc + _key_bytes(key), self._keys)
        return None if idb is None else idb.decode()

    def counts(self) -> dict[str, dict[TaskState, int]]:
        self._check_open()
        live = self._counts + self._deltas if self._deltas else self._counts
        if self._held:
            live = live.copy()
            for _, svc, state in self._held.values():
                live[(svc, state)] -= 1
                live[(svc, _INFLIGHT)] += 1
        out: dict[str, dict[TaskState, int]] = {}
        for (svc, state), n in live.items():
            if n > 0:
                out.setdefault(self._service_names[svc], {})[TaskState(state)] = n
        return out

    # ----------------------------------------------------------- maintenance

    def verify(self) -> list[str]:
        """Check every index and counter against the records (a full scan: tests and
        operators, never the broker's loop). Returns the problems found; [] if none."""
        self._check_open()
        problems: list[str] = []
        index_dbs = {
            "ready": self._ready,
            "delayed": self._delayed,
            "lapse": self._lapse,
            "inflight": self._inflight,
            "dead": self._dead,
            "blocked": self._blocked,
            "keys": self._keys,
        }
        name_of = {id(db): name for name, db in index_dbs.items()}
        expected: dict[str, set[tuple[bytes, bytes]]] = {name: set() for name in index_dbs}
        counted: Counter[tuple[bytes, int]] = Counter()
        max_seq = 0
        with self._reading() as txn:
            task_ids: set[bytes] = set()
            for idb, data in txn.cursor(db=self._tasks):
                record = unpack_record(idb.decode(), data)
                task_ids.add(idb)
                max_seq = max(max_seq, record.seq)
                svc = self._services.get(record.service)
                if svc is None:
                    problems.append(f"task {record.id}: service {record.service!r} has no number")
                    continue
                counted[(svc, int(record.state))] += 1
                for db, key in self._entries(record, svc):
                    expected[name_of[id(db)]].add((key, idb))
            for name, db in index_dbs.items():
                found = set(txn.cursor(db=db).iternext())
                for key, idb in sorted(expected[name] - found):
                    problems.append(f"{name}: missing entry {key.hex()} -> {idb.decode()}")
                for key, idb in sorted(found - expected[name]):
                    problems.append(f"{name}: stray entry {key.hex()} -> {idb.decode()}")
            problems += self._orphans(txn, task_ids)
            if self._wtxn is None:
                stored = self._stored_counts(txn)
                if stored != +self._counts:
                    problems.append(f"stored counters {stored} differ from memory {self._counts}")
        live = +(self._counts + self._deltas)
        if live != counted:
            problems.append(f"counters {dict(live)} differ from the records {dict(counted)}")
        if task_ids and max_seq >= self._next_seq:
            problems.append(f"next_seq {self._next_seq} is not above the highest seq {max_seq}")
        return problems

    def _orphans(self, txn: lmdb.Transaction[bytes], task_ids: set[bytes]) -> list[str]:
        """Frames and stream entries kept for tasks that have no record, and stream
        entries whose key or value is not of the layout."""
        problems = []
        for name, db in (("payloads", self._payloads), ("results", self._results)):
            for idb in txn.cursor(db=db).iternext(values=False):
                if idb not in task_ids:
                    problems.append(f"{name}: frames of unknown task {idb.decode()}")
        for key, value in txn.cursor(db=self._chunks):
            n = int.from_bytes(key[:2], "big")
            idb, offset = key[2 : 2 + n], int.from_bytes(key[2 + n :], "big")
            if len(key) != 2 + n + 8 or len(value) < 4:
                problems.append(f"chunks: malformed entry {key.hex()}")
            elif idb not in task_ids:
                problems.append(f"chunks: entry {offset} of unknown task {idb.decode()}")
        for key in txn.cursor(db=self._dependents).iternext(values=False):
            n = int.from_bytes(key[:2], "big")
            if key[2 : 2 + n] not in task_ids:
                problems.append(f"dependents: edge of unknown task {key[2 : 2 + n].decode()}")
        return problems

    # --------------------------------------------------------- private: open

    def _open_store(self) -> None:
        env = self._check_open()
        # A data.mdb shorter than its last page (truncated by a full disk or a bad copy)
        # would crash the process with SIGBUS on the first read past its end.
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = (self.path / "data.mdb").stat().st_size
        if size < needed:
            raise JournalError(
                f"the journal at {self.path} is damaged: data.mdb is {size} bytes, but its "
                f"pages reach {needed} bytes (truncated?); restore it from a copy"
            )
        while True:
            try:
                is_empty = env.stat()["entries"] == 0
                with env.begin(write=True) as txn:
                    self._meta = env.open_db(b"meta", txn=txn)
                    raw = txn.get(_META_SCHEMA, db=self._meta)
                    if raw is None and not is_empty:
                        raise SchemaMismatch(
                            f"{self.path} holds an LMDB store without a schema version: "
                            "not a zbroker journal"
                        )
                    if raw is None:
                        txn.put(_META_SCHEMA, msgpack.packb(SCHEMA_VERSION), db=self._meta)
                    else:
                        try:
                            version = msgpack.unpackb(raw)
                        except Exception:  # msgpack raises several types on garbage
                            version = f"unreadable ({raw[:16]!r})"
                        if version != SCHEMA_VERSION:
                            raise SchemaMismatch(
                                f"the journal at {self.path} has schema version {version}; "
                                f"this zbroker reads schema version {SCHEMA_VERSION}"
                            )
                    self._tasks = env.open_db(b"tasks", txn=txn)
                    self._payloads = env.open_db(b"payloads", txn=txn)
                    self._results = env.open_db(b"results", txn=txn)
                    self._keys = env.open_db(b"keys", txn=txn)
                    self._ready = env.open_db(b"ready", txn=txn, dupsort=True)
                    self._delayed = env.open_db(b"delayed", txn=txn, dupsort=True)
                    self._lapse = env.open_db(b"lapse", txn=txn, dupsort=True)
                    self._inflight = env.open_db(b"inflight", txn=txn, dupsort=True)
                    self._dead = env.open_db(b"dead", txn=txn, dupsort=True)
                    # Created here in a store written before streams existed.
                    self._chunks = env.open_db(b"chunks", txn=txn)
                    # Created here in a store written before dependencies existed.
                    self._blocked = env.open_db(b"blocked", txn=txn, dupsort=True)
                    self._dependents = env.open_db(b"dependents", txn=txn)
                    # Recurring tasks; created here in a store written before them.
                    self._schedules = env.open_db(b"schedules", txn=txn)
                    life = self._begin_life(txn)
                break
            except lmdb.MapFullError:
                self._grow_map()
            except lmdb.Error as exc:
                raise _failed(f"cannot open the journal at {self.path}: {exc}", exc)
        self.life, self.crashed, self.crashes = life
        try:
            with env.begin() as txn:
                raw = txn.get(_META_SEQ, db=self._meta)
                self._next_seq = self._stored_seq = 1 if raw is None else int.from_bytes(raw)
                cursor = txn.cursor(db=self._meta)
                if cursor.set_range(_SERVICE):
                    for key, name in cursor.iternext():
                        if not key.startswith(_SERVICE):
                            break
                        svc = key[len(_SERVICE) :]
                        self._services[name.decode()] = svc
                        self._service_names[svc] = name.decode()
                        self._next_service = max(self._next_service, int.from_bytes(svc) + 1)
                self._counts = self._stored_counts(txn)
            self._update_usage(env, grow=True)
        except lmdb.Error as exc:
            raise _failed(f"cannot read the journal at {self.path}: {exc}", exc)

    def _begin_life(self, txn: lmdb.Transaction[bytes]) -> tuple[int, bool, int]:
        """Count this open as a new life (rule 8 of base.py): (life, crashed, crashes).
        A life ended cleanly when `close` left the clean marker; a store written before
        lives were counted has neither marker nor life, and counts as clean."""
        meta = self._meta
        raw = txn.get(_META_LIFE, db=meta)
        life = 1 if raw is None else int.from_bytes(raw, "big") + 1
        raw = txn.get(_META_CRASHES, db=meta)
        crashes = 0 if raw is None else int.from_bytes(raw, "big")
        crashed = life > 1 and txn.get(_META_CLEAN, db=meta) is None
        if crashed:
            crashes += 1
            txn.put(_META_CRASHES, crashes.to_bytes(8, "big"), db=meta)
        txn.put(_META_LIFE, life.to_bytes(8, "big"), db=meta)
        txn.delete(_META_CLEAN, db=meta)
        return life, crashed, crashes

    def _stored_counts(self, txn: lmdb.Transaction[bytes]) -> Counter[tuple[bytes, int]]:
        counts: Counter[tuple[bytes, int]] = Counter()
        cursor = txn.cursor(db=self._meta)
        if cursor.set_range(_COUNT):
            for key, value in cursor.iternext():
                if not key.startswith(_COUNT):
                    break
                counts[(key[len(_COUNT) : -1], key[-1])] = int.from_bytes(value)
        return counts

    # ------------------------------------------------------- private: writes

    def _write(self, op: _Op, record: TaskRecord | None = None) -> None:
        """Apply `op` in the open write transaction (opening one if needed); grow
        the map and replay the pass if it is full. On any other failure, discard
        the pass: never leave half an operation in the transaction."""
        txn = self._wtxn
        try:
            if txn is None:
                txn = self._begin_write()
            self._apply(txn, op, record)
        except lmdb.MapFullError:
            self._grow_and_replay([*self._ops, op])
            return
        except BaseException as exc:
            self._discard()
            if isinstance(exc, lmdb.Error):
                raise _failed(f"write to the journal at {self.path} failed: {exc}", exc)
            raise
        self._ops.append(op)

    def _apply(
        self, txn: lmdb.Transaction[bytes], op: _Op, record: TaskRecord | None = None
    ) -> None:
        kind, task_id = op[0], op[1]
        idb = task_id.encode()
        if kind == _SCHEDULE:
            self._apply_schedule(txn, idb, op[2])
            return
        if kind == _SERVICE_OPTIONS:
            self._apply_options(txn, task_id, idb, op[2])
        elif kind == _PUT:
            self._apply_put(txn, task_id, idb, op[2], op[3], record)
        elif kind == _RESULT:
            txn.put(idb, op[2], db=self._results)
        elif kind == _CHUNKS:
            txn.cursor(db=self._chunks).putmulti(op[2])  # (key, value) pairs, replacing
        elif kind == _EDGE:
            txn.put(op[2], b"", db=self._dependents)
        elif kind == _DROP_EDGES:
            self._delete_prefix(txn, self._dependents, _stream_prefix(idb))
        else:
            self._apply_delete(txn, task_id, idb)

    def _apply_put(
        self,
        txn: lmdb.Transaction[bytes],
        task_id: str,
        idb: bytes,
        packed: bytes,
        frames: bytes | None,
        record: TaskRecord | None,
    ) -> None:
        """Write a record (and a new payload, unless None) and move its index entries."""
        if record is None:
            record = unpack_record(task_id, packed)
        svc = self._service_number(txn, record.service)
        state = int(record.state)
        entries = self._entries(record, svc)
        old = txn.replace(idb, packed, db=self._tasks)
        if old is None:
            for db, key in entries:
                txn.put(key, idb, db=db)
        else:
            memo = record.store_memo
            if memo is not None and memo[0] is self and memo[1] == old:
                # What this object last wrote to or read from this store is what
                # it holds: the old index entries are known without decoding.
                _, _, old_svc, old_state, old_entries = memo
            else:
                old_record = unpack_record(task_id, old)
                old_svc = self._services[old_record.service]
                old_state = int(old_record.state)
                old_entries = self._entries(old_record, old_svc)
            for db, key in old_entries:
                if (db, key) not in entries:
                    txn.delete(key, idb, db=db)
            for db, key in entries:
                if (db, key) not in old_entries:
                    txn.put(key, idb, db=db)
            self._deltas[(old_svc, old_state)] -= 1
        self._deltas[(svc, state)] += 1
        if frames is not None:
            txn.put(idb, frames, db=self._payloads)
        record.store_memo = (self, packed, svc, state, entries)
        self._last_put = task_id

    def _apply_options(
        self, txn: lmdb.Transaction[bytes], name: str, idb: bytes, packed: bytes | None
    ) -> None:
        """Write (or, with None, remove) a service's operator options."""
        key, long_name = _options_key(idb)  # the service's name
        if packed is None:
            txn.delete(key, db=self._meta)
        elif long_name:
            txn.put(key, msgpack.packb([name, packed]), db=self._meta)
        else:
            txn.put(key, packed, db=self._meta)

    def _apply_delete(self, txn: lmdb.Transaction[bytes], task_id: str, idb: bytes) -> None:
        """Remove a task with its index entries, payload, result and stream."""
        self._last_put = None
        old = txn.pop(idb, db=self._tasks)
        if old is None:
            return
        old_record = unpack_record(task_id, old)
        old_svc = self._services[old_record.service]
        for db, key in self._entries(old_record, old_svc):
            txn.delete(key, idb, db=db)
        txn.delete(idb, db=self._payloads)
        txn.delete(idb, db=self._results)
        prefix = _stream_prefix(idb)
        self._delete_prefix(txn, self._chunks, prefix)
        self._delete_prefix(txn, self._dependents, prefix)
        self._deltas[(old_svc, int(old_record.state))] -= 1

    @staticmethod
    def _delete_prefix(txn: lmdb.Transaction[bytes], db: Db, prefix: bytes) -> None:
        """Delete every entry of `db` whose key starts with `prefix`."""
        cursor = txn.cursor(db=db)
        if cursor.set_range(prefix):
            while cursor.key().startswith(prefix) and cursor.delete():
                pass  # delete() moves on to the next entry

    def _entries(self, record: TaskRecord, svc: bytes) -> list[tuple[Db, bytes]]:
        """The index entries (database, key) that `record` holds; each maps to its id."""
        state = int(record.state)
        seq = _seq_bytes(record.seq)
        entries: list[tuple[Db, bytes]] = []
        if state == _READY:
            entries.append((self._ready, svc + _PRIORITY_BYTE[record.priority] + seq))
        elif state == _DELAYED:
            entries.append((self._delayed, time_key(record.not_before) + seq))
        elif state == _INFLIGHT:
            entries.append((self._inflight, seq))
        elif state == _DEAD:
            entries.append((self._dead, svc + seq))
        elif state == _BLOCKED:
            entries.append((self._blocked, svc + seq))
        if state in _WAITING:
            if record.expires_at is not None:
                entries.append((self._lapse, time_key(record.expires_at) + seq))
        elif state in _FINISHED and record.keep_until is not None:
            entries.append((self._lapse, time_key(record.keep_until) + seq))
        if record.key is not None:
            entries.append((self._keys, svc + _key_bytes(record.key)))
        return entries

    def _service_number(self, txn: lmdb.Transaction[bytes], name: str) -> bytes:
        svc = self._services.get(name)
        if svc is None:
            svc = self._next_service.to_bytes(4, "big")
            txn.put(_SERVICE + svc, name.encode(), db=self._meta)
            self._next_service += 1
            self._services[name] = svc
            self._service_names[svc] = name
            self._new_services.append(name)
        return svc

    def _write_meta(self, txn: lmdb.Transaction[bytes]) -> None:
        """Counters and the sequence, in the transaction they describe."""
        meta = self._meta
        for (svc, state), delta in self._deltas.items():
            if delta:
                key = _COUNT + svc + bytes([state])
                n = self._counts[(svc, state)] + delta
                if n:
                    txn.put(key, n.to_bytes(8, "big"), db=meta)
                else:
                    txn.delete(key, db=meta)
        if self._next_seq != self._stored_seq:
            txn.put(_META_SEQ, _seq_bytes(self._next_seq), db=meta)
        if self._closing:
            txn.put(_META_CLEAN, b"\x01", db=meta)

    def _begin_write(self) -> lmdb.Transaction[bytes]:
        txn = self._check_open().begin(write=True)
        self._wtxn = txn
        return txn

    def _rollback(self) -> None:
        """Abort the write transaction and forget what it did to the in-memory state.
        The replay list is the caller's business."""
        txn, self._wtxn = self._wtxn, None
        self._last_put = None
        if txn is not None:
            with suppress(lmdb.Error):  # already freed by a failed commit
                txn.abort()
        for name in self._new_services:
            del self._service_names[self._services.pop(name)]
        self._next_service -= len(self._new_services)
        self._new_services.clear()
        self._deltas.clear()

    def _discard(self) -> None:
        """Back to the last commit: the pass is lost (the caller sees an error), its
        holds and the ends of holds included."""
        self._rollback()
        self._ops.clear()
        held, undo = self._held, self._held_undo
        while undo:
            idb, before = undo.pop()
            if before is None:
                held.pop(idb, None)
            else:
                held[idb] = before

    def _grow_and_replay(self, ops: list[_Op]) -> None:
        """The map is full: grow it and redo `ops` in a new transaction, until they fit."""
        while True:
            self._rollback()
            try:
                self._grow_map()
            except JournalFull:
                self._discard()
                raise
            try:
                txn = self._begin_write()
                for op in ops:
                    self._apply(txn, op)
            except lmdb.MapFullError:
                continue
            except BaseException as exc:
                self._discard()
                if isinstance(exc, lmdb.Error):
                    raise _failed(f"replay into {self.path} failed: {exc}", exc)
                raise
            self._ops = ops
            return

    def _grow_map(self) -> None:
        env = self._check_open()
        size = env.info()["map_size"]
        if size >= self.max_map_size:
            raise JournalFull(
                f"the journal at {self.path} is full: its map is {size} bytes and "
                f"max_map_size is {self.max_map_size}; the writes since the last commit "
                "were discarded"
            )
        try:
            env.set_mapsize(min(2 * size, self.max_map_size))
        except lmdb.Error as exc:
            raise _failed(f"cannot grow the journal at {self.path}: {exc}", exc)
        self.stats.map_size = env.info()["map_size"]

    def _update_usage(self, env: lmdb.Environment, *, grow: bool) -> None:
        info = env.info()
        self.stats.bytes_used = (info["last_pgno"] + 1) * self._page_size
        self.stats.map_size = info["map_size"]
        # The most it may hold: its own limit, or what the device has room for, if
        # less (a full disk is then an enqueue refused, not a failed commit).
        self.stats.bytes_max = min(self.max_map_size, self.stats.bytes_used + self._device_free())
        # The high-water mark never falls, though deleted records free their pages
        # for reuse; near the limit, count the pages that hold data (a few stats).
        if self.stats.bytes_used > _COUNT_LIVE_AT * self.stats.bytes_max:
            self.stats.bytes_live = self._live_bytes(env)
        else:
            self.stats.bytes_live = self.stats.bytes_used
        if grow and self.stats.bytes_used > _GROW_AT * info["map_size"]:
            with suppress(JournalFull):  # the next write that does not fit will say so
                self._grow_map()

    def _device_free(self) -> int:
        """Bytes the journal's device can still give it (free to unprivileged users)."""
        try:
            st = os.statvfs(self.path)
        except OSError:
            return self.max_map_size  # unknown: the store's own limit stands
        return st.f_bavail * st.f_frsize

    def _live_bytes(self, env: lmdb.Environment) -> int:
        """Bytes in the pages every database holds now, the two meta pages included."""
        pages = 2
        with env.begin() as txn:
            for db in (
                None,
                self._meta,
                self._tasks,
                self._payloads,
                self._results,
                self._keys,
                self._ready,
                self._delayed,
                self._lapse,
                self._inflight,
                self._dead,
                self._chunks,
                self._blocked,
                self._dependents,
            ):
                st = txn.stat(db) if db is not None else env.stat()
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return pages * self._page_size

    # -------------------------------------------------------- private: reads

    def _check_open(self) -> lmdb.Environment:
        env = self._env
        if env is None:
            raise JournalError("the journal is closed")
        return env

    @contextmanager
    def _reading(self) -> Iterator[lmdb.Transaction[bytes]]:
        """The open write transaction (read-your-writes), else a short read transaction."""
        env = self._check_open()
        try:
            if self._wtxn is not None:
                yield self._wtxn
            else:
                txn = env.begin()
                try:
                    yield txn
                finally:
                    txn.abort()
        except lmdb.Error as exc:
            raise _failed(f"read from the journal at {self.path} failed: {exc}", exc)

    def _get_raw(self, task_id: str) -> bytes | None:
        idb = _id_bytes(task_id)
        if idb is None:
            self._check_open()
            return None
        return self._get(idb, self._tasks)

    def _get(self, key: bytes, db: Db) -> bytes | None:
        """One value: inside a pass from its write transaction (read-your-writes) without
        the context manager, which costs more than the read; else a short read transaction."""
        txn = self._wtxn
        if txn is None:
            with self._reading() as txn:
                return txn.get(key, db=db)
        try:
            return txn.get(key, db=db)
        except lmdb.Error as exc:
            raise _failed(f"read from the journal at {self.path} failed: {exc}", exc)

    def _scan(self, db: Db, start: bytes, prefix: bytes, limit: int) -> list[TaskRecord]:
        """Records of the index entries from `start` on while keys begin with `prefix`
        (`limit` < 0: no limit)."""
        out: list[TaskRecord] = []
        with self._reading() as txn:
            cursor = txn.cursor(db=db)
            if not (cursor.set_range(start) if start else cursor.first()):
                return out
            tasks, held = self._tasks, self._held
            for key, idb in cursor.iternext():
                if not key.startswith(prefix):
                    break
                if held and idb in held:
                    continue  # held: it is INFLIGHT now, whatever its stored state
                out.append(self._load(txn, tasks, idb))
                if len(out) == limit:
                    break
        return out

    def _scan_until(self, db: Db, bound: bytes, limit: int) -> list[TaskRecord]:
        """Records of the time-keyed index entries with time <= `bound`, earliest first."""
        self._check_open()
        out: list[TaskRecord] = []
        if limit <= 0:
            return out
        with self._reading() as txn:
            cursor = txn.cursor(db=db)
            if not cursor.first():
                return out
            tasks, held = self._tasks, self._held
            for key, idb in cursor.iternext():
                if key[:8] > bound:
                    break
                if held and idb in held:
                    continue  # held: it is INFLIGHT now, whatever its stored state
                out.append(self._load(txn, tasks, idb))
                if len(out) == limit:
                    break
        return out

    def _load(self, txn: lmdb.Transaction[bytes], tasks: Db, idb: bytes) -> TaskRecord:
        data = txn.get(idb, db=tasks)
        if data is None:
            raise JournalError(f"an index of {self.path} names a missing task {idb.decode()}")
        return self._unpack(idb.decode(), data)

    def _unpack(self, task_id: str, data: bytes) -> TaskRecord:
        """The record in `data`, with the memo that spares its next put a decode."""
        record = unpack_record(task_id, data)
        svc = self._services.get(record.service)
        if svc is not None:
            record.store_memo = (self, data, svc, int(record.state), self._entries(record, svc))
        return record

    # ------------------------------------------------- recurring tasks (schedules)

    def put_schedule(self, name: str, data: Mapping[str, Any]) -> None:
        self._check_open()
        check_schedule_name(name)
        packed = msgpack.packb(dict(data), use_bin_type=True)  # fails here if not msgpack-able
        self._write((_SCHEDULE, name, packed))

    def delete_schedule(self, name: str) -> None:
        self._check_open()
        raw = check_schedule_name(name)
        if self._get(raw, self._schedules) is not None:
            self._write((_SCHEDULE, name, None))

    def schedules(self) -> dict[str, dict[str, Any]]:
        self._check_open()
        with self._reading() as txn:
            return {
                key.decode(): msgpack.unpackb(value)
                for key, value in txn.cursor(db=self._schedules)
            }

    def _apply_schedule(
        self, txn: lmdb.Transaction[bytes], name: bytes, packed: bytes | None
    ) -> None:
        """Write (or, with None, remove) a schedule."""
        if packed is None:
            txn.delete(name, db=self._schedules)
        else:
            txn.put(name, packed, db=self._schedules)


def _id_bytes(task_id: str) -> bytes | None:
    """The id as an LMDB key, or None if no task can have it."""
    idb = task_id.encode()
    return idb if 0 < len(idb) <= MAX_ID_BYTES else None


def _by_seq(record: TaskRecord) -> int:
    return record.seq


def _seq_after(seq: int) -> bytes:
    """The smallest 8-byte seq key after `seq` (stored seqs are at most MAX_SEQ)."""
    return _seq_bytes(min(max(seq + 1, 0), MAX_SEQ + 1))
