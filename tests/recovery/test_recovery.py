"""Recovery on real processes: a broker killed with SIGKILL, workers killed mid-task,
slow workers, poison tasks. The producer speaks raw ZBC01 frames so these tests
depend on nothing but the wire protocol and the journal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.conftest import ROOT, AuthKeys, BrokerProcess, wait_until, write_auth
from zbroker.client.keys import Credentials
from zbroker.protocol import ext, zbc


class RawClient:
    """A ZBC01 caller on a DEALER; after a timeout it starts over on a fresh socket.
    With `credentials`, a CURVE client of a broker started with --auth."""

    def __init__(self, endpoint: str, credentials: Credentials | None = None) -> None:
        self.endpoint = endpoint
        self.credentials = credentials
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket[bytes] | None = None
        self.rid = 0

    def call(self, make: Callable[[int], list[bytes]], timeout_s: float = 1.0) -> zbc.Answer | None:
        if self.sock is None:
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.linger = 0
            if self.credentials is not None:
                self.credentials.apply(self.sock)
            self.sock.connect(self.endpoint)
        self.rid += 1
        rid = self.rid
        self.sock.send_multipart(make(rid))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            answer = zbc.decode_answer(self.sock.recv_multipart())
            if answer.rid == rid:
                return answer
        self.sock.close(linger=0)
        self.sock = None
        return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split() for line in self.log.read_text().splitlines() if line.strip()]


@dataclass
class Trust:
    """How a test's peers meet its broker: without keys, or (`keys`) with CURVE keys
    and roles, the broker started with --auth. Nothing confirmed may be lost either way."""

    keys: AuthKeys | None

    @property
    def broker_args(self) -> tuple[str, ...]:
        return () if self.keys is None else ("--auth", str(self.keys.path))

    def credentials(self, name: str) -> Credentials | None:
        return None if self.keys is None else self.keys.credentials(name)

    def worker_env(self) -> dict[str, str]:
        """What task_worker reads its keys from (Credentials.from_environment)."""
        if self.keys is None:
            return {}
        return {
            "ZBROKER_SERVER_KEY": str(self.keys.server_key),
            "ZBROKER_KEY": str(self.keys.secret("worker")),
        }


@pytest.fixture(params=["plain", "auth"])
def trust(request: pytest.FixtureRequest, tmp_path: Path) -> Trust:
    if request.param == "plain":
        return Trust(None)
    return Trust(
        write_auth(
            tmp_path / "trust",
            {
                "producer": {"roles": ["client"], "services": ["*"]},
                "worker": {"roles": ["worker"], "services": ["*"]},
                "admin": {"roles": ["admin"]},
            },
        )
    )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(
        broker: BrokerProcess, service: str, concurrency: int = 1, trust: Trust | None = None
    ) -> WorkerProcess:
        log = tmp_path / f"worker{len(started)}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.recovery.task_worker",
                broker.endpoint,
                service,
                str(log),
                str(concurrency),
            ],
            cwd=ROOT,
            env={**os.environ, **(trust.worker_env() if trust is not None else {})},
        )
        w = WorkerProcess(proc, log)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(10)


def enqueue(client: RawClient, service: str, payload: str, **options: object) -> str | None:
    answer = client.call(
        lambda rid: zbc.enqueue(rid, service, [[payload.encode()]], zbc.TaskOptions(**options))  # type: ignore[arg-type]
    )
    if answer is None:
        return None
    assert answer.ok, answer.meta
    task_id: str = answer.meta["ids"][0]
    return task_id


def test_sigkill_of_the_broker_under_load_loses_no_confirmed_task(
    broker_factory: Callable[..., BrokerProcess],
    workers: Callable[..., WorkerProcess],
    trust: Trust,
) -> None:
    # sync durability, the default
    broker = broker_factory(*trust.broker_args, credentials=trust.credentials("admin"))
    pool = [workers(broker, "jobs", concurrency=4, trust=trust) for _ in range(2)]
    total = 400
    confirmed: dict[str, str] = {}
    failures: list[BaseException] = []

    def produce() -> None:
        client = RawClient(broker.endpoint, trust.credentials("producer"))
        try:
            for i in range(total):
                payload = f"p{i}"
                # The same key on every retry: an answer lost in the crash never
                # turns into a second task.
                while (task_id := enqueue(client, "jobs", payload, key=payload)) is None:
                    pass
                confirmed[payload] = task_id
        except BaseException as exc:  # surfaced by the main thread
            failures.append(exc)
        finally:
            client.close()

    producer = threading.Thread(target=produce)
    producer.start()
    wait_until(lambda: len(confirmed) >= total // 3, timeout_s=60)
    broker.kill()
    killed_at = time.time()
    time.sleep(0.3)
    broker.start()  # same ports, same data directory
    producer.join(120)
    assert not producer.is_alive() and not failures, failures
    assert len(confirmed) == total

    def done() -> dict[str, list[list[str]]]:
        seen: dict[str, list[list[str]]] = defaultdict(list)
        for w in pool:
            for line in w.lines():
                if line[0] == "done":
                    seen[line[3]].append(line)
        return seen

    wait_until(lambda: set(done()) >= set(confirmed), timeout_s=60)
    finished = done()
    # Each confirmed payload ran, under the id its enqueue returned.
    for payload, task_id in confirmed.items():
        assert {line[1] for line in finished[payload]} == {task_id}
    # Duplicates only come from tasks that were running when the broker died: the
    # first run ended around the kill (its answer died with the broker), the
    # redelivery after it. Workers' lines are gathered worker by worker, so order
    # the runs by their finish time before judging them.
    duplicated = {p: lines for p, lines in finished.items() if len(lines) > 1}
    for payload, lines in duplicated.items():
        ends = sorted(float(line[4]) for line in lines)
        assert ends[0] <= killed_at + 1.0, (payload, lines)
    assert len(duplicated) <= 8  # at most what the workers' credit let them hold


def test_a_worker_killed_mid_task_has_its_task_redelivered(
    broker_factory: Callable[..., BrokerProcess],
    workers: Callable[..., WorkerProcess],
    trust: Trust,
) -> None:
    broker = broker_factory(*trust.broker_args, credentials=trust.credentials("admin"))
    victim = workers(broker, "slow", trust=trust)
    client = RawClient(broker.endpoint, trust.credentials("producer"))
    task_id = enqueue(client, "slow", "sleep:30")
    assert task_id is not None
    wait_until(lambda: any(line[0] == "start" for line in victim.lines()), timeout_s=20)
    victim.proc.kill()
    victim.proc.wait(10)
    rescuer = workers(broker, "slow", trust=trust)
    wait_until(lambda: any(line[0] == "start" for line in rescuer.lines()), timeout_s=20)
    (start,) = [line for line in rescuer.lines() if line[0] == "start"]
    assert start[1:3] == [task_id, "2"]
    status = client.call(lambda rid: zbc.call(zbc.STATUS, rid, id=task_id))
    assert status is not None and status.meta["task"]["state"] == "inflight"
    client.close()


def test_a_slow_but_alive_worker_keeps_its_task_past_the_ack_timeout(
    broker_factory: Callable[..., BrokerProcess], workers: Callable[..., WorkerProcess]
) -> None:
    broker = broker_factory("--ack-timeout", "0.3")
    worker = workers(broker, "slow")
    client = RawClient(broker.endpoint)
    task_id = enqueue(client, "slow", "sleep:2")
    assert task_id is not None
    result = client.call(lambda rid: zbc.call(zbc.RESULT, rid, id=task_id, wait_s=20), 25)
    assert result is not None and result.meta["state"] == "done"
    assert result.frames == (b"SLEEP:2",)
    assert [line[:3] for line in worker.lines() if line[0] == "start"] == [["start", task_id, "1"]]
    client.close()


def test_a_poison_task_ends_in_the_dead_letter_queue(
    broker_factory: Callable[..., BrokerProcess], workers: Callable[..., WorkerProcess]
) -> None:
    broker = broker_factory("--retry-base", "0.05", "--max-attempts", "3")
    worker = workers(broker, "jobs")
    client = RawClient(broker.endpoint)
    poison = enqueue(client, "jobs", "poison")
    fine = enqueue(client, "jobs", "fine")
    result = client.call(lambda rid: zbc.call(zbc.RESULT, rid, id=poison, wait_s=20), 25)
    assert result is not None and result.meta["state"] == "dead"
    assert "poison task" in result.meta["error"]
    attempts = [line[2] for line in worker.lines() if line[0] == "start" and line[1] == poison]
    assert attempts == ["1", "2", "3"]
    dead = client.call(lambda rid: zbc.call(zbc.DEAD, rid, service="jobs"))
    assert dead is not None and [t["id"] for t in dead.meta["tasks"]] == [poison]
    ok = client.call(lambda rid: zbc.call(zbc.RESULT, rid, id=fine, wait_s=20), 25)
    assert ok is not None and ok.meta["state"] == "done"
    client.close()


def test_delays_and_results_survive_a_restart(
    broker_factory: Callable[..., BrokerProcess],
    workers: Callable[..., WorkerProcess],
    trust: Trust,
) -> None:
    broker = broker_factory(*trust.broker_args, credentials=trust.credentials("admin"))
    client = RawClient(broker.endpoint, trust.credentials("producer"))
    delayed = enqueue(client, "jobs", "later", delay_s=1.5)
    now = enqueue(client, "jobs", "now")
    worker = workers(broker, "jobs", trust=trust)
    result = client.call(lambda rid: zbc.call(zbc.RESULT, rid, id=now, wait_s=20), 25)
    assert result is not None and result.meta["state"] == "done"
    broker.kill()
    broker.start()
    status = client.call(lambda rid: zbc.call(zbc.STATUS, rid, id=delayed), 5)
    assert status is not None and status.meta["task"]["state"] == "delayed"
    # The result is still there for a requester coming back after the restart.
    again = client.call(lambda rid: zbc.call(zbc.RESULT, rid, id=now), 5)
    assert again is not None and again.frames == (b"NOW",)
    later = client.call(lambda rid: zbc.call(zbc.RESULT, rid, id=delayed, wait_s=20), 25)
    assert later is not None and later.meta["state"] == "done"
    assert any(line[0] == "done" and line[3] == "later" for line in worker.lines())
    client.close()


def test_a_nearly_full_journal_refuses_enqueues_and_the_broker_carries_on(
    broker_factory: Callable[..., BrokerProcess],
    workers: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    data = tmp_path / "small"
    broker = broker_factory("--journal-max-mib", "2", "--retention", "0", data_dir=data)
    client = RawClient(broker.endpoint)
    payload = b"x" * 4096
    confirmed: list[str] = []

    def enqueue_batch() -> zbc.Answer:
        answer = client.call(
            lambda rid: zbc.enqueue(rid, "big", [[payload]] * 50, batch=True), timeout_s=5
        )
        assert answer is not None, "the broker did not answer"
        return answer

    # When batches are enqueued until the journal is nearly full
    for _ in range(200):
        answer = enqueue_batch()
        if not answer.ok:
            break
        confirmed += answer.meta["ids"]
    else:
        raise AssertionError("the journal never filled up")
    # Then the next one is refused with a reason its sender can read, and nothing of it stored
    assert answer.code == zbc.E_QUEUE_FULL and "journal is nearly full" in answer.message
    assert confirmed  # some batches fitted before the limit
    assert broker.proc is not None and broker.proc.poll() is None  # still running
    # And after a kill -9 it starts again on the same journal, with every confirmed task
    broker.kill()
    broker.start()
    client.close()
    client = RawClient(broker.endpoint)
    for task_id in confirmed[:: max(1, len(confirmed) // 20)] + confirmed[-1:]:
        status = client.call(lambda rid, t=task_id: zbc.call(zbc.STATUS, rid, id=t), 5)  # type: ignore[misc]
        assert status is not None and status.meta["task"]["state"] == "ready"
    # And once workers have run them (the reserve holds what finishing writes), there
    # is room again
    pool = workers(broker, "big", concurrency=4)

    def finished() -> bool:
        return sum(1 for line in pool.lines() if line[0] == "done") >= len(confirmed)

    wait_until(finished, timeout_s=60)
    wait_until(lambda: enqueue_batch().ok, timeout_s=20)
    client.close()


def raw_worker(endpoint: str, service: str) -> zmq.Socket[bytes]:
    """A ZBW01 worker on a bare DEALER, ready for one task at a time."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    sock.send_multipart(ext.ready(service, 1))
    return sock


def next_task(sock: zmq.Socket[bytes], timeout_s: float) -> ext.Task:
    """The next TASK the worker is sent (heartbeats skipped)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            message = ext.decode_for_worker(sock.recv_multipart())
            if isinstance(message, ext.Task):
                return message
    raise AssertionError(f"no task in {timeout_s}s")


def test_a_task_handed_on_after_a_refused_send_is_committed_before_it_is_sent(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    # Given a broker whose passes are rare (heartbeats every second) and a task on W1
    broker = broker_factory(heartbeat_interval=1.0)
    client = RawClient(broker.endpoint)
    first = raw_worker(broker.endpoint, "svc")
    task_id = enqueue(client, "svc", "x", max_attempts=3)
    assert task_id is not None
    task = next_task(first, 5)
    assert (task.id, task.attempt) == (task_id, 1)
    first.send_multipart(ext.ack([(task_id, 1)]))
    second = raw_worker(broker.endpoint, "svc")
    wait_until(lambda: broker_sees_workers(client, 2), timeout_s=5)
    # When W1's connection goes: the broker learns it from a refused heartbeat, takes
    # the task back and hands it to W2 in the same send loop, outside any pass
    first.close(linger=0)
    handed_on = next_task(second, 5)
    assert (handed_on.id, handed_on.attempt) == (task_id, 2)
    # And the broker is killed the moment W2 has it
    broker.kill()
    broker.start()
    # Then the journal already held the requeue of attempt 1: it was committed before
    # attempt 2 was sent. (Attempt 2's start itself is only held, never written: the
    # crash lost it, and the task reads READY at attempt 1.)
    client.close()
    client = RawClient(broker.endpoint)
    answer = client.call(lambda rid: zbc.call(zbc.STATUS, rid, id=task_id), timeout_s=5)
    assert answer is not None and answer.ok
    record = answer.meta["task"]
    assert (record["state"], record["attempt"]) == ("ready", 1), record["history"]
    assert [h[0] for h in record["history"]] == ["enqueued", "attempt", "requeued"]
    # And so the restarted broker, fencing one attempt per crash, never hands out
    # attempt 2 again: the next delivery is attempt 3, with the lost attempt 2 not
    # charged (as when attempt 2 was written INFLIGHT and recovered)
    third = raw_worker(broker.endpoint, "svc")
    after = next_task(third, 10)
    assert (after.id, after.attempt) == (task_id, 3)
    answer = client.call(lambda rid: zbc.call(zbc.STATUS, rid, id=task_id), timeout_s=5)
    assert answer is not None and answer.ok
    assert (answer.meta["task"]["attempt"], answer.meta["task"]["uncharged"]) == (3, 1)
    third.close(linger=0)
    second.close(linger=0)
    client.close()


def broker_sees_workers(client: RawClient, n: int) -> bool:
    answer = client.call(lambda rid: zbc.call(zbc.WORKERS, rid))
    return answer is not None and len(answer.meta["workers"]) == n


def test_headers_repeated_in_every_task_count_against_the_journal(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    # Given a broker whose journal may hold 2 MiB
    broker = broker_factory("--journal-max-mib", "2", data_dir=tmp_path / "small")
    client = RawClient(broker.endpoint)
    # When one small call asks for 1,000 empty tasks that each repeat 40 KB of headers
    # (40 MB to write, from a message of 41 KB)
    headers = {"note": "h" * 40_000}
    answer = client.call(
        lambda rid: zbc.enqueue(
            rid, "big", [[b""]] * 1000, zbc.TaskOptions(headers=headers), batch=True
        ),
        timeout_s=5,
    )
    # Then it is refused, with a reason its sender can read, and the broker carries on
    assert answer is not None, "the broker did not answer"
    assert answer.code == zbc.E_QUEUE_FULL and "journal is nearly full" in answer.message
    assert broker.proc is not None and broker.proc.poll() is None
    small = client.call(lambda rid: zbc.enqueue(rid, "big", [[b"x"]]), timeout_s=5)
    assert small is not None and small.ok
    client.close()


def test_a_result_too_big_for_the_journal_fails_its_attempt_not_the_broker(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    # Given a broker whose journal may hold 2 MiB, and a task at a worker
    broker = broker_factory("--journal-max-mib", "2", data_dir=tmp_path / "small")
    client = RawClient(broker.endpoint)
    answer = client.call(lambda rid: zbc.enqueue(rid, "big", [[b"x"]]), timeout_s=5)
    assert answer is not None and answer.ok
    (task_id,) = answer.meta["ids"]
    worker = raw_worker(broker.endpoint, "big")
    task = next_task(worker, 10)
    # When the worker answers with a result larger than the whole journal
    worker.send_multipart(ext.done(task.id, task.attempt, [b"r" * (3 << 20)]))

    # Then the attempt fails with a reason saying so, the task will run again, and the
    # broker carries on
    def status() -> dict[str, Any]:
        got = client.call(lambda rid: zbc.call(zbc.STATUS, rid, id=task_id), timeout_s=5)
        assert got is not None, "the broker did not answer"
        task_view: dict[str, Any] = got.meta["task"]
        return task_view

    wait_until(lambda: status()["state"] != "inflight", timeout_s=10)
    view = status()
    assert view["state"] in {"delayed", "ready"}
    assert "did not fit in the journal" in view["error"]
    assert broker.proc is not None and broker.proc.poll() is None
    worker.close()
    client.close()
