"""No peer can make libzmq abort the broker by taking the routing id the ROUTER
would give the next peer (zbroker/runtime/routing_ids.py)."""

from __future__ import annotations

import pytest
import zmq

from tests.conftest import BrokerProcess
from zbroker.protocol import ext, mdp, zbc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]
# What libzmq's unseeded counter gives the first peer without an id of its own.
FIRST_UNSEEDED_ID = bytes.fromhex("006b8b4567")


def peer(ctx: Ctx, broker: BrokerProcess, routing_id: bytes | None = None) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if routing_id is not None:
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(broker.endpoint)
    return sock


def mmi_answers(sock: zmq.Socket[bytes]) -> bool:
    """Whether the broker answers an 8/MMI query from this peer."""
    sock.send_multipart([b"", mdp.MDPC01, mdp.MMI_SERVICE, b"echo"])
    if not sock.poll(10_000):
        return False
    return sock.recv_multipart()[-1] in (mdp.MMI_FOUND, mdp.MMI_NOT_FOUND)


def test_a_peer_taking_the_first_unseeded_id_does_not_stop_the_broker(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    # Given peers that took the ids an unseeded libzmq hands out first
    squatters = [
        peer(zmq_ctx, broker, (int.from_bytes(FIRST_UNSEEDED_ID, "big") + i).to_bytes(5, "big"))
        for i in range(4)
    ]
    for squatter in squatters:
        assert mmi_answers(squatter)
    # When ordinary peers (no id of their own) connect after them
    ordinary = [peer(zmq_ctx, broker) for _ in range(4)]
    # Then the broker answers every one of them and is still running
    for sock in ordinary:
        assert mmi_answers(sock)
    assert broker.proc.poll() is None


def test_no_answer_reveals_a_workers_routing_id(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    # Given a worker without an id of its own, so libzmq numbered it
    worker = peer(zmq_ctx, broker)
    worker.send_multipart(ext.ready("echo", 1))
    assert worker.poll(10_000)  # greeted: registered
    # When a client asks who the workers are
    client = peer(zmq_ctx, broker)
    client.send_multipart(zbc.call(zbc.WORKERS, 1))
    assert client.poll(10_000)
    (row,) = zbc.decode_answer(client.recv_multipart()).meta["workers"]
    # Then the worker is named by an alias: a peer that takes the id after it, read as
    # a routing id, changes nothing (were it libzmq's id, the next peer would stop
    # the broker)
    assert len(row["worker"]) == 10
    taken = (int(row["worker"], 16) + 1).to_bytes(5, "big")
    assert mmi_answers(peer(zmq_ctx, broker, taken))
    assert mmi_answers(peer(zmq_ctx, broker))
    assert broker.proc.poll() is None
