"""Task streams (docs/protocol.md §13) across languages, on real processes.

Python Client -> broker -> Node Worker (node/worker.mjs, modes `stream`,
`stream-emit`, `stream-hold`), and Node Client (node/client.mjs, ops `stream`,
`readStream`) -> broker -> Python Worker: every chunk byte for byte and in order,
the attempts that sent them, the result, resuming from an offset, and a reader
that leaves early cancelling the task under a worker of the other language.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from contextlib import ExitStack

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.crosslang.nodeproc import NOT_UTF8, NodeFactory, NodeProcess, b64, unb64
from tests.integration.running import open_client, start_worker
from zbroker.client import Task, TaskCancelled

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FRAMES = [NOT_UTF8, b"x", bytes(range(256)), "ünïcödé".encode(), bytes(range(256)) * 1024]


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """Retries come quickly, so a failed attempt's retry runs at once."""
    return broker_factory("--retry-base", "0.05")


# ------------------------------------------------------------ Python client, Node worker


@pytest.fixture
def node_worker(broker: BrokerProcess, node: NodeFactory) -> NodeProcess:
    return node("worker.mjs", broker.endpoint, "py2node-stream", "stream", "2")


def test_python_reader_gets_a_node_generators_chunks_then_its_result(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    # When a Python client streams a task a Node generator handler runs
    stream = client.stream("py2node-stream", FRAMES, timeout_s=20)
    chunks = list(stream)
    # Then every chunk arrives byte for byte, in order, from attempt 1, then the result
    assert chunks == FRAMES
    assert stream.attempt == 1
    assert stream.result == f"{len(FRAMES)} chunks".encode()
    assert stream.offset == len(FRAMES)
    task_id = stream.task_id
    assert task_id is not None
    # And a Python reader of the finished task resumes from any offset
    rest = client.read_stream(task_id, 2, timeout_s=20)
    assert list(rest) == FRAMES[2:]
    assert rest.result == stream.result


def test_python_reader_gets_an_empty_chunk_of_a_node_worker(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    stream = client.stream("py2node-stream", [b"a", b"", b"c"], timeout_s=20)
    assert list(stream) == [b"a", b"", b"c"]


def test_python_reader_tells_the_attempts_of_a_node_worker_apart(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    # Given a Node handler that emits a chunk, then fails its first attempt
    stream = client.stream(
        "py2node-stream", b"", timeout_s=20, headers={"mode": "stream-emit"}, max_attempts=3
    )
    seen = [(chunk, stream.attempt) for chunk in stream]
    # Then the reader sees the failed attempt's chunk, then the retry's, each tagged
    assert seen == [
        (b"attempt 1: one", 1),
        (b"attempt 2: one", 2),
        (b"attempt 2: two", 2),
    ]
    assert stream.result == b"emitted"
    # And attempts="current" skips the failed attempt's chunk
    task_id = stream.task_id
    assert task_id is not None
    current = client.read_stream(task_id, timeout_s=20, attempts="current")
    assert list(current) == [b"attempt 2: one", b"attempt 2: two"]


def test_a_python_reader_leaving_early_cancels_the_node_handler(
    broker: BrokerProcess, node_worker: NodeProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    # When the Python reader leaves its stream after the first chunk (a `for` loop left
    # with `break` does not close an iterator: `with` does)
    with client.stream(
        "py2node-stream", b"", timeout_s=20, headers={"mode": "stream-hold"}
    ) as stream:
        for chunk in stream:
            assert chunk == b"first"
            break
    task_id = stream.task_id
    assert task_id is not None
    # Then the Node handler's signal aborts, and its generator is closed, not pulled on
    node_worker.wait_event("aborted", id=task_id)
    node_worker.wait_event("closed", id=task_id)
    assert client.status(task_id).state == "cancelled"
    with pytest.raises(TaskCancelled):
        list(client.read_stream(task_id, timeout_s=20))


# ------------------------------------------------------------ Node client, Python worker


class Streamer:
    """A Python handler steered by the task header `mode`: `generator` yields each
    payload frame and returns "<n> chunks"; `emit` emits "a", fails its first attempt,
    then emits "b" and returns "emitted"; `hold` emits "first" and waits to be
    cancelled (recorded in `cancelled`)."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, task: Task) -> Generator[bytes, None, bytes] | bytes:
        mode = task.headers.get("mode", "generator")
        if mode == "generator":
            return self._frames(task)
        if mode == "emit":
            task.emit(f"attempt {task.attempt}: a")
            if task.attempt == 1:
                raise RuntimeError("the first attempt fails after a chunk")
            task.emit(f"attempt {task.attempt}: b")
            return b"emitted"
        task.emit(b"first")
        if task.wait_cancelled(30):
            with self._lock:
                self.cancelled.append(task.id)
        return b"too late"

    @staticmethod
    def _frames(task: Task) -> Generator[bytes, None, bytes]:
        yield from task.frames
        return f"{len(task.frames)} chunks".encode()


@pytest.fixture
def streamer(broker: BrokerProcess, stack: ExitStack) -> Streamer:
    handler = Streamer()
    start_worker(stack, broker, "node2py-stream", handler, concurrency=2)
    return handler


@pytest.fixture
def node_client(broker: BrokerProcess, node: NodeFactory) -> NodeProcess:
    return node("client.mjs", broker.endpoint)


def test_node_reader_gets_a_python_generators_chunks_then_its_result(
    streamer: Streamer, node_client: NodeProcess
) -> None:
    # When the Node client streams a task a Python generator handler runs
    read = node_client.call(
        "stream", service="node2py-stream", frames=[b64(f) for f in FRAMES], timeout_s=30
    )
    # Then every chunk arrives byte for byte, in order, then the generator's return value
    assert [unb64(c) for c in read["chunks"]] == FRAMES
    assert read["attempts"] == [1] * len(FRAMES)
    assert [unb64(f) for f in read["result"]] == [f"{len(FRAMES)} chunks".encode()]
    assert read["offset"] == len(FRAMES)
    # And a Node reader of the finished task resumes from an offset
    rest = node_client.call("readStream", id=read["taskId"], options={"offset": 3})
    assert [unb64(c) for c in rest["chunks"]] == FRAMES[3:]


def test_node_reader_sees_the_attempts_of_a_python_worker(
    streamer: Streamer, node_client: NodeProcess
) -> None:
    read = node_client.call(
        "stream",
        service="node2py-stream",
        frames=[],
        options={"headers": {"mode": "emit"}, "maxAttempts": 3},
        timeout_s=30,
    )
    assert [unb64(c) for c in read["chunks"]] == [b"attempt 1: a", b"attempt 2: a", b"attempt 2: b"]
    assert read["attempts"] == [1, 2, 2]
    assert [unb64(f) for f in read["result"]] == [b"emitted"]
    current = node_client.call("readStream", id=read["taskId"], options={"attempts": "current"})
    assert [unb64(c) for c in current["chunks"]] == [b"attempt 2: a", b"attempt 2: b"]


def test_a_node_reader_leaving_early_cancels_the_python_handler(
    broker: BrokerProcess, streamer: Streamer, node_client: NodeProcess, stack: ExitStack
) -> None:
    # When the Node reader leaves its loop after the first chunk
    read = node_client.call(
        "streamSome",
        service="node2py-stream",
        frames=[],
        options={"headers": {"mode": "hold"}},
        take=1,
    )
    assert [unb64(c) for c in read["chunks"]] == [b"first"]
    # Then the broker cancels the task, and the Python handler sees it
    task_id = read["taskId"]
    wait_until(lambda: task_id in streamer.cancelled, timeout_s=10)
    client = open_client(stack, broker)
    status = client.status(task_id)
    assert status.state == "cancelled"
    assert status.error == "abandoned by its reader"
