"""Durable tasks end to end: Client and AsyncClient, a real `zbroker start`, real Workers.

Every Client and Worker is entered into an ExitStack, so a failing test still
closes its sockets and stops its threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from zbroker import AsyncClient, Client, NonRetryableError, Task, TaskId, TaskState
from zbroker.client import (
    MessageTooLarge,
    TaskCancelled,
    TaskConflict,
    TaskDead,
    TaskNotFound,
    TaskPending,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def upper(task: Task) -> bytes:
    return task.payload.upper()


def test_enqueued_task_runs_on_a_worker_and_its_result_is_fetched_by_id(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a worker for "upper"
    worker = start_worker(stack, broker, "upper", upper)
    client = open_client(stack, broker)
    # When a task is enqueued with headers
    task_id = client.enqueue("upper", b"hello", headers={"lang": "en"})
    # Then its result can be fetched by id, from another connection too
    assert client.result(task_id, timeout_s=10) == b"HELLO"
    with Client(broker.endpoint) as other:
        assert other.result(task_id, timeout_s=0) == b"HELLO"
    # And its status says it is done after one attempt
    status = client.status(task_id)
    assert (status.id, status.service, status.state) == (task_id, "upper", TaskState.DONE)
    assert status.final and status.attempt == 1
    assert status.headers == {"lang": "en"}
    assert status.key  # the idempotency key the client generated
    assert worker.stats.handled == 1


def test_enqueue_many_stores_every_task_once_even_when_sent_again(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    payloads = [b"a", b"b", b"c", b"d"]
    keys = [f"batch-{i}" for i in range(4)]
    # When a batch is enqueued before any worker runs, then sent again with the same keys
    ids = client.enqueue_many("letters", payloads, keys=keys)
    assert len(set(ids)) == 4
    assert not any(i.existing for i in ids)  # all new
    again = client.enqueue_many("letters", [b"e", *payloads], keys=[None, *keys])
    # Then the resend names the stored tasks and says so; only the new payload is stored
    assert again[1:] == ids
    assert [i.existing for i in again] == [False, True, True, True, True]
    assert client.status(again[0]).state is TaskState.READY
    one = client.enqueue("letters", b"a", key="batch-0")
    assert one == ids[0] and one.existing
    assert client.status(one).key == "batch-0"
    ids.append(again[0])
    payloads.append(b"e")
    assert all(client.status(i).state is TaskState.READY for i in ids)
    # Then a worker runs each task exactly once, and every result is there
    seen: list[bytes] = []

    def record(task: Task) -> bytes:
        seen.append(task.payload)
        return task.payload * 2

    start_worker(stack, broker, "letters", record)
    assert [client.result(i, timeout_s=10) for i in ids] == [b"aa", b"bb", b"cc", b"dd", b"ee"]
    assert sorted(seen) == payloads
    # And a key of a finished, retained task still matches, from an AsyncClient too
    again_async = asyncio.run(enqueue_with_async_client(broker, "batch-3"))
    assert again_async == ids[3] and again_async.existing


async def enqueue_with_async_client(broker: BrokerProcess, key: str) -> TaskId:
    async with AsyncClient(broker.endpoint) as client:
        return await client.enqueue("letters", b"d", key=key)


def test_request_waits_for_the_result(broker: BrokerProcess, stack: ExitStack) -> None:
    def split(task: Task) -> list[bytes]:
        return task.payload.split(b" ")

    start_worker(stack, broker, "upper", upper)
    start_worker(stack, broker, "split", split)
    client = open_client(stack, broker)
    assert client.request("upper", b"durable", timeout_s=10) == b"DURABLE"
    assert client.request_frames("split", b"one two", timeout_s=10) == [b"one", b"two"]
    assert client.stats.resends == 0 and client.stats.resumes == 0


def test_request_rides_out_a_broker_restart(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a request waiting for a service that has no worker yet
    client = open_client(stack, broker, timeout_s=0.5, poll_s=0.5, retries=30)
    pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
    reply = pool.submit(client.request, "later", b"survivor", 30)
    wait_until(lambda: client.stats.answers >= 1, timeout_s=10)  # the task is committed
    # When the broker is killed and started again on the same journal
    broker.kill()
    broker.stop()
    broker.start()
    # And only then a worker for the service appears
    start_worker(stack, broker, "later", upper)
    # Then the request gets its result, by resuming with RESULT on a new connection
    assert reply.result(timeout=30) == b"SURVIVOR"
    assert client.stats.resumes >= 1


def test_a_queued_task_can_be_cancelled_once(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a task queued for a service with no worker
    client = open_client(stack, broker)
    task_id = client.enqueue("nobody", b"never runs")
    assert client.status(task_id).state is TaskState.READY
    # When it is cancelled
    assert client.cancel(task_id) is TaskState.READY
    # Then it is final, its result says so, and cancelling again is a conflict
    assert client.status(task_id).state is TaskState.CANCELLED
    with pytest.raises(TaskCancelled):
        client.result(task_id, timeout_s=0)
    with pytest.raises(TaskConflict):
        client.cancel(task_id)


def test_a_delayed_task_is_pending_until_its_time(broker: BrokerProcess, stack: ExitStack) -> None:
    start_worker(stack, broker, "upper", upper)
    client = open_client(stack, broker)
    task_id = client.enqueue("upper", b"later", delay_s=0.5)
    assert client.status(task_id).state is TaskState.DELAYED
    with pytest.raises(TaskPending) as caught:
        client.result(task_id, timeout_s=0)
    assert caught.value.state == "delayed"
    assert client.result(task_id, timeout_s=10) == b"LATER"


def test_unknown_task_is_not_found(broker: BrokerProcess, stack: ExitStack) -> None:
    client = open_client(stack, broker)
    with pytest.raises(TaskNotFound):
        client.status("no-such-task")
    with pytest.raises(TaskNotFound):
        client.result("no-such-task", timeout_s=0)


def test_a_non_retryable_failure_is_a_dead_letter_until_redriven(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a worker that refuses its input for good until it is fixed
    fixed = threading.Event()

    def strict(task: Task) -> bytes:
        if not fixed.is_set():
            raise NonRetryableError("cannot parse the input")
        return b"parsed " + task.payload

    worker = start_worker(stack, broker, "strict", strict)
    client = open_client(stack, broker)
    # When a request fails
    with pytest.raises(TaskDead) as caught:
        client.request("strict", b"doc", timeout_s=10)
    task_id = caught.value.task_id
    assert "cannot parse the input" in (caught.value.error or "")
    # Then the task is a dead letter, after a single attempt
    letters = client.dead_letters("strict")
    assert [d.id for d in letters] == [task_id]
    assert letters[0].attempt == 1
    assert "cannot parse the input" in (letters[0].error or "")
    assert client.status(task_id).state is TaskState.DEAD
    # When the worker is fixed and the dead letter redriven
    fixed.set()
    assert client.redrive("strict") == [task_id]
    # Then it runs again and succeeds, and the dead-letter queue is empty
    assert client.result(task_id, timeout_s=10) == b"parsed doc"
    assert client.dead_letters("strict") == []
    assert worker.stats.failed == 1 and worker.stats.handled == 1


def test_async_client_runs_many_requests_at_once(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a worker that holds 8 tasks at once
    start_worker(stack, broker, "upper", upper, concurrency=8)

    async def main() -> tuple[list[bytes], int]:
        async with AsyncClient(broker.endpoint) as client:
            # When 20 coroutines request at once over the one client
            replies = await asyncio.gather(
                *(client.request("upper", b"job %d" % i, timeout_s=20) for i in range(20))
            )
            # And one enqueues a batch and fetches the results by id
            ids = await client.enqueue_many("upper", [b"x", b"y"])
            replies += [await client.result(i, timeout_s=10) for i in ids]
            status = await client.status(ids[0])
            assert status.state is TaskState.DONE
            return replies, client.stats.resends

    replies, resends = asyncio.run(main())
    # Then each got its own answer
    assert replies == [b"JOB %d" % i for i in range(20)] + [b"X", b"Y"]
    assert resends == 0


def test_a_large_batch_goes_through_in_one_call(broker: BrokerProcess, stack: ExitStack) -> None:
    client = open_client(stack, broker)
    ids = client.enqueue_many("bulk", [b"%d" % i for i in range(2500)])
    assert len(set(ids)) == 2500
    assert client.status(ids[-1]).state is TaskState.READY


def test_batches_with_long_keys_and_headers_fit_a_small_cap(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    broker = broker_factory("--max-message-bytes", str(1 << 20))
    client = stack.enter_context(Client(broker.endpoint, max_message_bytes=1 << 20))
    keys = [f"{i:06d}" + "k" * 200 for i in range(2000)]
    headers = {"blob": "h" * 100_000}
    # 2000 x (400 bytes + a 206-byte key), with 100 kB of headers in every message:
    # over 1 MiB in all, so it goes as several messages, none over the cap
    ids = client.enqueue_many("long", [b"p" * 400] * 2000, keys=keys, headers=headers)
    assert len(set(ids)) == 2000 and client.stats.resends == 0
    assert client.status(ids[-1]).key == keys[-1]
    # And one task that cannot fit is refused by the client, before the wire
    with pytest.raises(MessageTooLarge):
        client.enqueue("long", b"x" * (1 << 20))
    carried_on = client.enqueue("long", b"small")  # the client carries on
    assert client.status(carried_on).state is TaskState.READY
