"""The Worker against the broker's message caps and a broker that falls behind.

The broker silently drops a message over `--max-message-bytes` or 16384 frames,
and a full send queue used to make the worker drop what it was sending: either
way an outcome was lost and its task stayed in flight for good. These tests
check that every outcome reaches the broker: results finished together are
split across DONES that fit, a result too large for any message fails its
attempt for good with a readable reason, and outcomes held back by a full send
queue wait (in order) rather than being dropped, while PROGRESS is dropped and
counted.

Against a real broker where that is cheap; against a fake broker (a ROUTER in
the test, over inproc) for the exact messages and to hold the worker's send
queue full for as long as a test needs: the fake reads nothing until told to.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from tests.integration.test_worker import Ctx, FakeBroker, worker_maker
from zbroker.client import Task, TaskDead, Worker
from zbroker.client.errors import DEFAULT_HWM
from zbroker.protocol import ext

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

MiB = 1024 * 1024
BROKER_FRAME_CAP = 16_384  # frames per message the broker reads, routing id included


class Gate:
    """Holds every running coroutine of an async handler, then releases them in one
    pass of their event loop: their results reach the I/O thread together."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    async def wait(self) -> None:
        if self._event is None:
            self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        await self._event.wait()

    def open(self) -> None:
        assert self._loop is not None and self._event is not None
        self._loop.call_soon_threadsafe(self._event.set)


# ------------------------------------------------------------ against a real broker


def test_large_results_finishing_together_all_reach_the_broker(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given 24 handlers each about to return 1 MiB (24 MiB together, over the
    # broker's default 16 MiB message cap), released at the same moment
    n = 24
    gate = Gate()

    async def big(task: Task) -> bytes:
        await gate.wait()
        return task.payload * MiB

    worker = start_worker(stack, broker, "big", big, concurrency=n)
    client = open_client(stack, broker)
    payloads = [bytes([65 + i]) for i in range(n)]
    ids = client.enqueue_many("big", payloads)
    wait_until(lambda: worker.running == n, timeout_s=10)
    # When they all finish
    gate.open()
    # Then every task is done, with its own result, and the broker refused nothing
    for task_id, payload in zip(ids, payloads, strict=True):
        assert client.result(task_id, timeout_s=10) == payload * MiB
    assert worker.stats.handled == n
    assert client.broker_stats()["malformed"] == {}
    assert worker.stats.results_too_large == 0


def test_a_result_over_the_message_cap_dead_letters_its_task_with_the_reason(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    # Given a broker and a worker that agree on a 1 MiB message cap
    broker = broker_factory("--max-message-bytes", str(MiB))

    def sized(task: Task) -> bytes:
        return b"x" * int(task.payload)

    worker = start_worker(stack, broker, "sized", sized, max_message_bytes=MiB)
    client = open_client(stack, broker)
    # When a task's result is 2 MiB
    too_big = client.enqueue("sized", b"%d" % (2 * MiB))
    # Then the task is a dead letter at once, and its error says why
    with pytest.raises(TaskDead) as dead:
        client.result(too_big, timeout_s=10)
    assert dead.value.error is not None
    assert f"result of {2 * MiB} bytes is over the broker's message cap" in dead.value.error
    assert client.status(too_big).attempt == 1
    assert worker.stats.results_too_large == 1
    assert worker.stats.failed == 1
    # And the worker's credit is free again: a result that fits goes through
    fits = client.enqueue("sized", b"%d" % (MiB // 2))
    assert client.result(fits, timeout_s=10) == b"x" * (MiB // 2)


# ------------------------------------------------------------ against a fake broker


class RawFake(FakeBroker):
    """The fake broker, also noting each message's size as the broker counts it:
    (bytes, frames), every frame including the routing id."""

    def __init__(self, ctx: Ctx, endpoint: str) -> None:
        super().__init__(ctx, endpoint)
        self.sizes: list[tuple[int, int]] = []

    def recv(self, timeout_s: float = 10.0) -> tuple[bytes, ext.WorkerMessage]:
        if self.pending:
            return self.pending.pop(0)
        if not self.socket.poll(int(timeout_s * 1000)):
            raise AssertionError(f"nothing from the worker within {timeout_s}s")
        frames = self.socket.recv_multipart()
        self.sizes.append((sum(map(len, frames)), len(frames)))
        message = ext.decode_worker(frames[1:])
        if isinstance(message, ext.Dones):
            self.dones_seen += 1
            self.pending = [(frames[0], done) for done in message.items]
            return self.pending.pop(0)
        return frames[0], message


@pytest.fixture
def fake(zmq_ctx: Ctx) -> RawFake:
    return RawFake(zmq_ctx, "inproc://fake-broker")


@pytest.fixture
def make_worker(fake: RawFake, zmq_ctx: Ctx) -> Iterator[Callable[..., Worker]]:
    yield from worker_maker(fake.endpoint, zmq_ctx)


def send_tasks(fake: RawFake, identity: bytes, n: int) -> None:
    for i in range(n):
        fake.send_task(identity, f"t{i}", 1, b"%d" % i)
    acked = 0
    while acked < n:
        acked += len(fake.expect(ext.Ack)[1].tasks)


@pytest.mark.parametrize(
    ("n", "result", "max_message_bytes"),
    [
        (8, lambda i: [bytes([i]) * 20_000], 64 * 1024),  # 160 KB in all: over the byte cap
        (3, lambda i: [bytes([i])] * 6_000, 16 * MiB),  # 18000 frames: over the frame cap
    ],
    ids=["bytes", "frames"],
)
def test_results_finishing_together_are_split_to_fit_the_broker_caps(
    fake: RawFake,
    make_worker: Callable[..., Worker],
    n: int,
    result: Callable[[int], list[bytes]],
    max_message_bytes: int,
) -> None:
    # Given n handlers whose results, together, exceed one message's cap
    gate = Gate()

    async def handler(task: Task) -> list[bytes]:
        await gate.wait()
        return result(int(task.payload))

    worker = make_worker(handler, concurrency=n, max_message_bytes=max_message_bytes)
    identity = fake.register()
    send_tasks(fake, identity, n)
    wait_until(lambda: worker.running == n, timeout_s=10)
    del fake.sizes[:]
    # When they finish together
    gate.open()
    done = {}
    for _ in range(n):
        message = fake.expect(ext.Done)[1]
        done[message.id] = message
    # Then every result arrives whole, in messages that each fit the caps
    assert done == {f"t{i}": ext.Done(f"t{i}", 1, tuple(result(i))) for i in range(n)}
    assert len(fake.sizes) >= 2
    assert all(size <= max_message_bytes for size, _ in fake.sizes), fake.sizes
    assert all(frames <= BROKER_FRAME_CAP for _, frames in fake.sizes), fake.sizes
    assert worker.stats.handled == n


def test_a_result_with_more_frames_than_the_broker_takes_fails_for_good(
    fake: RawFake, make_worker: Callable[..., Worker]
) -> None:
    # Given a handler returning more frames than any message may carry
    def many(task: Task) -> list[bytes]:
        return [b""] * BROKER_FRAME_CAP

    worker = make_worker(many)
    identity = fake.register()
    # When it runs a task
    fake.send_task(identity, "t1", 1, b"job")
    fake.expect(ext.Ack)
    # Then the attempt fails, not retryable, with a reason that says why
    fail = fake.expect(ext.Fail)[1]
    assert (fail.id, fail.attempt, fail.retry) == ("t1", 1, False)
    assert f"result of {BROKER_FRAME_CAP} frames is over the broker's message cap" in fail.reason
    assert worker.stats.results_too_large == 1


# More PROGRESS than the inproc pipe holds: the worker's send HWM plus the fake's
# receive HWM, 11000 (checked by the last test).
FLOOD = 25_000


def flood(task: Task) -> bytes:
    for _ in range(FLOOD):
        task.progress(b"p")
    return b"result"


def read_until(fake: RawFake, kind: type[ext.WorkerMessage]) -> list[ext.WorkerMessage]:
    """Every message up to and including the first `kind`, heartbeats left out."""
    seen: list[ext.WorkerMessage] = []
    while True:
        message = fake.recv()[1]
        if not isinstance(message, ext.Heartbeat):
            seen.append(message)
        if isinstance(message, kind):
            return seen


def flooded(fake: RawFake, make_worker: Callable[..., Worker]) -> Worker:
    """A worker whose one task flooded progress at the fake, which read nothing: its
    handler has returned, and its result waits behind a full send queue."""
    worker = make_worker(flood)
    identity = fake.register()
    fake.send_task(identity, "t1", 1, b"job")
    stats = worker.stats
    wait_until(lambda: stats.progress_sent + stats.progress_dropped == FLOOD, timeout_s=10)
    wait_until(lambda: worker.running == 0, timeout_s=10)
    assert stats.handled == 0  # the result has not gone out
    return worker


def test_a_result_held_back_by_a_full_send_queue_still_reaches_the_broker(
    fake: RawFake, make_worker: Callable[..., Worker]
) -> None:
    # Given a handler flooding progress at a broker that reads nothing meanwhile
    worker = flooded(fake, make_worker)
    stats = worker.stats
    # Then the result waits, not counted as sent (`flooded` checked), and the progress
    # that found no room is dropped
    assert stats.progress_dropped > 0
    # When the broker reads again
    seen = read_until(fake, ext.Done)
    # Then it gets the ACK, the progress that was sent, and the result last
    assert isinstance(seen[0], ext.Ack)
    assert sum(isinstance(m, ext.Progress) for m in seen) == stats.progress_sent
    assert seen[-1] == ext.Done("t1", 1, (b"result",))
    assert len(seen) == 2 + stats.progress_sent
    assert stats.handled == 1 and stats.stale_results_dropped == 0


def test_stop_sends_results_held_back_by_a_full_send_queue_before_disconnect(
    fake: RawFake, make_worker: Callable[..., Worker]
) -> None:
    # Given a result held back by a broker that reads nothing
    worker = flooded(fake, make_worker)
    stats = worker.stats
    # When the worker is stopped and the broker reads again
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(worker.stop(timeout_s=5)))
    stopper.start()
    seen = read_until(fake, ext.Disconnect)
    stopper.join(10)
    # Then the result went out before the DISCONNECT, and the stop was clean
    assert seen[-2:] == [ext.Done("t1", 1, (b"result",)), ext.Disconnect()]
    assert stopped == [True]
    assert stats.handled == 1 and stats.stale_results_dropped == 0


def test_max_message_bytes_is_checked() -> None:
    with pytest.raises(TypeError):
        Worker("tcp://127.0.0.1:5555", "svc", flood, max_message_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_message_bytes"):
        Worker("tcp://127.0.0.1:5555", "svc", flood, max_message_bytes=100)
    worker = Worker("tcp://127.0.0.1:5555", "svc", flood, max_message_bytes=MiB)
    assert worker.max_message_bytes == MiB
    assert Worker("tcp://127.0.0.1:5555", "svc", flood).max_message_bytes == 16 * MiB


def test_the_flood_overflows_the_inproc_pipe(fake: RawFake) -> None:
    # The back-pressure tests rely on the HWMs: a premise check, not a worker test
    assert DEFAULT_HWM + fake.socket.rcvhwm < FLOOD
