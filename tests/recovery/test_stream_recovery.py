"""A task's stream survives `kill -9` of the broker: a reader that reconnects reads
every chunk the broker confirmed, none lost and none repeated (docs/protocol.md §13)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.integration.test_client_streams import RawStreamWorker
from zbroker import Client

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_reader_resumes_across_kill_9_without_loss_or_repeat(
    broker_factory: Callable[..., BrokerProcess], durability: str
) -> None:
    # Given a task whose worker streamed 300 chunks and finished
    broker = broker_factory("--durability", durability)
    worker = RawStreamWorker(broker.endpoint)
    worker.start()
    try:
        assert worker.ready.wait(10)
        with Client(broker.endpoint, timeout_s=1.0, retries=20, poll_s=2.0) as client:
            task_id = str(client.enqueue("stream", b"n:300"))
            assert client.result(task_id) == b"done:300"
            # And a reader a third of the way through it, with a small window
            stream = client.read_stream(task_id, window=8)
            got = [next(stream) for _ in range(100)]
            # When the broker is killed with SIGKILL and started again
            broker.kill()
            broker.start()
            # Then the same reader goes on from where it was: every chunk, in order, once
            got += list(stream)
            assert got == [f"c{i}".encode() for i in range(300)]
            assert stream.result == b"done:300"
            assert client.stats.resumes >= 1
            # And a new reader reads the whole stream from the start
            assert list(client.read_stream(task_id)) == got
            wait_until(lambda: client.status(task_id).stream_chunks == 300, timeout_s=5)
    finally:
        worker.stop.set()
        worker.join(5)
