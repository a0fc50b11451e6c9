"""Many service names through a real broker (issue 17): QUEUES paged, scrapes that
do not starve the loop."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack

import pytest
import zmq

from tests.conftest import ROOT, BrokerProcess, free_port, wait_until
from tests.integration.running import open_client
from zbroker.client import Worker
from zbroker.protocol import limits, mdp


def flood(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, count: int, prefix: str) -> None:
    """`count` MDP requests, each to its own service name (they wait: nobody serves them)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndhwm = 0
    sock.connect(endpoint)
    for i in range(count):
        sock.send_multipart([b"", mdp.MDPC01, f"{prefix}{i:06d}".encode(), b"x"])
    sock.close(linger=-1)  # every request is on its way before this returns


def test_queues_pages_through_a_real_broker_and_the_cli_lists_every_service(
    broker: BrokerProcess, stack: ExitStack, zmq_ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    # Given 1,200 services with a waiting request
    flood(zmq_ctx, broker.endpoint, 1200, "svc-")
    client = open_client(stack, broker)
    wait_until(lambda: client.broker_stats()["services"] == 1200, timeout_s=30)
    # When the client reads one page, then all of them
    first, after = client.queues_page(500)
    rows = client.queues(page_size=250)
    # Then the page is the first 500 by name, and the whole list every service once
    assert [r["service"] for r in first] == [f"svc-{i:06d}" for i in range(500)]
    assert after == "svc-000499"
    assert [r["service"] for r in rows] == [f"svc-{i:06d}" for i in range(1200)]
    assert all(r["requests"] == 1 for r in rows)
    # And `zbroker queues` lists them all too
    done = subprocess.run(
        [sys.executable, "-m", "zbroker", "queues", "--json", "--endpoint", broker.endpoint],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert len(json.loads(done.stdout)) == 1200
    # And a page over the protocol's bound is refused before anything is sent
    with pytest.raises(ValueError):
        client.queues_page(limits.MAX_QUEUES_PAGE + 1)


@pytest.mark.timeout(300)
def test_a_worker_stays_alive_while_metrics_are_scraped_with_100000_services(
    broker_factory: Callable[..., BrokerProcess],
    stack: ExitStack,
    zmq_ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    # Given a broker and a worker that each give the other up after 5 s of silence, and
    # 100,000 services with a waiting request each (answering QUEUES for all of them
    # at once took the loop about 9 s; 5 s leaves room for a busy machine's hiccups)
    port = free_port()
    broker = broker_factory(
        "--metrics-port",
        str(port),
        "--request-expiry",
        "600",
        "--heartbeat-liveness",
        "5",
        heartbeat_interval=1.0,
    )
    worker = Worker(
        broker.endpoint,
        "echo",
        lambda task: task.payload,
        heartbeat_interval_s=1.0,
        liveness=5,
    )
    stack.enter_context(worker)
    wait_until(lambda: worker.connected, timeout_s=10)
    client = open_client(stack, broker, timeout_s=30)
    flood(zmq_ctx, broker.endpoint, 100_000, "many-")
    wait_until(lambda: client.broker_stats()["stats"]["requests"] == 100_000, timeout_s=120)
    # When /metrics is scraped
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=240) as response:
        text = response.read().decode()
    # Then it holds every service, and the worker was never declared dead meanwhile
    assert 'zbroker_requests_queued{service="many-099999"} 1.0' in text
    stats = client.broker_stats()["stats"]
    assert stats["workers_expired"] == 0 and stats["workers_registered"] == 1
    assert worker.connected
    assert client.request("echo", b"still here", timeout_s=30) == b"still here"
