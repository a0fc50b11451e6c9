"""`zbroker queues` and `zbroker workers` against a real broker with a known workload."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from contextlib import ExitStack
from pathlib import Path

import zmq

from tests.conftest import ROOT, BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from zbroker import NonRetryableError, Task, native
from zbroker import __version__ as zbroker_version
from zbroker.client import TaskState


def zbroker(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zbroker", *args, "--endpoint", broker.endpoint],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_queues_and_workers_show_exact_figures(broker: BrokerProcess, stack: ExitStack) -> None:
    release = threading.Event()
    started: list[str] = []

    def handler(task: Task) -> bytes:
        if task.payload == b"poison":
            raise NonRetryableError("cannot parse")
        started.append(task.id)
        release.wait(30)
        return b"ok"

    stack.callback(release.set)
    client = open_client(stack, broker)
    poison = client.enqueue("jobs", b"poison")
    worker = start_worker(stack, broker, "jobs", handler, concurrency=2)
    wait_until(lambda: client.status(poison).state is TaskState.DEAD, timeout_s=10)
    held = [client.enqueue("jobs", b"hold") for _ in range(2)]
    wait_until(lambda: len(started) == 2, timeout_s=10)
    waiting = client.enqueue_many("jobs", [b"hold"] * 3)
    client.enqueue("jobs", b"later", delay_s=60)
    client.enqueue("other", b"x", priority=5)

    result = zbroker(broker, "queues", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["service"]: row for row in json.loads(result.stdout)}
    jobs = rows["jobs"]
    assert {k: jobs[k] for k in ("ready", "delayed", "inflight", "dead", "workers")} == {
        "ready": 3,
        "delayed": 1,
        "inflight": 2,
        "dead": 1,
        "workers": 1,
    }
    assert jobs["credit"] == 2 and jobs["credit_in_use"] == 2
    assert jobs["oldest_age_s"] >= 0 and rows["other"]["ready"] == 1
    assert rows["other"]["workers"] == 0

    result = zbroker(broker, "workers", "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["service"] == "jobs" and row["dialect"] == "ZBW01" and row["credit"] == 2
    assert sorted(row["tasks"]) == sorted(held)
    assert row["last_seen_s"] < 5

    table = zbroker(broker, "queues")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:6] == [
        "service",
        "ready",
        "delayed",
        "blocked",
        "inflight",
        "dead",
    ]
    jobs_line = next(line for line in table.stdout.splitlines() if line.startswith("jobs"))
    assert jobs_line.split()[1:6] == ["3", "1", "0", "2", "1"]
    release.set()
    assert [client.result(t, timeout_s=10) for t in waiting] == [b"ok"] * 3
    worker.stop()


def test_admin_commands_say_clearly_when_no_broker_answers() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "zbroker",
            "queues",
            "--endpoint",
            "tcp://127.0.0.1:9",
            "--timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1 and "zbroker: queues from tcp://127.0.0.1:9" in result.stderr


def test_enqueue_task_request_and_dead_letters_from_the_command_line(
    broker: BrokerProcess, stack: ExitStack, tmp_path: Path
) -> None:
    enqueued = zbroker(broker, "enqueue", "upper", "--data", "hello", "--priority", "3")
    assert enqueued.returncode == 0, enqueued.stderr
    task_id = enqueued.stdout.strip()
    assert enqueued.stderr == ""
    keyed = zbroker(broker, "enqueue", "upper", "--data", "hi", "--key", "greeting")
    assert keyed.returncode == 0 and keyed.stderr == ""
    again = zbroker(broker, "enqueue", "upper", "--data", "hi", "--key", "greeting")
    assert again.returncode == 0 and again.stdout == keyed.stdout
    assert f"key 'greeting' matched task {keyed.stdout.strip()}: nothing new stored" in again.stderr
    shown = zbroker(broker, "task", task_id, "--json")
    record = json.loads(shown.stdout)
    assert record["state"] == "ready" and record["priority"] == 3 and record["service"] == "upper"

    def upper(task: Task) -> bytes:
        if task.payload == b"poison":
            raise NonRetryableError("cannot shout that")
        return task.payload.upper()

    start_worker(stack, broker, "upper", upper)
    client = open_client(stack, broker)
    assert client.result(task_id, timeout_s=10) == b"HELLO"
    text = zbroker(broker, "task", task_id)
    assert "state         done" in text.stdout and "attempt" in text.stdout
    assert [line.split()[1] for line in text.stdout.splitlines() if line.startswith("  ")] == [
        "enqueued",
        "attempt",
        "done",
    ]
    payload = tmp_path / "in.txt"
    payload.write_bytes(b"from a file")
    answered = zbroker(broker, "request", "upper", "--file", str(payload))
    assert answered.returncode == 0 and answered.stdout == "FROM A FILE"

    poison = zbroker(broker, "enqueue", "upper", "--data", "poison").stdout.strip()
    wait_until(lambda: client.status(poison).state is TaskState.DEAD, timeout_s=10)
    listed = zbroker(broker, "dlq", "list", "upper", "--json")
    (letter,) = json.loads(listed.stdout)
    assert letter["id"] == poison and "cannot shout that" in letter["error"]
    redriven = zbroker(broker, "dlq", "redrive", "upper", poison)
    assert redriven.returncode == 0 and redriven.stdout.split() == [poison]
    assert "1 task(s) redriven" in redriven.stderr

    missing = zbroker(broker, "task", "t-nope")
    assert missing.returncode == 1 and "t-nope" in missing.stderr
    both = zbroker(broker, "enqueue", "upper")
    assert both.returncode == 2 and "--data" in both.stderr


def test_drain_and_pause_stop_new_deliveries(broker: BrokerProcess, stack: ExitStack) -> None:
    release = threading.Event()
    stack.callback(release.set)
    seen: list[bytes] = []

    def slow(task: Task) -> bytes:
        seen.append(task.payload)
        release.wait(30)
        return b"ok"

    client = open_client(stack, broker)
    start_worker(stack, broker, "jobs", slow, concurrency=2)
    first = client.enqueue("jobs", b"1")
    wait_until(lambda: seen == [b"1"], timeout_s=10)
    (row,) = client.workers()
    assert row["state"] == "ready"
    drained = zbroker(broker, "drain", row["worker"])
    assert drained.returncode == 0 and "1 task(s) to finish" in drained.stdout
    client.enqueue("jobs", b"2")
    (row,) = client.workers()
    assert row["state"] == "draining" and row["tasks"] == [first]
    release.set()
    assert client.result(first, timeout_s=10) == b"ok"
    # The drained worker has credit again but gets nothing: task 2 waits.
    (queue,) = [q for q in client.queues() if q["service"] == "jobs"]
    assert queue["ready"] == 1 and queue["inflight"] == 0 and seen == [b"1"]
    # A fresh worker takes it; pausing the service stops that one too.
    assert zbroker(broker, "pause", "jobs").returncode == 0
    other: list[bytes] = []
    start_worker(stack, broker, "jobs", lambda task: other.append(task.payload) or b"ok")
    later = client.enqueue("jobs", b"3")
    (queue,) = [q for q in client.queues() if q["service"] == "jobs"]
    assert queue["paused"] is True and queue["ready"] == 2 and other == []
    assert zbroker(broker, "resume", "jobs").returncode == 0
    assert client.result(later, timeout_s=10) == b"ok"
    assert sorted(other) == [b"2", b"3"]
    unknown = zbroker(broker, "drain", "00ff")
    assert unknown.returncode == 1 and "no worker 00ff" in unknown.stderr


def test_pause_and_limit_outlive_a_killed_broker(broker: BrokerProcess, stack: ExitStack) -> None:
    assert zbroker(broker, "pause", "jobs").returncode == 0
    assert zbroker(broker, "limit", "jobs", "1").returncode == 0
    client = open_client(stack, broker)
    first = client.enqueue("jobs", b"1")
    second = client.enqueue("jobs", b"2")
    # A name longer than an LMDB key (511 bytes) is kept too, and stops nothing
    long_name = "j" * 600
    client.pause(long_name)
    client.limit(long_name, 3)
    broker.kill()  # SIGKILL: the operator's settings must already be in the journal
    broker.start()
    listed = zbroker(broker, "queues", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = [q for q in json.loads(listed.stdout) if q["service"] == "jobs"]
    assert row["paused"] is True and row["limit"] == 1 and row["ready"] == 2
    (row,) = [q for q in json.loads(listed.stdout) if q["service"] == long_name]
    assert row["paused"] is True and row["limit"] == 3
    release = threading.Event()
    stack.callback(release.set)
    running: list[bytes] = []

    def held(task: Task) -> bytes:
        running.append(task.payload)
        release.wait(30)
        return b"ok"

    start_worker(stack, broker, "jobs", held, concurrency=2)
    wait_until(lambda: any(w["service"] == "jobs" for w in client.workers()), timeout_s=10)
    assert running == []  # still paused
    assert zbroker(broker, "resume", "jobs").returncode == 0
    wait_until(lambda: running == [b"1"], timeout_s=10)
    (row,) = [q for q in client.queues() if q["service"] == "jobs"]
    assert row["inflight"] == 1 and row["ready"] == 1  # the limit of 1 still holds
    release.set()
    assert client.result(first, timeout_s=10) == b"ok"
    assert client.result(second, timeout_s=10) == b"ok"


def test_status_counts_a_known_workload(broker: BrokerProcess, stack: ExitStack) -> None:
    start_worker(stack, broker, "echo", lambda task: task.payload)
    client = open_client(stack, broker)
    ids = client.enqueue_many("echo", [b"a", b"b"])
    assert [client.result(i, timeout_s=10) for i in ids] == [b"a", b"b"]
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(broker.endpoint)
    raw.send_multipart([b"", b"NOPE", b"x", b"y"])  # malformed: dropped and counted
    raw.close(linger=2000)  # delivered before the socket goes
    wait_until(lambda: client.broker_stats()["malformed"].get("bad_header") == 1, timeout_s=10)
    result = zbroker(broker, "status", "--json")
    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert view["stats"]["tasks_enqueued"] == 2 and view["stats"]["tasks_done"] == 2
    assert view["workers"] == 1 and view["malformed"] == {"bad_header": 1}
    assert view["journal"]["durability"] == "sync" and view["journal"]["commits"] >= 2
    text = zbroker(broker, "status")
    assert "tasks_done               2" in text.stdout and "malformed bad_header" in text.stdout
    # And it says which core the broker runs: the build this test process chose
    # (the suite runs once per build; the broker inherits ZBROKER_PURE)
    build = view["build"]
    assert build["compiled"] is native.compiled()
    assert build["core"] == native.describe() and build["version"] == zbroker_version
    assert f"zbroker {zbroker_version}, core: {native.describe()}" in text.stdout
    version = subprocess.run(
        [sys.executable, "-m", "zbroker", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.strip() == f"zbroker {zbroker_version}, core: {native.describe()}"


def test_a_concurrency_limit_holds_across_workers(broker: BrokerProcess, stack: ExitStack) -> None:
    release = threading.Event()
    stack.callback(release.set)
    running: list[bytes] = []

    def slow(task: Task) -> bytes:
        running.append(task.payload)
        release.wait(30)
        return b"ok"

    client = open_client(stack, broker)
    assert zbroker(broker, "limit", "tts", "2").returncode == 0
    for _ in range(2):
        start_worker(stack, broker, "tts", slow, concurrency=3)
    ids = client.enqueue_many("tts", [b"%d" % i for i in range(5)])
    wait_until(lambda: len(running) == 2, timeout_s=10)
    (queue,) = [q for q in client.queues() if q["service"] == "tts"]
    assert queue["limit"] == 2 and queue["inflight"] == 2 and queue["ready"] == 3
    assert queue["credit"] == 6  # the workers could take more: the limit holds them back
    unlimited = zbroker(broker, "limit", "tts", "0")
    assert unlimited.returncode == 0 and "no limit" in unlimited.stdout
    wait_until(lambda: len(running) == 5, timeout_s=10)
    release.set()
    assert [client.result(i, timeout_s=10) for i in ids] == [b"ok"] * 5


def test_purge_cancels_waiting_tasks_and_dlq_drop_deletes_dead_letters(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    waiting = client.enqueue_many("ocr", [b"a", b"b", b"c"])
    later = client.enqueue("ocr", b"d", delay_s=60)
    other = client.enqueue("stt", b"keep")
    purged = zbroker(broker, "purge", "ocr")
    assert purged.returncode == 0 and "4 task(s) of ocr purged" in purged.stdout
    assert {client.status(t).state for t in [*waiting, later]} == {TaskState.CANCELLED}
    assert client.status(other).state is TaskState.READY
    (row,) = [q for q in client.queues() if q["service"] == "ocr"]
    assert row["ready"] == 0 and row["delayed"] == 0

    def refuse(task: Task) -> bytes:
        raise NonRetryableError("unreadable")

    start_worker(stack, broker, "ocr", refuse)
    dead = [client.enqueue("ocr", b"x%d" % i) for i in range(3)]
    wait_until(lambda: all(client.status(t).state is TaskState.DEAD for t in dead), timeout_s=10)
    one = zbroker(broker, "dlq", "drop", "ocr", dead[0])
    assert one.returncode == 0 and "1 dead letter(s) dropped" in one.stdout
    rest = zbroker(broker, "dlq", "drop", "ocr")
    assert "2 dead letter(s) dropped" in rest.stdout
    assert client.dead_letters("ocr") == []
    missing = zbroker(broker, "task", dead[1])
    assert missing.returncode == 1


def test_tasks_lists_a_service_by_state_in_pages(broker: BrokerProcess, stack: ExitStack) -> None:
    client = open_client(stack, broker)
    low = client.enqueue_many("ocr", [b"%d" % i for i in range(5)])
    high = client.enqueue("ocr", b"urgent", priority=9)
    later = client.enqueue("ocr", b"later", delay_s=60)
    client.enqueue("stt", b"elsewhere")
    listed = zbroker(broker, "tasks", "--service", "ocr", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)] == [high, *low]  # delivery order
    page, after = client.tasks("ocr", "ready", limit=4)
    assert [r["id"] for r in page] == [high, *low[:3]] and after == 4
    page, after = client.tasks("ocr", "ready", limit=4, after=after)
    assert [r["id"] for r in page] == low[3:] and after is None
    delayed = json.loads(zbroker(broker, "tasks", "--service", "ocr", "--state", "delayed",
                                 "--json").stdout)  # fmt: skip
    assert [r["id"] for r in delayed] == [later]
    none_old = zbroker(broker, "tasks", "--service", "ocr", "--older-than", "3600")
    assert "no ready tasks in ocr" in none_old.stdout
    client.cancel(low[0])
    cancelled = json.loads(zbroker(broker, "tasks", "--service", "ocr", "--state", "cancelled",
                                   "--json").stdout)  # fmt: skip
    assert [r["id"] for r in cancelled] == [low[0]]
    table = zbroker(broker, "tasks", "--service", "ocr", "--limit", "2")
    assert table.stdout.splitlines()[0].split()[:3] == ["id", "state", "priority"]
    bad = zbroker(broker, "tasks", "--service", "ocr", "--state", "sleeping")
    assert bad.returncode == 1 and "state" in bad.stderr


def test_top_renders_queues_workers_and_counters(broker: BrokerProcess, stack: ExitStack) -> None:
    client = open_client(stack, broker)
    start_worker(stack, broker, "tts", lambda task: b"ok", metrics=lambda: {"gpu": 1})
    done = client.enqueue("tts", b"x")
    assert client.result(done, timeout_s=10) == b"ok"
    client.enqueue_many("stt", [b"a", b"b", b"c"])
    frame = zbroker(broker, "top", "--once")
    assert frame.returncode == 0, frame.stderr
    out = frame.stdout
    assert "zbroker top" in out and "1 done" in out and "4 enqueued" in out
    stt = next(line for line in out.splitlines() if "│ stt" in line)
    assert stt.split("│")[2].strip() == "3"  # ready
    worker_line = next(line for line in out.splitlines() if "│ tts" in line and "gpu=1" in line)
    assert "ready" in worker_line


def test_top_says_when_the_broker_does_not_answer() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zbroker", "top", "--once", "--endpoint", "tcp://127.0.0.1:9"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0 and "broker at tcp://127.0.0.1:9" in result.stdout
