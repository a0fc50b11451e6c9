"""The Python client library against a real `zbroker start` process.

Every Client, Worker, Publisher and Subscriber is entered into an ExitStack, so
a failing test still closes its sockets and stops its threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import msgpack
import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import HEARTBEAT_S, open_client, start_worker
from zbroker.client import (
    DEFAULT_ENDPOINT,
    Client,
    ClientClosed,
    EndpointError,
    Event,
    Publisher,
    ReplyError,
    RequestTimeout,
    Subscriber,
    Task,
    Worker,
)
from zbroker.protocol.events import encode_event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

Ctx = zmq.Context[zmq.Socket[bytes]]


def echo_upper(task: Task) -> bytes:
    return task.payload.upper()


def background(stack: ExitStack) -> ThreadPoolExecutor:
    """One extra thread for a blocking call, joined at teardown."""
    return stack.enter_context(ThreadPoolExecutor(max_workers=1))


# ------------------------------------------------------------ request / reply


def test_request_is_answered_by_a_worker(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a worker for "echo"
    worker = start_worker(stack, broker, "echo", echo_upper)
    client = open_client(stack, broker)
    # When a client sends a request
    reply = client.mdp_request("echo", b"hello")
    # Then the worker's answer comes back
    assert reply == b"HELLO"
    assert worker.stats.handled == 1
    assert client.stats.replies == 1
    assert client.stats.resends == 0


def test_multi_frame_bodies_travel_both_ways(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a worker that sees every body frame and answers with several frames
    seen: list[tuple[bytes, ...]] = []

    def reverse(task: Task) -> list[bytes]:
        seen.append(task.frames)
        return list(reversed(task.frames))

    start_worker(stack, broker, "reverse", reverse)
    client = open_client(stack, broker)
    # When a client sends a three-frame body, one frame of it empty
    reply = client.mdp_request_frames(b"reverse", [b"one", b"", b"three"])
    # Then the worker got all three frames and all of its frames came back
    assert seen == [(b"one", b"", b"three")]
    assert reply == [b"three", b"", b"one"]
    # And mdp_request(), which promises a single frame, refuses a multi-frame reply
    with pytest.raises(ReplyError):
        client.mdp_request("reverse", [b"a", b"b"])


def test_request_sent_before_any_worker_is_answered_once_one_starts(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a client whose request is on the wire while no worker serves "late"
    client = open_client(stack, broker, timeout_s=10, retries=0)
    pool = background(stack)
    assert pool.submit(client.mmi_service, "late").result(timeout=5) is False
    reply = pool.submit(client.mdp_request, "late", b"early bird")
    wait_until(lambda: client.stats.sent == 2)
    # When a worker for "late" starts
    worker = start_worker(stack, broker, "late", echo_upper)
    # Then the queued request is delivered to it and answered, without a resend
    assert reply.result(timeout=10) == b"EARLY BIRD"
    assert client.stats.resends == 0
    assert worker.stats.handled == 1


def test_request_times_out_when_no_worker_serves_it(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a client with a short timeout and two retries, and no worker for "nobody"
    client = open_client(stack, broker, timeout_s=0.2, retries=2)
    started = time.monotonic()
    # When it sends a request
    with pytest.raises(RequestTimeout) as caught:
        client.mdp_request("nobody", b"hello?")
    # Then it gave up after three attempts, each waiting its full timeout
    assert caught.value.attempts == 3
    assert "nobody" in str(caught.value)
    assert time.monotonic() - started >= 3 * 0.2
    assert client.stats.resends == 2
    assert client.stats.timeouts == 1
    # And the client is still usable afterwards
    assert client.mmi_service("nobody") is False


def test_late_reply_to_an_abandoned_request_never_answers_the_next(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a worker that holds its first request until released
    release = threading.Event()
    stack.callback(release.set)

    def held_once(task: Task) -> bytes:
        if task.payload == b"first":
            release.wait(10)
        return task.payload

    worker = start_worker(stack, broker, "held", held_once)
    client = open_client(stack, broker, timeout_s=0.3, retries=0)
    with pytest.raises(RequestTimeout):
        client.mdp_request("held", b"first")
    # When the first reply is produced after the client gave up, and it asks again
    release.set()
    reply = client.mdp_request("held", b"second", timeout_s=5)
    # Then it gets the answer to its second request, not the late first one
    assert reply == b"second"
    assert worker.stats.handled == 2


def test_mmi_service_follows_worker_registration(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given no worker for "tts"
    client = open_client(stack, broker)
    assert client.mmi_service("tts") is False
    # When a worker registers
    worker = start_worker(stack, broker, "tts", echo_upper)
    # Then mmi.service reports it
    assert client.mmi_service("tts") is True
    # And when the worker stops, it no longer does
    assert worker.stop(timeout_s=5)
    wait_until(lambda: not client.mmi_service("tts"), timeout_s=5)


# ------------------------------------------------------------ worker behaviour


def test_busy_worker_keeps_heartbeating_through_a_long_handler(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a worker whose handler holds its request until released
    started = threading.Event()
    release = threading.Event()

    def slow(task: Task) -> bytes:
        started.set()
        release.wait(10)
        return b"done"

    worker = start_worker(stack, broker, "slow", slow)
    client = open_client(stack, broker, timeout_s=10, retries=0)
    probe = open_client(stack, broker, timeout_s=1, retries=0)
    pool = background(stack)
    stack.callback(release.set)
    # When the handler runs for more than five heartbeat intervals
    reply = pool.submit(client.mdp_request, "slow", b"work")
    assert started.wait(5)
    since = time.monotonic()
    wait_until(
        lambda: time.monotonic() - since > 5 * HEARTBEAT_S and probe.mmi_service("slow"),
        timeout_s=5,
    )
    release.set()
    # Then the broker never lost the worker (or it would have reconnected)
    # and the reply reaches the client
    assert reply.result(timeout=5) == b"done"
    assert worker.stats.reconnects == 0
    assert worker.stats.stale_results_dropped == 0
    assert worker.stats.cancelled == 0
    assert worker.connected


def test_worker_reregisters_after_broker_restart(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a registered worker
    worker = start_worker(stack, broker, "echo", echo_upper)
    # When the broker is killed, noticed as gone, and started again on the same endpoints
    broker.kill()
    wait_until(lambda: not worker.connected, timeout_s=5)
    broker.stop()  # reaps the killed process and closes its log before start() reopens it
    broker.start()
    # Then a new request is served within the client's deadline (20 x 0.5 s)
    client = open_client(stack, broker, timeout_s=0.5, retries=20)
    assert client.mdp_request("echo", b"again") == b"AGAIN"
    assert worker.stats.reconnects >= 1
    assert worker.connected


def test_reply_computed_across_a_reconnect_is_dropped(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a worker busy with a request when the broker is restarted under it
    started = threading.Event()
    release = threading.Event()
    calls: list[bytes] = []
    cancelled_seen: list[bool] = []

    def handler(task: Task) -> bytes:
        calls.append(task.payload)
        if len(calls) == 1:
            started.set()
            release.wait(10)
            cancelled_seen.append(task.cancelled)
            return b"stale"
        return b"fresh"

    worker = start_worker(stack, broker, "svc", handler)
    client = open_client(stack, broker, timeout_s=1.0, retries=20)
    pool = background(stack)
    stack.callback(release.set)
    reply = pool.submit(client.mdp_request, "svc", b"job")
    assert started.wait(5)
    broker.kill()
    wait_until(lambda: not worker.connected, timeout_s=5)
    broker.stop()
    broker.start()
    wait_until(lambda: worker.connected, timeout_s=10)
    # When the handler finishes after the worker re-registered
    release.set()
    # Then its reply is not sent on the new connection; the client's resend is served
    assert reply.result(timeout=20) == b"fresh"
    assert worker.stats.stale_results_dropped == 1
    # And the handler could see that its attempt had been taken away
    assert cancelled_seen == [True]


def test_two_workers_of_one_service_take_turns(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given two workers for "pool"
    start_worker(stack, broker, "pool", lambda task: b"a")
    start_worker(stack, broker, "pool", lambda task: b"b")
    client = open_client(stack, broker)
    # When ten requests are sent one after another
    replies = [client.mdp_request("pool", b"%d" % i) for i in range(10)]
    # Then the broker rotated between them
    assert replies.count(b"a") == 5
    assert replies.count(b"b") == 5


def test_failed_handler_hands_the_request_to_a_healthy_worker(
    broker: BrokerProcess, stack: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker whose handler raises, registered before a healthy one,
    # so the broker picks it first
    def broken(task: Task) -> bytes:
        raise RuntimeError("model not loaded")

    bad = start_worker(stack, broker, "flaky", broken)
    good = start_worker(stack, broker, "flaky", echo_upper)
    client = open_client(stack, broker, timeout_s=5, retries=0)
    # When a request is sent
    with caplog.at_level(logging.ERROR, logger="zbroker.client.worker"):
        reply = client.mdp_request("flaky", b"please")
    # Then the failure is logged and reported to the broker, and the healthy
    # worker answers the retry
    assert reply == b"PLEASE"
    assert bad.stats.failed == 1
    assert good.stats.handled == 1
    assert "model not loaded" in caplog.text
    wait_until(lambda: "(RuntimeError: model not loaded): retrying" in broker.log(), timeout_s=5)
    # And the failing worker stayed registered: a failure costs no reconnect
    assert bad.connected
    assert bad.stats.reconnects == 0


def test_stop_lets_the_running_handler_reply_first(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a worker in the middle of a request
    started = threading.Event()
    release = threading.Event()

    def slow(task: Task) -> bytes:
        started.set()
        release.wait(10)
        return b"finished"

    worker = start_worker(stack, broker, "slow", slow)
    client = open_client(stack, broker, timeout_s=10, retries=0)
    pool = background(stack)
    stopper = background(stack)
    stack.callback(release.set)
    reply = pool.submit(client.mdp_request, "slow", b"job")
    assert started.wait(5)
    # When stop() is called while the handler still runs
    stopped = stopper.submit(worker.stop, 10)
    release.set()
    # Then the reply is delivered, stop() returns True, and the service is gone
    assert reply.result(timeout=5) == b"finished"
    assert stopped.result(timeout=5) is True
    assert not worker.connected
    wait_until(lambda: not client.mmi_service("slow"), timeout_s=5)


# ------------------------------------------------------------ events


def test_subscriber_gets_only_events_matching_its_prefixes(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a subscriber to "fs." and "task.done." and a publisher
    publisher = stack.enter_context(Publisher(broker.events_in, source="watcher"))
    subscriber = stack.enter_context(Subscriber(broker.events_out, "fs.", "task.done."))
    received: list[Event] = []

    def first_event_arrives() -> bool:
        # PUB/SUB slow joiner: events sent before subscriptions propagate are lost.
        publisher.publish("fs.change", {"path": "/tmp/a"}, correlation_id="c-1", reply_to="r")
        event = subscriber.recv(timeout_s=0.05)
        if event is not None:
            received.append(event)
        return event is not None

    wait_until(first_event_arrives)
    first = received[0]
    assert (first.type, first.source, first.payload) == ("fs.change", "watcher", {"path": "/tmp/a"})
    assert (first.correlation_id, first.reply_to) == ("c-1", "r")
    assert abs(first.timestamp - time.time()) < 5
    # When events of matching and non-matching types are published
    publisher.publish("transcript.final", "hello")
    publisher.publish("task.done.tts", {"ok": True}, source="tts")
    publisher.publish("fs.end")
    # Then only the matching ones arrive, in order
    types: list[str] = []
    while not types or types[-1] != "fs.end":
        event = subscriber.recv(timeout_s=5)
        assert event is not None, f"fs.end never arrived; got {types}"
        if event.type != "fs.change":  # leftovers of the joining loop
            types.append(event.type)
    assert types == ["task.done.tts", "fs.end"]
    assert subscriber.dropped == 0


def test_subscriber_drops_and_counts_malformed_events(
    broker: BrokerProcess, stack: ExitStack, zmq_ctx: Ctx
) -> None:
    # Given a raw PUB socket on the bus and a subscriber to "bad."
    raw = zmq_ctx.socket(zmq.PUB)
    raw.linger = 0
    raw.connect(broker.events_in)
    subscriber = stack.enter_context(Subscriber(broker.events_out, "bad."))
    garbage: list[list[bytes]] = [
        [b"bad.one-frame"],
        [b"bad.not-msgpack", b"\xc1"],
        [b"bad.not-a-map", msgpack.packb([1, 2])],
        [b"bad.no-type", msgpack.packb({"source": "raw"})],
        [b"bad.three-frames", b"x", b"y"],
    ]
    valid = encode_event(Event(type="bad.but-valid", source="raw", payload=1, timestamp=0.0))
    got: list[Event] = []

    # When it publishes garbage followed by one valid event, until one round gets through
    def valid_event_arrives() -> bool:
        for frames in garbage:
            raw.send_multipart(frames)
        raw.send_multipart(valid)
        event = subscriber.recv(timeout_s=0.05)
        if event is not None:
            got.append(event)
        return event is not None

    wait_until(valid_event_arrives)
    # Then the subscriber returned only the valid event and counted what it dropped
    assert got[0].type == "bad.but-valid"
    assert subscriber.dropped >= len(garbage)


# ------------------------------------------------------------ misuse


def test_misuse_raises_the_libraries_own_errors(broker: BrokerProcess) -> None:
    # Given an endpoint without a transport, and a closed client
    # Then constructors refuse the endpoint at once, Client and Worker alike
    with pytest.raises(EndpointError):
        Client("127.0.0.1:5555")
    with pytest.raises(EndpointError):
        Worker("127.0.0.1:5555", "svc", echo_upper)
    client = Client(broker.endpoint)
    client.close()
    # And each use fails with an error of this library, not a zmq error
    with pytest.raises(ClientClosed):
        client.mdp_request("svc", b"x")
    with Client(broker.endpoint) as other, pytest.raises(TypeError):
        other.mdp_request("svc", "text")  # type: ignore[arg-type]


def test_worker_defaults_to_the_clients_endpoint_and_checks_its_arguments() -> None:
    # Given a worker built from keywords only
    worker = Worker(service="svc", handler=echo_upper)
    # Then it uses the same default endpoint as Client, and serves one task at a time
    with Client() as client:
        assert worker.endpoint == DEFAULT_ENDPOINT == client.endpoint
    assert worker.concurrency == 1
    assert worker.service == "svc"
    # And missing or bad arguments are refused in the constructor
    with pytest.raises(TypeError):
        Worker(DEFAULT_ENDPOINT, "svc")
    with pytest.raises(ValueError):
        Worker(DEFAULT_ENDPOINT, "mmi.service", echo_upper)
    with pytest.raises(ValueError):
        Worker(DEFAULT_ENDPOINT, "svc", echo_upper, concurrency=0)


def test_worker_stopped_before_it_starts_refuses_to_start() -> None:
    # Given a worker that was stopped before it ever ran
    worker = Worker(service="svc", handler=echo_upper)
    assert worker.stop() is True
    # When it is started anyway
    # Then it says so instead of sitting there silently dead
    with pytest.raises(RuntimeError, match="stopped before it started"):
        worker.start()
    with pytest.raises(RuntimeError, match="stopped before it started"):
        worker.run()
    assert not worker.connected


def test_worker_is_connected_on_the_brokers_greeting(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    # Given a broker that heartbeats only every 20 s
    slow_broker = broker_factory(heartbeat_interval=20.0)
    worker = Worker(slow_broker.endpoint, "greet", echo_upper, heartbeat_interval_s=20.0)
    # When the worker starts
    stack.enter_context(worker)
    # Then it is connected long before the first heartbeat interval ends,
    # because the broker greets a new worker at once
    wait_until(lambda: worker.connected, timeout_s=8)


def test_worker_with_default_heartbeat_keeps_pace_with_a_faster_broker(
    stack: ExitStack, broker: BrokerProcess
) -> None:
    # Given a worker left at the default 2.5 s interval and a broker heartbeating
    # every 0.2 s (so it expires silent workers after 0.6 s)
    worker = Worker(broker.endpoint, "pace", echo_upper)
    assert worker.heartbeat_interval_s == 2.5
    stack.enter_context(worker)
    wait_until(lambda: worker.connected, timeout_s=5)
    client = open_client(stack, broker)
    # When 1.5 s pass, far beyond the broker's 0.6 s expiry
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        # Then the broker never loses the worker, because it answers every heartbeat
        assert client.mmi_service("pace")
        time.sleep(0.1)
    assert client.mdp_request("pace", b"still here") == b"STILL HERE"
    assert worker.stats.reconnects == 0
