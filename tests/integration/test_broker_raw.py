"""A real `zbroker start` process, driven by MDP peers written on raw pyzmq frames.

Nothing here uses zbroker's own client library, so the wire format is checked
independently of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from tests.conftest import BrokerProcess, free_ports, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RAW_WORKER = Path(__file__).with_name("raw_worker.py")
Ctx = zmq.Context[zmq.Socket[bytes]]


def recv(sock: zmq.Socket[bytes], timeout_s: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), f"nothing received within {timeout_s}s"
    return sock.recv_multipart()


def raw_client(ctx: Ctx, broker: BrokerProcess, kind: int = zmq.DEALER) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.connect(broker.endpoint)
    return sock


def raw_worker(ctx: Ctx, broker: BrokerProcess, service: bytes) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    sock.send_multipart([b"", b"MDPW01", b"\x01", service])
    return sock


def mmi(client: zmq.Socket[bytes], service: bytes) -> bytes:
    client.send_multipart([b"", b"MDPC01", b"mmi.service", service])
    reply = recv(client)
    assert reply[:3] == [b"", b"MDPC01", b"mmi.service"]
    return reply[3]


def next_request(worker: zmq.Socket[bytes]) -> list[bytes]:
    """Skip heartbeats; return the next REQUEST."""
    while True:
        frames = recv(worker)
        if frames[2] == b"\x02":
            return frames


@pytest.fixture
def worker_procs() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)
        if p.stdout:
            p.stdout.close()


def test_req_client_and_dealer_worker_round_trip(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    # Given a stock REQ client (which adds the empty frame itself) and a DEALER worker
    client = raw_client(zmq_ctx, broker, zmq.REQ)
    worker = raw_worker(zmq_ctx, broker, b"echo")
    # When the client sends a two-frame request
    client.send_multipart([b"MDPC01", b"echo", b"part1", b"part2"])
    # Then the worker gets REQUEST with the client's address and both body frames
    frames = next_request(worker)
    assert frames[:3] == [b"", b"MDPW01", b"\x02"] and frames[4] == b""
    assert frames[5:] == [b"part1", b"part2"]
    # And the worker's REPLY reaches the client as an MDPC01 reply for that service
    worker.send_multipart([b"", b"MDPW01", b"\x03", frames[3], b"", b"r1", b"r2"])
    assert recv(client) == [b"MDPC01", b"echo", b"r1", b"r2"]


def test_request_before_any_worker_is_served_when_one_arrives(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    client = raw_client(zmq_ctx, broker)
    client.send_multipart([b"", b"MDPC01", b"late", b"hello"])
    assert not client.poll(300)
    worker = raw_worker(zmq_ctx, broker, b"late")
    frames = next_request(worker)
    worker.send_multipart([b"", b"MDPW01", b"\x03", frames[3], b"", b"world"])
    assert recv(client) == [b"", b"MDPC01", b"late", b"world"]


def test_mmi_service_lookup(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    client = raw_client(zmq_ctx, broker)
    assert mmi(client, b"tts") == b"404"
    worker = raw_worker(zmq_ctx, broker, b"tts")
    wait_until(lambda: mmi(client, b"tts") == b"200")
    client.send_multipart([b"", b"MDPC01", b"mmi.unknown", b"tts"])
    assert recv(client) == [b"", b"MDPC01", b"mmi.unknown", b"501"]
    # A worker may not register an mmi.* service: it is told to disconnect.
    rogue = raw_worker(zmq_ctx, broker, b"mmi.service")
    assert recv(rogue) == [b"", b"MDPW01", b"\x05"]
    worker.send_multipart([b"", b"MDPW01", b"\x05"])  # DISCONNECT
    wait_until(lambda: mmi(client, b"tts") == b"404")


def test_broker_heartbeats_workers_and_drops_silent_ones(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    client = raw_client(zmq_ctx, broker)
    worker = raw_worker(zmq_ctx, broker, b"quiet")
    # The broker heartbeats an idle worker (interval 0.2 s in these tests)
    assert recv(worker, 2.0) == [b"", b"MDPW01", b"\x04"]
    wait_until(lambda: mmi(client, b"quiet") == b"200", timeout_s=2)
    # A worker that never heartbeats is dead after liveness (3) intervals
    wait_until(lambda: mmi(client, b"quiet") == b"404", timeout_s=5)


def test_unknown_worker_is_told_to_disconnect(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    # Given a worker the broker never saw (as after a broker restart)
    stranger = raw_client(zmq_ctx, broker)
    stranger.send_multipart([b"", b"MDPW01", b"\x04"])
    assert recv(stranger) == [b"", b"MDPW01", b"\x05"]
    # A second READY is a protocol violation too
    worker = raw_worker(zmq_ctx, broker, b"svc")
    worker.send_multipart([b"", b"MDPW01", b"\x01", b"svc"])
    frames = recv(worker)
    while frames[2] == b"\x04":
        frames = recv(worker)
    assert frames == [b"", b"MDPW01", b"\x05"]


def test_sigkilled_worker_request_is_answered_by_another_worker(
    broker: BrokerProcess, zmq_ctx: Ctx, worker_procs: list[subprocess.Popen[str]]
) -> None:
    # Given a worker process that takes a request and holds it without replying
    holder = subprocess.Popen(
        [sys.executable, str(RAW_WORKER), broker.endpoint, "jobs", "hold"],
        stdout=subprocess.PIPE,
        text=True,
    )
    worker_procs.append(holder)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "READY"
    client = raw_client(zmq_ctx, broker)
    wait_until(lambda: mmi(client, b"jobs") == b"200")
    client.send_multipart([b"", b"MDPC01", b"jobs", b"precious"])
    assert holder.stdout.readline().strip() == "HOLDING precious"
    # And a second, healthy worker
    helper = subprocess.Popen(
        [sys.executable, str(RAW_WORKER), broker.endpoint, "jobs", "echo"],
        stdout=subprocess.PIPE,
        text=True,
    )
    worker_procs.append(helper)
    assert helper.stdout is not None
    assert helper.stdout.readline().strip() == "READY"
    # When the holder is killed with SIGKILL
    holder.kill()
    holder.wait(5)
    # Then the request is answered by the other worker, exactly once
    assert recv(client, 10) == [b"", b"MDPC01", b"jobs", b"echo:precious"]
    assert not client.poll(500)
    assert "requeued" in broker.log()


def test_late_reply_from_a_worker_declared_dead_is_not_delivered(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    client = raw_client(zmq_ctx, broker)
    slow = raw_worker(zmq_ctx, broker, b"svc")
    wait_until(lambda: mmi(client, b"svc") == b"200")
    client.send_multipart([b"", b"MDPC01", b"svc", b"job"])
    request = next_request(slow)
    # The slow worker goes silent past its liveness, so the broker declares it dead
    wait_until(lambda: mmi(client, b"svc") == b"404", timeout_s=5)
    fresh = raw_worker(zmq_ctx, broker, b"svc")
    redelivered = next_request(fresh)
    assert redelivered[5:] == [b"job"]
    # When the dead worker's reply finally arrives, it is refused with DISCONNECT
    slow.send_multipart([b"", b"MDPW01", b"\x03", request[3], b"", b"stale"])
    frames = recv(slow)
    while frames[2] != b"\x05":
        frames = recv(slow)
    fresh.send_multipart([b"", b"MDPW01", b"\x03", redelivered[3], b"", b"fresh"])
    # Then the client sees only the live worker's reply
    assert recv(client) == [b"", b"MDPC01", b"svc", b"fresh"]
    assert not client.poll(300)


def test_burst_of_malformed_messages_is_dropped_and_the_broker_keeps_serving(
    broker: BrokerProcess, zmq_ctx: Ctx
) -> None:
    garbage = raw_client(zmq_ctx, broker)
    bad_messages = [
        [b"just one frame"],
        [b"", b"NOTMDP", b"svc", b"x"],
        [b"", b"MDPW01", b"\x99"],
        [b"", b"MDPW01", b"\x03"],
        [b"x", b"MDPC01", b"svc"],
        [b"", b"MDPC01"],
        [b"", b"MDPW01", b"\x04", b"extra"],
    ]
    for _ in range(200):
        for frames in bad_messages:
            garbage.send_multipart(frames)
    # The good request follows the garbage on the same connection, so ZeroMQ's
    # per-pipe ordering guarantees the broker has read all the garbage first.
    client = garbage
    worker = raw_worker(zmq_ctx, broker, b"echo")
    client.send_multipart([b"", b"MDPC01", b"echo", b"still there?"])
    frames = next_request(worker)
    worker.send_multipart([b"", b"MDPW01", b"\x03", frames[3], b"", b"yes"])
    assert recv(client) == [b"", b"MDPC01", b"echo", b"yes"]
    # The broker reports what it dropped when it stops.
    assert broker.stop() == 0
    assert "1400 malformed dropped" in broker.log()


def test_oversized_message_is_dropped_and_counted(
    broker_factory: Callable[..., BrokerProcess], zmq_ctx: Ctx
) -> None:
    broker = broker_factory("--max-message-bytes", "1000")
    client = raw_client(zmq_ctx, broker)
    worker = raw_worker(zmq_ctx, broker, b"svc")
    client.send_multipart([b"", b"MDPC01", b"svc", b"x" * 3000])
    client.send_multipart([b"", b"MDPC01", b"svc", b"small"])
    assert next_request(worker)[5:] == [b"small"]
    # A frame over four times the cap is never read: libzmq drops its sender's
    # connection at once (the broker's memory stays bounded), and the client's
    # socket connects again by itself
    client.send_multipart([b"", b"MDPC01", b"svc", b"x" * 5000])

    def answered() -> bool:
        client.send_multipart([b"", b"MDPC01", b"mmi.service", b"svc"])
        return client.poll(200) != 0

    wait_until(answered, timeout_s=10)
    assert recv(client)[2:] == [b"mmi.service", b"200"]
    assert broker.stop() == 0
    assert "'oversized': 1" in broker.log()  # the large frame was never read


def test_event_proxy_forwards_by_topic_prefix(broker: BrokerProcess, zmq_ctx: Ctx) -> None:
    sub = zmq_ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(broker.events_out)
    sub.subscribe(b"fs.")
    pub = zmq_ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.connect(broker.events_in)

    # Publish until the subscription has propagated (the PUB/SUB "slow joiner").
    def delivered() -> bool:
        pub.send_multipart([b"transcript.final", b"not for us"])
        pub.send_multipart([b"fs.change", b"for us"])
        return sub.poll(50) != 0

    wait_until(delivered)
    while sub.poll(100):
        topic, body = sub.recv_multipart()
        assert topic == b"fs.change" and body == b"for us"


def test_sigterm_stops_cleanly(broker: BrokerProcess) -> None:
    assert broker.stop() == 0
    assert "shutting down" in broker.log()
    assert "broker stopped" in broker.log()


def test_environment_variables_configure_start(tmp_path: Path, zmq_ctx: Ctx) -> None:
    ports = free_ports(3)
    env = dict(
        os.environ,
        ZBROKER_BIND=f"tcp://127.0.0.1:{ports[0]}",
        ZBROKER_EVENTS_IN=f"tcp://127.0.0.1:{ports[1]}",
        ZBROKER_EVENTS_OUT=f"tcp://127.0.0.1:{ports[2]}",
        ZBROKER_HEARTBEAT_INTERVAL="0.3",
    )
    broker = BrokerProcess(
        f"tcp://127.0.0.1:{ports[0]}",
        f"tcp://127.0.0.1:{ports[1]}",
        f"tcp://127.0.0.1:{ports[2]}",
        [],
        tmp_path / "env.log",
        env,
    )
    broker.start()
    try:
        log = broker.log()
        assert f"listening on tcp://127.0.0.1:{ports[0]}" in log
        assert f"connect to tcp://127.0.0.1:{ports[1]} (XSUB)" in log
        assert f"connect to tcp://127.0.0.1:{ports[2]} (XPUB)" in log
    finally:
        assert broker.stop() == 0


def test_bind_failure_is_a_clear_error(broker: BrokerProcess) -> None:
    # The broker fixture already holds these endpoints.
    proc = subprocess.run(
        [sys.executable, "-m", "zbroker", "start", "--bind", broker.endpoint],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 1
    assert "cannot bind" in proc.stderr


def test_queued_request_expires_and_the_expiry_is_counted(
    broker_factory: Callable[..., BrokerProcess], zmq_ctx: Ctx
) -> None:
    # Given a broker whose queued requests expire after 0.3 s
    broker = broker_factory("--request-expiry", "0.3")
    client = raw_client(zmq_ctx, broker)
    # When a request waits for a service that has no worker past that time
    client.send_multipart([b"", b"MDPC01", b"absent", b"too late"])
    wait_until(lambda: "expired after 0.3s in queue" in broker.log(), timeout_s=5)
    # Then a worker arriving afterwards gets nothing, and the expiry is counted
    worker = raw_worker(zmq_ctx, broker, b"absent")
    frames = recv(worker)
    assert frames == [b"", b"MDPW01", b"\x04"]  # the greeting, not a REQUEST
    assert not client.poll(200)
    assert broker.stop() == 0
    assert "1 expired" in broker.log()
