"""The broker's own lifecycle events on the bus, against a real broker process."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from zbroker import NonRetryableError, Task
from zbroker.client import Subscriber
from zbroker.protocol.events import Event


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
