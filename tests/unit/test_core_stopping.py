"""The drain of a stopping broker, in the core: a real journal, time moved by hand.

What the runtime does on the first SIGTERM (core/stopping.py `Drain`): no durable
task is delivered any more, calls are still answered, ZBW01 workers are told
(STOPPING) and MDP workers are not, and the drain is over when nothing is held
or at its deadline.
"""

from __future__ import annotations

from tests.unit.test_core_durable import Script
from zbroker.core.stopping import Drain
from zbroker.journal import Journal, TaskState
from zbroker.protocol import ext, mdp


def stopping_notices(s: Script, peer: bytes) -> list[float]:
    return [
        ext.unpack_meta(frames[4])["drain_s"]
        for frames in s.sent_to(peer)
        if frames[2:4] == [ext.ZBW01, ext.STOPPING]
    ]


def test_a_drain_delivers_nothing_and_ends_when_the_results_are_in(journal: Journal) -> None:
    # Given a ZBW01 worker holding a task, and a stock MDP worker
    s = Script(journal)
    held = s.enqueue("svc", b"a")
    s.zready(b"W", "svc", 2)
    assert [t[0] for t in s.tasks_to(b"W")] == [held]
    s.send(b"W", ext.ack([(held, 1)]))
    s.send(b"M", [b"", mdp.MDPW01, mdp.READY, b"other"])
    s.sent_to(b"M")
    # When the broker starts draining for 10 s
    drain = Drain(s.broker, s.now, 10.0)
    # Then the ZBW01 worker is told, with the time left, and the MDP worker is not
    assert stopping_notices(s, b"W") == [10.0]
    assert s.sent_to(b"M") == []
    # And a task enqueued now is stored and confirmed, but not delivered
    later = s.enqueue("svc", b"b")
    assert s.state(later) is TaskState.READY
    assert s.tasks_to(b"W") == []
    # And the drain is not over while the worker holds its task
    s.advance_alive(3.0, b"W")
    assert drain.in_flight == 1 and not drain.over(s.now)
    # When its result arrives, Then the task is done and the drain is over
    s.send(b"W", ext.done(held, 1, [b"A"]))
    assert s.state(held) is TaskState.DONE
    assert s.tasks_to(b"W") == []  # its credit is free, and still nothing is delivered
    assert drain.in_flight == 0 and drain.over(s.now)


def test_a_worker_that_registers_during_the_drain_is_told_once(journal: Journal) -> None:
    # Given a drain begun with a task waiting and no worker at all
    s = Script(journal)
    s.enqueue("svc", b"a")
    drain = Drain(s.broker, s.now, 5.0)
    # When a ZBW01 worker registers two seconds later, and the loop passes twice
    s.advance(2.0)
    s.zready(b"W", "svc", 1)
    drain.tell(s.now)
    drain.tell(s.now)
    # Then it is greeted, gets no task, and is told once how long the drain has left
    sent = s.sent_to(b"W")
    commands = [frames[3] for frames in sent]
    assert ext.TASK not in commands and commands.count(ext.HEARTBEAT) == 1
    notices = [ext.unpack_meta(f[4]) for f in sent if f[3] == ext.STOPPING]
    assert notices == [{"drain_s": 3.0}]


def test_the_deadline_ends_a_drain_with_work_still_held(journal: Journal) -> None:
    # Given a worker holding a task it will not finish in time
    s = Script(journal)
    task_id = s.enqueue("svc", b"a", max_attempts=1)
    s.zready(b"W", "svc", 1)
    s.tasks_to(b"W")
    s.send(b"W", ext.ack([(task_id, 1)]))
    drain = Drain(s.broker, s.now, 2.0)
    s.advance_alive(1.0, b"W")
    assert not drain.over(s.now)
    # When the deadline passes, Then the drain is over, the task still in flight
    s.advance_alive(1.5, b"W")
    assert drain.over(s.now)
    assert s.state(task_id) is TaskState.INFLIGHT
    # And the next start puts it back, uncharged
    s.restart(journal)
    record = journal.get(task_id)
    assert record is not None
    assert (record.state, record.attempt, record.uncharged) == (TaskState.READY, 1, 1)
