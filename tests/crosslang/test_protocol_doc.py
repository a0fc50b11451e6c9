"""docs/protocol.md, checked by a client and a worker written from it alone.

`DocClient` (ZBC01, §11) and `DocWorker` (ZBW01, §10) below are built on nothing
but pyzmq, msgpack and the document: no zbroker module is imported here. Each
test follows a part of the document against a real `zbroker start` and checks
every frame the broker sends against what the document says it sends. If one
of these tests fails, either the broker or the document is wrong.
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from tests.conftest import ROOT, BrokerProcess, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]
DOC = ROOT / "docs" / "protocol.md"

# §11.1: ZBC01 command bytes (client -> broker), and the two the broker sends.
ENQUEUE, REQUEST, RESULT, STATUS, CANCEL, DEAD = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
REPLY, ERROR = 0x10, 0x11
# §10: ZBW01 command bytes.
READY, TASK, ACK, PROGRESS, DONE, FAIL = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
HEARTBEAT, DISCONNECT, CANCEL_W, TASKS, DONES = 0x07, 0x08, 0x09, 0x0A, 0x0B
# §13: task streams.
CHUNK = 0x0D
STREAM, READ, MORE, CLOSE, CHUNKS = 0x12, 0x13, 0x14, 0x15, 0x12
# §17: recurring tasks.
SCHEDULE, SCHEDULES, UNSCHEDULE, TASKS_CALL = 0x16, 0x17, 0x18, 0x11

# §11.3: the keys of the task map of STATUS, "every key always present".
TASK_MAP_KEYS = {
    "id",
    "service",
    "state",
    "attempt",
    "uncharged",
    "max_attempts",
    "priority",
    "created_at",
    "not_before",
    "expires_at",
    "timeout_s",
    "key",
    "headers",
    "error",
    "finished_at",
    "keep_until",
    "history",
    "owner",
    # §13: the task's stream, its length and size.
    "stream_chunks",
    "stream_bytes",
    # §15: its dependencies.
    "depends_on",
    "blocked_on",
    "run_anyway",
    "input",
    # §16: its placement and flow-control options.
    "require",
    "prefer",
    "affinity",
    "concurrency_key",
}


def pack(meta: dict[str, Any]) -> bytes:
    """The msgpack rules of the document's introduction: str keys, str text, bin bytes."""
    packed: bytes = msgpack.packb(meta, use_bin_type=True)
    return packed


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False)


def socket(ctx: Ctx, endpoint: str) -> zmq.Socket[bytes]:
    """§1: a DEALER, linger 0, bounded queues."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = sock.rcvhwm = 1000
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket[bytes], timeout_s: float) -> list[bytes] | None:
    if not sock.poll(int(timeout_s * 1000)):
        return None
    return sock.recv_multipart()


class DocClient:
    """A ZBC01 client (§11.1): `""  "ZBC01"  command  meta  payload...` on a DEALER."""

    def __init__(self, ctx: Ctx, endpoint: str) -> None:
        self.sock = socket(ctx, endpoint)
        self.rid = 0

    def send(self, command: int, meta: dict[str, Any], *payload: bytes) -> int:
        if "rid" not in meta:
            self.rid += 1
            meta = {**meta, "rid": self.rid}
        self.sock.send_multipart([b"", b"ZBC01", bytes([command]), pack(meta), *payload])
        rid: int = meta["rid"]
        return rid

    def answer(self, rid: int, timeout_s: float = 10.0) -> tuple[int, dict[str, Any], list[bytes]]:
        """The next answer quoting `rid`: (REPLY or ERROR, meta, frames after meta)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            frames = receive(self.sock, left)
            if frames is None:
                break
            # §11.1: every answer is "" "ZBC01" command meta frames...
            assert frames[0] == b"" and frames[1] == b"ZBC01", frames[:2]
            assert len(frames[2]) == 1 and frames[2][0] in (REPLY, ERROR), frames[2]
            meta = unpack(frames[3])
            assert isinstance(meta, dict) and type(meta.get("rid")) is int, meta
            if meta["rid"] == rid:
                return frames[2][0], meta, frames[4:]
        raise AssertionError(f"no answer to rid {rid} within {timeout_s}s")

    def call(
        self, command: int, meta: dict[str, Any], *payload: bytes, timeout_s: float = 10.0
    ) -> tuple[dict[str, Any], list[bytes]]:
        """A call that must be answered with REPLY: (meta without rid, frames)."""
        rid = self.send(command, meta, *payload)
        kind, answer, frames = self.answer(rid, timeout_s)
        assert kind == REPLY, f"expected REPLY, got ERROR {answer}"
        answer.pop("rid")
        return answer, frames

    def error(self, command: int, meta: dict[str, Any], *payload: bytes) -> dict[str, Any]:
        """A call that must be refused: the ERROR meta (§11.4: exactly rid, code, message)."""
        rid = self.send(command, meta, *payload)
        kind, answer, frames = self.answer(rid)
        assert kind == ERROR, f"expected ERROR, got REPLY {answer}"
        assert set(answer) == {"rid", "code", "message"} and frames == []
        assert isinstance(answer["code"], str) and isinstance(answer["message"], str)
        return answer

    def stream_answer(
        self, rid: int, timeout_s: float = 10.0
    ) -> tuple[int, dict[str, Any], list[bytes]]:
        """§13.2: the next answer to stream call `rid`: CHUNKS, REPLY or ERROR."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            frames = receive(self.sock, left)
            if frames is None:
                break
            assert frames[0] == b"" and frames[1] == b"ZBC01", frames[:2]
            assert frames[2][0] in (REPLY, ERROR, CHUNKS), frames[2]
            meta = unpack(frames[3])
            if meta["rid"] == rid:
                return frames[2][0], meta, frames[4:]
        raise AssertionError(f"no answer to stream call {rid} within {timeout_s}s")

    def silent(self, timeout_s: float = 0.3) -> bool:
        return not self.sock.poll(int(timeout_s * 1000))


class DocWorker:
    """A ZBW01 worker (§10): `""  "ZBW01"  command  meta?  frames...` on a DEALER.

    It answers every broker HEARTBEAT with one while it reads (§4), and keeps
    everything else it receives for the test to check."""

    def __init__(self, ctx: Ctx, endpoint: str) -> None:
        self.sock = socket(ctx, endpoint)
        self.heartbeats_seen = 0

    def send(self, command: int, meta: dict[str, Any] | None = None, *frames: bytes) -> None:
        message = [b"", b"ZBW01", bytes([command])]
        if meta is not None:
            message.append(pack(meta))
        self.sock.send_multipart([*message, *frames])

    def ready(self, service: str, credit: int = 1, **extra: Any) -> None:
        self.send(READY, {"service": service, "credit": credit, **extra})

    def recv_raw(self, timeout_s: float = 10.0) -> list[bytes]:
        frames = receive(self.sock, timeout_s)
        assert frames is not None, f"the broker sent this worker nothing within {timeout_s}s"
        assert frames[0] == b"" and frames[1] == b"ZBW01", frames[:2]
        assert len(frames[2]) == 1, frames[2]
        return frames

    def next(self, timeout_s: float = 10.0) -> tuple[int, Any, list[bytes]]:
        """The next message other than HEARTBEAT: (command, meta or None, frames after meta)."""
        deadline = time.monotonic() + timeout_s
        while True:
            frames = self.recv_raw(max(0.0, deadline - time.monotonic()))
            command = frames[2][0]
            if command == HEARTBEAT:
                assert len(frames) == 3, "a broker HEARTBEAT has no meta (§10)"
                self.heartbeats_seen += 1
                self.send(HEARTBEAT)
                continue
            meta = unpack(frames[3]) if len(frames) > 3 else None
            return command, meta, frames[4:]

    def quiet_for(self, seconds: float) -> list[int]:
        """Read (answering heartbeats) for `seconds`; the commands other than HEARTBEAT seen."""
        others = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            frames = receive(self.sock, left)
            if frames is None:
                break
            if frames[2][0] == HEARTBEAT:
                self.heartbeats_seen += 1
                self.send(HEARTBEAT)
            else:
                others.append(frames[2][0])
        return others


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    # Heartbeats every second, so a test's worker stays alive between its reads.
    return broker_factory("--retry-base", "0.05", heartbeat_interval=1.0)


def test_worked_example_of_a_task_lifecycle(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    """§11.6, line by line."""
    w = DocWorker(zmq_ctx, broker.endpoint)
    c = DocClient(zmq_ctx, broker.endpoint)
    # W -> broker   READY {service: "tts", credit: 2}
    w.ready("tts", 2)
    # broker -> W   HEARTBEAT (the greeting): exactly three frames
    assert w.recv_raw() == [b"", b"ZBW01", bytes([HEARTBEAT])]
    # C -> broker   ENQUEUE {rid: 1, service: "tts", key: "msg-42", timeout_s: 60}  "hello"
    rid = c.send(ENQUEUE, {"rid": 1, "service": "tts", "key": "msg-42", "timeout_s": 60}, b"hello")
    # broker -> C   REPLY {rid: 1, ids: [id]}, no frames
    kind, reply, frames = c.answer(rid)
    assert (kind, frames) == (REPLY, [])
    assert set(reply) == {"rid", "ids"} and reply["rid"] == 1
    (task_id,) = reply["ids"]
    assert isinstance(task_id, str) and task_id
    # broker -> W   TASK {id, attempt: 1, service: "tts", timeout_s: 60.0}  "hello"
    command, meta, payload = w.next()
    assert command == TASK
    assert meta == {"id": task_id, "attempt": 1, "service": "tts", "timeout_s": 60.0}
    assert type(meta["attempt"]) is int and type(meta["timeout_s"]) is float
    assert payload == [b"hello"]
    # W -> broker   ACK {tasks: [[id, 1]]}; PROGRESS {id, attempt: 1} "50%" (nothing answers)
    w.send(ACK, {"tasks": [[task_id, 1]]})
    w.send(PROGRESS, {"id": task_id, "attempt": 1}, b"50%")

    # C -> broker   STATUS {rid: 2, id}: inflight, attempt 1, the progress in its history.
    # (W's PROGRESS and C's STATUS travel on different connections, which the broker
    # does not order between them (§1): ask until the progress is there.)
    def status_after_progress() -> dict[str, Any]:
        status, frames = c.call(STATUS, {"id": task_id})
        assert frames == [] and set(status) == {"task"}
        task: dict[str, Any] = status["task"]
        return task

    wait_until(lambda: len(status_after_progress()["history"]) == 3)
    task = status_after_progress()
    assert set(task) == TASK_MAP_KEYS
    assert task["id"] == task_id and task["service"] == "tts"
    assert (task["state"], task["attempt"], task["max_attempts"]) == ("inflight", 1, 3)
    assert task["uncharged"] == 0
    assert task["priority"] == 0 and task["key"] == "msg-42" and task["headers"] == {}
    assert task["timeout_s"] == 60.0 and task["not_before"] == 0
    assert task["expires_at"] is None and task["error"] is None
    assert task["finished_at"] is None and task["keep_until"] is None
    assert isinstance(task["created_at"], float)
    enqueued, attempt, progress = task["history"]
    assert enqueued == ["enqueued", task["created_at"]]
    assert attempt[0] == "attempt" and attempt[2] == 1
    assert isinstance(attempt[3], str) and bytes.fromhex(attempt[3])  # W's routing id in hex
    assert progress[0] == "progress" and progress[2:] == [1, "50%"]
    # W -> broker   DONE {id, attempt: 1}  <audio>
    audio = bytes(range(256)) * 4
    w.send(DONE, {"id": task_id, "attempt": 1}, audio)
    # C2 -> broker  RESULT {rid: 7, id, wait_s: 30}, from a new connection
    c2 = DocClient(zmq_ctx, broker.endpoint)
    kind, result, frames = c2.answer(c2.send(RESULT, {"rid": 7, "id": task_id, "wait_s": 30}))
    # broker -> C2  REPLY {rid: 7, id, state: "done"}  <audio>
    assert kind == REPLY
    assert result == {"rid": 7, "id": task_id, "state": "done"}
    assert frames == [audio]
    # The record now says done, kept --retention (3600 s) after it finished
    final = c.call(STATUS, {"id": task_id})[0]["task"]
    assert final["state"] == "done" and final["error"] is None
    assert final["keep_until"] == pytest.approx(final["finished_at"] + 3600)
    assert final["history"][-1][0] == "done" and final["history"][-1][2:] == [1]
    # broker -> W   HEARTBEAT every interval; nothing answered the ACK, PROGRESS or DONE
    assert w.quiet_for(1.5) == []
    assert w.heartbeats_seen >= 1


def test_the_byte_dumps_in_the_document_are_the_frames_a_worker_sends() -> None:
    """§11.6 shows three metadata frames byte by byte: they must be valid msgpack of the
    maps the example shows, and the READY one exactly what DocWorker sends."""
    text = DOC.read_text()
    dumps: dict[str, bytes] = {}
    for name, body in re.findall(r"^(\w+) meta \(\d+ bytes\)\n((?:  [0-9a-f].*\n)+)", text, re.M):
        # Each line: two spaces, hex bytes, two or more spaces, what they mean.
        hex_columns = [line.strip().split("  ")[0] for line in body.splitlines()]
        dumps[name] = bytes.fromhex(" ".join(hex_columns))
    assert set(dumps) == {"READY", "TASK", "ACK"}
    assert unpack(dumps["READY"]) == {"service": "tts", "credit": 2}
    assert dumps["READY"] == pack({"service": "tts", "credit": 2})
    assert unpack(dumps["TASK"]) == {"id": "t2a", "attempt": 1, "service": "tts", "timeout_s": 60.0}
    assert unpack(dumps["ACK"]) == {"tasks": [["t2a", 1]]}
    for name, dump in dumps.items():
        assert f"{name} meta ({len(dump)} bytes)" in text


def test_worked_example_of_a_task_stream(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    """§13.3, frame by frame; then a reader after the end (READ), and CLOSE (§13.2)."""
    w = DocWorker(zmq_ctx, broker.endpoint)
    w.ready("llm")
    assert w.quiet_for(0.3) == []
    c = DocClient(zmq_ctx, broker.endpoint)
    rid = c.send(STREAM, {"service": "llm", "window": 4}, b"hi")
    kind, accepted, frames = c.stream_answer(rid)
    assert (kind, frames) == (REPLY, []) and set(accepted) == {"rid", "ids"}
    (task_id,) = accepted["ids"]
    command, meta, payload = w.next()
    assert command == TASK and meta["id"] == task_id and payload == [b"hi"]
    w.send(CHUNK, {"id": task_id, "attempt": 1}, b"Hel", b"lo")
    kind, meta, frames = c.stream_answer(rid)
    assert kind == CHUNKS and frames == [b"Hel", b"lo"]
    assert meta == {"rid": rid, "id": task_id, "offset": 0, "attempt": 1}
    w.send(CHUNK, {"id": task_id, "attempt": 1}, b" there")
    kind, meta, frames = c.stream_answer(rid)
    assert (kind, meta["offset"], frames) == (CHUNKS, 2, [b" there"])
    c.send(MORE, {"rid": rid, "credit": 3})
    w.send(DONE, {"id": task_id, "attempt": 1}, b"Hello there")
    kind, final, frames = c.stream_answer(rid)
    assert kind == REPLY and frames == [b"Hello there"]
    assert final == {"rid": rid, "id": task_id, "state": "done", "next": 3}
    # A reader that lost its place reads from the offset after the last chunk it had
    again = c.send(READ, {"id": task_id, "offset": 3})
    kind, final, frames = c.stream_answer(again)
    assert (kind, final["next"], frames) == (REPLY, 3, [b"Hello there"])
    again = c.send(READ, {"id": task_id, "offset": 1})
    kind, meta, frames = c.stream_answer(again)
    assert (kind, meta["offset"], frames) == (CHUNKS, 1, [b"lo", b" there"])
    assert c.stream_answer(again)[1]["state"] == "done"
    # CLOSE of a STREAM whose task runs: no more answers, and the task is cancelled
    rid = c.send(STREAM, {"service": "llm"}, b"long")
    (task2,) = c.stream_answer(rid)[1]["ids"]
    command, meta, _ = w.next()
    assert command == TASK and meta["id"] == task2
    c.send(CLOSE, {"rid": rid})
    command, meta, _ = w.next()
    assert command == CANCEL_W and meta["id"] == task2
    assert c.call(STATUS, {"id": task2})[0]["task"]["state"] == "cancelled"


def test_request_is_answered_twice_and_a_resend_finds_the_task(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    """§11.3: REQUEST gets its acceptance, then its result, on the same rid."""
    w = DocWorker(zmq_ctx, broker.endpoint)
    w.ready("upper")
    c = DocClient(zmq_ctx, broker.endpoint)
    rid = c.send(REQUEST, {"service": "upper", "key": "req-1", "wait_s": 20}, b"abc", b"")
    kind, accepted, frames = c.answer(rid)
    assert (kind, frames) == (REPLY, []) and set(accepted) == {"rid", "ids"}
    (task_id,) = accepted["ids"]
    command, meta, payload = w.next()
    assert command == TASK and meta["id"] == task_id and payload == [b"abc", b""]
    w.send(ACK, {"tasks": [[task_id, 1]]})
    w.send(DONE, {"id": task_id, "attempt": 1}, b"ABC", b"")
    kind, final, frames = c.answer(rid)
    assert kind == REPLY and final == {"rid": rid, "id": task_id, "state": "done"}
    assert frames == [b"ABC", b""]
    # The same REQUEST resent (same key): the stored task, and its result at once
    again = c.send(REQUEST, {"service": "upper", "key": "req-1", "wait_s": 20}, b"abc", b"")
    assert c.answer(again)[1] == {"rid": again, "ids": [task_id], "existing": [0]}
    kind, final, frames = c.answer(again)
    assert final == {"rid": again, "id": task_id, "state": "done"} and frames == [b"ABC", b""]
    # RESULT of a task still waiting, without wait_s, answers at once with its state
    waiting = c.call(ENQUEUE, {"service": "nobody-serves-this"}, b"x")[0]["ids"][0]
    assert c.call(RESULT, {"id": waiting}) == ({"id": waiting, "state": "ready"}, [])


def test_failure_retry_fencing_and_dead_letters(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    """§11.6 "Failure, then success", §10 fencing, §11.5 dead letters."""
    w = DocWorker(zmq_ctx, broker.endpoint)
    w.ready("gpu")
    c = DocClient(zmq_ctx, broker.endpoint)
    (task_id,) = c.call(ENQUEUE, {"service": "gpu"}, b"job")[0]["ids"]
    command, meta, _ = w.next()
    assert command == TASK and meta["attempt"] == 1
    w.send(ACK, {"tasks": [[task_id, 1]]})
    # FAIL with a delay: the task is delayed, its error and history say why
    w.send(FAIL, {"id": task_id, "attempt": 1, "reason": "gpu busy", "delay_s": 1.0})

    def status() -> dict[str, Any]:
        task: dict[str, Any] = c.call(STATUS, {"id": task_id})[0]["task"]
        return task

    wait_until(lambda: status()["state"] != "inflight")
    task = status()
    assert task["state"] == "delayed" and task["error"] == "gpu busy"
    assert task["not_before"] == pytest.approx(task["history"][-1][1] + 1.0, abs=0.01)
    assert task["history"][-1][0] == "retry" and task["history"][-1][2:] == ["gpu busy", 1.0]
    # RESULT now: its state and the error, no frames
    assert c.call(RESULT, {"id": task_id}) == (
        {"id": task_id, "state": "delayed", "error": "gpu busy"},
        [],
    )
    # Then attempt 2 goes out; a DONE still quoting attempt 1 is refused
    command, meta, payload = w.next()
    assert command == TASK and (meta["id"], meta["attempt"]) == (task_id, 2)
    assert payload == [b"job"]
    w.send(ACK, {"tasks": [[task_id, 2]]})
    w.send(DONE, {"id": task_id, "attempt": 1}, b"stale")
    w.send(DONE, {"id": task_id, "attempt": 2}, b"fresh")
    assert c.call(RESULT, {"id": task_id, "wait_s": 10}) == (
        {"id": task_id, "state": "done"},
        [b"fresh"],
    )
    # A task failing its last allowed attempt is dead; RESULT gives the error
    (doomed,) = c.call(ENQUEUE, {"service": "gpu", "max_attempts": 1}, b"x")[0]["ids"]
    w.next()
    w.send(FAIL, {"id": doomed, "attempt": 1, "reason": "out of memory"})
    dead = {"id": doomed, "state": "dead", "error": "out of memory"}
    assert c.call(RESULT, {"id": doomed, "wait_s": 10}) == (dead, [])
    # FAIL with retry: false is dead at once, whatever max_attempts says
    (hopeless,) = c.call(ENQUEUE, {"service": "gpu", "max_attempts": 5}, b"y")[0]["ids"]
    w.next()
    w.send(FAIL, {"id": hopeless, "attempt": 1, "reason": "bad input", "retry": False})
    assert c.call(RESULT, {"id": hopeless, "wait_s": 10})[0]["state"] == "dead"
    # DEAD lists both, in enqueue order
    page = c.call(DEAD, {"service": "gpu"})[0]
    assert [t["id"] for t in page["tasks"]] == [doomed, hopeless] and page["next"] is None
    assert set(page["tasks"][0]) == {"id", "seq", "attempt", "error", "created_at", "finished_at"}


def test_errors_are_documented_codes(
    broker_factory: Callable[..., BrokerProcess], zmq_ctx: Ctx
) -> None:
    """§11.4, and §7 for a call that cannot be answered."""
    broker = broker_factory("--max-tasks", "1", "--max-message-bytes", "4096")
    c = DocClient(zmq_ctx, broker.endpoint)
    assert c.error(ENQUEUE, {"payload": "no service"})["code"] == "bad_request"
    assert c.error(ENQUEUE, {"service": "mmi.service"})["code"] == "bad_request"
    assert c.error(ENQUEUE, {"service": "s", "priority": 1000})["code"] == "bad_request"
    assert c.error(ENQUEUE, {"service": "s", "priority": 1.0})["code"] == "bad_request"
    assert c.error(ENQUEUE, {"service": "s", "key": ""})["code"] == "bad_request"
    assert c.error(ENQUEUE, {"service": "s", "delay_s": 1, "not_before": 2})["code"] == (
        "bad_request"
    )
    assert c.error(STATUS, {"id": "t1"}, b"payload")["code"] == "bad_request"
    assert c.error(0x44, {})["code"] == "bad_request"
    assert c.error(STATUS, {"id": "no-such-task"})["code"] == "not_found"
    assert c.error(RESULT, {"id": "no-such-task", "wait_s": 1})["code"] == "not_found"
    assert c.error(ENQUEUE, {"service": "s"}, b"x" * 5000)["code"] == "too_large"
    (first,) = c.call(ENQUEUE, {"service": "s"}, b"one")[0]["ids"]
    assert c.error(ENQUEUE, {"service": "s"}, b"two")["code"] == "queue_full"
    # ...but a resend of the stored task (same key) is never refused
    (keyed,) = c.call(ENQUEUE, {"service": "k", "key": "same"}, b"k")[0]["ids"]
    assert c.call(ENQUEUE, {"service": "k", "key": "same"}, b"k")[0] == {
        "ids": [keyed],
        "existing": [0],
    }
    assert c.call(CANCEL, {"id": first})[0] == {"id": first, "state": "cancelled", "was": "ready"}
    assert c.error(CANCEL, {"id": first})["code"] == "conflict"
    # A call without an integer rid cannot be answered: dropped
    c.sock.send_multipart([b"", b"ZBC01", bytes([STATUS]), pack({"id": first})])
    c.sock.send_multipart([b"", b"ZBC01", bytes([STATUS]), pack({"rid": "1", "id": first})])
    assert c.silent()


def test_worker_rules_greeting_disconnect_cancel(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    """§10 and §4: unknown workers, a second READY, CANCEL, MDP requests as tasks."""
    # A HEARTBEAT from a worker the broker does not know: DISCONNECT {reason}
    stranger = DocWorker(zmq_ctx, broker.endpoint)
    stranger.send(HEARTBEAT)
    command, meta, _ = stranger.next()
    assert command == DISCONNECT and isinstance(meta["reason"], str)
    # A second READY is a protocol violation: DISCONNECT
    twice = DocWorker(zmq_ctx, broker.endpoint)
    twice.ready("svc")
    assert twice.recv_raw()[2][0] == HEARTBEAT
    twice.ready("svc")
    assert twice.next()[0] == DISCONNECT
    # CANCEL of a running task reaches its worker as CANCEL {id, attempt}
    w = DocWorker(zmq_ctx, broker.endpoint)
    w.ready("long")
    c = DocClient(zmq_ctx, broker.endpoint)
    (task_id,) = c.call(ENQUEUE, {"service": "long"}, b"work")[0]["ids"]
    assert w.next()[0] == TASK
    w.send(ACK, {"tasks": [[task_id, 1]]})
    assert c.call(CANCEL, {"id": task_id})[0] == {
        "id": task_id,
        "state": "cancelled",
        "was": "inflight",
    }
    assert w.next()[:2] == (CANCEL_W, {"id": task_id, "attempt": 1})
    w.send(DONE, {"id": task_id, "attempt": 1}, b"too late")  # refused (fencing)
    assert c.call(RESULT, {"id": task_id})[0]["state"] == "cancelled"
    # An MDP client's request reaches a ZBW01 worker as a TASK (§10's example)
    mdp = socket(zmq_ctx, broker.endpoint)
    mdp.send_multipart([b"", b"MDPC01", b"long", b"hello"])
    command, meta, payload = w.next()
    assert command == TASK and payload == [b"hello"]
    assert set(meta) == {"id", "attempt", "service"} and meta["service"] == "long"
    w.send(ACK, {"tasks": [[meta["id"], 1]]})
    w.send(DONE, {"id": meta["id"], "attempt": 1}, b"HELLO")
    assert receive(mdp, 10) == [b"", b"MDPC01", b"long", b"HELLO"]
    # An MDP request's task id is not a durable task
    assert c.error(STATUS, {"id": meta["id"]})["code"] == "not_found"


def test_an_unacknowledged_task_is_cancelled_and_delivered_again(
    broker_factory: Callable[..., BrokerProcess], zmq_ctx: Ctx
) -> None:
    """§10 ACK: no ACK within --ack-timeout: CANCEL, then the task again as attempt + 1."""
    broker = broker_factory("--ack-timeout", "0.3", heartbeat_interval=1.0)
    w = DocWorker(zmq_ctx, broker.endpoint)
    w.ready("acks")
    c = DocClient(zmq_ctx, broker.endpoint)
    (task_id,) = c.call(ENQUEUE, {"service": "acks"}, b"p")[0]["ids"]
    assert w.next()[:2] == (TASK, {"id": task_id, "attempt": 1, "service": "acks"})
    # (no ACK)
    assert w.next()[:2] == (CANCEL_W, {"id": task_id, "attempt": 1})
    command, meta, payload = w.next()
    assert command == TASK and meta["attempt"] == 2 and payload == [b"p"]
    w.send(ACK, {"tasks": [[task_id, 2]]})
    w.send(DONE, {"id": task_id, "attempt": 2}, b"ok")
    assert c.call(RESULT, {"id": task_id, "wait_s": 5}) == (
        {"id": task_id, "state": "done"},
        [b"ok"],
    )
    history = c.call(STATUS, {"id": task_id})[0]["task"]["history"]
    assert ["requeued", "not acknowledged in time"] in [[e[0], *e[2:]] for e in history]


def test_a_silent_worker_is_dead_its_task_redelivered_and_it_is_told_later(
    broker_factory: Callable[..., BrokerProcess], zmq_ctx: Ctx
) -> None:
    """§4: silent for heartbeat_liveness intervals = dead, busy or not; its tasks go
    to another worker; what it sends afterwards is answered with DISCONNECT."""
    broker = broker_factory(heartbeat_interval=0.2)
    silent = DocWorker(zmq_ctx, broker.endpoint)
    silent.ready("quiet")
    assert silent.recv_raw()[2][0] == HEARTBEAT
    c = DocClient(zmq_ctx, broker.endpoint)
    (task_id,) = c.call(ENQUEUE, {"service": "quiet"}, b"p")[0]["ids"]
    frames = silent.recv_raw()
    assert frames[2][0] == TASK
    silent.send(ACK, {"tasks": [[task_id, 1]]})
    # Then it says nothing more: after 3 x 0.2 s the broker gives the task to another
    rescuer = DocWorker(zmq_ctx, broker.endpoint)
    rescuer.ready("quiet")
    command, meta, _ = rescuer.next()
    assert command == TASK and (meta["id"], meta["attempt"]) == (task_id, 2)
    # And the silent worker's late DONE is refused with DISCONNECT
    silent.send(DONE, {"id": task_id, "attempt": 1}, b"late")
    wait_until(lambda: silent.recv_raw()[2][0] == DISCONNECT)
    rescuer.send(DONE, {"id": task_id, "attempt": 2}, b"on time")
    assert c.call(RESULT, {"id": task_id, "wait_s": 5})[1] == [b"on time"]


def test_batches_tasks_and_dones(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    """§10 Batching and §11.2 `counts`: one ENQUEUE of three tasks, one TASKS to a
    worker that said batch: true, one DONES back."""
    c = DocClient(zmq_ctx, broker.endpoint)
    payloads = [[b"a"], [], [b"c1", b"c2"]]
    ids = c.call(
        ENQUEUE,
        {"service": "bulk", "counts": [1, 0, 2], "keys": ["k1", None, "k3"]},
        *[f for p in payloads for f in p],
    )[0]["ids"]
    assert len(ids) == 3
    w = DocWorker(zmq_ctx, broker.endpoint)
    w.ready("bulk", 3, batch=True)
    command, meta, frames = w.next()
    assert command == TASKS
    entries = meta["tasks"]
    assert [(e["id"], e["attempt"], e["service"], e["n"]) for e in entries] == [
        (task_id, 1, "bulk", len(p)) for task_id, p in zip(ids, payloads, strict=True)
    ]
    assert frames == [b"a", b"c1", b"c2"]
    w.send(ACK, {"tasks": [[task_id, 1] for task_id in ids]})
    results = [[b"A"], [b""], []]
    w.send(
        DONES,
        {"tasks": [[task_id, 1, len(r)] for task_id, r in zip(ids, results, strict=True)]},
        *[f for r in results for f in r],
    )
    for task_id, result in zip(ids, results, strict=True):
        assert c.call(RESULT, {"id": task_id, "wait_s": 5}) == (
            {"id": task_id, "state": "done"},
            result,
        )


def test_lifecycle_events_follow_a_task(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    """§6 framing and §6.1: the broker's own events for one task, in the order of its life."""
    sub = zmq_ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(broker.events_out)
    sub.subscribe(b"task.")
    c = DocClient(zmq_ctx, broker.endpoint)

    # Events exist only once the subscription has reached the broker: probe until one comes.
    def subscribed() -> bool:
        c.call(ENQUEUE, {"service": "probe"})
        return bool(sub.poll(50))

    wait_until(subscribed)
    w = DocWorker(zmq_ctx, broker.endpoint)
    w.ready("evt")
    headers = {"correlation_id": "flow-1"}
    (task_id,) = c.call(ENQUEUE, {"service": "evt", "headers": headers}, b"p")[0]["ids"]
    w.next()
    w.send(ACK, {"tasks": [[task_id, 1]]})
    w.send(PROGRESS, {"id": task_id, "attempt": 1}, b"half")
    w.send(DONE, {"id": task_id, "attempt": 1}, b"r")
    events: list[tuple[bytes, dict[str, Any]]] = []
    while not events or events[-1][0] != b"task.done.evt":
        frames = receive(sub, 10)
        assert frames is not None, f"events so far: {events}"
        assert len(frames) == 2  # §6: topic, envelope
        if frames[0].startswith(b"task.") and frames[0].endswith(b".evt"):
            events.append((frames[0], unpack(frames[1])))
    topics = [t for t, _ in events]
    assert topics == [
        b"task.enqueued.evt",
        b"task.started.evt",
        b"task.progress.evt",
        b"task.done.evt",
    ]
    for topic, envelope in events:
        assert envelope["type"] == topic.decode() and envelope["source"] == "zbroker"
        assert isinstance(envelope["timestamp"], float)
    # One event each: a batch in rows of one for the per-task events, else `payload`.
    fields = {
        b"task.enqueued.evt": ["id", "priority", "not_before", "headers"],
        b"task.started.evt": ["id", "attempt", "worker"],
        b"task.done.evt": ["id", "attempt", "headers"],
    }
    for topic, envelope in events:
        if topic in fields:
            assert envelope["fields"] == fields[topic] and len(envelope["rows"]) == 1
    enqueued, started, progress, done = (
        e["payload"] if "payload" in e else dict(zip(e["fields"], e["rows"][0], strict=True))
        for _, e in events
    )
    assert enqueued == {"id": task_id, "priority": 0, "not_before": None, "headers": headers}
    assert set(started) == {"id", "attempt", "worker"} and started["attempt"] == 1
    assert progress == {"id": task_id, "attempt": 1, "data": [b"half"]}
    assert done == {"id": task_id, "attempt": 1, "headers": headers}


def test_an_event_crosses_the_proxy_unchanged(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    """§6: two frames, topic and msgpack envelope; the proxy forwards them as they are."""
    sub = zmq_ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(broker.events_out)
    sub.subscribe(b"fs.")
    pub = zmq_ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.connect(broker.events_in)
    envelope = pack(
        {
            "type": "fs.change",
            "source": "watcher",
            "payload": {"path": "/tmp/a.wav"},
            "timestamp": 1700000000.25,
            "correlation_id": "job-7",
        }
    )

    def delivered() -> bool:
        pub.send_multipart([b"fs.change", envelope])
        return bool(sub.poll(50))

    wait_until(delivered)
    assert sub.recv_multipart() == [b"fs.change", envelope]


def test_a_schedule_fires_tasks_keyed_by_their_instants(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    """§17: SCHEDULE, its firings (ordinary tasks, keyed schedule:<name>:<instant>),
    SCHEDULES, UNSCHEDULE, and what is refused."""
    c = DocClient(zmq_ctx, broker.endpoint)
    answer, _ = c.call(SCHEDULE, {"name": "tick", "service": "doc15", "every_s": 1}, b"p")
    view = answer["schedule"]
    assert answer["was"] == "new"
    assert set(view) == {
        "name", "service", "every_s", "cron", "tz", "priority", "ttl_s", "max_attempts",
        "timeout_s", "headers", "payload_bytes", "created_at", "next_at", "last_at",
        "last_id", "fired", "error",
    }  # fmt: skip
    assert view["next_at"] == int(view["created_at"]) + 1 and view["payload_bytes"] == 1

    # Each firing is a ready task of the service, keyed by the instant it is for
    def firings() -> list[dict[str, Any]]:
        page, _ = c.call(TASKS_CALL, {"service": "doc15", "state": "ready"})
        tasks: list[dict[str, Any]] = page["tasks"]
        return tasks

    wait_until(lambda: len(firings()) >= 2, timeout_s=10)
    first = sorted(t["key"] for t in firings())[0]
    instant = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(view["next_at"]))
    assert first == f"schedule:tick:{instant}"
    (listed,) = c.call(SCHEDULES, {})[0]["schedules"]
    assert listed["fired"] >= 2 and listed["next_at"] == listed["last_at"] + 1
    # The same definition again changes nothing
    again, _ = c.call(SCHEDULE, {"name": "tick", "service": "doc15", "every_s": 1}, b"p")
    assert again["was"] == "unchanged" and again["schedule"]["next_at"] > view["next_at"]
    # What is refused, and how
    for meta in (
        {"name": "x", "service": "doc15"},
        {"name": "x", "service": "doc15", "cron": "61 * * * *"},
        {"name": "x", "service": "doc15", "cron": "0 * * * *", "tz": "Mars/Olympus"},
        {"name": "x", "service": "doc15", "every_s": 5, "key": "k"},
    ):
        assert c.error(SCHEDULE, meta)["code"] == "bad_request"
    assert c.call(UNSCHEDULE, {"name": "tick"})[0] == {"name": "tick", "removed": True}
    assert c.error(UNSCHEDULE, {"name": "tick"})["code"] == "not_found"
    assert c.call(SCHEDULES, {})[0] == {"schedules": []}


def test_the_document_names_every_section_it_refers_to() -> None:
    """Cross-references (§n, §n.m) point at sections that exist."""
    text = DOC.read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, re.M))
    referred = set(re.findall(r"§(\d+(?:\.\d+)?)", text))
    assert referred <= sections, referred - sections


def test_this_file_uses_nothing_but_the_document() -> None:
    tree = ast.parse(Path(__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in imported if name.split(".")[0] == "zbroker"]
