"""Client.stream, AsyncClient.stream and read_stream against a real broker.

The worker here speaks raw ZBW01 (READY, ACK, CHUNK, DONE, FAIL) from a thread, so
these tests pin the client and the broker, not the Worker library. The payload
tells it what to do: `n:<chunks>`, `slow:<chunks>` (a pause per chunk), `fail1:<n>`
(the first attempt sends n chunks, then fails; the next succeeds), `dead:<n>`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import open_client
from zbroker import AsyncClient
from zbroker.client import TaskDead, TaskNotFound
from zbroker.protocol import ext

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class RawStreamWorker(threading.Thread):
    """A ZBW01 worker of service `stream` (credit 4) that streams as its payload says."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.stop = threading.Event()
        self.cancelled: list[tuple[str, int, str | None]] = []
        self.ready = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self.endpoint)
        sock.send_multipart(ext.ready("stream", 4))
        running: dict[str, threading.Thread] = {}
        lock = threading.Lock()

        def send(frames: list[bytes]) -> None:
            with lock:
                sock.send_multipart(frames)

        def work(task: ext.Task) -> None:
            kind, _, n = task.payload[0].decode().partition(":")
            count = int(n)
            for i in range(count):
                if (task.id, task.attempt) in {(c[0], c[1]) for c in self.cancelled}:
                    return
                send(ext.chunk(task.id, task.attempt, [f"c{i}".encode()]))
                if kind == "slow":
                    time.sleep(0.05)
            if kind == "dead" or (kind == "fail1" and task.attempt == 1):
                send(ext.fail(task.id, task.attempt, "boom", retry=kind != "dead", delay_s=0))
            else:
                send(ext.done(task.id, task.attempt, [f"done:{count}".encode()]))

        try:
            while not self.stop.is_set():
                if not sock.poll(50):
                    continue
                with lock:
                    frames = sock.recv_multipart()
                message = ext.decode_for_worker(frames)
                self.ready.set()
                if isinstance(message, ext.Task):
                    send(ext.ack([(message.id, message.attempt)]))
                    thread = threading.Thread(target=work, args=(message,), daemon=True)
                    running[message.id] = thread
                    thread.start()
                elif isinstance(message, ext.Cancel):
                    self.cancelled.append((message.id, message.attempt, message.reason))
                elif isinstance(message, ext.Heartbeat):
                    send(ext.heartbeat())
        finally:
            sock.close(0)


@pytest.fixture
def worker(broker: BrokerProcess) -> Iterator[RawStreamWorker]:
    w = RawStreamWorker(broker.endpoint)
    w.start()
    w.ready.wait(10)
    yield w
    w.stop.set()
    w.join(5)


def test_stream_gives_every_chunk_in_order_then_the_result(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    stream = client.stream("stream", b"n:50", window=4)
    chunks = list(stream)
    assert chunks == [f"c{i}".encode() for i in range(50)]
    assert stream.result == b"done:50" and stream.ended
    assert stream.task_id is not None and stream.offset == 50 and stream.attempt == 1
    # The whole stream again, and its second half, by id, after the end.
    again = client.read_stream(stream.task_id)
    assert list(again) == chunks and again.result == b"done:50"
    half = client.read_stream(stream.task_id, offset=25)
    assert list(half) == chunks[25:]
    status = client.status(stream.task_id)
    assert status.stream_chunks == 50 and status.stream_bytes == 140


def test_result_before_the_end_is_an_error(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    stream = client.stream("stream", b"n:3")
    task_id = stream.started()
    assert task_id == stream.task_id
    with pytest.raises(RuntimeError, match="not ended"):
        _ = stream.result
    assert list(stream) == [b"c0", b"c1", b"c2"]


def test_a_late_reader_and_one_that_resumes(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    task_id = str(client.enqueue("stream", b"slow:20"))
    reader = client.read_stream(task_id)
    first = [next(reader) for _ in range(5)]
    reader.close()  # a READ does not cancel when abandoned
    resumed = client.read_stream(task_id, offset=reader.offset)
    rest = list(resumed)
    assert first + rest == [f"c{i}".encode() for i in range(20)]
    assert resumed.result == b"done:20"


def test_attempts_show_and_current_skips_the_failed_one(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    stream = client.stream("stream", b"fail1:3", max_attempts=2)
    seen = [(chunk, stream.attempt) for chunk in stream]
    assert seen == [(b"c0", 1), (b"c1", 1), (b"c2", 1), (b"c0", 2), (b"c1", 2), (b"c2", 2)]
    assert stream.result == b"done:3"
    assert stream.task_id is not None
    current = client.read_stream(stream.task_id, attempts="current")
    assert list(current) == [b"c0", b"c1", b"c2"] and current.attempt == 2


def test_a_failed_task_raises_its_error_after_its_chunks(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    stream = client.stream("stream", b"dead:2")
    got = []
    with pytest.raises(TaskDead, match="boom"):
        for chunk in stream:
            got.append(chunk)
    assert got == [b"c0", b"c1"] and stream.ended


def test_leaving_the_loop_cancels_the_task_and_the_worker_is_told(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    stream = client.stream("stream", b"slow:1000")
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    task_id = stream.task_id
    assert task_id is not None
    wait_until(lambda: client.status(task_id).state.value == "cancelled", timeout_s=5)
    wait_until(lambda: any(c[0] == task_id for c in worker.cancelled), timeout_s=5)


def test_read_stream_of_an_unknown_task(broker: BrokerProcess, stack: ExitStack) -> None:
    client = open_client(stack, broker)
    with pytest.raises(TaskNotFound):
        list(client.read_stream("t1-0000000000000000"))


def test_async_stream_and_abandon(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    async def main() -> None:
        async with AsyncClient(broker.endpoint) as client:
            stream = client.stream("stream", b"n:30", window=2)
            chunks = [chunk async for chunk in stream]
            assert chunks == [f"c{i}".encode() for i in range(30)]
            assert stream.result == b"done:30"
            # Two streams at once on the one socket, and one abandoned.
            a = client.stream("stream", b"n:10")
            b = client.stream("stream", b"slow:1000")
            got_a, got_b = [], []
            async for chunk in b:
                got_b.append(chunk)
                if len(got_b) == 3:
                    break
            await b.aclose()
            async for chunk in a:
                got_a.append(chunk)
            assert len(got_a) == 10 and a.result == b"done:10"
            assert b.task_id is not None
            for _ in range(100):
                if (await client.status(b.task_id)).state.value == "cancelled":
                    break
                await asyncio.sleep(0.05)
            assert (await client.status(b.task_id)).state.value == "cancelled"

    asyncio.run(main())


def test_broker_stats_count_chunks(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    stream = client.stream("stream", b"n:5")
    assert len(list(stream)) == 5
    stats = client.broker_stats()["stats"]
    assert stats["chunks_received"] >= 5 and stats["chunks_sent"] >= 5


def test_cli_request_stream_and_tail_task(
    broker: BrokerProcess, worker: RawStreamWorker, stack: ExitStack
) -> None:
    cli = [sys.executable, "-m", "zbroker"]
    where = ["--endpoint", broker.endpoint]
    done = subprocess.run(
        [*cli, "request", "stream", "--data", "n:4", "--stream", *where],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"c0c1c2c3"
    client = open_client(stack, broker)
    task_id = str(client.enqueue("stream", b"n:3"))
    client.result(task_id)
    done = subprocess.run(
        [*cli, "tail", "--task", task_id, "--offset", "1", "--json", *where],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows == [
        {"offset": 1, "attempt": 1, "text": "c1"},
        {"offset": 2, "attempt": 1, "text": "c2"},
    ]
    failed = subprocess.run(
        [*cli, "request", "stream", "--data", "dead:1", "--stream", *where],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert failed.returncode == 1 and "boom" in failed.stderr and failed.stdout == "c0"
