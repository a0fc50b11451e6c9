"""Attempts cut short by the broker are not charged against max_attempts.

The core against a real journal (memory and LMDB), time moved by hand; a
"restart" is a new core on the committed journal, as after `kill -9`.
"""

from __future__ import annotations

import msgpack

from tests.unit.test_core_durable import Script
from zbroker.journal import Journal, TaskRecord, TaskState
from zbroker.journal._codec import Packer, unpack_record
from zbroker.protocol import ext, zbc


def status(s: Script, task_id: str) -> dict[str, object]:
    answer = s.call(b"C", zbc.call(zbc.STATUS, s.next_rid(), id=task_id))
    assert answer.ok, answer.meta
    task: dict[str, object] = answer.meta["task"]
    return task


def test_restarts_during_its_only_attempt_never_dead_letter_a_task(journal: Journal) -> None:
    # Given a task with max_attempts=1 that a worker is running
    s = Script(journal)
    task_id = s.enqueue("svc", b"a", max_attempts=1)
    s.zready(b"W", "svc", 1)
    assert [(t[0], t[1]) for t in s.tasks_to(b"W")] == [(task_id, 1)]
    # When the broker dies twice while the task is in flight
    for attempt in (1, 2):
        s.restart(journal)
        journal.commit()
        # Then it is ready again each time, not dead
        assert s.state(task_id) is TaskState.READY
        s.zready(b"W%d" % attempt, "svc", 1)
        sent = s.tasks_to(b"W%d" % attempt)
        # And its attempt number (the fencing token) moved on
        assert [(t[0], t[1]) for t in sent] == [(task_id, attempt + 1)]
    # And STATUS says two attempts were not charged
    shown = status(s, task_id)
    assert shown["attempt"] == 3 and shown["uncharged"] == 2
    assert [h[0] for h in shown["history"]].count("recovered") == 2  # type: ignore[attr-defined]
    # When the third attempt's worker answers, the task is done
    s.send(b"W2", ext.done(task_id, 3, [b"A"]))
    assert s.state(task_id) is TaskState.DONE
    assert s.broker.stats.tasks_dead == 0 and s.broker.stats.tasks_recovered == 1


def test_a_result_of_the_attempt_the_broker_cut_short_is_refused(journal: Journal) -> None:
    # Given a task in flight when the broker died, delivered again after the restart
    s = Script(journal)
    task_id = s.enqueue("svc", max_attempts=1)
    s.zready(b"W", "svc", 1)
    s.tasks_to(b"W")
    s.restart(journal)
    s.zready(b"W", "svc", 1)  # the same worker, registered again
    assert [(t[0], t[1]) for t in s.tasks_to(b"W")] == [(task_id, 2)]
    # When the old attempt's result arrives
    s.send(b"W", ext.done(task_id, 1, [b"late"]))
    # Then it is refused, and the task still waits for attempt 2
    assert s.state(task_id) is TaskState.INFLIGHT
    assert s.broker.stats.stale_refused == 1
    s.send(b"W", ext.done(task_id, 2, [b"ok"]))
    assert s.state(task_id) is TaskState.DONE


def test_failures_are_still_charged_after_an_uncharged_attempt(journal: Journal) -> None:
    # Given a task with max_attempts=2 whose first attempt the broker cut short
    s = Script(journal)
    task_id = s.enqueue("svc", max_attempts=2)
    s.zready(b"W", "svc", 1)
    s.tasks_to(b"W")
    s.restart(journal)
    journal.commit()
    # When its next two attempts fail
    s.zready(b"W2", "svc", 1)
    assert [t[1] for t in s.tasks_to(b"W2")] == [2]
    s.send(b"W2", ext.fail(task_id, 2, "boom", delay_s=0.0))
    # (charged: 1 of 2, so it runs again at once)
    assert [t[1] for t in s.tasks_to(b"W2")] == [3]
    s.send(b"W2", ext.fail(task_id, 3, "boom again"))
    # Then the second charged failure dead-letters it, three attempts in
    assert s.state(task_id) is TaskState.DEAD
    shown = status(s, task_id)
    assert shown["attempt"] == 3 and shown["uncharged"] == 1
    # And a redrive starts its count afresh
    s.call(b"C", zbc.call(zbc.REDRIVE, s.next_rid(), service="svc", ids=[task_id]))
    record = journal.get(task_id)
    assert record is not None and (record.attempt, record.uncharged) == (1, 0)  # running again


def test_records_without_uncharged_attempts_keep_the_old_layout() -> None:
    # Given a record as the previous version stored it: a msgpack array of 16 fields
    record = TaskRecord("t1", "svc", TaskState.INFLIGHT, 1, 1.0, attempt=2, history=[["x", 1.0]])
    packed = Packer().record(record)
    assert len(msgpack.unpackb(packed)) == 16
    # When it is read, Then nothing was uncharged
    assert unpack_record("t1", packed).uncharged == 0
    # And a record with uncharged attempts round-trips with one more field
    record.uncharged = 3
    packed = Packer().record(record)
    assert len(msgpack.unpackb(packed)) == 17
    assert unpack_record("t1", packed) == record
