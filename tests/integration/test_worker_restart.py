"""The Worker across a broker restart: it registers again with the credit its handlers
really have free, and it hears the broker's STOPPING notice without dropping anything.

Against a fake broker (a ROUTER socket in the test, tests/integration/test_worker.py),
which sees the exact READY the worker sends. A restarted broker does not know the
worker and answers it with DISCONNECT: that is what the fake broker sends here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import zmq

from tests.conftest import wait_until
from tests.integration.test_worker import Ctx, FakeBroker, worker_maker
from zbroker.client import Task, Worker
from zbroker.protocol import ext

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
def fake(zmq_ctx: Ctx) -> FakeBroker:
    return FakeBroker(zmq_ctx, "inproc://fake-broker-restart")


@pytest.fixture
def release() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # never leave a handler blocked behind a failed assertion


@pytest.fixture
def make_worker(fake: FakeBroker, zmq_ctx: Ctx) -> Iterator[Callable[..., Worker]]:
    yield from worker_maker(fake.endpoint, zmq_ctx)


def blocking(release: threading.Event) -> Callable[[Task], bytes]:
    """A handler that holds `block` tasks until `release` is set and echoes the others."""

    def handle(task: Task) -> bytes:
        if task.payload == b"block":
            assert release.wait(20)
        return task.payload

    return handle


def test_after_a_restart_the_worker_offers_only_its_free_handlers(
    fake: FakeBroker, make_worker: Callable[..., Worker], release: threading.Event
) -> None:
    # Given a worker with two handlers, one of them busy on attempt 1 of t1
    worker = make_worker(blocking(release), concurrency=2)
    identity = fake.register()
    fake.send_task(identity, "t1", 1, b"block")
    fake.expect(ext.Ack)
    wait_until(lambda: worker.running == 1)
    assert worker.credit == 2
    # When the broker restarts (it no longer knows the worker: DISCONNECT)
    fake.send(identity, ext.disconnect("unknown worker: send READY"))
    # Then the worker registers again offering only its free handler
    new_identity, ready = fake.expect(ext.Ready)
    assert new_identity != identity
    assert ready.credit == 1
    assert worker.credit == 1
    # And a task of the new connection runs at once, beside the abandoned attempt
    fake.greet(new_identity)
    fake.send_task(new_identity, "t2", 1, b"fresh")
    fake.expect(ext.Ack)
    assert fake.expect(ext.Done)[1] == ext.Done("t2", 1, (b"fresh",))
    # And the abandoned attempt's result, when it comes, is dropped, not sent
    release.set()
    wait_until(lambda: worker.stats.stale_results_dropped == 1)
    assert worker.running == 0


def test_with_every_handler_busy_it_registers_when_one_returns(
    fake: FakeBroker, make_worker: Callable[..., Worker], release: threading.Event
) -> None:
    # Given a worker whose only handler runs an attempt the broker then forgets
    worker = make_worker(blocking(release), concurrency=1, reconnect_delay_s=0.05)
    identity = fake.register()
    fake.send_task(identity, "t1", 1, b"block")
    fake.expect(ext.Ack)
    wait_until(lambda: worker.running == 1)
    fake.send(identity, ext.disconnect("unknown worker: send READY"))
    # Then no READY comes while the handler is busy (a credit of 0 cannot be offered)
    assert not fake.socket.poll(600, zmq.POLLIN)
    # When the handler returns
    release.set()
    # Then the worker registers with the handler it has free
    _, ready = fake.expect(ext.Ready)
    assert ready.credit == 1
    wait_until(lambda: worker.stats.stale_results_dropped == 1)


def test_stopping_notice_keeps_the_results_in_flight(
    fake: FakeBroker, make_worker: Callable[..., Worker], release: threading.Event
) -> None:
    # Given a worker running a task
    worker = make_worker(blocking(release), concurrency=2)
    identity = fake.register()
    fake.send_task(identity, "t1", 4, b"block")
    fake.expect(ext.Ack)
    wait_until(lambda: worker.running == 1)
    # When the broker says it is stopping
    fake.send(identity, ext.stopping(10.0))
    wait_until(lambda: worker.stats.broker_stopping == 1)
    # Then the worker still sends the result on the same connection
    release.set()
    done_identity, done = fake.expect(ext.Done)
    assert (done_identity, done) == (identity, ext.Done("t1", 4, (b"block",)))
    assert worker.stats.malformed == 0 and worker.stats.reconnects == 0
