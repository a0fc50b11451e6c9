"""TaskOptions end to end: both clients against a real `zbroker start`, with real Workers.

Each test runs once with Client and once with AsyncClient (driven on an event
loop of its own), since Client is generated from AsyncClient and both must
take `options=` the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import BrokerProcess
from tests.integration.running import start_worker
from zbroker import AsyncClient, Client, Task, TaskOptions, TaskState
from zbroker.client import PayloadPreview
from zbroker.protocol.limits import MAX_PREVIEW_BYTES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Calls:
    """One client's calls, made blocking: `calls.enqueue(...)` for either kind."""

    def __init__(self, client: Client | AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        if isinstance(self.client, Client):
            return method  # type: ignore[no-any-return]

        def blocking(*args: Any, **kw: Any) -> Any:
            return self._loop.run_until_complete(method(*args, **kw))

        return blocking


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(params=["Client", "AsyncClient"])
def calls(
    request: pytest.FixtureRequest,
    broker: BrokerProcess,
    loop: asyncio.AbstractEventLoop,
    stack: ExitStack,
) -> Calls:
    """Fixture order matters: the client (closed by `stack`) goes before its event loop."""
    if request.param == "Client":
        client: Client | AsyncClient = stack.enter_context(Client(broker.endpoint))
    else:
        aclient = AsyncClient(broker.endpoint)
        stack.callback(lambda: loop.run_until_complete(aclient.aclose()))
        client = aclient
    return Calls(client, loop)


def echo_options(task: Task) -> bytes:
    """The task's id and what the worker was given of its options, as JSON."""
    return json.dumps(
        {"id": task.id, "headers": task.headers, "timeout_s": task.timeout_s}
    ).encode()


def test_an_options_value_stores_the_task_as_the_keywords_do(calls: Calls) -> None:
    # Given a service nobody serves (its tasks stay queued), and options as one value
    options = TaskOptions(
        priority=5,
        delay_s=60,
        ttl_s=600,
        max_attempts=4,
        timeout_s=7.5,
        key="by-value",
        headers={"lang": "de"},
    )
    # When one task is enqueued with the value and one with the same keywords
    by_value = calls.enqueue("nobody", b"one", options=options)
    by_keywords = calls.enqueue(
        "nobody",
        b"two",
        priority=5,
        delay_s=60,
        ttl_s=600,
        max_attempts=4,
        timeout_s=7.5,
        key="by-keywords",
        headers={"lang": "de"},
    )
    # Then the broker holds both with the same options
    a, b = calls.status(by_value), calls.status(by_keywords)
    for status, key in ((a, "by-value"), (b, "by-keywords")):
        assert (status.state, status.priority, status.max_attempts) == (TaskState.DELAYED, 5, 4)
        assert (status.timeout_s, status.key, status.headers) == (7.5, key, {"lang": "de"})
        assert status.not_before is not None and 59 < status.not_before - status.created_at < 61
        assert status.expires_at is not None
    assert a.expires_at is not None and b.expires_at is not None
    assert abs((a.expires_at - a.created_at) - (b.expires_at - b.created_at)) < 1
    # And the value's key is the task's idempotency key: the same enqueue stores nothing
    again = calls.enqueue("nobody", b"one", options=options)
    assert again == by_value and again.existing and not by_value.existing


def test_a_not_before_in_options_delays_every_task_of_a_batch(calls: Calls) -> None:
    # Given options that hold tasks back until a time given as a datetime
    at = time.time() + 120
    options = TaskOptions(not_before=datetime.fromtimestamp(at, UTC), priority=-7)
    # When a batch is enqueued with them
    ids = calls.enqueue_many("nobody", [b"a", b"b"], options=options)
    # Then every task of the batch waits until then, with the priority
    for task_id in ids:
        status = calls.status(task_id)
        assert status.state is TaskState.DELAYED and status.priority == -7
        assert status.not_before == pytest.approx(at, abs=0.01)


def test_request_passes_the_options_to_the_worker(
    calls: Calls, broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a worker that answers with what it was given
    start_worker(stack, broker, "echo-options", echo_options)
    options = TaskOptions(timeout_s=3, headers={"voice": "de"}, priority=2, key="req-1")
    # When a request carries its options as one value
    seen = json.loads(calls.request("echo-options", b"x", 10, options=options))
    # Then the worker got its headers and run-time limit, and the broker kept the rest
    assert (seen["headers"], seen["timeout_s"]) == ({"voice": "de"}, 3.0)
    status = calls.status(seen["id"])
    assert (status.state, status.priority, status.key) == (TaskState.DONE, 2, "req-1")
    # And request_frames takes one too; a value changed with replace() is a new value
    frames = calls.request_frames(
        "echo-options", b"y", 10, options=dataclasses.replace(options, key="req-2")
    )
    assert json.loads(frames[0])["headers"] == {"voice": "de"}
    assert options.key == "req-1"


def test_options_and_keywords_together_are_refused_before_anything_is_stored(
    calls: Calls,
) -> None:
    # When a call gives options both ways
    options = TaskOptions(priority=3)
    with pytest.raises(TypeError, match=r"not both.*priority"):
        calls.enqueue("refused", b"x", priority=1, options=options)
    with pytest.raises(TypeError, match="task_timeout_s"):
        calls.request("refused", b"x", 10, task_timeout_s=1, options=options)
    with pytest.raises(TypeError, match="headers"):
        calls.enqueue_many("refused", [b"x"], headers={}, options=options)
    # And a batch refuses a single key in its options (it takes keys=)
    with pytest.raises(ValueError, match="keys="):
        calls.enqueue_many("refused", [b"x"], options=TaskOptions(key="one"))
    # Then nothing was stored for the service
    assert not [q for q in calls.queues() if q.get("service") == "refused"]
    # But a keyword left at its default is not "given": the value's options hold
    task_id = calls.enqueue("nobody", b"x", priority=0, options=options)
    assert calls.status(task_id).priority == 3


def test_status_with_preview_shows_the_start_of_the_payload(calls: Calls) -> None:
    # Given a queued task of two payload frames
    task_id = calls.enqueue("nobody", [b"\x00\x01binary start", b"second"])

    # When its status is asked with a preview of 4 bytes
    status = calls.status(task_id, preview=4)

    # Then the payload's counts and the first frame's first 4 bytes come with it
    assert status.payload == PayloadPreview(frames=2, total_bytes=20, preview=b"\x00\x01bi")
    # And without a preview, as before, no payload
    assert calls.status(task_id).payload is None
    # And a preview that is no byte count within the cap is the caller's error
    for wrong in (-1, MAX_PREVIEW_BYTES + 1):
        with pytest.raises(ValueError, match="preview"):
            calls.status(task_id, preview=wrong)
