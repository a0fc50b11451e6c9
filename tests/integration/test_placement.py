"""Placement and flow control against a real broker, with the Python client and
workers (docs/protocol.md §16): the issue's bars for `require` and for keys."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import BrokerProcess, wait_until
from zbroker import Client, Task, Worker

pytestmark = pytest.mark.timeout(60)


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop(2.0)
        thread.join(5)


def test_a_gpu_task_waits_for_a_gpu_worker_and_never_runs_elsewhere(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory()
    ran: list[tuple[str, str]] = []

    def on(name: str) -> Callable[[Task], bytes]:
        def handle(task: Task) -> bytes:
            ran.append((name, task.id))
            return name.encode()

        return handle

    with (
        Client(broker.endpoint) as client,
        running(Worker(broker.endpoint, "llm", on("cpu"), tags=["cpu"], concurrency=4)),
    ):
        gpu_task = client.enqueue("llm", b"big", require=["gpu"])
        plain = client.enqueue("llm", b"small")
        assert client.result(plain, timeout_s=10) == b"cpu"
        time.sleep(0.5)  # the CPU worker has credit to spare all along
        assert client.status(gpu_task).state == "ready"
        (row,) = [q for q in client.queues() if q["service"] == "llm"]
        assert row["unplaceable"] == 1
        # When a worker loads a model and says so, without registering again
        with running(Worker(broker.endpoint, "llm", on("gpu"))) as late:
            time.sleep(0.3)
            assert client.status(gpu_task).state == "ready"
            late.set_tags(["gpu"])
            assert client.result(gpu_task, timeout_s=10) == b"gpu"
    assert ("cpu", gpu_task) not in ran


def test_a_second_key_is_not_held_back_by_the_first_keys_backlog(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory()
    order: list[bytes] = []
    lock = threading.Lock()

    def handle(task: Task) -> bytes:
        with lock:
            order.append(task.payload)
        time.sleep(0.002)
        return b"ok"

    with Client(broker.endpoint) as client:
        # Key A with 100 tasks enqueued first, then key B with 5
        a = client.enqueue_many("jobs", [b"a%d" % i for i in range(100)], concurrency_key="A")
        b = client.enqueue_many("jobs", [b"b%d" % i for i in range(5)], concurrency_key="B")
        with (
            running(Worker(broker.endpoint, "jobs", handle)),
            running(Worker(broker.endpoint, "jobs", handle)),
        ):
            wait_until(lambda: len(order) == 105, timeout_s=30)
        assert all(client.status(t).state == "done" for t in [a[-1], b[-1]])
    # Then all of B's start before A's twentieth
    last_b = max(order.index(b"b%d" % i) for i in range(5))
    assert last_b < order.index(b"a19")


def test_the_per_key_limit_holds_across_keys_and_shows_in_queues(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory()
    running_now: dict[str, int] = {}
    most: dict[str, int] = {}
    lock = threading.Lock()

    def handle(task: Task) -> bytes:
        key = task.payload.decode().split(":")[0]
        with lock:
            running_now[key] = running_now.get(key, 0) + 1
            most[key] = max(most.get(key, 0), running_now[key])
        time.sleep(0.02)
        with lock:
            running_now[key] -= 1
        return b"ok"

    with Client(broker.endpoint) as client:
        client.limit("gen", 2, per_key=True)
        ids = []
        for user in ("u1", "u2", "u3"):
            ids += client.enqueue_many(
                "gen", [f"{user}:{i}".encode() for i in range(10)], concurrency_key=user
            )
        (row,) = [q for q in client.queues() if q["service"] == "gen"]
        assert row["key_limit"] == 2
        with running(Worker(broker.endpoint, "gen", handle, concurrency=8)):
            for task_id in ids:
                assert client.result(task_id, timeout_s=20) == b"ok"
    assert most == {"u1": 2, "u2": 2, "u3": 2}


def test_a_rate_bounds_how_fast_tasks_start_and_debounce_keeps_the_last_payload(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory()
    payloads: list[bytes] = []

    def handle(task: Task) -> bytes:
        payloads.append(task.payload)
        return b"ok"

    with Client(broker.endpoint) as client:
        client.rate("slow", 10.0, burst=2)
        (row,) = [q for q in client.queues() if q["service"] == "slow"]
        assert row["rate"] == {"per_s": 10.0, "burst": 2}
        ids = client.enqueue_many("slow", [b"x"] * 12)
        with running(Worker(broker.endpoint, "slow", handle, concurrency=12)):
            for task_id in ids:
                assert client.result(task_id, timeout_s=20) == b"ok"
            # Never more handed out than the burst plus what the rate refilled since the
            # first delivery (the broker's own times, from each task's history)
            handed = sorted(
                entry[1]
                for task_id in ids
                for entry in client.status(task_id).history
                if entry[0] == "attempt"
            )
            assert len(handed) == 12
            for n, at in enumerate(handed, start=1):
                assert n <= 2 + 10.0 * (at - handed[0]) + 1e-6
            payloads.clear()
            # Three enqueues of one key within the debounce window: one task, the last payload
            first = client.enqueue("slow", b"v1", key="f", debounce_s=0.5)
            second = client.enqueue("slow", b"v2", key="f", debounce_s=0.5)
            third = client.enqueue("slow", b"v3", key="f", debounce_s=0.5)
            assert first == second == third and second.existing
            assert client.result(first, timeout_s=10) == b"ok"
            assert payloads == [b"v3"]
