"""A stock 7/MDP client, written here on raw pyzmq frames, -> broker -> Node Worker.

The Node Worker speaks ZBW01, not MDPW01: the broker hands it MDP requests as
tasks and turns its DONE into the MDPC01 reply (docs/protocol.md §10). Nothing
here uses zbroker's own client library.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.crosslang.nodeproc import NOT_UTF8, NodeFactory, NodeProcess, unb64

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]


def recv(sock: zmq.Socket[bytes], timeout_s: float = 10.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), f"no reply within {timeout_s}s"
    return sock.recv_multipart()


def connect(ctx: Ctx, broker: BrokerProcess, kind: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.connect(broker.endpoint)
    return sock


def mmi(sock: zmq.Socket[bytes], service: bytes) -> bytes:
    sock.send_multipart([b"", b"MDPC01", b"mmi.service", service])
    reply = recv(sock)
    assert reply[:3] == [b"", b"MDPC01", b"mmi.service"] and len(reply) == 4
    return reply[3]


@pytest.fixture
def echo_worker(broker: BrokerProcess, node: NodeFactory) -> NodeProcess:
    return node("worker.mjs", broker.endpoint, "echo", "echo", "2")


def test_req_client_round_trip_with_a_node_worker(
    broker: BrokerProcess, echo_worker: NodeProcess, zmq_ctx: Ctx
) -> None:
    # Given a stock REQ client (the socket adds the empty delimiter itself)
    client = connect(zmq_ctx, broker, zmq.REQ)
    # When it sends a request of several frames, non-UTF-8 and empty ones included
    body = [NOT_UTF8, b"", b"third"]
    client.send_multipart([b"MDPC01", b"echo", *body])
    # Then the reply is the MDPC01 reply for that service with the body unchanged
    assert recv(client) == [b"MDPC01", b"echo", *body]
    # And the Node worker saw it as a task of the service, first attempt, no headers
    task = echo_worker.wait_event("task")
    assert [unb64(f) for f in task["frames"]] == body
    assert task["service"] == "echo" and task["attempt"] == 1 and task["headers"] == {}


def test_mmi_answers_for_a_node_worker(
    broker: BrokerProcess, echo_worker: NodeProcess, zmq_ctx: Ctx
) -> None:
    client = connect(zmq_ctx, broker, zmq.DEALER)
    assert mmi(client, b"echo") == b"200"
    assert mmi(client, b"nobody") == b"404"
    # When the Node worker stops gracefully (DISCONNECT), its service is gone at once
    echo_worker.close()
    wait_until(lambda: mmi(client, b"echo") == b"404", timeout_s=5)


def test_pipelined_dealer_requests_all_come_back(
    broker: BrokerProcess, echo_worker: NodeProcess, zmq_ctx: Ctx
) -> None:
    # A DEALER client may keep many requests in flight and match replies by its own id
    client = connect(zmq_ctx, broker, zmq.DEALER)
    sent = {f"req-{i}".encode(): bytes([i]) * i for i in range(50)}
    for correlation, data in sent.items():
        client.send_multipart([b"", b"MDPC01", b"echo", correlation, data])
    received = {}
    for _ in sent:
        empty, header, service, correlation, data = recv(client)
        assert (empty, header, service) == (b"", b"MDPC01", b"echo")
        received[correlation] = data
    assert received == sent


def test_an_empty_body_and_an_empty_reply(
    broker: BrokerProcess, echo_worker: NodeProcess, zmq_ctx: Ctx
) -> None:
    client = connect(zmq_ctx, broker, zmq.DEALER)
    client.send_multipart([b"", b"MDPC01", b"echo"])
    assert recv(client) == [b"", b"MDPC01", b"echo"]


def test_a_request_waiting_for_a_node_worker_is_served_when_it_registers(
    broker: BrokerProcess, node: NodeFactory, zmq_ctx: Ctx
) -> None:
    client = connect(zmq_ctx, broker, zmq.DEALER)
    client.send_multipart([b"", b"MDPC01", b"late", b"early bird"])
    assert not client.poll(200)
    node("worker.mjs", broker.endpoint, "late")
    assert recv(client) == [b"", b"MDPC01", b"late", b"early bird"]


def test_a_failing_node_handler_is_retried_then_the_mdp_client_times_out(
    broker_factory: Callable[..., BrokerProcess], node: NodeFactory, zmq_ctx: Ctx
) -> None:
    # Given a broker allowing 3 attempts per request, and a Node worker that always throws
    broker = broker_factory("--max-attempts", "3")
    worker = node("worker.mjs", broker.endpoint, "flaky", "throw")
    client = connect(zmq_ctx, broker, zmq.DEALER)
    # When an MDP client asks it
    client.send_multipart([b"", b"MDPC01", b"flaky", b"please"])
    # Then the request is attempted three times (a retryable FAIL requeues it)
    wait_until(lambda: len(worker.events("task")) == 3)
    tasks = worker.events("task")
    assert [t["attempt"] for t in tasks] == [1, 2, 3]
    assert len({t["id"] for t in tasks}) == 1
    # And then dropped: MDP has no error reply, so the client hears nothing, and no
    # fourth attempt starts while it waits
    assert not client.poll(500)
    assert len(worker.events("task")) == 3
