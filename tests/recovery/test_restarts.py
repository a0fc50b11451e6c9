"""Restarts cost nothing: a broker stopped by SIGTERM drains the results in flight,
and an attempt cut short by the broker dying is not charged against max_attempts.

Real `zbroker start` processes and real worker processes (tests/recovery/task_worker.py,
which logs "start|done <id> <attempt> <payload> <time>"); the producer speaks raw ZBC01.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.recovery.test_recovery import RawClient, WorkerProcess, enqueue, workers
from zbroker.protocol import zbc

__all__ = ["workers"]  # the fixture, shared with test_recovery

pytestmark = pytest.mark.timeout(90)


def status(client: RawClient, task_id: str) -> dict[str, Any]:
    answer = client.call(lambda rid: zbc.call(zbc.STATUS, rid, id=task_id), 5.0)
    assert answer is not None and answer.ok, answer
    task: dict[str, Any] = answer.meta["task"]
    return task


def lines_of(worker: WorkerProcess, kind: str, task_id: str) -> list[list[str]]:
    return [line for line in worker.lines() if line[0] == kind and line[1] == task_id]


def slow_task_started(
    broker_factory: Callable[..., BrokerProcess],
    workers: Callable[..., WorkerProcess],
    drain_timeout_s: str,
    payload: str,
) -> tuple[BrokerProcess, WorkerProcess, RawClient, str]:
    """A broker with that drain, a slow worker, and a task with max_attempts=1 it
    has started."""
    broker = broker_factory("--drain-timeout", drain_timeout_s)
    worker = workers(broker, "slow", concurrency=2)
    client = RawClient(broker.endpoint)
    task_id = enqueue(client, "slow", payload, max_attempts=1)
    assert task_id is not None
    wait_until(lambda: bool(lines_of(worker, "start", task_id)), timeout_s=20)
    return broker, worker, client, task_id


def test_sigterm_drains_the_result_in_flight_before_the_broker_stops(
    broker_factory: Callable[..., BrokerProcess], workers: Callable[..., WorkerProcess]
) -> None:
    # Given a task with max_attempts=1 that a slow worker has started
    broker, worker, client, task_id = slow_task_started(broker_factory, workers, "15", "sleep:2")
    # When the broker is sent SIGTERM
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()
    # Then it still confirms a new task, but hands it to nobody
    later = enqueue(client, "slow", "later", max_attempts=1)
    assert later is not None
    # And it exits cleanly once the result is in, within the drain timeout
    assert broker.proc.wait(15) == 0
    assert time.monotonic() - signalled_at < 15
    assert broker.stop() == 0  # (it has exited: this closes its log)
    assert [line[2] for line in lines_of(worker, "done", task_id)] == ["1"]
    assert lines_of(worker, "start", later) == []
    assert "every attempt in flight has ended" in broker.log()
    # And after a restart the task is done with its one attempt, not dead
    broker.start()
    done = status(client, task_id)
    assert (done["state"], done["attempt"], done["uncharged"]) == ("done", 1, 0)
    # And the task confirmed during the drain runs now
    wait_until(lambda: bool(lines_of(worker, "done", later)), timeout_s=20)
    client.close()


def test_kill_9_mid_attempt_neither_charges_nor_dead_letters_the_task(
    broker_factory: Callable[..., BrokerProcess], workers: Callable[..., WorkerProcess]
) -> None:
    # Given a task with max_attempts=1 that a worker is running
    broker = broker_factory()
    worker = workers(broker, "slow", concurrency=2)
    client = RawClient(broker.endpoint)
    task_id = enqueue(client, "slow", "sleep:3", max_attempts=1)
    assert task_id is not None
    wait_until(lambda: bool(lines_of(worker, "start", task_id)), timeout_s=20)
    # When the broker is killed mid-attempt and started again
    broker.kill()
    broker.start()
    # Then the task runs again, with the next attempt number (on the worker's free handler)
    wait_until(lambda: len(lines_of(worker, "start", task_id)) == 2, timeout_s=30)
    assert [line[2] for line in lines_of(worker, "start", task_id)] == ["1", "2"]
    # And it ends done, not dead-lettered: the attempt the broker cut short was not charged
    wait_until(lambda: status(client, task_id)["state"] in ("done", "dead"), timeout_s=30)
    final = status(client, task_id)
    assert (final["state"], final["attempt"], final["uncharged"]) == ("done", 2, 1)
    # (Attempt 1's start was held, not written, so the kill lost it: the restarted
    # broker found the task READY, not in flight, and nothing was "recovered"; its
    # journal's crash made the next start skip attempt 1, uncharged, which gives the
    # same numbers as recovering a written start did. Its history lost attempt 1's
    # entry with it.)
    assert [entry[0] for entry in final["history"]] == ["enqueued", "attempt", "done"]
    assert final["history"][1][2] == 2
    client.close()


def test_sigterm_past_the_drain_writes_the_attempt_in_flight_for_recovery(
    broker_factory: Callable[..., BrokerProcess], workers: Callable[..., WorkerProcess]
) -> None:
    # Given a task with max_attempts=1 that a worker runs for longer than the drain
    broker, worker, client, task_id = slow_task_started(broker_factory, workers, "0.5", "sleep:4")
    # When the broker is sent SIGTERM and its drain ends with the attempt in flight
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(15) == 0
    assert broker.stop() == 0
    # Then its start, only held until then, was written at the clean stop: the
    # restarted broker recovers it (as it always has), and fences nothing
    broker.start()
    wait_until(lambda: len(lines_of(worker, "start", task_id)) == 2, timeout_s=30)
    assert [line[2] for line in lines_of(worker, "start", task_id)] == ["1", "2"]
    wait_until(lambda: status(client, task_id)["state"] in ("done", "dead"), timeout_s=30)
    final = status(client, task_id)
    assert (final["state"], final["attempt"], final["uncharged"]) == ("done", 2, 1)
    assert [entry[0] for entry in final["history"]].count("recovered") == 1
    stats = client.call(lambda rid: zbc.call(zbc.STATS, rid), 5.0)
    assert stats is not None and stats.meta["stats"]["attempts_fenced"] == 0
    assert stats.meta["journal"]["crashes"] == 0
    client.close()


def test_a_task_queued_across_kill_9_skips_the_attempt_the_crash_may_have_lost(
    broker_factory: Callable[..., BrokerProcess], workers: Callable[..., WorkerProcess]
) -> None:
    # Given a task with max_attempts=1 queued while no worker serves its service
    broker = broker_factory()
    client = RawClient(broker.endpoint)
    task_id = enqueue(client, "slow", "quick", max_attempts=1)
    assert task_id is not None
    # When the broker is killed and started again, and a worker comes
    broker.kill()
    broker.start()
    worker = workers(broker, "slow", concurrency=1)
    # Then its first delivery is attempt 2: the killed broker could have handed out
    # attempt 1 without writing it (starts are held, not written), so the restarted
    # one skips that number, uncharged: the task still gets its one charged attempt
    wait_until(lambda: bool(lines_of(worker, "done", task_id)), timeout_s=30)
    assert [line[2] for line in lines_of(worker, "start", task_id)] == ["2"]
    wait_until(lambda: status(client, task_id)["state"] == "done", timeout_s=10)
    final = status(client, task_id)
    assert (final["attempt"], final["uncharged"]) == (2, 1)
    stats = client.call(lambda rid: zbc.call(zbc.STATS, rid), 5.0)
    assert stats is not None and stats.meta["stats"]["attempts_fenced"] == 1
    assert stats.meta["journal"]["crashes"] == 1
    client.close()
