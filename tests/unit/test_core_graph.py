"""Task graphs in the core (docs/protocol.md §15): depends_on, run_anyway, input.

ZBC01 calls against a real journal (both stores), time moved by hand.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_core_durable import Script, emitted
from zbroker.core import CoreSettings
from zbroker.journal import Journal, MemoryJournal, TaskState
from zbroker.protocol import ext, zbc

BLOCKED, READY, DONE = TaskState.BLOCKED, TaskState.READY, TaskState.DONE
UPSTREAM_FAILED = TaskState.UPSTREAM_FAILED


def refused(s: Script, service: str, **options: Any) -> zbc.Answer:
    answer = s.call(b"C", zbc.enqueue(s.next_rid(), service, [[b"x"]], zbc.TaskOptions(**options)))
    assert not answer.ok
    return answer


def run(
    s: Script, wid: bytes, result: bytes | None = b"r"
) -> list[tuple[str, bytes, dict[str, Any]]]:
    """Every task the worker is handed now, answered DONE with `result` (None: FAIL,
    no retry); returns (id, payload, meta) of each."""
    seen = []
    for tid, attempt, payload, meta in s.tasks_to(wid):
        seen.append((tid, payload, meta))
        if result is None:
            s.send(wid, ext.fail(tid, attempt, "broken", retry=False))
        else:
            s.send(wid, ext.done(tid, attempt, [result + b":" + payload]))
    return seen


def test_a_dependent_waits_blocked_then_runs_after_its_dependency(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("a", b"1")
    second = s.enqueue("b", b"2", depends_on=(first,))
    assert s.state(second) is BLOCKED
    s.zready(b"WB", "b", 1)
    assert s.tasks_to(b"WB") == []  # blocked: not delivered
    s.zready(b"WA", "a", 1)
    assert [t[0] for t in run(s, b"WA")] == [first]
    # Then the dependent is ready at once, and its worker finds the dependency's id
    ((tid, payload, meta),) = run(s, b"WB")
    assert (tid, payload, meta["deps"]) == (second, b"2", [first])
    assert s.state(second) is DONE
    record = journal.get(second)
    assert record is not None and record.depends_on == (first,) and record.blocked_on == 0
    assert [h[0] for h in record.history][:2] == ["enqueued", "unblocked"]


def test_a_chain_hands_each_result_over_as_the_next_input(journal: Journal) -> None:
    s = Script(journal)
    one = s.enqueue("stt", b"audio")
    two = s.call(
        b"C",
        zbc.enqueue(s.next_rid(), "llm", [[]], zbc.TaskOptions(depends_on=(one,), input="result")),
    )
    two_id = two.meta["ids"][0]
    three = s.call(
        b"C",
        zbc.enqueue(
            s.next_rid(),
            "tts",
            [[b"voice:"]],
            zbc.TaskOptions(depends_on=(two_id,), input="result"),
        ),
    ).meta["ids"][0]
    for wid, service in ((b"W1", "stt"), (b"W2", "llm"), (b"W3", "tts")):
        s.zready(wid, service, 1)
    assert [p for _, p, _ in run(s, b"W1", b"text")] == [b"audio"]
    assert [p for _, p, _ in run(s, b"W2", b"answer")] == [b"text:audio"]
    # The own payload first, then the dependency's result frames
    assert [p for _, p, _ in run(s, b"W3", b"speech")] == [b"voice:answer:text:audio"]
    answer = s.call(b"C", zbc.call(zbc.RESULT, s.next_rid(), id=three))
    assert answer.frames == (b"speech:voice:answer:text:audio",)


def test_fan_in_receives_every_result_in_order(journal: Journal) -> None:
    s = Script(journal)
    parts = s.call(b"C", zbc.enqueue(1, "part", [[b"%d" % i] for i in range(10)], batch=True))
    ids = parts.meta["ids"]
    join = s.enqueue("join", b"", depends_on=tuple(reversed(ids)), input="results")
    s.zready(b"W", "part", 10)
    s.zready(b"J", "join", 1)
    run(s, b"W", b"r")
    assert s.state(join) is READY or s.state(join) is TaskState.INFLIGHT
    ((_, payload, meta),) = run(s, b"J")
    assert meta["deps"] == list(reversed(ids))
    results = msgpack.unpackb(payload)
    assert results == [[b"r:%d" % i] for i in reversed(range(10))]


def test_a_failed_dependency_fails_the_whole_chain_at_once(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("a")
    chain = [first]
    for _ in range(200):  # deep enough to need the worklist, not recursion
        chain.append(s.enqueue("b", depends_on=(chain[-1],)))
    s.zready(b"WA", "a", 1)
    run(s, b"WA", None)  # FAIL, no retry: dead
    assert s.state(first) is TaskState.DEAD
    assert all(s.state(t) is UPSTREAM_FAILED for t in chain[1:])
    record = journal.get(chain[1])
    assert record is not None and record.error == f"dependency {first} ended dead"
    assert s.broker.stats.tasks_upstream_failed == 200
    answer = s.call(b"C", zbc.call(zbc.RESULT, s.next_rid(), id=chain[-1]))
    assert answer.meta["state"] == "upstream_failed"
    assert journal.dependent_count() == 0


def test_run_anyway_runs_after_a_failed_dependency(journal: Journal) -> None:
    s = Script(journal)
    good, bad = s.enqueue("a", b"g"), s.enqueue("a", b"b")
    after = s.enqueue("c", depends_on=(good, bad), run_anyway=True, input="results")
    s.zready(b"WA", "a", 2)
    for tid, attempt, payload, _ in s.tasks_to(b"WA"):
        if payload == b"g":
            s.send(b"WA", ext.done(tid, attempt, [b"ok"]))
        else:
            s.send(b"WA", ext.fail(tid, attempt, "no", retry=False))
    s.zready(b"WC", "c", 1)
    ((tid, payload, _),) = run(s, b"WC")
    # Its own payload, then one frame: each dependency's result, nil for the failed one
    assert tid == after and payload[:1] == b"x"
    assert msgpack.unpackb(payload[1:]) == [[b"ok"], None]


def test_dependencies_that_ended_already_are_settled_at_enqueue(journal: Journal) -> None:
    s = Script(journal)
    done_id, dead_id = s.enqueue("a", b"1"), s.enqueue("a", b"2")
    s.zready(b"W", "a", 2)
    for tid, attempt, payload, _ in s.tasks_to(b"W"):
        if payload == b"1":
            s.send(b"W", ext.done(tid, attempt, [b"r"]))
        else:
            s.send(b"W", ext.fail(tid, attempt, "no", retry=False))
    ready = s.enqueue("b", depends_on=(done_id,))
    failed = s.enqueue("b", depends_on=(done_id, dead_id))
    assert s.state(ready) is READY
    assert s.state(failed) is UPSTREAM_FAILED
    assert journal.dependent_count() == 0


def test_unknown_duplicate_and_keyed_dependencies(journal: Journal) -> None:
    s = Script(journal)
    answer = refused(s, "b", depends_on=("t999-0",))
    assert answer.meta["code"] == zbc.E_NOT_FOUND and "depends_on[0]" in answer.meta["message"]
    assert "cycles" in answer.meta["message"]
    first = s.enqueue("a", key="rec-1")
    answer = refused(s, "b", depends_on=(first, ("a", "rec-1")))
    assert answer.meta["code"] == zbc.E_BAD_REQUEST and "twice" in answer.meta["message"]
    # A key of another service names the task that holds it there
    by_key = s.enqueue("b", depends_on=(("a", "rec-1"),))
    record = journal.get(by_key)
    assert record is not None and record.depends_on == (first,)
    # A self-reference through a key of the same call is unknown: no cycle can be made
    answer = refused(s, "c", key="k", depends_on=(("c", "k"),))
    assert answer.meta["code"] == zbc.E_NOT_FOUND
    assert s.journal.counts().get("c") is None  # nothing stored


@pytest.mark.parametrize(
    "meta",
    [
        {"depends_on": []},
        {"depends_on": "t1"},
        {"depends_on": [""]},
        {"depends_on": [{"service": "a"}]},
        {"depends_on": ["t1"], "input": "all"},
        {"depends_on": ["t1", "t2"], "input": "result"},
        {"depends_on": ["t1"], "run_anyway": 1},
        {"run_anyway": True},
        {"input": "result"},
        {"depends_on": ["t1"] * 1001},
    ],
)
def test_malformed_dependency_options_are_refused(journal: Journal, meta: dict[str, Any]) -> None:
    s = Script(journal)
    frames = [b"", zbc.ZBC01, zbc.ENQUEUE, ext.pack_meta({"rid": 1, "service": "s", **meta}), b"x"]
    answer = s.call(b"C", frames)
    assert not answer.ok and answer.meta["code"] == zbc.E_BAD_REQUEST


def test_cancelling_a_blocked_task_and_its_dependency(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("a")
    second = s.enqueue("b", depends_on=(first,))
    third = s.enqueue("c", depends_on=(second,))
    answer = s.call(b"C", zbc.call(zbc.CANCEL, s.next_rid(), id=second))
    assert answer.ok and answer.meta["was"] == "blocked"
    assert s.state(third) is UPSTREAM_FAILED
    # The dependency still runs; its end settles nothing more
    s.zready(b"W", "a", 1)
    run(s, b"W")
    assert s.state(first) is DONE and s.state(second) is TaskState.CANCELLED


def test_purge_and_ttl_of_blocked_tasks(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("a")
    waiting = [s.enqueue("b", depends_on=(first,)) for _ in range(3)]
    chained = s.enqueue("b", depends_on=(waiting[0],))
    expiring = s.enqueue("c", depends_on=(first,), ttl_s=5)
    queues = s.call(b"A", zbc.call(zbc.QUEUES, s.next_rid())).meta["queues"]
    assert {q["service"]: q["blocked"] for q in queues} == {"a": 0, "b": 4, "c": 1}
    answer = s.call(b"A", zbc.call(zbc.PURGE, s.next_rid(), service="b"))
    # Blocked tasks go first; the one waiting for a purged task fails with it, and is
    # not purged a second time
    assert (answer.meta["purged"], answer.meta["more"]) == (3, False)
    assert s.broker.stats.tasks_upstream_failed == 1
    assert [s.state(t) for t in waiting] == [TaskState.CANCELLED] * 3
    assert s.state(chained) is UPSTREAM_FAILED
    queues = s.call(b"A", zbc.call(zbc.QUEUES, s.next_rid())).meta["queues"]
    assert {q["service"]: q["blocked"] for q in queues}["b"] == 0
    s.advance(6)
    assert s.state(expiring) is TaskState.EXPIRED
    listed = s.call(b"A", zbc.call(zbc.TASKS, s.next_rid(), service="b", state="blocked"))
    assert listed.meta["tasks"] == []


def test_a_delayed_dependent_waits_for_its_delay_after_unblocking(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("a")
    later = s.enqueue("b", depends_on=(first,), delay_s=10)
    s.zready(b"W", "a", 1)
    run(s, b"W")
    assert s.state(later) is TaskState.DELAYED
    s.advance(11)
    assert s.state(later) is READY


def test_input_of_a_result_no_longer_kept_fails_with_a_clear_error(journal: Journal) -> None:
    s = Script(journal, CoreSettings(retention_s=0, seed=1))
    first, other = s.enqueue("a", b"1"), s.enqueue("a", b"2")
    join = s.enqueue("j", depends_on=(first, other), input="results")
    s.send(b"R", zbc.call(zbc.RESULT, 99, id=join, wait_s=60))
    s.zready(b"W", "a", 1)
    run(s, b"W")  # the first ends; with no retention its result is not kept
    run(s, b"W")
    (answer,) = s.answers(b"R")
    assert answer.meta["state"] == "upstream_failed"
    assert f"the result of dependency {first} is no longer kept" in answer.meta["error"]


def test_graphs_survive_a_restart(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("a", b"1")
    second = s.call(
        b"C",
        zbc.enqueue(s.next_rid(), "b", [[]], zbc.TaskOptions(depends_on=(first,), input="result")),
    ).meta["ids"][0]
    s.restart(journal)
    assert s.state(second) is BLOCKED
    s.zready(b"WA", "a", 1)
    run(s, b"WA", b"out")
    s.zready(b"WB", "b", 1)
    assert [p for _, p, _ in run(s, b"WB")] == [b"out:1"]


# ------------------------------------------------------------- property

graph_action = st.one_of(
    # a task depending on up to three earlier tasks (by position), maybe run_anyway
    st.tuples(
        st.just("enqueue"),
        st.lists(st.integers(0, 30), max_size=3, unique=True),
        st.booleans(),
    ),
    st.tuples(st.just("done"), st.integers(0, 3)),
    st.tuples(st.just("fail"), st.integers(0, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("restart")),
)


class GraphRun:
    """A core under random graph actions, with what the test knows."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.s = Script(journal, CoreSettings(seed=3, retention_s=1000.0))
        self.ids: list[str] = []
        self.started: dict[str, int] = {}  # task id -> times handed to a worker
        self.s.zready(b"W", "svc", 4)

    def act(self, act: tuple[Any, ...]) -> None:
        s, kind = self.s, act[0]
        if kind == "enqueue":
            deps = tuple(self.ids[i] for i in act[1] if i < len(self.ids))
            if deps:
                self.ids.append(s.enqueue("svc", depends_on=deps, run_anyway=act[2]))
            else:
                self.ids.append(s.enqueue("svc"))
        elif kind in ("done", "fail"):
            held = [t for t in self.ids if self.state(t) is TaskState.INFLIGHT]
            if held:
                task_id = held[act[1] % len(held)]
                record = self.journal.get(task_id)
                assert record is not None
                if kind == "done":
                    s.send(b"W", ext.done(task_id, record.attempt, [b"r"]))
                else:
                    s.send(b"W", ext.fail(task_id, record.attempt, "no", retry=False))
        elif kind == "cancel" and self.ids:
            task_id = self.ids[act[1] % len(self.ids)]
            s.send(b"C", zbc.call(zbc.CANCEL, s.next_rid(), id=task_id))
            s.sent_to(b"C")
        elif kind == "restart":
            s.restart(self.journal)
            s.zready(b"W", "svc", 4)
        for task_id, attempt, _, _ in s.tasks_to(b"W"):
            s.send(b"W", ext.ack([(task_id, attempt)]))
            self.started[task_id] = self.started.get(task_id, 0) + 1
            self.check_may_start(task_id)

    def state(self, task_id: str) -> TaskState:
        record = self.journal.get(task_id)
        assert record is not None
        return record.state

    def final(self, task_id: str) -> bool:
        return self.state(task_id).wire.final

    def deps(self, task_id: str) -> list[str]:
        record = self.journal.get(task_id)
        assert record is not None
        return record.depends_on

    def check_may_start(self, task_id: str) -> None:
        """A task starts only once every dependency has ended: done, or any end with
        run_anyway."""
        record = self.journal.get(task_id)
        assert record is not None
        for dep in record.depends_on:
            state = self.state(dep)
            assert state.wire.final, (task_id, dep, state)
            assert state is TaskState.DONE or record.run_anyway, (task_id, dep, state)

    def check(self) -> None:
        """Every task is where its dependencies say it must be."""
        for task_id in self.ids:
            record = self.journal.get(task_id)
            assert record is not None
            states = [self.state(d) for d in record.depends_on]
            open_deps = sum(1 for st_ in states if not st_.wire.final)
            failed = [st_ for st_ in states if st_.wire.final and st_ is not TaskState.DONE]
            if record.state is TaskState.BLOCKED:
                assert open_deps > 0 and record.blocked_on == open_deps, (task_id, states)
                assert not failed or record.run_anyway
            elif record.state is TaskState.UPSTREAM_FAILED:
                assert failed and not record.run_anyway, (task_id, states)
            elif record.depends_on and record.state is not TaskState.CANCELLED:
                assert open_deps == 0 and (not failed or record.run_anyway), (task_id, states)
        # Edges are held exactly for the dependencies still to end that have a
        # blocked task waiting for them
        waiting_for = {
            dep
            for t in self.ids
            if self.state(t) is TaskState.BLOCKED
            for dep in self.deps(t)
            if not self.final(dep)
        }
        for task_id in self.ids:
            has = bool(self.journal.dependents(task_id, 1000))
            if task_id in waiting_for:
                assert has, task_id
            if self.final(task_id):
                assert not has, task_id


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(actions=st.lists(graph_action, max_size=40))
def test_dependency_rules_hold_under_random_sequences(actions: list[tuple[Any, ...]]) -> None:
    run = GraphRun(MemoryJournal())
    for act in actions:
        run.act(act)
        run.check()


def test_events_follow_each_tasks_life_in_order(journal: Journal) -> None:
    s = Script(journal)
    s.broker.set_subscriptions(frozenset({"task."}))
    first = s.enqueue("a")
    second = s.enqueue("b", depends_on=(first,))
    third = s.enqueue("c", depends_on=(second,))
    s.zready(b"W", "a", 1)
    ((_, attempt, _, _),) = s.tasks_to(b"W")
    s.send(b"W", ext.fail(first, attempt, "broken", retry=False))
    seen = [(topic, p["id"]) for topic, payloads in emitted(s) for p in payloads]
    # Each task's `enqueued` before its `blocked`; a failed task's own end before
    # the ends it causes, down the chain
    assert seen == [
        ("task.enqueued.a", first),
        ("task.enqueued.b", second),
        ("task.blocked.b", second),
        ("task.enqueued.c", third),
        ("task.blocked.c", third),
        ("task.started.a", first),
        ("task.failed.a", first),
        ("task.dead.a", first),
        ("task.upstream_failed.b", second),
        ("task.upstream_failed.c", third),
    ]
