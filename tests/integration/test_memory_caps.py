"""What peers make the broker hold in memory is capped in bytes, not only counted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from zbroker.protocol import mdp, zbc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def stats(ctx: Ctx, broker: BrokerProcess) -> dict[str, int]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    sock.send_multipart(zbc.call(zbc.STATS, 1))
    assert sock.poll(10_000), "no answer to STATS"
    counters: dict[str, int] = zbc.decode_answer(sock.recv_multipart()).meta["stats"]
    sock.close()
    return counters


def test_large_requests_for_services_nobody_serves_are_capped_in_bytes(
    broker_factory: Callable[..., BrokerProcess], zmq_ctx: Ctx
) -> None:
    # Given a broker that keeps at most 64 MiB of MDP requests in memory
    broker = broker_factory("--max-queued-mib", "64")
    assert broker.proc is not None
    client = zmq_ctx.socket(zmq.DEALER)
    client.linger = 0
    client.connect(broker.endpoint)
    # When one client sends 20 requests of 8 MiB for services with no worker (160 MiB)
    body = b"x" * (8 << 20)
    for i in range(20):
        client.send_multipart([b"", mdp.MDPC01, b"nobody.%d" % (i % 3), body])
    # Then what does not fit is refused and counted, and the broker holds no more
    wait_until(
        lambda: (
            stats(zmq_ctx, broker)["requests"] + stats(zmq_ctx, broker)["refused_queue_full"] == 20
        ),
        timeout_s=30,
    )
    counters = stats(zmq_ctx, broker)
    assert counters["requests"] <= 8 and counters["refused_queue_full"] >= 12
    assert rss_mib(broker.proc.pid) < 400
    assert broker.proc.poll() is None
