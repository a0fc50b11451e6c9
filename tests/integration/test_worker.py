"""The ZBW01 Worker: concurrency, acknowledgements, failures, cancellation, progress, stop.

Two kinds of tests. Against a real `zbroker start` process, for what the
broker does with the worker's messages. Against a fake broker, a ROUTER
socket in the test that speaks the broker's side of ZBW01 through
`zbroker.protocol.ext`, for the exact frames the worker sends and when.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, TypeVar

import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from zbroker.client import (
    Client,
    Handler,
    NonRetryableError,
    RequestTimeout,
    RetryLater,
    Task,
    Worker,
)
from zbroker.protocol import ext

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

Ctx = zmq.Context[zmq.Socket[bytes]]
M = TypeVar("M", bound=ext.WorkerMessage)


def echo(task: Task) -> bytes:
    return task.payload


# ------------------------------------------------------------ against a real broker


def test_concurrency_n_runs_n_handlers_at_once(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a worker with concurrency 4 whose handler only returns once 4 calls run together
    n = 4
    barrier = threading.Barrier(n)
    threads: set[int] = set()

    def meet(task: Task) -> bytes:
        threads.add(threading.get_ident())
        barrier.wait(timeout=15)
        return task.payload

    worker = start_worker(stack, broker, "meet", meet, concurrency=n)
    pool = stack.enter_context(ThreadPoolExecutor(max_workers=n))

    def ask(i: int) -> bytes:
        with Client(broker.endpoint, timeout_s=20, retries=0) as client:
            return client.mdp_request("meet", b"%d" % i)

    # When 4 clients send a request each, at the same time
    replies = [pool.submit(ask, i) for i in range(n)]
    # Then all 4 are answered: the 4 handlers met at the barrier, in 4 threads
    assert sorted(r.result(timeout=25) for r in replies) == [b"0", b"1", b"2", b"3"]
    assert len(threads) == n
    assert worker.stats.handled == n
    assert worker.stats.failed == 0
    assert "(ZBW01, credit 4)" in broker.log()


def test_async_handler_runs_concurrent_coroutines_on_one_loop(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given an `async def` handler that only returns once 3 coroutines wait together
    n = 3
    barrier = asyncio.Barrier(n)
    threads: set[int] = set()

    async def meet(task: Task) -> list[bytes]:
        threads.add(threading.get_ident())
        async with asyncio.timeout(15):
            await barrier.wait()
        return [task.payload, b"async"]

    worker = start_worker(stack, broker, "ameet", meet, concurrency=n)
    assert worker.is_async
    pool = stack.enter_context(ThreadPoolExecutor(max_workers=n))

    def ask(i: int) -> list[bytes]:
        with Client(broker.endpoint, timeout_s=20, retries=0) as client:
            return client.mdp_request_frames("ameet", b"%d" % i)

    # When 3 requests arrive together
    replies = [pool.submit(ask, i) for i in range(n)]
    # Then all are answered, by coroutines of a single event loop thread
    assert sorted(r.result(timeout=25)[0] for r in replies) == [b"0", b"1", b"2"]
    assert len(threads) == 1
    assert worker.stats.handled == n


def test_long_handler_keeps_its_task_past_the_ack_deadline(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    # Given a broker that takes back tasks not acknowledged within 0.3 s,
    # and a handler that runs five times longer than that
    broker = broker_factory("--ack-timeout", "0.3")
    attempts: list[int] = []
    cancelled: list[bool] = []

    def long(task: Task) -> bytes:
        attempts.append(task.attempt)
        cancelled.append(task.wait_cancelled(1.5))
        return b"kept"

    worker = start_worker(stack, broker, "long", long)
    client = open_client(stack, broker, timeout_s=15, retries=0)
    # When a request is sent
    reply = client.mdp_request("long", b"work")
    # Then it is answered once, by the first attempt, which was never taken back:
    # the worker acknowledged the task as soon as it arrived
    assert reply == b"kept"
    assert attempts == [1]
    assert cancelled == [False]
    assert worker.stats.acked == 1
    assert worker.stats.cancelled == 0
    assert "not acknowledged" not in broker.log()


def test_non_retryable_error_fails_the_task_for_good(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a handler that refuses its input as hopeless
    attempts: list[int] = []

    def refuse(task: Task) -> bytes:
        attempts.append(task.attempt)
        raise NonRetryableError("cannot parse the input")

    worker = start_worker(stack, broker, "strict", refuse)
    client = open_client(stack, broker, timeout_s=1.5, retries=0)
    # When a request is sent
    # Then MDP has no way to tell the client: it times out
    with pytest.raises(RequestTimeout):
        client.mdp_request("strict", b"garbage")
    # And the broker gave up at once, without a second attempt
    wait_until(lambda: "failed for good" in broker.log(), timeout_s=10)
    assert "NonRetryableError: cannot parse the input" in broker.log()
    assert attempts == [1]
    assert worker.stats.failed == 1


@pytest.mark.parametrize(
    "failure",
    [lambda: RetryLater(0.05, "GPU busy"), lambda: RuntimeError("flaky")],
    ids=["retry-later", "plain-exception"],
)
def test_retryable_failure_is_retried_with_the_next_attempt(
    broker: BrokerProcess, stack: ExitStack, failure: Callable[[], Exception]
) -> None:
    # Given a handler that fails its first attempt only
    attempts: list[int] = []

    def flaky(task: Task) -> bytes:
        attempts.append(task.attempt)
        if task.attempt == 1:
            raise failure()
        return b"ok on attempt %d" % task.attempt

    worker = start_worker(stack, broker, "flaky", flaky)
    client = open_client(stack, broker, timeout_s=10, retries=0)
    # When a request is sent
    reply = client.mdp_request("flaky", b"job")
    # Then the broker retried it, and the second attempt answered
    assert reply == b"ok on attempt 2"
    assert attempts == [1, 2]
    assert worker.stats.failed == 1
    assert worker.stats.handled == 1


def test_broker_cancels_an_unacknowledged_task_and_fences_its_result(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack, zmq_ctx: Ctx
) -> None:
    # Given a broker with a 0.3 s ACK deadline and a raw ZBW01 worker that never ACKs
    broker = broker_factory("--ack-timeout", "0.3")
    raw = zmq_ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(broker.endpoint)
    raw.send_multipart(ext.ready("raw", 1))
    client = open_client(stack, broker, timeout_s=15, retries=0)
    pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))

    def next_message() -> ext.BrokerMessage:
        """The next message other than HEARTBEAT, heartbeating meanwhile to stay alive."""
        for _ in range(200):
            raw.send_multipart(ext.heartbeat())
            if raw.poll(50):
                message = ext.decode_for_worker(raw.recv_multipart())
                if not isinstance(message, ext.Heartbeat):
                    return message
        raise AssertionError("the broker sent nothing but heartbeats for 10 s")

    # When a request arrives and the raw worker sits on it
    reply = pool.submit(client.mdp_request, "raw", b"job")
    first = next_message()
    assert isinstance(first, ext.Task)
    assert first.attempt == 1
    # Then the broker sends CANCEL for that attempt, and delivers it again as attempt 2
    assert next_message() == ext.Cancel(first.id, 1)
    second = next_message()
    assert isinstance(second, ext.Task)
    assert (second.id, second.attempt, second.payload) == (first.id, 2, (b"job",))
    raw.send_multipart(ext.ack([(second.id, 2)]))
    # And a result for the cancelled attempt is refused; the live attempt's is delivered
    raw.send_multipart(ext.done(first.id, 1, [b"stale"]))
    raw.send_multipart(ext.done(second.id, 2, [b"fresh"]))
    assert reply.result(timeout=10) == b"fresh"
    assert "not acknowledged" in broker.log()


# ------------------------------------------------------------ against a fake broker


class FakeBroker:
    """A ROUTER socket playing the broker's side of ZBW01, one step at a time."""

    def __init__(self, ctx: Ctx, endpoint: str) -> None:
        self.endpoint = endpoint
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.bind(endpoint)
        self.pending: list[tuple[bytes, ext.WorkerMessage]] = []
        self.dones_seen = 0  # DONES messages (several results in one)

    def recv(self, timeout_s: float = 10.0) -> tuple[bytes, ext.WorkerMessage]:
        """The next message; a DONES is handed out as its DONEs, one per call."""
        if self.pending:
            return self.pending.pop(0)
        if not self.socket.poll(int(timeout_s * 1000)):
            raise AssertionError(f"nothing from the worker within {timeout_s}s")
        frames = self.socket.recv_multipart()
        message = ext.decode_worker(frames[1:])
        if isinstance(message, ext.Dones):
            self.dones_seen += 1
            self.pending = [(frames[0], done) for done in message.items]
            return self.pending.pop(0)
        return frames[0], message

    def expect(self, kind: type[M], timeout_s: float = 10.0) -> tuple[bytes, M]:
        """The next message, skipping heartbeats; it must be a `kind`."""
        while True:
            identity, message = self.recv(timeout_s)
            if isinstance(message, kind):
                return identity, message
            if not isinstance(message, ext.Heartbeat):
                raise AssertionError(f"expected {kind.__name__}, got {message!r}")

    def send(self, identity: bytes, frames: list[bytes]) -> None:
        self.socket.send_multipart([identity, *frames])

    def greet(self, identity: bytes) -> None:
        self.send(identity, ext.heartbeat())  # a broker HEARTBEAT has the same frames

    def send_task(self, identity: bytes, task_id: str, attempt: int, *payload: bytes) -> None:
        meta = ext.task_meta(task_id, attempt, "svc")
        self.send(identity, [ext.EMPTY, ext.ZBW01, ext.TASK, meta, *payload])

    def register(self) -> bytes:
        """Wait for READY, greet the worker, return its routing id."""
        identity, _ = self.expect(ext.Ready)
        self.greet(identity)
        return identity


@pytest.fixture
def fake(zmq_ctx: Ctx) -> FakeBroker:
    return FakeBroker(zmq_ctx, "inproc://fake-broker")


def worker_maker(endpoint: str, ctx: Ctx) -> Iterator[Callable[..., Worker]]:
    """For a fixture: yields make(handler, **kw), which starts a worker of "svc" on
    `endpoint`; all are stopped when the fixture ends, before the sockets close."""
    workers: list[Worker] = []

    def make(handler: Handler, **kw: Any) -> Worker:
        # A long interval: the fake broker does not heartbeat on its own.
        kw.setdefault("heartbeat_interval_s", 5.0)
        worker = Worker(endpoint, "svc", handler, context=ctx, **kw)
        workers.append(worker)
        return worker.start()

    yield make
    for worker in workers:
        worker.stop(timeout_s=2)


@pytest.fixture
def make_worker(fake: FakeBroker, zmq_ctx: Ctx) -> Iterator[Callable[..., Worker]]:
    yield from worker_maker(fake.endpoint, zmq_ctx)


def test_connected_only_once_the_broker_greets(
    fake: FakeBroker, make_worker: Callable[..., Worker]
) -> None:
    # Given a worker whose READY has reached the broker
    worker = make_worker(echo, concurrency=2, tags=("gpu", "fast"))
    identity, ready = fake.expect(ext.Ready)
    assert ready == ext.Ready("svc", 2, ("gpu", "fast"), batch=True)
    assert not worker.connected
    # When the broker greets it
    fake.greet(identity)
    # Then it counts as connected
    wait_until(lambda: worker.connected)


def test_tasks_read_together_are_acknowledged_in_one_ack(
    fake: FakeBroker, make_worker: Callable[..., Worker]
) -> None:
    # Given a worker whose I/O thread is held inside its metrics callable,
    # while it answers the broker's greeting
    entered = threading.Event()
    release = threading.Event()

    def metrics() -> dict[str, Any]:
        entered.set()
        release.wait(10)
        return {"loaded_models": 2, "device": "cpu"}

    worker = make_worker(echo, concurrency=3, metrics=metrics)
    identity = fake.register()
    assert entered.wait(10)
    # When three tasks arrive before it reads its socket again
    for i in (1, 2, 3):
        fake.send_task(identity, f"t{i}", 1, b"job %d" % i)
    release.set()
    # Then the greeting is answered with the metrics attached
    _, heartbeat = fake.recv()
    assert heartbeat == ext.Heartbeat({"loaded_models": 2, "device": "cpu"})
    # And one ACK lists all three attempts
    _, ack = fake.expect(ext.Ack)
    assert ack == ext.Ack((("t1", 1), ("t2", 1), ("t3", 1)))
    # And each is answered
    done = {fake.expect(ext.Done)[1] for _ in range(3)}
    assert done == {ext.Done(f"t{i}", 1, (b"job %d" % i,)) for i in (1, 2, 3)}
    assert worker.stats.acked == 3
    assert worker.stats.handled == 3


def test_metrics_are_attached_at_most_once_per_interval(
    fake: FakeBroker, make_worker: Callable[..., Worker]
) -> None:
    # Given a worker with a metrics callable
    calls: list[int] = []

    def metrics() -> dict[str, Any]:
        calls.append(1)
        return {"calls": len(calls)}

    make_worker(echo, metrics=metrics)
    identity = fake.register()
    _, first = fake.expect(ext.Heartbeat)
    # When the broker heartbeats again within the worker's 5 s interval
    fake.greet(identity)
    _, second = fake.expect(ext.Heartbeat)
    # Then only the first answer carried metrics
    assert first == ext.Heartbeat({"calls": 1})
    assert second == ext.Heartbeat()
    assert calls == [1]


def test_failing_metrics_callable_leaves_heartbeats_alone(
    fake: FakeBroker, make_worker: Callable[..., Worker]
) -> None:
    # Given a metrics callable that raises
    def metrics() -> dict[str, Any]:
        raise RuntimeError("sensor offline")

    worker = make_worker(echo, metrics=metrics)
    # When the broker greets the worker
    fake.register()
    _, heartbeat = fake.expect(ext.Heartbeat)
    # Then the worker still answers, without metrics, and counts the error
    assert heartbeat == ext.Heartbeat()
    assert worker.stats.metrics_errors == 1


def test_result_of_a_cancelled_attempt_is_dropped(
    fake: FakeBroker, make_worker: Callable[..., Worker]
) -> None:
    # Given a worker running attempt 1 of a task, which waits to be cancelled
    started = threading.Event()
    saw_cancel: list[bool] = []

    def handler(task: Task) -> bytes:
        if task.attempt == 1:
            started.set()
            saw_cancel.append(task.wait_cancelled(10))
            return b"too late"
        return b"attempt %d" % task.attempt

    worker = make_worker(handler)
    identity = fake.register()
    fake.send_task(identity, "t1", 1, b"job")
    _, ack = fake.expect(ext.Ack)
    assert ack == ext.Ack((("t1", 1),))
    assert started.wait(10)
    # When the broker takes the attempt back
    fake.send(identity, ext.cancel("t1", 1))
    # Then the handler sees it, and its result is dropped instead of sent
    wait_until(lambda: worker.stats.stale_results_dropped == 1)
    assert saw_cancel == [True]
    assert worker.stats.cancelled == 1
    assert worker.stats.handled == 0
    # And the next attempt is served normally: its DONE is the first on the wire
    fake.send_task(identity, "t1", 2, b"job")
    fake.expect(ext.Ack)
    _, done = fake.expect(ext.Done)
    assert done == ext.Done("t1", 2, (b"attempt 2",))


def test_cancel_interrupts_an_async_handler_and_frees_its_slot(
    fake: FakeBroker, make_worker: Callable[..., Worker]
) -> None:
    # Given an async worker with one slot, busy with a coroutine that would sleep for long
    started = threading.Event()
    interrupted = threading.Event()

    async def handler(task: Task) -> bytes:
        if task.id == "long":
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                interrupted.set()
                raise
        return b"served " + task.id.encode()

    worker = make_worker(handler, concurrency=1)
    identity = fake.register()
    fake.send_task(identity, "long", 1)
    fake.expect(ext.Ack)
    assert started.wait(10)
    # When the broker cancels that attempt
    fake.send(identity, ext.cancel("long", 1))
    # Then the coroutine is cancelled, nothing is sent for it
    assert interrupted.wait(10)
    wait_until(lambda: worker.running == 0)
    assert worker.stats.cancelled == 1
    # And the slot is free at once for the next task
    fake.send_task(identity, "next", 1)
    fake.expect(ext.Ack)
    _, done = fake.expect(ext.Done)
    assert done == ext.Done("next", 1, (b"served next",))


def test_broker_disconnect_makes_the_worker_register_again(
    fake: FakeBroker, make_worker: Callable[..., Worker]
) -> None:
    # Given a registered worker
    worker = make_worker(echo, concurrency=2)
    identity = fake.register()
    wait_until(lambda: worker.connected)
    # When the broker tells it to disconnect
    fake.send(identity, ext.disconnect("unknown worker: send READY"))
    # Then it sends READY again, on a new connection
    new_identity, ready = fake.expect(ext.Ready)
    assert new_identity != identity
    assert ready == ext.Ready("svc", 2, batch=True)
    assert worker.stats.reconnects == 1
    # And serves tasks there
    fake.greet(new_identity)
    fake.send_task(new_identity, "t1", 1, b"again")
    fake.expect(ext.Ack)
    assert fake.expect(ext.Done)[1] == ext.Done("t1", 1, (b"again",))


def sync_progress(task: Task) -> bytes:
    task.progress(b"50%", b"halfway")
    task.progress()
    return b"done"


async def async_progress(task: Task) -> bytes:
    task.progress(b"50%", b"halfway")
    await asyncio.sleep(0)
    task.progress()
    return b"done"


@pytest.mark.parametrize("handler", [sync_progress, async_progress], ids=["sync", "async"])
def test_progress_reaches_the_broker_before_the_result(
    fake: FakeBroker, make_worker: Callable[..., Worker], handler: Handler
) -> None:
    # Given a handler that reports progress twice
    worker = make_worker(handler)
    identity = fake.register()
    # When it runs a task
    fake.send_task(identity, "t7", 3, b"job")
    fake.expect(ext.Ack)
    # Then PROGRESS arrives with the attempt's id and number and the data, then DONE
    assert fake.expect(ext.Progress)[1] == ext.Progress("t7", 3, (b"50%", b"halfway"))
    assert fake.expect(ext.Progress)[1] == ext.Progress("t7", 3, ())
    assert fake.expect(ext.Done)[1] == ext.Done("t7", 3, (b"done",))
    assert worker.stats.progress_sent == 2


def test_failures_are_reported_as_the_handler_asks(
    fake: FakeBroker, make_worker: Callable[..., Worker]
) -> None:
    # Given a handler that fails in each of the ways it can
    def handler(task: Task) -> Any:
        if task.id == "later":
            raise RetryLater(2.5, "GPU busy")
        if task.id == "hopeless":
            raise NonRetryableError("corrupt input")
        if task.id == "broken":
            raise KeyError("config")
        return 42  # not bytes

    worker = make_worker(handler)
    identity = fake.register()
    # When it runs one task of each kind
    for task_id in ("later", "hopeless", "broken", "wrong-type"):
        fake.send_task(identity, task_id, 1)
    fails: dict[str, ext.Fail] = {}
    while len(fails) < 4:
        _, message = fake.recv()
        if isinstance(message, ext.Fail):
            fails[message.id] = message
    # Then each FAIL says whether (and when) to retry, and why
    assert fails["later"] == ext.Fail("later", 1, "RetryLater: GPU busy", True, 2.5)
    assert fails["hopeless"] == ext.Fail(
        "hopeless", 1, "NonRetryableError: corrupt input", False, None
    )
    assert fails["broken"] == ext.Fail("broken", 1, "KeyError: 'config'", True, None)
    wrong = fails["wrong-type"]
    assert not wrong.retry
    assert "int" in wrong.reason
    assert worker.stats.failed == 4


def test_stop_lets_running_handlers_finish_and_leaves_queued_tasks_unstarted(
    fake: FakeBroker, make_worker: Callable[..., Worker], stack: ExitStack
) -> None:
    # Given a one-slot worker running t1, with t2 received and waiting behind it
    started = threading.Event()
    release = threading.Event()
    stack.callback(release.set)
    calls: list[str] = []

    def handler(task: Task) -> bytes:
        calls.append(task.id)
        started.set()
        release.wait(10)
        return b"finished " + task.id.encode()

    worker = make_worker(handler)
    identity = fake.register()
    fake.send_task(identity, "t1", 1)
    fake.expect(ext.Ack)
    assert started.wait(10)
    fake.send_task(identity, "t2", 1)
    fake.expect(ext.Ack)
    # When stop() is called, and then the running handler finishes
    pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
    stopped = pool.submit(worker.stop, 10)
    wait_until(lambda: worker.stopping)
    release.set()
    # Then t1's DONE goes out before DISCONNECT, which hands t2 back to the broker
    assert fake.expect(ext.Done)[1] == ext.Done("t1", 1, (b"finished t1",))
    fake.expect(ext.Disconnect)
    assert stopped.result(timeout=10) is True
    assert calls == ["t1"]
    assert worker.stats.not_started == 1
    assert not worker.connected


def test_stop_gives_up_on_handlers_that_overrun_its_timeout(
    fake: FakeBroker, make_worker: Callable[..., Worker], stack: ExitStack
) -> None:
    # Given a worker whose handler runs until released
    started = threading.Event()
    release = threading.Event()
    stack.callback(release.set)

    def handler(task: Task) -> bytes:
        started.set()
        release.wait(20)
        return b"late"

    worker = make_worker(handler)
    identity = fake.register()
    fake.send_task(identity, "t1", 1)
    fake.expect(ext.Ack)
    assert started.wait(10)
    # When stop() allows it only 0.3 s
    # Then stop() reports that, and DISCONNECT goes out anyway
    assert worker.stop(timeout_s=0.3) is False
    fake.expect(ext.Disconnect)
    # And the late result is dropped, never sent
    release.set()
    wait_until(lambda: worker.stats.stale_results_dropped == 1)
    assert worker.stats.handled == 0


def test_stop_from_a_signal_handler_ends_run_in_the_main_thread(
    fake: FakeBroker, zmq_ctx: Ctx
) -> None:
    # Given a worker served by run() in this (the main) thread, and SIGUSR1 wired to stop()
    worker = Worker(fake.endpoint, "svc", echo, context=zmq_ctx, heartbeat_interval_s=5.0)
    answers: list[bool] = []
    problems: list[BaseException] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: answers.append(worker.stop()))
    try:

        def greet_then_signal() -> None:
            try:
                fake.register()
                wait_until(lambda: worker.connected)
                os.kill(os.getpid(), signal.SIGUSR1)  # to the process, like `kill` does
            except BaseException as exc:
                problems.append(exc)
                worker.stop(timeout_s=1)  # so that run() returns and the test can report it

        helper = threading.Thread(target=greet_then_signal)
        helper.start()
        # When the signal arrives while run() serves
        worker.run()
        helper.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # Then run() returned; stop() itself returned at once, as it runs in run()'s thread
    assert problems == []
    assert answers == [False]
    assert not worker.connected
    fake.expect(ext.Disconnect)


def test_a_background_worker_that_fails_says_so(broker: BrokerProcess, stack: ExitStack) -> None:
    def fatal(task: Task) -> bytes:
        raise SystemExit("the handler pulled the plug")  # not a task failure: it ends the worker

    worker = start_worker(stack, broker, "fatal", fatal)
    assert not worker.stopped and worker.error is None
    client = open_client(stack, broker)
    client.enqueue("fatal", b"x")
    wait_until(lambda: worker.stopped, timeout_s=10)
    assert isinstance(worker.error, SystemExit)
    wait_until(lambda: not client.mmi_service("fatal"), timeout_s=10)


def test_a_cleanly_stopped_worker_has_no_error(broker: BrokerProcess, stack: ExitStack) -> None:
    worker = start_worker(stack, broker, "fine", lambda task: task.payload)
    assert worker.stop(5) is True
    assert worker.stopped and worker.error is None
