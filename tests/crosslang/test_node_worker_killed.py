"""A Node worker SIGKILLed while it holds work: the broker redelivers it to another
worker (Node or Python) as the next attempt, and whoever waits gets the result."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from typing import Any

import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.crosslang.nodeproc import NodeFactory, NodeProcess, unb64
from tests.integration.running import open_client, start_worker
from zbroker.client import Task

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SERVICE = "jobs"
PAYLOAD = [b"precious \xff\x00", b"second frame"]
Ctx = zmq.Context[zmq.Socket[bytes]]


class Rescuer:
    """The second worker: a Node process or a Python Worker, echoing the payload."""

    def __init__(self, kind: str, broker: BrokerProcess, node: NodeFactory, stack: ExitStack):
        self.kind = kind
        self.tasks: list[Task] = []
        self.proc: NodeProcess | None = None
        if kind == "node":
            self.proc = node("worker.mjs", broker.endpoint, SERVICE, "echo")
        else:
            start_worker(stack, broker, SERVICE, self._handle)

    def _handle(self, task: Task) -> tuple[bytes, ...]:
        self.tasks.append(task)
        return task.frames

    def seen(self) -> list[dict[str, Any]]:
        """Every attempt it was handed: {id, attempt, frames, headers}."""
        if self.proc is not None:
            return [
                {**m, "frames": [unb64(f) for f in m["frames"]]} for m in self.proc.events("task")
            ]
        return [
            {"id": t.id, "attempt": t.attempt, "frames": list(t.frames), "headers": t.headers}
            for t in list(self.tasks)
        ]


@pytest.mark.parametrize("rescuer_kind", ["node", "python"])
def test_a_killed_node_worker_task_is_redelivered_and_completes(
    broker: BrokerProcess, node: NodeFactory, stack: ExitStack, rescuer_kind: str
) -> None:
    # Given a Node worker whose handler holds the task it is given until killed
    holder = node("worker.mjs", broker.endpoint, SERVICE, "hold")
    client = open_client(stack, broker)
    task_id = client.enqueue(SERVICE, PAYLOAD, headers={"trace": "t-1"})
    holder.wait_event("holding", id=task_id, attempt=1)
    # And a Python client already waiting for the result on its own connection
    waiter = open_client(stack, broker)
    outcome: dict[str, Any] = {}

    def wait_for_result() -> None:
        try:
            outcome["result"] = waiter.result_frames(task_id, timeout_s=30)
        except Exception as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=wait_for_result)
    thread.start()
    # And a second, healthy worker of the same service
    rescuer = Rescuer(rescuer_kind, broker, node, stack)
    # When the holder is killed with SIGKILL (no DISCONNECT, no FAIL: the process is gone)
    holder.kill()
    killed_at = time.monotonic()
    # Then the task goes to the second worker as attempt 2, payload and headers intact
    wait_until(lambda: any(t["id"] == task_id for t in rescuer.seen()), timeout_s=10)
    redelivered_after_s = time.monotonic() - killed_at
    (attempt,) = [t for t in rescuer.seen() if t["id"] == task_id]
    assert attempt["attempt"] == 2
    assert attempt["frames"] == PAYLOAD
    assert attempt["headers"] == {"trace": "t-1"}
    # within a few heartbeat intervals (0.2 s here; liveness 3)
    assert redelivered_after_s < 3.0
    # And the Python client's waiting result call returns the result
    thread.join(30)
    assert not thread.is_alive()
    assert outcome == {"result": PAYLOAD}
    # And the broker's record tells the story: two attempts, the first taken back
    status = client.status(task_id)
    assert status.state == "done" and status.attempt == 2
    kinds = [entry[0] for entry in status.history]
    assert kinds == ["enqueued", "attempt", "requeued", "attempt", "done"]
    requeued = status.history[2]
    assert requeued[2] == "the worker holding it is gone"


def test_a_killed_node_worker_mdp_request_is_answered_once_by_another(
    broker: BrokerProcess, node: NodeFactory, zmq_ctx: Ctx
) -> None:
    # Given a raw MDP client whose request a Node worker holds
    holder = node("worker.mjs", broker.endpoint, "mdp-jobs", "hold")
    client = zmq_ctx.socket(zmq.DEALER)
    client.linger = 0
    client.connect(broker.endpoint)
    client.send_multipart([b"", b"MDPC01", b"mdp-jobs", b"precious"])
    holder.wait_event("holding", attempt=1)
    rescuer = node("worker.mjs", broker.endpoint, "mdp-jobs", "echo")
    # When the holder is SIGKILLed
    holder.kill()
    # Then another Node worker answers it (attempt 2), and the client gets exactly one reply
    assert client.poll(10_000), "no reply after the holder was killed"
    assert client.recv_multipart() == [b"", b"MDPC01", b"mdp-jobs", b"precious"]
    assert rescuer.wait_event("task")["attempt"] == 2
    assert not client.poll(300)
