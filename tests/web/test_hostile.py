"""What a careless or hostile HTTP caller can send: every refusal is a JSON 4xx, and
the gateway keeps serving everyone else."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.conftest import BrokerProcess, free_port, wait_until
from tests.web.gateway import GatewayProcess, Http
from zbroker.client import Publisher

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"service": ""}', "service"),
        (b'{"service": "s", "base64": "@@@"}', "base64"),
        (b'{"service": "s", "text": "a", "payload": 1}', "one of"),
        (b'{"service": "s", "priority": "high"}', "priority"),
        (b'{"service": "s", "priority": 999}', "priority"),
        (b'{"service": "s", "run_anyway": 1}', "run_anyway"),
        (b'{"service": "s", "colour": "red"}', "colour"),
        (b'{"service": "s", "headers": {"web.principal": "x"}}', "web.principal"),
        (b'{"service": "s", "depends_on": [{"x": 1}]}', "depends_on"),
    ],
)
def test_a_malformed_enqueue_is_a_clear_400(shared_http: Http, raw: bytes, why: str) -> None:
    answer = shared_http.post(
        "/api/v1/tasks", raw=raw, headers={"Content-Type": "application/json"}
    )
    assert answer.status == 400, answer.body
    assert answer.code == "bad_request"
    assert why in answer.json["error"]["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tasks?service=s&limit=abc",
        "/api/v1/tasks?service=s&limit=0",
        "/api/v1/tasks?service=s&state=melted",
        "/api/v1/tasks",
        "/api/v1/tasks/x/result?wait_s=nan",
        "/api/v1/tasks/x/result?wait_s=100000",
    ],
)
def test_a_bad_query_is_a_400(shared_http: Http, path: str) -> None:
    answer = shared_http.get(path)
    assert answer.status == 400 and answer.code == "bad_request", answer.body


def test_unknown_paths_and_methods_are_json_errors(http: Http) -> None:
    missing = http.get("/api/v1/nothing")
    assert missing.status == 404 and missing.code == "not_found"
    wrong = http.request("DELETE", "/api/v1/queues")
    assert wrong.status == 405 and wrong.code == "method_not_allowed"
    escape = http.get("/../../etc/passwd")
    assert escape.status == 404


def test_a_body_over_the_limit_is_413(
    broker: BrokerProcess, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    # Given a gateway that takes bodies of 10 KiB at most
    gateway = gateway_factory(broker, "--max-body-mib", "0.01")
    http = gateway.http()
    # When a larger body is sent
    body = {"service": "s", "text": "x" * 20_000}
    answer = http.post("/api/v1/tasks", body)
    # Then it is refused with 413, and a small one still works
    assert answer.status == 413 and answer.code == "too_large"
    http.close()
    http = gateway.http()
    assert http.post("/api/v1/tasks", {"service": "s", "text": "x"}).status == 200
    http.close()


def test_garbage_on_the_socket_does_not_hurt_the_gateway(
    gateway: GatewayProcess, http: Http
) -> None:
    # When a connection sends bytes that are not HTTP
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw:
        raw.sendall(b"\x00\x01\x02 garbage \r\n\r\n" * 100)
        reply = raw.recv(1000)
    # Then it gets a 400 (or is closed), and the gateway serves others as before
    assert reply == b"" or reply.split(b"\r\n")[0].endswith(b" 400 Bad Request")
    assert http.get("/api/v1/health").status == 200


def test_slow_clients_do_not_block_others(gateway: GatewayProcess, http: Http) -> None:
    # Given a client that sends half a request and stops, and an event follower that
    # never reads while a flood of large events is published to it
    stalled = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    stalled.sendall(b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
    sleeper = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.sendall(b"GET /api/v1/events?topic=flood. HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sleeper.recv(12) == b"HTTP/1.1 200"
    try:
        # When a few MB of events go to that follower
        payload = {"text": "x" * 20_000}
        for _ in range(150):
            assert (
                http.post("/api/v1/events", {"topic": "flood.x", "payload": payload}).status == 200
            )
        # Then everyone else is served at once
        started = time.monotonic()
        assert http.get("/api/v1/health").status == 200
        assert http.get("/api/v1/queues").status == 200
        assert time.monotonic() - started < 2.0
    finally:
        stalled.close()
        sleeper.close()


def test_a_broker_that_does_not_answer_is_504_and_health_503(
    broker: BrokerProcess, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    # Given a gateway whose broker is gone
    broker.stop()
    gateway = gateway_factory(broker, "--timeout", "0.3")
    http = gateway.http()
    # When it is asked for the queues and its health
    queues = http.get("/api/v1/queues")
    health = http.get("/api/v1/health")
    # Then the queues time out (504) and the health says the broker is unreachable (503)
    assert queues.status == 504 and queues.code == "timeout"
    assert health.status == 503 and health.code == "broker_unreachable"
    http.close()


def test_without_tokens_it_refuses_a_non_loopback_address(
    broker: BrokerProcess, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    gateway = gateway_factory(broker, start=False)
    command = gateway.command()
    command[command.index("--listen") + 1] = f"0.0.0.0:{free_port()}"
    done = subprocess.run(command, capture_output=True, timeout=30, text=True)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr


def test_a_follower_too_slow_for_its_events_is_told_how_many_it_lost(
    broker: BrokerProcess, gateway: GatewayProcess
) -> None:
    # Given a follower of `flood.` whose subscription has reached the bus
    sse = gateway.http().open_stream("/api/v1/events?topic=flood.")
    events = iter(sse)
    with Publisher(broker.events_in) as publisher:
        probe = threading.Thread(target=lambda: next(events), daemon=True)
        probe.start()
        deadline = time.monotonic() + 10
        while probe.is_alive() and time.monotonic() < deadline:
            publisher.publish("flood.probe", 0)
            probe.join(0.05)
        assert not probe.is_alive(), "the follower never got an event"
        # When far more events come than its queue holds while it reads nothing
        for _ in range(30):
            publisher.publish_many("flood.x", [b"y" * 10_000] * 100)
        # Then, reading again, it is told that events were dropped
        dropped = next(e for e in events if e.event == "dropped")
    sse.close()
    assert dropped.data["count"] > 0


def test_a_websocket_message_over_the_limit_closes_that_socket_only(
    broker: BrokerProcess, gateway_factory: Callable[..., GatewayProcess]
) -> None:
    gateway = gateway_factory(broker, "--max-body-mib", "0.01")

    async def main() -> tuple[object, int | None]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{gateway.url}/ws") as ws,
        ):
            await ws.send_str(json.dumps({"id": 1, "op": "enqueue", "text": "x" * 20_000}))
            message = await ws.receive(timeout=10)
            return message.type, ws.close_code

    kind, code = asyncio.run(main())
    assert kind == aiohttp.WSMsgType.CLOSE and code == 1009
    http = gateway.http()
    assert http.get("/api/v1/health").status == 200
    http.close()


def test_the_gateway_carries_on_across_a_broker_restart(
    broker: BrokerProcess, gateway: GatewayProcess
) -> None:
    # Given a task stored through the gateway
    http = gateway.http()
    task_id = http.post("/api/v1/tasks", {"service": "kept", "text": "x"}).json["id"]
    # When the broker is killed and started again on the same journal
    broker.kill()
    broker.start()

    # Then the gateway answers again by itself, and the task is still there
    def answers() -> bool:
        return http.get("/api/v1/health").status == 200

    wait_until(answers, timeout_s=20, step_s=0.2)
    assert http.get(f"/api/v1/tasks/{task_id}").json["state"] == "ready"
    http.close()


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        ("POST", "/api/v1/events", b'{"topic": 5}'),
        ("POST", "/api/v1/events", b'{"payload": 1}'),
        ("POST", "/api/v1/events", b'{"topic": "' + b"t" * 300 + b'"}'),
        ("POST", "/api/v1/events", b'{"topic": "a.b", "reply_to": 7}'),
        ("POST", "/api/v1/events", b"[]"),
        ("PUT", "/api/v1/queues/s/limit", b'{"limit": "2"}'),
        ("PUT", "/api/v1/queues/s/limit", b'{"limit": 2, "per_key": "yes"}'),
        ("PUT", "/api/v1/queues/s/limit", b"not json"),
        ("POST", "/api/v1/queues/s/dead/redrive", b'{"ids": "all"}'),
        ("POST", "/api/v1/queues/s/dead/drop", b'{"ids": [1, 2]}'),
    ],
)
def test_malformed_admin_and_event_calls_are_400(
    shared_http: Http, method: str, path: str, raw: bytes
) -> None:
    answer = shared_http.request(method, path, raw=raw)
    assert answer.status == 400 and answer.code == "bad_request", answer.body
