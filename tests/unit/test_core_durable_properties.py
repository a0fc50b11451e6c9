"""Property tests of durable tasks: random conversations against the core and a journal.

Whatever clients and workers do and however time moves: the core never raises;
its counters and ready window agree with the journal; every INFLIGHT task is
held by exactly one live worker within its credit, and every task a worker
holds is INFLIGHT; no task is completed twice; every confirmed task is in the
journal; every waiting call is answered at most once; and after the workers
finish everything, nothing ready is left behind.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.core_script import EPOCH
from tests.unit.test_lifecycle import replay
from zbroker.core import Broker, CoreSettings
from zbroker.journal import Durability, Journal, MemoryJournal, TaskState
from zbroker.journal.postgres import PostgresJournal
from zbroker.protocol import ext, zbc

READY, DELAYED, INFLIGHT = TaskState.READY, TaskState.DELAYED, TaskState.INFLIGHT
CFG = CoreSettings(
    heartbeat_interval_s=1.0,
    heartbeat_liveness=3,
    ack_timeout_s=2.5,
    retry_base_s=0.5,
    retry_max_s=2.0,
    retention_s=30.0,
    window_per_service=3,  # tiny: most of each queue stays in the journal
    default_max_attempts=3,
    seed=1,
)
ZWORKERS = [b"Z1", b"Z2", b"Z3"]
SERVICES = ["a", "b"]

_enqueue = st.tuples(
    st.just("enqueue"),
    st.sampled_from(SERVICES),
    st.integers(1, 4),  # batch size
    st.sampled_from([-1, 0, 0, 2]),  # priority
    st.sampled_from([None, None, 1.5]),  # delay_s
    st.sampled_from([None, None, 3.0]),  # ttl_s
    st.sampled_from([None, 1, 2]),  # max_attempts
    st.sampled_from([None, None, "k1", "k2"]),  # key (batches of 1 only)
    st.booleans(),  # REQUEST (wait for the result) instead of ENQUEUE
)
_zready = st.tuples(
    st.just("zready"), st.sampled_from(ZWORKERS), st.sampled_from(SERVICES), st.integers(1, 3)
)
_held = st.integers(0, 3)
event_st = st.one_of(
    _enqueue,
    _enqueue,
    _zready,
    st.tuples(st.just("done"), st.sampled_from(ZWORKERS), _held, st.booleans()),
    st.tuples(st.just("done"), st.sampled_from(ZWORKERS), _held, st.booleans()),
    st.tuples(st.just("fail"), st.sampled_from(ZWORKERS), _held, st.booleans(), st.booleans()),
    st.tuples(st.just("ack"), st.sampled_from(ZWORKERS), _held),
    st.tuples(st.just("heartbeat"), st.sampled_from(ZWORKERS)),
    st.tuples(st.just("disconnect"), st.sampled_from(ZWORKERS)),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("result"), st.integers(0, 30), st.sampled_from([0.0, 2.0])),
    st.tuples(st.just("redrive"), st.sampled_from(SERVICES)),
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=4.0)),
)


class Model:
    def __init__(self, journal: Journal | None = None) -> None:
        self.journal = MemoryJournal() if journal is None else journal
        self.now = 0.0
        self.broker = Broker(CFG, self.now, self.journal, epoch_offset=EPOCH)
        self.rid = 0
        self.confirmed: set[str] = set()
        self.pending_rids: dict[int, str] = {}  # calls that still owe an answer
        self.answered: Counter[int] = Counter()
        self.completed: Counter[str] = Counter()
        self.held: dict[bytes, list[tuple[str, int]]] = {w: [] for w in ZWORKERS}
        # Event kind -> the step that plays it.
        self._steps: dict[str, Callable[[tuple[Any, ...]], None]] = {
            "enqueue": self._enqueue,
            "zready": self._zready,
            "done": self._done_or_fail,
            "fail": self._done_or_fail,
            "ack": self._ack,
            "heartbeat": self._heartbeat,
            "disconnect": self._disconnect,
            "cancel": self._cancel_or_result,
            "result": self._cancel_or_result,
            "redrive": self._redrive,
            "advance": self._advance,
        }

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        self.broker.receive([peer, *frames], self.now)
        self.pass_end()

    def pass_end(self) -> None:
        self.journal.commit()
        for frames in self.broker.outbox:
            peer = frames[0]
            if peer == b"C":
                answer = zbc.decode_answer(frames[1:])
                if answer.ok and "ids" in answer.meta:
                    self.confirmed.update(answer.meta["ids"])
                    if answer.rid in self.pending_rids and self.pending_rids[answer.rid] == "":
                        self.pending_rids[answer.rid] = answer.meta["ids"][0]
                        continue
                if "state" in answer.meta and answer.rid in self.pending_rids:
                    self.answered[answer.rid] += 1
                    if answer.meta["state"] in ("done", "dead", "cancelled", "expired"):
                        del self.pending_rids[answer.rid]
            elif frames[2:4] == [ext.ZBW01, ext.TASK]:
                meta = ext.unpack_meta(frames[4])
                self.held[peer].append((meta["id"], meta["attempt"]))
            elif frames[2:4] == [ext.ZBW01, ext.CANCEL]:
                meta = ext.unpack_meta(frames[4])
                ref = (meta["id"], meta["attempt"])
                if ref in self.held[peer]:
                    self.held[peer].remove(ref)
            elif frames[2:4] == [ext.ZBW01, ext.DISCONNECT]:
                self.held[peer].clear()
        self.broker.outbox = []

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self.broker.next_tick_at <= end:
            self.now = max(self.now, self.broker.next_tick_at)
            self.broker.tick(self.now)
            self.pass_end()
        self.now = end

    def pick(self, wid: bytes, index: int) -> tuple[str, int] | None:
        held = self.held[wid]
        return held[index % len(held)] if held else None

    def task_ids(self) -> list[str]:
        return sorted(self.confirmed)

    def apply(self, event: tuple[Any, ...]) -> None:
        self._steps[event[0]](event)

    def _enqueue(self, event: tuple[Any, ...]) -> None:
        _, service, n, prio, delay, ttl, attempts, key, wait = event
        self.rid += 1
        options = zbc.TaskOptions(
            priority=prio,
            delay_s=delay,
            ttl_s=ttl,
            max_attempts=attempts,
            key=key if n == 1 else None,
        )
        if wait:
            self.pending_rids[self.rid] = ""
            self.send(b"C", zbc.request(self.rid, service, [b"p"], options, wait_s=5.0))
        else:
            payloads = [[b"p%d" % i] for i in range(n)]
            self.send(b"C", zbc.enqueue(self.rid, service, payloads, options, batch=n > 1))

    def _zready(self, event: tuple[Any, ...]) -> None:
        _, wid, service, credit = event
        self.held[wid].clear()
        self.send(wid, ext.ready(service, credit))

    def _done_or_fail(self, event: tuple[Any, ...]) -> None:
        kind, wid, index, right = event[0], event[1], event[2], event[3]
        ref = self.pick(wid, index)
        if ref is None:
            return
        task_id, attempt = ref
        attempt = attempt if right else attempt + 1
        if kind == "done":
            self._done(wid, task_id, attempt)
        else:
            self.send(wid, ext.fail(task_id, attempt, "x", retry=event[4]))
        if right and ref in self.held[wid]:
            self.held[wid].remove(ref)

    def _done(self, wid: bytes, task_id: str, attempt: int) -> None:
        """Sends DONE and counts the task as completed if this DONE is what completed it."""
        record_before = self.journal.get(task_id)
        self.send(wid, ext.done(task_id, attempt, [b"r"]))
        record = self.journal.get(task_id)
        if (
            record is not None
            and record.state is TaskState.DONE
            and (record_before is None or record_before.state is not TaskState.DONE)
        ):
            self.completed[task_id] += 1

    def _ack(self, event: tuple[Any, ...]) -> None:
        ref = self.pick(event[1], event[2])
        if ref is not None:
            self.send(event[1], ext.ack([ref]))

    def _heartbeat(self, event: tuple[Any, ...]) -> None:
        self.send(event[1], ext.heartbeat())

    def _disconnect(self, event: tuple[Any, ...]) -> None:
        self.held[event[1]].clear()
        self.send(event[1], ext.disconnect())

    def _cancel_or_result(self, event: tuple[Any, ...]) -> None:
        ids = self.task_ids()
        if not ids:
            return
        task_id = ids[event[1] % len(ids)]
        self.rid += 1
        if event[0] == "cancel":
            self.send(b"C", zbc.call(zbc.CANCEL, self.rid, id=task_id))
        else:
            if event[2] > 0:
                self.pending_rids[self.rid] = task_id
            self.send(b"C", zbc.call(zbc.RESULT, self.rid, id=task_id, wait_s=event[2]))

    def _redrive(self, event: tuple[Any, ...]) -> None:
        self.rid += 1
        self.send(b"C", zbc.call(zbc.REDRIVE, self.rid, service=event[1]))

    def _advance(self, event: tuple[Any, ...]) -> None:
        self.advance(event[1])

    def check(self) -> None:
        broker = self.broker
        counts = self.journal.counts()
        for name, service in broker.services.items():
            per_state = counts.get(name.decode(), {})
            ready = per_state.get(TaskState.READY, 0)
            assert service.ready_count == ready
            assert service.waiting_count == ready + per_state.get(TaskState.DELAYED, 0)
            window = service.window
            assert window == sorted(window) and len(window) <= CFG.window_per_service
            assert set(service.records) == {e[2] for e in window}
            for record in service.records.values():
                assert record == self.journal.get(record.id)
            # The window is exactly the best len(window) READY tasks.
            best = self.journal.ready(name.decode(), len(window))
            assert [e[2] for e in reversed(window)] == [r.id for r in best]
        for name, per_state in counts.items():
            if per_state.get(TaskState.READY) or per_state.get(TaskState.DELAYED):
                assert name.encode() in broker.services
        inflight = {r.id for r in self.journal.inflight()}
        held = {}
        for worker in broker.workers.values():
            assert len(worker.tasks) <= worker.credit
            for tid in worker.tasks:
                assert tid not in held
                held[tid] = worker
        assert set(held) == inflight
        for task_id in self.confirmed:
            record = self.journal.get(task_id)
            assert record is not None  # retention outlives these runs
            # Every task got where it is by the lifecycle table's moves, in order.
            if len(record.history) < CFG.history_limit:
                assert record.state in replay(record.history)
        assert all(n == 1 for n in self.completed.values())
        assert all(n == 1 for n in self.answered.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(event_st, min_size=15, max_size=80))
def test_random_conversations_keep_every_invariant(events: list[tuple[Any, ...]]) -> None:
    play(Model(), events)


@settings(max_examples=60, deadline=None)
@given(st.lists(event_st, min_size=15, max_size=80))
def test_random_conversations_on_postgres_keep_every_invariant(
    postgres_server: Any, events: list[tuple[Any, ...]]
) -> None:
    # The same conversations on a journal in PostgreSQL (tests/pg.py), a fresh schema
    # per example; after each, the database holds what the store holds in memory.
    journal = PostgresJournal(postgres_server.fresh_url(), Durability.ASYNC)
    try:
        play(Model(journal), events)
        journal.commit()
        assert journal.verify() == []
    finally:
        journal.close()


def play(model: Model, events: list[tuple[Any, ...]]) -> None:
    for event in events:
        model.apply(event)
        model.check()
    # Drain: a worker per service takes and finishes everything left.
    for service in SERVICES:
        model.send(b"Z1", ext.disconnect())
        model.held[b"Z1"].clear()
        model.send(b"Z1", ext.ready(service, 3))
        for _ in range(200):
            while model.held[b"Z1"]:
                task_id, attempt = model.held[b"Z1"].pop()
                model.send(b"Z1", ext.done(task_id, attempt, [b"r"]))
            left = model.journal.counts().get(service, {})
            if not any(left.get(state) for state in (READY, DELAYED, INFLIGHT)):
                break
            model.advance(0.5)
            model.send(b"Z1", ext.heartbeat())
        model.check()
        left = model.journal.counts().get(service, {})
        assert not left.get(TaskState.READY) and not left.get(TaskState.DELAYED)
        assert not left.get(TaskState.INFLIGHT)
