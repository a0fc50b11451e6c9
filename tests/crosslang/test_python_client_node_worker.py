"""Python Client -> broker -> Node Worker, end to end on real processes.

The Node worker (node/worker.mjs) prints every attempt it is handed, so each test
checks both what the Python side got back and what the Node handler saw.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.crosslang.nodeproc import NOT_UTF8, NodeFactory, NodeProcess, unb64
from tests.integration.running import open_client
from zbroker.client import Client, TaskCancelled, TaskDead

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SERVICE = "py2node"

PAYLOADS: dict[str, list[bytes]] = {
    "binary frame": [NOT_UTF8],
    "one empty frame": [b""],
    "no frames at all": [],
    "several frames": [NOT_UTF8, b"", bytes(range(256)), "ünïcödé".encode()],
    "large frame": [bytes(range(256)) * 4096],  # 1 MiB
}


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """Retries come quickly (backoff 0.05 s doubling), so failure paths run in well under
    a second."""
    return broker_factory("--retry-base", "0.05")


@pytest.fixture
def node_worker(broker: BrokerProcess, node: NodeFactory) -> NodeProcess:
    return node("worker.mjs", broker.endpoint, SERVICE, "echo", "2")


def tasks_seen(worker: NodeProcess, task_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The attempts of `task_id` the Node worker reported, once it reported `count` of them
    (its stdout may trail the broker's answer to the Python side)."""

    def seen() -> list[dict[str, Any]]:
        return worker.seen(lambda m: m.get("event") == "task" and m.get("id") == task_id)

    wait_until(lambda: len(seen()) >= count)
    return seen()


@pytest.mark.parametrize("frames", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_durable_enqueue_result_preserves_every_byte(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack, frames: list[bytes]
) -> None:
    # Given a Python client and a Node worker that returns its payload frames unchanged
    client = open_client(stack, broker)
    # When the client enqueues a durable task and waits for its result
    task_id = client.enqueue(SERVICE, frames)
    result = client.result_frames(task_id, timeout_s=20)
    # Then the result is exactly the payload, frame for frame, byte for byte
    assert result == frames
    # And the Node handler saw exactly those frames, on the first attempt
    (seen,) = tasks_seen(node_worker, task_id)
    assert [unb64(f) for f in seen["frames"]] == frames
    assert unb64(seen["payload"]) == (frames[0] if frames else b"")
    assert seen["attempt"] == 1 and seen["service"] == SERVICE
    assert client.status(task_id).state == "done"


def test_request_carries_headers_and_timeout_to_the_node_handler(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    headers = {
        "correlation_id": "flow-7",
        "reply_to": "transcript.final",
        "lang": "de-DE",
        "n": 3,
        "ratio": 0.25,
        "flag": True,
        "none": None,
        "list": [1, "two", [3]],
        "nested": {"a": {"b": "c"}},
    }
    # When a durable REQUEST goes out with headers and a run-time limit
    result = client.request(SERVICE, NOT_UTF8, timeout_s=20, headers=headers, task_timeout_s=30)
    # Then the result comes back, and the Node handler saw the headers and the limit
    assert result == NOT_UTF8
    seen = node_worker.wait_event("task")
    assert seen["headers"] == headers
    assert seen["timeoutS"] == 30


def test_mdp_request_is_served_by_the_node_worker(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    # An MDP request through the Python client reaches the Node (ZBW01) worker as a task
    assert client.mmi_service(SERVICE)
    assert client.mdp_request(SERVICE, NOT_UTF8) == NOT_UTF8
    body = [b"", NOT_UTF8, b"\x00"]
    assert client.mdp_request_frames(SERVICE, body) == body
    wait_until(lambda: len(node_worker.events("task")) == 2)
    mdp_tasks = node_worker.events("task")
    assert [[unb64(f) for f in t["frames"]] for t in mdp_tasks] == [[NOT_UTF8], body]
    # MDP requests are not durable tasks: their ids are the broker's request ids, no headers
    assert all(t["headers"] == {} and t["attempt"] == 1 for t in mdp_tasks)
    assert all(t["timeoutS"] is None for t in mdp_tasks)


def test_progress_from_the_node_handler_is_recorded(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    task_id = client.enqueue(SERVICE, b"p", headers={"mode": "progress"})
    assert client.result(task_id, timeout_s=20) == b"p"
    history = client.status(task_id).history
    progress = [entry for entry in history if entry[0] == "progress"]
    assert [entry[2:] for entry in progress] == [[1, "half way"]]


def test_a_throwing_node_handler_is_retried_then_dead_lettered(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    # Given a task whose Node handler throws on every attempt, with 3 attempts allowed
    with pytest.raises(TaskDead) as caught:
        client.request(SERVICE, b"doomed", timeout_s=30, headers={"mode": "throw"}, max_attempts=3)
    # Then the Python side sees a dead task whose error is the Node error of the last attempt
    task_id = caught.value.task_id
    assert caught.value.error == "Error: boom on attempt 3"
    # And the Node handler ran it three times, with attempt numbers 1, 2, 3
    assert [t["attempt"] for t in tasks_seen(node_worker, task_id, 3)] == [1, 2, 3]
    # And it is listed in the dead-letter queue, its history showing two retries
    (dead,) = [d for d in client.dead_letters(SERVICE) if d.id == task_id]
    assert dead.attempt == 3 and dead.error == "Error: boom on attempt 3"
    status = client.status(task_id)
    assert status.state == "dead" and status.attempt == 3
    kinds = [entry[0] for entry in status.history]
    assert kinds.count("retry") == 2 and kinds[-1] == "dead"
    retries = [entry for entry in status.history if entry[0] == "retry"]
    assert [entry[2] for entry in retries] == [
        "Error: boom on attempt 1",
        "Error: boom on attempt 2",
    ]


def test_a_non_retryable_node_failure_goes_to_the_dead_letters_at_once(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    with pytest.raises(TaskDead) as caught:
        client.request(SERVICE, b"x", timeout_s=30, headers={"mode": "fatal"}, max_attempts=5)
    assert caught.value.error == "NonRetryableError: this can never work"
    assert [t["attempt"] for t in tasks_seen(node_worker, caught.value.task_id)] == [1]


def test_retry_later_from_node_delays_the_next_attempt(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    task_id = client.enqueue(SERVICE, b"x", headers={"mode": "later"}, max_attempts=2)
    with pytest.raises(TaskDead):
        client.result(task_id, timeout_s=30)
    retry = [entry for entry in client.status(task_id).history if entry[0] == "retry"]
    # The delay the Node handler asked for (RetryLater(0.3)) is the one the broker used
    assert [entry[2:] for entry in retry] == [["RetryLater: come back later", 0.3]]
    attempts = [e for e in client.status(task_id).history if e[0] == "attempt"]
    assert attempts[1][1] - attempts[0][1] >= 0.3


def test_many_tasks_spread_over_node_concurrency(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client: Client = open_client(stack, broker)
    payloads = [f"task-{i}".encode() + NOT_UTF8 for i in range(200)]
    ids = client.enqueue_many(SERVICE, payloads)
    results = [client.result(task_id, timeout_s=30) for task_id in ids]
    assert results == payloads
    wait_until(lambda: len(node_worker.events("task")) >= len(payloads))


def test_python_cancel_aborts_the_node_handler(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    # Given a task the Node handler holds
    task_id = client.enqueue(SERVICE, b"long", headers={"mode": "hold"})
    node_worker.wait_event("holding", id=task_id)
    # When the Python client cancels it
    assert client.cancel(task_id) == "inflight"
    # Then the broker's CANCEL reaches the Node handler through its AbortSignal
    node_worker.wait_event("aborted", id=task_id, attempt=1)
    with pytest.raises(TaskCancelled):
        client.result(task_id, timeout_s=10)
    # And the worker is free again: the next task runs
    assert client.request(SERVICE, b"next", timeout_s=20) == b"next"


def test_a_task_timeout_takes_the_attempt_back_from_the_node_handler(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    # A task whose handler never finishes, with a run-time limit of 0.5 s and 2 attempts
    task_id = client.enqueue(
        SERVICE, b"slow", headers={"mode": "hold"}, timeout_s=0.5, max_attempts=2
    )
    with pytest.raises(TaskDead) as caught:
        client.result(task_id, timeout_s=30)
    assert caught.value.error == "attempt 2 timed out after 0.5s"
    # Each attempt was aborted in the Node handler when its time was up
    node_worker.wait_event("aborted", id=task_id, attempt=2)
    assert [m["attempt"] for m in node_worker.events("aborted")] == [1, 2]


def test_unicode_service_names_and_a_node_handler_returning_nothing(
    broker: BrokerProcess, node: NodeFactory, stack: ExitStack
) -> None:
    service = "sprache.de-ü-τ"
    worker = node("worker.mjs", broker.endpoint, service, "echo")
    client = open_client(stack, broker)
    assert client.mmi_service(service)
    task_id = client.enqueue(service, [])
    # An echo of no frames is a result of no frames (a Node handler returning nothing)
    assert client.result_frames(task_id, timeout_s=20) == []
    assert worker.wait_event("task")["service"] == service
