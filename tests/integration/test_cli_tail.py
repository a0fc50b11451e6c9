"""`zbroker tail` against a real broker: lifecycle and user events, text and JSON."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from contextlib import ExitStack

import msgpack
import zmq

from tests.conftest import ROOT, BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from zbroker.client import Publisher


def start_tail(broker: BrokerProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "zbroker", "tail", "--events", broker.events_out, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_tail_json_follows_a_task_through_its_life(broker: BrokerProcess, stack: ExitStack) -> None:
    tail = start_tail(broker, "task.", "--json", "--count", "3")
    try:
        wait_until(lambda: "'task.'" in broker.log().split("subscribers want")[-1], timeout_s=15)
        start_worker(stack, broker, "tts", lambda task: b"ok")
        task_id = open_client(stack, broker).enqueue("tts", b"hello")
        out, err = tail.communicate(timeout=20)
    finally:
        tail.kill()
    assert tail.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in records] == [
        "task.enqueued.tts",
        "task.started.tts",
        "task.done.tts",
    ]
    assert {r["payload"]["id"] for r in records} == {task_id}
    assert all(r["source"] == "zbroker" for r in records)


def test_tail_text_shows_user_events_with_bytes_payloads(broker: BrokerProcess) -> None:
    tail = start_tail(broker, "fs.", "--count", "1")
    try:
        with Publisher(broker.events_in, source="watcher") as pub:
            # Publish until the tail's subscription has reached the bus (slow joiner).
            def delivered() -> bool:
                pub.publish("fs.change", {"path": b"/tmp/a.wav", "raw": b"\xff\x00"})
                return tail.poll() is not None

            wait_until(delivered, timeout_s=15)
        out, err = tail.communicate(timeout=10)
    finally:
        tail.kill()
    assert tail.returncode == 0, err
    (line,) = out.splitlines()
    assert "fs.change" in line and "watcher" in line
    assert '"path":"/tmp/a.wav"' in line and '"raw":"base64:/wA="' in line


def test_tail_refuses_a_bad_endpoint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zbroker", "tail", "--events", "nonsense://x", "--count", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 1 and "zbroker:" in result.stderr


def test_tail_shows_events_no_clock_or_json_can_hold_and_keeps_going(
    broker: BrokerProcess,
) -> None:
    # Given a publisher of an event with a timestamp beyond any clock and a payload
    # holding a msgpack timestamp and a NaN, sent until the tail has printed two
    tail = start_tail(broker, "odd.", "--count", "2")
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.linger = 0
    pub.connect(broker.events_in)
    when = msgpack.Timestamp.from_datetime(datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC))
    odd = {"type": "odd.one", "source": "fuzz", "timestamp": 1e300}
    odd["payload"] = {"at": when, "x": float("nan")}
    try:
        # Publish until the tail's subscription has reached the bus (slow joiner).
        def delivered() -> bool:
            pub.send_multipart([b"odd.one", msgpack.packb(odd, datetime=False)])
            return tail.poll() is not None

        wait_until(delivered, timeout_s=15)
        out, err = tail.communicate(timeout=10)
    finally:
        tail.kill()
        pub.close()
    # Then both are printed, neither stops the tail
    assert tail.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and all("odd.one" in line for line in lines)
    assert lines[0].startswith("1e+300") or lines[0].startswith("10000000")
    assert '"x":"nan"' in lines[0] and "Timestamp(" in lines[0]
