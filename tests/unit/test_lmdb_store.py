"""LmdbJournal beyond the shared contract: map growth, schema, locking, crash consistency.

The contract itself (every read and write) is in tests/contract/test_journal_contract.py.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest

from tests.builds import pure_only
from zbroker.journal import (
    SCHEMA_VERSION,
    Durability,
    Journal,
    JournalError,
    JournalFull,
    LmdbJournal,
    MemoryJournal,
    SchemaMismatch,
    TaskRecord,
    TaskState,
    open_journal,
)

ROOT = Path(__file__).resolve().parents[2]
READY, DELAYED, INFLIGHT, DONE, DEAD = (
    TaskState.READY,
    TaskState.DELAYED,
    TaskState.INFLIGHT,
    TaskState.DONE,
    TaskState.DEAD,
)
KiB = 1024
MANY = 1_000_000


def open_store(opened: list[Journal], path: Path, **options: Any) -> LmdbJournal:
    options.setdefault("durability", Durability.ASYNC)
    journal = LmdbJournal(path, **options)
    opened.append(journal)
    return journal


def snapshot(journal: Journal) -> dict[str, Any]:
    """Everything the journal answers, in a form two journals can be compared by."""
    services = sorted(journal.counts())
    records = {}
    for record in journal.due(math.inf, MANY) + journal.lapsed(math.inf, MANY):
        records[record.id] = record
    for record in journal.inflight():
        records[record.id] = record
    for service in services:
        for record in journal.ready(service, MANY) + journal.dead(service, MANY):
            records[record.id] = record
    return {
        "counts": journal.counts(),
        "ready": {s: [r.id for r in journal.ready(s, MANY)] for s in services},
        "dead": {s: [r.id for r in journal.dead(s, MANY)] for s in services},
        "inflight": [r.id for r in journal.inflight()],
        "due": [r.id for r in journal.due(math.inf, MANY)],
        "lapsed": [r.id for r in journal.lapsed(math.inf, MANY)],
        "next_due_at": journal.next_due_at(),
        "records": records,
        "payloads": {i: journal.payload(i) for i in records},
        "results": {i: journal.result(i) for i in records},
        "streams": {i: (journal.chunks(i, 0, MANY, MANY), journal.stream_size(i)) for i in records},
        "keys": {
            (r.service, r.key): journal.find_key(r.service, r.key)
            for r in records.values()
            if r.key
        },
    }


def random_pass(journals: list[Journal], rng: random.Random, n: int, prefix: str) -> None:
    """The same `n` random writes (bulky payloads and stream chunks, several services)
    applied to each journal."""
    live: list[str] = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.6 or not live:
            task_id = f"{prefix}{i}"
            state = rng.choice([READY, READY, DELAYED, INFLIGHT, DEAD])
            fields: dict[str, Any] = {
                "priority": rng.randint(-3, 3),
                "not_before": rng.choice([0.0, 5.0, 9.5]),
                "expires_at": rng.choice([None, 3.0, 7.0]),
                "key": rng.choice([None, f"key-{task_id}"]),
                "headers": {"size": i},
            }
            service = f"svc-{rng.randint(0, 5)}"
            payload = [rng.randbytes(rng.randint(0, 900)), b""]
            seq = journals[0].next_seq()
            for journal in journals[1:]:
                journal.next_seq()
            for journal in journals:
                record = TaskRecord(task_id, service, state, seq, 1.0, **fields)
                journal.put(record, payload)
            live.append(task_id)
        elif roll < 0.7:
            task_id = rng.choice(live)
            chunks = [rng.randbytes(rng.randint(0, 700)) for _ in range(rng.randint(1, 4))]
            offset, attempt = rng.randint(0, 6), rng.randint(1, 3)
            for journal in journals:
                journal.put_chunks(task_id, offset, attempt, chunks)
        elif roll < 0.8:
            task_id = rng.choice(live)
            state = rng.choice(list(TaskState))
            keep_until = rng.choice([None, 4.0])
            for journal in journals:
                stored = journal.get(task_id)
                assert stored is not None
                journal.put(dataclasses.replace(stored, state=state, keep_until=keep_until))
        elif roll < 0.9:
            task_id = rng.choice(live)
            result = [rng.randbytes(rng.randint(0, 2000))]
            for journal in journals:
                journal.put_result(task_id, result)
        else:
            task_id = live.pop(rng.randrange(len(live)))
            for journal in journals:
                journal.delete(task_id)


# --------------------------------------------------------------- map growth


def test_a_pass_bigger_than_the_map_grows_it_and_loses_nothing(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a store whose map holds 16 pages, and a memory journal as the model
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB)
    model = MemoryJournal()
    opened.append(model)
    # When one pass (no commit between) writes megabytes, over many services
    random_pass([journal, model], random.Random(7), 3000, "a")
    # Then the map grew (each MapFullError replayed the whole pass) and nothing was lost
    assert journal.stats.map_size >= 2 * 1024 * KiB
    assert snapshot(journal) == snapshot(model)
    # And the pass commits, and survives a reopen, with consistent indexes and counters
    journal.commit()
    journal.close()
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB)
    assert snapshot(journal) == snapshot(model)
    assert journal.verify() == []


def test_growth_across_many_small_passes_keeps_every_commit(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a tiny map
    journal = open_store(opened, tmp_path / "j", map_size=32 * KiB)
    model = MemoryJournal()
    opened.append(model)
    rng = random.Random(11)
    # When many passes of writes are each committed
    for n in range(40):
        random_pass([journal, model], rng, 40, f"p{n}-")
        journal.commit()
    # Then the store answers like the model, before and after a reopen
    assert snapshot(journal) == snapshot(model)
    journal.close()
    journal = open_store(opened, tmp_path / "j")
    assert snapshot(journal) == snapshot(model)
    assert journal.verify() == []


def test_map_growth_replays_stream_writes(tmp_path: Path, opened: list[Journal]) -> None:
    # Given a store whose map holds 16 pages, and a memory journal as the model
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB)
    model = MemoryJournal()
    opened.append(model)
    rng = random.Random(5)
    # When one pass writes megabytes of stream entries: appended, replaced, and some
    # dropped with their task (so the replay repeats deletes of streams too)
    for n in range(60):
        seq = journal.next_seq()
        for j in (journal, model):
            j.put(TaskRecord(f"t{n}", "svc", INFLIGHT, seq, 0.0, attempt=1))
        for offset in range(0, 40, 4):
            chunks = [rng.randbytes(rng.randint(0, 1500)) for _ in range(4)]
            for j in (journal, model):
                j.put_chunks(f"t{n}", offset, 1, chunks)
        replaced, at = [rng.randbytes(300)], rng.randrange(40)
        for j in (journal, model):
            j.put_chunks(f"t{n}", at, 2, replaced)
        if n % 7 == 3:
            for j in (journal, model):
                j.delete(f"t{n - 1}")
    # Then the map grew (each MapFullError replayed the whole pass) and nothing was lost
    assert journal.stats.map_size >= 2 * 1024 * KiB
    streams = {f"t{n}": model.chunks(f"t{n}", 0, MANY, MANY) for n in range(60)}
    sizes = {f"t{n}": model.stream_size(f"t{n}") for n in range(60)}
    assert {i: journal.chunks(i, 0, MANY, MANY) for i in streams} == streams
    assert {i: journal.stream_size(i) for i in sizes} == sizes
    assert snapshot(journal) == snapshot(model)
    # And the pass commits, and survives a reopen, with no stray entry
    journal.commit()
    journal.close()
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB)
    assert {i: journal.chunks(i, 0, MANY, MANY) for i in streams} == streams
    assert {i: journal.stream_size(i) for i in sizes} == sizes
    assert journal.verify() == []


def test_journal_full_in_put_chunks_leaves_the_last_commit(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a store that may grow to 256 KiB, with a committed stream
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB, max_map_size=256 * KiB)
    journal.put(TaskRecord("t-1", "svc", INFLIGHT, journal.next_seq(), 0.0, attempt=1))
    journal.put_chunks("t-1", 0, 1, [b"kept"])
    journal.commit()
    # When a pass writes a small entry, then more than 256 KiB of them
    journal.put_chunks("t-1", 0, 2, [b"replaced"])
    with pytest.raises(JournalFull, match="discarded"):
        for n in range(1000):
            journal.put_chunks("t-1", 1 + n, 1, [b"x" * 1000])
    # Then the whole pass is gone: the stream reads as committed
    assert journal.chunks("t-1", 0, MANY, MANY) == [(1, b"kept")]
    assert journal.stream_size("t-1") == (1, 4)
    journal.close()
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB, max_map_size=256 * KiB)
    assert journal.chunks("t-1", 0, MANY, MANY) == [(1, b"kept")]
    assert journal.verify() == []


def test_beyond_max_map_size_journal_full_leaves_the_last_commit(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a store that may grow to 256 KiB, with 3 committed tasks
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB, max_map_size=256 * KiB)
    for n in range(3):
        journal.put(TaskRecord(f"kept{n}", "svc", READY, journal.next_seq(), 0.0), [b"k"])
    journal.commit()
    before = snapshot(journal)
    # When a pass writes more than 256 KiB
    with pytest.raises(JournalFull, match="max_map_size") as full:
        for n in range(1000):
            task = TaskRecord(f"lost{n}", "new-svc", READY, journal.next_seq(), 0.0)
            journal.put(task, [b"x" * 1000])
    # Then the error says what happened, and the journal reads as of the last commit
    assert "discarded" in str(full.value)
    assert snapshot(journal) == before
    assert journal.counts() == {"svc": {READY: 3}}
    # And it still works for writes that fit, also after a reopen
    journal.put(TaskRecord("small", "svc", READY, journal.next_seq(), 0.0), [b"s"])
    journal.commit()
    journal.close()
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB, max_map_size=256 * KiB)
    assert [r.id for r in journal.ready("svc", 10)] == ["kept0", "kept1", "kept2", "small"]
    assert journal.ready("new-svc", 10) == []
    assert journal.verify() == []


@pure_only
def test_a_full_map_at_commit_grows_and_the_pass_still_commits(
    tmp_path: Path, opened: list[Journal], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a pass of writes, and a commit whose first attempt meets a full map
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB)
    for n in range(5):
        journal.put(TaskRecord(f"t{n}", "svc", READY, journal.next_seq(), 0.0), [b"p"])
    write_meta = journal._write_meta
    failures = []

    def full_once(txn: Any) -> None:
        if not failures:
            failures.append(1)
            raise lmdb.MapFullError("simulated")
        write_meta(txn)

    monkeypatch.setattr(journal, "_write_meta", full_once)
    # When it commits
    journal.commit()
    # Then the map grew, the pass was replayed and committed whole
    assert failures == [1]
    assert journal.stats.map_size == 128 * KiB
    journal.close()
    journal = open_store(opened, tmp_path / "j")
    assert journal.counts() == {"svc": {READY: 5}}
    assert journal.verify() == []


@pure_only
def test_a_failed_write_discards_the_pass_and_says_so(
    tmp_path: Path, opened: list[Journal], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a committed task and a pass of two more writes
    journal = open_store(opened, tmp_path / "j")
    journal.put(TaskRecord("kept", "svc", READY, journal.next_seq(), 0.0))
    journal.commit()
    journal.put(TaskRecord("lost", "svc", READY, journal.next_seq(), 0.0))
    apply = journal._apply

    def disk_error(txn: Any, op: Any, record: Any = None) -> None:
        apply(txn, op, record)  # half done, then the disk fails
        raise lmdb.DiskError("simulated")

    monkeypatch.setattr(journal, "_apply", disk_error)
    # When the next write fails inside LMDB
    with pytest.raises(JournalError, match="simulated") as failed:
        journal.put(TaskRecord("broken", "other", DEAD, journal.next_seq(), 0.0))
    # Then the error is the journal's own, and the whole pass is gone, not half of it
    assert isinstance(failed.value.__cause__, lmdb.DiskError)
    assert [r.id for r in journal.ready("svc", 10)] == ["kept"]
    assert journal.counts() == {"svc": {READY: 1}}
    assert journal.dead("other", 10) == []
    monkeypatch.undo()
    assert journal.verify() == []


@pure_only
def test_a_failed_write_discards_the_streams_of_the_pass(
    tmp_path: Path, opened: list[Journal], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a committed stream, and a pass that appends to it, replaces an entry and
    # starts the stream of a new task
    journal = open_store(opened, tmp_path / "j")
    journal.put(TaskRecord("kept", "svc", INFLIGHT, journal.next_seq(), 0.0, attempt=1))
    journal.put_chunks("kept", 0, 1, [b"a", b"b"])
    journal.commit()
    journal.put_chunks("kept", 1, 2, [b"B", b"c"])
    journal.put(TaskRecord("lost", "svc", INFLIGHT, journal.next_seq(), 0.0, attempt=1))
    journal.put_chunks("lost", 0, 1, [b"x"])
    apply = journal._apply

    def disk_error(txn: Any, op: Any, record: Any = None) -> None:
        apply(txn, op, record)  # half done, then the disk fails
        raise lmdb.DiskError("simulated")

    monkeypatch.setattr(journal, "_apply", disk_error)
    # When the next stream write fails inside LMDB
    with pytest.raises(JournalError, match="simulated"):
        journal.put_chunks("kept", 3, 2, [b"d"])
    # Then the whole pass is gone, streams included
    monkeypatch.undo()
    assert journal.chunks("kept", 0, MANY, MANY) == [(1, b"a"), (1, b"b")]
    assert journal.stream_size("kept") == (2, 2)
    assert journal.get("lost") is None
    assert journal.chunks("lost", 0, MANY, MANY) == []
    assert journal.verify() == []
    # And the next pass starts from the last commit
    journal.put_chunks("kept", 2, 2, [b"c"])
    journal.commit()
    assert journal.chunks("kept", 0, MANY, MANY) == [(1, b"a"), (1, b"b"), (2, b"c")]


def test_reopening_with_a_smaller_map_size_keeps_the_larger_store(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a store of about a megabyte
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB)
    for n in range(300):
        journal.put(TaskRecord(f"t{n}", "svc", READY, journal.next_seq(), 0.0), [b"x" * 3000])
    journal.commit()
    journal.close()
    # When it is opened with a map smaller than its data
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB)
    # Then everything is readable and new writes fit
    assert journal.counts() == {"svc": {READY: 300}}
    assert journal.stats.map_size > journal.stats.bytes_used
    journal.put(TaskRecord("more", "svc", READY, journal.next_seq(), 0.0), [b"x" * 3000])
    journal.commit()
    assert journal.counts() == {"svc": {READY: 301}}


# ----------------------------------------------------------- schema, layout


def test_a_store_of_another_schema_version_is_refused(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a store whose meta says schema version 99
    path = tmp_path / "j"
    open_store(opened, path).close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", msgpack.packb(99), db=env.open_db(b"meta", txn=txn))
    env.close()
    # When it is opened, Then SchemaMismatch names both versions
    with pytest.raises(SchemaMismatch) as mismatch:
        LmdbJournal(path)
    assert "99" in str(mismatch.value)
    assert f"version {SCHEMA_VERSION}" in str(mismatch.value)
    # And the failed open released the store: a raw open can put the version back
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        txn.put(b"schema_version", msgpack.packb(SCHEMA_VERSION), db=meta)
    env.close()
    assert open_store(opened, path).counts() == {}


def test_an_lmdb_store_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "other"))
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else's data")
    env.close()
    with pytest.raises(SchemaMismatch, match="not a zbroker journal"):
        LmdbJournal(tmp_path / "other")


def test_lmdb_failures_surface_as_journal_errors(tmp_path: Path) -> None:
    # Given a directory whose data file is not LMDB
    path = tmp_path / "garbage"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"\x42" * 65536)
    # When it is opened, Then the foreign error is translated, with its cause kept
    with pytest.raises(JournalError) as failed:
        LmdbJournal(path)
    assert isinstance(failed.value.__cause__, lmdb.Error)


def test_a_damaged_data_file_is_a_clear_error_not_a_crash_or_an_empty_start(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a journal of a few hundred pages
    path = tmp_path / "j"
    journal = open_store(opened, path)
    for i in range(2000):
        journal.put(TaskRecord(f"t{i}", "svc", READY, journal.next_seq(), 0.0), [b"x" * 512])
    journal.commit()
    journal.close()
    data = path / "data.mdb"
    whole = data.read_bytes()
    opener = "import sys; from zbroker.journal import LmdbJournal; LmdbJournal(sys.argv[1])"
    for size, says in [
        (0, "data.mdb is empty"),
        (8192, "truncated"),
        (len(whole) // 2, "truncated"),
    ]:
        # When data.mdb is cut to `size` bytes and opened (in a child: a bus error would
        # kill the process that reads past the file's end)
        data.write_bytes(whole[:size])
        child = subprocess.run(
            [sys.executable, "-c", opener, str(path)], capture_output=True, text=True, timeout=60
        )
        # Then the open fails with a JournalError saying so
        assert child.returncode == 1, (size, child.returncode, child.stderr[-500:])
        assert "JournalError" in child.stderr and says in child.stderr, (size, child.stderr)
    # And a schema version that is not msgpack is a SchemaMismatch, not a decoder's error
    data.write_bytes(whole)
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", b"\xc1", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(SchemaMismatch, match="unreadable"):
        LmdbJournal(path)


def test_live_bytes_fall_when_records_are_deleted_near_the_limit(
    tmp_path: Path, opened: list[Journal]
) -> None:
    journal = open_store(opened, tmp_path / "j", map_size=1024 * KiB, max_map_size=1024 * KiB)
    for i in range(150):
        journal.put(TaskRecord(f"t{i}", "svc", READY, journal.next_seq(), 0.0), [b"x" * 4000])
    journal.commit()
    full = journal.stats
    assert full.bytes_max == 1024 * KiB and full.bytes_used > 512 * KiB  # past the count point
    assert 0 < full.bytes_live <= full.bytes_used
    live_before = full.bytes_live
    for i in range(150):
        journal.delete(f"t{i}")
    journal.commit()
    # The high-water mark stays; the pages in use are counted again, and are few
    assert journal.stats.bytes_used >= live_before
    assert journal.stats.bytes_live < live_before // 4


def test_the_layout_is_named_databases_and_msgpack_records(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a committed task
    journal = open_store(opened, tmp_path / "j")
    journal.put(TaskRecord("t-1", "svc", DEAD, journal.next_seq(), 5.0, priority=2), [b"p"])
    journal.commit()
    journal.close()
    # Then the store has the documented named databases, and the record is a msgpack
    # array with the state as an int
    env = lmdb.open(str(tmp_path / "j"), max_dbs=16, readonly=True)
    try:
        with env.begin() as txn:
            names = {key for key, _ in txn.cursor()}
            tasks = env.open_db(b"tasks", txn=txn, create=False)
            record = msgpack.unpackb(txn.get(b"t-1", db=tasks))
            payloads = env.open_db(b"payloads", txn=txn, create=False)
            payload = msgpack.unpackb(txn.get(b"t-1", db=payloads))
    finally:
        env.close()
    assert names == {
        b"meta",
        b"tasks",
        b"payloads",
        b"results",
        b"keys",
        b"ready",
        b"delayed",
        b"lapse",
        b"inflight",
        b"dead",
        b"chunks",
        b"blocked",
        b"dependents",
        b"schedules",
    }
    assert record[:5] == ["svc", int(DEAD), 1, 5.0, 2]
    assert payload == [b"p"]


def test_counts_come_from_stored_counters_not_a_scan(tmp_path: Path, opened: list[Journal]) -> None:
    # Given a committed store whose READY counter was tampered with on disk
    path = tmp_path / "j"
    journal = open_store(opened, path)
    for n in range(3):
        journal.put(TaskRecord(f"t{n}", "svc", READY, journal.next_seq(), 0.0))
    journal.commit()
    journal.close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        count_keys = [k for k, _ in txn.cursor(db=meta) if k.startswith(b"count/")]
        assert len(count_keys) == 1
        txn.put(count_keys[0], (42).to_bytes(8, "big"), db=meta)
    env.close()
    # When it is reopened
    journal = open_store(opened, path)
    # Then counts() reports the stored counter (open did not scan the tasks)
    assert journal.counts() == {"svc": {READY: 42}}
    # And verify(), which does scan, finds the difference
    assert any("counters" in problem for problem in journal.verify())


def test_verify_reports_an_index_entry_that_went_missing(
    tmp_path: Path, opened: list[Journal]
) -> None:
    path = tmp_path / "j"
    journal = open_store(opened, path)
    journal.put(TaskRecord("t-1", "svc", READY, journal.next_seq(), 0.0))
    journal.commit()
    assert journal.verify() == []
    journal.close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"ready", txn=txn, dupsort=True), delete=False)
    env.close()
    journal = open_store(opened, path)
    assert [p for p in journal.verify() if p.startswith("ready: missing entry")]


def test_verify_reports_a_stream_entry_of_an_unknown_task(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a store with a stream, and an entry written (outside the journal) under the
    # key of a task that has no record, and one whose key is not of the layout
    path = tmp_path / "j"
    journal = open_store(opened, path)
    journal.put(TaskRecord("t-1", "svc", INFLIGHT, journal.next_seq(), 0.0, attempt=1))
    journal.put_chunks("t-1", 0, 1, [b"fine"])
    journal.commit()
    assert journal.verify() == []
    journal.close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        chunks = env.open_db(b"chunks", txn=txn)
        key = len(b"ghost").to_bytes(2, "big") + b"ghost" + (3).to_bytes(8, "big")
        txn.put(key, (1).to_bytes(4, "big") + b"boo", db=chunks)
        txn.put(b"\x00\x09short", b"", db=chunks)
    env.close()
    # When it is verified, Then both are reported, and nothing else
    journal = open_store(opened, path)
    assert journal.verify() == [
        "chunks: entry 3 of unknown task ghost",
        "chunks: malformed entry " + b"\x00\x09short".hex(),
    ]
    # And the journal's own reads are not confused by them
    assert journal.chunks("t-1", 0, MANY, MANY) == [(1, b"fine")]
    assert journal.chunks("ghost", 3, MANY, MANY) == [(1, b"boo")]


def test_a_store_from_before_streams_opens_and_reads_its_records(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a store with no chunks database, and a record in the 18-field form
    path = tmp_path / "j"
    journal = open_store(opened, path)
    old = TaskRecord("t-1", "svc", INFLIGHT, journal.next_seq(), 0.0, attempt=1, owner="al")
    journal.put(old, [b"p"])
    journal.commit()
    journal.close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"chunks", txn=txn), delete=True)
        stored = msgpack.unpackb(txn.get(b"t-1", db=env.open_db(b"tasks", txn=txn)))
        names = {key for key, _ in txn.cursor()}
    env.close()
    assert b"chunks" not in names
    assert len(stored) == 18
    # When it is opened, Then the record reads back with an empty stream
    journal = open_store(opened, path)
    assert journal.get("t-1") == old
    assert journal.chunks("t-1", 0, MANY, MANY) == []
    assert journal.stream_size("t-1") == (0, 0)
    assert journal.verify() == []
    # And streams work from then on
    journal.put_chunks("t-1", 0, 1, [b"s"])
    journal.put(dataclasses.replace(old, stream_chunks=1, stream_bytes=1))
    journal.commit()
    journal.close()
    journal = open_store(opened, path)
    assert journal.chunks("t-1", 0, MANY, MANY) == [(1, b"s")]
    got = journal.get("t-1")
    assert got is not None and (got.stream_chunks, got.stream_bytes) == (1, 1)
    assert journal.verify() == []


# --------------------------------------------------- options, locks, stats


def test_memory_durability_is_not_an_lmdb_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MemoryJournal"):
        LmdbJournal(tmp_path / "j", Durability.MEMORY)


@pytest.mark.parametrize("durability,syncs", [(Durability.SYNC, True), (Durability.ASYNC, False)])
def test_durability_sets_lmdb_sync(
    tmp_path: Path, opened: list[Journal], durability: Durability, syncs: bool
) -> None:
    journal = open_store(opened, tmp_path / "j", durability=durability)
    assert journal.durability is durability
    flags = journal._env.flags()  # type: ignore[union-attr]
    # The meta page is never flushed on its own: sync's next commit (or settle) does it.
    assert (flags["sync"], flags["metasync"]) == (syncs, False)


def test_a_store_opens_only_once_at_a_time(tmp_path: Path, opened: list[Journal]) -> None:
    # Given an open store
    first = open_store(opened, tmp_path / "j")
    # When it is opened a second time, Then that is refused
    with pytest.raises(JournalError, match="in use"):
        LmdbJournal(tmp_path / "j")
    # And once the first is closed, it opens
    first.close()
    assert open_store(opened, tmp_path / "j").counts() == {}


def test_the_directory_is_created(tmp_path: Path, opened: list[Journal]) -> None:
    open_store(opened, tmp_path / "a" / "b" / "j")
    assert (tmp_path / "a" / "b" / "j" / "data.mdb").is_file()


def test_stats_report_commits_and_space(tmp_path: Path, opened: list[Journal]) -> None:
    journal = open_store(opened, tmp_path / "j", map_size=1024 * KiB)
    journal.commit()  # nothing to write: not a commit
    assert journal.stats.commits == 0
    for n in range(3):
        journal.put(TaskRecord(f"t{n}", "svc", READY, journal.next_seq(), 0.0), [b"x" * 5000])
        journal.commit()
    stats = journal.stats
    assert stats.commits == 3
    assert 0 < stats.last_commit_seconds <= stats.commit_seconds_total
    assert 15_000 < stats.bytes_used < stats.map_size == 1024 * KiB
    assert stats.bytes_used % 4096 == 0


def test_open_journal_picks_the_store(tmp_path: Path, opened: list[Journal]) -> None:
    memory = open_journal(Durability.MEMORY, None)
    opened.append(memory)
    assert isinstance(memory, MemoryJournal)
    lmdb_journal = open_journal(Durability.SYNC, tmp_path, map_size=1024 * KiB)
    opened.append(lmdb_journal)
    assert isinstance(lmdb_journal, LmdbJournal)
    assert lmdb_journal.path == tmp_path / "journal"
    assert lmdb_journal.durability is Durability.SYNC
    assert lmdb_journal.stats.map_size == 1024 * KiB
    with pytest.raises(ValueError, match="data directory"):
        open_journal(Durability.ASYNC, None)
    with pytest.raises(TypeError, match="mapsize"):
        open_journal(Durability.MEMORY, None, mapsize=1)


def test_a_commit_holding_only_sequence_numbers_persists_them(
    tmp_path: Path, opened: list[Journal]
) -> None:
    journal = open_store(opened, tmp_path / "j")
    handed_out = [journal.next_seq() for _ in range(5)]
    journal.commit()
    journal.close()
    journal = open_store(opened, tmp_path / "j")
    assert journal.next_seq() > max(handed_out)


# ---------------------------------------------------------------- crashes

CRASH_AFTER_UNCOMMITTED = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from zbroker.journal import Durability, LmdbJournal, TaskRecord, TaskState

    journal = LmdbJournal(Path(sys.argv[1]), Durability.SYNC)
    n = int(sys.argv[2])
    for i in range(n):
        task = TaskRecord(f"c{i}", "svc", TaskState.READY, journal.next_seq(), 0.0, key=f"k{i}")
        journal.put(task, [b"payload %d" % i])
    journal.put_chunks("c3", 0, 1, [b"chunk 0", b"chunk 1"])
    journal.commit()
    # Writes of the next pass, never committed: new tasks, a state change, a delete,
    # stream entries.
    for i in range(n):
        task = TaskRecord(f"u{i}", "other", TaskState.DELAYED, journal.next_seq(), 0.0)
        journal.put(task, [b"lost"])
    first = journal.get("c0")
    first.state = TaskState.INFLIGHT
    journal.put(first)
    journal.delete("c1")
    journal.put_result("c2", [b"lost result"])
    journal.put_chunks("c3", 1, 2, [b"lost chunk"])
    journal.put_chunks("c4", 0, 1, [b"lost stream"])
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_after_sigkill_exactly_the_committed_tasks_are_there(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a process that commits 200 tasks, writes more without committing, and is killed
    path = tmp_path / "j"
    child = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_UNCOMMITTED, str(path), "200"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    # When the store is opened again
    journal = open_store(opened, path)
    # Then it holds exactly the committed tasks, with their indexes and counts
    assert [r.id for r in journal.ready("svc", 1000)] == [f"c{i}" for i in range(200)]
    assert journal.counts() == {"svc": {READY: 200}}
    assert journal.inflight() == []
    assert journal.due(math.inf, 10) == []
    assert journal.ready("other", 10) == []
    assert journal.find_key("svc", "k1") == "c1"
    assert journal.payload("c1") == [b"payload 1"]
    assert journal.result("c2") is None
    assert journal.chunks("c3", 0, MANY, MANY) == [(1, b"chunk 0"), (1, b"chunk 1")]
    assert journal.chunks("c4", 0, MANY, MANY) == []
    assert journal.verify() == []
    # And new sequence numbers are above every committed one
    assert journal.next_seq() > 200


CRASH_WHILE_COMMITTING = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from zbroker.journal import Durability, LmdbJournal, TaskRecord, TaskState

    journal = LmdbJournal(Path(sys.argv[1]), Durability.SYNC)
    batch = 0
    while True:
        for i in range(50):
            seq = journal.next_seq()
            task = TaskRecord(f"b{batch}-{i}", f"s{i % 3}", TaskState.READY, seq, 0.0)
            journal.put(task, [b"x" * 200])
        for i in range(50):
            old = journal.get(f"b{batch - 1}-{i}")
            if old is not None:
                old.state = TaskState.INFLIGHT
                journal.put(old)
            journal.delete(f"b{batch - 3}-{i}")
        journal.commit()
        print(batch, flush=True)
        batch += 1
    """
)


@pytest.mark.parametrize("kill_after", [1, 7, 23])
def test_a_kill_during_commits_leaves_whole_passes_only(
    tmp_path: Path, opened: list[Journal], kill_after: int
) -> None:
    # Given a process committing pass after pass (each adds 50 tasks, starts the previous
    # pass's tasks and deletes those of three passes ago)
    path = tmp_path / "j"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_WHILE_COMMITTING, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # When it is killed once it has reported `kill_after` commits
        assert child.stdout is not None
        reported = -1
        while reported < kill_after - 1:
            line = child.stdout.readline()
            assert line, (
                f"the child stopped: {child.stderr.read().decode() if child.stderr else ''}"
            )
            reported = int(line)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    # Then the store holds the state after some whole pass, at or after the reported one
    journal = open_store(opened, path)
    assert journal.verify() == []
    present = {r.id.split("-")[0] for r in journal.inflight()}
    for service in ("s0", "s1", "s2"):
        present |= {r.id.split("-")[0] for r in journal.ready(service, MANY)}
    last = max(int(b[1:]) for b in present)
    assert last >= reported
    expected_ready = {f"b{last}-{i}" for i in range(50)}
    expected_inflight = {f"b{b}-{i}" for b in (last - 1, last - 2) if b >= 0 for i in range(50)}
    ready = {r.id for s in ("s0", "s1", "s2") for r in journal.ready(s, MANY)}
    assert ready == expected_ready
    assert {r.id for r in journal.inflight()} == expected_inflight
    total = sum(n for per in journal.counts().values() for n in per.values())
    assert total == len(expected_ready) + len(expected_inflight)


def test_the_journal_may_hold_no_more_than_its_device_has_room_for(tmp_path: Path) -> None:
    # Given a store allowed far more than any disk here holds
    journal = LmdbJournal(tmp_path / "j", Durability.ASYNC, max_map_size=1 << 50)
    try:
        journal.put(TaskRecord(id="t1", service="s", state=TaskState.READY, seq=1, created_at=0.0))
        journal.commit()
        # Then the most it reports it may hold is what it uses plus the device's free space
        # (so enqueues are refused before the disk fills, instead of a commit failing)
        stats = journal.stats
        free = shutil.disk_usage(tmp_path).free
        assert stats.bytes_max < 1 << 50
        assert abs(stats.bytes_max - (stats.bytes_used + free)) < 64 << 20  # other writers
    finally:
        journal.close()


# ------------------------------------------------- recurring tasks (schedules)


def test_schedule_writes_are_replayed_when_the_map_grows(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a store whose map holds 16 pages
    journal = open_store(opened, tmp_path / "j", map_size=64 * KiB)
    journal.put_schedule("before", {"n": 1})
    journal.commit()
    # When one pass writes schedules around more than the map holds
    journal.put_schedule("first", {"n": 2})
    for i in range(50):
        journal.put(TaskRecord(f"t-{i}", "svc", READY, journal.next_seq(), 1.0), [b"x" * 4096])
    journal.put_schedule("last", {"payload": [b"y" * 100_000]})
    journal.delete_schedule("before")
    # Then the map grew, the pass was replayed whole, and it commits and survives a reopen
    assert journal.stats.map_size > 64 * KiB
    journal.commit()
    journal.close()
    journal = open_store(opened, tmp_path / "j")
    assert journal.schedules() == {"first": {"n": 2}, "last": {"payload": [b"y" * 100_000]}}
    assert journal.counts() == {"svc": {READY: 50}}


# ------------------------------------------------------- one flush per commit


def put_one(journal: Journal, task_id: str) -> None:
    journal.put(TaskRecord(task_id, "svc", READY, journal.next_seq(), created_at=1.0), [b"x"])


def test_a_sync_commit_is_durable_once_the_next_flush_carries_its_meta_page(
    tmp_path: Path, opened: list[Journal]
) -> None:
    # Given a sync store (LMDB flushes a commit's pages; its meta page, with the next)
    journal = open_store(opened, tmp_path / "j", durability=Durability.SYNC)
    base = journal.stats.commits
    # When a pass commits, Then it is committed but not yet counted durable
    put_one(journal, "a")
    journal.commit()
    assert journal.stats.commits == base + 1
    assert journal.durable_commits() == base
    # When the next pass commits, Then its flush made the first durable, not itself
    put_one(journal, "b")
    journal.commit()
    assert journal.durable_commits() == base + 1
    # When the store is settled, Then every commit is durable
    flushes = journal.stats.flushes
    journal.settle()
    assert journal.durable_commits() == journal.stats.commits == base + 2
    journal.settle()  # nothing deferred: nothing to do
    assert journal.durable_commits() == base + 2
    assert journal.stats.flushes == flushes + 1
    # And a commit with nothing to write changes nothing
    journal.commit()
    assert journal.durable_commits() == journal.stats.commits


@pytest.mark.parametrize("durability", [Durability.ASYNC, None])
def test_stores_that_defer_no_flush_count_every_commit_durable(
    tmp_path: Path, opened: list[Journal], durability: Durability | None
) -> None:
    if durability is None:
        journal: Journal = MemoryJournal()
        opened.append(journal)
    else:
        journal = open_store(opened, tmp_path / "j", durability=durability)
    for name in "abc":
        put_one(journal, name)
        journal.commit()
        assert journal.durable_commits() == journal.stats.commits
    journal.settle()
    assert journal.durable_commits() == journal.stats.commits


def test_a_sync_store_closed_after_a_commit_keeps_it(tmp_path: Path, opened: list[Journal]) -> None:
    # Given a sync store whose last commit's meta page is not flushed
    journal = open_store(opened, tmp_path / "j", durability=Durability.SYNC)
    put_one(journal, "a")
    journal.commit()
    assert journal.durable_commits() < journal.stats.commits
    # When it is closed, Then close flushed it, and a reopen reads the task
    journal.close()
    journal = open_store(opened, tmp_path / "j", durability=Durability.SYNC)
    assert journal.get("a") is not None
