"""The WebSocket at /ws against a real broker: requests with ids, concurrent answers,
streams, events, refusals."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Generator
from contextlib import ExitStack
from typing import Any

import aiohttp
import pytest

from tests.conftest import BrokerProcess
from tests.integration.running import start_worker
from tests.web.gateway import GatewayProcess
from zbroker.client import Task

pytestmark = pytest.mark.integration

DEADLINE_S = 15.0


class Peer:
    """One WebSocket client: requests by id, answers and other messages kept apart."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.others: list[dict[str, Any]] = []
        self._ids = 0

    async def send(self, op: str, **fields: Any) -> int:
        self._ids += 1
        await self.ws.send_json({"id": self._ids, "op": op, **fields})
        return self._ids

    async def next(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next message `match` accepts (others are kept in `others`)."""
        for i, kept in enumerate(self.others):
            if match(kept):
                return self.others.pop(i)
        async with asyncio.timeout(DEADLINE_S):
            while True:
                message = json.loads(await self.ws.receive_str())
                if match(message):
                    return message
                self.others.append(message)

    async def answer(self, request_id: Any) -> dict[str, Any]:
        return await self.next(lambda m: m.get("id") == request_id and "ok" in m)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        return await self.answer(await self.send(op, **fields))


def run_ws(
    gateway: GatewayProcess, body: Callable[[Peer], Awaitable[None]], token: str | None = None
) -> None:
    async def main() -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{gateway.url}/ws", headers=headers) as ws,
        ):
            await body(Peer(ws))

    asyncio.run(main())


def upper(task: Task) -> bytes:
    return task.payload.upper()


def speak(task: Task) -> Generator[str, None, bytes]:
    for word in task.payload.decode().split():
        yield word + " "
    return b"spoken"


def test_enqueue_result_status_and_cancel_echo_their_ids(
    broker: BrokerProcess, gateway: GatewayProcess
) -> None:
    with ExitStack() as stack:
        start_worker(stack, broker, "echo", upper)

        async def body(peer: Peer) -> None:
            # When a task is enqueued and its result asked for
            enqueued = await peer.call("enqueue", service="echo", text="hello", priority=3)
            assert enqueued["ok"], enqueued
            task_id = enqueued["result"]["id"]
            result = await peer.call("result", task=task_id, wait_s=10)
            # Then the answer carries the request's id and the result
            assert result["result"]["result"] == {"text": "HELLO"}
            status = await peer.call("status", task=task_id)
            assert status["result"]["priority"] == 3
            # And the status shows the payload's start, as much as `preview` asks
            assert status["result"]["payload"]["preview"] == {"text": "hello"}
            short = await peer.call("status", task=task_id, preview=2)
            assert short["result"]["payload"] == {
                "frames": 1,
                "bytes": 5,
                "preview": {"text": "he"},
            }
            refused = await peer.call("status", task=task_id, preview=-1)
            assert refused["error"]["code"] == "bad_request"
            # And cancelling an ended task is the broker's conflict
            cancelled = await peer.call("cancel", task=task_id)
            assert cancelled["ok"] is False and cancelled["error"]["code"] == "conflict"

        run_ws(gateway, body)


def test_a_long_wait_does_not_hold_up_other_requests(gateway: GatewayProcess) -> None:
    async def body(peer: Peer) -> None:
        # Given a result wait on a task nobody serves
        task_id = (await peer.call("enqueue", service="nobody", text="x"))["result"]["id"]
        waiting = await peer.send("result", task=task_id, wait_s=5)
        # When another request follows it, its answer comes first
        quick = await peer.call("enqueue", service="nobody", text="y")
        assert quick["ok"]
        pending = await peer.answer(waiting)
        assert pending["result"]["pending"] is True and pending["result"]["state"] == "ready"

    run_ws(gateway, body)


def test_a_stream_sends_chunks_then_the_answer(
    broker: BrokerProcess, gateway: GatewayProcess
) -> None:
    with ExitStack() as stack:
        start_worker(stack, broker, "speak", speak)

        async def body(peer: Peer) -> None:
            task_id = (await peer.call("enqueue", service="speak", text="a b c"))["result"]["id"]
            request_id = await peer.send("stream", task=task_id)
            answer = await peer.answer(request_id)
            chunks = [m["chunk"] for m in peer.others if m.get("id") == request_id]
            assert [c["text"] for c in chunks] == ["a ", "b ", "c "]
            assert [c["offset"] for c in chunks] == [0, 1, 2]
            assert answer["result"]["frames"] == [{"text": "spoken"}]

        run_ws(gateway, body)


def test_subscribe_publish_and_unsubscribe_events(gateway: GatewayProcess) -> None:
    async def body(peer: Peer) -> None:
        assert (await peer.call("subscribe", topic="room."))["ok"]
        # When one event is published, once: the gateway waits until the bus's
        # subscription to it has reached its publishing socket
        await peer.call("publish", topic="room.1", payload={"say": "hi"})
        # Then it arrives
        async with asyncio.timeout(DEADLINE_S):
            event = await peer.next(lambda m: "event" in m)
        assert event["event"]["type"] == "room.1"
        assert event["event"]["payload"] == {"say": "hi"}
        assert (await peer.call("unsubscribe", topic="room."))["ok"]
        refused = await peer.call("publish", topic="worker.down", payload=1)
        assert refused["error"]["code"] == "forbidden"

    run_ws(gateway, body)


def test_bad_messages_get_errors_and_the_socket_lives_on(gateway: GatewayProcess) -> None:
    async def body(peer: Peer) -> None:
        await peer.ws.send_str("{not json")
        bad_json = await peer.next(lambda m: m.get("ok") is False)
        assert bad_json["id"] is None and bad_json["error"]["code"] == "bad_request"
        unknown = await peer.call("explode")
        assert unknown["error"]["code"] == "bad_request"
        missing = await peer.call("result", task="nosuchtask")
        assert missing["error"]["code"] == "not_found"
        bad = await peer.call("enqueue", service="s", base64="***")
        assert bad["error"]["code"] == "bad_request"
        await peer.ws.send_bytes(b"\x00\x01")
        binary = await peer.next(lambda m: m.get("ok") is False)
        assert "JSON text" in binary["error"]["message"]
        assert (await peer.call("enqueue", service="s", text="still here"))["ok"]

    run_ws(gateway, body)


def test_a_websocket_needs_a_token_when_tokens_are_configured(
    broker: BrokerProcess, gateway_factory: Callable[..., GatewayProcess], tmp_path: Any
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        '[[token]]\nprincipal = "p"\ntoken = "a-token-of-enough-length"\n'
        'roles = ["client"]\nservices = ["mine"]\n'
    )
    gateway = gateway_factory(broker, "--tokens", str(tokens))

    async def refused() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"{gateway.url}/ws"):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(refused()) == 401

    async def body(peer: Peer) -> None:
        assert (await peer.call("enqueue", service="mine", text="x"))["ok"]
        other = await peer.call("enqueue", service="theirs", text="x")
        assert other["error"]["code"] == "forbidden"
        figures = await peer.call("queues")
        assert figures["error"]["code"] == "forbidden"

    run_ws(gateway, body, token="a-token-of-enough-length")


def test_queues_workers_and_stats_are_the_rest_documents(gateway: GatewayProcess) -> None:
    http = gateway.http()
    http.post("/api/v1/tasks", {"service": "seen", "text": "x"})
    rest = http.get("/api/v1/queues").json
    http.close()

    async def body(peer: Peer) -> None:
        # the same document (ages and rates move with time: the keys and counts do not)
        (row,) = (await peer.call("queues"))["result"]
        assert row.keys() == rest[0].keys() and (row["service"], row["ready"]) == ("seen", 1)
        assert (await peer.call("workers"))["result"] == []
        assert "uptime_s" in (await peer.call("stats"))["result"]

    run_ws(gateway, body)
