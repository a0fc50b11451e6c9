"""Held records and lives: rules 7 and 8 of the Journal contract (zbroker/journal/base.py).

A START is held, not written: every read sees it, a crash loses it, a clean close
writes it. Each open of a store is a life; a life that did not close cleanly is a
crash, counted in `crashes`, with which the core fences attempt numbers. Every
test runs on every store (the `journal` fixture); what needs a store that
outlives its object (a crash, a close) runs on LMDB and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import msgpack
import pytest

from tests.unit.crash import crash
from zbroker.journal import Durability, Journal, LmdbJournal, MemoryJournal, TaskRecord, TaskState
from zbroker.journal._codec import Packer, unpack_record
from zbroker.journal.postgres import PostgresJournal

READY, DELAYED, INFLIGHT, DONE = (
    TaskState.READY,
    TaskState.DELAYED,
    TaskState.INFLIGHT,
    TaskState.DONE,
)


@pytest.fixture(params=["lmdb", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a durable store lives: an LMDB directory, or a PostgreSQL URL."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return tmp_path / "store"


def open_store(opened: list[Journal], where: Path | str) -> Journal:
    journal: Journal
    if isinstance(where, str):
        journal = PostgresJournal(where, Durability.ASYNC)
    else:
        journal = LmdbJournal(where, Durability.ASYNC)
    opened.append(journal)
    return journal


def stored(journal: Journal, task_id: str = "t1", **fields: object) -> TaskRecord:
    """A READY task, put and committed."""
    record = TaskRecord(task_id, "svc", READY, journal.next_seq(), 100.0, **fields)  # type: ignore[arg-type]
    journal.put(record, [b"payload"])
    journal.commit()
    return record


def started(record: TaskRecord) -> TaskRecord:
    """The record as the core holds it at a START: INFLIGHT, the next attempt."""
    return dataclasses.replace(record, state=INFLIGHT, attempt=record.attempt + 1, expires_at=None)


# ------------------------------------------------------------- every read sees a hold


def test_a_held_record_reads_inflight_everywhere(journal: Journal) -> None:
    # Given a READY task with a key and a ttl, and another one behind it
    first = stored(journal, "t1", key="k1", expires_at=50.0)
    stored(journal, "t2")
    # When its start is held
    journal.hold(started(first))
    # Then get and inflight() show it INFLIGHT with its new attempt
    got = journal.get("t1")
    assert got is not None and (got.state, got.attempt) == (INFLIGHT, 1)
    assert [(r.id, r.attempt) for r in journal.inflight()] == [("t1", 1)]
    # And no scan by state finds it any more: not ready, not oldest, not lapsed
    assert [r.id for r in journal.ready("svc", 10)] == ["t2"]
    oldest = journal.oldest_ready("svc")
    assert oldest is not None and oldest.id == "t2"
    assert journal.lapsed(math.inf, 10) == []
    # And the counts moved it from ready to in flight
    assert journal.counts() == {"svc": {READY: 1, INFLIGHT: 1}}
    # And what does not depend on its state is as before
    assert journal.find_key("svc", "k1") == "t1"
    assert journal.payload("t1") == [b"payload"]


def test_a_put_ends_a_hold(journal: Journal) -> None:
    # Given a held start
    record = stored(journal)
    live = started(record)
    journal.hold(live)
    journal.commit()
    # When the attempt is put back in the queue (a requeue), Then it is ready again
    journal.put(dataclasses.replace(live, state=READY))
    assert [(r.id, r.attempt) for r in journal.ready("svc", 10)] == [("t1", 1)]
    assert journal.inflight() == []
    assert journal.counts() == {"svc": {READY: 1}}
    # When it is held again and then ends DONE
    again = started(dataclasses.replace(live, state=READY))
    journal.hold(again)
    journal.put(dataclasses.replace(again, state=DONE, keep_until=500.0))
    journal.commit()
    # Then it reads DONE everywhere, and its retention lapses as a DONE one
    got = journal.get("t1")
    assert got is not None and (got.state, got.attempt) == (DONE, 2)
    assert journal.ready("svc", 10) == [] and journal.inflight() == []
    assert journal.counts() == {"svc": {DONE: 1}}
    assert [r.id for r in journal.lapsed(1000.0, 10)] == ["t1"]


def test_a_delete_ends_a_hold(journal: Journal) -> None:
    record = stored(journal)
    journal.hold(started(record))
    journal.delete("t1")
    journal.commit()
    assert journal.get("t1") is None
    assert journal.inflight() == [] and journal.ready("svc", 10) == []
    assert journal.counts() == {}


def test_only_a_stored_inflight_record_is_held(journal: Journal) -> None:
    record = stored(journal)
    with pytest.raises(ValueError):
        journal.hold(record)  # READY
    with pytest.raises(KeyError):
        journal.hold(started(dataclasses.replace(record, id="nope")))


def test_a_hold_is_no_record_write(journal: Journal) -> None:
    # Given a store's count of record writes
    before = journal.stats.record_writes
    # When a task is put, held, put DONE and deleted
    record = stored(journal)
    live = started(record)
    journal.hold(live)
    journal.put(dataclasses.replace(live, state=DONE))
    journal.delete("t1")
    journal.commit()
    # Then three records writes were counted: the put, the DONE, the delete
    assert journal.stats.record_writes - before == 3


# ------------------------------------------- durable stores (LMDB, PostgreSQL): a crash


def test_a_crash_loses_the_hold_the_task_reads_as_last_put(
    where: Path | str, opened: list[Journal]
) -> None:
    # Given a task put at attempt 2 (after a requeue), whose third start is held
    journal = open_store(opened, where)
    record = stored(journal, attempt=2, key="k")
    journal.hold(started(record))
    journal.commit()
    # When the process dies
    journal = crash(journal)
    opened.append(journal)
    # Then the task is READY again with attempt 2, found by every READY read
    got = journal.get("t1")
    assert got is not None and (got.state, got.attempt) == (READY, 2)
    assert [r.id for r in journal.ready("svc", 10)] == ["t1"]
    assert journal.inflight() == []
    assert journal.counts() == {"svc": {READY: 1}}
    assert journal.verify() == []
    # And the store knows its last life crashed
    assert (journal.life, journal.crashed, journal.crashes) == (2, True, 1)


def test_a_clean_close_writes_what_is_held(where: Path | str, opened: list[Journal]) -> None:
    # Given a held start, committed
    journal = open_store(opened, where)
    journal.hold(started(stored(journal)))
    journal.commit()
    writes = journal.stats.record_writes
    # When the store is closed and opened again
    journal.close()
    assert journal.stats.record_writes == writes + 1  # the held record, written
    journal = open_store(opened, where)
    # Then the task is INFLIGHT, as a start written at once would have left it
    assert [(r.id, r.state, r.attempt) for r in journal.inflight()] == [("t1", INFLIGHT, 1)]
    assert journal.ready("svc", 10) == []
    assert journal.counts() == {"svc": {INFLIGHT: 1}}
    assert journal.verify() == []
    assert (journal.life, journal.crashed, journal.crashes) == (2, False, 0)


def test_a_discarded_pass_takes_its_holds_and_their_ends_with_it(
    where: Path | str, opened: list[Journal]
) -> None:
    # Given t1 held in a committed pass, and t2 stored
    journal = open_store(opened, where)
    one = started(stored(journal, "t1"))
    journal.hold(one)
    two = stored(journal, "t2")
    journal.commit()
    # When a pass ends t1's hold (DONE) and holds t2, and is never committed
    journal.put(dataclasses.replace(one, state=DONE))
    journal.hold(started(two))
    journal.close()  # discards the open pass, then writes what is held
    # Then t1 is back in flight (its hold stood), t2 is as last committed
    journal = open_store(opened, where)
    assert [r.id for r in journal.inflight()] == ["t1"]
    assert [r.id for r in journal.ready("svc", 10)] == ["t2"]
    assert journal.verify() == []


def test_chunks_of_a_held_attempt_write_its_record_first(
    where: Path | str, opened: list[Journal]
) -> None:
    # Given a held start
    journal = open_store(opened, where)
    journal.hold(started(stored(journal)))
    journal.commit()
    # When its attempt appends to the task's stream, committed, and the process dies
    journal.put_chunks("t1", 0, 1, [b"a", b"b"])
    journal.commit()
    journal = crash(journal)
    opened.append(journal)
    # Then the record is INFLIGHT with the chunks' attempt: recovery counts the stream
    assert [(r.id, r.attempt) for r in journal.inflight()] == [("t1", 1)]
    assert journal.stream_size("t1") == (2, 2)


def test_lives_are_counted_and_crashes_remembered(where: Path | str, opened: list[Journal]) -> None:
    journal = open_store(opened, where)
    assert (journal.life, journal.crashed, journal.crashes) == (1, False, 0)
    journal.close()
    journal = open_store(opened, where)
    assert (journal.life, journal.crashed, journal.crashes) == (2, False, 0)
    journal = crash(journal)
    assert (journal.life, journal.crashed, journal.crashes) == (3, True, 1)
    journal = crash(journal)
    assert (journal.life, journal.crashed, journal.crashes) == (4, True, 2)
    journal.close()
    journal = open_store(opened, where)
    assert (journal.life, journal.crashed, journal.crashes) == (5, False, 2)


def test_the_memory_store_lives_once() -> None:
    journal = MemoryJournal()
    assert (journal.life, journal.crashed, journal.crashes) == (1, False, 0)


# -------------------------------------------------------------- the record's stamp


def test_a_record_keeps_its_crashes_stamp_and_the_old_layout_without_one() -> None:
    # Given a record as before stamps existed: no field for it
    record = TaskRecord("t1", "svc", READY, 1, 1.0)
    packed = Packer().record(record)
    assert len(msgpack.unpackb(packed)) == 16
    assert unpack_record("t1", packed).crashes == 0
    # When it is stamped, Then it round-trips, in 21 fields
    record.crashes = 3
    packed = Packer().record(record)
    assert len(msgpack.unpackb(packed)) == 21
    assert unpack_record("t1", packed) == record
    # And with placement options too
    record.require = ("gpu",)
    assert unpack_record("t1", Packer().record(record)) == record
