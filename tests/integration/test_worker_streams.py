"""Worker streams (docs/protocol.md §13): `task.emit()`, generator handlers, chunks
before results, and cancellation reaching a streaming handler.

Against a real `zbroker start` process, read by a raw ZBC01 client on a DEALER
(STREAM, MORE, CLOSE and the CHUNKS answers, straight from
`zbroker.protocol.zbc`); and against a fake broker (a ROUTER speaking ZBW01
through `zbroker.protocol.ext`) for the exact CHUNK and DONES frames the
worker sends and in which order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import HEARTBEAT_S, start_worker
from zbroker.client import Service, Task, Worker
from zbroker.protocol import ext, zbc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]


# ------------------------------------------------------------ a raw ZBC01 reader


@dataclass
class Call:
    """What one STREAM call received so far."""

    task_id: str = ""
    chunks: list[bytes] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    end: zbc.Answer | None = None  # the final REPLY

    @property
    def state(self) -> str:
        assert self.end is not None
        return str(self.end.meta["state"])


class Reader:
    """A raw ZBC01 client: STREAM calls on one DEALER, their answers sorted by rid.
    Every CHUNKS is credited back at once with MORE."""

    def __init__(self, ctx: Ctx, broker: BrokerProcess) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(broker.endpoint)
        self.calls: dict[int, Call] = {}
        self._rid = 0

    def stream(self, service: str, payload: bytes = b"", *, window: int | None = None) -> int:
        self._rid += 1
        self.calls[self._rid] = Call()
        self.sock.send_multipart(zbc.stream(self._rid, service, [payload], window=window))
        return self._rid

    def close(self, rid: int) -> None:
        self.sock.send_multipart(zbc.call(zbc.CLOSE, rid))

    def pump(self, timeout_s: float = 10.0) -> None:
        """Read one answer and record it with its call."""
        assert self.sock.poll(int(timeout_s * 1000)), f"no answer within {timeout_s}s"
        answer = zbc.decode_answer(self.sock.recv_multipart())
        assert answer.ok, f"{answer.code}: {answer.message}"
        call = self.calls[answer.rid]
        if answer.chunks:
            # attempts "all": the offsets of a call are consecutive
            assert answer.meta["offset"] == len(call.chunks)
            call.chunks.extend(answer.frames)
            call.attempts.extend([answer.meta["attempt"]] * len(answer.frames))
            self.sock.send_multipart(zbc.call(zbc.MORE, answer.rid, credit=len(answer.frames)))
        elif "state" in answer.meta:
            assert call.end is None, "two final answers"
            call.end = answer
        else:  # the acceptance: the task is stored
            call.task_id = answer.meta["ids"][0]

    def until(self, rid: int, chunks: int, timeout_s: float = 10.0) -> Call:
        """Pump until call `rid` has at least `chunks` chunks."""
        deadline = time.monotonic() + timeout_s
        while len(self.calls[rid].chunks) < chunks:
            self.pump(max(0.01, deadline - time.monotonic()))
        return self.calls[rid]

    def finish(self, *rids: int, timeout_s: float = 15.0) -> list[Call]:
        """Pump until every call in `rids` has its final REPLY."""
        deadline = time.monotonic() + timeout_s
        while any(self.calls[rid].end is None for rid in rids):
            self.pump(max(0.01, deadline - time.monotonic()))
        return [self.calls[rid] for rid in rids]


@pytest.fixture
def reader(broker: BrokerProcess, zmq_ctx: Ctx) -> Reader:
    return Reader(zmq_ctx, broker)


def assert_done(call: Call, chunks: list[bytes], result: tuple[bytes, ...]) -> None:
    assert call.end is not None
    assert call.state == "done", call.end.meta
    assert call.chunks == chunks
    assert call.end.meta["next"] == len(chunks)
    assert call.end.frames == result


# ------------------------------------------------------------ emit()


def test_emit_from_a_sync_handler_streams_chunks_in_order_then_the_result(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given a plain handler that emits bytes, a str and a bytearray, then returns
    queued: list[bool] = []

    def speak(task: Task) -> bytes:
        for word in (b"Hel", "lo", bytearray(b" there")):
            queued.append(task.emit(word))
        return b"Hello there"

    worker = start_worker(stack, broker, "speak", speak)
    # When a reader streams a task of it
    (call,) = reader.finish(reader.stream("speak", b"hi"))
    # Then it gets the chunks in order (the str as UTF-8), then the result
    assert_done(call, [b"Hel", b"lo", b" there"], (b"Hello there",))
    assert call.attempts == [1, 1, 1]
    assert queued == [True, True, True]
    assert worker.stats.chunks_sent == 3
    assert worker.stats.stale_chunks_dropped == 0


def test_emit_from_an_async_handler_streams_chunks_in_order_then_the_result(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given an `async def` handler that emits (no await needed) between awaits
    async def speak(task: Task) -> list[bytes]:
        for i in range(5):
            task.emit(f"token{i} ")
            await asyncio.sleep(0.001)
        return [b"five", b"tokens"]

    worker = start_worker(stack, broker, "aspeak", speak)
    assert worker.is_async
    # When a reader streams a task of it
    (call,) = reader.finish(reader.stream("aspeak"))
    # Then the chunks come in order, then the result's frames
    assert_done(call, [b"token%d " % i for i in range(5)], (b"five", b"tokens"))


# ------------------------------------------------------------ generator handlers


def words(task: Task) -> Generator[str, None, bytes]:
    """A generator handler: each word is a chunk; what it returns is the result."""
    text = task.payload.decode()
    for word in text.split():
        yield word + " "
    return text.upper().encode()


def returns_a_generator(task: Task) -> Iterator[bytes]:
    """A plain function that returns a generator: streamed the same way."""
    return (bytes([c]) for c in task.payload)


@pytest.mark.parametrize(
    ("handler", "result"),
    [(words, b"THE QUICK FOX"), (returns_a_generator, b"")],
    ids=["generator-function", "function-returning-a-generator"],
)
def test_a_generator_handler_streams_what_it_yields_then_what_it_returns(
    broker: BrokerProcess, stack: ExitStack, reader: Reader, handler: Any, result: bytes
) -> None:
    # Given a generator handler
    worker = start_worker(stack, broker, "gen", handler)
    assert not worker.is_async
    # When a reader streams a task of it
    (call,) = reader.finish(reader.stream("gen", b"the quick fox"))
    # Then each yielded value is a chunk, in order, and the return value the result
    # (b"" when the generator returns nothing)
    expected = (
        [b"the ", b"quick ", b"fox "]
        if handler is words
        else [bytes([c]) for c in b"the quick fox"]
    )
    assert_done(call, expected, (result,))
    assert worker.stats.chunks_sent == len(expected)
    assert worker.stats.handled == 1


def test_an_async_generator_handler_streams_what_it_yields_and_its_result_is_empty(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given an async generator handler
    async def count(task: Task) -> AsyncIterator[bytes]:
        for i in range(int(task.payload)):
            await asyncio.sleep(0.001)
            yield b"%d" % i

    worker = start_worker(stack, broker, "acount", count)
    assert worker.is_async
    # When a reader streams a task of it
    (call,) = reader.finish(reader.stream("acount", b"6"))
    # Then it gets every yielded value in order, and the result b""
    assert_done(call, [b"%d" % i for i in range(6)], (b"",))


def test_a_yielded_value_that_is_not_a_chunk_fails_the_task_for_good(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given a generator handler that yields an int after a good chunk
    def bad(task: Task) -> Iterator[Any]:
        yield b"fine"
        yield 42

    worker = start_worker(stack, broker, "bad", bad)
    # When a reader streams a task of it
    (call,) = reader.finish(reader.stream("bad"))
    # Then the task is dead at once (no retry could yield anything else), the chunk
    # before it kept
    assert call.state == "dead"
    assert call.end is not None
    assert "unusable chunk" in call.end.meta["error"]
    assert call.chunks == [b"fine"]
    assert worker.stats.failed == 1


# ------------------------------------------------------------ chunks before results


def test_chunks_leave_before_their_results_when_many_results_are_batched(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given a worker of credit 8 whose handlers finish together, 8 at a time (so their
    # results leave in DONES), each emitting several chunks just before it returns
    concurrency, tasks, per_task = 8, 48, 6
    barrier = threading.Barrier(concurrency)

    def burst(task: Task) -> bytes:
        barrier.wait(timeout=20)
        for i in range(per_task):
            task.emit(task.payload + b".%d" % i)
        return task.payload

    worker = start_worker(stack, broker, "burst", burst, concurrency=concurrency)
    # When 48 tasks are streamed at once, with a window smaller than a task's stream
    rids = [reader.stream("burst", b"t%d" % i, window=2) for i in range(tasks)]
    calls = reader.finish(*rids, timeout_s=40)
    # Then every stream has all its chunks, in order, before its result: a chunk that
    # reached the broker after its attempt's DONE would have been refused
    for i, call in enumerate(calls):
        payload = b"t%d" % i
        assert_done(call, [payload + b".%d" % k for k in range(per_task)], (payload,))
    assert worker.stats.chunks_sent == tasks * per_task
    assert worker.stats.handled == tasks


# ------------------------------------------------------------ cancellation


def test_closing_a_stream_stops_a_generator_handler_within_a_heartbeat(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given a generator handler that would yield forever
    stopped = threading.Event()
    seen: dict[str, Any] = {}

    def forever(task: Task) -> Iterator[bytes]:
        try:
            i = 0
            while True:
                yield b"%d" % i
                i += 1
                time.sleep(0.005)
        finally:
            seen["cancelled"] = task.cancelled
            seen["thread"] = threading.current_thread().name
            stopped.set()

    worker = start_worker(stack, broker, "forever", forever)
    rid = reader.stream("forever")
    reader.until(rid, 3)
    # When its reader abandons the call (cancel_on_abandon: true for STREAM)
    closed_at = time.monotonic()
    reader.close(rid)
    # Then the broker cancels the task and the generator is closed at its `yield`,
    # well within one heartbeat interval
    assert stopped.wait(10)
    assert time.monotonic() - closed_at < 2 * HEARTBEAT_S
    assert seen["cancelled"] is True
    assert seen["thread"].startswith("zbroker-worker-forever-")  # closed in its own thread
    # And its attempt ends as cancelled: no result is sent
    wait_until(lambda: worker.stats.cancelled == 1 and worker.stats.stale_results_dropped == 1)
    assert worker.stats.handled == worker.stats.failed == 0


def test_closing_a_stream_cancels_an_async_generator_handler_at_its_await(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given an async generator handler that yields, then waits for a long time
    stopped = threading.Event()
    seen: dict[str, Any] = {}

    async def slow(task: Task) -> AsyncIterator[bytes]:
        try:
            yield b"first"
            yield b"second"
            await asyncio.sleep(30)
            yield b"never"
        except asyncio.CancelledError:
            seen["cancelled_error"] = True
            raise
        finally:
            seen["cancelled"] = task.cancelled
            stopped.set()

    worker = start_worker(stack, broker, "slow", slow)
    rid = reader.stream("slow")
    reader.until(rid, 2)
    # When its reader abandons the call
    closed_at = time.monotonic()
    reader.close(rid)
    # Then its coroutine is cancelled at its current await, within a heartbeat interval
    assert stopped.wait(10)
    assert time.monotonic() - closed_at < 2 * HEARTBEAT_S
    assert seen == {"cancelled_error": True, "cancelled": True}
    assert reader.calls[rid].chunks == [b"first", b"second"]
    wait_until(lambda: worker.stats.cancelled == 1)
    assert worker.stats.handled == worker.stats.failed == 0


def test_emit_after_the_attempt_was_cancelled_or_ended_is_a_counted_no_op(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given a handler that emits, waits for its attempt to be cancelled, then emits again
    late: list[bool] = []
    returned = threading.Event()

    def chatty(task: Task) -> bytes:
        task.emit(b"first")
        assert task.wait_cancelled(10)
        late.append(task.emit(b"late"))  # must not raise
        late.append(task.emit("later"))
        returned.set()
        return b"ignored"

    worker = start_worker(stack, broker, "chatty", chatty)
    rid = reader.stream("chatty")
    reader.until(rid, 1)
    # When the reader abandons the call, and the task is cancelled
    reader.close(rid)
    # Then emit() returns False, counted, and the handler carries on and returns
    assert returned.wait(10)
    assert late == [False, False]
    wait_until(lambda: worker.stats.stale_results_dropped == 1)
    assert worker.stats.stale_chunks_dropped == 2
    assert worker.stats.chunks_sent == 1

    # And emitting on a Task whose handler has returned is a no-op too
    kept: list[Task] = []

    def keep(task: Task) -> bytes:
        kept.append(task)
        return b"ok"

    other = start_worker(stack, broker, "keep", keep)
    (call,) = reader.finish(reader.stream("keep"))
    assert_done(call, [], (b"ok",))
    assert kept[0].emit(b"too late") is False
    assert other.stats.stale_chunks_dropped == 1


def test_a_stream_past_the_brokers_cap_cancels_with_a_reason_the_handler_sees(
    broker_factory: Any, stack: ExitStack, zmq_ctx: Ctx
) -> None:
    # Given a broker that keeps at most 3 chunks per task, and a handler that emits
    # one chunk at a time until its attempt is cancelled
    broker = broker_factory("--max-stream-chunks", "3")
    reader = Reader(zmq_ctx, broker)
    reasons: list[str | None] = []

    def flood(task: Task) -> bytes:
        while not task.cancelled:
            task.emit(b"x")
            task.wait_cancelled(0.02)
        reasons.append(task.cancel_reason)
        return b"ignored"

    worker = start_worker(stack, broker, "flood", flood)
    # When a reader streams a task of it
    (call,) = reader.finish(reader.stream("flood"))
    # Then the task is dead once its stream passes the cap; the handler was told why
    assert call.state == "dead"
    assert call.chunks == [b"x"] * 3
    wait_until(lambda: len(reasons) == 1)
    assert reasons[0] is not None and "cap" in reasons[0]
    assert worker.stats.cancelled == 1


def test_a_chunk_too_large_for_any_message_raises_value_error(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given a worker whose messages are capped at 4096 bytes, and a handler that
    # tries a 5000-byte chunk, then a small one
    errors: list[str] = []

    def big(task: Task) -> bytes:
        try:
            task.emit(b"x" * 5000)
        except ValueError as exc:
            errors.append(str(exc))
        task.emit(b"small")
        return b"ok"

    start_worker(stack, broker, "big", big, max_message_bytes=4096)
    (call,) = reader.finish(reader.stream("big"))
    # Then emit() refused the large one; the rest went through
    assert_done(call, [b"small"], (b"ok",))
    assert len(errors) == 1 and "over the broker's message cap" in errors[0]


def test_a_hand_built_task_has_no_stream() -> None:
    task = Task("t1", 1, "svc", (b"payload",))
    assert task.emit(b"chunk") is False
    assert task.cancel_reason is None
    with pytest.raises(TypeError):
        task.emit(42)  # type: ignore[arg-type]


# ------------------------------------------------------------ Service


def make_service(broker: BrokerProcess, name: str) -> Service:
    return Service(
        name,
        endpoint=broker.endpoint,
        events_in=broker.events_in,
        events_out=broker.events_out,
        heartbeat_s=None,
        grace_s=5.0,
    )


def test_service_generator_handlers_stream_and_pack_their_result(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given a service with a generator handler returning a dict, an async generator
    # handler, and a plain handler that emits
    svc = make_service(broker, "streamer")

    @svc.task("sgen")
    def sgen(task: Task) -> Generator[str, None, dict[str, int]]:
        yield "a"
        yield "b"
        return {"n": 2}

    @svc.task("agen")
    async def agen(task: Task) -> AsyncIterator[bytes]:
        for i in range(3):
            await asyncio.sleep(0)
            yield b"%d" % i

    @svc.task("plain")
    def plain(task: Task) -> str:
        task.emit(b"p")
        return "done"

    stack.enter_context(svc)
    assert svc.wait_ready(timeout_s=10)
    assert svc.workers["agen"].is_async
    # When each is streamed
    calls = reader.finish(reader.stream("sgen"), reader.stream("agen"), reader.stream("plain"))
    # Then the chunks come as yielded or emitted, and the results are packed as the
    # service packs results (an async generator's is None)
    assert_done(calls[0], [b"a", b"b"], (msgpack.packb({"n": 2}),))
    assert_done(calls[1], [b"0", b"1", b"2"], (msgpack.packb(None),))
    assert_done(calls[2], [b"p"], (msgpack.packb("done"),))
    assert svc.stats.tasks_done == 3


def test_service_generator_stopped_by_cancellation_is_neither_done_nor_failed(
    broker: BrokerProcess, stack: ExitStack, reader: Reader
) -> None:
    # Given a service whose generator handler yields forever
    svc = make_service(broker, "endless")
    stopped = threading.Event()

    @svc.task("endless")
    def endless(task: Task) -> Iterator[bytes]:
        try:
            while True:
                yield b"."
                time.sleep(0.005)
        finally:
            stopped.set()

    stack.enter_context(svc)
    assert svc.wait_ready(timeout_s=10)
    rid = reader.stream("endless")
    reader.until(rid, 2)
    # When the reader abandons it
    reader.close(rid)
    # Then the generator is closed, and the service counts it neither way
    assert stopped.wait(2 * HEARTBEAT_S + 1)
    wait_until(lambda: svc.workers["endless"].stats.stale_results_dropped == 1)
    assert svc.stats.tasks_done == svc.stats.tasks_failed == 0


# ------------------------------------------------------------ the exact frames


class FakeBroker:
    """A ROUTER playing the broker's side of ZBW01."""

    def __init__(self, ctx: Ctx) -> None:
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def send(self, identity: bytes, frames: list[bytes]) -> None:
        self.socket.send_multipart([identity, *frames])

    def recv(self, timeout_s: float = 10.0) -> tuple[bytes, ext.WorkerMessage]:
        """The next message other than a HEARTBEAT."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self.socket.poll(remaining_ms):
                raise AssertionError(f"nothing from the worker within {timeout_s}s")
            frames = self.socket.recv_multipart()
            message = ext.decode_worker(frames[1:])
            if not isinstance(message, ext.Heartbeat):
                return frames[0], message


def test_chunks_read_together_share_a_chunk_message_sent_before_the_dones(
    zmq_ctx: Ctx, stack: ExitStack
) -> None:
    # Given a worker of credit 4 whose I/O thread we can hold (in its metrics call)
    fake = FakeBroker(zmq_ctx)
    hold, held, release = threading.Event(), threading.Event(), threading.Event()

    def metrics() -> dict[str, Any]:
        if hold.is_set():
            hold.clear()
            held.set()
            release.wait(10)
        return {}

    go = threading.Event()

    def handler(task: Task) -> bytes:
        assert go.wait(10)
        for i in range(3):
            task.emit(b"%s.%d" % (task.payload, i))
        return task.payload

    worker = Worker(
        fake.endpoint,
        "svc",
        handler,
        concurrency=4,
        heartbeat_interval_s=0.05,
        metrics=metrics,
        context=zmq_ctx,
    )
    stack.enter_context(worker)
    identity, ready = fake.recv()
    assert isinstance(ready, ext.Ready)
    fake.send(identity, ext.heartbeat())
    # When 4 tasks arrive in one TASKS, and all 4 handlers emit and return while the
    # I/O thread is held
    names = [b"a", b"b", b"c", b"d"]
    entries = [ext.task_entry(f"t-{n.decode()}", 1, "svc", 1) for n in names]
    fake.send(identity, [*ext.tasks_header(entries), *names])
    _, ack = fake.recv()
    assert isinstance(ack, ext.Ack)
    hold.set()
    assert held.wait(5)
    go.set()
    mailbox = worker._mailbox
    assert mailbox is not None
    wait_until(lambda: mailbox.queue.qsize() == 4 * (3 + 1))  # 3 chunks and a result each
    release.set()
    # Then each task's chunks leave in one CHUNK, and all of them before the one DONES
    # that carries the four results
    messages = [fake.recv()[1] for _ in range(5)]
    chunk_messages, dones = messages[:4], messages[4]
    by_task: dict[str, tuple[bytes, ...]] = {}
    for message in chunk_messages:
        assert isinstance(message, ext.Chunk), message
        by_task[message.id] = message.data
    assert by_task == {f"t-{n.decode()}": tuple(b"%s.%d" % (n, i) for i in range(3)) for n in names}
    assert isinstance(dones, ext.Dones), dones
    assert sorted((d.id, d.result) for d in dones.items) == [
        (f"t-{n.decode()}", (n,)) for n in names
    ]
    assert worker.stats.chunks_sent == 12
