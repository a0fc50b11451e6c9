"""Two writes per task, and attempt numbers fenced across crashes (core/tasks.py rule 3).

A START is held by the journal, not written: a plain task costs its enqueue and its
end. After a crash (a real LMDB store dropped without a close: tests/unit/crash.py)
a task reads as it was last put, and its next start skips one attempt number per
crash since its attempts were last numbered, uncharged, so no number a worker may
quote is handed out twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.crash import crash
from tests.unit.test_core_durable import Script
from zbroker.journal import Durability, Journal, LmdbJournal, TaskState
from zbroker.journal.postgres import PostgresJournal
from zbroker.protocol import ext, zbc


@pytest.fixture(params=["lmdb", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Journal:
    if request.param == "postgres":
        return PostgresJournal(request.getfixturevalue("pg_url"), Durability.ASYNC)
    return LmdbJournal(tmp_path / "store", Durability.ASYNC)


class Restartable(Script):
    """A Script whose broker can crash (kill -9) or stop cleanly, journal and all."""

    def crash(self) -> None:
        self.journal = crash(self.journal)
        self.restart(self.journal)
        self.journal.commit()  # what recovery changed, as the runtime does

    def stop_and_start(self) -> None:
        journal = self.journal
        journal.close()
        if isinstance(journal, PostgresJournal):
            self.journal = PostgresJournal(journal.url, journal.durability)
        else:
            assert isinstance(journal, LmdbJournal)
            self.journal = LmdbJournal(journal.path, journal.durability)
        self.restart(self.journal)
        self.journal.commit()

    def status(self, task_id: str) -> dict[str, object]:
        answer = self.call(b"C", zbc.call(zbc.STATUS, self.next_rid(), id=task_id))
        assert answer.ok, answer.meta
        task: dict[str, object] = answer.meta["task"]
        return task


@pytest.fixture
def s(store: Journal) -> Iterator[Restartable]:
    script = Restartable(store)
    yield script
    script.journal.close()


def history_words(task: dict[str, object]) -> list[str]:
    return [entry[0] for entry in task["history"]]  # type: ignore[attr-defined]


def test_a_plain_task_costs_two_record_writes(journal: Journal) -> None:
    # Given a broker with a worker (on either store)
    s = Script(journal)
    s.zready(b"W", "svc", 1)
    before = journal.stats.record_writes
    # When a task without options is enqueued and done
    task_id = s.enqueue("svc", b"a")
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 1)]
    s.send(b"W", ext.done(task_id, 1, [b"A"]))
    assert s.state(task_id) is TaskState.DONE
    # Then the journal wrote its record twice: the enqueue and the DONE with its
    # result (the start was held; deleting it after retention is housekeeping)
    assert journal.stats.record_writes - before == 2
    # And STATS shows the count
    answer = s.call(b"C", zbc.call(zbc.STATS, s.next_rid()))
    assert answer.meta["journal"]["record_writes"] == journal.stats.record_writes


def test_a_task_queued_across_a_crash_skips_one_attempt_uncharged(s: Restartable) -> None:
    # Given a task enqueued with max_attempts=1, never delivered (no worker)
    task_id = s.enqueue("svc", b"a", max_attempts=1)
    # When the broker crashes and starts again
    s.crash()
    # Then its first delivery is attempt 2, one uncharged: the crashed broker may have
    # handed out attempt 1 without writing it, so 1 is never handed out again
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 2)]
    assert s.broker.stats.attempts_fenced == 1
    # And it is done, not dead: the skipped attempt was not charged
    s.send(b"W", ext.done(task_id, 2, [b"A"]))
    shown = s.status(task_id)
    assert (shown["state"], shown["attempt"], shown["uncharged"]) == ("done", 2, 1)


def test_a_task_in_flight_at_a_crash_is_numbered_as_before(s: Restartable) -> None:
    # Given a task with max_attempts=1 that a worker runs (its start only held)
    task_id = s.enqueue("svc", b"a", max_attempts=1)
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 1)]
    # When the broker crashes: the start is lost, the task reads READY at attempt 0
    s.crash()
    assert s.state(task_id) is TaskState.READY
    # Then it runs again as attempt 2 with one attempt uncharged, as when the start
    # was written (recovered INFLIGHT): a late result of attempt 1 is refused
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 2)]
    s.send(b"W", ext.done(task_id, 1, [b"late"]))
    assert s.broker.stats.stale_refused == 1
    s.send(b"W", ext.done(task_id, 2, [b"A"]))
    shown = s.status(task_id)
    assert (shown["state"], shown["attempt"], shown["uncharged"]) == ("done", 2, 1)
    # (its history has no "recovered": nothing in flight was found, a number was skipped)
    assert "recovered" not in history_words(shown)


def test_each_crash_since_the_last_numbering_skips_a_number(s: Restartable) -> None:
    # Given a task delivered as attempt 1, then (after a crash) as attempt 2
    task_id = s.enqueue("svc", b"a", max_attempts=1)
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 1)]
    s.crash()
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 2)]
    # When the broker crashes again before anything of it was written
    s.crash()
    # Then neither 1 nor 2 is handed out again: two crashes, two numbers skipped
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 3)]
    s.send(b"W", ext.done(task_id, 3, [b"A"]))
    shown = s.status(task_id)
    assert (shown["state"], shown["attempt"], shown["uncharged"]) == ("done", 3, 2)


def test_a_requeue_is_written_so_the_attempt_after_it_stays_fenced(s: Restartable) -> None:
    # Given a task whose attempt 1 was taken back (its worker went), and attempt 2 held
    task_id = s.enqueue("svc", b"a")
    s.zready(b"W1", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W1")] == [(task_id, 1)]
    s.zready(b"W2", "svc", 1)
    s.send(b"W1", ext.disconnect())
    assert [t[:2] for t in s.tasks_to(b"W2")] == [(task_id, 2)]
    # When the broker crashes
    s.crash()
    # Then the task reads as requeued (attempt 1 written), and its next attempt is 3
    shown = s.status(task_id)
    assert (shown["state"], shown["attempt"]) == ("ready", 1)
    assert history_words(shown)[-1] == "requeued"
    s.zready(b"W3", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W3")] == [(task_id, 3)]
    # And of its three attempts one is uncharged: W1's counts, W2's lost one does not
    assert s.status(task_id)["uncharged"] == 1


def test_a_clean_stop_writes_the_attempts_in_flight_and_fences_nothing(s: Restartable) -> None:
    # Given a task a worker runs, and one still queued
    running = s.enqueue("svc", b"a", max_attempts=1)
    queued = s.enqueue("svc", b"b", max_attempts=1)
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(running, 1)]
    # When the broker stops cleanly and starts again
    s.stop_and_start()
    # Then the one in flight was written at the stop and is recovered, as before holds
    shown = s.status(running)
    assert (shown["state"], shown["attempt"], shown["uncharged"]) == ("ready", 1, 1)
    assert history_words(shown)[-1] == "recovered"
    assert s.broker.stats.tasks_recovered == 1
    # And nothing is fenced: the queued task starts at attempt 1
    s.zready(b"W", "svc", 2)
    assert sorted(t[:2] for t in s.tasks_to(b"W")) == sorted([(running, 2), (queued, 1)])
    assert s.broker.stats.attempts_fenced == 0


def test_an_attempt_with_a_stream_is_recovered_with_its_chunks(s: Restartable) -> None:
    # Given a running task whose worker appended to its stream
    task_id = s.enqueue("svc", b"a", max_attempts=1)
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 1)]
    s.send(b"W", ext.chunk(task_id, 1, [b"c0", b"c1"]))
    # When the broker crashes
    s.crash()
    # Then the chunks' attempt was written with them: recovered as before holds, its
    # stream counted, and the next chunks go after the kept ones
    shown = s.status(task_id)
    assert (shown["state"], shown["attempt"], shown["uncharged"]) == ("ready", 1, 1)
    assert (shown["stream_chunks"], shown["stream_bytes"]) == (2, 4)
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 2)]
    assert s.broker.stats.attempts_fenced == 0


def test_a_started_task_with_a_ttl_never_expires_after_a_crash(s: Restartable) -> None:
    # Given a task with a ttl, started before it passed
    task_id = s.enqueue("svc", b"a", ttl_s=5.0)
    s.zready(b"W", "svc", 1)
    assert [t[:2] for t in s.tasks_to(b"W")] == [(task_id, 1)]
    # When the broker crashes and its ttl passes meanwhile
    s.crash()
    s.advance(10.0)
    # Then the task is not expired: the start that ended its ttl was written
    shown = s.status(task_id)
    assert (shown["state"], shown["attempt"]) == ("ready", 1)
    assert shown["expires_at"] is None
