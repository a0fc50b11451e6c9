"""A real `zbroker start` process and 18/MDP peers (MDPC02, MDPW02) on raw pyzmq frames.

The MDP peers are written frame by frame from RFC 18/MDP (no empty frame, a
command byte for clients and workers alike); ZBW01 and ZBC01 peers use the
protocol codecs only to build their metadata. docs/protocol.md §14.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from zbroker import Client
from zbroker.protocol import ext, zbc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]

MDPC02, MDPW02 = b"MDPC02", b"MDPW02"
# Client commands, then worker commands (RFC 18/MDP).
C_REQUEST, C_PARTIAL, C_FINAL = b"\x01", b"\x02", b"\x03"
W_READY, W_REQUEST, W_PARTIAL, W_FINAL = b"\x01", b"\x02", b"\x03", b"\x04"
W_HEARTBEAT, W_DISCONNECT = b"\x05", b"\x06"


def dealer(ctx: Ctx, broker: BrokerProcess) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    return sock


def recv(sock: zmq.Socket[bytes], timeout_s: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), f"nothing received within {timeout_s}s"
    return sock.recv_multipart()


def mdpw02_worker(ctx: Ctx, broker: BrokerProcess, service: bytes) -> zmq.Socket[bytes]:
    """An MDPW02 worker, registered: the broker's greeting has arrived."""
    sock = dealer(ctx, broker)
    sock.send_multipart([MDPW02, W_READY, service])
    assert recv(sock) == [MDPW02, W_HEARTBEAT]
    return sock


def next_request(worker: zmq.Socket[bytes]) -> list[bytes]:
    """The next REQUEST to an MDPW02 worker, answering heartbeats meanwhile."""
    while True:
        frames = recv(worker)
        if frames == [MDPW02, W_HEARTBEAT]:
            worker.send_multipart([MDPW02, W_HEARTBEAT])
            continue
        assert frames[:2] == [MDPW02, W_REQUEST] and frames[3] == b"", frames
        return frames


def mdpc02_answers(client: zmq.Socket[bytes]) -> list[list[bytes]]:
    """Everything an MDPC02 client receives for one request: PARTIALs, then the FINAL."""
    answers = []
    while True:
        frames = recv(client)
        assert frames[0] == MDPC02 and frames[1] in (C_PARTIAL, C_FINAL), frames
        answers.append(frames)
        if frames[1] == C_FINAL:
            return answers


def stats(ctx: Ctx, broker: BrokerProcess) -> dict[str, Any]:
    """The broker's STATS view (§11.3)."""
    admin = dealer(ctx, broker)
    admin.send_multipart(zbc.call(zbc.STATS, 1))
    answer = zbc.decode_answer(recv(admin))
    admin.close()
    assert answer.ok, answer.meta
    return answer.meta


def test_mdpc02_client_and_mdpw02_worker_partials_then_final(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    worker = mdpw02_worker(zmq_ctx, broker, b"llm")
    client = dealer(zmq_ctx, broker)
    # The client's REQUEST has no empty frame: header, command, service, body
    client.send_multipart([MDPC02, C_REQUEST, b"llm", b"tell", b"me"])
    request = next_request(worker)
    assert request[4:] == [b"tell", b"me"]
    address = request[2]
    for part in (b"once", b" upon", b" a time"):
        worker.send_multipart([MDPW02, W_PARTIAL, address, b"", part])
    worker.send_multipart([MDPW02, W_PARTIAL, address, b"", b"two", b"frames"])
    worker.send_multipart([MDPW02, W_FINAL, address, b"", b"the end"])
    assert mdpc02_answers(client) == [
        [MDPC02, C_PARTIAL, b"llm", b"once"],
        [MDPC02, C_PARTIAL, b"llm", b" upon"],
        [MDPC02, C_PARTIAL, b"llm", b" a time"],
        [MDPC02, C_PARTIAL, b"llm", b"two", b"frames"],
        [MDPC02, C_FINAL, b"llm", b"the end"],
    ]
    assert not client.poll(300)  # nothing after the FINAL
    # 8/MMI answers an MDPC02 client with a FINAL
    client.send_multipart([MDPC02, C_REQUEST, b"mmi.service", b"llm"])
    assert recv(client) == [MDPC02, C_FINAL, b"mmi.service", b"200"]


def test_mdpc02_client_and_zbw01_worker_chunks_then_done(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    worker = dealer(zmq_ctx, broker)
    worker.send_multipart(ext.ready("llm", 1))
    assert recv(worker)[2] == ext.HEARTBEAT  # the greeting
    client = dealer(zmq_ctx, broker)
    client.send_multipart([MDPC02, C_REQUEST, b"llm", b"prompt"])
    task = recv(worker)
    assert task[2] == ext.TASK and task[4:] == [b"prompt"]
    meta = ext.unpack_meta(task[3])
    worker.send_multipart(ext.ack([(meta["id"], meta["attempt"])]))
    worker.send_multipart(ext.chunk(meta["id"], meta["attempt"], [b"Hel", b"lo"]))
    # Each chunk is a PARTIAL at once, before the task is done
    assert recv(client) == [MDPC02, C_PARTIAL, b"llm", b"Hel"]
    assert recv(client) == [MDPC02, C_PARTIAL, b"llm", b"lo"]
    worker.send_multipart(ext.chunk(meta["id"], meta["attempt"], [b"!"]))
    worker.send_multipart(ext.done(meta["id"], meta["attempt"], [b"Hello!"]))
    assert mdpc02_answers(client) == [
        [MDPC02, C_PARTIAL, b"llm", b"!"],
        [MDPC02, C_FINAL, b"llm", b"Hello!"],
    ]


def test_mdpc02_client_and_mdpw01_worker_get_one_final(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    worker = dealer(zmq_ctx, broker)
    worker.send_multipart([b"", b"MDPW01", b"\x01", b"echo"])
    assert recv(worker) == [b"", b"MDPW01", b"\x04"]
    client = dealer(zmq_ctx, broker)
    client.send_multipart([MDPC02, C_REQUEST, b"echo", b"hi"])
    request = recv(worker)
    assert request[:3] == [b"", b"MDPW01", b"\x02"] and request[5:] == [b"hi"]
    worker.send_multipart([b"", b"MDPW01", b"\x03", request[3], b"", b"HI"])
    assert mdpc02_answers(client) == [[MDPC02, C_FINAL, b"echo", b"HI"]]
    assert not client.poll(300)


def test_mdpc01_client_and_mdpw02_worker_reply_is_the_final(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    worker = mdpw02_worker(zmq_ctx, broker, b"llm")
    client = dealer(zmq_ctx, broker)
    client.send_multipart([b"", b"MDPC01", b"llm", b"q"])
    address = next_request(worker)[2]
    worker.send_multipart([MDPW02, W_PARTIAL, address, b"", b"p1", b"p2"])
    worker.send_multipart([MDPW02, W_PARTIAL, address, b"", b"p3"])
    worker.send_multipart([MDPW02, W_FINAL, address, b"", b"all", b"of it"])
    # 7/MDP has one reply: the FINAL's body; the PARTIALs are dropped and counted
    assert recv(client) == [b"", b"MDPC01", b"llm", b"all", b"of it"]
    assert not client.poll(300)
    counters = stats(zmq_ctx, broker)["stats"]
    assert counters["chunks_dropped"] == 3 and counters["replies"] == 1


def test_zbc01_stream_served_by_mdpw02_worker(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    client = dealer(zmq_ctx, broker)
    client.send_multipart(zbc.stream(1, "llm", [b"prompt"]))
    accepted = zbc.decode_answer(recv(client))
    assert accepted.ok and accepted.rid == 1
    task_id = accepted.meta["ids"][0]
    worker = mdpw02_worker(zmq_ctx, broker, b"llm")
    request = next_request(worker)
    assert request[4:] == [b"prompt"]
    address = request[2]
    worker.send_multipart([MDPW02, W_PARTIAL, address, b"", b"Hel", b"lo"])
    worker.send_multipart([MDPW02, W_PARTIAL, address, b"", b" there"])
    got: list[bytes] = []
    while len(got) < 3:
        answer = zbc.decode_answer(recv(client))
        assert answer.chunks and answer.rid == 1, answer
        assert answer.meta["offset"] == len(got) and answer.meta["attempt"] == 1
        got.extend(answer.frames)
    assert got == [b"Hel", b"lo", b" there"]
    worker.send_multipart([MDPW02, W_FINAL, address, b"", b"Hello there"])
    end = zbc.decode_answer(recv(client))
    assert end.ok and not end.chunks and end.rid == 1
    assert end.meta["state"] == "done" and end.meta["next"] == 3
    assert end.frames == (b"Hello there",)
    # READ after the end, from offset 0: every chunk, then the result
    client.send_multipart(zbc.read(2, task_id, 0))
    read: list[bytes] = []
    while True:
        answer = zbc.decode_answer(recv(client))
        assert answer.rid == 2
        if not answer.chunks:
            break
        read.extend(answer.frames)
    assert read == [b"Hel", b"lo", b" there"]
    assert answer.meta["state"] == "done" and answer.frames == (b"Hello there",)


def test_malformed_18_mdp_messages_are_dropped_and_counted(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    garbage = dealer(zmq_ctx, broker)
    bad_messages = [
        [MDPW02],  # no command
        [MDPC02, C_REQUEST],  # no service
        [MDPC02, C_REQUEST, b""],  # empty service
        [MDPC02, C_FINAL, b"svc", b"x"],  # a client may only send REQUEST
        [MDPW02, W_PARTIAL, b"C", b""],  # a PARTIAL without a body
        [MDPW02, W_FINAL, b"C", b"not empty", b"x"],
        [MDPW02, W_HEARTBEAT, b"extra"],
        [MDPW02, b"\x99"],
        [b"", MDPC02, C_REQUEST, b"svc"],  # a 7/MDP empty frame before an 18/MDP header
    ]
    for _ in range(50):
        for frames in bad_messages:
            garbage.send_multipart(frames)
    # The good request follows on the same connection (ZeroMQ keeps its order)
    worker = mdpw02_worker(zmq_ctx, broker, b"echo")
    garbage.send_multipart([MDPC02, C_REQUEST, b"echo", b"still there?"])
    address = next_request(worker)[2]
    worker.send_multipart([MDPW02, W_FINAL, address, b"", b"yes"])
    assert recv(garbage) == [MDPC02, C_FINAL, b"echo", b"yes"]
    malformed = stats(zmq_ctx, broker)["malformed"]
    assert malformed == {
        "missing_frames": 150,
        "bad_service": 50,
        "unknown_command": 100,
        "bad_delimiter": 50,
        "extra_frames": 50,
        "bad_header": 50,
    }
    assert broker.stop() == 0
    assert "450 malformed dropped" in broker.log()


def test_an_mdpw02_worker_is_heartbeated_and_let_go_when_silent(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    client = dealer(zmq_ctx, broker)

    def mmi() -> bytes:
        client.send_multipart([MDPC02, C_REQUEST, b"mmi.service", b"quiet"])
        frames = recv(client)
        assert frames[:3] == [MDPC02, C_FINAL, b"mmi.service"]
        return frames[3]

    worker = mdpw02_worker(zmq_ctx, broker, b"quiet")
    # The broker heartbeats it (every 0.2 s here); answered, it stays
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        if worker.poll(100):
            assert worker.recv_multipart() == [MDPW02, W_HEARTBEAT]
            worker.send_multipart([MDPW02, W_HEARTBEAT])
    assert mmi() == b"200"
    # Silent past its liveness, it is gone: 8/MMI says so at once (a worker past
    # its liveness is not alive), the broker lets it go at its next tick
    wait_until(lambda: mmi() == b"404", timeout_s=5)
    with Client(broker.endpoint) as admin:
        wait_until(lambda: admin.broker_stats()["stats"]["workers_expired"] == 1, timeout_s=5)
    # Anything it says now is answered with DISCONNECT
    while worker.poll(0):
        worker.recv_multipart()
    worker.send_multipart([MDPW02, W_HEARTBEAT])
    frames = recv(worker)
    while frames == [MDPW02, W_HEARTBEAT]:  # one may have been on its way
        frames = recv(worker)
    assert frames == [MDPW02, W_DISCONNECT]
