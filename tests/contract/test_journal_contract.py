"""The Journal contract (zbroker/journal/base.py), run against every implementation.

Every test takes the `journal` (or `stores`) fixture and so runs once per store:
MemoryJournal, LmdbJournal and PostgresJournal (ASYNC, for speed; the durability
tests also run SYNC). PostgreSQL: the session's private server (tests/pg.py).
Tests that need a store that survives `close` run only where `stores.durable`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.builds import ILL_TYPED
from zbroker.journal import (
    FINISHED_STATES,
    PRIORITY_MAX,
    PRIORITY_MIN,
    Durability,
    Journal,
    JournalError,
    LmdbJournal,
    MemoryJournal,
    TaskRecord,
    TaskState,
)
from zbroker.journal._codec import Packer, unpack_record
from zbroker.journal.postgres import PostgresJournal

READY, DELAYED, INFLIGHT = TaskState.READY, TaskState.DELAYED, TaskState.INFLIGHT
BLOCKED, UPSTREAM_FAILED = TaskState.BLOCKED, TaskState.UPSTREAM_FAILED
DONE, DEAD, CANCELLED, EXPIRED = (
    TaskState.DONE,
    TaskState.DEAD,
    TaskState.CANCELLED,
    TaskState.EXPIRED,
)
MANY = 1_000_000


class Stores:
    """Opens journals of one kind for a test, and closes every one of them at teardown."""

    def __init__(self, kind: str, root: Path, postgres: Any = None) -> None:
        self.kind = kind
        self.root = root
        self.postgres = postgres  # tests/pg.py Server: a fresh schema per open
        self.opened: list[Journal] = []

    @property
    def durable(self) -> bool:
        return self.kind != "memory"

    def open(self) -> Journal:
        journal: Journal
        if self.kind == "memory":
            journal = MemoryJournal()
        elif self.kind.startswith("postgres"):
            durability = Durability.SYNC if self.kind == "postgres-sync" else Durability.ASYNC
            journal = PostgresJournal(self.postgres.fresh_url(), durability)
        else:
            durability = Durability.SYNC if self.kind == "lmdb-sync" else Durability.ASYNC
            journal = LmdbJournal(self.root / f"store{len(self.opened)}", durability)
        self.opened.append(journal)
        return journal

    def reopen(self, journal: Journal) -> Journal:
        """Close `journal` and open its store again (durable stores only)."""
        journal.close()
        again: Journal
        if isinstance(journal, PostgresJournal):
            again = PostgresJournal(journal.url, journal.durability)
        else:
            assert isinstance(journal, LmdbJournal)
            again = LmdbJournal(journal.path, journal.durability)
        self.opened.append(again)
        return again

    def close_all(self) -> None:
        for journal in self.opened:
            journal.close()


def _stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    kind = request.param
    server = request.getfixturevalue("postgres_server") if kind.startswith("postgres") else None
    return Stores(kind, tmp_path, server)


@pytest.fixture(params=["memory", "lmdb", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    opened = _stores(request, tmp_path)
    yield opened
    opened.close_all()


@pytest.fixture(params=["lmdb", "lmdb-sync", "postgres", "postgres-sync"])
def durable_stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    opened = _stores(request, tmp_path)
    yield opened
    opened.close_all()


@pytest.fixture
def journal(stores: Stores) -> Journal:
    return stores.open()


def task(journal: Journal, task_id: str, state: TaskState = READY, **fields: Any) -> TaskRecord:
    """A record with a fresh seq from the journal, unless `seq` is given."""
    fields.setdefault("service", "svc")
    fields.setdefault("seq", journal.next_seq())
    fields.setdefault("created_at", 100.0)
    return TaskRecord(id=task_id, state=state, **fields)


def ids(records: list[TaskRecord]) -> list[str]:
    return [r.id for r in records]


def found_in(journal: Journal, record: TaskRecord) -> set[str]:
    """The reads that find `record` (rule 2: exactly the one its state names)."""
    places = set()
    if record.id in ids(journal.ready(record.service, MANY)):
        places.add("ready")
    if record.id in ids(journal.due(math.inf, MANY)):
        places.add("due")
    if record.id in ids(journal.inflight()):
        places.add("inflight")
    if record.id in ids(journal.dead(record.service, MANY)):
        places.add("dead")
    if record.id in ids(journal.blocked(record.service, MANY)):
        places.add("blocked")
    return places


def moved(record: TaskRecord, **changes: Any) -> TaskRecord:
    return dataclasses.replace(record, **changes)


def page_ready(journal: Journal, service: str, page: int) -> list[TaskRecord]:
    """ready() called with `after` = the last task seen, until it returns nothing."""
    seen: list[TaskRecord] = []
    for _ in range(10_000):
        batch = journal.ready(service, page, (seen[-1].priority, seen[-1].seq) if seen else None)
        assert len(batch) <= page
        if not batch:
            return seen
        seen.extend(batch)
    raise AssertionError("paging ready() with `after` never ends")


def page_dead(journal: Journal, service: str, page: int) -> list[TaskRecord]:
    seen: list[TaskRecord] = []
    for _ in range(10_000):
        batch = journal.dead(service, page, seen[-1].seq if seen else None)
        assert len(batch) <= page
        if not batch:
            return seen
        seen.extend(batch)
    raise AssertionError("paging dead() with `after_seq` never ends")


def page_blocked(journal: Journal, service: str, page: int) -> list[TaskRecord]:
    seen: list[TaskRecord] = []
    for _ in range(10_000):
        batch = journal.blocked(service, page, seen[-1].seq if seen else None)
        assert len(batch) <= page
        if not batch:
            return seen
        seen.extend(batch)
    raise AssertionError("paging blocked() with `after_seq` never ends")


# ------------------------------------------------------------- records


def test_put_then_get_returns_every_field(journal: Journal) -> None:
    # Given a record with every field away from its default
    record = TaskRecord(
        id="t-1",
        service="speech.tts",
        state=DELAYED,
        seq=journal.next_seq(),
        created_at=1_700_000_000.125,
        priority=-7,
        not_before=1_700_000_100.5,
        expires_at=1_700_000_900.25,
        attempt=2,
        max_attempts=9,
        timeout_s=12.5,
        key="idem-1",
        headers={"lang": "fr", "n": 3, "nested": {"a": [1, 2.5, None, True]}, "raw": b"\x00\xff"},
        error="worker crashed",
        finished_at=None,
        keep_until=1_700_086_400.0,
        history=[["enqueued", 1_700_000_000.125], ["failed", 1_700_000_050.0, "crash", 2]],
    )
    # When it is stored and read back
    journal.put(record, [b"payload"])
    # Then every field is equal, the id included
    assert journal.get("t-1") == record


def test_get_returns_a_copy_and_put_stores_one(journal: Journal) -> None:
    # Given a stored record
    record = task(journal, "t-1", headers={"a": 1}, history=[["enqueued", 1.0]])
    journal.put(record)
    # When the caller mutates both the record it put and the one it got
    record.state = DEAD
    record.headers["a"] = 2
    got = journal.get("t-1")
    assert got is not None
    got.state = INFLIGHT
    got.history.append(["started", 2.0])
    got.headers["b"] = 3
    # Then the store still holds what was put, until the next `put`
    again = journal.get("t-1")
    assert again is not None
    assert again.state == READY
    assert again.headers == {"a": 1}
    assert again.history == [["enqueued", 1.0]]
    assert ids(journal.ready("svc", 10)) == ["t-1"]
    assert journal.inflight() == []


def test_unknown_task_reads_as_none(journal: Journal) -> None:
    assert journal.get("nope") is None
    assert journal.payload("nope") is None
    assert journal.result("nope") is None
    assert journal.get("") is None


def test_state_is_returned_as_task_state(journal: Journal) -> None:
    journal.put(task(journal, "t-1", DONE))
    got = journal.get("t-1")
    assert got is not None
    assert type(got.state) is TaskState
    assert got.state is DONE


@pytest.mark.parametrize(
    "field,value",
    [
        ("priority", PRIORITY_MAX + 1),
        ("priority", PRIORITY_MIN - 1),
        ("seq", -1),
        ("state", 99),
        ("not_before", math.nan),
        ("id", ""),
    ],
)
def test_a_record_that_cannot_be_indexed_is_refused(
    journal: Journal, field: str, value: Any
) -> None:
    # Given a record with one field outside what the indexes can hold
    # When it is put, Then it is refused and nothing is stored
    with pytest.raises(ILL_TYPED):
        journal.put(moved(task(journal, "t-1"), **{field: value}))
    assert journal.counts() == {}
    assert journal.get("t-1") is None


# --------------------------------------------------------------- frames

FRAME_CASES = {
    "none": [],
    "one empty": [b""],
    "empties": [b"", b"", b""],
    "binary": [bytes(range(256)), b"\x00" * 17],
    "many": [i.to_bytes(2, "big") * i for i in range(200)],
    "large": [b"x" * (3 * 1024 * 1024 + 1)],
}


@pytest.mark.parametrize("frames", FRAME_CASES.values(), ids=FRAME_CASES.keys())
def test_payload_and_result_frames_round_trip_exactly(
    journal: Journal, frames: list[bytes]
) -> None:
    # Given a task stored with these frames as payload and as result
    journal.put(task(journal, "t-1"), frames)
    journal.put_result("t-1", frames)
    # When they are read back
    payload, result = journal.payload("t-1"), journal.result("t-1")
    # Then they are the same frames, as bytes
    assert payload == frames
    assert result == frames
    assert payload is not None and all(type(f) is bytes for f in payload)


def test_bytes_like_frames_come_back_as_bytes(journal: Journal) -> None:
    frames = [bytearray(b"ab"), memoryview(b"cd")]
    journal.put(task(journal, "t-1"), frames)  # type: ignore[arg-type]
    assert journal.payload("t-1") == [b"ab", b"cd"]


def test_frames_that_are_not_bytes_are_refused(journal: Journal) -> None:
    with pytest.raises(TypeError):
        journal.put(task(journal, "t-1"), ["text"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        journal.put(task(journal, "t-2"), b"one frame, not a list")  # type: ignore[arg-type]
    assert journal.get("t-1") is None
    assert journal.get("t-2") is None


def test_put_without_payload_keeps_the_stored_payload(journal: Journal) -> None:
    # Given a task stored with a payload
    record = task(journal, "t-1")
    journal.put(record, [b"a", b"b"])
    # When it is put again without one (a state change)
    journal.put(moved(record, state=INFLIGHT, attempt=1))
    # Then the payload is untouched
    assert journal.payload("t-1") == [b"a", b"b"]


def test_put_with_payload_replaces_it(journal: Journal) -> None:
    record = task(journal, "t-1")
    journal.put(record, [b"old"])
    journal.put(record, [b"new", b"frames"])
    assert journal.payload("t-1") == [b"new", b"frames"]


def test_a_task_stored_without_payload_has_no_frames(journal: Journal) -> None:
    journal.put(task(journal, "t-1"))
    assert journal.payload("t-1") == []
    assert journal.result("t-1") is None


def test_put_result_replaces_an_earlier_result(journal: Journal) -> None:
    journal.put(task(journal, "t-1", DONE))
    journal.put_result("t-1", [b"first"])
    journal.put_result("t-1", [b"second", b""])
    assert journal.result("t-1") == [b"second", b""]


def test_put_result_of_an_unknown_task_is_refused(journal: Journal) -> None:
    with pytest.raises(KeyError):
        journal.put_result("nope", [b"x"])
    assert journal.result("nope") is None


# ------------------------------------------------------ states and indexes


def test_each_state_is_found_by_exactly_its_own_read(journal: Journal) -> None:
    # Given one task in each state
    records = {state: task(journal, f"t-{state.name}", state) for state in TaskState}
    for record in records.values():
        journal.put(record)
    # Then each is found only where its state says (rule 2)
    assert found_in(journal, records[READY]) == {"ready"}
    assert found_in(journal, records[DELAYED]) == {"due"}
    assert found_in(journal, records[INFLIGHT]) == {"inflight"}
    assert found_in(journal, records[DEAD]) == {"dead"}
    for state in FINISHED_STATES:
        assert found_in(journal, records[state]) == set()


def test_ready_to_inflight_leaves_ready_and_appears_in_inflight(journal: Journal) -> None:
    # Given a READY task
    record = task(journal, "t-1")
    journal.put(record, [b"p"])
    assert ids(journal.ready("svc", 10)) == ["t-1"]
    # When it is handed to a worker
    journal.put(moved(record, state=INFLIGHT, attempt=1))
    # Then ready() no longer finds it and inflight() does
    assert journal.ready("svc", 10) == []
    assert ids(journal.inflight()) == ["t-1"]
    assert journal.counts() == {"svc": {INFLIGHT: 1}}


def test_inflight_back_to_ready_returns_to_the_queue(journal: Journal) -> None:
    record = task(journal, "t-1", INFLIGHT)
    journal.put(record)
    journal.put(moved(record, state=READY))
    assert journal.inflight() == []
    assert ids(journal.ready("svc", 10)) == ["t-1"]


def test_a_delayed_task_is_due_only_once_not_before_has_come(journal: Journal) -> None:
    # Given a task delayed until t=50
    record = task(journal, "t-1", DELAYED, not_before=50.0)
    journal.put(record)
    # Then it is not due before 50, and due at and after 50
    assert journal.due(49.999, 10) == []
    assert ids(journal.due(50.0, 10)) == ["t-1"]
    assert ids(journal.due(1e12, 10)) == ["t-1"]
    assert journal.next_due_at() == 50.0
    # And not in the ready queue meanwhile
    assert journal.ready("svc", 10) == []


def test_due_then_ready_leaves_the_delayed_index(journal: Journal) -> None:
    record = task(journal, "t-1", DELAYED, not_before=50.0)
    journal.put(record)
    journal.put(moved(record, state=READY))
    assert journal.due(1e12, 10) == []
    assert journal.next_due_at() is None
    assert ids(journal.ready("svc", 10)) == ["t-1"]


def test_rescheduling_a_delayed_task_moves_it(journal: Journal) -> None:
    record = task(journal, "t-1", DELAYED, not_before=50.0)
    journal.put(record)
    journal.put(moved(record, not_before=80.0))
    assert journal.due(79.0, 10) == []
    assert journal.next_due_at() == 80.0


def test_a_dead_task_is_listed_in_its_services_dead_letters(journal: Journal) -> None:
    record = task(journal, "t-1", INFLIGHT)
    journal.put(record)
    journal.put(moved(record, state=DEAD, error="attempts exhausted"))
    assert ids(journal.dead("svc", 10)) == ["t-1"]
    assert journal.dead("other", 10) == []
    assert journal.inflight() == []


def test_done_lapses_at_keep_until(journal: Journal) -> None:
    # Given a task finished at t=10, kept until t=70
    record = task(journal, "t-1", INFLIGHT, expires_at=5.0)
    journal.put(record)
    journal.put(moved(record, state=DONE, finished_at=10.0, keep_until=70.0))
    # Then it lapses at keep_until, not before (its spent TTL does not count)
    assert journal.lapsed(69.0, 10) == []
    assert ids(journal.lapsed(70.0, 10)) == ["t-1"]


def test_dead_letters_move_when_redriven(journal: Journal) -> None:
    record = task(journal, "t-1", DEAD)
    journal.put(record)
    journal.put(moved(record, state=READY, attempt=0))
    assert journal.dead("svc", 10) == []
    assert ids(journal.ready("svc", 10)) == ["t-1"]


def test_changing_service_moves_queue_and_counts(journal: Journal) -> None:
    record = task(journal, "t-1", service="a", key="k")
    journal.put(record)
    journal.put(moved(record, service="b"))
    assert journal.ready("a", 10) == []
    assert ids(journal.ready("b", 10)) == ["t-1"]
    assert journal.counts() == {"b": {READY: 1}}
    assert journal.find_key("a", "k") is None
    assert journal.find_key("b", "k") == "t-1"


# ----------------------------------------------------------------- order


def test_ready_is_priority_first_then_fifo(journal: Journal) -> None:
    # Given tasks enqueued in this order with these priorities
    for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", -3), ("e", 5), ("f", 127)]:
        journal.put(task(journal, name, priority=priority))
    journal.put(task(journal, "g", priority=-128))
    # Then ready() lists higher priority first, and enqueue order within a priority
    assert ids(journal.ready("svc", 10)) == ["f", "b", "e", "a", "c", "d", "g"]
    assert ids(journal.ready("svc", 3)) == ["f", "b", "e"]


def test_ready_is_per_service(journal: Journal) -> None:
    journal.put(task(journal, "a1", service="a"))
    journal.put(task(journal, "b1", service="b"))
    journal.put(task(journal, "a2", service="a"))
    journal.put(task(journal, "ab", service="ab"))
    assert ids(journal.ready("a", 10)) == ["a1", "a2"]
    assert ids(journal.ready("b", 10)) == ["b1"]
    assert ids(journal.ready("ab", 10)) == ["ab"]
    assert journal.ready("unknown", 10) == []
    assert journal.ready("a", 0) == []


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    priorities=st.lists(st.integers(PRIORITY_MIN, PRIORITY_MAX), max_size=60),
    page=st.integers(1, 9),
)
def test_paging_with_after_visits_every_task_once_in_order(
    stores: Stores, priorities: list[int], page: int
) -> None:
    # Given READY tasks with random priorities
    journal = stores.open()
    expected = []
    for n, priority in enumerate(priorities):
        record = task(journal, f"t{n}", priority=priority)
        journal.put(record)
        expected.append(record)
    expected.sort(key=lambda r: (-r.priority, r.seq))
    # When ready() is paged through with `after` = the last task of the previous page
    seen = page_ready(journal, "svc", page)
    # Then every task came exactly once, in queue order
    assert ids(seen) == ids(expected)
    journal.close()


def test_after_continues_across_priorities(journal: Journal) -> None:
    for name, priority in [("a", 3), ("b", 3), ("c", 1)]:
        journal.put(task(journal, name, priority=priority))
    b = journal.get("b")
    assert b is not None
    assert ids(journal.ready("svc", 10, after=(b.priority, b.seq))) == ["c"]
    assert journal.ready("svc", 10, after=(PRIORITY_MIN, 2**62)) == []


def test_due_is_earliest_first_and_limited(journal: Journal) -> None:
    # Given delayed tasks put in an order unlike their not_before
    for name, not_before in [("a", 30.0), ("b", 10.0), ("c", 20.0), ("d", 10.0), ("e", 99.0)]:
        journal.put(task(journal, name, DELAYED, not_before=not_before))
    # Then due() lists them earliest first (FIFO on ties), up to the limit
    assert ids(journal.due(50.0, 10)) == ["b", "d", "c", "a"]
    assert ids(journal.due(50.0, 2)) == ["b", "d"]
    assert journal.due(50.0, 0) == []
    assert journal.next_due_at() == 10.0


def test_due_orders_negative_and_fractional_times(journal: Journal) -> None:
    for name, not_before in [("a", 0.5), ("b", -2.0), ("c", 0.0), ("d", -0.0), ("e", 1e-9)]:
        journal.put(task(journal, name, DELAYED, not_before=not_before))
    assert ids(journal.due(1.0, 10)) == ["b", "c", "d", "e", "a"]
    assert ids(journal.due(0.0, 10)) == ["b", "c", "d"]
    assert journal.next_due_at() == -2.0


def test_next_due_at_is_none_without_delayed_tasks(journal: Journal) -> None:
    journal.put(task(journal, "t-1"))
    assert journal.next_due_at() is None


def test_lapsed_covers_ttl_and_keep_until_but_never_dead(journal: Journal) -> None:
    # Given tasks whose time is up at t=10 in every way the contract names, and some not
    journal.put(task(journal, "ready-ttl", READY, expires_at=4.0))
    journal.put(task(journal, "delayed-ttl", DELAYED, not_before=50.0, expires_at=6.0))
    journal.put(task(journal, "done", DONE, keep_until=3.0))
    journal.put(task(journal, "cancelled", CANCELLED, keep_until=5.0))
    journal.put(task(journal, "expired", EXPIRED, keep_until=10.0))
    journal.put(task(journal, "dead", DEAD, expires_at=1.0, keep_until=1.0))
    journal.put(task(journal, "inflight", INFLIGHT, expires_at=1.0))
    journal.put(task(journal, "ready-later", READY, expires_at=10.5))
    journal.put(task(journal, "done-forever", DONE))
    journal.put(task(journal, "ready-no-ttl", READY, keep_until=1.0))
    # Then lapsed() lists the due ones, earliest first, never a DEAD or INFLIGHT one
    assert ids(journal.lapsed(10.0, 100)) == [
        "done",
        "ready-ttl",
        "cancelled",
        "delayed-ttl",
        "expired",
    ]
    assert ids(journal.lapsed(10.0, 2)) == ["done", "ready-ttl"]
    assert "ready-later" in ids(journal.lapsed(11.0, 100))


def test_a_task_that_starts_no_longer_lapses_by_ttl(journal: Journal) -> None:
    record = task(journal, "t-1", expires_at=5.0)
    journal.put(record)
    journal.put(moved(record, state=INFLIGHT))
    assert journal.lapsed(100.0, 10) == []


def test_dead_is_lowest_seq_first_with_after_seq(journal: Journal) -> None:
    records = [task(journal, f"d{n}", DEAD) for n in range(5)]
    for record in reversed(records):
        journal.put(record)
    journal.put(task(journal, "other", DEAD, service="other"))
    assert ids(journal.dead("svc", 10)) == ["d0", "d1", "d2", "d3", "d4"]
    assert ids(journal.dead("svc", 2, after_seq=records[1].seq)) == ["d2", "d3"]
    assert journal.dead("svc", 10, after_seq=records[4].seq) == []


def test_inflight_lists_every_inflight_task(journal: Journal) -> None:
    for n in range(7):
        journal.put(task(journal, f"t{n}", INFLIGHT, service=f"s{n % 3}"))
    journal.put(task(journal, "queued"))
    assert sorted(ids(journal.inflight())) == [f"t{n}" for n in range(7)]


# ------------------------------------------------------- delete and keys


def test_delete_removes_record_frames_indexes_and_key(journal: Journal) -> None:
    # Given a task with payload, result, TTL and an idempotency key
    record = task(journal, "t-1", key="k-1", expires_at=5.0)
    journal.put(record, [b"p"])
    journal.put_result("t-1", [b"r"])
    # When it is deleted
    journal.delete("t-1")
    # Then nothing of it is left
    assert journal.get("t-1") is None
    assert journal.payload("t-1") is None
    assert journal.result("t-1") is None
    assert journal.ready("svc", 10) == []
    assert journal.lapsed(100.0, 10) == []
    assert journal.find_key("svc", "k-1") is None
    assert journal.counts() == {}
    # And the key is free for a new task
    journal.put(task(journal, "t-2", key="k-1"))
    assert journal.find_key("svc", "k-1") == "t-2"


@pytest.mark.parametrize("state", list(TaskState))
def test_delete_clears_every_index_of_every_state(journal: Journal, state: TaskState) -> None:
    record = task(journal, "t-1", state, expires_at=1.0, keep_until=1.0, not_before=1.0)
    journal.put(record)
    journal.delete("t-1")
    assert found_in(journal, record) == set()
    assert journal.lapsed(math.inf, 10) == []
    assert journal.counts() == {}


def test_delete_of_an_unknown_task_is_a_no_op(journal: Journal) -> None:
    journal.put(task(journal, "t-1"))
    journal.delete("nope")
    assert journal.counts() == {"svc": {READY: 1}}


def test_find_key_is_per_service(journal: Journal) -> None:
    journal.put(task(journal, "t-1", key="k"))
    journal.put(task(journal, "t-2", service="other", key="k"))
    assert journal.find_key("svc", "k") == "t-1"
    assert journal.find_key("other", "k") == "t-2"
    assert journal.find_key("svc", "missing") is None
    assert journal.find_key("unknown", "k") is None


def test_a_key_stays_while_the_record_exists_in_any_state(journal: Journal) -> None:
    record = task(journal, "t-1", key="k")
    journal.put(record)
    for state in TaskState:
        journal.put(moved(record, state=state))
        assert journal.find_key("svc", "k") == "t-1"


def test_a_key_held_by_another_task_is_refused(journal: Journal) -> None:
    # Given a task holding key "k"
    journal.put(task(journal, "t-1", key="k"))
    # When another task of the service claims it, Then the put is refused and changes nothing
    with pytest.raises(ValueError, match="t-1"):
        journal.put(task(journal, "t-2", key="k"))
    assert journal.get("t-2") is None
    assert journal.find_key("svc", "k") == "t-1"
    assert journal.counts() == {"svc": {READY: 1}}


def test_changing_or_dropping_a_key_moves_it(journal: Journal) -> None:
    record = task(journal, "t-1", key="k1")
    journal.put(record)
    journal.put(moved(record, key="k2"))
    assert journal.find_key("svc", "k1") is None
    assert journal.find_key("svc", "k2") == "t-1"
    journal.put(moved(record, key=None))
    assert journal.find_key("svc", "k2") is None


def test_long_keys_and_odd_names_work(journal: Journal) -> None:
    long_key = "κ" * 2000
    journal.put(task(journal, "t-1", service="s é/\x00x" * 40, key=long_key))
    assert journal.find_key("s é/\x00x" * 40, long_key) == "t-1"
    assert journal.find_key("s é/\x00x" * 40, long_key[:-1]) is None
    assert ids(journal.ready("s é/\x00x" * 40, 10)) == ["t-1"]


def test_names_with_nul_and_any_times_survive_a_commit_and_a_reopen(stores: Stores) -> None:
    # Given a task, options and a schedule whose names, key, owner and error hold NUL
    # and other characters a store might choke on
    odd = "s é/\x00x\U0001f600"
    journal = stores.open()
    record = task(journal, "t-1", service=odd, key=odd, owner=odd, error=odd, history=[[odd]])
    # and times no calendar holds (a delay of 1e300 s, a retention as long)
    record.expires_at, record.keep_until, record.not_before = 1e300, -1e300, 1e308
    journal.put(record, [b"\x00payload"])
    journal.put_service_options(odd, {"paused": True, odd: odd})
    journal.put_schedule(odd, {"every_s": 5.0, "payload": b"\x00"})
    # When they are committed, and read back after a reopen where the store survives one
    journal.commit()
    if stores.durable:
        journal = stores.reopen(journal)
    # Then every value comes back exactly
    assert journal.get("t-1") == record
    assert journal.find_key(odd, odd) == "t-1"
    assert journal.payload("t-1") == [b"\x00payload"]
    assert journal.service_options() == {odd: {"paused": True, odd: odd}}
    assert journal.schedules() == {odd: {"every_s": 5.0, "payload": b"\x00"}}


# ---------------------------------------------------------------- streams


def everything(journal: Journal, task_id: str) -> list[tuple[int, bytes]]:
    """The task's stream from offset 0 on, all of it (up to a gap)."""
    return journal.chunks(task_id, 0, MANY, MANY)


def test_chunks_round_trip_with_their_attempts(journal: Journal) -> None:
    # Given a task whose stream was written by two attempts
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.put_chunks("t-1", 0, 1, [b"first", b""])
    journal.put_chunks("t-1", 2, 2, [bytes(range(256))])
    # When it is read from the start
    stream = everything(journal, "t-1")
    # Then every entry comes back in offset order, as bytes, tagged with its attempt
    assert stream == [(1, b"first"), (1, b""), (2, bytes(range(256)))]
    assert all(type(data) is bytes for _, data in stream)
    assert journal.stream_size("t-1") == (3, 5 + 256)


def test_bytes_like_chunks_come_back_as_bytes(journal: Journal) -> None:
    journal.put(task(journal, "t-1", INFLIGHT))
    chunks = [bytearray(b"ab"), memoryview(b"cd")]
    journal.put_chunks("t-1", 0, 1, chunks)  # type: ignore[arg-type]
    assert everything(journal, "t-1") == [(1, b"ab"), (1, b"cd")]


def test_chunks_stop_at_limit_and_once_max_bytes_is_reached(journal: Journal) -> None:
    # Given a stream of five 10-byte entries
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.put_chunks("t-1", 0, 1, [bytes([n]) * 10 for n in range(5)])
    # Then at most `limit` come back
    assert len(journal.chunks("t-1", 0, 2, MANY)) == 2
    assert journal.chunks("t-1", 0, 0, MANY) == []
    # And no more once their data add up to max_bytes or more
    assert len(journal.chunks("t-1", 0, MANY, 20)) == 2
    assert len(journal.chunks("t-1", 0, MANY, 21)) == 3
    assert len(journal.chunks("t-1", 0, MANY, 50)) == 5
    assert len(journal.chunks("t-1", 0, 4, 21)) == 3
    # And the first comes back whatever its size
    assert journal.chunks("t-1", 0, MANY, 5) == [(1, b"\x00" * 10)]
    assert journal.chunks("t-1", 0, MANY, 0) == [(1, b"\x00" * 10)]


def test_chunks_from_a_middle_offset(journal: Journal) -> None:
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.put_chunks("t-1", 0, 1, [b"a", b"b", b"c", b"d", b"e"])
    assert journal.chunks("t-1", 3, MANY, MANY) == [(1, b"d"), (1, b"e")]
    assert journal.chunks("t-1", 1, 2, MANY) == [(1, b"b"), (1, b"c")]
    assert journal.chunks("t-1", 4, MANY, MANY) == [(1, b"e")]


def test_chunks_past_the_end_or_of_an_unknown_task_are_none(journal: Journal) -> None:
    # Given a task with a stream of two entries, and one with none
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.put_chunks("t-1", 0, 1, [b"a", b"b"])
    journal.put(task(journal, "t-2", INFLIGHT))
    # Then there is nothing past its end, before its start, or for the others
    assert journal.chunks("t-1", 2, MANY, MANY) == []
    assert journal.chunks("t-1", 10**6, MANY, MANY) == []
    assert journal.chunks("t-1", -1, MANY, MANY) == []
    assert journal.chunks("t-2", 0, MANY, MANY) == []
    assert journal.chunks("nope", 0, MANY, MANY) == []
    assert journal.chunks("", 0, MANY, MANY) == []
    assert journal.stream_size("t-2") == (0, 0)
    assert journal.stream_size("nope") == (0, 0)


def test_a_gap_ends_a_read_and_stream_size_counts_past_it(journal: Journal) -> None:
    # Given entries at offsets 0, 1 and 5 only
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.put_chunks("t-1", 0, 1, [b"a", b"b"])
    journal.put_chunks("t-1", 5, 1, [b"fff"])
    # Then a read stops at the gap, and starts again only at a stored offset
    assert everything(journal, "t-1") == [(1, b"a"), (1, b"b")]
    assert journal.chunks("t-1", 3, MANY, MANY) == []
    assert journal.chunks("t-1", 5, MANY, MANY) == [(1, b"fff")]
    # And the size is the offset after the last entry, and the bytes of all of them
    assert journal.stream_size("t-1") == (6, 5)


def test_put_chunks_of_an_unknown_task_is_refused(journal: Journal) -> None:
    with pytest.raises(KeyError):
        journal.put_chunks("nope", 0, 1, [b"x"])
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.delete("t-1")
    with pytest.raises(KeyError):
        journal.put_chunks("t-1", 0, 1, [b"x"])
    assert journal.chunks("nope", 0, MANY, MANY) == []
    assert journal.chunks("t-1", 0, MANY, MANY) == []


def test_put_chunks_replaces_an_offset_already_stored(journal: Journal) -> None:
    # Given three entries of attempt 1
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.put_chunks("t-1", 0, 1, [b"a", b"bb", b"c"])
    # When attempt 2 writes the middle offset, and the one past the end
    journal.put_chunks("t-1", 1, 2, [b"XXXX"])
    journal.put_chunks("t-1", 3, 2, [b"d"])
    # Then the middle entry is replaced, the others kept, the new one added
    assert everything(journal, "t-1") == [(1, b"a"), (2, b"XXXX"), (1, b"c"), (2, b"d")]
    assert journal.stream_size("t-1") == (4, 7)


def test_empty_chunks_store_nothing(journal: Journal) -> None:
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.put_chunks("t-1", 0, 1, [])
    journal.put_chunks("t-1", 7, 1, ())
    assert journal.stream_size("t-1") == (0, 0)
    assert everything(journal, "t-1") == []


@pytest.mark.parametrize(
    ("offset", "attempt", "chunks", "error"),
    [
        (0, 0, [b"x"], ValueError),
        (0, -1, [b"x"], ValueError),
        (0, 2**32, [b"x"], ValueError),
        (-1, 1, [b"x"], ValueError),
        (2**63 - 2, 1, [b"x", b"y"], ValueError),
        (0, 1, ["text"], TypeError),
        (0, 1, b"one chunk, not a list", TypeError),
        (0, 1, [b"ok", None], TypeError),
    ],
)
def test_a_stream_write_that_cannot_be_stored_is_refused(
    journal: Journal, offset: int, attempt: int, chunks: Any, error: type[Exception]
) -> None:
    # Given a task with one entry
    journal.put(task(journal, "t-1", INFLIGHT))
    journal.put_chunks("t-1", 0, 1, [b"kept"])
    # When a write the stream cannot hold is made, Then it is refused and stores nothing
    with pytest.raises(error):
        journal.put_chunks("t-1", offset, attempt, chunks)
    assert everything(journal, "t-1") == [(1, b"kept")]
    assert journal.stream_size("t-1") == (1, 4)


def test_delete_removes_the_stream_and_a_new_task_of_that_id_starts_empty(
    journal: Journal,
) -> None:
    # Given tasks whose ids begin alike, each with a stream
    for task_id in ("a", "ab", "b"):
        journal.put(task(journal, task_id, INFLIGHT))
        journal.put_chunks(task_id, 0, 1, [task_id.encode()] * 3)
    # When one is deleted
    journal.delete("a")
    # Then its stream is gone, and the others' are whole
    assert everything(journal, "a") == []
    assert journal.stream_size("a") == (0, 0)
    assert everything(journal, "ab") == [(1, b"ab")] * 3
    assert everything(journal, "b") == [(1, b"b")] * 3
    # And a new task with the same id starts with an empty stream
    journal.put(task(journal, "a", INFLIGHT))
    assert journal.stream_size("a") == (0, 0)
    journal.put_chunks("a", 0, 2, [b"new"])
    assert everything(journal, "a") == [(2, b"new")]


def test_a_put_of_the_record_keeps_its_stream(journal: Journal) -> None:
    record = task(journal, "t-1", INFLIGHT, attempt=1)
    journal.put(record, [b"p"])
    journal.put_chunks("t-1", 0, 1, [b"a"])
    journal.put(moved(record, state=DONE, stream_chunks=1, stream_bytes=1), [b"p2"])
    journal.put_result("t-1", [b"r"])
    assert everything(journal, "t-1") == [(1, b"a")]


def test_stream_fields_of_a_record_round_trip_and_default_to_zero(stores: Stores) -> None:
    # Given tasks with stream fields, with and without an owner or uncharged attempts
    journal = stores.open()
    fields: list[dict[str, Any]] = [
        {"stream_chunks": 3, "stream_bytes": 10},
        {"stream_chunks": 1, "stream_bytes": 0, "owner": "alice"},
        {"stream_chunks": 2**40, "stream_bytes": 2**50, "uncharged": 2},
        {"owner": "bob"},
        {},
    ]
    records = [task(journal, f"t{n}", **extra) for n, extra in enumerate(fields)]
    for record in records:
        journal.put(record)
    journal.commit()
    # When they are read back (after a reopen, where the store survives one)
    if stores.durable:
        journal = stores.reopen(journal)
    # Then each reads as written, and a record without them has 0, 0
    for record in records:
        assert journal.get(record.id) == record
    got = journal.get("t4")
    assert got is not None and (got.stream_chunks, got.stream_bytes) == (0, 0)


@pytest.mark.parametrize(
    "fields",
    [
        {"stream_chunks": -1},
        {"stream_bytes": -1, "stream_chunks": 1},
        {"stream_bytes": 5},  # bytes without entries
        {"stream_chunks": 1.0},
    ],
)
def test_stream_fields_that_cannot_be_stored_are_refused(
    journal: Journal, fields: dict[str, Any]
) -> None:
    with pytest.raises(ILL_TYPED, match=r"stream_|int object expected"):
        journal.put(task(journal, "t-1", **fields))
    assert journal.get("t-1") is None


def test_a_record_without_stream_fields_reads_as_zero() -> None:
    # Given a record in the form written before streams existed: 18 fields (owner last),
    # and the shorter forms (no owner, no uncharged count)
    packer = Packer()
    old = TaskRecord("t-1", "svc", INFLIGHT, 7, 1.0, uncharged=1, owner="alice")
    packed = packer.record(old)
    assert len(msgpack.unpackb(packed)) == 18  # the old form is still what is written
    for fields in (18, 17, 16):
        data = msgpack.packb(msgpack.unpackb(packed)[:fields])
        # When it is read, Then its stream fields are 0, 0
        record = unpack_record("t-1", data)
        assert (record.stream_chunks, record.stream_bytes) == (0, 0)
    assert unpack_record("t-1", packed) == old
    # And a record with a stream but no owner is written in full, the owner as nil
    new = TaskRecord("t-2", "svc", INFLIGHT, 8, 1.0, stream_chunks=2, stream_bytes=9)
    packed = packer.record(new)
    assert msgpack.unpackb(packed)[16:] == [0, None, [2, 9]]
    assert unpack_record("t-2", packed) == new


# ------------------------------------------------------- task graphs


def test_scheduling_fields_round_trip_and_default_to_none(stores: Stores) -> None:
    # Given tasks with dependencies, with and without the other late fields
    journal = stores.open()
    fields: list[dict[str, Any]] = [
        {"depends_on": ("a",), "blocked_on": 1, "state": BLOCKED},
        {"depends_on": ("a", "b"), "run_anyway": True, "input": "results", "owner": "al"},
        {"depends_on": ("a",), "input": "result", "stream_chunks": 2, "stream_bytes": 3},
        {"depends_on": ("a",), "state": UPSTREAM_FAILED, "uncharged": 1},
        {"require": ("gpu", "de"), "prefer": ("fast",), "affinity": "conv-1"},
        {"concurrency_key": "user:42", "owner": "al"},
        {},
    ]
    records = [task(journal, f"t{n}", **extra) for n, extra in enumerate(fields)]
    for record in records:
        journal.put(record)
    journal.commit()
    if stores.durable:
        journal = stores.reopen(journal)
    # Then each reads as written, and a record without them has none
    for record in records:
        assert journal.get(record.id) == record
    got = journal.get("t6")
    assert got is not None
    assert (got.depends_on, got.blocked_on, got.run_anyway, got.input) == ((), 0, False, None)
    assert (got.require, got.prefer, got.affinity, got.concurrency_key) == ((), (), None, None)


@pytest.mark.parametrize(
    "fields",
    [
        {"depends_on": ["t1"]},  # a list, not a tuple
        {"depends_on": "t1"},
        {"depends_on": ("",)},
        {"depends_on": (1,)},
        {"depends_on": ("a",), "blocked_on": 2},
        {"depends_on": ("a",), "blocked_on": -1},
        {"run_anyway": True},
        {"input": "result"},
        {"require": "gpu"},
        {"prefer": ("",)},
        {"affinity": ""},
        {"concurrency_key": 5},
    ],
)
def test_scheduling_fields_that_cannot_be_stored_are_refused(
    journal: Journal, fields: dict[str, Any]
) -> None:
    with pytest.raises(ILL_TYPED):
        journal.put(task(journal, "t-1", **fields))
    assert journal.get("t-1") is None


def test_blocked_tasks_are_found_by_blocked_only(journal: Journal) -> None:
    # Given blocked tasks of two services, one with a ttl
    a = task(journal, "a", BLOCKED, depends_on=("x",), blocked_on=1)
    b = task(journal, "b", BLOCKED, service="other", depends_on=("x",), blocked_on=1)
    c = task(journal, "c", BLOCKED, depends_on=("x",), blocked_on=1, expires_at=50.0)
    for record in (a, b, c):
        journal.put(record)
    # Then blocked() finds each under its service, in seq order, and nothing else does
    assert ids(journal.blocked("svc", MANY)) == ["a", "c"]
    assert ids(journal.blocked("svc", 1, a.seq)) == ["c"]
    assert ids(journal.blocked("other", MANY)) == ["b"]
    assert found_in(journal, a) == {"blocked"}
    # And a blocked task's ttl lapses like a queued one's
    assert ids(journal.lapsed(60.0, MANY)) == ["c"]
    # When one becomes ready, Then it leaves the blocked index
    journal.put(moved(a, state=READY, blocked_on=0))
    assert found_in(journal, journal.get("a") or a) == {"ready"}
    assert journal.counts()["svc"] == {READY: 1, BLOCKED: 1}


def test_edges_are_stored_listed_counted_and_dropped(journal: Journal) -> None:
    # Given two tasks, and edges from the first to three dependents (one added twice)
    journal.put(task(journal, "a"), [b"p"])
    journal.put(task(journal, "b"), [b"p"])
    for dependent in ("d1", "d2", "d2", "d3"):
        journal.add_dependent("a", dependent)
    journal.add_dependent("b", "d1")
    # Then they are listed (up to a limit) and counted once each
    assert sorted(journal.dependents("a", MANY)) == ["d1", "d2", "d3"]
    assert len(journal.dependents("a", 2)) == 2
    assert journal.dependents("b", MANY) == ["d1"]
    assert journal.dependents("nobody", MANY) == []
    assert journal.dependent_count() == 4
    # When a task's edges are dropped, and another task is deleted
    journal.drop_dependents("a")
    journal.delete("b")
    # Then neither has any left
    assert journal.dependents("a", MANY) == [] == journal.dependents("b", MANY)
    assert journal.dependent_count() == 0


def test_an_edge_of_an_unknown_task_is_refused(journal: Journal) -> None:
    with pytest.raises(KeyError):
        journal.add_dependent("nobody", "d1")
    assert journal.dependent_count() == 0


def test_edges_survive_reopen_only_once_committed(durable_stores: Stores) -> None:
    journal = durable_stores.open()
    journal.put(task(journal, "a"), [b"p"])
    journal.add_dependent("a", "d1")
    journal.commit()
    journal.add_dependent("a", "d2")  # not committed
    journal = durable_stores.reopen(journal)
    assert journal.dependents("a", MANY) == ["d1"]
    assert journal.dependent_count() == 1


# ---------------------------------------------------------- seq and counts


def test_next_seq_is_strictly_increasing(journal: Journal) -> None:
    seqs = [journal.next_seq() for _ in range(2500)]
    assert all(a < b for a, b in itertools.pairwise(seqs))


def test_counts_are_per_service_and_state(journal: Journal) -> None:
    journal.put(task(journal, "a", service="s1"))
    journal.put(task(journal, "b", service="s1"))
    journal.put(task(journal, "c", DEAD, service="s1"))
    journal.put(task(journal, "d", DONE, service="s2"))
    assert journal.counts() == {"s1": {READY: 2, DEAD: 1}, "s2": {DONE: 1}}
    journal.delete("d")
    assert journal.counts() == {"s1": {READY: 2, DEAD: 1}}


def test_service_options_are_stored_replaced_and_removed(journal: Journal) -> None:
    assert journal.service_options() == {}
    journal.put_service_options("tts", {"paused": True, "limit": 2})
    journal.put_service_options("stt", {"limit": 4})
    assert journal.service_options() == {"tts": {"paused": True, "limit": 2}, "stt": {"limit": 4}}
    journal.put_service_options("tts", {"limit": 3})
    journal.put_service_options("stt", {})
    journal.commit()
    assert journal.service_options() == {"tts": {"limit": 3}}


def test_service_options_of_any_service_name_length(stores: Stores) -> None:
    # Names longer than an LMDB key can hold (511 bytes), and one just under the cut
    long_name, wide_name, edge = "s" * 600, "ü" * 400, "e" * 400
    journal = stores.open()
    for i, name in enumerate((long_name, wide_name, edge, "tts")):
        journal.put_service_options(name, {"paused": True, "limit": i + 1})
    journal.put(task(journal, "t-1", service=long_name))
    journal.commit()
    if stores.durable:
        journal = stores.reopen(journal)
    assert journal.service_options() == {
        long_name: {"paused": True, "limit": 1},
        wide_name: {"paused": True, "limit": 2},
        edge: {"paused": True, "limit": 3},
        "tts": {"paused": True, "limit": 4},
    }
    journal.put_service_options(long_name, {"limit": 9})
    journal.put_service_options(wide_name, {})
    journal.commit()
    assert journal.service_options() == {
        long_name: {"limit": 9},
        edge: {"paused": True, "limit": 3},
        "tts": {"paused": True, "limit": 4},
    }
    assert journal.counts() == {long_name: {READY: 1}}


def test_service_options_must_be_msgpack_able(journal: Journal) -> None:
    with pytest.raises(TypeError):
        journal.put_service_options("tts", {"paused": object()})
    assert journal.service_options() == {}


def test_stats_count_commits(journal: Journal) -> None:
    journal.put(task(journal, "t-1"), [b"x" * 1000])
    journal.commit()
    assert journal.stats.commits == 1
    assert journal.stats.bytes_used > 0


def test_a_closed_journal_refuses_to_work(journal: Journal) -> None:
    journal.close()
    with pytest.raises(JournalError):
        journal.get("t-1")
    with pytest.raises(JournalError):
        journal.put(TaskRecord("t-1", "svc", READY, 1, 0.0))
    journal.close()  # twice is fine


# ------------------------------------------------- random operations vs a model

SERVICES = ["a", "b"]
KEYS = ["k1", "k2", None]
TIMES = [0.0, 1.0, 2.5, 5.0]

new_task = st.tuples(
    st.just("new"),
    st.sampled_from(SERVICES),
    st.sampled_from(list(TaskState)),
    st.integers(-2, 2),
    st.sampled_from(TIMES),
    st.sampled_from([None, *TIMES]),
    st.sampled_from([None, *TIMES]),
    st.sampled_from(KEYS),
)
change = st.tuples(
    st.just("change"),
    st.integers(0, 30),
    st.sampled_from(list(TaskState)),
    st.integers(-2, 2),
    st.sampled_from(TIMES),
    st.sampled_from([None, *TIMES]),
    st.sampled_from([None, *TIMES]),
    st.sampled_from(KEYS),
)
operation = st.one_of(
    new_task,
    change,
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("result"), st.integers(0, 30)),
    # a stream write: the task, how far back from the stream's end it starts, how many
    st.tuples(st.just("chunks"), st.integers(0, 30), st.integers(0, 2), st.integers(0, 3)),
    # an edge: the task waited for, the dependent's number; or a task's edges dropped
    st.tuples(st.just("edge"), st.integers(0, 30), st.integers(0, 40)),
    st.tuples(st.just("drop_edges"), st.integers(0, 30)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("reopen")),
)


def expected_reads(model: dict[str, TaskRecord]) -> dict[str, Any]:
    """What each read must return for the records in `model` (ids, in order)."""
    by_state: dict[TaskState, list[TaskRecord]] = {s: [] for s in TaskState}
    for record in model.values():
        by_state[record.state].append(record)
    counts: dict[str, dict[TaskState, int]] = {}
    for record in model.values():
        per = counts.setdefault(record.service, {})
        per[record.state] = per.get(record.state, 0) + 1
    reads: dict[str, Any] = {"counts": counts}
    for service in SERVICES:
        ready = [r for r in by_state[READY] if r.service == service]
        reads[f"ready {service}"] = ids(sorted(ready, key=lambda r: (-r.priority, r.seq)))
        dead = [r for r in by_state[DEAD] if r.service == service]
        reads[f"dead {service}"] = ids(sorted(dead, key=lambda r: r.seq))
        blocked = [r for r in by_state[BLOCKED] if r.service == service]
        reads[f"blocked {service}"] = ids(sorted(blocked, key=lambda r: r.seq))
        for key in KEYS[:-1]:
            holders = [r.id for r in model.values() if (r.service, r.key) == (service, key)]
            reads[f"key {service} {key}"] = holders[0] if holders else None
    reads["inflight"] = ids(sorted(by_state[INFLIGHT], key=lambda r: r.seq))
    delayed = sorted(by_state[DELAYED], key=lambda r: (r.not_before, r.seq))
    reads["next_due_at"] = delayed[0].not_before if delayed else None
    for now in TIMES:
        reads[f"due {now}"] = ids([r for r in delayed if r.not_before <= now])
        lapsing = [
            (r.expires_at, r.seq, r.id)
            for r in model.values()
            if r.state in (READY, DELAYED, BLOCKED)
            and r.expires_at is not None
            and r.expires_at <= now
        ] + [
            (r.keep_until, r.seq, r.id)
            for r in model.values()
            if r.state in FINISHED_STATES and r.keep_until is not None and r.keep_until <= now
        ]
        reads[f"lapsed {now}"] = [entry[2] for entry in sorted(lapsing)]
    return reads


def actual_reads(journal: Journal) -> dict[str, Any]:
    reads: dict[str, Any] = {"counts": journal.counts()}
    for service in SERVICES:
        reads[f"ready {service}"] = ids(page_ready(journal, service, 3))
        reads[f"dead {service}"] = ids(page_dead(journal, service, 2))
        reads[f"blocked {service}"] = ids(page_blocked(journal, service, 2))
        for key in KEYS[:-1]:
            assert key is not None
            reads[f"key {service} {key}"] = journal.find_key(service, key)
    reads["inflight"] = ids(journal.inflight())
    reads["next_due_at"] = journal.next_due_at()
    for now in TIMES:
        reads[f"due {now}"] = ids(journal.due(now, MANY))
        reads[f"lapsed {now}"] = ids(journal.lapsed(now, MANY))
    return reads


class ModelledJournal:
    """A journal under test, and its model: the records and streams as plain dicts, and
    as of the last commit, plus the results put."""

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.journal = stores.open()
        self.model: dict[str, TaskRecord] = {}
        self.committed: dict[str, TaskRecord] = {}
        self.results: dict[str, bytes] = {}
        self.streams: dict[str, dict[int, tuple[int, bytes]]] = {}
        self.committed_streams: dict[str, dict[int, tuple[int, bytes]]] = {}
        self.created = 0
        self.written = 0  # stream entries written, to tell each one's data apart
        # task id -> the ids of its dependents (edges), now and as of the last commit
        self.edges: dict[str, set[str]] = {}
        self.committed_edges: dict[str, set[str]] = {}

    def apply(self, op: tuple[Any, ...]) -> bool:
        """Applies `op` to both; False if it was skipped or refused (then no read is
        compared)."""
        kind = op[0]
        if kind in ("new", "change"):
            return self._put(op)
        if kind in ("delete", "result"):
            return self._delete_or_put_result(op)
        if kind == "chunks":
            return self._put_chunks(op)
        if kind in ("edge", "drop_edges"):
            return self._edge(op)
        if kind == "commit":
            self.journal.commit()
            self.committed = {k: dataclasses.replace(v) for k, v in self.model.items()}
            self.committed_streams = {k: dict(v) for k, v in self.streams.items()}
            self.committed_edges = {k: set(v) for k, v in self.edges.items()}
        elif kind == "reopen" and self.stores.durable:
            self.journal = self.stores.reopen(self.journal)
            self.model = {k: dataclasses.replace(v) for k, v in self.committed.items()}
            self.results = {k: v for k, v in self.results.items() if k in self.model}
            self.streams = {k: dict(v) for k, v in self.committed_streams.items()}
            self.edges = {k: set(v) for k, v in self.committed_edges.items()}
        return True

    def _edge(self, op: tuple[Any, ...]) -> bool:
        """An edge from one task to another (which may be unknown), or a task's edges
        dropped."""
        if not self.model:
            return False
        task_id = sorted(self.model)[op[1] % len(self.model)]
        if op[0] == "drop_edges":
            self.journal.drop_dependents(task_id)
            self.edges.pop(task_id, None)
        else:
            dependent = f"t{op[2]}"
            self.journal.add_dependent(task_id, dependent)
            self.edges.setdefault(task_id, set()).add(dependent)
        return True

    def check_edges(self) -> None:
        """Every task's dependents, and the count of edges, read as the model holds them."""
        for task_id in self.model:
            assert set(self.journal.dependents(task_id, MANY)) == self.edges.get(task_id, set())
        assert self.journal.dependent_count() == sum(map(len, self.edges.values()))

    def _put_chunks(self, op: tuple[Any, ...]) -> bool:
        """Entries written at, or a little before, the end of a task's stream."""
        if not self.model:
            return False
        _, pick, back, n = op
        task_id = sorted(self.model)[pick % len(self.model)]
        stream = self.streams.setdefault(task_id, {})
        offset = max(0, len(stream) - back)
        attempt = 1 + pick % 3
        chunks = []
        for i in range(n):
            self.written += 1
            chunks.append(b"%d" % self.written * (self.written % 4))
            stream[offset + i] = (attempt, chunks[-1])
        self.journal.put_chunks(task_id, offset, attempt, chunks)
        return True

    def check_streams(self) -> None:
        """Every task's stream, and its size, read as the model holds them."""
        for task_id in self.model:
            stream = self.streams.get(task_id, {})
            entries = [stream[offset] for offset in sorted(stream)]
            assert self.journal.chunks(task_id, 0, MANY, MANY) == entries
            size = (len(stream), sum(len(data) for _, data in entries))
            assert self.journal.stream_size(task_id) == size

    def _put(self, op: tuple[Any, ...]) -> bool:
        """A new task, or a change to one picked from the model; skipped if there is none
        to change, refused (and checked to be) if another task holds the key."""
        kind = op[0]
        if kind == "new":
            _, service, state, priority, not_before, expires_at, keep_until, key = op
            record = TaskRecord(
                f"t{self.created}", service, state, self.journal.next_seq(), 0.0, priority
            )
            self.created += 1
        else:
            _, pick, state, priority, not_before, expires_at, keep_until, key = op
            if not self.model:
                return False
            record = dataclasses.replace(self.model[sorted(self.model)[pick % len(self.model)]])
        record.state, record.priority, record.not_before = state, priority, not_before
        record.expires_at, record.keep_until, record.key = expires_at, keep_until, key
        holder = self.journal.find_key(record.service, key) if key is not None else None
        if holder not in (None, record.id):
            with pytest.raises(ValueError):
                self.journal.put(record)
            return False
        self.journal.put(record, [record.id.encode()] if kind == "new" else None)
        self.model[record.id] = dataclasses.replace(record)
        return True

    def _delete_or_put_result(self, op: tuple[Any, ...]) -> bool:
        if not self.model:
            return False
        task_id = sorted(self.model)[op[1] % len(self.model)]
        if op[0] == "delete":
            self.journal.delete(task_id)
            del self.model[task_id]
            self.results.pop(task_id, None)
            self.streams.pop(task_id, None)
            self.edges.pop(task_id, None)
        else:
            self.journal.put_result(task_id, [b"r", task_id.encode()])
            self.results[task_id] = task_id.encode()
        return True


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=st.lists(operation, max_size=60))
def test_random_operations_keep_every_read_and_count_exact(
    stores: Stores, operations: list[tuple[Any, ...]]
) -> None:
    # Given a fresh journal and its model
    run = ModelledJournal(stores)
    try:
        # When random puts, state changes, stream writes, deletes, commits and reopens
        # are applied
        for op in operations:
            if not run.apply(op):
                continue
            # Then every read agrees with the model, after every step
            assert actual_reads(run.journal) == expected_reads(run.model)
            if op[0] == "reopen":
                run.check_streams()
                run.check_edges()
        run.check_streams()
        run.check_edges()
        for task_id, record in run.model.items():
            assert run.journal.get(task_id) == record
            assert run.journal.payload(task_id) == [task_id.encode()]
        if not stores.durable:
            for task_id, result in run.results.items():
                assert run.journal.result(task_id) == [b"r", result]
        if isinstance(run.journal, (LmdbJournal, PostgresJournal)):
            run.journal.commit()
            assert run.journal.verify() == []
    finally:
        run.journal.close()


# ------------------------------------------------------------ durability


def test_committed_writes_survive_reopen(durable_stores: Stores) -> None:
    # Given a store with tasks in several states, committed
    journal = durable_stores.open()
    a = task(journal, "a", key="ka")
    journal.put(a, [b"pa"])
    journal.put(task(journal, "b", DELAYED, not_before=9.0), [b"pb"])
    journal.put(task(journal, "c", INFLIGHT))
    journal.put(task(journal, "d", DONE, keep_until=3.0))
    journal.put_result("d", [b"rd"])
    journal.commit()
    last_seq = journal.next_seq()
    # When it is closed and opened again
    journal = durable_stores.reopen(journal)
    # Then everything committed is there, indexes and counts included
    assert journal.get("a") == a
    assert journal.payload("a") == [b"pa"]
    assert journal.result("d") == [b"rd"]
    assert ids(journal.ready("svc", 10)) == ["a"]
    assert ids(journal.due(9.0, 10)) == ["b"]
    assert ids(journal.inflight()) == ["c"]
    assert ids(journal.lapsed(3.0, 10)) == ["d"]
    assert journal.find_key("svc", "ka") == "a"
    assert journal.counts() == {"svc": {READY: 1, DELAYED: 1, INFLIGHT: 1, DONE: 1}}
    # And sequence numbers keep growing across the restart
    assert journal.next_seq() > last_seq


def test_service_options_survive_reopen_only_once_committed(durable_stores: Stores) -> None:
    journal = durable_stores.open()
    journal.put_service_options("tts", {"paused": True})
    journal.commit()
    journal.put_service_options("tts", {})  # not committed
    journal.put_service_options("stt", {"limit": 1})  # not committed
    journal = durable_stores.reopen(journal)
    assert journal.service_options() == {"tts": {"paused": True}}


def test_uncommitted_writes_are_gone_after_reopen(durable_stores: Stores) -> None:
    # Given a committed task
    journal = durable_stores.open()
    a = task(journal, "a")
    journal.put(a, [b"pa"])
    journal.commit()
    # When more writes follow without a commit, and the store is reopened
    journal.put(task(journal, "b"), [b"pb"])
    journal.put(moved(a, state=INFLIGHT))
    journal.put_result("a", [b"ra"])
    journal.delete("a")
    journal = durable_stores.reopen(journal)
    # Then the store holds exactly the last commit
    assert journal.get("a") == a
    assert journal.get("b") is None
    assert journal.result("a") is None
    assert ids(journal.ready("svc", 10)) == ["a"]
    assert journal.inflight() == []
    assert journal.counts() == {"svc": {READY: 1}}


def test_streams_survive_reopen_only_once_committed(durable_stores: Stores) -> None:
    # Given two tasks with committed streams
    journal = durable_stores.open()
    journal.put(task(journal, "a", INFLIGHT))
    journal.put(task(journal, "b", INFLIGHT))
    journal.put_chunks("a", 0, 1, [b"a0", b"a1"])
    journal.put_chunks("b", 0, 1, [b"b0"])
    journal.commit()
    # When a pass appends, replaces, deletes and adds a stream, and is not committed
    journal.put_chunks("a", 2, 1, [b"lost"])
    journal.put_chunks("a", 0, 2, [b"replaced"])
    journal.delete("b")
    journal.put(task(journal, "c", INFLIGHT))
    journal.put_chunks("c", 0, 1, [b"lost too"])
    assert journal.stream_size("a") == (3, 14)
    journal = durable_stores.reopen(journal)
    # Then the streams are as committed
    assert everything(journal, "a") == [(1, b"a0"), (1, b"a1")]
    assert journal.stream_size("a") == (2, 4)
    assert everything(journal, "b") == [(1, b"b0")]
    assert journal.stream_size("c") == (0, 0)
    # And a delete, once committed, is gone for good
    journal.delete("a")
    journal.commit()
    journal = durable_stores.reopen(journal)
    assert everything(journal, "a") == []
    assert journal.stream_size("a") == (0, 0)


def test_writes_are_read_before_commit(durable_stores: Stores) -> None:
    journal = durable_stores.open()
    journal.put(task(journal, "a", DELAYED, not_before=1.0), [b"p"])
    assert journal.get("a") is not None
    assert ids(journal.due(1.0, 10)) == ["a"]
    assert journal.counts() == {"svc": {DELAYED: 1}}
    journal.commit()
    assert ids(journal.due(1.0, 10)) == ["a"]


def test_reopen_without_any_write_is_empty(durable_stores: Stores) -> None:
    journal = durable_stores.reopen(durable_stores.open())
    assert journal.counts() == {}
    assert journal.inflight() == []
    assert journal.next_due_at() is None


def test_oldest_ready_looks_across_priorities(journal: Journal) -> None:
    # Oldest first: seq 1 (priority 0), then newer tasks of higher and lower priority.
    for seq, priority in [(5, 0), (6, 9), (7, -3), (8, 9)]:
        journal.put(
            TaskRecord(
                id=f"t{seq}",
                service="s",
                state=TaskState.READY,
                seq=seq,
                created_at=float(seq),
                priority=priority,
            ),
            [b"x"],
        )
    oldest = journal.oldest_ready("s")
    assert oldest is not None and oldest.id == "t5"
    assert journal.oldest_ready("nothing") is None
    journal.delete("t5")
    oldest = journal.oldest_ready("s")
    assert oldest is not None and oldest.id == "t6"


@pytest.mark.parametrize(
    ("field", "value"),
    [("key", "k1"), ("priority", 1000), ("seq", -1), ("id", ""), ("keep_until", math.nan)],
)
def test_a_record_changed_in_place_is_checked_like_a_new_one(
    journal: Journal, field: str, value: Any
) -> None:
    # Given two stored tasks, the second one's object kept and put again (a store
    # may remember what it holds for an object it wrote)
    journal.put(task(journal, "t-1", key="k1"))
    record = task(journal, "t-2", key="k2")
    journal.put(record)
    journal.put(record)
    journal.commit()
    # When that same object is changed in place in a way no put may accept
    setattr(record, field, value)
    # Then the put is refused and nothing changes
    with pytest.raises(ValueError):
        journal.put(record)
    journal.commit()
    assert journal.find_key("svc", "k1") == "t-1"
    assert journal.find_key("svc", "k2") == "t-2"
    stored = journal.get("t-2")
    assert stored is not None and stored.key == "k2" and stored.priority == 0
    assert journal.counts() == {"svc": {READY: 2}}


def test_a_tasks_owner_and_uncharged_attempts_survive_a_reopen(durable_stores: Stores) -> None:
    # Given tasks with an owner, with uncharged attempts, with both and with neither
    journal = durable_stores.open()
    fields = [
        {"owner": "alice"},
        {"uncharged": 2},
        {"owner": "bob", "uncharged": 1},
        {},
    ]
    for n, extra in enumerate(fields):
        journal.put(task(journal, f"t{n}", **extra))
    journal.commit()
    # When the store is opened again, then each reads back as written
    journal = durable_stores.reopen(journal)
    for n, extra in enumerate(fields):
        record = journal.get(f"t{n}")
        assert record is not None
        assert (record.owner, record.uncharged) == (extra.get("owner"), extra.get("uncharged", 0))
    # And an owner that is not a name is refused before anything is stored
    with pytest.raises(ValueError, match="owner"):
        journal.put(task(journal, "bad", owner=""))


# ------------------------------------------------- recurring tasks (schedules)


def test_schedules_are_stored_replaced_and_deleted(journal: Journal) -> None:
    assert journal.schedules() == {}
    journal.put_schedule("beat", {"service": "svc", "every_s": 10, "payload": [b"\x00x", b""]})
    journal.put_schedule("cron", {"service": "s2", "cron": "* * * * *", "tz": None})
    # Visible at once, before the commit (rule 1), bytes as bytes, nil as None
    assert journal.schedules() == {
        "beat": {"service": "svc", "every_s": 10, "payload": [b"\x00x", b""]},
        "cron": {"service": "s2", "cron": "* * * * *", "tz": None},
    }
    journal.put_schedule("beat", {"service": "svc", "every_s": 20})
    journal.delete_schedule("cron")
    journal.delete_schedule("never-was")  # a no-op
    journal.commit()
    assert journal.schedules() == {"beat": {"service": "svc", "every_s": 20}}


def test_schedules_are_copies(journal: Journal) -> None:
    data: dict[str, Any] = {"headers": {"a": 1}}
    journal.put_schedule("s", data)
    data["headers"]["a"] = 2
    read = journal.schedules()
    assert read == {"s": {"headers": {"a": 1}}}
    read["s"]["headers"]["a"] = 3
    assert journal.schedules() == {"s": {"headers": {"a": 1}}}


def test_schedules_are_kept_apart_from_tasks_and_options(journal: Journal) -> None:
    journal.put(task(journal, "t-1", service="beat"))
    journal.put_service_options("beat", {"paused": True})
    journal.put_schedule("beat", {"service": "beat"})
    journal.commit()
    journal.delete_schedule("beat")
    journal.commit()
    assert journal.counts() == {"beat": {READY: 1}}
    assert journal.service_options() == {"beat": {"paused": True}}
    assert journal.get("t-1") is not None and journal.schedules() == {}


def test_a_schedule_name_must_be_one_a_store_can_key(journal: Journal) -> None:
    for bad in ("", "x" * 481, "\udcff"):
        with pytest.raises(ValueError):
            journal.put_schedule(bad, {})
    with pytest.raises(TypeError):
        journal.put_schedule("s", {"bad": object()})
    wide = "ü" * 240  # 480 bytes: the longest
    journal.put_schedule(wide, {"n": 1})
    journal.commit()
    assert journal.schedules() == {wide: {"n": 1}}


def test_schedules_survive_a_reopen_and_an_uncommitted_change_does_not(stores: Stores) -> None:
    if not stores.durable:
        pytest.skip("the memory store keeps nothing across a close")
    journal = stores.open()
    journal.put_schedule("kept", {"next_at": 1.5})
    journal.put(task(journal, "t-1"))
    journal.commit()
    # A pass that moves the schedule on with a new task, never committed
    journal.put_schedule("kept", {"next_at": 2.5})
    journal.put(task(journal, "t-2"))
    journal.put_schedule("new", {})
    journal = stores.reopen(journal)
    assert journal.schedules() == {"kept": {"next_at": 1.5}}
    assert journal.get("t-2") is None
    journal.delete_schedule("kept")
    journal.commit()
    journal = stores.reopen(journal)
    assert journal.schedules() == {}
