"""The journal in PostgreSQL: tables an operator can read, one transaction per pass.

The store keeps the journal's contract (base.py) with PostgreSQL as the durable
copy. Every task, payload, result and stream of the journal is also held in the
broker's memory, by the reference store it extends (memory.py): reads never wait
for the database, and every rule of indexes, keys and counts is the one the other
stores are tested against. Writes change that copy at once and are remembered;
`commit()` writes everything the pass changed in one PostgreSQL transaction
(pipelined: one round trip and one WAL flush), so a confirmed enqueue is committed
there, and a crash of the broker leaves exactly what its last commit held.

Memory: the copy costs what `stats.bytes_live` counts plus some bookkeeping per
task; the broker refuses enqueues near `max_bytes` (--journal-max-mib) like it does
for a full LMDB map.

Fencing: given a `lease` (zbroker/runtime/lease.py: the active broker of a pair),
every commit first checks, in the same transaction and with the lease row locked,
that the lease's epoch is still the one this broker holds, and refuses the whole
commit (`Fenced`) otherwise: a broker whose lease was taken over can never commit
again. Every pass also checks that the lease is still fresh (renewed within its
term) before anything of it may be sent: a broker frozen past its term stops at
its first pass.

After a failed commit the copy in memory is ahead of the database: the store
refuses every later call (JournalError) and the broker stops; a new open reads
the database again.

Durability: `sync` commits with synchronous_commit=on (PostgreSQL flushes its WAL
before it answers), `async` with synchronous_commit=off: a commit then survives a
crash of the broker, not one of the database server.

Schema: the tables (docs/operations.md, "Reading state with SQL") and their version
are explicit: `SCHEMA` is the version this code writes, `MIGRATIONS` the steps
from each older one; a database with a newer version is refused (SchemaMismatch).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import msgpack
import psycopg

from zbroker.journal._codec import unpack_frames, unpack_record
from zbroker.journal.base import (
    Durability,
    Fenced,
    JournalError,
    SchemaMismatch,
    TaskRecord,
    TaskState,
)
from zbroker.journal.memory import MemoryJournal

# The schema version this code writes, and how to reach it from each older one:
# MIGRATIONS[n] brings a database at version n-1 to version n (0: an empty one).
SCHEMA = 1
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # Counters of the store: schema, seq, life, crashes, clean.
        "CREATE TABLE zb_meta (key text PRIMARY KEY, value bigint NOT NULL)",
        # The lease of the active broker (one row): zbroker/runtime/lease.py.
        """CREATE TABLE zb_lease (
            id smallint PRIMARY KEY CHECK (id = 1),
            epoch bigint NOT NULL,
            holder text NOT NULL,
            endpoint text NOT NULL,
            backend_pid integer NOT NULL,
            backend_start timestamptz NOT NULL,
            acquired_at timestamptz NOT NULL,
            renewed_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL)""",
        # Every task: the columns are for people (SQL); `record` is the task itself.
        """CREATE TABLE zb_tasks (
            id text PRIMARY KEY,
            service text NOT NULL,
            state text NOT NULL,
            seq bigint NOT NULL,
            priority integer NOT NULL,
            attempt integer NOT NULL,
            max_attempts integer NOT NULL,
            idempotency_key text,
            owner text,
            error text,
            created_at timestamptz,
            not_before timestamptz,
            expires_at timestamptz,
            finished_at timestamptz,
            keep_until timestamptz,
            record bytea NOT NULL)""",
        "CREATE INDEX zb_tasks_by_service_state ON zb_tasks (service, state)",
        # Frames as one msgpack array of bin (1-5 bytes per frame), and their size.
        """CREATE TABLE zb_payloads (
            task_id text PRIMARY KEY, frames bytea NOT NULL, bytes bigint NOT NULL)""",
        """CREATE TABLE zb_results (
            task_id text PRIMARY KEY, frames bytea NOT NULL, bytes bigint NOT NULL)""",
        """CREATE TABLE zb_chunks (
            task_id text NOT NULL,
            "offset" bigint NOT NULL,
            attempt bigint NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (task_id, "offset"))""",
        """CREATE TABLE zb_edges (
            task_id text NOT NULL,
            dependent_id text NOT NULL,
            PRIMARY KEY (task_id, dependent_id))""",
        # Keyed by the name's UTF-8 bytes, exact (text cannot hold NUL); the text
        # column is the name for people (NUL shown as U+FFFD, like every text column).
        """CREATE TABLE zb_service_options (
            service_key bytea PRIMARY KEY, service text NOT NULL, options bytea NOT NULL)""",
        """CREATE TABLE zb_schedules (
            name_key bytea PRIMARY KEY, name text NOT NULL, data bytea NOT NULL)""",
        # The fence every commit runs first (module docstring).
        """CREATE FUNCTION zb_fence(held bigint) RETURNS void LANGUAGE plpgsql AS $$
        DECLARE current bigint;
        BEGIN
            SELECT epoch INTO current FROM zb_lease WHERE id = 1 FOR SHARE;
            IF current IS DISTINCT FROM held THEN
                RAISE EXCEPTION 'fenced: this broker holds lease epoch %, the journal''s is %',
                    held, current USING ERRCODE = 'ZB001';
            END IF;
        END $$""",
    ),
}
# Serializes schema changes between brokers starting together (pg_advisory_xact_lock).
SCHEMA_LOCK = 0x7A62726B  # "zbrk"
FENCED_SQLSTATE = "ZB001"


def connect(url: str, purpose: str) -> psycopg.Connection[Any]:
    """A connection to the journal's database, named for pg_stat_activity:
    `zbroker <purpose> <pid>`."""
    name = f"zbroker {purpose} {os.getpid()}"
    try:
        conn = psycopg.connect(url, autocommit=True, application_name=name)
    except psycopg.Error as exc:
        raise JournalError(f"cannot connect to the journal's database: {exc}") from exc
    return conn


def ensure_schema(conn: psycopg.Connection[Any]) -> int:
    """Bring the database to `SCHEMA` (creating the tables of an empty one); the
    version it was at. SchemaMismatch for one written by a newer zbroker."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        found = conn.execute("SELECT to_regclass('zb_meta') IS NOT NULL").fetchone()
        version = 0
        if found is not None and found[0]:
            row = conn.execute("SELECT value FROM zb_meta WHERE key = 'schema'").fetchone()
            version = 0 if row is None else int(row[0])
        if version > SCHEMA:
            raise SchemaMismatch(
                f"the journal's database has schema version {version}, written by a newer"
                f" zbroker; this one knows versions up to {SCHEMA}: upgrade zbroker"
            )
        for step in range(version + 1, SCHEMA + 1):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO zb_meta VALUES ('schema', %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (step,),
            )
    return version


# Tasks inserted or replaced in one statement: a column of values per parameter,
# unnested into rows (one execute, whose arrays psycopg dumps in C, not one per task).
_TASKS_UPSERT = """INSERT INTO zb_tasks SELECT id, service, state, seq, priority, attempt,
    max_attempts, idempotency_key, owner, error, to_timestamp(created_at),
    to_timestamp(not_before), to_timestamp(expires_at), to_timestamp(finished_at),
    to_timestamp(keep_until), record
FROM unnest(%s::text[], %s::text[], %s::text[], %s::int8[], %s::int4[], %s::int4[],
    %s::int4[], %s::text[], %s::text[], %s::text[], %s::float8[], %s::float8[],
    %s::float8[], %s::float8[], %s::float8[], %s::bytea[])
    AS t(id, service, state, seq, priority, attempt, max_attempts, idempotency_key, owner,
        error, created_at, not_before, expires_at, finished_at, keep_until, record)
ON CONFLICT (id) DO UPDATE SET service = EXCLUDED.service, state = EXCLUDED.state,
    seq = EXCLUDED.seq, priority = EXCLUDED.priority, attempt = EXCLUDED.attempt,
    max_attempts = EXCLUDED.max_attempts, idempotency_key = EXCLUDED.idempotency_key,
    owner = EXCLUDED.owner, error = EXCLUDED.error, created_at = EXCLUDED.created_at,
    not_before = EXCLUDED.not_before, expires_at = EXCLUDED.expires_at,
    finished_at = EXCLUDED.finished_at, keep_until = EXCLUDED.keep_until,
    record = EXCLUDED.record"""
# Payloads or results of many tasks in one statement, as _TASKS_UPSERT.
_FRAMES_UPSERT = """INSERT INTO {table} SELECT * FROM unnest(%s::text[], %s::bytea[], %s::int8[])
ON CONFLICT (task_id) DO UPDATE SET frames = EXCLUDED.frames, bytes = EXCLUDED.bytes"""
_PAYLOADS_UPSERT = _FRAMES_UPSERT.format(table="zb_payloads")
_RESULTS_UPSERT = _FRAMES_UPSERT.format(table="zb_results")
_CHUNK_UPSERT = (
    'INSERT INTO zb_chunks VALUES (%s, %s::int8, %s::int8, %s) ON CONFLICT (task_id, "offset") '
    "DO UPDATE SET attempt = EXCLUDED.attempt, data = EXCLUDED.data"
)
_META_UPSERT = (
    "INSERT INTO zb_meta VALUES (%s, %s::int8) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)
_DELETES = tuple(
    f"DELETE FROM {table} WHERE {column} = ANY(%s::text[])"
    for table, column in (
        ("zb_tasks", "id"),
        ("zb_payloads", "task_id"),
        ("zb_results", "task_id"),
        ("zb_chunks", "task_id"),
        ("zb_edges", "task_id"),
    )
)

# The tables of one msgpack value per name: their key column and value column.
_NAMED = {"zb_service_options": ("service_key", "options"), "zb_schedules": ("name_key", "data")}

# A task's columns besides `record`, in _TASKS_UPSERT's order (`_row`).
_Row = tuple[Any, ...]
_TASK_COLUMNS = 15


def _text(value: str) -> str:
    """`value` as a text column can hold it: PostgreSQL's text has no NUL character
    (a peer may send one in a service name, a key or an error), shown as U+FFFD.
    The record itself (bytea) keeps the exact value."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _text_or_none(value: str | None) -> str | None:
    return None if value is None else _text(value)


# The seconds since the epoch a timestamptz column holds (4713 BC to 294276 AD),
# with a margin; a time past them (a peer may ask for a delay of 1e300 s) is shown
# as NULL, the record keeping the exact value.
_TIME_MIN_S, _TIME_MAX_S = -2.0e11, 9.0e12


def _time(value: float | None) -> float | None:
    return value if value is not None and _TIME_MIN_S < value < _TIME_MAX_S else None


def _row(record: TaskRecord) -> _Row:
    not_before = record.not_before if record.state is TaskState.DELAYED else None
    return (
        record.id,
        _text(record.service),
        record.state.wire.value,
        record.seq,
        record.priority,
        record.attempt,
        record.max_attempts,
        _text_or_none(record.key),
        _text_or_none(record.owner),
        _text_or_none(record.error),
        _time(record.created_at),
        _time(not_before),
        _time(record.expires_at),
        _time(record.finished_at),
        _time(record.keep_until),
    )


def _upsert_tasks(cur: psycopg.Cursor[Any], rows: Iterable[tuple[_Row, bytes]]) -> None:
    """Insert or replace tasks (their columns and packed record) in one statement."""
    columns: list[list[Any]] = [[] for _ in range(_TASK_COLUMNS + 1)]
    for row, packed in rows:
        for column, value in zip(columns, row, strict=False):
            column.append(value)
        columns[_TASK_COLUMNS].append(packed)
    cur.execute(_TASKS_UPSERT, columns)


class PostgresJournal(MemoryJournal):
    """The journal in the PostgreSQL database at `url` (module docstring)."""

    def __init__(
        self,
        url: str,
        durability: Durability = Durability.SYNC,
        *,
        lease: Any = None,
        max_bytes: int = 0,
    ) -> None:
        if durability is Durability.MEMORY:
            raise ValueError("a PostgreSQL journal is durable: sync or async")
        super().__init__()
        self.kind = "postgresql"
        self.durability = durability
        self.url = url
        self.lease = lease  # None, or the held lease (`epoch`, `fresh()`)
        self.stats.bytes_max = max_bytes
        self._failed: str | None = None
        # What the open pass changed, to write at commit.
        # Tasks to upsert, by id: their columns and record as last put (a hold after
        # the put in the same pass stays in memory, like any hold).
        self._rows: dict[str, tuple[_Row, bytes]] = {}
        self._deleted: set[str] = set()
        self._payloads_changed: set[str] = set()
        self._results_changed: set[str] = set()
        self._chunks_changed: dict[str, set[int]] = {}
        self._edges_changed: set[str] = set()
        self._options_changed: set[str] = set()
        self._schedules_changed: set[str] = set()
        # Whether the open pass changed anything the database holds (holds aside).
        self._to_write = False
        # Held records (rule 7): id -> the packed INFLIGHT record, in memory only.
        # Those of committed passes are written at a clean close; the open pass's
        # holds and ends of holds are discarded then, undone from `_held_undo`:
        # what each id touched in the pass held before it (None: nothing).
        self._held: dict[str, bytes] = {}
        self._held_undo: dict[str, bytes | None] = {}
        self._stored_seq = 0
        self._conn = connect(url, "journal")
        try:
            self._conn.execute(
                "SET synchronous_commit = " + ("on" if durability is Durability.SYNC else "off")
            )
            if lease is not None:
                # A broker frozen inside a commit holds the lease row's lock: the server
                # ends that session after a lease term, so a standby can take over.
                timeout_ms = max(1000, int(lease.term_s * 1000))
                self._conn.execute(f"SET idle_in_transaction_session_timeout = {timeout_ms}")
            ensure_schema(self._conn)
            self._load()
            self._begin_life()
        except psycopg.Error as exc:
            self._conn.close()
            raise JournalError(f"cannot open the journal in PostgreSQL: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    # ----------------------------------------------------------------- opening

    def _load(self) -> None:
        """Read every table into the copy in memory (the big ones row by row, so that
        no result set as large as the journal is held beside the copy)."""
        cur = self._conn.cursor(binary=True)
        meta = dict(cur.execute("SELECT key, value FROM zb_meta").fetchall())
        seq = int(meta.get("seq", 0))
        store = super().put
        for task_id, packed in cur.stream("SELECT id, record FROM zb_tasks"):
            record = unpack_record(task_id, bytes(packed))
            seq = max(seq, record.seq)
            store(record, None)
        for task_id, packed in cur.stream("SELECT task_id, frames FROM zb_payloads"):
            if task_id in self._records:
                payload = tuple(unpack_frames(bytes(packed)))
                self._bytes += sum(map(len, payload))
                self._payloads[task_id] = payload
        for task_id, packed in cur.stream("SELECT task_id, frames FROM zb_results"):
            super().put_result(task_id, unpack_frames(bytes(packed)))
        rows = cur.stream('SELECT task_id, "offset", attempt, data FROM zb_chunks')
        for task_id, offset, attempt, data in rows:
            super().put_chunks(task_id, int(offset), int(attempt), [bytes(data)])
        for task_id, dependent_id in cur.execute("SELECT task_id, dependent_id FROM zb_edges"):
            super().add_dependent(task_id, dependent_id)
        for key, options in cur.execute("SELECT service_key, options FROM zb_service_options"):
            service = bytes(key).decode()
            super().put_service_options(service, msgpack.unpackb(bytes(options)))
        for key, data in cur.execute("SELECT name_key, data FROM zb_schedules"):
            name = bytes(key).decode()
            super().put_schedule(name, msgpack.unpackb(bytes(data)))
        self._seq = self._stored_seq = seq
        self.stats.record_writes = 0
        MemoryJournal.commit(self)  # counts the bytes; not a commit of ours
        self.stats.commits = 0

    def _begin_life(self) -> None:
        """Count this open as a new life (rule 8), committed at once (fenced)."""
        with self._conn.transaction():
            self._fence()
            rows = self._conn.execute(
                "SELECT key, value FROM zb_meta WHERE key IN ('life', 'crashes', 'clean') "
                "FOR UPDATE"
            ).fetchall()
            meta = {str(k): int(v) for k, v in rows}
            life = meta.get("life", 0) + 1
            crashes = meta.get("crashes", 0)
            crashed = life > 1 and not meta.get("clean", 0)
            if crashed:
                crashes += 1
            for key, value in (("life", life), ("crashes", crashes), ("clean", 0)):
                self._conn.execute(_META_UPSERT, (key, value))
        self.life, self.crashed, self.crashes = life, crashed, crashes

    def _fence(self) -> None:
        if self.lease is not None:
            self._conn.execute("SELECT zb_fence(%s::int8)", (self.lease.epoch,))

    # ----------------------------------------------------------------- writes

    def put(self, record: TaskRecord, payload: Sequence[bytes] | None = None) -> None:
        task_id = record.id
        new = task_id not in self._records
        super().put(record, payload)
        self._rows[task_id] = (_row(record), self._records[task_id])
        self._end_hold(task_id)
        self._to_write = True
        if payload is not None or new:
            self._payloads_changed.add(task_id)

    def hold(self, record: TaskRecord) -> None:
        super().hold(record)
        task_id = record.id
        self._touch_held(task_id)
        self._held[task_id] = self._records[task_id]

    def _touch_held(self, task_id: str) -> None:
        """Remember what `task_id` held before the open pass first changed it."""
        if task_id not in self._held_undo:
            self._held_undo[task_id] = self._held.get(task_id)

    def _end_hold(self, task_id: str) -> bytes | None:
        """End the hold of `task_id` (if any): the packed record it held."""
        if task_id not in self._held:
            return None
        self._touch_held(task_id)
        return self._held.pop(task_id)

    def put_result(self, task_id: str, frames: Sequence[bytes]) -> None:
        super().put_result(task_id, frames)
        self._results_changed.add(task_id)
        self._to_write = True

    def put_chunks(self, task_id: str, offset: int, attempt: int, chunks: Sequence[bytes]) -> None:
        super().put_chunks(task_id, offset, attempt, chunks)
        if not chunks:
            return
        held = self._end_hold(task_id)
        if held is not None:  # never chunks without their attempt's record
            self._rows[task_id] = (_row(unpack_record(task_id, held)), held)
            self.stats.record_writes += 1
        self._to_write = True
        offsets = self._chunks_changed.get(task_id)
        if offsets is None:
            offsets = self._chunks_changed[task_id] = set()
        offsets.update(range(offset, offset + len(chunks)))

    def delete(self, task_id: str) -> None:
        if task_id not in self._records:
            self._check_open()
            return
        super().delete(task_id)
        self._deleted.add(task_id)
        self._rows.pop(task_id, None)
        self._end_hold(task_id)
        self._to_write = True
        self._payloads_changed.discard(task_id)
        self._results_changed.discard(task_id)
        self._chunks_changed.pop(task_id, None)
        self._edges_changed.discard(task_id)

    def add_dependent(self, task_id: str, dependent_id: str) -> None:
        super().add_dependent(task_id, dependent_id)
        self._edges_changed.add(task_id)
        self._to_write = True

    def drop_dependents(self, task_id: str) -> None:
        super().drop_dependents(task_id)
        self._edges_changed.add(task_id)
        self._to_write = True

    def put_service_options(self, service: str, options: Mapping[str, Any]) -> None:
        super().put_service_options(service, options)
        self._options_changed.add(service)
        self._to_write = True

    def put_schedule(self, name: str, data: Mapping[str, Any]) -> None:
        super().put_schedule(name, data)
        self._schedules_changed.add(name)
        self._to_write = True

    def delete_schedule(self, name: str) -> None:
        super().delete_schedule(name)
        self._schedules_changed.add(name)
        self._to_write = True

    def commit(self) -> None:
        self._check_open()
        lease = self.lease
        if lease is not None and not lease.fresh():
            self._fail("the lease was not renewed within its term: stepping down")
        if not self._dirty:
            return
        if not self._to_write:
            MemoryJournal.commit(self)  # holds only: nothing for the database
            self._held_undo.clear()
            return
        started = time.perf_counter()
        try:
            with self._conn.pipeline(), self._conn.transaction():
                self._fence()
                self._write_pass()
        except psycopg.Error as exc:
            if getattr(exc, "sqlstate", None) == FENCED_SQLSTATE:
                self._fail(f"{exc.diag.message_primary or exc}", fenced=True)
            self._fail(f"commit to PostgreSQL failed: {exc}")
        self._clear_pass()
        elapsed = time.perf_counter() - started
        MemoryJournal.commit(self)  # counts the commit and the bytes in use
        self.stats.commit_seconds_total += elapsed
        self.stats.last_commit_seconds = elapsed
        if self.durability is Durability.SYNC:
            self.stats.flushes += 1

    def _write_pass(self) -> None:
        cur = self._conn.cursor(binary=True)
        if self._deleted:
            gone = list(self._deleted)
            for statement in _DELETES:
                cur.execute(statement, (gone,))
        if self._rows:
            _upsert_tasks(cur, self._rows.values())
        for changed, frames_of, upsert in (
            (self._payloads_changed, self._payloads, _PAYLOADS_UPSERT),
            (self._results_changed, self._results, _RESULTS_UPSERT),
        ):
            if changed:
                self._upsert_frames(cur, upsert, [t for t in changed if t in frames_of], frames_of)
        if self._chunks_changed:
            self._write_chunks(cur)
        if self._edges_changed:
            self._write_edges(cur)
        for service in self._options_changed:
            options = self._options.get(service)
            self._write_named(cur, "zb_service_options", service, options)
        for name in self._schedules_changed:
            self._write_named(cur, "zb_schedules", name, self._schedules.get(name))
        if self._seq > self._stored_seq:
            cur.execute(_META_UPSERT, ("seq", self._seq))

    def _upsert_frames(
        self,
        cur: psycopg.Cursor[Any],
        upsert: str,
        ids: list[str],
        frames_of: dict[str, tuple[bytes, ...]],
    ) -> None:
        pack = self._packer.frames
        frames = [frames_of[t] for t in ids]
        cur.execute(upsert, (ids, [pack(f) for f in frames], [sum(map(len, f)) for f in frames]))

    def _write_chunks(self, cur: psycopg.Cursor[Any]) -> None:
        chunks: list[tuple[str, int, int, bytes]] = []
        for task_id, offsets in self._chunks_changed.items():
            stream = self._streams.get(task_id, {})
            for offset in sorted(offsets):
                entry = stream.get(offset)
                if entry is not None:
                    chunks.append((task_id, offset, entry[0], entry[1]))
        if chunks:
            cur.executemany(_CHUNK_UPSERT, chunks)

    def _write_edges(self, cur: psycopg.Cursor[Any]) -> None:
        changed = list(self._edges_changed)
        cur.execute(_DELETES[4], (changed,))
        edges = [(t, dependent) for t in changed for dependent in self._dependents.get(t, {})]
        if edges:
            cur.executemany("INSERT INTO zb_edges VALUES (%s, %s)", edges)

    @staticmethod
    def _write_named(cur: psycopg.Cursor[Any], table: str, name: str, value: Any) -> None:
        """Upsert the msgpack `value` (packed already, or not) of `name` in `table`
        (zb_service_options or zb_schedules), or delete it for None."""
        key, column = _NAMED[table]
        raw = name.encode()
        if value is None:
            cur.execute(f"DELETE FROM {table} WHERE {key} = %s", (raw,))
            return
        packed = value if isinstance(value, bytes) else msgpack.packb(value, use_bin_type=True)
        cur.execute(
            f"INSERT INTO {table} VALUES (%s, %s, %s) ON CONFLICT ({key})"
            f" DO UPDATE SET {column} = EXCLUDED.{column}",
            (raw, _text(name), packed),
        )

    def _clear_pass(self) -> None:
        self._to_write = False
        self._held_undo.clear()
        self._stored_seq = max(self._stored_seq, self._seq)
        self._rows.clear()
        self._deleted.clear()
        self._payloads_changed.clear()
        self._results_changed.clear()
        self._chunks_changed.clear()
        self._edges_changed.clear()
        self._options_changed.clear()
        self._schedules_changed.clear()

    def _fail(self, why: str, fenced: bool = False) -> NoReturn:
        """Refuse this call and every later one: the copy in memory is no longer
        what the database holds."""
        self._failed = why
        if fenced or (self.lease is not None and not self.lease.fresh()):
            raise Fenced(why)
        raise JournalError(why)

    def close(self) -> None:
        """Write the held records and mark the life as ended cleanly, unless the store
        failed or the lease is gone; discard the rest of the pass."""
        if self._closed:
            return
        try:
            lease = self.lease
            usable = self._failed is None and not self._conn.broken
            if usable and (lease is None or lease.fresh()):
                with self._conn.pipeline(), self._conn.transaction():
                    self._fence()
                    cur = self._conn.cursor(binary=True)
                    held = self._committed_holds()
                    if held:
                        rows = [(_row(unpack_record(t, r)), r) for t, r in held.items()]
                        _upsert_tasks(cur, rows)
                        self.stats.record_writes += len(rows)
                    cur.execute(_META_UPSERT, ("seq", max(self._seq, self._stored_seq)))
                    cur.execute(_META_UPSERT, ("clean", 1))
        except psycopg.Error:
            pass  # not marked clean: the next open counts a crash, which is the truth
        finally:
            self._conn.close()
            self._held.clear()
            self._held_undo.clear()
            super().close()

    def _committed_holds(self) -> dict[str, bytes]:
        """The holds as the last commit left them (the open pass's changes undone)."""
        held = dict(self._held)
        for task_id, before in self._held_undo.items():
            if before is None:
                held.pop(task_id, None)
            else:
                held[task_id] = before
        return held

    # ------------------------------------------------------------------ checks

    def verify(self) -> list[str]:
        """What differs between the database and the copy in memory, as of the last
        commit (held records excepted: they are in memory only): [] when they agree.
        Reads every table: for tests and `zbroker doctor`-like checks, not the loop."""
        self._check_open()
        problems: list[str] = []
        cur = self._conn.cursor(binary=True)
        records = {str(i): bytes(r) for i, r in cur.execute("SELECT id, record FROM zb_tasks")}
        mine = {i: r for i, r in self._records.items() if i not in self._held}
        held_in_db = [i for i in self._held if i not in records]
        problems += [f"held task {i} has no committed record" for i in held_in_db]
        for task_id in sorted(set(records) ^ set(self._records)):
            where = "the database" if task_id in records else "memory"
            problems.append(f"task {task_id} only in {where}")
        for task_id, packed in mine.items():
            if task_id in records and records[task_id] != packed:
                problems.append(f"task {task_id}: the record differs")
        tables: tuple[tuple[str, str, dict[str, tuple[bytes, ...]]], ...] = (
            ("payload", "SELECT task_id, frames FROM zb_payloads", self._payloads),
            ("result", "SELECT task_id, frames FROM zb_results", self._results),
        )
        for what, query, held_frames in tables:
            stored = {str(i): tuple(unpack_frames(bytes(fr))) for i, fr in cur.execute(query)}
            if stored != held_frames:
                problems.append(f"the {what}s differ")
        chunks: dict[str, dict[int, tuple[int, bytes]]] = {}
        for task_id, offset, attempt, data in cur.execute(
            'SELECT task_id, "offset", attempt, data FROM zb_chunks'
        ):
            chunks.setdefault(str(task_id), {})[int(offset)] = (int(attempt), bytes(data))
        if chunks != self._streams:
            problems.append("the streams differ")
        edges: dict[str, set[str]] = {}
        for task_id, dependent in cur.execute("SELECT task_id, dependent_id FROM zb_edges"):
            edges.setdefault(str(task_id), set()).add(str(dependent))
        if edges != {t: set(d) for t, d in self._dependents.items() if d}:
            problems.append("the dependency edges differ")
        return problems

    # ------------------------------------------------------------------ reads

    def _check_open(self) -> None:
        if self._failed is not None:
            raise JournalError(f"the journal stopped after a failure: {self._failed}")
        super()._check_open()
