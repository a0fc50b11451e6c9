"""Task graphs survive `kill -9` of the broker (docs/protocol.md §15): a 3-step chain
and a 10-way fan-out/fan-in run in order, and to the end, with the broker killed
in the middle, every step once and its input handed over."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from tests.conftest import BrokerProcess, wait_until
from zbroker import Client, Task, Worker, unpack_results

pytestmark = pytest.mark.timeout(120)


class Journal:
    """What the workers did: (event, service, task id, payload, time), thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[str, str, str, bytes, float]] = []

    def add(self, event: str, task: Task) -> None:
        with self.lock:
            self.rows.append((event, task.service, task.id, task.payload, time.monotonic()))

    def done(self, task_id: str) -> list[float]:
        with self.lock:
            return [r[4] for r in self.rows if r[0] == "done" and r[2] == task_id]

    def starts(self, task_id: str) -> list[float]:
        with self.lock:
            return [r[4] for r in self.rows if r[0] == "start" and r[2] == task_id]


@pytest.fixture
def workers(
    broker_factory: Callable[..., BrokerProcess],
) -> Iterator[tuple[BrokerProcess, Journal]]:
    broker = broker_factory("--durability", "sync")
    seen = Journal()
    gate = threading.Event()  # "part" and "tts" tasks wait for it: the kill comes first

    def handler(suffix: bytes, gated: bool) -> Callable[[Task], bytes]:
        def handle(task: Task) -> bytes:
            seen.add("start", task)
            if gated:
                gate.wait(30)
            time.sleep(0.05)
            seen.add("done", task)
            if task.service == "join":
                parts = unpack_results(task.frames[-1])
                return b"+".join(b"".join(r or [b"?"]) for r in parts)
            return b"".join(task.frames) + suffix

        return handle

    with ExitStack() as stack:
        for service, suffix, gated, concurrency in (
            ("stt", b">text", False, 1),
            ("llm", b">answer", False, 1),
            ("tts", b">audio", True, 1),
            ("part", b"!", True, 4),
            ("join", b"", False, 1),
        ):
            worker = Worker(
                broker.endpoint,
                service,
                handler(suffix, gated),
                concurrency=concurrency,
                heartbeat_interval_s=0.2,
                max_reconnect_delay_s=0.3,
            )
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            stack.callback(thread.join, 10)
            stack.callback(worker.stop, 2.0)
        stack.callback(gate.set)
        seen.gate = gate  # type: ignore[attr-defined]
        yield broker, seen


def test_a_chain_and_a_fan_in_run_in_order_across_kill_9(
    workers: tuple[BrokerProcess, Journal],
) -> None:
    broker, seen = workers
    gate: threading.Event = seen.gate  # type: ignore[attr-defined]
    with Client(broker.endpoint, timeout_s=1.0, retries=30, poll_s=2.0) as client:
        # Given a 3-step chain and a 10-way fan-out joined by one task
        chain = client.chain([("stt", b"audio"), ("llm", None), ("tts", b"voice:")])
        parts = [("part", b"p%d" % i) for i in range(10)]
        graph = client.fan_in(parts, ("join", None))
        # When the chain's first two steps have run (the third, and the parts, are held)
        wait_until(lambda: len(seen.done(chain[1])) == 1, timeout_s=20)
        wait_until(lambda: len(seen.starts(graph[0])) == 1, timeout_s=20)
        assert client.status(chain[2]).state in ("ready", "inflight")
        assert client.status(graph[-1]).state == "blocked"
        # And the broker is killed with SIGKILL, then started again
        broker.kill()
        broker.start()
        gate.set()
        # Then both run to the end, with each step's input handed over
        assert client.result(chain[-1], timeout_s=30) == b"voice:audio>text>answer>audio"
        joined = client.result(graph[-1], timeout_s=30)
        assert joined == b"+".join(b"p%d!" % i for i in range(10))
    # And in order: each step started after the step before it was done
    for before, after in itertools.pairwise(chain):
        assert min(seen.starts(after)) > min(seen.done(before))
    last_part = max(min(seen.done(task_id)) for task_id in graph[:-1])
    assert min(seen.starts(graph[-1])) > last_part
    # And the steps that were done before the kill did not run again
    assert len(seen.starts(chain[0])) == 1 and len(seen.starts(chain[1])) == 1
    assert len(seen.starts(graph[-1])) == 1


def test_per_key_limits_and_rates_survive_kill_9(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    broker = broker_factory("--durability", "sync")
    with Client(broker.endpoint, timeout_s=1.0, retries=30, poll_s=2.0) as client:
        # Given a per-key limit, a per-key rate and a service rate
        client.limit("gen", 1, per_key=True)
        client.rate("gen", 3.0, burst=2, per_key=True)
        client.rate("tts", 5.0)
        before = {q["service"]: q for q in client.queues()}
        # When the broker is killed with SIGKILL and started again
        broker.kill()
        broker.start()
        after = {q["service"]: q for q in client.queues()}
    # Then they hold as they were
    for service, fields in (("gen", ("key_limit", "key_rate")), ("tts", ("rate",))):
        for field in fields:
            assert after[service][field] == before[service][field] is not None
    assert after["gen"]["key_rate"] == {"per_s": 3.0, "burst": 2}
