"""The journal: where every durable task lives, queued, delayed, in flight or finished.

This module is the contract between the broker core and its stores. The store
holds the tasks themselves (not a log to replay), so queue depth is bounded by
disk, not memory: the core keeps only a window of each queue in memory and
asks the journal for more. Two implementations keep the same contract, checked
by one suite (tests/contract/test_journal_contract.py): `MemoryJournal` (tests,
and the `memory` durability mode) and `LmdbJournal`.

Rules every implementation keeps:
  1. Writes (`put`, `put_result`, `put_chunks`, `delete`, `put_service_options`,
     `put_schedule`, `delete_schedule`) are visible to every read of the same
     journal object at once, and become durable only at `commit()`; after a
     crash the store holds exactly what the last successful commit held.
  2. Indexes follow the record's `state`: a READY task is found by `ready()`,
     a DELAYED one by `due()`, an INFLIGHT one by `inflight()`, a DEAD one by
     `dead()`, a BLOCKED one by `blocked()`; never by another. `counts()` is
     exact at all times.
  3. Payload and result frames, and stream chunks, are stored as given and
     returned unchanged; the journal never interprets them. (Record fields go
     through msgpack: tuples in `headers` or `history` come back as lists.)
  4. A write or commit that raises discards the whole pass: reads then show
     the last commit, and the caller must confirm nothing from that pass.
  5. Sequence numbers are unique per task; `next_seq()` is greater than any seq
     in a committed record and than any returned before a clean `close()` (after
     a crash, seqs of the lost pass may be handed out again).
  6. Not thread-safe, and LMDB ties a write transaction to a thread: the thread
     that writes first in a pass must also commit it.
  7. `hold` is a write a store may keep in memory only (the START of an attempt):
     every read sees it as if it had been `put`, but a crash loses it, and the task
     then reads as it was last put (READY, with its earlier attempt). A later `put`
     or `delete` of the task replaces it; `put_chunks` of a held task writes the
     held record first (a stream's chunks are never stored without the INFLIGHT
     record of their attempt); a clean `close()` writes every held record.
  8. Every open is a new **life** of the store (`life`, written once per open);
     `crashed` says the life before did not end with a clean `close()`, and
     `crashes` counts the lives that did not. What a crashed life held is lost:
     the broker fences attempt numbers with `crashes` (core/tasks.py, rule 3).
Misuse raises at once: an idempotency key already held by another task of the
service (ValueError), `put_result` or `put_chunks` for an unknown task (KeyError),
an `after` cursor with a priority out of range (ValueError), `add_dependent` of
an unknown task (KeyError). INFLIGHT tasks and
finished records without `keep_until` never lapse. A task's stream entries go only
with its record (`delete`), whatever its state.
It never reads the clock: every time is an argument (seconds since the epoch).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from zbroker.protocol import limits
from zbroker.protocol.states import FINAL_STATES as _FINAL
from zbroker.protocol.states import TaskState as WireState

SCHEMA_VERSION = 1

# Priority bounds (the protocol's): higher runs first; one byte in an index key.
PRIORITY_MIN = limits.PRIORITY_MIN
PRIORITY_MAX = limits.PRIORITY_MAX
_LAST_SEQ = 2**62  # greater than any seq a store hands out


class TaskState(enum.IntEnum):
    """Where a task is in its life. Stored as the int value.

    The states and their names are the protocol's (zbroker.protocol.states): a
    member's `wire` is the state as the wire names it, and a state either side lacks
    fails this module's import. Only the numbers are the journal's: never renumber.
    """

    READY = 1  # waiting in its service's queue
    DELAYED = 2  # waiting for `not_before` (a delayed enqueue, or a retry's backoff)
    INFLIGHT = 3  # an attempt was handed to a worker
    DONE = 4  # finished with a result (kept until `keep_until`)
    DEAD = 5  # in the service's dead-letter queue (attempts exhausted, or a final failure)
    CANCELLED = 6  # cancelled before it finished (kept until `keep_until`)
    EXPIRED = 7  # its TTL passed before it started (kept until `keep_until`)
    BLOCKED = 8  # waiting for the tasks it depends on (`depends_on`) to end
    UPSTREAM_FAILED = 9  # a dependency ended without DONE (kept until `keep_until`)

    @property
    def wire(self) -> WireState:
        """The state as ZBC01 answers, TASKS and events name it."""
        return _TO_WIRE[self]

    @classmethod
    def from_wire(cls, state: str) -> TaskState:
        """The stored state for a wire name; ValueError for a name the protocol lacks."""
        return _FROM_WIRE[WireState(state)]


# Both directions are built from the names, so a state added on one side only fails here.
_TO_WIRE = {state: WireState[state.name] for state in TaskState}
_FROM_WIRE = {wire: TaskState[wire.name] for wire in WireState}

# Final states whose records lapse after `keep_until`. DEAD is final too, but a dead
# letter stays in its service's dead-letter index until it is redriven or dropped.
FINISHED_STATES = frozenset(s for s in TaskState if s.wire in _FINAL) - {TaskState.DEAD}


class Durability(enum.Enum):
    """What a confirmed write survives."""

    SYNC = "sync"  # fsync at every commit: survives a power cut
    ASYNC = "async"  # no fsync: survives a crash of the broker process, not of the machine
    MEMORY = "memory"  # nothing survives the process: tests and benchmarks only


@dataclass(slots=True)
class TaskRecord:
    """A task's metadata. Payload and result frames are stored beside it, not in it."""

    id: str
    service: str
    state: TaskState
    seq: int  # enqueue order across the whole broker, from Journal.next_seq(): FIFO tiebreak
    created_at: float
    priority: int = 0  # PRIORITY_MIN..PRIORITY_MAX, higher first
    not_before: float = 0.0  # DELAYED until then
    expires_at: float | None = None  # TTL: if not started by then, it expires
    attempt: int = 0  # attempts started so far
    max_attempts: int = 3
    timeout_s: float | None = None  # run-time limit of one attempt
    key: str | None = None  # idempotency key, unique per service while the record exists
    headers: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # the last failure's reason
    finished_at: float | None = None
    keep_until: float | None = None  # finished records (and results) may be deleted after this
    # Short history for operators: [event, time, details...] lists, oldest first, bounded.
    history: list[list[Any]] = field(default_factory=list)
    # Of the `attempt` attempts started, how many were cut short by the broker stopping
    # or dying: they move the attempt number (the fencing token) on but are not charged
    # against `max_attempts`. Stored only when not 0, so older stores read as 0.
    uncharged: int = 0
    # The principal that enqueued it, on an authenticated broker (None: none was
    # asked): only it, or an admin, may read its result or status, or cancel it.
    # Stored only when set, so older stores read as None.
    owner: str | None = None
    # The task's stream (chunks a worker appended, kept in the journal beside the
    # record): how many entries it holds, i.e. the next offset, and their total bytes.
    # The broker keeps them in step with what it put; the store only stores them.
    # Stored only when stream_chunks is not 0, so older stores read as 0, 0.
    stream_chunks: int = 0
    stream_bytes: int = 0
    # Dependencies (docs/protocol.md §15): the ids of the tasks it waits for, how many
    # of them have not ended yet (0 once it left BLOCKED), whether it runs even when
    # one ended without DONE, and what of their results becomes its input ("result",
    # "results" or None). Stored only when depends_on is not empty. (The sequences
    # here are tuples: no list to make for the many records without them.)
    depends_on: tuple[str, ...] = ()
    blocked_on: int = 0
    run_anyway: bool = False
    input: str | None = None
    # Placement and flow control (docs/protocol.md §16): tags its worker must have,
    # tags that make a worker a better fit, a key that sends it to the worker that
    # last ran that key, and the key its service's per-key rules count it under.
    require: tuple[str, ...] = ()
    prefer: tuple[str, ...] = ()
    affinity: str | None = None
    concurrency_key: str | None = None
    # The journal's `crashes` when the broker last numbered this task's attempts (at
    # its enqueue, its starts and its recovery): if the store has crashed since, an
    # attempt may have been handed out without being written, and the next start
    # skips a number for each such crash (core/tasks.py `fence`). Set by the broker
    # core, not by the store. Stored only when not 0, so older stores read as 0.
    crashes: int = 0
    # Opaque to everyone but the store that set it: what the store holds for this
    # object as of its last write or read (bytes, index entries), so the next `put`
    # of the same object can skip decoding the stored copy. A store checks it
    # against what it actually holds before trusting it. Never stored or compared.
    store_memo: Any = field(default=None, init=False, repr=False, compare=False)
    # The payload frames, kept on the object by the broker core while a small task
    # waits in its in-memory window, so its delivery needs no read of the store.
    # Never stored or compared; stores neither set nor read it.
    frames_memo: tuple[bytes, ...] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    # Written out, not generated: a compiled (mypyc) class keeps the __init__ that
    # dataclasses generates as interpreted Python, about 1.7 µs a call on a record
    # the broker builds twice per task (enqueue, read back); this one is compiled.
    # Same parameters, in the same order, as the fields above (tested:
    # tests/unit/test_record_init.py).
    def __init__(
        self,
        id: str,
        service: str,
        state: TaskState,
        seq: int,
        created_at: float,
        priority: int = 0,
        not_before: float = 0.0,
        expires_at: float | None = None,
        attempt: int = 0,
        max_attempts: int = 3,
        timeout_s: float | None = None,
        key: str | None = None,
        headers: dict[str, Any] | None = None,
        error: str | None = None,
        finished_at: float | None = None,
        keep_until: float | None = None,
        history: list[list[Any]] | None = None,
        uncharged: int = 0,
        owner: str | None = None,
        stream_chunks: int = 0,
        stream_bytes: int = 0,
        depends_on: tuple[str, ...] = (),
        blocked_on: int = 0,
        run_anyway: bool = False,
        input: str | None = None,
        require: tuple[str, ...] = (),
        prefer: tuple[str, ...] = (),
        affinity: str | None = None,
        concurrency_key: str | None = None,
        crashes: int = 0,
    ) -> None:
        self.id = id
        self.service = service
        self.state = state
        self.seq = seq
        self.created_at = created_at
        self.priority = priority
        self.not_before = not_before
        self.expires_at = expires_at
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.key = key
        self.headers = {} if headers is None else headers
        self.error = error
        self.finished_at = finished_at
        self.keep_until = keep_until
        self.history = [] if history is None else history
        self.uncharged = uncharged
        self.owner = owner
        self.stream_chunks = stream_chunks
        self.stream_bytes = stream_bytes
        self.depends_on = depends_on
        self.blocked_on = blocked_on
        self.run_anyway = run_anyway
        self.input = input
        self.require = require
        self.prefer = prefer
        self.affinity = affinity
        self.concurrency_key = concurrency_key
        self.crashes = crashes
        self.store_memo = None
        self.frames_memo = None


@dataclass(slots=True)
class JournalStats:
    """What operators see of the store."""

    commits: int = 0  # commits that wrote something
    commit_seconds_total: float = 0.0
    last_commit_seconds: float = 0.0
    bytes_used: int = 0
    map_size: int = 0
    # Bytes in pages that hold data now (freed pages, which writes reuse, excluded),
    # and the most the store may hold (0: no limit). The broker refuses enqueues that
    # would take bytes_live near bytes_max, so finishing tasks always has room.
    bytes_live: int = 0
    bytes_max: int = 0
    # Task records written (`put`, a held record written at last) or deleted: what
    # tasks cost the store. A `hold` is not one, unless it is written later.
    record_writes: int = 0
    # Flushes to disk (fdatasync) the store asked for: one per `sync` commit, plus
    # one per settle() that had a deferred meta page to flush; 0 for other stores.
    flushes: int = 0


class JournalError(Exception):
    """Raised when the store fails in a way the broker cannot hide (I/O error, corruption)."""


class SchemaMismatch(JournalError):
    """Raised at open when the store was written with a schema version this code does not know."""


class Fenced(JournalError):
    """A commit was refused because this broker no longer holds its group's lease
    (another broker took over, or it was not renewed in time): it must step down."""


class JournalFull(JournalError):
    """Raised when a write does not fit and the store may not grow any further."""


class Journal(abc.ABC):
    """The store of durable tasks. Not thread-safe: one broker loop owns it."""

    durability: Durability
    stats: JournalStats
    # Rule 8: this open's number (1 for a new store), whether the life before it ended
    # without a clean close, and how many lives before it did. A store that keeps
    # nothing across opens (MemoryJournal) is always in its first life.
    life: int = 1
    # Which store this is, as STATS names it: "memory", "lmdb" or "postgresql".
    kind: str = "memory"
    crashed: bool = False
    crashes: int = 0

    # ----------------------------------------------------------------- writes

    @abc.abstractmethod
    def put(self, record: TaskRecord, payload: Sequence[bytes] | None = None) -> None:
        """Insert or replace `record` (matched by id) and move its index entries to
        follow its state, priority, not_before, expires_at and key. `payload` is
        stored with it (a new task's, or one replacing the stored payload); None keeps
        the stored payload (none, for a new task)."""

    def hold(self, record: TaskRecord) -> None:
        """`record` (stored already) moved to INFLIGHT: an attempt started. Every read
        sees it like a `put` of it, but a store may keep it in memory only (rule 7):
        after a crash the task reads as it was last put. KeyError if the task is
        unknown, ValueError if `record` is not INFLIGHT. This default puts it."""
        if record.state is not TaskState.INFLIGHT:
            raise ValueError(f"only an INFLIGHT record is held, not {record.state!r}")
        if self.get(record.id) is None:
            raise KeyError(f"no task {record.id!r} to hold")
        self.put(record)

    @abc.abstractmethod
    def put_result(self, task_id: str, frames: Sequence[bytes]) -> None:
        """Store a finished task's result frames (replacing any earlier ones)."""

    @abc.abstractmethod
    def put_chunks(self, task_id: str, offset: int, attempt: int, chunks: Sequence[bytes]) -> None:
        """Store `chunks` as the task's stream entries at offsets offset, offset+1, ...,
        each tagged with `attempt` (int >= 1). Like every write: visible to reads at once,
        durable at commit. KeyError if the task is unknown (no record). An offset already
        stored is replaced. Empty `chunks` is a no-op.

        The entries stay until the task's record is deleted, so a reader may start at
        any offset; offsets are 0..2**63-2 and attempts 1..2**32-1 (ValueError past
        them), and chunks must be bytes (TypeError)."""

    @abc.abstractmethod
    def delete(self, task_id: str) -> None:
        """Remove the record, its payload, its result, its stream, its dependents' edges
        and every index entry. No-op if absent."""

    @abc.abstractmethod
    def add_dependent(self, task_id: str, dependent_id: str) -> None:
        """Store that `dependent_id` waits for `task_id` to end (an edge of a task graph,
        kept until `drop_dependents(task_id)` or the deletion of `task_id`). KeyError if
        `task_id` is unknown; the dependent need not be stored yet. Adding an edge
        that is stored already is a no-op."""

    @abc.abstractmethod
    def drop_dependents(self, task_id: str) -> None:
        """Remove every edge of `task_id` (no-op when it has none)."""

    @abc.abstractmethod
    def dependents(self, task_id: str, limit: int) -> list[str]:
        """Up to `limit` ids of the tasks waiting for `task_id` (edges stored with
        `add_dependent`), in no promised order."""

    @abc.abstractmethod
    def dependent_count(self) -> int:
        """How many edges are stored, across every task (cheap: the broker reads it
        at start to know whether finishing a task needs a look at its dependents)."""

    @abc.abstractmethod
    def put_service_options(self, service: str, options: Mapping[str, Any]) -> None:
        """Store the operator's options for `service` (paused, limit, ...) with the next
        commit, replacing earlier ones; an empty mapping removes them. Values must be
        msgpack-able."""

    @abc.abstractmethod
    def service_options(self) -> dict[str, dict[str, Any]]:
        """Every service's stored options (services with none are absent)."""

    @abc.abstractmethod
    def next_seq(self) -> int:
        """A new sequence number, greater than any returned before, also across restarts."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make every write since the last commit durable (per `durability`), atomically.
        A store may leave the last step of that durability (a flush) to its next
        commit or to `settle()`: `durable_commits()` says how far it has come."""

    def durable_commits(self) -> int:
        """How many of the commits that wrote (`stats.commits`) a power cut cannot take
        back, as far as `durability` promises: all of them, unless the store defers a
        flush (LMDB `sync` flushes the meta page of a commit with the next commit's
        data). The runtime sends what a commit confirms only once this counts it."""
        return self.stats.commits

    def settle(self) -> None:
        """Flush now whatever `durable_commits()` does not count yet (a no-op when
        nothing is deferred): for a pass whose confirms would otherwise wait."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store. Uncommitted writes are discarded; held records (rule 7)
        are written, and the life is marked as ended cleanly (rule 8)."""

    # ------------------------------------------------------------------ reads

    @abc.abstractmethod
    def get(self, task_id: str) -> TaskRecord | None:
        """The record, or None. The returned object is a copy: mutate it, then `put` it."""

    @abc.abstractmethod
    def payload(self, task_id: str) -> list[bytes] | None:
        """The task's payload frames, or None if the task is unknown."""

    @abc.abstractmethod
    def result(self, task_id: str) -> list[bytes] | None:
        """The task's result frames, or None if none is stored."""

    @abc.abstractmethod
    def chunks(
        self, task_id: str, offset: int, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """The stream entries from `offset` on, in offset order, consecutive, as
        (attempt, data): at most `limit` of them, and no more once their data add up to
        `max_bytes` or more (the first is returned whatever its size). [] when there is
        none at `offset` (unknown task included).

        A gap (an offset never stored) ends the answer: entries past it are read
        from their own offset."""

    @abc.abstractmethod
    def stream_size(self, task_id: str) -> tuple[int, int]:
        """(entries, bytes): the offset after the last stored entry (0 when none) and the
        sum of the entries' data lengths. Reads every entry: for recovery, not the hot path."""

    @abc.abstractmethod
    def ready(
        self, service: str, limit: int, after: tuple[int, int] | None = None
    ) -> list[TaskRecord]:
        """Up to `limit` READY tasks of `service`: highest priority first, then lowest seq.
        `after` is the (priority, seq) of the last task of a previous call: continue
        strictly after it in that order."""

    @abc.abstractmethod
    def due(self, now: float, limit: int) -> list[TaskRecord]:
        """Up to `limit` DELAYED tasks with not_before <= now, earliest not_before first."""

    @abc.abstractmethod
    def next_due_at(self) -> float | None:
        """The earliest not_before among DELAYED tasks, or None when there are none."""

    @abc.abstractmethod
    def lapsed(self, now: float, limit: int) -> list[TaskRecord]:
        """Up to `limit` records whose time is up, earliest first: READY, DELAYED or
        BLOCKED tasks with expires_at <= now (TTL passed before they started), and
        finished records (DONE, CANCELLED, EXPIRED, UPSTREAM_FAILED) with keep_until <=
        now. DEAD records never lapse."""

    @abc.abstractmethod
    def inflight(self) -> list[TaskRecord]:
        """Every INFLIGHT task (the broker requeues them when it starts)."""

    @abc.abstractmethod
    def dead(self, service: str, limit: int, after_seq: int | None = None) -> list[TaskRecord]:
        """Up to `limit` DEAD tasks of `service`, lowest seq first, after `after_seq`."""

    @abc.abstractmethod
    def blocked(self, service: str, limit: int, after_seq: int | None = None) -> list[TaskRecord]:
        """Up to `limit` BLOCKED tasks of `service`, lowest seq first, after `after_seq`."""

    @abc.abstractmethod
    def find_key(self, service: str, key: str) -> str | None:
        """The id of the stored task of `service` with idempotency `key`, or None."""

    def oldest_ready(self, service: str) -> TaskRecord | None:
        """The READY task of `service` enqueued first (lowest seq), whatever its priority.
        One `ready()` read per priority level in use, so cheap at any queue depth."""
        oldest: TaskRecord | None = None
        after: tuple[int, int] | None = None
        while True:
            found = self.ready(service, 1, after)
            if not found:
                return oldest
            first = found[0]  # the oldest of its priority level
            if oldest is None or first.seq < oldest.seq:
                oldest = first
            if first.priority == PRIORITY_MIN:
                return oldest
            after = (first.priority, _LAST_SEQ)  # on to the next level down

    @abc.abstractmethod
    def counts(self) -> dict[str, dict[TaskState, int]]:
        """Exact number of records per service and state (services with none are absent)."""

    # ------------------------------------------------- recurring tasks (schedules)
    # A schedule is a name and a map of its rule and progress (docs/protocol.md §17),
    # stored apart from the tasks, written and made durable like any other write:
    # the broker moves a schedule's `next_at` on in the same pass (the same commit)
    # as the task its firing enqueued, so a crash keeps both or neither.

    @abc.abstractmethod
    def put_schedule(self, name: str, data: Mapping[str, Any]) -> None:
        """Store schedule `name` (a non-empty str of at most MAX_SCHEDULE_KEY_BYTES bytes
        of UTF-8, else ValueError) with the next commit, replacing an earlier one.
        `data` must be msgpack-able (bytes stay bytes) (TypeError otherwise)."""

    @abc.abstractmethod
    def delete_schedule(self, name: str) -> None:
        """Remove schedule `name` with the next commit. No-op if absent."""

    @abc.abstractmethod
    def schedules(self) -> dict[str, dict[str, Any]]:
        """Every stored schedule by name (copies: changing one changes nothing stored)."""


# Longest schedule name a store keeps (an LMDB key holds 511 bytes).
MAX_SCHEDULE_KEY_BYTES = 480


def check_schedule_name(name: str) -> bytes:
    """The name as a store keys it; ValueError for one no store may keep."""
    if type(name) is not str or not name:
        raise ValueError(f"a schedule name must be a non-empty str, got {name!r}")
    raw = name.encode()  # also rejects a str that is not valid UTF-8 (lone surrogates)
    if len(raw) > MAX_SCHEDULE_KEY_BYTES:
        raise ValueError(f"schedule name longer than {MAX_SCHEDULE_KEY_BYTES} bytes")
    return raw
