"""The REST API under /api/v1: the route table and its handlers.

Each handler takes the Gateway, the request, the caller's principal (already
allowed the route's `access`) and the parsed parameters, and returns a JSON-able
value (200) or a response of its own (SSE, 202). The OpenAPI document is made
from ROUTES (zbroker.web.routes), so the two never drift.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

from aiohttp import web

from zbroker.client.documents import (
    dead_letters_document,
    event_document,
    queues_document,
    stats_document,
    tasks_document,
    workers_document,
)
from zbroker.client.errors import ClientError, Forbidden
from zbroker.protocol.access import Principal
from zbroker.protocol.limits import MAX_PREVIEW_BYTES, MAX_TOPIC_BYTES
from zbroker.protocol.states import LISTABLE_STATES
from zbroker.web.errors import ApiError, bad_request, from_client_error
from zbroker.web.gateway import Gateway
from zbroker.web.routes import ADMIN_ONLY, CALLER, OBSERVE, PUBLIC, Param, Route, Schema
from zbroker.web.tasks import (
    DEFAULT_PREVIEW_BYTES,
    ENQUEUE_SCHEMA,
    MAX_WAIT_S,
    RESULT_SCHEMA,
    cancel_document,
    check_task,
    json_body,
    read_enqueue,
    record_document,
    result_document,
    stream_documents,
)

# How long an SSE response stays silent before a
# comment line keeps proxies (and the gateway) aware that the connection lives.
SSE_KEEPALIVE_S: Final = 15.0
HEALTH_TIMEOUT_S: Final = 2.0

_OBJECT: Final[Schema] = {"type": "object"}
_ROWS: Final[Schema] = {"type": "array", "items": {"type": "object"}}

# --------------------------------------------------------------------- helpers


async def _body(request: web.Request, *, optional: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip() and optional:
        return {}
    body = json_body(raw)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def _ids(body: dict[str, Any]) -> list[str] | None:
    ids = body.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise bad_request("ids must be a list of task ids")
    return ids


async def sse_open(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


async def sse_send(
    response: web.StreamResponse, event: str, data: Any, event_id: int | None = None
) -> None:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    await response.write(f"{head}data: {text}\n\n".encode())


# ---------------------------------------------------------------- inspection


async def health(gw: Gateway, request: web.Request, who: Principal) -> Any:
    try:
        await asyncio.wait_for(gw.client.broker_stats(), HEALTH_TIMEOUT_S)
    except Forbidden:
        pass  # the broker answered: it is there, the gateway's key only may not observe
    except (ClientError, TimeoutError) as exc:
        raise ApiError("broker_unreachable", f"the broker does not answer: {exc}") from None
    return {"status": "ok", "broker": gw.settings.endpoint}


async def queues(gw: Gateway, request: web.Request, who: Principal) -> Any:
    return queues_document(await gw.client.queues())


async def workers(gw: Gateway, request: web.Request, who: Principal) -> Any:
    return workers_document(await gw.client.workers())


async def stats(gw: Gateway, request: web.Request, who: Principal) -> Any:
    return stats_document(await gw.client.broker_stats())


# --------------------------------------------------------------------- tasks


async def enqueue(gw: Gateway, request: web.Request, who: Principal) -> Any:
    service, payload, options = read_enqueue(await _body(request), who)
    task_id = await gw.client.enqueue(service, payload, options=options)
    return {"id": str(task_id), "existing": task_id.existing}


async def list_tasks(
    gw: Gateway,
    request: web.Request,
    who: Principal,
    service: str,
    state: str,
    limit: int,
    after: int,
) -> Any:
    if state not in LISTABLE_STATES:
        raise bad_request(f"state must be one of {', '.join(LISTABLE_STATES)}")
    rows, next_after = await gw.client.tasks(service, state, limit=limit, after=after)
    return {"tasks": tasks_document(rows), "next_after": next_after}


async def get_task(gw: Gateway, request: web.Request, who: Principal, id: str, preview: int) -> Any:
    return await record_document(gw.client, who, id, preview)


async def task_result(
    gw: Gateway, request: web.Request, who: Principal, id: str, wait_s: float
) -> Any:
    answer = await result_document(gw.client, who, id, wait_s)
    if answer.get("pending"):
        return web.json_response(answer, status=202)
    return answer


async def task_stream(
    gw: Gateway, request: web.Request, who: Principal, id: str, offset: int
) -> web.StreamResponse:
    await check_task(gw.client, who, id)  # an unknown task is a 404, before any 200
    last = request.headers.get("Last-Event-ID", "")
    if last.isdigit():
        offset = int(last) + 1  # an EventSource reconnecting resumes after its last chunk
    response = await sse_open(request)
    documents = stream_documents(gw.client, id, offset)
    try:
        async for doc in documents:
            if "state" in doc:
                await sse_send(response, "result", doc)
            else:
                await sse_send(response, "chunk", doc, doc["offset"])
    except ClientError as exc:
        await sse_send(response, "error", from_client_error(exc).document())
    except ConnectionError:
        pass  # the caller left
    finally:
        await documents.aclose()
    return response


async def cancel(gw: Gateway, request: web.Request, who: Principal, id: str) -> Any:
    return await cancel_document(gw.client, who, id)


# --------------------------------------------------------------------- admin


async def pause(gw: Gateway, request: web.Request, who: Principal, service: str) -> Any:
    await gw.client.pause(service)
    return {"service": service, "paused": True}


async def resume(gw: Gateway, request: web.Request, who: Principal, service: str) -> Any:
    await gw.client.resume(service)
    return {"service": service, "paused": False}


async def purge(gw: Gateway, request: web.Request, who: Principal, service: str) -> Any:
    return {"service": service, "purged": await gw.client.purge(service)}


async def set_limit(gw: Gateway, request: web.Request, who: Principal, service: str) -> Any:
    body = await _body(request)
    cap, per_key = body.get("limit"), body.get("per_key", False)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise bad_request("limit must be a positive integer, or null for none")
    if not isinstance(per_key, bool):
        raise bad_request("per_key must be a boolean")
    await gw.client.limit(service, cap, per_key=per_key)
    return {"service": service, "limit": cap, "per_key": per_key}


async def dead_letters(
    gw: Gateway, request: web.Request, who: Principal, service: str, limit: int
) -> Any:
    return dead_letters_document(await gw.client.dead_letters(service, limit=limit))


async def redrive(gw: Gateway, request: web.Request, who: Principal, service: str) -> Any:
    ids = _ids(await _body(request, optional=True))
    return {"service": service, "redriven": await gw.client.redrive(service, ids)}


async def drop(gw: Gateway, request: web.Request, who: Principal, service: str) -> Any:
    ids = _ids(await _body(request, optional=True))
    return {"service": service, "dropped": await gw.client.drop_dead_letters(service, ids)}


async def drain(gw: Gateway, request: web.Request, who: Principal, id: str) -> Any:
    return {"worker": id, "tasks": await gw.client.drain(id)}


# -------------------------------------------------------------------- events


def check_topic(who: Principal, topic: Any, *, publish: bool) -> str:
    """`topic` if `who` may publish on it (or follow it, as a prefix); else ApiError."""
    if not isinstance(topic, str) or len(topic.encode()) > MAX_TOPIC_BYTES:
        raise bad_request(f"a topic is a string of at most {MAX_TOPIC_BYTES} bytes")
    allowed = who.may_publish(topic.encode()) if publish else who.may_subscribe(topic.encode())
    if not allowed:
        what = "publish on" if publish else "follow"
        raise ApiError("forbidden", f"principal {who.name!r} may not {what} {topic!r}")
    return topic


async def follow_events(
    gw: Gateway, request: web.Request, who: Principal, topic: str | None
) -> web.StreamResponse:
    # `topic` may repeat: every one given is read from the query.
    prefixes = [check_topic(who, t, publish=False) for t in request.query.getall("topic", [""])]
    follower = gw.hub.follower()
    response = web.StreamResponse()
    try:
        for prefix in prefixes:
            follower.subscribe(prefix)
        response = await sse_open(request)
        await response.write(b": following\n\n")
        reported = 0
        while True:
            try:
                event = await asyncio.wait_for(follower.queue.get(), SSE_KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if follower.dropped > reported:
                await sse_send(response, "dropped", {"count": follower.dropped - reported})
                reported = follower.dropped
            await sse_send(response, "event", event_document(event))
    except ConnectionError:
        return response  # the caller left
    finally:
        follower.close()


async def publish(gw: Gateway, request: web.Request, who: Principal) -> Any:
    body = await _body(request)
    topic = check_topic(who, body.get("topic"), publish=True)
    fields: dict[str, Any] = {}
    for name in ("correlation_id", "reply_to"):
        if body.get(name) is not None:
            if not isinstance(body[name], str):
                raise bad_request(f"{name} must be a string")
            fields[name] = body[name]
    try:
        event = await gw.hub.publish(topic, body.get("payload"), **fields)
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc)) from None
    return {"published": event_document(event)}


# --------------------------------------------------------------------- table

MAX_TASKS_PAGE: Final = 1000
MAX_DEAD_LETTERS: Final = 100_000


def _limit(maximum: int) -> Param:
    return Param(
        "limit", "query", "integer", "At most this many.", minimum=1, maximum=maximum, default=100
    )


_SERVICE = Param("service", "path", "string", "The service (queue) name.")
_TASK = Param("id", "path", "string", "The task id.")
_IDS_BODY: Final[Schema] = {
    "type": "object",
    "properties": {"ids": {"type": "array", "items": {"type": "string"}}},
    "description": "Only these task ids; no body (or no ids): all of them.",
}

ROUTES: Final[tuple[Route, ...]] = (
    Route(
        "GET",
        "/health",
        "health",
        "The gateway and its broker answer.",
        PUBLIC,
        health,
        answer=_OBJECT,
    ),
    Route(
        "GET",
        "/queues",
        "queues",
        "Every service's queue (`zbroker queues --json`).",
        OBSERVE,
        queues,
        answer=_ROWS,
    ),
    Route(
        "GET",
        "/workers",
        "workers",
        "Every worker (`zbroker workers --json`).",
        OBSERVE,
        workers,
        answer=_ROWS,
    ),
    Route(
        "GET",
        "/stats",
        "stats",
        "The broker's STATS (`zbroker status --json`).",
        OBSERVE,
        stats,
        answer=_OBJECT,
    ),
    Route(
        "POST",
        "/tasks",
        "enqueue",
        "Enqueue one durable task; answers its id.",
        CALLER,
        enqueue,
        body=ENQUEUE_SCHEMA,
        answer=_OBJECT,
        errors=("queue_full", "too_large", "conflict"),
    ),
    Route(
        "GET",
        "/tasks",
        "list_tasks",
        "A page of a service's tasks in one state.",
        OBSERVE,
        list_tasks,
        params=(
            Param("service", "query", "string", "The service.", required=True),
            Param("state", "query", "string", ", ".join(LISTABLE_STATES), default="ready"),
            _limit(MAX_TASKS_PAGE),
            Param(
                "after",
                "query",
                "integer",
                "The next_after of the previous page.",
                minimum=0,
                default=0,
            ),
        ),
        answer=_OBJECT,
    ),
    Route(
        "GET",
        "/tasks/{id}",
        "get_task",
        "One task's record and history, and the start of its payload: `payload` is"
        " {frames, bytes, preview} (preview {text} when UTF-8, else {base64}), or null"
        " when the broker no longer holds it; absent when `preview` is 0.",
        CALLER,
        get_task,
        params=(
            _TASK,
            Param(
                "preview",
                "query",
                "integer",
                "Bytes of the payload's first frame to show (0: no payload).",
                minimum=0,
                maximum=MAX_PREVIEW_BYTES,
                default=DEFAULT_PREVIEW_BYTES,
            ),
        ),
        answer=_OBJECT,
        errors=("not_found",),
    ),
    Route(
        "GET",
        "/tasks/{id}/result",
        "task_result",
        "A task's result; 202 with its state while it has not ended.",
        CALLER,
        task_result,
        params=(
            _TASK,
            Param(
                "wait_s",
                "query",
                "number",
                "Seconds to wait for the end.",
                minimum=0,
                maximum=MAX_WAIT_S,
                default=0.0,
            ),
        ),
        answer=RESULT_SCHEMA,
        errors=("not_found", "task_failed", "timeout"),
    ),
    Route(
        "GET",
        "/tasks/{id}/stream",
        "task_stream",
        "The task's chunks as Server-Sent Events (chunk, then result or error).",
        CALLER,
        task_stream,
        params=(
            _TASK,
            Param("offset", "query", "integer", "The first chunk.", minimum=0, default=0),
        ),
        events=True,
        errors=("not_found",),
    ),
    Route(
        "POST",
        "/tasks/{id}/cancel",
        "cancel",
        "Cancel a task that has not ended.",
        CALLER,
        cancel,
        params=(_TASK,),
        answer=_OBJECT,
        errors=("not_found", "conflict"),
    ),
    Route(
        "POST",
        "/queues/{service}/pause",
        "pause",
        "Stop deliveries of a service.",
        ADMIN_ONLY,
        pause,
        params=(_SERVICE,),
        answer=_OBJECT,
    ),
    Route(
        "POST",
        "/queues/{service}/resume",
        "resume",
        "Deliver a paused service again.",
        ADMIN_ONLY,
        resume,
        params=(_SERVICE,),
        answer=_OBJECT,
    ),
    Route(
        "POST",
        "/queues/{service}/purge",
        "purge",
        "Cancel every waiting task of a service.",
        ADMIN_ONLY,
        purge,
        params=(_SERVICE,),
        answer=_OBJECT,
    ),
    Route(
        "PUT",
        "/queues/{service}/limit",
        "set_limit",
        "At most `limit` tasks at once (null: none); `per_key`: per concurrency key.",
        ADMIN_ONLY,
        set_limit,
        params=(_SERVICE,),
        answer=_OBJECT,
        body={
            "type": "object",
            "properties": {
                "limit": {"type": ["integer", "null"], "minimum": 1},
                "per_key": {"type": "boolean"},
            },
        },
    ),
    Route(
        "GET",
        "/queues/{service}/dead",
        "dead_letters",
        "A service's dead letters.",
        ADMIN_ONLY,
        dead_letters,
        params=(
            _SERVICE,
            _limit(MAX_DEAD_LETTERS),
        ),
        answer=_ROWS,
    ),
    Route(
        "POST",
        "/queues/{service}/dead/redrive",
        "redrive",
        "Put dead letters back in their queue.",
        ADMIN_ONLY,
        redrive,
        params=(_SERVICE,),
        body=_IDS_BODY,
        answer=_OBJECT,
    ),
    Route(
        "POST",
        "/queues/{service}/dead/drop",
        "drop",
        "Delete dead letters for good.",
        ADMIN_ONLY,
        drop,
        params=(_SERVICE,),
        body=_IDS_BODY,
        answer=_OBJECT,
    ),
    Route(
        "POST",
        "/workers/{id}/drain",
        "drain",
        "Give a worker no new tasks.",
        ADMIN_ONLY,
        drain,
        params=(Param("id", "path", "string", "The worker id."),),
        answer=_OBJECT,
        errors=("not_found",),
    ),
    Route(
        "GET",
        "/events",
        "follow_events",
        "Events whose topic starts with a `topic` prefix (repeatable; none: all), as SSE.",
        CALLER,
        follow_events,
        params=(Param("topic", "query", "string", "A topic prefix."),),
        events=True,
    ),
    Route(
        "POST",
        "/events",
        "publish",
        "Publish one event (not on task., worker., schedule.).",
        CALLER,
        publish,
        answer=_OBJECT,
        body={
            "type": "object",
            "required": ["topic"],
            "properties": {
                "topic": {"type": "string"},
                "payload": {},
                "correlation_id": {"type": "string"},
                "reply_to": {"type": "string"},
            },
        },
    ),
)
