"""Node Client -> broker -> Python Worker, end to end on real processes.

The Node client (node/client.mjs) runs the calls the test sends it; the Python
worker runs in this process and records every attempt it is handed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.crosslang.nodeproc import NOT_UTF8, NodeFactory, NodeProcess, b64, unb64
from tests.integration.running import open_client, start_worker
from zbroker.client import Task

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SERVICE = "node2py"


class Recorder:
    """A Python handler steered by the task header `mode`, recording each attempt.

    echo: return the payload frames; throw: raise RuntimeError; hold: wait until the
    broker takes the attempt back (then return a result that must never be used)."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.cancelled: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, task: Task) -> tuple[bytes, ...]:
        with self._lock:
            self.tasks.append(task)
        mode = task.headers.get("mode", "echo")
        if mode == "throw":
            raise RuntimeError(f"python says no to attempt {task.attempt}")
        if mode == "hold":
            if task.wait_cancelled(30):
                with self._lock:
                    self.cancelled.append(task.id)
            return (b"too late",)
        return task.frames

    def attempts(self, task_id: str) -> list[Task]:
        with self._lock:
            return [t for t in self.tasks if t.id == task_id]


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory("--retry-base", "0.05")


@pytest.fixture
def recorder(broker: BrokerProcess, stack: ExitStack) -> Recorder:
    handler = Recorder()
    start_worker(stack, broker, SERVICE, handler, concurrency=2)
    return handler


@pytest.fixture
def node_client(broker: BrokerProcess, node: NodeFactory) -> NodeProcess:
    return node("client.mjs", broker.endpoint)


def frames_arg(frames: list[bytes]) -> list[str]:
    return [b64(f) for f in frames]


@pytest.mark.parametrize(
    "frames",
    [[NOT_UTF8], [b""], [], [NOT_UTF8, b"", bytes(range(256))]],
    ids=["binary", "empty frame", "no frames", "several frames"],
)
def test_enqueue_and_result_preserve_every_byte(
    recorder: Recorder, node_client: NodeProcess, frames: list[bytes]
) -> None:
    # When the Node client enqueues a task and waits for its result
    task_id = node_client.call("enqueue", service=SERVICE, frames=frames_arg(frames))
    result = node_client.call("result", id=task_id, options={"timeoutMs": 20_000})
    # Then the Python handler got exactly the payload, and its result came back exactly
    assert [unb64(f) for f in result] == frames
    (attempt,) = recorder.attempts(task_id)
    assert list(attempt.frames) == frames and attempt.attempt == 1


def test_enqueue_options_reach_the_python_worker(
    recorder: Recorder, node_client: NodeProcess
) -> None:
    headers = {"correlation_id": "c-1", "reply_to": "tts.done", "n": 7, "x": 1.5, "ok": False}
    options = {"headers": headers, "timeoutS": 45, "priority": 5, "key": "node-key-1"}
    task_id = node_client.call("enqueue", service=SERVICE, frames=[b64(b"hi")], options=options)
    node_client.call("result", id=task_id)
    (attempt,) = recorder.attempts(task_id)
    assert attempt.headers == headers
    assert attempt.timeout_s == 45
    assert attempt.service == SERVICE
    # The same key again is the same task: it is not stored (nor run) twice
    again = node_client.call("enqueue", service=SERVICE, frames=[b64(b"hi")], options=options)
    assert again == task_id
    assert len(recorder.attempts(task_id)) == 1
    # And with a receipt the Node client says the key matched the stored task
    receipt = node_client.call(
        "enqueue", service=SERVICE, frames=[b64(b"hi")], options={**options, "receipt": True}
    )
    assert receipt == {"id": task_id, "existing": True}
    receipts = node_client.call(
        "enqueueMany",
        service=SERVICE,
        payloads=[[b64(b"new")], [b64(b"hi")], [b64(b"anon")]],
        options={"keys": ["node-key-2", "node-key-1", None], "receipt": True},
    )
    assert [r["existing"] for r in receipts] == [False, True, False]
    assert receipts[1]["id"] == task_id and len({r["id"] for r in receipts}) == 3


def test_request_round_trip_and_single_frame_payload(
    recorder: Recorder, node_client: NodeProcess
) -> None:
    result = node_client.call("request", service=SERVICE, frames=[b64(NOT_UTF8)], one=True)
    assert [unb64(f) for f in result] == [NOT_UTF8]
    assert [list(t.frames) for t in recorder.tasks] == [[NOT_UTF8]]


def test_a_failing_python_handler_gives_the_node_client_a_dead_task(
    recorder: Recorder, node_client: NodeProcess
) -> None:
    error = node_client.call_error(
        "request",
        service=SERVICE,
        frames=[b64(b"doomed")],
        options={"headers": {"mode": "throw"}, "maxAttempts": 2},
    )
    assert error["name"] == "TaskDead"
    assert error["state"] == "dead"
    assert error["error"] == "RuntimeError: python says no to attempt 2"
    assert [t.attempt for t in recorder.attempts(error["taskId"])] == [1, 2]


def test_status_seen_from_node_matches_the_python_client(
    broker: BrokerProcess, recorder: Recorder, node_client: NodeProcess, stack: ExitStack
) -> None:
    options = {"headers": {"who": "node"}, "maxAttempts": 4, "priority": -3, "key": "k-status"}
    task_id = node_client.call("enqueue", service=SERVICE, frames=[b64(b"s")], options=options)
    node_client.call("result", id=task_id)
    status = node_client.call("status", id=task_id)
    py = open_client(stack, broker).status(task_id)
    assert status["id"] == py.id == task_id
    assert status["service"] == py.service == SERVICE
    assert status["state"] == py.state == "done"
    assert status["attempt"] == py.attempt == 1
    assert status["maxAttempts"] == py.max_attempts == 4
    assert status["priority"] == py.priority == -3
    assert status["key"] == py.key == "k-status"
    assert status["headers"] == py.headers == {"who": "node"}
    assert status["error"] is None and py.error is None
    assert status["notBefore"] is None and py.not_before is None
    assert status["expiresAt"] is None and py.expires_at is None
    # Node keeps times as Dates (millisecond precision)
    assert status["createdAt"] == pytest.approx(py.created_at, abs=0.001)
    assert py.finished_at is not None and py.keep_until is not None
    assert status["finishedAt"] == pytest.approx(py.finished_at, abs=0.001)
    assert status["keepUntil"] == pytest.approx(py.keep_until, abs=0.001)
    assert [entry[0] for entry in status["history"]] == [entry[0] for entry in py.history]


def test_cancel_of_a_delayed_task(recorder: Recorder, node_client: NodeProcess) -> None:
    task_id = node_client.call(
        "enqueue", service=SERVICE, frames=[b64(b"later")], options={"delayS": 60}
    )
    assert node_client.call("status", id=task_id)["state"] == "delayed"
    assert node_client.call("cancel", id=task_id) == {
        "id": task_id,
        "state": "cancelled",
        "was": "delayed",
    }
    error = node_client.call_error("result", id=task_id)
    assert (error["name"], error["state"]) == ("TaskCancelled", "cancelled")
    # Cancelling a task that already ended is a conflict
    conflict = node_client.call_error("cancel", id=task_id)
    assert (conflict["name"], conflict["code"]) == ("BrokerError", "conflict")
    assert recorder.attempts(task_id) == []


def test_cancel_takes_a_running_task_from_the_python_worker(
    recorder: Recorder, node_client: NodeProcess
) -> None:
    # Given a task the Python handler is holding
    task_id = node_client.call(
        "enqueue", service=SERVICE, frames=[b64(b"hold")], options={"headers": {"mode": "hold"}}
    )
    wait_until(lambda: len(recorder.attempts(task_id)) == 1)
    waiting = node_client.send("result", id=task_id, options={"timeoutMs": 20_000})
    # When the Node client cancels it
    answer: dict[str, Any] = node_client.call("cancel", id=task_id)
    # Then it was running, the Python handler is told, and the waiting result call fails
    assert answer == {"id": task_id, "state": "cancelled", "was": "inflight"}
    wait_until(lambda: recorder.cancelled == [task_id])
    failed = node_client.answer(waiting)
    assert not failed["ok"] and failed["error"]["name"] == "TaskCancelled"
    # And the handler's late result is never taken: the task stays cancelled
    assert node_client.call("status", id=task_id)["state"] == "cancelled"


def test_unknown_task_ids_are_not_found(node_client: NodeProcess) -> None:
    for op in ("status", "result", "cancel"):
        error = node_client.call_error(op, id="t-no-such-task")
        assert (error["name"], error["code"]) == ("TaskNotFound", "not_found"), op


def test_mdp_request_from_node_to_the_python_worker(
    recorder: Recorder, node_client: NodeProcess
) -> None:
    assert node_client.call("mmi", service=SERVICE) is True
    assert node_client.call("mmi", service="nobody-serves-this") is False
    body = [NOT_UTF8, b"", b"end"]
    reply = node_client.call("mdp", service=SERVICE, frames=frames_arg(body))
    assert [unb64(f) for f in reply] == body
    (attempt,) = recorder.tasks
    assert list(attempt.frames) == body
