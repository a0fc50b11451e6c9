"""The broker's own lifecycle events on the bus, against a real broker process."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import msgpack
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from zbroker import NonRetryableError, Task
from zbroker.client import Subscriber
from zbroker.protocol.events import Event, decode_events


def subscribe(stack: ExitStack, broker: BrokerProcess, *prefixes: str) -> Subscriber:
    """A subscriber whose prefixes the broker has heard of (so no event is missed)."""
    sub = stack.enter_context(Subscriber(broker.events_out, *prefixes))
    sub.recv(timeout_s=0)  # connects
    wait_until(
        lambda: all(f"'{p}'" in broker.log().split("subscribers want")[-1] for p in prefixes),
        timeout_s=10,
    )
    return sub


def collect(sub: Subscriber, until: str, timeout_s: float = 10.0) -> list[Event]:
    events: list[Event] = []
    while True:
        event = sub.recv(timeout_s=timeout_s)
        assert event is not None, f"no {until!r} event; got {[e.type for e in events]}"
        events.append(event)
        if event.type == until:
            return events


def test_a_tasks_whole_life_arrives_in_order(broker: BrokerProcess, stack: ExitStack) -> None:
    sub = subscribe(stack, broker, "task.", "worker.")
    worker = start_worker(stack, broker, "tts", lambda task: task.payload[::-1])
    ready = collect(sub, "worker.ready")[-1]
    assert ready.source == "zbroker" and ready.payload["service"] == "tts"
    assert ready.payload["dialect"] == "ZBW01"
    client = open_client(stack, broker)
    task_id = client.enqueue("tts", b"abc", headers={"correlation_id": "c-1"})
    assert client.result(task_id, timeout_s=10) == b"cba"
    life = collect(sub, "task.done.tts")
    assert [e.type for e in life] == ["task.enqueued.tts", "task.started.tts", "task.done.tts"]
    assert {e.payload["id"] for e in life} == {task_id}
    assert life[0].payload["headers"] == {"correlation_id": "c-1"}
    assert life[1].payload["attempt"] == 1 and life[2].payload["attempt"] == 1
    worker.stop()
    down = collect(sub, "worker.down")[-1]
    assert down.payload["service"] == "tts" and down.payload["reason"] == "disconnected"


def test_failures_then_the_dead_letter_are_published(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    broker = broker_factory("--retry-base", "0.05")
    sub = subscribe(stack, broker, "task.")

    def refuse(task: Task) -> bytes:
        if task.attempt < 2:
            raise RuntimeError("transient")
        raise NonRetryableError("bad input")

    start_worker(stack, broker, "ocr", refuse)
    client = open_client(stack, broker)
    task_id = client.enqueue("ocr", b"x", max_attempts=5)
    events = collect(sub, "task.dead.ocr")
    assert [e.type for e in events] == [
        "task.enqueued.ocr",
        "task.started.ocr",
        "task.failed.ocr",
        "task.started.ocr",
        "task.failed.ocr",
        "task.dead.ocr",
    ]
    assert all(e.payload["id"] == task_id for e in events)
    first, second = events[2].payload, events[4].payload
    assert first["retry"] is True and "transient" in first["reason"]
    assert second["retry"] is False and "bad input" in second["reason"]


def test_heartbeats_carry_worker_metrics_and_unwanted_topics_are_not_sent(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    sub = subscribe(stack, broker, "heartbeat.")
    start_worker(stack, broker, "llm", lambda task: b"", metrics=lambda: {"gpu_mem_mb": 812})
    ping = collect(sub, "heartbeat.ping")[-1]
    while not ping.payload["metrics"]:  # the first beat may precede the first metrics
        ping = collect(sub, "heartbeat.ping")[-1]
    assert ping.payload["service"] == "llm" and ping.payload["metrics"] == {"gpu_mem_mb": 812}
    client = open_client(stack, broker)
    client.request("llm", b"q", timeout_s=10)
    # Only heartbeats were asked for: no task or worker event ever arrives.
    for _ in range(5):
        event = sub.recv(timeout_s=0.3)
        assert event is None or event.type == "heartbeat.ping"


def test_events_of_one_pass_go_out_batched_and_are_handed_out_one_by_one(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # A raw SUB socket sees the wire; a Subscriber sees what applications see.
    raw = stack.enter_context(zmq.Context()).socket(zmq.SUB)
    stack.callback(raw.close, 0)
    raw.subscribe(b"task.enqueued.batch")
    raw.connect(broker.events_out)
    sub = subscribe(stack, broker, "task.")
    wait_until(lambda: "'task.enqueued.batch'" in broker.log().split("subscribers want")[-1])
    client = open_client(stack, broker)
    # Given 50 tasks stored by one ENQUEUE (one pass of the broker's loop)
    ids = client.enqueue_many("batched", [b"%d" % i for i in range(50)])
    # Then the raw socket receives one message holding all 50, in the order of the ids
    assert raw.poll(10_000)
    frames = raw.recv_multipart()
    assert frames[0] == b"task.enqueued.batched"
    envelope = msgpack.unpackb(frames[1])
    assert "payload" not in envelope and envelope["source"] == "zbroker"
    # as rows of the documented fields (docs/protocol.md §6.1)
    assert envelope["fields"] == ["id", "priority", "not_before", "headers"]
    assert envelope["rows"] == [[task_id, 0, None, {}] for task_id in ids]
    assert decode_events(frames) == [
        Event(
            "task.enqueued.batched",
            "zbroker",
            {"id": task_id, "priority": 0, "not_before": None, "headers": {}},
            envelope["timestamp"],
        )
        for task_id in ids
    ]
    # And the Subscriber hands out 50 separate events in that order, counted one by one
    got = [sub.recv(timeout_s=10) for _ in ids]
    assert [e.payload["id"] for e in got if e is not None] == ids
    assert sub.received == 50 and sub.dropped == 0
    # And a worker's run through the same tasks keeps every task's own order:
    # enqueued before started before done, whatever was batched with what.
    start_worker(stack, broker, "batched", lambda task: task.payload, concurrency=8)
    for task_id in ids:
        client.result(task_id, timeout_s=10)
    seen: dict[str, list[str]] = {task_id: ["enqueued"] for task_id in ids}
    while sum(kinds[-1] == "done" for kinds in seen.values()) < len(ids):
        event = sub.recv(timeout_s=10)
        assert event is not None, f"events stopped: {seen}"
        seen[event.payload["id"]].append(event.type.split(".")[1])
    assert set(map(tuple, seen.values())) == {("enqueued", "started", "done")}


def test_a_prefix_that_ends_inside_a_character_still_gets_its_events(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a raw subscriber whose prefix stops halfway through the "é" of "café"
    sub = zmq.Context.instance().socket(zmq.SUB)
    stack.callback(sub.close, 0)
    sub.connect(broker.events_out)
    sub.subscribe("task.enqueued.café".encode()[:-1])
    wait_until(lambda: "'task.enqueued.caf'" in broker.log(), timeout_s=10)
    # When a task of "café" is stored
    task_id = open_client(stack, broker).enqueue("café", b"x")
    # Then the subscriber hears of it (libzmq's byte match lets it through, and the
    # broker built it)
    assert sub.poll(10_000), "no event"
    (event,) = decode_events(sub.recv_multipart())
    assert event.type == "task.enqueued.café" and event.payload["id"] == task_id
