"""The WebSocket at /ws: events and the task API for a browser page, as JSON messages.

Each request is `{"id": ..., "op": ..., ...}`; its answer echoes the id:
`{"id", "ok": true, "result"}` or `{"id", "ok": false, "error": {"code", "message"}}`.
A `stream` request also gets `{"id", "chunk": {...}}` messages before its answer;
followed events come as `{"event": {...}}`, and `{"dropped": n}` when a reader too
slow for them lost some. Requests run concurrently (at most MAX_IN_FLIGHT per
connection); docs/web.md lists every op.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import WSMsgType, web

from zbroker.client.documents import event_document
from zbroker.client.errors import ClientError
from zbroker.protocol.access import Principal
from zbroker.protocol.limits import MAX_PREVIEW_BYTES
from zbroker.web import api
from zbroker.web.api import check_topic
from zbroker.web.bus import Follower
from zbroker.web.errors import E_INTERNAL, ApiError, bad_request, from_client_error
from zbroker.web.gateway import GATEWAY, Gateway
from zbroker.web.routes import CALLER, OBSERVE
from zbroker.web.tasks import (
    DEFAULT_PREVIEW_BYTES,
    MAX_WAIT_S,
    cancel_document,
    check_task,
    read_enqueue,
    record_document,
    result_document,
    stream_documents,
)

log = logging.getLogger("zbroker.web")

# Requests of one connection running at once; more are refused (too_many_waiters).
MAX_IN_FLIGHT: Final = 256
HEARTBEAT_S: Final = 20.0

Sockets = weakref.WeakSet[web.WebSocketResponse]
SOCKETS: Final[web.AppKey[Sockets]] = web.AppKey("websockets")


class Session:
    """One WebSocket connection: its principal, its follower and its requests."""

    def __init__(self, gateway: Gateway, ws: web.WebSocketResponse, who: Principal) -> None:
        self.gateway = gateway
        self.ws = ws
        self.who = who
        self.follower: Follower | None = None
        self.pump: asyncio.Task[None] | None = None
        self.running: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message, separators=(",", ":"), allow_nan=False)
        async with self._send_lock:
            if not self.ws.closed:
                await self.ws.send_str(text)

    def start(self, raw: str) -> None:
        """Run the request in `raw` beside the others."""
        if len(self.running) >= MAX_IN_FLIGHT:
            task = asyncio.ensure_future(self._refuse(raw))
        else:
            task = asyncio.ensure_future(self._answer(raw))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _refuse(self, raw: str) -> None:
        error = ApiError("too_many_waiters", f"at most {MAX_IN_FLIGHT} requests at once")
        await self.send({"id": _request_id(raw), "ok": False, **error.document()})

    async def _answer(self, raw: str) -> None:
        request_id: Any = None
        try:
            try:
                message = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise bad_request(f"a message must be JSON: {exc}") from None
            if not isinstance(message, dict):
                raise bad_request("a message must be a JSON object")
            request_id = message.get("id")
            op = OPS.get(message.get("op"))  # type: ignore[arg-type]
            if op is None:
                raise bad_request(f"op must be one of {', '.join(OPS)}")
            result = await op(self, request_id, message)
            await self.send({"id": request_id, "ok": True, "result": result})
        except ApiError as exc:
            await self.send({"id": request_id, "ok": False, **exc.document()})
        except ClientError as exc:
            await self.send({"id": request_id, "ok": False, **from_client_error(exc).document()})
        except (ValueError, TypeError) as exc:
            await self.send({"id": request_id, "ok": False, **bad_request(str(exc)).document()})
        except ConnectionError:
            pass  # the page left while its request ran
        except Exception:
            log.exception("WebSocket request %r failed", request_id)
            failed = ApiError(E_INTERNAL, "the gateway failed; see its log")
            await self.send({"id": request_id, "ok": False, **failed.document()})

    def _follow(self) -> Follower:
        if self.follower is None:
            self.follower = self.gateway.hub.follower()
            self.pump = asyncio.ensure_future(self._pump(self.follower))
        return self.follower

    async def _pump(self, follower: Follower) -> None:
        reported = 0
        while True:
            event = await follower.queue.get()
            if follower.dropped > reported:
                await self.send({"dropped": follower.dropped - reported})
                reported = follower.dropped
            await self.send({"event": event_document(event)})

    async def close(self) -> None:
        tasks = [*self.running, *([self.pump] if self.pump else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.follower is not None:
            self.follower.close()


def _request_id(raw: str) -> Any:
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(raw).get("id")
    return None


def _task(message: dict[str, Any]) -> str:
    task_id = message.get("task")
    if not isinstance(task_id, str) or not task_id:
        raise bad_request("task must be a task id")
    return task_id


def _number(message: dict[str, Any], name: str, default: float, top: float) -> float:
    value = message.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= top:
        raise bad_request(f"{name} must be a number 0..{top:g}")
    return float(value)


# ------------------------------------------------------------------------ ops


async def _subscribe(s: Session, rid: Any, message: dict[str, Any]) -> Any:
    topic = check_topic(s.who, message.get("topic", ""), publish=False)
    s._follow().subscribe(topic)
    return {"topic": topic}


async def _unsubscribe(s: Session, rid: Any, message: dict[str, Any]) -> Any:
    topic = message.get("topic", "")
    if s.follower is not None and isinstance(topic, str):
        s.follower.unsubscribe(topic)
    return {"topic": topic}


async def _publish(s: Session, rid: Any, message: dict[str, Any]) -> Any:
    topic = check_topic(s.who, message.get("topic"), publish=True)
    fields = {k: message[k] for k in ("correlation_id", "reply_to") if message.get(k) is not None}
    if not all(isinstance(v, str) for v in fields.values()):
        raise bad_request("correlation_id and reply_to must be strings")
    event = await s.gateway.hub.publish(topic, message.get("payload"), **fields)
    return {"published": event_document(event)}


async def _enqueue(s: Session, rid: Any, message: dict[str, Any]) -> Any:
    body = {k: v for k, v in message.items() if k not in ("id", "op")}
    service, payload, options = read_enqueue(body, s.who)
    task_id = await s.gateway.client.enqueue(service, payload, options=options)
    return {"id": str(task_id), "existing": task_id.existing}


async def _result(s: Session, rid: Any, message: dict[str, Any]) -> Any:
    wait_s = _number(message, "wait_s", 0.0, MAX_WAIT_S)
    return await result_document(s.gateway.client, s.who, _task(message), wait_s)


async def _status(s: Session, rid: Any, message: dict[str, Any]) -> Any:
    preview = message.get("preview", DEFAULT_PREVIEW_BYTES)
    if type(preview) is not int or not 0 <= preview <= MAX_PREVIEW_BYTES:
        raise bad_request(f"preview must be an integer 0..{MAX_PREVIEW_BYTES}")
    return await record_document(s.gateway.client, s.who, _task(message), preview)


async def _stream(s: Session, rid: Any, message: dict[str, Any]) -> Any:
    task_id = _task(message)
    offset = int(_number(message, "offset", 0, 2**53))
    client = s.gateway.client
    await check_task(client, s.who, task_id)
    documents = stream_documents(client, task_id, offset)
    try:
        async for doc in documents:
            if "state" in doc:
                return doc
            await s.send({"id": rid, "chunk": doc})
    finally:
        await documents.aclose()
    raise AssertionError("a stream ends with its end document")


async def _cancel(s: Session, rid: Any, message: dict[str, Any]) -> Any:
    return await cancel_document(s.gateway.client, s.who, _task(message))


def _observed(read: Callable[[Gateway, Any, Principal], Awaitable[Any]]) -> Op:
    """An op answering what the REST route `read` answers, for observers and admins."""

    async def op(s: Session, rid: Any, message: dict[str, Any]) -> Any:
        s.gateway.authorize_principal(s.who, OBSERVE)
        return await read(s.gateway, None, s.who)

    return op


Op = Callable[[Session, Any, dict[str, Any]], Awaitable[Any]]
OPS: Final[dict[str, Op]] = {
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "publish": _publish,
    "enqueue": _enqueue,
    "result": _result,
    "status": _status,
    "stream": _stream,
    "cancel": _cancel,
    "queues": _observed(api.queues),
    "workers": _observed(api.workers),
    "stats": _observed(api.stats),
}


async def handle(request: web.Request) -> web.StreamResponse:
    """Upgrade to a WebSocket (the caller's token checked first) and serve it."""
    gateway = request.app[GATEWAY]
    who = gateway.authorize(request, CALLER)
    ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=gateway.settings.max_body_bytes)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    session = Session(gateway, ws, who)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                session.start(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await session.send(
                    {"id": None, "ok": False, **bad_request("messages are JSON text").document()}
                )
    finally:
        await session.close()
    return ws


async def close_all(app: web.Application) -> None:
    """At shutdown: close every WebSocket (going away)."""
    sockets: Sockets = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=1001, message=b"server shutdown")
