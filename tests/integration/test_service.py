"""Service: task queues, topic handlers, result events, heartbeats and clean stops.

Every test runs against a real `zbroker start` process; the signal test also
runs the service in a subprocess of its own, as a real service would run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.conftest import ROOT, BrokerProcess, wait_until
from zbroker.client import (
    SERVICE_HEARTBEAT_PREFIX,
    Client,
    ClientClosed,
    Event,
    NonRetryableError,
    Publisher,
    Service,
    Subscriber,
    Task,
    TaskDead,
    TaskState,
    WorkerError,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def make_service(broker: BrokerProcess, name: str, **kw: Any) -> Service:
    kw.setdefault("heartbeat_s", None)
    kw.setdefault("grace_s", 5.0)
    return Service(
        name,
        endpoint=broker.endpoint,
        events_in=broker.events_in,
        events_out=broker.events_out,
        **kw,
    )


def started(stack: ExitStack, svc: Service) -> Service:
    """Start `svc` in the background, ready (workers registered, subscriptions in place)."""
    stack.enter_context(svc)
    assert svc.wait_ready(timeout_s=10), "service not ready within 10s"
    return svc


def join_bus(publish: Callable[[], object], subscriber: Subscriber) -> None:
    """Publish probes until the subscriber gets one: the subscription has reached the
    publisher (the pub/sub slow joiner), then drain the leftover probes."""

    def probed() -> bool:
        publish()
        return subscriber.recv(timeout_s=0.05) is not None

    wait_until(probed)
    while subscriber.recv(timeout_s=0.1) is not None:
        pass


def next_event(subscriber: Subscriber, type: str, timeout_s: float = 10.0) -> Event:
    """The next event of topic `type`, skipping others; fails at the deadline."""
    found: list[Event] = []

    def arrived() -> bool:
        event = subscriber.recv(timeout_s=0.05)
        if event is not None and event.type == type:
            found.append(event)
        return bool(found)

    wait_until(arrived, timeout_s=timeout_s)
    return found[0]


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[Client]:
    with Client(broker.endpoint, timeout_s=5) as c:
        yield c


# ------------------------------------------------------------ tasks


def test_a_task_result_is_returned_and_published_with_the_task_id(
    broker: BrokerProcess, client: Client, stack: ExitStack
) -> None:
    # Given a service serving "stt" that publishes its results on transcript.final
    svc = make_service(broker, "transcriber")

    @svc.task("stt", concurrency=2, publish="transcript.final")
    def transcribe(task: Task) -> dict[str, Any]:
        return {"text": task.payload.decode().upper(), "attempt": task.attempt}

    started(stack, svc)
    subscriber = stack.enter_context(Subscriber(broker.events_out, "transcript."))
    join_bus(lambda: svc.publish("transcript.probe"), subscriber)

    # When a client enqueues a task with a reply_to header
    task_id = client.enqueue("stt", b"hello", headers={"reply_to": "chat.reply"})

    # Then the task's result is the handler's value, packed with msgpack
    result = client.result(task_id, timeout_s=10)
    assert msgpack.unpackb(result) == {"text": "HELLO", "attempt": 1}
    # And the same value arrives as an event tied to the task
    event = next_event(subscriber, "transcript.final")
    assert event.payload == {"text": "HELLO", "attempt": 1}
    assert event.correlation_id == task_id
    assert event.source == "transcriber"
    assert event.reply_to == "chat.reply"
    assert svc.stats.tasks_done == 1
    assert svc.stats.results_published == 1
    assert svc.workers["stt"].concurrency == 2


def test_an_async_handler_returning_bytes_publishes_them_as_they_are(
    broker: BrokerProcess, client: Client, stack: ExitStack
) -> None:
    # Given an `async def` task handler that returns bytes
    svc = make_service(broker, "speaker")

    @svc.task("tts", publish="speech.done")
    async def speak(task: Task) -> bytes:
        task.progress(b"half")
        return b"audio:" + task.payload

    started(stack, svc)
    assert svc.workers["tts"].is_async
    subscriber = stack.enter_context(Subscriber(broker.events_out, "speech."))
    join_bus(lambda: svc.publish("speech.probe"), subscriber)

    # When a task is requested
    result = client.request("tts", b"hi", timeout_s=10)

    # Then the bytes are the result and the event's payload, unchanged
    assert result == b"audio:hi"
    event = next_event(subscriber, "speech.done")
    assert event.payload == b"audio:hi"
    assert event.reply_to is None


def test_a_failing_task_follows_the_worker_semantics_and_publishes_nothing(
    broker: BrokerProcess, client: Client, stack: ExitStack
) -> None:
    # Given handlers that fail for good, and one whose result msgpack cannot pack
    svc = make_service(broker, "parser")

    @svc.task("parse", publish="parsed")
    def parse(task: Task) -> str:
        raise NonRetryableError("not JSON")

    @svc.task("odd", publish="parsed")
    def odd(task: Task) -> object:
        return object()

    started(stack, svc)

    # When tasks are requested from both
    with pytest.raises(TaskDead) as dead:
        client.request("parse", b"garbage", timeout_s=10)
    with pytest.raises(TaskDead) as unpackable:
        client.request("odd", b"x", timeout_s=10)

    # Then both are dead letters at once, with the reason, and nothing was published
    assert dead.value.error == "NonRetryableError: not JSON"
    assert unpackable.value.error is not None and "msgpack" in unpackable.value.error
    assert client.status(dead.value.task_id).attempt == 1
    assert svc.stats.tasks_failed == 2
    assert svc.stats.tasks_done == 0
    assert svc.stats.results_published == 0


def test_max_message_bytes_reaches_the_services_workers(
    broker: BrokerProcess, client: Client, stack: ExitStack
) -> None:
    with pytest.raises(ValueError):
        make_service(broker, "x", max_message_bytes=100)
    # A worker held to 4096 bytes fails a 5000-byte result for good (the broker would take it)
    svc = make_service(broker, "capped", max_message_bytes=4096)

    @svc.task("capped")
    def big(task: Task) -> bytes:
        return bytes(5000)

    started(stack, svc)
    with pytest.raises(TaskDead) as dead:
        client.request("capped", b"x", timeout_s=10)
    assert dead.value.error is not None and "over the broker's message cap" in dead.value.error


# ------------------------------------------------------------ events


def test_an_event_handler_gets_events_of_its_prefix_and_can_publish(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a service whose fs. handler answers each event with fs.seen
    svc = make_service(broker, "indexer")
    seen: list[Event] = []

    @svc.on("fs.")
    def changed(event: Event) -> None:
        seen.append(event)
        svc.publish("fs.seen", event.payload, correlation_id=event.correlation_id)

    started(stack, svc)
    assert svc.topics == ("fs.",)
    publisher = stack.enter_context(Publisher(broker.events_in, source="watcher"))
    subscriber = stack.enter_context(Subscriber(broker.events_out, "fs.seen"))

    # When a watcher publishes fs.change (again until the bus has joined up)
    def answered() -> bool:
        publisher.publish("fs.change", {"path": "/tmp/a"}, correlation_id="flow-1")
        event = subscriber.recv(timeout_s=0.05)
        return event is not None

    wait_until(answered)

    # Then the handler got the event, and its own event reached the bus
    assert seen[0].type == "fs.change"
    assert seen[0].source == "watcher"
    assert seen[0].payload == {"path": "/tmp/a"}
    assert seen[0].correlation_id == "flow-1"
    wait_until(lambda: svc.stats.events_handled >= 1)  # counted once the handler returned
    assert svc.stats.events_failed == 0


def test_an_event_handler_exception_is_counted_and_the_service_carries_on(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given an event handler that raises on "boom", and an async one for all events
    svc = make_service(broker, "fragile")
    handled: list[str] = []
    also: list[str] = []

    @svc.on("cmd.")
    def command(event: Event) -> None:
        if event.payload == "boom":
            raise RuntimeError("handler exploded")
        handled.append(event.payload)

    @svc.on("cmd.")
    async def audit(event: Event) -> None:
        also.append(event.payload)

    started(stack, svc)
    publisher = stack.enter_context(Publisher(broker.events_in, source="test"))

    # When "boom" is published (until it has been handled at least once)
    def exploded() -> bool:
        publisher.publish("cmd.run", "boom")
        return svc.stats.events_failed > 0

    wait_until(exploded)

    # Then the failure is counted, the other handler still ran, and the service still
    # handles the next event
    def carried_on() -> bool:
        publisher.publish("cmd.run", "fine")
        return "fine" in handled

    wait_until(carried_on)
    wait_until(lambda: "fine" in also)  # the second handler runs after the first
    assert "boom" in also
    wait_until(lambda: svc.stats.events_handled >= 3)  # "boom" by audit, "fine" by both
    assert not svc.stopping


# ------------------------------------------------------------ heartbeats


def test_the_service_publishes_its_heartbeat(
    broker: BrokerProcess, client: Client, stack: ExitStack
) -> None:
    # Given a service with a heartbeat every 0.1 s that has done one task
    svc = make_service(broker, "beating", heartbeat_s=0.1)

    @svc.task("beat")
    def beat(task: Task) -> bytes:
        return b"ok"

    @svc.on("nothing.")
    def nothing(event: Event) -> None:
        pass

    subscriber = stack.enter_context(Subscriber(broker.events_out, SERVICE_HEARTBEAT_PREFIX))
    started(stack, svc)
    assert client.request("beat", b"", timeout_s=10) == b"ok"

    # When heartbeats arrive, then one reports the done task and the service's shape
    beats: list[Event] = []

    def beat_after_the_task() -> bool:
        event = subscriber.recv(timeout_s=0.05)
        if event is not None and event.payload["tasks_done"] == 1:
            beats.append(event)
        return bool(beats)

    wait_until(beat_after_the_task)
    event = beats[0]
    assert event.type == "service.heartbeat.beating"
    assert event.source == "beating"
    payload = event.payload
    assert payload["name"] == "beating"
    assert payload["pid"] == os.getpid()
    assert payload["queues"] == ["beat"]
    assert payload["topics"] == ["nothing."]
    assert payload["tasks_failed"] == 0
    assert payload["uptime_s"] > 0
    assert svc.stats.heartbeats >= 1


# ------------------------------------------------------------ stopping


def test_stop_from_another_thread_ends_run_and_closes_everything(
    broker: BrokerProcess, client: Client
) -> None:
    # Given a service running in a thread of its own
    svc = make_service(broker, "threaded")

    @svc.task("threaded")
    def echo(task: Task) -> bytes:
        return task.payload

    @svc.on("threaded.")
    def ignore(event: Event) -> None:
        pass

    runner = threading.Thread(target=svc.run)
    runner.start()
    try:
        assert svc.wait_ready(timeout_s=10)
        wait_until(lambda: client.mmi_service("threaded"))

        # When another thread calls stop()
        svc.stop()
        runner.join(15)

        # Then run() has returned, the shutdown was clean and the worker has left the broker
        assert not runner.is_alive()
        assert svc.stopped
        assert svc.clean_stop is True
        wait_until(lambda: not client.mmi_service("threaded"))
        with pytest.raises(ClientClosed):
            svc.publish("threaded.late")
        with pytest.raises(RuntimeError):
            svc.start()
    finally:
        svc.stop()
        runner.join(15)


SERVICE_SCRIPT = """\
import logging, pathlib, sys, time
from zbroker.client import Service, Task

logging.basicConfig(level=logging.INFO, stream=sys.stdout)
endpoint, events_in, events_out, workdir = sys.argv[1:]
svc = Service("slow", endpoint=endpoint, events_in=events_in, events_out=events_out,
              heartbeat_s=0.1)

@svc.task("slow", publish="slow.done")
def slow(task: Task) -> dict:
    (pathlib.Path(workdir) / f"started-{task.payload.decode()}").touch()
    while not (pathlib.Path(workdir) / "release").exists():
        time.sleep(0.01)
    return {"payload": task.payload.decode(), "attempt": task.attempt}

svc.run()
print("clean stop:", svc.clean_stop, flush=True)
"""


def test_sigterm_lets_the_task_in_flight_finish_and_exits_zero(
    broker: BrokerProcess, client: Client, stack: ExitStack, tmp_path: Path
) -> None:
    # Given a service process whose handler holds its task until released
    script = tmp_path / "slow_service.py"
    script.write_text(SERVICE_SCRIPT)
    out_path = tmp_path / "service.out"
    out = stack.enter_context(open(out_path, "wb"))  # noqa: SIM115 - closed by the stack
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            broker.endpoint,
            broker.events_in,
            broker.events_out,
            str(tmp_path),
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    stack.callback(lambda: proc.poll() is None and proc.kill())
    # And a subscriber for its result events, joined up through its heartbeats
    subscriber = stack.enter_context(
        Subscriber(broker.events_out, "slow.done", SERVICE_HEARTBEAT_PREFIX + "slow")
    )
    next_event(subscriber, SERVICE_HEARTBEAT_PREFIX + "slow", timeout_s=20)

    first = client.enqueue("slow", b"one")
    second = client.enqueue("slow", b"two")
    wait_until(lambda: (tmp_path / "started-one").exists(), timeout_s=20)

    # When the process gets SIGTERM while the first task runs
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: b"service 'slow' stopping" in out_path.read_bytes())
    (tmp_path / "release").touch()

    # Then the process exits 0, after a clean stop
    assert proc.wait(30) == 0, out_path.read_text()
    assert "clean stop: True" in out_path.read_text()
    # And the task in flight finished once, its result stored and published
    assert msgpack.unpackb(client.result(first, timeout_s=5)) == {
        "payload": "one",
        "attempt": 1,
    }
    status = client.status(first)
    assert status.state is TaskState.DONE
    assert status.attempt == 1
    event = next_event(subscriber, "slow.done")
    assert event.correlation_id == first
    # And the queued task was never started: it waits for the next worker
    assert not (tmp_path / "started-two").exists()
    assert not client.status(second).state.final


def test_a_queue_worker_that_fails_stops_the_service_with_its_error(
    broker: BrokerProcess, client: Client
) -> None:
    # Given a service whose task handler ends its worker (SystemExit is not a task failure)
    svc = make_service(broker, "doomed")

    @svc.task("doomed")
    def fatal(task: Task) -> bytes:
        raise SystemExit("the handler pulled the plug")

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            svc.run()
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    try:
        assert svc.wait_ready(timeout_s=10)
        # When a task reaches it
        client.enqueue("doomed", b"x")
        runner.join(20)
        # Then the service does not carry on without that queue: run() raises, and says why
        assert not runner.is_alive() and svc.stopped
        (error,) = outcome
        assert isinstance(error, WorkerError) and "queue 'doomed'" in str(error)
        assert isinstance(error.__cause__, SystemExit)
        assert svc.error is error
        (worker,) = svc.workers.values()
        assert worker.stopped and isinstance(worker.error, SystemExit)
        wait_until(lambda: not client.mmi_service("doomed"))
    finally:
        svc.stop()
        runner.join(15)
