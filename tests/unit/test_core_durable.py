"""Durable tasks in the core: ZBC01 calls against a real journal, time moved by hand.

Every test runs against the in-memory journal and the LMDB store: the core must
not depend on which one it is handed.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from tests.unit.core_script import EPOCH, CoreScript
from zbroker.core import CoreSettings
from zbroker.journal import Journal, TaskState
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.events import MAX_BATCH_EVENTS

SETTINGS = CoreSettings(
    heartbeat_interval_s=1.0,
    heartbeat_liveness=3,
    ack_timeout_s=2.0,
    default_max_attempts=3,
    retry_base_s=1.0,
    retry_max_s=8.0,
    retention_s=100.0,
    seed=7,
)


class Script(CoreScript):
    def __init__(self, journal: Journal, settings: CoreSettings = SETTINGS) -> None:
        super().__init__(settings, journal)
        self.journal = journal
        self.rid = 0

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        self.broker.receive([peer, *frames], self.now)
        self.journal.commit()  # as the runtime does at the end of each pass

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        self.journal.commit()

    # --- client side
    def call(self, cid: bytes, frames: list[bytes]) -> zbc.Answer:
        """Send a call and return the (first) answer to it."""
        self.send(cid, frames)
        answers = self.answers(cid)
        assert answers, "no answer"
        return answers[0]

    def answers(self, cid: bytes) -> list[zbc.Answer]:
        return [zbc.decode_answer(f[1:]) for f in self.sent_to(cid)]

    def sent_to(self, peer: bytes) -> list[list[bytes]]:
        out = self.broker.outbox
        mine = [f for f in out if f[0] == peer]
        self.broker.outbox = [f for f in out if f[0] != peer]
        return mine

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def enqueue(self, service: str, payload: bytes = b"x", **options: Any) -> str:
        answer = self.call(
            b"C",
            zbc.enqueue(self.next_rid(), service, [[payload]], zbc.TaskOptions(**options)),
        )
        assert answer.ok, answer.meta
        task_id: str = answer.meta["ids"][0]
        return task_id

    def state(self, task_id: str) -> TaskState:
        record = self.journal.get(task_id)
        assert record is not None
        return record.state

    def advance_alive(self, seconds: float, *workers: bytes) -> None:
        """Move time in 0.5 s steps, the given workers heartbeating at every step."""
        while seconds > 1e-9:
            step = min(0.5, seconds)
            self.advance(step)
            seconds -= step
            for wid in workers:
                self.send(wid, ext.heartbeat())

    # --- worker side
    def zready(self, wid: bytes, service: str, credit: int) -> None:
        self.send(wid, ext.ready(service, credit))

    def tasks_to(self, peer: bytes) -> list[tuple[str, int, bytes, dict[str, Any]]]:
        """(id, attempt, payload, meta) of every TASK sent to `peer` since the last call."""
        found = []
        for frames in self.sent_to(peer):
            if frames[2:4] == [ext.ZBW01, ext.TASK]:
                meta = ext.unpack_meta(frames[4])
                found.append((meta["id"], meta["attempt"], b"".join(frames[5:]), meta))
        return found

    def cancels_to(self, peer: bytes) -> list[tuple[str, int]]:
        return [
            (m["id"], m["attempt"])
            for f in self.sent_to(peer)
            if f[2:4] == [ext.ZBW01, ext.CANCEL]
            for m in [ext.unpack_meta(f[4])]
        ]


def test_enqueue_is_stored_delivered_within_credit_and_its_result_kept(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc", b"hello", headers={"correlation_id": "c1"}, timeout_s=30)
    assert s.state(task_id) is TaskState.READY
    s.zready(b"W", "svc", 1)
    ((tid, attempt, payload, meta),) = s.tasks_to(b"W")
    assert (tid, attempt, payload) == (task_id, 1, b"hello")
    assert meta["headers"] == {"correlation_id": "c1"} and meta["timeout_s"] == 30
    assert s.state(task_id) is TaskState.INFLIGHT
    s.send(b"W", ext.ack([(tid, 1)]))
    s.send(b"W", ext.done(tid, 1, [b"HELLO", b"!"]))
    record = journal.get(task_id)
    assert record is not None and record.state is TaskState.DONE
    assert record.keep_until == pytest.approx(record.finished_at + 100.0)  # type: ignore[operator]
    answer = s.call(b"C2", zbc.call(zbc.RESULT, 9, id=task_id))
    assert answer.ok and answer.meta["state"] == "done" and answer.frames == (b"HELLO", b"!")
    assert s.broker.stats.tasks_done == 1


def test_a_batch_is_one_enqueue_and_credit_bounds_delivery(journal: Journal) -> None:
    s = Script(journal)
    answer = s.call(b"C", zbc.enqueue(1, "svc", [[b"%d" % i] for i in range(5)], batch=True))
    assert answer.ok and len(answer.meta["ids"]) == 5 and len(set(answer.meta["ids"])) == 5
    s.zready(b"W", "svc", 2)
    assert [t[2] for t in s.tasks_to(b"W")] == [b"0", b"1"]
    s.send(b"W", ext.done(answer.meta["ids"][0], 1, [b"r"]))
    assert [t[2] for t in s.tasks_to(b"W")] == [b"2"]


def test_request_is_confirmed_then_answered_with_the_result(journal: Journal) -> None:
    s = Script(journal)
    s.send(b"C", zbc.request(4, "svc", [b"q"]))
    (accepted,) = s.answers(b"C")
    assert accepted.rid == 4 and "state" not in accepted.meta
    (task_id,) = accepted.meta["ids"]
    s.zready(b"W", "svc", 1)
    s.tasks_to(b"W")
    s.send(b"W", ext.done(task_id, 1, [b"a"]))
    (final,) = s.answers(b"C")
    assert final.rid == 4 and final.meta == {"rid": 4, "id": task_id, "state": "done"}
    assert final.frames == (b"a",)


def test_priorities_first_then_enqueue_order_with_a_small_window(journal: Journal) -> None:
    # A window of 4 with 60 tasks: most of the queue stays in the journal, and
    # tasks keep arriving while others are delivered.
    s = Script(journal, CoreSettings(window_per_service=4, seed=1))
    rng = random.Random(3)
    expected: list[tuple[int, int, str]] = []
    for n in range(40):
        prio = rng.choice([-5, 0, 0, 3, 9])
        expected.append((-prio, n, s.enqueue("svc", b"%d" % n, priority=prio)))
    assert len(s.broker.services[b"svc"].window) <= 4
    s.zready(b"W", "svc", 1)
    delivered = []
    for n in range(40, 60):
        ((tid, attempt, _, _),) = s.tasks_to(b"W")
        delivered.append(tid)
        prio = rng.choice([-5, 0, 3, 9])
        expected.append((-prio, n, s.enqueue("svc", b"%d" % n, priority=prio)))
        s.send(b"W", ext.done(tid, attempt, []))
    while True:
        sent = s.tasks_to(b"W")
        if not sent:
            break
        ((tid, attempt, _, _),) = sent
        delivered.append(tid)
        s.send(b"W", ext.done(tid, attempt, []))
    assert len(delivered) == 60 and len(set(delivered)) == 60
    # The tasks delivered after the last enqueue come in exact priority/FIFO order.
    tail = delivered[20:]
    order = {tid: (p, n) for p, n, tid in expected}
    assert tail == sorted(tail, key=order.__getitem__)
    assert len(s.broker.services[b"svc"].window) <= 4


def test_delay_and_not_before_hold_a_task_in_the_journal(journal: Journal) -> None:
    s = Script(journal)
    s.zready(b"W", "svc", 5)
    late = s.enqueue("svc", b"late", delay_s=5.0)
    later = s.enqueue("svc", b"later", not_before=EPOCH + 8.0)
    assert s.state(late) is TaskState.DELAYED and s.state(later) is TaskState.DELAYED
    s.advance_alive(4.9, b"W")
    assert s.tasks_to(b"W") == []
    s.advance_alive(0.2, b"W")
    assert [t[0] for t in s.tasks_to(b"W")] == [late]
    s.send(b"W", ext.ack([(late, 1)]))
    s.advance_alive(3.0, b"W")
    assert [t[0] for t in s.tasks_to(b"W")] == [later]


def test_ttl_expires_a_task_that_did_not_start_in_time(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc", ttl_s=2.0)
    s.advance(2.5)
    assert s.state(task_id) is TaskState.EXPIRED
    answer = s.call(b"C", zbc.call(zbc.RESULT, 5, id=task_id))
    assert answer.meta["state"] == "expired" and "ttl" in answer.meta["error"]
    s.zready(b"W", "svc", 1)
    assert s.tasks_to(b"W") == []
    assert s.broker.stats.tasks_expired == 1


def test_ttl_bounds_only_the_wait_for_a_first_start(journal: Journal) -> None:
    s = Script(journal)
    retried, orphaned, poisoned = (s.enqueue("svc", ttl_s=2.0, max_attempts=m) for m in (3, 3, 1))
    s.zready(b"W", "svc", 3)
    assert {t[0] for t in s.tasks_to(b"W")} == {retried, orphaned, poisoned}
    record = journal.get(retried)
    assert record is not None and record.expires_at is None  # started: no longer expires
    s.send(b"W", ext.ack([(retried, 1), (orphaned, 1), (poisoned, 1)]))
    s.advance_alive(3.0, b"W")  # every ttl has passed
    # When one attempt fails, its worker's connection goes, and a dead letter is redriven
    s.send(b"W", ext.fail(retried, 1, "flaky", delay_s=0))
    s.send(b"W", ext.fail(poisoned, 1, "bad", retry=False))
    s.send(b"W", ext.disconnect())
    redriven = s.call(b"C", zbc.call(zbc.REDRIVE, s.next_rid(), service="svc", ids=[poisoned]))
    assert redriven.meta["ids"] == [poisoned]
    # Then all three run again on the next worker: none is expired
    s.zready(b"W2", "svc", 3)
    again = {t[0]: t[1] for t in s.tasks_to(b"W2")}
    # (the retry went straight back to W as attempt 2, then came back with W's connection)
    assert again == {retried: 3, orphaned: 2, poisoned: 1}
    assert s.broker.stats.tasks_expired == 0


def test_a_ttl_that_passes_while_ready_expires_the_task_with_a_history_entry(
    journal: Journal,
) -> None:
    s = Script(journal)
    s.zready(b"W", "svc", 1)
    busy = s.enqueue("svc")
    late = s.enqueue("svc", ttl_s=1.0)
    assert [t[0] for t in s.tasks_to(b"W")] == [busy]
    s.now += 1.5  # no timer pass: the dispatch is the first to see the ttl passed
    s.send(b"W", ext.done(busy, 1, []))
    assert s.tasks_to(b"W") == []
    record = journal.get(late)
    assert record is not None and record.state is TaskState.EXPIRED
    assert [h[0] for h in record.history] == ["enqueued", "expired"]


def test_idempotency_key_returns_the_existing_task(journal: Journal) -> None:
    s = Script(journal)
    first = s.enqueue("svc", key="k1")
    answer = s.call(b"C", zbc.enqueue(2, "svc", [[b"x"]], zbc.TaskOptions(key="k1")))
    assert answer.meta["ids"] == [first] and answer.meta["existing"] == [0]
    batch = s.call(
        b"C",
        zbc.enqueue(
            3, "svc", [[b"a"], [b"b"], [b"c"]], zbc.TaskOptions(keys=("k1", None, "k2")), batch=True
        ),
    )
    ids = batch.meta["ids"]
    assert ids[0] == first and batch.meta["existing"] == [0] and len(set(ids)) == 3
    # The same key on another service is another task.
    assert s.enqueue("other", key="k1") != first
    assert s.broker.stats.tasks_deduplicated == 2
    # A key repeated inside one batch: the first of them is stored, the others get its id.
    repeated = s.call(
        b"C",
        zbc.enqueue(
            4, "svc", [[b"d"], [b"e"], [b"f"]], zbc.TaskOptions(keys=("k3", "k4", "k3")), batch=True
        ),
    )
    d, e, f = repeated.meta["ids"]
    assert f == d != e and repeated.meta["existing"] == [2]
    assert journal.payload(d) == [b"d"] and journal.find_key("svc", "k3") == d


def test_failure_retries_with_backoff_then_dead_letters_and_redrives(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc", max_attempts=2)
    s.zready(b"W", "svc", 1)
    ((tid, attempt, _, _),) = s.tasks_to(b"W")
    s.send(b"W", ext.fail(tid, attempt, "boom"))
    record = journal.get(task_id)
    assert record is not None and record.state is TaskState.DELAYED
    # Equal jitter around base 1 s: between 0.5 and 1 s after the failure.
    assert EPOCH + 0.5 <= record.not_before <= EPOCH + 1.0
    s.advance_alive(1.01, b"W")
    ((tid, attempt, _, _),) = s.tasks_to(b"W")
    assert attempt == 2
    s.send(b"W", ext.fail(tid, attempt, "boom again"))
    assert s.state(task_id) is TaskState.DEAD
    dead = s.call(b"C", zbc.call(zbc.DEAD, 7, service="svc"))
    assert [t["id"] for t in dead.meta["tasks"]] == [task_id] and dead.meta["next"] is None
    assert dead.meta["tasks"][0]["error"] == "boom again"
    redriven = s.call(b"C", zbc.call(zbc.REDRIVE, 8, service="svc"))
    assert redriven.meta["ids"] == [task_id]
    ((tid, attempt, _, _),) = s.tasks_to(b"W")
    assert (tid, attempt) == (task_id, 1)


def test_an_id_listed_twice_is_redriven_or_dropped_once(journal: Journal) -> None:
    s = Script(journal)
    a, b = s.enqueue("svc", max_attempts=1), s.enqueue("svc", max_attempts=1)
    s.zready(b"W", "svc", 2)
    for tid, attempt, _, _ in s.tasks_to(b"W"):
        s.send(b"W", ext.fail(tid, attempt, "no", retry=False))
    s.send(b"W", ext.disconnect())  # nobody to run a redriven task: it stays ready
    redriven = s.call(b"C", zbc.call(zbc.REDRIVE, s.next_rid(), service="svc", ids=[a, a]))
    assert redriven.meta["ids"] == [a]
    dropped = s.call(b"C", zbc.call(zbc.DROP, s.next_rid(), service="svc", ids=[b, b]))
    assert dropped.meta["dropped"] == 1
    (row,) = s.call(b"C", zbc.call(zbc.QUEUES, s.next_rid())).meta["queues"]
    assert (row["ready"], row["dead"]) == (1, 0)
    assert journal.counts() == {"svc": {TaskState.READY: 1}}
    # The broker's own count of waiting tasks is right too: a purge empties the queue
    purged = s.call(b"C", zbc.call(zbc.PURGE, s.next_rid(), service="svc"))
    assert purged.meta["purged"] == 1 and purged.meta["more"] is False
    assert s.broker.stats.tasks_redriven == 1


def test_purge_reaches_delayed_tasks_behind_many_of_other_services(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Script(journal)
    # Given many delayed tasks of another service, all due before the victim's ones
    answer = s.call(
        b"C",
        zbc.enqueue(
            s.next_rid(), "other", [[b"o"]] * 250, zbc.TaskOptions(delay_s=60.0), batch=True
        ),
    )
    assert answer.ok
    victims = [s.enqueue("victim", b"v", delay_s=120.0) for _ in range(3)]
    # And a purge batch of 10 (so the first window, 10 batches, holds only "other")
    monkeypatch.setattr(zbc, "MAX_BATCH", 10)
    # When the victim's queue is purged
    purged = s.call(b"C", zbc.call(zbc.PURGE, s.next_rid(), service="victim"))
    # Then its delayed tasks are cancelled, and the answer says nothing is left
    assert purged.meta["purged"] == 3 and purged.meta["more"] is False
    assert {s.state(t) for t in victims} == {TaskState.CANCELLED}
    assert journal.counts()["other"] == {TaskState.DELAYED: 250}


def test_fail_delay_wins_and_non_retryable_dead_letters_at_once(journal: Journal) -> None:
    s = Script(journal)
    a = s.enqueue("svc")
    b = s.enqueue("svc")
    s.zready(b"W", "svc", 2)
    s.tasks_to(b"W")
    s.send(b"W", ext.fail(a, 1, "later", delay_s=7.0))
    s.send(b"W", ext.fail(b, 1, "bad input", retry=False))
    record = journal.get(a)
    assert record is not None and record.not_before == pytest.approx(EPOCH + 7.0)
    assert s.state(b) is TaskState.DEAD


def test_a_waiting_requester_hears_about_a_dead_letter(journal: Journal) -> None:
    s = Script(journal)
    s.send(b"C", zbc.request(1, "svc", [b"x"], zbc.TaskOptions(max_attempts=1)))
    (accepted,) = s.answers(b"C")
    assert accepted.ok and "state" not in accepted.meta
    s.zready(b"W", "svc", 1)
    ((tid, attempt, _, _),) = s.tasks_to(b"W")
    s.send(b"W", ext.fail(tid, attempt, "no luck"))
    (final,) = s.answers(b"C")
    assert final.meta["state"] == "dead" and final.meta["error"] == "no luck"


def test_an_attempt_past_its_timeout_is_cancelled_and_retried(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc", timeout_s=1.5)
    s.zready(b"W", "svc", 1)
    ((tid, attempt, _, _),) = s.tasks_to(b"W")
    s.send(b"W", ext.ack([(tid, attempt)]))
    s.advance(1.0)
    s.send(b"W", ext.heartbeat())
    s.advance(0.6)
    assert (task_id, 1) in s.cancels_to(b"W")
    assert s.state(task_id) is TaskState.DELAYED
    s.send(b"W", ext.done(task_id, 1, [b"too late"]))  # fenced: refused
    assert s.broker.stats.stale_refused == 1 and s.broker.stats.tasks_timed_out == 1
    s.advance_alive(1.1, b"W")
    ((tid, attempt, _, _),) = s.tasks_to(b"W")
    assert (tid, attempt) == (task_id, 2)


def test_a_slow_live_worker_keeps_its_acknowledged_task(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc")
    s.zready(b"W", "svc", 1)
    s.tasks_to(b"W")
    s.send(b"W", ext.ack([(task_id, 1)]))
    for _ in range(20):  # ten times the ack timeout, heartbeating all along
        s.advance(1.0)
        s.send(b"W", ext.heartbeat())
    assert s.state(task_id) is TaskState.INFLIGHT and s.cancels_to(b"W") == []
    s.send(b"W", ext.done(task_id, 1, [b"ok"]))
    assert s.state(task_id) is TaskState.DONE


def test_dead_worker_task_goes_to_another_worker_and_last_attempt_dead_letters(
    journal: Journal,
) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc", max_attempts=2)
    s.zready(b"W1", "svc", 1)
    s.tasks_to(b"W1")
    s.zready(b"W2", "svc", 1)
    s.send(b"W1", ext.disconnect())
    ((tid, attempt, _, _),) = s.tasks_to(b"W2")
    assert (tid, attempt) == (task_id, 2)
    s.send(b"W2", ext.ack([(tid, attempt)]))
    s.advance(3.5)  # W2 silent for 3 intervals: dead, on the last attempt
    assert s.state(task_id) is TaskState.DEAD
    record = journal.get(task_id)
    assert record is not None and "gone" in (record.error or "")


def test_unacknowledged_task_is_taken_back(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc")
    s.zready(b"W", "svc", 1)
    s.tasks_to(b"W")
    s.advance(1.0)
    s.send(b"W", ext.heartbeat())
    s.advance(1.1)
    frames = s.sent_to(b"W")
    commands = [(f[3], ext.unpack_meta(f[4])) for f in frames if len(f) > 4]
    # CANCEL of attempt 1, and (credit free again) attempt 2 at once.
    assert [(c, m["id"], m["attempt"]) for c, m in commands] == [
        (ext.CANCEL, task_id, 1),
        (ext.TASK, task_id, 2),
    ]


def test_cancel_a_queued_task_and_a_running_one(journal: Journal) -> None:
    s = Script(journal)
    queued = s.enqueue("svc", b"q", priority=-1)
    running = s.enqueue("svc", b"r")
    s.zready(b"W", "svc", 1)
    ((tid, _, _, _),) = s.tasks_to(b"W")
    assert tid == running
    answer = s.call(b"C", zbc.call(zbc.CANCEL, 3, id=queued))
    assert answer.meta == {"rid": 3, "id": queued, "state": "cancelled", "was": "ready"}
    answer = s.call(b"C", zbc.call(zbc.CANCEL, 4, id=running))
    assert answer.meta["was"] == "inflight"
    assert s.cancels_to(b"W") == [(running, 1)]
    s.send(b"W", ext.done(running, 1, [b"late"]))
    assert s.state(running) is TaskState.CANCELLED and s.state(queued) is TaskState.CANCELLED
    again = s.call(b"C", zbc.call(zbc.CANCEL, 5, id=running))
    assert not again.ok and again.code == zbc.E_CONFLICT
    assert s.tasks_to(b"W") == []  # the cancelled queued task is never delivered


def test_recovery_requeues_in_flight_tasks_with_their_attempt_counted(journal: Journal) -> None:
    s = Script(journal)
    a = s.enqueue("svc", b"a")
    b = s.enqueue("svc", b"b")
    c = s.enqueue("svc", b"c", delay_s=30)
    s.zready(b"W", "svc", 1)
    s.tasks_to(b"W")
    s.restart(journal)  # the old core is gone as if killed; the journal is what was committed
    journal.commit()
    assert s.state(a) is TaskState.READY and s.state(c) is TaskState.DELAYED
    assert s.broker.stats.tasks_recovered == 1
    s.zready(b"W2", "svc", 2)
    sent = s.tasks_to(b"W2")
    assert [(t[0], t[1]) for t in sent] == [(a, 2), (b, 1)]
    s.send(b"W2", ext.ack([(a, 2), (b, 1)]))
    s.advance_alive(31, b"W2")
    assert [t[0] for t in s.tasks_to(b"W2")] == []  # no credit left
    s.send(b"W2", ext.done(a, 2, []))
    assert [t[0] for t in s.tasks_to(b"W2")] == [c]


def test_result_wait_answers_when_done_or_with_the_state_when_the_wait_ends(
    journal: Journal,
) -> None:
    s = Script(journal)
    a = s.enqueue("svc")
    s.send(b"C", zbc.call(zbc.RESULT, 1, id=a, wait_s=5.0))
    assert s.answers(b"C") == []
    s.advance(5.1)
    (answer,) = s.answers(b"C")
    assert answer.meta == {"rid": 1, "id": a, "state": "ready"}
    s.send(b"C", zbc.call(zbc.RESULT, 2, id=a, wait_s=5.0))
    s.zready(b"W", "svc", 1)
    s.send(b"W", ext.done(a, 1, [b"r"]))
    (answer,) = s.answers(b"C")
    assert answer.rid == 2 and answer.frames == (b"r",)


def test_stock_mdp_worker_serves_durable_tasks(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc", b"job")
    s.send(b"M", mdp.worker_ready(b"svc"))
    (req,) = [f for f in s.sent_to(b"M") if f[3] == mdp.REQUEST]
    client = req[4]
    assert req[6:] == [b"job"]
    s.send(b"M", mdp.worker_reply(client, (b"done",)))
    assert s.state(task_id) is TaskState.DONE


def test_refusals_carry_a_readable_error(journal: Journal) -> None:
    s = Script(journal, CoreSettings(max_tasks_per_service=2))
    s.enqueue("svc")
    full = s.call(b"C", zbc.enqueue(2, "svc", [[b"a"], [b"b"]], batch=True))
    assert not full.ok and full.code == zbc.E_QUEUE_FULL and "cap 2" in full.message
    assert journal.counts()["svc"][TaskState.READY] == 1  # nothing of the batch was kept
    bad = s.call(b"C", zbc.enqueue(3, "svc", [[b"a"]], zbc.TaskOptions(priority=500)))
    assert bad.code == zbc.E_BAD_REQUEST and "priority" in bad.message
    missing = s.call(b"C", zbc.call(zbc.STATUS, 4, id="t999"))
    assert missing.code == zbc.E_NOT_FOUND
    reserved = s.call(b"C", zbc.enqueue(5, "mmi.x", [[b"a"]]))
    assert reserved.code == zbc.E_BAD_REQUEST
    s.send(b"C", [b"", zbc.ZBC01, zbc.STATUS, b"\xc1"])  # no readable rid: dropped, counted
    assert s.answers(b"C") == [] and s.broker.stats.malformed_total == 1


def test_a_key_repeated_within_a_batch_is_one_task_for_the_cap(journal: Journal) -> None:
    s = Script(journal, CoreSettings(max_tasks_per_service=3))
    s.enqueue("svc", key="a")
    # Two new tasks (b, and c twice) and a stored one (a): 1 + 2 waiting, within the cap
    options = zbc.TaskOptions(keys=("b", "c", "c", "a"))
    payloads = [[b"b"], [b"c"], [b"c2"], [b"a"]]
    answer = s.call(b"C", zbc.enqueue(2, "svc", payloads, options, batch=True))
    assert answer.ok, answer.message
    ids = answer.meta["ids"]
    assert ids[1] == ids[2] and answer.meta["existing"] == [2, 3]
    assert journal.counts()["svc"][TaskState.READY] == 3
    # One more new task would pass the cap: refused
    full = s.call(b"C", zbc.enqueue(3, "svc", [[b"d"]], zbc.TaskOptions(key="d")))
    assert full.code == zbc.E_QUEUE_FULL


def test_oversized_call_gets_too_large(journal: Journal) -> None:
    s = Script(journal, CoreSettings(max_message_bytes=1000))
    answer = s.call(b"C", zbc.enqueue(1, "svc", [[b"x" * 2000]]))
    assert answer.code == zbc.E_TOO_LARGE


def test_status_shows_the_record_and_its_history(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc", priority=3, key="k")
    s.zready(b"W", "svc", 1)
    answer = s.call(b"C", zbc.call(zbc.STATUS, 1, id=task_id))
    task = answer.meta["task"]
    assert task["state"] == "inflight" and task["priority"] == 3 and task["key"] == "k"
    assert [h[0] for h in task["history"]] == ["enqueued", "attempt"]
    assert task["history"][1][3] == s.broker.workers[b"W"].alias


def test_status_with_preview_shows_the_start_of_the_payload(journal: Journal) -> None:
    # Given a task of two payload frames
    s = Script(journal)
    s.send(b"C", zbc.enqueue(1, "svc", [[b"hello world", b"tail"]]))
    ((task_id,),) = [a.meta["ids"] for a in s.answers(b"C")]

    # When STATUS asks for the payload's first 5 bytes
    answer = s.call(b"C", zbc.call(zbc.STATUS, 2, id=task_id, preview=5))

    # Then the answer carries them beside the record, with the payload's sizes
    assert answer.meta["task"]["id"] == task_id
    assert answer.meta["payload"] == {"frames": 2, "bytes": 15, "preview": b"hello"}
    # And without `preview` the answer is as it was: no payload key at all
    plain = s.call(b"C", zbc.call(zbc.STATUS, 3, id=task_id))
    assert "payload" not in plain.meta


def test_no_journal_means_calls_are_refused_not_dropped() -> None:
    s = CoreScript(SETTINGS)
    s.broker.receive([b"C", *zbc.enqueue(1, "svc", [[b"x"]])], 0.0)
    ((peer, *frames),) = s.sent()
    assert peer == b"C" and zbc.decode_answer(frames).code == zbc.E_UNAVAILABLE


def test_request_wait_runs_out_with_the_state_then_result_fetches_it(journal: Journal) -> None:
    s = Script(journal)
    s.send(b"C", zbc.request(1, "svc", [b"x"], wait_s=2.0))
    (accepted,) = s.answers(b"C")
    (task_id,) = accepted.meta["ids"]
    s.advance(2.1)
    (pending,) = s.answers(b"C")
    assert pending.meta == {"rid": 1, "id": task_id, "state": "ready"}
    s.zready(b"W", "svc", 1)
    s.send(b"W", ext.done(task_id, 1, [b"late but kept"]))
    assert s.answers(b"C") == []  # that call was answered already
    answer = s.call(b"C", zbc.call(zbc.RESULT, 2, id=task_id))
    assert answer.frames == (b"late but kept",)


def test_a_resent_request_of_a_finished_task_is_answered_at_once(journal: Journal) -> None:
    s = Script(journal)
    options = zbc.TaskOptions(key="once")
    s.send(b"C", zbc.request(1, "svc", [b"q"], options))
    (accepted,) = s.answers(b"C")
    (task_id,) = accepted.meta["ids"]
    s.zready(b"W", "svc", 1)
    s.send(b"W", ext.done(task_id, 1, [b"r"]))
    s.answers(b"C")
    s.send(b"C", zbc.request(2, "svc", [b"q"], options))
    again, final = s.answers(b"C")
    assert again.meta["ids"] == [task_id] and again.meta["existing"] == [0]
    assert final.rid == 2 and final.meta["state"] == "done" and final.frames == (b"r",)


def test_a_resent_enqueue_is_not_refused_by_a_full_queue(journal: Journal) -> None:
    s = Script(journal, CoreSettings(max_tasks_per_service=1))
    first = s.enqueue("svc", key="k")
    assert s.enqueue("svc", key="k") == first
    full = s.call(b"C", zbc.enqueue(9, "svc", [[b"x"]], zbc.TaskOptions(key="other")))
    assert full.code == zbc.E_QUEUE_FULL


def test_a_batching_worker_gets_tasks_and_returns_dones_in_single_messages(
    journal: Journal,
) -> None:
    s = Script(journal)
    ids = s.call(b"C", zbc.enqueue(1, "svc", [[b"%d" % i] for i in range(6)], batch=True))
    s.send(b"W", ext.ready("svc", 4, batch=True))
    (message,) = [f for f in s.sent_to(b"W") if f[3] != ext.HEARTBEAT]
    tasks = ext.decode_for_worker(message[1:])
    assert isinstance(tasks, ext.Tasks)
    assert [(t.id, t.attempt, t.payload) for t in tasks.tasks] == [
        (tid, 1, (b"%d" % i,)) for i, tid in enumerate(ids.meta["ids"][:4])
    ]
    s.send(b"W", ext.dones([(t.id, t.attempt, [t.payload[0] * 2]) for t in tasks.tasks]))
    assert [s.state(t.id) for t in tasks.tasks] == [TaskState.DONE] * 4
    # The credit freed by the DONES is refilled with one TASKS message.
    (refill,) = s.sent_to(b"W")
    rest = ext.decode_for_worker(refill[1:])
    assert isinstance(rest, ext.Tasks) and [t.id for t in rest.tasks] == ids.meta["ids"][4:]
    result = s.call(b"C", zbc.call(zbc.RESULT, 2, id=tasks.tasks[0].id))
    assert result.frames == (b"00",)
    # A stale entry in a DONES is refused alone; the others count.
    stale = [(rest.tasks[0].id, 9, [b"x"]), (rest.tasks[1].id, 1, [b"y"])]
    s.send(b"W", ext.dones(stale))
    assert s.state(rest.tasks[0].id) is TaskState.INFLIGHT
    assert s.state(rest.tasks[1].id) is TaskState.DONE


def test_lifecycle_events_only_for_topics_someone_wants(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc")
    s.zready(b"W", "svc", 1)
    assert s.broker.events == []  # nobody subscribed: nothing is even built
    s.broker.set_subscriptions(frozenset({"task.done.", "worker.down"}))
    s.send(b"W", ext.done(task_id, 1, [b"r"]))
    s.send(b"W", ext.disconnect())
    assert [topic for topic, _ in emitted(s)] == ["task.done.svc", "worker.down"]
    assert [p["id"] for p in emitted(s)[0][1]] == [task_id]
    s.broker.set_subscriptions(frozenset({""}))  # everything
    s.broker.events.clear()
    other = s.enqueue("svc", ttl_s=1.0)
    s.advance(1.5)
    assert [t for t, _ in emitted(s)] == ["task.enqueued.svc", "task.expired.svc"]
    assert emitted(s)[1][1] == [{"id": other, "was": "ready"}]


def test_a_subscriber_to_one_topic_has_no_payloads_made_for_the_others(
    journal: Journal,
) -> None:
    s = Script(journal)
    # Given a subscriber to the results of one service only
    s.broker.set_subscriptions(frozenset({"task.done.tts"}))
    # When tasks of it and of another service are stored, started and done
    for service in ("tts", "stt"):
        s.call(b"C", zbc.enqueue(s.next_rid(), service, [[b"a"], [b"b"]], batch=True))
        s.send(b"W" + service.encode(), ext.ready(service, 2, batch=True))
        (message,) = [f for f in s.sent_to(b"W" + service.encode()) if f[3] != ext.HEARTBEAT]
        tasks = ext.decode_for_worker(message[1:])
        assert isinstance(tasks, ext.Tasks)
        s.send(b"W" + service.encode(), ext.dones([(t.id, t.attempt, [b"r"]) for t in tasks.tasks]))
    # Then only its task.done events were made: a row goes straight into the pass's
    # events, and the topics nobody wants are remembered as such per service
    assert [(t, len(ps)) for t, ps in emitted(s)] == [("task.done.tts", 2)]
    assert s.broker.sink.started_topics == {"tts": None, "stt": None}
    assert s.broker.sink.done_topics == {"tts": "task.done.tts", "stt": None}
    # And a new subscription is heard at once
    s.broker.set_subscriptions(frozenset({"task.started.stt"}))
    s.broker.events.clear()
    s.call(b"C", zbc.enqueue(s.next_rid(), "stt", [[b"c"]], batch=True))
    assert [t for t, _ in emitted(s)] == ["task.started.stt"]


def emitted(s: Script) -> list[tuple[str, list[Any]]]:
    """The core's events of the pass so far, each row as the payload map it stands for."""
    return [
        (topic, items if fields is None else [dict(zip(fields, r, strict=True)) for r in items])
        for topic, fields, items in s.broker.events
    ]


def test_consecutive_events_of_one_topic_share_an_entry_and_keep_their_order(
    journal: Journal,
) -> None:
    s = Script(journal, replace(SETTINGS, max_tasks_per_service=5000))
    s.broker.set_subscriptions(frozenset({"task."}))
    # Given a batch of 3 tasks stored in one call, then a worker taking two of them
    answer = s.call(b"C", zbc.enqueue(s.next_rid(), "svc", [[b"a"], [b"b"], [b"c"]], batch=True))
    ids = answer.meta["ids"]
    s.zready(b"W", "svc", 2)
    # Then each run of one topic is one entry, in the order the events happened
    assert [(t, [p["id"] for p in ps]) for t, ps in emitted(s)] == [
        ("task.enqueued.svc", ids),
        ("task.started.svc", ids[:2]),
    ]
    s.broker.events.clear()
    # And topics that alternate are never merged across one another
    for topic, n in (("task.a", 1), ("task.b", 2), ("task.a", 3), ("task.a", 4)):
        s.broker.sink.emit(topic, {"n": n})
    s.broker.sink.add("task.c", None, [])  # nothing to add: no (empty) entry
    assert emitted(s) == [
        ("task.a", [{"n": 1}]),
        ("task.b", [{"n": 2}]),
        ("task.a", [{"n": 3}, {"n": 4}]),
    ]
    # And an entry holds at most MAX_BATCH_EVENTS events
    s.broker.events.clear()
    count = MAX_BATCH_EVENTS + 10
    s.call(b"C", zbc.enqueue(s.next_rid(), "big", [[b"x"]] * count, batch=True))
    sizes = [len(ps) for t, _, ps in s.broker.events if t == "task.enqueued.big"]
    assert sizes == [MAX_BATCH_EVENTS, 10]
    # And a call whose events continue a run fills its last entry first, in order
    s.broker.events.clear()
    first = s.call(b"C", zbc.enqueue(s.next_rid(), "more", [[b"x"]] * 10, batch=True))
    second = s.call(b"C", zbc.enqueue(s.next_rid(), "more", [[b"y"]] * count, batch=True))
    runs = [[p["id"] for p in ps] for t, ps in emitted(s) if t == "task.enqueued.more"]
    assert [len(r) for r in runs] == [MAX_BATCH_EVENTS, 20]
    assert [i for run in runs for i in run] == first.meta["ids"] + second.meta["ids"]


def test_queues_report_totals_rates_and_wait_and_run_times(journal: Journal) -> None:
    s = Script(journal)
    a = s.enqueue("svc", b"a")
    b = s.enqueue("svc", b"b")
    s.advance(1.0)
    s.zready(b"W", "svc", 2)  # both start 1 s after their enqueue
    s.send(b"W", ext.ack([(a, 1), (b, 1)]))
    s.advance_alive(2.0, b"W")
    s.send(b"W", ext.done(a, 1, [b"ok"]))  # ran 2 s
    s.send(b"W", ext.fail(b, 1, "flaky", delay_s=0))  # back at once: a redelivery
    s.send(b"W", ext.done(b, 2, [b"ok"]))  # ran 0 s
    answer = s.call(b"C", zbc.call(zbc.QUEUES, 9))
    (row,) = answer.meta["queues"]
    assert row["enqueued_total"] == 2 and row["done_total"] == 2
    assert row["failed_total"] == 1 and row["redeliveries_total"] == 1 and row["dead_total"] == 0
    assert row["wait_s_mean"] == pytest.approx(1.0) and row["wait_s_p95"] == pytest.approx(1.0)
    assert row["run_s_mean"] == pytest.approx(1.0) and row["run_s_p95"] == pytest.approx(2.0)
    assert row["done_rate"] > 0 and row["enqueue_rate"] >= 0
    runs = row["run_histogram"]
    assert runs["count"] == 2 and runs["sum"] == pytest.approx(2.0)
    # 0 s falls in the first bucket, 2 s in the 2.5 s one; counts are cumulative.
    assert runs["buckets"][0] == [0.005, 1] and dict(map(tuple, runs["buckets"]))[2.5] == 2
    assert runs["buckets"][-1] == ["+Inf", 2]
    assert row["wait_histogram"]["count"] == 2  # first deliveries only: not the redelivery


def test_totals_outlive_an_idle_service_and_carry_on_when_it_returns(journal: Journal) -> None:
    s = Script(journal)
    ids = [s.enqueue("svc", b"%d" % i) for i in range(3)]
    s.zready(b"W", "svc", 3)
    for tid in ids:
        s.send(b"W", ext.done(tid, 1, []))
    s.send(b"W", ext.disconnect())
    s.advance(2.0)  # the timers let the idle service's object go
    assert b"svc" not in s.broker.services

    def row() -> dict[str, Any]:
        (found,) = s.call(b"C", zbc.call(zbc.QUEUES, s.next_rid())).meta["queues"]
        return dict(found)

    # The totals since the start stay (a Prometheus counter never goes back)
    assert (row()["enqueued_total"], row()["done_total"], row()["done"]) == (3, 3, 3)
    assert row()["run_histogram"]["count"] == 3
    # And they carry on when the service is back
    s.enqueue("svc")
    assert row()["enqueued_total"] == 4 and row()["done_total"] == 3


def test_queues_keeps_services_whose_names_are_not_utf8_apart(journal: Journal) -> None:
    s = Script(journal)
    # Given MDP workers of two services whose names are not UTF-8, and one request queued
    s.send(b"W1", mdp.worker_ready(b"\xff\xfe"))
    s.send(b"W2", mdp.worker_ready(b"\xfe"))
    s.send(b"W3", mdp.worker_ready(b"\xfe"))
    s.send(b"C1", mdp.client_request(b"\xff\xfe", [b"a"]))
    s.send(b"C2", mdp.client_request(b"\xff\xfe", [b"b"]))  # waits: W1 holds one
    rows = s.call(b"C", zbc.call(zbc.QUEUES, s.next_rid())).meta["queues"]
    # Then each has its own row, with its workers and queue, its name escaped
    view = {r["service"]: (r["workers"], r["requests"]) for r in rows}
    assert view == {"\\xfe": (2, 0), "\\xff\\xfe": (1, 1)}
    workers = s.call(b"C", zbc.call(zbc.WORKERS, s.next_rid())).meta["workers"]
    assert sorted(w["service"] for w in workers) == ["\\xfe", "\\xfe", "\\xff\\xfe"]


def test_retention_keeps_up_with_any_number_of_lapsed_records(journal: Journal) -> None:
    from zbroker.core.tasks import TIMER_BATCH
    from zbroker.journal import TaskRecord

    s = Script(journal)
    # Given more finished records past their retention than one timer batch deletes
    for _ in range(2 * TIMER_BATCH + 500):
        seq = journal.next_seq()
        done = TaskRecord(f"t{seq:x}", "svc", TaskState.DONE, seq, EPOCH, keep_until=EPOCH)
        journal.put(done, [b"x"])
    journal.commit()
    # When the first tick comes, it asks for the next at once while a full batch lapsed
    first = s.now = s.broker.next_tick_at
    s.broker.tick(first)
    assert s.broker.next_tick_at == first
    # Then within the same instant every record is gone
    s.advance(0.0)
    assert journal.counts() == {}


def test_progress_is_recorded_in_the_history(journal: Journal) -> None:
    s = Script(journal)
    task_id = s.enqueue("svc")
    s.zready(b"W", "svc", 1)
    s.send(b"W", ext.progress(task_id, 1, [b"50%"]))
    s.send(b"W", ext.progress(task_id, 7, [b"stale"]))  # refused: not recorded
    record = journal.get(task_id)
    assert record is not None and record.state is TaskState.INFLIGHT
    assert [h[0] for h in record.history] == ["enqueued", "attempt", "progress"]
    assert record.history[-1][2:] == [1, "50%"]


def test_pause_and_limit_are_kept_across_a_restart(journal: Journal) -> None:
    s = Script(journal)
    assert s.call(b"C", zbc.call(zbc.PAUSE, s.next_rid(), service="tts")).ok
    assert s.call(b"C", zbc.call(zbc.LIMIT, s.next_rid(), service="tts", limit=1)).ok
    a = s.enqueue("tts", b"a")
    b = s.enqueue("tts", b"b")
    s.restart(journal)  # as if killed: only what was committed is left
    journal.commit()
    (row,) = s.call(b"C", zbc.call(zbc.QUEUES, s.next_rid())).meta["queues"]
    assert row["paused"] is True and row["limit"] == 1
    s.zready(b"W", "tts", 5)
    assert s.tasks_to(b"W") == []  # still paused after the restart
    assert s.call(b"C", zbc.call(zbc.RESUME, s.next_rid(), service="tts")).ok
    assert [t[0] for t in s.tasks_to(b"W")] == [a]  # the limit of 1 holds as well
    s.send(b"W", ext.done(a, 1, []))
    assert [t[0] for t in s.tasks_to(b"W")] == [b]
    # Resumed and unlimited is the default again: nothing is kept for the service.
    assert s.call(b"C", zbc.call(zbc.LIMIT, s.next_rid(), service="tts", limit=None)).ok
    assert journal.service_options() == {}
    s.restart(journal)
    (row,) = s.call(b"C", zbc.call(zbc.QUEUES, s.next_rid())).meta["queues"]
    assert row["paused"] is False and row["limit"] is None


def test_a_limit_lowered_below_the_running_tasks_holds_until_they_drop_under_it(
    journal: Journal,
) -> None:
    s = Script(journal)
    ids = [s.enqueue("tts", b"%d" % i) for i in range(8)]
    s.zready(b"W", "tts", 4)
    assert [t[0] for t in s.tasks_to(b"W")] == ids[:4]
    # When the operator lowers the limit to 2 while 4 run
    assert s.call(b"C", zbc.call(zbc.LIMIT, s.next_rid(), service="tts", limit=2)).ok
    # Then finishing one delivers nothing (3 still run), nor does the next (2 run)
    s.send(b"W", ext.done(ids[0], 1, []))
    assert s.tasks_to(b"W") == []
    s.send(b"W", ext.done(ids[1], 1, []))
    assert s.tasks_to(b"W") == []
    # And only below the limit do deliveries start again, one for one
    s.send(b"W", ext.done(ids[2], 1, []))
    assert [t[0] for t in s.tasks_to(b"W")] == [ids[4]]
    (row,) = s.call(b"C", zbc.call(zbc.QUEUES, s.next_rid())).meta["queues"]
    assert row["limit"] == 2 and row["inflight"] == 2


def test_single_enqueues_of_one_pass_reach_a_batching_worker_as_one_tasks(
    journal: Journal,
) -> None:
    s = Script(journal)
    s.send(b"W", ext.ready("svc", 8, batch=True))
    s.sent()
    # Five single-task ENQUEUEs read in one pass, as the runtime feeds them.
    calls = [[b"C", *zbc.enqueue(rid, "svc", [[b"%d" % rid]])] for rid in range(5)]
    s.broker.receive_many(calls, s.now)
    journal.commit()
    out = s.sent()
    answers = [zbc.decode_answer(f[1:]) for f in out if f[0] == b"C"]
    ids = [a.meta["ids"][0] for a in answers]
    assert [a.rid for a in answers] == list(range(5))
    (message,) = [f for f in out if f[0] == b"W"]
    tasks = ext.decode_for_worker(message[1:])
    assert isinstance(tasks, ext.Tasks)
    assert [(t.id, t.payload) for t in tasks.tasks] == [
        (tid, (b"%d" % i,)) for i, tid in enumerate(ids)
    ]
    assert [s.state(tid) for tid in ids] == [TaskState.INFLIGHT] * 5
    # DONES and new work in the same pass: results stored, credit refilled once.
    more = [b"C", *zbc.enqueue(9, "svc", [[b"x"]])]
    dones = [b"W", *ext.dones([(t.id, t.attempt, [b"r"]) for t in tasks.tasks])]
    s.broker.receive_many([dones, more], s.now)
    journal.commit()
    out = s.sent()
    assert [s.state(tid) for tid in ids] == [TaskState.DONE] * 5
    (refill,) = [f for f in out if f[0] == b"W"]
    (answer,) = [zbc.decode_answer(f[1:]) for f in out if f[0] == b"C"]
    task = ext.decode_for_worker(refill[1:])
    assert isinstance(task, ext.Task) and task.id == answer.meta["ids"][0]


def test_payloads_are_delivered_exactly_from_the_window_and_from_the_store(
    journal: Journal,
) -> None:
    # A window of 2: small payloads of windowed tasks are delivered from memory,
    # the others (out of the window, too big to keep, or after a restart) are
    # read from the store. Every delivery carries exactly what was enqueued.
    s = Script(journal, CoreSettings(window_per_service=2))
    payloads = [b"small-0", b"L" * 5000, b"small-2", b"small-3", b"small-4"]
    ids = [s.enqueue("svc", p) for p in payloads]
    window = s.broker.services[b"svc"].records
    assert set(window) == set(ids[:2])
    assert window[ids[0]].frames_memo == (b"small-0",)
    assert window[ids[1]].frames_memo is None  # over the size kept in memory
    s.zready(b"W", "svc", 3)
    first = {tid: payload for tid, _, payload, _ in s.tasks_to(b"W")}
    assert first == dict(zip(ids[:3], payloads[:3], strict=True))
    # A restart: the window is rebuilt from the store, without payloads in memory.
    s.restart(journal)
    assert all(r.frames_memo is None for r in s.broker.services[b"svc"].records.values())
    s.zready(b"W2", "svc", 5)
    again = {tid: payload for tid, _, payload, _ in s.tasks_to(b"W2")}
    assert again == dict(zip(ids, payloads, strict=True))  # the three in flight come back too


def test_one_connection_cannot_take_every_place_to_wait(journal: Journal) -> None:
    # Given a broker where 3 calls may wait per connection, 5 in all
    s = Script(journal, replace(SETTINGS, max_waiters=5, max_waiters_per_peer=3))
    task_id = s.enqueue("svc")
    # When one connection parks calls waiting for the task
    for _ in range(3):
        s.send(b"P", zbc.call(zbc.RESULT, s.next_rid(), id=task_id, wait_s=60.0))
    assert s.answers(b"P") == []  # all three wait
    refused = s.call(b"P", zbc.call(zbc.RESULT, s.next_rid(), id=task_id, wait_s=60.0))
    # Then its fourth is refused with a reason it can read
    assert refused.code == zbc.E_TOO_MANY_WAITERS
    assert "from this connection (3, cap 3)" in refused.message
    # And another connection may still wait, and REQUEST, until the broker-wide cap
    s.send(b"Q", zbc.call(zbc.RESULT, s.next_rid(), id=task_id, wait_s=60.0))
    s.send(b"Q", zbc.request(s.next_rid(), "svc", [b"y"]))
    assert [a.ok for a in s.answers(b"Q")] == [True]  # the REQUEST's receipt; both wait
    full = s.call(b"R", zbc.call(zbc.RESULT, s.next_rid(), id=task_id, wait_s=60.0))
    assert full.code == zbc.E_TOO_MANY_WAITERS and "broker-wide" in full.message
    # When the parked calls' waits run out, their places are free again
    s.advance(61.0)
    assert len(s.answers(b"P")) == 3
    s.send(b"P", zbc.call(zbc.RESULT, s.next_rid(), id=task_id, wait_s=60.0))
    assert s.answers(b"P") == []  # waits again


def test_a_caller_the_broker_cannot_answer_loses_its_waiting_calls(journal: Journal) -> None:
    # Given a connection with calls waiting for three tasks, and another with one
    s = Script(journal, replace(SETTINGS, max_waiters_per_peer=3))
    ids = [s.enqueue("svc", b"%d" % i) for i in range(3)]
    for task_id in ids:
        s.send(b"P", zbc.call(zbc.RESULT, s.next_rid(), id=task_id, wait_s=60.0))
    s.send(b"Q", zbc.call(zbc.RESULT, s.next_rid(), id=ids[0], wait_s=60.0))
    assert s.broker.tasks.waiter_count == 4
    # When the first task ends and its answer to P cannot be sent (P is gone)
    s.zready(b"W", "svc", 1)
    (task_id, attempt, _, _) = s.tasks_to(b"W")[0]
    s.send(b"W", ext.done(task_id, attempt, [b"r"]))
    (to_p,) = s.sent_to(b"P")
    s.broker.undeliverable(to_p, s.now)
    # Then P's other calls stop waiting, and Q's answer went out as usual
    assert s.broker.tasks.waiter_count == 0
    assert [a.meta["state"] for a in s.answers(b"Q")] == ["done"]
    assert s.broker.stats.replies_undeliverable == 1
    # And P's places are free: a new connection with its id may wait again
    for task_id in ids[1:]:
        s.send(b"P", zbc.call(zbc.RESULT, s.next_rid(), id=task_id, wait_s=60.0))
    assert s.answers(b"P") == [] and s.broker.tasks.waiter_count == 2
    # And the waits that were dropped are never answered later
    s.advance(61.0)
    assert len(s.answers(b"P")) == 2  # only the two new ones, at their wait's end
