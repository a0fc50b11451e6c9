"""Active and standby brokers on one journal in PostgreSQL (docs/operations.md).

Real broker processes on the session's private PostgreSQL (tests/pg.py), killed
with SIGKILL, frozen with SIGSTOP, and cut off from the database with
pg_terminate_backend. What must hold: a standby binds and serves nothing; it takes
over when the active broker dies, freezes past its lease or loses its database;
every confirmed task is still there; a broker that lost the lease never commits
again and goes back to standby.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import BrokerProcess, new_broker, wait_until
from zbroker.client import Client, Task, Worker
from zbroker.client.errors import ClientError, RequestTimeout
from zbroker.journal import Durability, JournalError, TaskRecord, TaskState
from zbroker.journal.postgres import PostgresJournal
from zbroker.runtime.lease import Lease

pytestmark = pytest.mark.timeout(180)


class Group:
    """Brokers started on one journal URL, each on its own ports; stopped at teardown."""

    def __init__(self, directory: Path, url: str) -> None:
        self.directory = directory
        self.url = url
        self.brokers: list[BrokerProcess] = []

    def broker(self, *extra: str) -> BrokerProcess:
        b = new_broker(self.directory, len(self.brokers), "--journal", self.url, *extra)
        self.brokers.append(b)
        return b

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def lease(self) -> tuple[int, str]:
        """(epoch, endpoint) of the lease row: who is active."""
        rows = self.sql("SELECT epoch, endpoint FROM zb_lease")
        return int(rows[0][0]), str(rows[0][1])

    def stop(self) -> None:
        for b in self.brokers:
            if b.proc is not None and b.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    b.proc.send_signal(signal.SIGCONT)
            with contextlib.suppress(AssertionError):
                b.stop()


@pytest.fixture
def group(tmp_path: Path, postgres_server: Any) -> Iterator[Group]:
    g = Group(tmp_path, postgres_server.fresh_url())
    yield g
    g.stop()


def listening(endpoint: str) -> bool:
    """Whether something accepts TCP connections at `endpoint` (tcp://host:port)."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect((host, int(port)))
        except OSError:
            return False
    return True


def standby(b: BrokerProcess) -> None:
    """Start `b` and wait until it says it is a standby."""
    b.start(wait=False)
    wait_until(lambda: "holds the lease; waiting" in b.log(), timeout_s=30)


def enqueue_many(endpoint: str, n: int, prefix: str) -> list[str]:
    with Client(endpoint, timeout_s=10) as client:
        keys = [f"{prefix}{i}" for i in range(n)]
        return [client.enqueue("svc", key.encode(), key=key) for key in keys]


def states(endpoint: str, ids: list[str]) -> set[str]:
    with Client(endpoint, timeout_s=10) as client:
        return {client.status(task_id).state for task_id in ids}


def test_a_standby_serves_nothing_until_the_active_one_dies(group: Group) -> None:
    # Given an active broker with confirmed tasks, and a standby on other ports
    a, b = group.broker(), group.broker()
    a.start()
    confirmed = enqueue_many(a.endpoint, 50, "t")
    standby(b)
    # Then the standby binds none of its endpoints
    assert not any(map(listening, (b.endpoint, b.events_in, b.events_out)))
    assert group.lease() == (1, a.endpoint)
    # When the active broker is killed
    a.kill()
    # Then the standby takes over, serves, and has every confirmed task
    b.wait_ready(timeout_s=30)
    assert states(b.endpoint, confirmed) == {"ready"}
    assert group.lease() == (2, b.endpoint)
    assert "taking over from" in b.log()
    # And an idempotency key confirmed by the dead broker still names its task
    with Client(b.endpoint, timeout_s=10) as client:
        assert client.enqueue("svc", b"again", key="t7") == confirmed[7]
    # And `zbroker group`, reading the database, names the new active broker
    shown = subprocess.run(
        [sys.executable, "-m", "zbroker", "group", "--journal", group.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert b.proc is not None
    assert shown.stdout.startswith(f"active: {socket.gethostname()}:{b.proc.pid} serving")
    assert f"serving {b.endpoint}, lease epoch 2" in shown.stdout
    assert "svc" in shown.stdout and "ready" in shown.stdout


def test_a_sigkill_of_the_active_broker_during_5000_confirmed_tasks_loses_none(
    group: Group,
) -> None:
    # Given two brokers on one PostgreSQL, and producers and workers given both
    a, b = group.broker(), group.broker()
    a.start()
    standby(b)
    endpoints = [a.endpoint, b.endpoint]
    ran: list[str] = []
    lock = threading.Lock()

    def handler(task: Task) -> bytes:
        with lock:
            ran.append(task.id)
        return b"done:" + task.payload

    total, producers_n = 5000, 2
    confirmed: list[str] = []
    failures: list[BaseException] = []

    def produce(n: int) -> None:
        try:
            with Client(endpoints, timeout_s=1.0, retries=60) as client:
                for i in range(total // producers_n):
                    task_id = client.enqueue("jobs", f"{n}-{i}".encode())
                    with lock:
                        confirmed.append(task_id)
        except BaseException as exc:
            failures.append(exc)

    with contextlib.ExitStack() as stack:
        for _ in range(2):
            stack.enter_context(Worker(endpoints, "jobs", handler, concurrency=4))
        threads = [threading.Thread(target=produce, args=(n,)) for n in range(producers_n)]
        for thread in threads:
            thread.start()
        # When the active broker is killed with SIGKILL a third of the way in
        wait_until(lambda: len(confirmed) >= total // 3, timeout_s=120)
        a.kill()
        for thread in threads:
            thread.join(timeout=170)
        # Then the producers carried on with the standby: all 5,000 confirmed
        assert not failures and not any(t.is_alive() for t in threads), failures
        assert len(set(confirmed)) == total
        # And every confirmed task is done (the workers followed the standby)
        wait_until(lambda: len(set(ran) & set(confirmed)) == total, timeout_s=120)
    done = group.sql(
        "SELECT count(*) FROM zb_tasks WHERE state = 'done' AND id = ANY(%s)", confirmed
    )
    assert done == [(total,)]
    assert group.lease()[1] == b.endpoint


def test_a_frozen_active_broker_never_commits_after_the_takeover(group: Group) -> None:
    # Given an active broker and a standby, on a short lease
    a, b = group.broker("--lease", "1"), group.broker("--lease", "1")
    a.start()
    before = enqueue_many(a.endpoint, 5, "before")
    standby(b)
    # When the active broker is frozen past its lease, and the standby took over
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    b.wait_ready(timeout_s=30)
    assert group.lease()[1] == b.endpoint
    # And a client sends enqueues to the frozen broker, which it reads once it runs again
    outcome: list[object] = []

    def late_enqueue() -> None:
        try:
            with Client(a.endpoint, timeout_s=6, retries=1) as client:
                outcome.append(client.enqueue("svc", b"late", key="late"))
        except ClientError as exc:
            outcome.append(exc)

    sender = threading.Thread(target=late_enqueue)
    sender.start()
    wait_until(lambda: listening(a.endpoint), timeout_s=10)  # the kernel still accepts
    a.proc.send_signal(signal.SIGCONT)
    # Then it steps down without answering, and never committed the late task
    wait_until(lambda: "stepping down" in a.log(), timeout_s=30)
    sender.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], RequestTimeout), outcome
    assert group.sql("SELECT id FROM zb_tasks WHERE idempotency_key = 'late'") == []
    # And it closed its endpoints and waits as a standby again
    wait_until(lambda: not listening(a.endpoint), timeout_s=30)
    wait_until(lambda: a.log().count("holds the lease; waiting") >= 1, timeout_s=30)
    # While the standby that took over serves everything confirmed before the freeze
    assert states(b.endpoint, before) == {"ready"}
    assert group.lease()[1] == b.endpoint


def test_an_active_broker_cut_from_its_database_hands_over(group: Group) -> None:
    # Given an active broker with confirmed tasks, and a standby
    a, b = group.broker(), group.broker()
    a.start()
    confirmed = enqueue_many(a.endpoint, 20, "c")
    standby(b)
    assert a.proc is not None
    pid = a.proc.pid
    # When every database session of the active broker is ended by the server
    ended = group.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
        f"zbroker % {pid}",
    )
    assert len(ended) >= 2  # its journal and its lease
    # Then the standby takes over and has every confirmed task
    b.wait_ready(timeout_s=30)
    assert states(b.endpoint, confirmed) == {"ready"}
    # And the broker that was cut off steps down, stops listening, and waits as a standby
    wait_until(lambda: "lease lost" in a.log() or "stepping down" in a.log(), timeout_s=30)
    wait_until(lambda: not listening(a.endpoint), timeout_s=30)
    wait_until(lambda: "holds the lease; waiting" in a.log(), timeout_s=30)
    assert a.proc.poll() is None


def test_a_lone_broker_cut_from_its_database_serves_again(group: Group) -> None:
    # Given a broker alone on its journal (a group of one), with confirmed tasks
    a = group.broker()
    a.start()
    confirmed = enqueue_many(a.endpoint, 10, "l")
    assert a.proc is not None
    # When its database sessions are ended by the server
    group.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
        f"zbroker % {a.proc.pid}",
    )
    # And a client enqueues (the pass's commit finds the journal's connection gone)
    with Client(a.endpoint, timeout_s=2, retries=15) as client:
        after = client.enqueue("svc", b"after", key="after")
    # Then the broker stepped down, took the lease again (a new epoch), read the
    # journal anew and served: the enqueue retried with its key was confirmed once
    assert group.lease()[0] == 2
    assert "standby again" in a.log()
    assert states(a.endpoint, [*confirmed, after]) == {"ready"}
    assert group.sql("SELECT count(*) FROM zb_tasks WHERE idempotency_key = 'after'") == [(1,)]
    assert a.proc.poll() is None


def test_a_clean_stop_hands_over_at_once(group: Group) -> None:
    # Given an active broker with a task, and a standby on a long lease
    a, b = group.broker("--lease", "60"), group.broker("--lease", "60")
    a.start()
    confirmed = enqueue_many(a.endpoint, 3, "s")
    standby(b)
    # When the active one stops cleanly (SIGTERM: it drains, then lets the lease go)
    assert a.stop() == 0
    # Then the standby takes over well before the lease's 60 s term
    b.wait_ready(timeout_s=30)
    assert states(b.endpoint, confirmed) == {"ready"}
    assert "lease released" in a.log()


def test_a_schema_newer_than_this_zbroker_is_refused(group: Group) -> None:
    # Given a journal whose schema a newer zbroker wrote
    a = group.broker()
    a.start()
    a.stop()
    group.sql("UPDATE zb_meta SET value = value + 1 WHERE key = 'schema' RETURNING value")
    # When a broker starts on it, it refuses, saying why
    b = group.broker()
    b.start(wait=False)
    assert b.proc is not None
    assert b.proc.wait(timeout=60) != 0
    assert "newer zbroker" in b.log()


def test_a_broker_frozen_inside_a_commit_does_not_block_the_takeover(group: Group) -> None:
    # Given an active broker's lease and journal, frozen in the middle of a commit:
    # its transaction holds the lease row's lock and its lease is no longer renewed
    active = Lease(group.url, "frozen", "tcp://a", term_s=1.0)
    assert active.acquire()
    journal = PostgresJournal(group.url, Durability.SYNC, lease=active)
    try:
        journal._conn.execute("BEGIN")
        journal._conn.execute("SELECT zb_fence(%s::int8)", (active.epoch,))
        active._stop.set()  # the renewing thread stops, as a frozen process's would
        # When a standby looks for the lease
        standby = Lease(group.url, "standby", "tcp://b", term_s=1.0)
        try:
            # Then it takes it over: the server ended the frozen session's transaction
            assert standby.acquire(stopping=_after(60.0))
            assert standby.epoch == active.epoch + 1
        finally:
            standby.release()
        # And the frozen broker's journal can never commit again
        with pytest.raises(JournalError):
            journal.put(TaskRecord("t1", "svc", TaskState.READY, journal.next_seq(), 1.0))
            journal.commit()
    finally:
        journal.close()
        active.release()


def _after(seconds: float) -> Callable[[], bool]:
    deadline = time.monotonic() + seconds
    return lambda: time.monotonic() > deadline
