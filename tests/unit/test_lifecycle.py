"""The task lifecycle table: only its transitions exist, apply refuses the rest, and
docs/architecture.md draws exactly this table."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from zbroker.core import Broker, CoreSettings, IllegalTransition, TaskEvent, lifecycle
from zbroker.journal.base import TaskRecord, TaskState
from zbroker.journal.memory import MemoryJournal

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
BLOCK = re.compile(r"(<!-- lifecycle:begin[^\n]*-->\n)(.*?)(<!-- lifecycle:end -->)", re.DOTALL)
SOURCES: list[TaskState | None] = [None, *TaskState]


def test_every_event_has_exactly_one_transition() -> None:
    events = [t.event for t in lifecycle.TRANSITIONS]
    assert sorted(events, key=lambda e: e.name) == sorted(TaskEvent, key=lambda e: e.name)


@pytest.mark.parametrize("event", list(TaskEvent), ids=lambda e: e.name)
@pytest.mark.parametrize("state", SOURCES, ids=lambda s: "new" if s is None else s.name)
def test_next_state_follows_the_table_and_refuses_everything_else(
    state: TaskState | None, event: TaskEvent
) -> None:
    transition = next(t for t in lifecycle.TRANSITIONS if t.event is event)
    if state in transition.sources:
        assert lifecycle.next_state(state, event) is transition
    else:
        with pytest.raises(IllegalTransition) as caught:
            lifecycle.next_state(state, event)
        assert caught.value.state is state and caught.value.event is event
        assert event.name in str(caught.value)


def test_final_states_are_the_ones_a_task_ends_in() -> None:
    # Only FORGET leaves a final state, except a dead letter's REDRIVE.
    for t in lifecycle.TRANSITIONS:
        assert t.final is (t.target in lifecycle.FINAL)
        if any(s in lifecycle.FINAL for s in t.sources):
            assert t in (lifecycle.FORGET, lifecycle.REDRIVE)


def _stored(state: TaskState) -> tuple[Broker, TaskRecord]:
    journal = MemoryJournal()
    broker = Broker(CoreSettings(), 0.0, journal)
    record = TaskRecord(id="t1", service="svc", state=state, seq=1, created_at=0.0)
    journal.put(record, (b"x",))
    return broker, record


@pytest.mark.parametrize("move", lifecycle.TRANSITIONS, ids=lambda t: t.event.name)
def test_apply_refuses_a_move_the_table_does_not_allow(move: lifecycle.Transition) -> None:
    # Given a stored task in each state the move does not start from
    for state in TaskState:
        if state in move.sources:
            continue
        broker, record = _stored(state)
        before = (record.state, list(record.history), broker.stats.tasks_done)
        # When the core is asked to make the move
        with pytest.raises(IllegalTransition):
            broker.tasks.apply(record, move, 1.0)
        # Then nothing changed
        assert (record.state, record.history, broker.stats.tasks_done) == before
        assert broker.tasks.journal is not None
        assert broker.tasks.journal.get("t1") == record


def test_apply_refuses_to_enqueue_a_stored_task_and_to_move_a_new_one() -> None:
    broker, record = _stored(TaskState.READY)
    with pytest.raises(IllegalTransition):
        broker.tasks.apply(record, lifecycle.ENQUEUE, 1.0)
    with pytest.raises(IllegalTransition):
        broker.tasks.apply(record, lifecycle.START, 1.0, new_record=True)


def test_apply_keeps_counts_history_and_counters_in_step() -> None:
    # Given a ready task
    broker, record = _stored(TaskState.READY)
    service = broker.directory.get(b"svc")
    service.ready_count = service.waiting_count = 1
    # When it is purged
    broker.tasks.apply(record, lifecycle.PURGE, 5.0, service)
    # Then its state, its service's counts, its history and the counter moved together
    assert record.state is TaskState.CANCELLED
    assert (service.ready_count, service.waiting_count) == (0, 0)
    assert record.history[-1] == ["purged", 5.0]
    assert broker.stats.tasks_cancelled == 1
    assert record.finished_at == 5.0 and record.keep_until is not None


def test_architecture_page_draws_the_table() -> None:
    page = ARCHITECTURE.read_text()
    found = BLOCK.search(page)
    assert found is not None, "docs/architecture.md lost its lifecycle block"
    expected = lifecycle.markdown()
    if found.group(2) != expected and os.environ.get("ZBROKER_WRITE_DOCS") == "1":
        ARCHITECTURE.write_text(page[: found.start(2)] + expected + page[found.end(2) :])
        return
    assert found.group(2) == expected, (
        "docs/architecture.md's lifecycle drawing differs from zbroker/core/lifecycle.py: "
        "rerun this test with ZBROKER_WRITE_DOCS=1 to rewrite it"
    )


def test_the_drawing_names_every_transition() -> None:
    drawing = lifecycle.mermaid()
    for t in lifecycle.TRANSITIONS:
        for source in t.sources:
            a = "[*]" if source is None else lifecycle.STATE_NAMES[source]
            b = "[*]" if t.target is None else lifecycle.STATE_NAMES[t.target]
            assert f"    {a} --> {b}: {t.event.name}\n" in drawing


def replay(history: list[list[object]]) -> set[TaskState | None]:
    """The states a task can be in after the history's moves, from a new task."""
    states: set[TaskState | None] = {None}
    for entry in history:
        word = entry[0]
        moves = [t for t in lifecycle.TRANSITIONS if t.history == word]
        assert moves, f"history entry {word!r} is no transition's"
        states = {t.target for t in moves for s in states if s in t.sources}
        assert states, f"history {[e[0] for e in history]} leaves the table at {word!r}"
    return states


def test_replay_follows_a_history_and_catches_one_off_the_table() -> None:
    path = [["enqueued", 0.0], ["attempt", 1.0, 1, "w"], ["retry", 2.0, "x", 1.0], ["due", 3.0]]
    assert replay(path) == {TaskState.READY}
    with pytest.raises(AssertionError):
        replay([["enqueued", 0.0], ["done", 1.0, 1]])
