"""Task streams in the core (docs/protocol.md §13): CHUNK from workers, STREAM, READ,
MORE and CLOSE from clients, against both journals, time moved by hand."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.builds import pure_only
from tests.unit import test_core_durable as durable
from zbroker.journal import Journal, TaskState
from zbroker.protocol import ext, zbc

SETTINGS, Script = durable.SETTINGS, durable.Script

C = b"C"
W = b"W"


def run_one(s: Script, service: str = "llm") -> tuple[str, int]:
    """Register a worker and take the one task it is given: (id, attempt)."""
    s.zready(W, service, 1)
    (task_id, attempt, _, _) = s.tasks_to(W)[0]
    return task_id, attempt


def stream_call(s: Script, service: str = "llm", **fields: object) -> tuple[int, str]:
    rid = s.next_rid()
    s.send(C, zbc.stream(rid, service, [b"prompt"], **fields))  # type: ignore[arg-type]
    accepted = s.answers(C)
    assert accepted and accepted[0].ok and "ids" in accepted[0].meta, accepted
    return rid, accepted[0].meta["ids"][0]


def chunks_of(answers: list[zbc.Answer]) -> list[tuple[int, int, list[bytes]]]:
    return [(a.meta["offset"], a.meta["attempt"], list(a.frames)) for a in answers if a.chunks]


def test_chunks_reach_the_stream_call_in_order_then_the_result(journal: Journal) -> None:
    s = Script(journal)
    rid, task_id = stream_call(s)
    tid, attempt = run_one(s)
    assert tid == task_id
    s.send(W, ext.chunk(task_id, attempt, [b"Hel", b"lo"]))
    s.send(W, ext.chunk(task_id, attempt, [b" there"]))
    got = s.answers(C)
    assert chunks_of(got) == [(0, 1, [b"Hel", b"lo"]), (2, 1, [b" there"])]
    assert all(a.rid == rid for a in got)
    status = s.call(b"S", zbc.call(zbc.STATUS, 1, id=task_id))  # mid-attempt: the live count
    assert status.meta["task"]["stream_chunks"] == 3
    s.send(W, ext.done(task_id, attempt, [b"Hello there"]))
    (end,) = s.answers(C)
    assert not end.chunks and end.meta["state"] == "done" and end.meta["next"] == 3
    assert end.frames == (b"Hello there",)
    record = journal.get(task_id)
    assert record is not None and (record.stream_chunks, record.stream_bytes) == (3, 11)
    assert all(entry[0] not in ("chunk", "progress") for entry in record.history)
    assert s.broker.stats.chunks_received == 3 and s.broker.stats.chunks_sent == 3


def test_read_from_an_offset_after_the_end_and_late_readers(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("llm")
    _, attempt = run_one(s)
    s.send(W, ext.chunk(task_id, attempt, [b"a", b"b", b"c", b"d"]))
    s.send(C, zbc.read(s.next_rid(), task_id, 1, wait_s=10))  # a late reader, mid-task
    assert chunks_of(s.answers(C)) == [(1, 1, [b"b", b"c", b"d"])]
    s.send(W, ext.done(task_id, attempt, [b"abcd"]))
    assert s.answers(C)[0].meta["state"] == "done"
    s.send(C, zbc.read(s.next_rid(), task_id, 2))
    answers = s.answers(C)
    assert chunks_of(answers) == [(2, 1, [b"c", b"d"])]
    assert answers[-1].meta == {"rid": s.rid, "id": task_id, "state": "done", "next": 4}
    s.send(C, zbc.read(s.next_rid(), task_id, 9))  # past the end: only the end
    (end,) = s.answers(C)
    assert end.meta["state"] == "done" and end.frames == (b"abcd",)


def test_window_and_more(journal: Journal) -> None:
    s = Script(journal)
    rid, task_id = stream_call(s, window=2)
    _, attempt = run_one(s)
    s.send(W, ext.chunk(task_id, attempt, [bytes([i]) for i in range(5)]))
    assert chunks_of(s.answers(C)) == [(0, 1, [b"\0", b"\1"])]
    s.send(W, ext.done(task_id, attempt, [b"r"]))
    assert s.answers(C) == []  # the end waits for the chunks before it
    s.send(C, zbc.call(zbc.MORE, rid, credit=1))
    assert chunks_of(s.answers(C)) == [(2, 1, [b"\2"])]
    s.send(C, zbc.call(zbc.MORE, rid, credit=2))
    answers = s.answers(C)
    assert chunks_of(answers) == [(3, 1, [b"\3", b"\4"])]
    assert answers[-1].meta["state"] == "done"
    s.send(C, zbc.call(zbc.MORE, rid, credit=2))  # the call has ended: ignored
    assert s.answers(C) == []


def test_attempts_are_tagged_and_current_only_skips_older_ones(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("llm", max_attempts=3)
    _, attempt = run_one(s)
    s.send(W, ext.chunk(task_id, attempt, [b"x1", b"x2"]))
    s.send(W, ext.fail(task_id, attempt, "oops", delay_s=0))
    (task2, attempt2, _, _) = s.tasks_to(W)[0]
    assert (task2, attempt2) == (task_id, 2)
    s.send(W, ext.chunk(task_id, 2, [b"y1"]))
    s.send(C, zbc.read(s.next_rid(), task_id, 0, attempts="all", wait_s=5))
    assert chunks_of(s.answers(C)) == [(0, 1, [b"x1", b"x2"]), (2, 2, [b"y1"])]
    s.send(C, zbc.read(s.next_rid(), task_id, 0, attempts="current", wait_s=5))
    assert chunks_of(s.answers(C)) == [(2, 2, [b"y1"])]


def test_stale_chunks_are_refused(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("llm")
    _, attempt = run_one(s)
    s.send(W, ext.chunk(task_id, attempt + 1, [b"no"]))
    record = journal.get(task_id)
    assert record is not None and record.stream_chunks == 0
    assert journal.chunks(task_id, 0, 10, 1 << 20) == []


@pytest.mark.parametrize(("cap", "value"), [("max_stream_chunks", 3), ("max_stream_bytes", 5)])
def test_a_stream_past_its_cap_ends_the_task_dead(journal: Journal, cap: str, value: int) -> None:
    s = Script(journal, replace(SETTINGS, **{cap: value}))
    task_id = s.enqueue("llm")
    _, attempt = run_one(s)
    s.send(W, ext.chunk(task_id, attempt, [b"ab", b"cd"]))
    s.send(W, ext.chunk(task_id, attempt, [b"ef", b"gh"]))
    cancels = [ext.unpack_meta(f[4]) for f in s.sent_to(W) if f[2:4] == [ext.ZBW01, ext.CANCEL]]
    assert cancels and "cap" in cancels[0]["reason"]
    record = journal.get(task_id)
    assert record is not None and record.state is TaskState.DEAD
    assert record.error is not None and "cap" in record.error
    assert record.stream_chunks == 2  # the CHUNK past the cap stored nothing
    assert s.broker.stats.streams_capped == 1


def test_close_and_a_gone_connection_cancel_when_asked(journal: Journal) -> None:
    s = Script(journal)
    rid, task_id = stream_call(s)
    _, attempt = run_one(s)
    s.send(C, zbc.call(zbc.CLOSE, rid))
    record = journal.get(task_id)
    assert record is not None and record.state is TaskState.CANCELLED
    assert record.error == "abandoned by its reader"
    assert (task_id, attempt) in s.cancels_to(W)
    # READ does not cancel by default; a connection that goes abandons its calls.
    task2 = s.enqueue("llm")
    (t, _, _, _) = s.tasks_to(W)[0]
    assert t == task2
    s.send(b"R", zbc.read(1, task2, wait_s=5))
    s.broker.connection_closed(b"R", s.now)
    s.journal.commit()
    assert s.state(task2) is TaskState.INFLIGHT
    s.send(b"R", zbc.read(2, task2, wait_s=5, cancel_on_abandon=True))
    s.broker.connection_closed(b"R", s.now)
    s.journal.commit()
    assert s.state(task2) is TaskState.CANCELLED
    assert s.broker.stats.streams_abandoned == 3


def test_an_idle_call_ends_with_the_state_now(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("llm")
    s.send(C, zbc.read(s.next_rid(), task_id, wait_s=2))
    s.advance(1.0)
    assert s.answers(C) == []
    s.advance(1.5)
    (end,) = s.answers(C)
    assert end.meta == {"rid": s.rid, "id": task_id, "state": "ready", "next": 0}


def test_read_of_an_unknown_task_and_bad_fields(journal: Journal) -> None:
    s = Script(journal)
    answer = s.call(C, zbc.read(s.next_rid(), "t-nope"))
    assert not answer.ok and answer.code == zbc.E_NOT_FOUND
    answer = s.call(C, zbc.read(s.next_rid(), "t-nope", window=0))
    assert not answer.ok and answer.code == zbc.E_BAD_REQUEST
    answer = s.call(C, zbc.read(s.next_rid(), "t-nope", attempts="some"))
    assert not answer.ok and answer.code == zbc.E_BAD_REQUEST


def test_stream_calls_are_capped_per_connection(journal: Journal) -> None:
    s = Script(journal, replace(SETTINGS, max_waiters_per_peer=2))
    task_id = s.enqueue("llm")
    for _ in range(2):
        s.send(C, zbc.read(s.next_rid(), task_id, wait_s=5))
    answer = s.call(C, zbc.read(s.next_rid(), task_id, wait_s=5))
    assert not answer.ok and answer.code == zbc.E_TOO_MANY_WAITERS


def test_a_recovered_attempt_keeps_its_committed_chunks(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("llm")
    _, attempt = run_one(s)
    s.send(W, ext.chunk(task_id, attempt, [b"a", b"bb"]))  # committed, record not rewritten
    s2 = Script(journal)  # a broker started on the same journal
    record = journal.get(task_id)
    assert record is not None and record.state is TaskState.READY
    assert (record.stream_chunks, record.stream_bytes) == (2, 3)
    s2.send(C, zbc.read(1, task_id, wait_s=5))
    assert chunks_of(s2.answers(C)) == [(0, 1, [b"a", b"bb"])]


def test_a_reader_behind_its_stream_is_not_ended_by_its_idle_time(journal: Journal) -> None:
    s = Script(journal)
    rid, task_id = stream_call(s, window=2, wait_s=1)
    _, attempt = run_one(s)
    s.send(W, ext.chunk(task_id, attempt, [bytes([i]) for i in range(6)]))
    s.send(W, ext.done(task_id, attempt, [b"r"]))
    assert chunks_of(s.answers(C)) == [(0, 1, [b"\0", b"\1"])]
    s.advance(3.0)  # the reader pauses past its idle time: its chunks still wait
    assert s.answers(C) == []
    s.send(C, zbc.call(zbc.MORE, rid, credit=2))
    s.send(C, zbc.call(zbc.MORE, rid, credit=2))
    s.send(C, zbc.call(zbc.MORE, rid, credit=2))
    answers = s.answers(C)
    assert [c[2] for c in chunks_of(answers)] == [[b"\2", b"\3"], [b"\4", b"\5"]]
    assert answers[-1].meta["state"] == "done" and answers[-1].meta["next"] == 6


@pure_only
def test_a_reader_keeping_up_is_sent_chunks_without_a_read_of_the_journal(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Script(journal)
    rid, task_id = stream_call(s, window=8)
    _, attempt = run_one(s)
    reads: list[int] = []
    real = journal.chunks

    def counted(task: str, offset: int, limit: int, max_bytes: int) -> list[tuple[int, bytes]]:
        reads.append(offset)
        return real(task, offset, limit, max_bytes)

    monkeypatch.setattr(journal, "chunks", counted)
    for i in range(3):
        s.send(W, ext.chunk(task_id, attempt, [b"a%d" % i, b"b%d" % i]))
    got = chunks_of(s.answers(C))
    assert got == [(0, 1, [b"a0", b"b0"]), (2, 1, [b"a1", b"b1"]), (4, 1, [b"a2", b"b2"])]
    assert reads == []
    # Three more with room for two: those two are read back from the journal, and
    # the last waits there for a MORE
    s.send(W, ext.chunk(task_id, attempt, [b"c", b"d", b"e"]))
    assert chunks_of(s.answers(C)) == [(6, 1, [b"c", b"d"])]
    s.send(C, zbc.call(zbc.MORE, rid, credit=6))
    assert chunks_of(s.answers(C)) == [(8, 1, [b"e"])]
    assert reads == [6, 8]
