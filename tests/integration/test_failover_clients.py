"""Clients, workers, publishers and subscribers given several brokers' endpoints follow
the one that is active (docs/python-client.md, "Several brokers").

Without PostgreSQL, a failover is two real broker processes on one LMDB data
directory, run one after the other on their own ports: broker A serves, is killed
with SIGKILL under load, then broker B starts on the same journal. Everything is
given [A, B] from the start, as it would be given an active and a standby broker
(a standby binds nothing until it takes over).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import ROOT, BrokerProcess, free_ports, wait_until
from tests.integration.running import HEARTBEAT_S
from zbroker.client import (
    AsyncClient,
    CallTimeout,
    Client,
    EndpointError,
    Event,
    Publisher,
    RequestTimeout,
    Subscriber,
    Task,
    Worker,
)
from zbroker.client.endpoints import parse_endpoints

# A hung test ends by these; nothing asserts how long anything took.
DEADLINE_S = 60.0


class Pair:
    """Broker A (started) and broker B (not yet) on one data directory, own ports."""

    def __init__(self, make: Callable[..., BrokerProcess], data_dir: Path) -> None:
        self.a = make("--durability", "sync", data_dir=data_dir)
        self.b = make("--durability", "sync", data_dir=data_dir, start=False)

    @property
    def endpoints(self) -> list[str]:
        return [self.a.endpoint, self.b.endpoint]

    @property
    def events_in(self) -> list[str]:
        return [self.a.events_in, self.b.events_in]

    @property
    def events_out(self) -> list[str]:
        return [self.a.events_out, self.b.events_out]

    def fail_over(self) -> None:
        """A dies (SIGKILL: nothing is cleaned up); B takes over its journal."""
        self.a.kill()
        self.b.start()


@pytest.fixture
def pair(broker_factory: Callable[..., BrokerProcess], tmp_path: Path) -> Pair:
    return Pair(broker_factory, tmp_path / "shared")


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


class Runs:
    """What a worker's handler ran: payload -> the task ids it ran it under."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_payload: dict[bytes, list[str]] = defaultdict(list)

    def handler(self, task: Task) -> bytes:
        with self.lock:
            self.by_payload[task.payload].append(task.id)
        return b"done:" + task.payload

    def count(self) -> int:
        with self.lock:
            return len(self.by_payload)


def wait_for_event(
    sub: Subscriber, matches: Callable[[Event], bool], publish: Callable[[], None] | None = None
) -> Event:
    """The first event `matches` accepts; `publish` is called before each wait (a PUB
    drops what it sends before the bus's subscriptions reached it)."""
    found: list[Event] = []

    def seen() -> bool:
        if publish is not None:
            publish()
        event = sub.recv(timeout_s=0.05)
        while event is not None:
            if matches(event):
                found.append(event)
                return True
            event = sub.recv(timeout_s=0)
        return False

    wait_until(seen, timeout_s=DEADLINE_S, step_s=0)
    return found[0]


def test_everything_follows_the_active_broker_across_a_sigkill(
    pair: Pair, stack: ExitStack
) -> None:
    # Given a worker, a blocking client, an asyncio client, a subscriber and a
    # publisher, each given both brokers' endpoints, while A is active
    runs = Runs()
    worker = stack.enter_context(
        Worker(
            pair.endpoints, "jobs", runs.handler, concurrency=4, heartbeat_interval_s=HEARTBEAT_S
        )
    )
    wait_until(lambda: worker.connected, timeout_s=DEADLINE_S)
    sub = stack.enter_context(Subscriber(pair.events_out, "test.", "task."))
    pub = stack.enter_context(Publisher(pair.events_in, source="failover-test"))
    wait_for_event(sub, lambda e: e.type == "test.before", lambda: pub.publish("test.before"))

    total_sync, total_async = 150, 150
    confirmed: dict[bytes, str] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()

    def confirm(payload: bytes, task_id: str) -> None:
        with lock:
            confirmed[payload] = task_id

    def produce_blocking() -> None:
        # No key given: each enqueue carries a generated one, the same on every resend.
        try:
            with Client(pair.endpoints, timeout_s=1.0, retries=60) as client:
                for i in range(total_sync):
                    payload = f"s{i}".encode()
                    confirm(payload, client.enqueue("jobs", payload))
        except BaseException as exc:
            failures.append(exc)

    async def produce_async() -> None:
        async with AsyncClient(pair.endpoints, timeout_s=1.0, retries=60) as client:

            async def one(i: int) -> None:
                payload = f"a{i}".encode()
                confirm(payload, await client.enqueue("jobs", payload))

            for start in range(0, total_async, 10):
                await asyncio.gather(*(one(i) for i in range(start, start + 10)))

    def run_async() -> None:
        try:
            asyncio.run(produce_async())
        except BaseException as exc:
            failures.append(exc)

    producers = [threading.Thread(target=produce_blocking), threading.Thread(target=run_async)]
    for thread in producers:
        thread.start()

    # When A is killed under load, then B starts on the same journal
    wait_until(lambda: len(confirmed) >= (total_sync + total_async) // 3, timeout_s=DEADLINE_S)
    reconnects_before = worker.stats.reconnects
    pair.fail_over()
    for thread in producers:
        thread.join(DEADLINE_S * 2)

    # Then both clients carried on: every enqueue was confirmed
    assert not any(t.is_alive() for t in producers) and not failures, failures
    assert len(confirmed) == total_sync + total_async
    # and the worker registered again, with B, and ran every task
    wait_until(lambda: runs.count() == len(confirmed), timeout_s=DEADLINE_S)
    assert worker.stats.reconnects > reconnects_before
    with Client(pair.endpoints, timeout_s=2.0, retries=5) as client:
        assert [w["service"] for w in client.workers()] == ["jobs"]
        # Every confirmed task is done once, with its result, under the id its enqueue
        # returned: no resent enqueue stored a second task.
        for payload, task_id in confirmed.items():
            assert client.result(task_id, timeout_s=DEADLINE_S) == b"done:" + payload
            assert set(runs.by_payload[payload]) == {task_id}, payload
        (jobs,) = [q for q in client.queues() if q["service"] == "jobs"]
        assert jobs["done"] == len(confirmed)
        assert jobs["ready"] == jobs["inflight"] == jobs["dead"] == 0
    # A task may run twice only when it was running as A died (at-least-once).
    assert sum(len(ids) > 1 for ids in runs.by_payload.values()) <= worker.concurrency

    # The subscriber hears B's own lifecycle events and the publisher's events via B.
    with Client(pair.endpoints, timeout_s=2.0, retries=5) as client:
        wait_for_event(
            sub,
            lambda e: e.type == "task.cancelled.idle",
            lambda: client.cancel(client.enqueue("idle", b"x")),
        )
    event = wait_for_event(sub, lambda e: e.type == "test.after", lambda: pub.publish("test.after"))
    assert event.source == "failover-test"


def test_a_standby_that_never_binds_costs_nothing(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    # Given a standby's endpoints (nothing listens there) first, the active broker second
    active = broker_factory()
    standby = [f"tcp://127.0.0.1:{port}" for port in free_ports(3)]
    endpoints = f"{standby[0]},{active.endpoint}"
    runs = Runs()
    worker = stack.enter_context(
        Worker(endpoints, "echo", runs.handler, heartbeat_interval_s=HEARTBEAT_S)
    )
    wait_until(lambda: worker.connected, timeout_s=DEADLINE_S)
    sub = stack.enter_context(Subscriber([standby[2], active.events_out], "test."))
    pub = stack.enter_context(Publisher([standby[1], active.events_in]))
    client = stack.enter_context(Client(endpoints, timeout_s=5.0, retries=0))

    # When clients call and publish
    task_id = client.enqueue("echo", b"x")
    assert client.result(task_id, timeout_s=DEADLINE_S) == b"done:x"
    assert client.request("echo", b"y", timeout_s=DEADLINE_S) == b"done:y"
    assert client.mmi_service("echo")

    async def call_async() -> bytes:
        async with AsyncClient(endpoints, timeout_s=5.0, retries=0) as aclient:
            return await aclient.request("echo", b"z", timeout_s=DEADLINE_S)

    assert asyncio.run(call_async()) == b"done:z"
    wait_for_event(sub, lambda e: e.type == "test.hello", lambda: pub.publish("test.hello"))

    # Then no attempt went unanswered and the worker never had to reconnect
    assert client.stats.resends == client.stats.timeouts == 0
    assert worker.stats.reconnects == 0


def test_no_broker_answering_is_a_clear_error() -> None:
    # Given two endpoints where nothing listens
    endpoints = [f"tcp://127.0.0.1:{port}" for port in free_ports(2)]

    # When a blocking and an asyncio client call
    with Client(endpoints, timeout_s=0.2, retries=1) as client:
        with pytest.raises(CallTimeout) as blocking:
            client.enqueue("jobs", b"x")
        with pytest.raises(RequestTimeout) as mdp:
            client.mdp_request("echo", b"x")

    async def call_async() -> None:
        async with AsyncClient(endpoints, timeout_s=0.2, retries=1) as aclient:
            await aclient.status("0" * 16)

    with pytest.raises(CallTimeout) as asyncio_call:
        asyncio.run(call_async())

    # Then each says that no broker of the two endpoints answered, naming them
    for raised in (blocking, mdp, asyncio_call):
        message = str(raised.value)
        assert "no broker of the 2 endpoints" in message, message
        assert all(e in message for e in endpoints), message
        assert raised.value.endpoints == tuple(endpoints)
    # and the enqueue's key, so that it can be sent again without a duplicate
    assert blocking.value.key is not None and blocking.value.key in str(blocking.value)


@pytest.mark.parametrize(
    "bad",
    ["", ",", "tcp://a:1,,tcp://b:2", "tcp://a:1,localhost:2", ["tcp://a:1", "tcp://a:1"], []],
)
def test_a_bad_endpoint_list_is_a_value_error(bad: str | list[str]) -> None:
    with pytest.raises(EndpointError) as raised:
        parse_endpoints(bad)
    assert isinstance(raised.value, ValueError)
    with pytest.raises(ValueError):
        Client(bad)
    with pytest.raises(ValueError):
        Subscriber(bad)


def test_the_cli_takes_both_endpoints_and_works_when_only_the_second_is_up(
    pair: Pair, stack: ExitStack
) -> None:
    # Given A killed and B active on A's journal, with a task A confirmed
    with Client(pair.endpoints, timeout_s=2.0) as client:
        task_id = client.enqueue("cli", b"kept")
    pair.fail_over()

    def zbroker(*args: str, env_endpoint: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(pair.b.env)
        if env_endpoint is not None:
            env["ZBROKER_ENDPOINT"] = env_endpoint
        return subprocess.run(
            [sys.executable, "-m", "zbroker", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
            timeout=DEADLINE_S,
        )

    # When the CLI is given --endpoint a,b (and ZBROKER_ENDPOINT=a,b)
    both = ",".join(pair.endpoints)
    shown = zbroker("task", task_id, "--json", "--endpoint", both)
    listed = zbroker("queues", "--json", env_endpoint=both)

    # Then it reaches B, which loaded A's journal
    assert shown.returncode == 0, shown.stderr
    assert task_id in shown.stdout and "ready" in shown.stdout
    assert listed.returncode == 0, listed.stderr
    assert '"cli"' in listed.stdout

    # and a bad list, or no broker answering, is a clear error
    bad = zbroker("queues", "--endpoint", f"{pair.b.endpoint},,")
    assert bad.returncode == 2 and "empty endpoint" in bad.stderr, bad.stderr
    nobody = ",".join(f"tcp://127.0.0.1:{port}" for port in free_ports(2))
    silent = zbroker("queues", "--timeout", "0.3", "--endpoint", nobody)
    assert silent.returncode == 1 and "no broker of the 2 endpoints" in silent.stderr, silent.stderr


def test_a_frozen_broker_is_left_for_the_one_that_took_over(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    # Given everything connected to A, A frozen (SIGSTOP: its kernel still accepts
    # TCP, it never completes a handshake), then B active (a journal of its own here:
    # a frozen A must not share one with a live B)
    a = broker_factory()
    b = broker_factory(start=False)
    endpoints = [a.endpoint, b.endpoint]
    runs = Runs()
    worker = stack.enter_context(
        Worker(endpoints, "echo", runs.handler, heartbeat_interval_s=HEARTBEAT_S)
    )
    wait_until(lambda: worker.connected, timeout_s=DEADLINE_S)
    client = stack.enter_context(Client(endpoints, timeout_s=1.0, retries=30))
    sub = stack.enter_context(Subscriber([a.events_out, b.events_out], "test."))
    pub = stack.enter_context(Publisher([a.events_in, b.events_in]))
    assert client.request("echo", b"before", timeout_s=DEADLINE_S) == b"done:before"
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        b.start()

        # When the same objects carry on
        answer = client.request("echo", b"after", timeout_s=DEADLINE_S)
        async_answer = asyncio.run(_request_async(endpoints, b"async"))

        # Then B serves them all: the worker registered with B, events flow via B
        assert answer == b"done:after" and async_answer == b"done:async"
        wait_for_event(sub, lambda e: e.type == "test.frozen", lambda: pub.publish("test.frozen"))
    finally:
        a.proc.send_signal(signal.SIGCONT)
        a.kill()


async def _request_async(endpoints: list[str], payload: bytes) -> bytes:
    async with AsyncClient(endpoints, timeout_s=1.0, retries=30) as client:
        return await client.request("echo", payload, timeout_s=DEADLINE_S)
