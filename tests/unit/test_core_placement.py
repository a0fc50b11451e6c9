"""Placement and flow control in the core (docs/protocol.md §16): require, prefer,
affinity, concurrency keys served round robin, the per-key limit, TAGS.

ZBC01 and ZBW01 messages against a real journal (both stores), time moved by hand;
a property test drives random sequences and checks the rules after every step.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.builds import pure_only
from tests.unit.test_core_durable import Script
from zbroker.core import CoreSettings
from zbroker.journal import Journal, MemoryJournal, TaskState
from zbroker.protocol import ext, zbc


def ready(s: Script, wid: bytes, service: str, credit: int, *tags: str) -> None:
    s.send(wid, ext.ready(service, credit, tags))


def handed(s: Script, wid: bytes) -> list[str]:
    """The tasks the worker was handed since the last look, acknowledged."""
    tasks = s.tasks_to(wid)
    if tasks:
        s.send(wid, ext.ack([(t[0], t[1]) for t in tasks]))
    return [t[0] for t in tasks]


def finish(s: Script, wid: bytes, task_id: str) -> None:
    record = s.journal.get(task_id)
    assert record is not None
    s.send(wid, ext.done(task_id, record.attempt, [b"ok"]))


def queues(s: Script) -> dict[str, dict[str, Any]]:
    answer = s.call(b"A", zbc.call(zbc.QUEUES, s.next_rid()))
    return {q["service"]: q for q in answer.meta["queues"]}


def test_a_required_tag_waits_for_a_worker_that_has_it(journal: Journal) -> None:
    s = Script(journal)
    ready(s, b"CPU", "llm", 4, "cpu")
    gpu_task = s.enqueue("llm", b"big", require=("gpu",))
    plain = s.enqueue("llm", b"small")
    # The CPU worker takes the plain task, never the one that needs a GPU
    assert handed(s, b"CPU") == [plain]
    assert s.state(gpu_task) is TaskState.READY
    assert queues(s)["llm"]["unplaceable"] == 1
    s.advance_alive(5, b"CPU")
    assert handed(s, b"CPU") == []
    # When a worker with the tag registers, it gets it at once
    ready(s, b"GPU", "llm", 1, "gpu", "cuda")
    assert handed(s, b"GPU") == [gpu_task]
    assert queues(s)["llm"]["unplaceable"] == 0


def test_tags_change_without_registering_again(journal: Journal) -> None:
    s = Script(journal)
    ready(s, b"W", "llm", 2)
    task = s.enqueue("llm", require=("model:llama",))
    assert handed(s, b"W") == []
    # When the worker loads the model and says so, the task goes to it
    s.send(b"W", ext.tags(["model:llama"]))
    assert handed(s, b"W") == [task]
    workers = s.call(b"A", zbc.call(zbc.WORKERS, s.next_rid())).meta["workers"]
    assert workers[0]["tags"] == ["model:llama"]
    # And after it unloads it, a new such task waits again
    s.send(b"W", ext.tags([]))
    later = s.enqueue("llm", require=("model:llama",))
    assert handed(s, b"W") == [] and s.state(later) is TaskState.READY


def test_the_worker_with_more_preferred_tags_wins(journal: Journal) -> None:
    s = Script(journal)
    ready(s, b"WA", "stt", 1, "en")
    ready(s, b"WB", "stt", 1, "de", "fast")
    ready(s, b"WC", "stt", 1, "de")
    task = s.enqueue("stt", prefer=("de", "fast"))
    assert handed(s, b"WB") == [task]
    assert handed(s, b"WA") == [] and handed(s, b"WC") == []


def test_affinity_keeps_a_key_on_its_worker_while_it_lives(journal: Journal) -> None:
    s = Script(journal)
    ready(s, b"WA", "chat", 1)
    ready(s, b"WB", "chat", 1)
    first = s.enqueue("chat", affinity="conv-7")
    (holder,) = [w for w in (b"WA", b"WB") if handed(s, w) == [first]]
    other = b"WB" if holder == b"WA" else b"WA"
    # While its worker is busy, the next task of the key waits for it, not for the other
    second = s.enqueue("chat", affinity="conv-7")
    assert handed(s, other) == [] and s.state(second) is TaskState.READY
    finish(s, holder, first)
    assert handed(s, holder) == [second]
    finish(s, holder, second)
    # When its worker is gone, another takes the key
    s.send(holder, ext.disconnect())
    third = s.enqueue("chat", affinity="conv-7")
    assert handed(s, other) == [third]


def test_keys_are_served_round_robin(journal: Journal) -> None:
    # The bar: key A with 100 tasks enqueued first, then key B with 5, two
    # workers: all of B's start before A's twentieth
    s = Script(journal)
    a = [s.enqueue("jobs", b"a%d" % i, concurrency_key="A") for i in range(100)]
    b = [s.enqueue("jobs", b"b%d" % i, concurrency_key="B") for i in range(5)]
    ready(s, b"W1", "jobs", 1)
    ready(s, b"W2", "jobs", 1)
    order: list[str] = []
    while len(order) < 105:
        for wid in (b"W1", b"W2"):
            for task_id in handed(s, wid):
                order.append(task_id)
                finish(s, wid, task_id)
    assert max(order.index(t) for t in b) < order.index(a[19])
    assert [t for t in order if t in a] == a  # each key still in enqueue order


def test_priority_comes_before_round_robin(journal: Journal) -> None:
    s = Script(journal)
    low = [s.enqueue("jobs", concurrency_key="A") for _ in range(3)]
    high = s.enqueue("jobs", concurrency_key="B", priority=5)
    ready(s, b"W", "jobs", 1)
    assert handed(s, b"W") == [high]
    finish(s, b"W", high)
    assert handed(s, b"W") == [low[0]]


def test_the_per_key_limit_caps_each_key_and_survives_a_restart(journal: Journal) -> None:
    s = Script(journal)
    answer = s.call(b"A", zbc.call(zbc.LIMIT, s.next_rid(), service="jobs", limit=1, per_key=True))
    assert answer.meta["per_key"] is True and answer.meta["limit"] == 1
    a = [s.enqueue("jobs", concurrency_key="A") for _ in range(3)]
    b = [s.enqueue("jobs", concurrency_key="B") for _ in range(3)]
    ready(s, b"W", "jobs", 10)
    assert sorted(handed(s, b"W")) == sorted([a[0], b[0]])
    assert queues(s)["jobs"]["key_limit"] == 1
    # When the broker restarts, the limit holds
    s.restart(journal)
    ready(s, b"W2", "jobs", 10)
    assert sorted(handed(s, b"W2")) == sorted([a[0], b[0]])  # recovered: again one per key


def test_malformed_placement_options_are_refused(journal: Journal) -> None:
    s = Script(journal)
    for meta in (
        {"require": "gpu"},
        {"require": [""]},
        {"prefer": ["x"] * 33},
        {"affinity": 5},
        {"concurrency_key": ""},
    ):
        frames = [b"", zbc.ZBC01, zbc.ENQUEUE, ext.pack_meta({"rid": 1, "service": "s", **meta})]
        answer = s.call(b"C", frames)
        assert not answer.ok and answer.meta["code"] == zbc.E_BAD_REQUEST, meta
    answer = s.call(b"A", zbc.call(zbc.LIMIT, s.next_rid(), service="s", limit=1, per_key=1))
    assert not answer.ok and answer.meta["code"] == zbc.E_BAD_REQUEST


# ------------------------------------------------------------- property

TAGS = ("gpu", "de", "big")
KEYS = (None, "u1", "u2", "u3")

action = st.one_of(
    st.tuples(
        st.just("enqueue"),
        st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
        st.lists(st.sampled_from(TAGS), max_size=2, unique=True),
        st.sampled_from(KEYS),
        st.integers(0, 2),
    ),
    st.tuples(
        st.just("worker"),
        st.integers(0, 3),
        st.lists(st.sampled_from(TAGS), max_size=3, unique=True),
        st.integers(1, 3),
    ),
    st.tuples(st.just("tags"), st.integers(0, 3), st.lists(st.sampled_from(TAGS), unique=True)),
    st.tuples(st.just("finish"), st.integers(0, 3)),
    st.tuples(st.just("leave"), st.integers(0, 3)),
    st.tuples(st.just("limit"), st.sampled_from([None, 1, 2])),
)


class Run:
    """A core under random actions, and what the test knows of its workers."""

    def __init__(self) -> None:
        self.journal = MemoryJournal()
        self.s = Script(self.journal, CoreSettings(window_per_service=64, seed=2))
        self.tags: dict[bytes, set[str]] = {}  # live workers and their tags
        self.holding: dict[bytes, list[str]] = {}
        self.credit: dict[bytes, int] = {}
        self.key_limit: int | None = None

    def act(self, act: tuple[Any, ...]) -> None:
        s, kind = self.s, act[0]
        wid = b"W%d" % act[1] if kind in ("worker", "tags", "finish", "leave") else b""
        if kind == "enqueue":
            _, require, prefer, key, priority = act
            s.enqueue(
                "svc",
                require=tuple(require),
                prefer=tuple(prefer),
                concurrency_key=key,
                priority=priority,
            )
        elif kind == "worker" and wid not in self.tags:
            self.tags[wid], self.holding[wid], self.credit[wid] = set(act[2]), [], act[3]
            ready(s, wid, "svc", act[3], *act[2])
        elif kind == "tags" and wid in self.tags:
            self.tags[wid] = set(act[2])
            s.send(wid, ext.tags(act[2]))
        elif kind == "finish" and self.holding.get(wid):
            finish(s, wid, self.holding[wid].pop(0))
        elif kind == "leave" and wid in self.tags:
            s.send(wid, ext.disconnect())
            del self.tags[wid], self.holding[wid], self.credit[wid]
        elif kind == "limit":
            self.key_limit = act[1]
            s.call(
                b"A", zbc.call(zbc.LIMIT, s.next_rid(), service="svc", limit=act[1], per_key=True)
            )

    def held_of_key(self, key: str) -> int:
        return sum(
            1
            for held in self.holding.values()
            for task_id in held
            if (record := self.journal.get(task_id)) is not None and record.concurrency_key == key
        )

    def check_deliveries(self) -> None:
        """Every delivery: to a worker that has every required tag (as of now), and never
        past the per-key limit (lowering it does not take back what already runs)."""
        for wid, tags in self.tags.items():
            for task_id in handed(self.s, wid):
                record = self.journal.get(task_id)
                assert record is not None
                assert set(record.require) <= tags, (record.require, tags)
                key = record.concurrency_key
                if self.key_limit is not None and key is not None:
                    assert self.held_of_key(key) < self.key_limit, key
                self.holding[wid].append(task_id)

    def check_no_idle_worker(self) -> None:
        """No worker with spare credit idles while a task it may take waits, unless the
        per-key limit holds that task back."""
        waiting = self.journal.ready("svc", 10_000)
        for wid, held in self.holding.items():
            if len(held) >= self.credit[wid]:
                continue
            for record in waiting:
                if set(record.require) <= self.tags[wid]:
                    limited = self.key_limit is not None and record.concurrency_key is not None
                    assert limited, (wid, record.id, record.require, self.tags[wid])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(actions=st.lists(action, max_size=40))
def test_placement_rules_hold_under_random_sequences(actions: list[tuple[Any, ...]]) -> None:
    run = Run()
    for act in actions:
        run.act(act)
        run.check_deliveries()
        run.check_no_idle_worker()


# ------------------------------------------------------------------ rates


def starts_over(s: Script, wid: bytes, seconds: float, step: float = 0.05) -> list[float]:
    """When each task was handed to the worker within `seconds` (each finished at once)."""
    times: list[float] = []
    end = s.now + seconds
    while s.now < end - 1e-9:
        for task_id in handed(s, wid):
            times.append(round(s.now, 3))
            finish(s, wid, task_id)
        s.advance(step)
        s.send(wid, ext.heartbeat())
    return times


def test_a_service_rate_spaces_deliveries_and_survives_a_restart(journal: Journal) -> None:
    s = Script(journal)
    answer = s.call(b"A", zbc.call(zbc.RATE, s.next_rid(), service="tts", rate=4.0, burst=2))
    assert answer.meta == {
        "rid": answer.rid,
        "service": "tts",
        "rate": 4.0,
        "burst": 2,
        "per_key": False,
    }
    for _ in range(12):
        s.enqueue("tts")
    ready(s, b"W", "tts", 50)
    times = starts_over(s, b"W", 2.0)
    # A burst of 2 at once, then one every 0.25 s: 2 + 4 per second
    assert times[:2] == [0.0, 0.0]
    assert 9 <= len(times) <= 11
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert all(0.15 < g < 0.35 for g in gaps), gaps  # seen at 0.05 s steps
    assert (times[-1] - times[1]) / (len(times) - 2) == pytest.approx(0.25, abs=0.02)
    assert queues(s)["tts"]["rate"] == {"per_s": 4.0, "burst": 2}
    s.restart(journal)
    assert queues(s)["tts"]["rate"] == {"per_s": 4.0, "burst": 2}
    # Removing it lets the rest go at once
    s.call(b"A", zbc.call(zbc.RATE, s.next_rid(), service="tts", rate=None))
    assert queues(s)["tts"]["rate"] is None


def test_a_per_key_rate_holds_each_key_to_it(journal: Journal) -> None:
    s = Script(journal)
    s.call(b"A", zbc.call(zbc.RATE, s.next_rid(), service="bot", rate=2.0, burst=1, per_key=True))
    for i in range(6):
        s.enqueue("bot", b"a%d" % i, concurrency_key="A")
        s.enqueue("bot", b"b%d" % i, concurrency_key="B")
    ready(s, b"W", "bot", 50)
    times = starts_over(s, b"W", 1.2)
    # Each key: one now, then one every 0.5 s: 3 each in 1.2 s
    assert len(times) == 6 and times.count(0.0) == 2
    assert queues(s)["bot"]["key_rate"] == {"per_s": 2.0, "burst": 1}


def test_malformed_rates_are_refused(journal: Journal) -> None:
    s = Script(journal)
    for fields in ({"rate": 0}, {"rate": -1}, {"rate": "x"}, {"rate": 1, "burst": 0}):
        answer = s.call(b"A", zbc.call(zbc.RATE, s.next_rid(), service="svc", **fields))
        assert not answer.ok and answer.meta["code"] == zbc.E_BAD_REQUEST, fields


# --------------------------------------------------------------- debounce


def test_debounce_replaces_the_waiting_tasks_payload(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("index", b"v1", key="file:a.txt", debounce_s=2.0)
    assert s.state(first) is TaskState.DELAYED
    for version in (b"v2", b"v3"):
        s.advance(0.5)
        answer = s.call(
            b"C",
            zbc.enqueue(
                s.next_rid(),
                "index",
                [[version]],
                zbc.TaskOptions(key="file:a.txt", debounce_s=2.0),
            ),
        )
        assert answer.meta["ids"] == [first] and answer.meta["replaced"] == [0]
    ready(s, b"W", "index", 5)
    assert handed(s, b"W") == []  # the window from the first enqueue is not over
    s.advance(1.1)
    ((task_id, _, payload, _),) = s.tasks_to(b"W")
    # One task ran, with the last payload
    assert (task_id, payload) == (first, b"v3")
    assert s.broker.stats.tasks_debounced == 2
    finish(s, b"W", first)
    # Once it has run, the next enqueue of the key is a new task
    again = s.enqueue("index", b"v4", key="file:a.txt", debounce_s=2.0)
    assert again != first and s.state(again) is TaskState.DELAYED
    record = journal.get(first)
    assert record is not None and record.key is None and record.state is TaskState.DONE


def test_debounce_of_a_ready_task_in_the_window_sends_the_new_payload(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("index", b"old", key="k", debounce_s=0.5)
    s.advance(1.0)  # due: ready, in the window with its payload in memory
    assert s.state(first) is TaskState.READY
    s.call(
        b"C",
        zbc.enqueue(s.next_rid(), "index", [[b"new"]], zbc.TaskOptions(key="k", debounce_s=0.5)),
    )
    ready(s, b"W", "index", 1)
    ((_, _, payload, _),) = s.tasks_to(b"W")
    assert payload == b"new"


def test_debounce_needs_a_key_and_no_delay(journal: Journal) -> None:
    s = Script(journal)
    for meta in (
        {"debounce_s": 1.0},
        {"debounce_s": 0, "key": "k"},
        {"debounce_s": 1.0, "key": "k", "delay_s": 1.0},
    ):
        frames = [b"", zbc.ZBC01, zbc.ENQUEUE, ext.pack_meta({"rid": 1, "service": "s", **meta})]
        answer = s.call(b"C", frames)
        assert not answer.ok and answer.meta["code"] == zbc.E_BAD_REQUEST, meta


def test_tasks_waiting_for_an_absent_worker_do_not_hold_back_those_behind(
    journal: Journal,
) -> None:
    # Given a window of 4, and 10 tasks that need a GPU queued before 3 plain ones
    s = Script(journal, CoreSettings(window_per_service=4, seed=1))
    gpu = [s.enqueue("llm", require=("gpu",)) for _ in range(10)]
    plain = [s.enqueue("llm") for _ in range(3)]
    # When a CPU worker comes, it gets the plain tasks from past the window
    ready(s, b"CPU", "llm", 5)
    assert sorted(handed(s, b"CPU")) == sorted(plain)
    # And a plain task enqueued while the last look found nothing is taken within
    # BEYOND_EVERY_S (the broker looks again then)
    later = s.enqueue("llm")
    s.advance_alive(0.3, b"CPU")
    assert handed(s, b"CPU") == [later]
    assert all(s.state(t) is TaskState.READY for t in gpu)


def test_nothing_to_wait_for_leaves_no_wake_behind(journal: Journal) -> None:
    # Given tasks no ready worker may take, and a rate that held work back once
    s = Script(journal)
    ready(s, b"CPU", "llm", 2)
    s.enqueue("llm", require=("gpu",))
    s.call(b"A", zbc.call(zbc.RATE, s.next_rid(), service="tts", rate=10.0, burst=1))
    s.enqueue("tts")
    s.enqueue("tts")
    ready(s, b"W", "tts", 5)
    assert len(handed(s, b"W")) == 1
    # Then the broker wakes for the rate's next token, and only for it
    assert 0 < s.broker.routing.wake_at - s.now <= 0.1 + 1e-9
    s.advance_alive(0.2, b"CPU", b"W")
    assert len(handed(s, b"W")) == 1
    assert s.broker.routing.wake_at == float("inf")  # nothing left to wake for


@pure_only
def test_a_dispatch_reads_past_the_window_once_however_many_it_delivers() -> None:
    # Given a window of 4 full of tasks no worker may take, 300 plain tasks behind it
    journal = MemoryJournal()
    s = Script(journal, CoreSettings(window_per_service=4, seed=1))
    for _ in range(4):
        s.enqueue("llm", require=("gpu",))
    plain = [s.enqueue("llm") for _ in range(300)]
    reads: list[int] = []
    ready_read = journal.ready

    def counted(service: str, limit: int, after: Any = None) -> Any:
        reads.append(limit)
        return ready_read(service, limit, after)

    journal.ready = counted  # type: ignore[method-assign]
    # When a worker with credit for all of them registers
    ready(s, b"CPU", "llm", 1000)
    # Then it gets them all in one pass, from one read past the window
    assert sorted(handed(s, b"CPU")) == sorted(plain)
    assert reads.count(2048) == 1
