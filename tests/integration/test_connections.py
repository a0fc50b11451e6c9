"""Connections: a waiting call ends when its caller's connection does, and many idle
connections do not use up the broker."""

from __future__ import annotations

import resource
from collections.abc import Callable

import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.integration.test_memory_caps import stats
from zbroker.protocol import zbc
from zbroker.runtime.connections import raise_file_limit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Ctx = zmq.Context[zmq.Socket[bytes]]


def waiting_calls(ctx: Ctx, broker: BrokerProcess) -> int:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    sock.send_multipart(zbc.call(zbc.STATS, 1))
    assert sock.poll(10_000), "no answer to STATS"
    count: int = zbc.decode_answer(sock.recv_multipart()).meta["waiting_calls"]
    sock.close()
    return count


def dealer(ctx: Ctx, broker: BrokerProcess) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    return sock


def test_a_waiting_call_ends_when_its_callers_connection_closes(
    broker_factory: Callable[..., BrokerProcess], zmq_ctx: Ctx
) -> None:
    # Given a task nobody serves, and two connections waiting an hour for it (RESULT
    # and REQUEST), beside a third that stays
    broker = broker_factory()
    client = dealer(zmq_ctx, broker)
    client.send_multipart(zbc.enqueue(1, "nobody", [[b"x"]]))
    assert client.poll(10_000)
    task_id = zbc.decode_answer(client.recv_multipart()).meta["ids"][0]
    leaving = [dealer(zmq_ctx, broker) for _ in range(2)]
    leaving[0].send_multipart(zbc.call(zbc.RESULT, 1, id=task_id, wait_s=3600.0))
    leaving[1].send_multipart(zbc.request(1, "nobody", [b"y"], wait_s=3600.0))
    client.send_multipart(zbc.call(zbc.RESULT, 2, id=task_id, wait_s=3600.0))
    wait_until(lambda: waiting_calls(zmq_ctx, broker) == 3, timeout_s=10)
    # When the two connections close without a word
    for sock in leaving:
        sock.close(linger=0)
    # Then their calls stop holding places at once (not after an hour), and the
    # third still waits
    wait_until(lambda: waiting_calls(zmq_ctx, broker) == 1, timeout_s=10)
    assert stats(zmq_ctx, broker)["replies_undeliverable"] == 0


def test_thousands_of_idle_connections_leave_the_broker_serving(
    broker_factory: Callable[..., BrokerProcess], zmq_ctx: Ctx
) -> None:
    # Given this process may hold them (each connection is a descriptor on both sides)
    if raise_file_limit() < 4000:
        pytest.skip(f"open-file limit {resource.getrlimit(resource.RLIMIT_NOFILE)} too low")
    # And a broker started with a soft limit of 512 open files (a common default is
    # 1024), which it may raise up to the hard limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        broker = broker_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    many: Ctx = zmq.Context()
    many.max_sockets = 2000
    # When 1,500 connections are opened and say something, then stay idle
    idle = [dealer(many, broker) for _ in range(1500)]
    for sock in idle:
        sock.send_multipart(zbc.call(zbc.STATS, 1))
    for sock in idle:
        assert sock.poll(30_000), "a connection was not answered"
        sock.recv_multipart()
    # Then a new one is still served
    try:
        assert waiting_calls(zmq_ctx, broker) == 0
        assert broker.proc is not None and broker.proc.poll() is None
    finally:
        for sock in idle:
            sock.close(linger=0)
        many.term()
