"""What the REST routes and the WebSocket share about tasks: reading an enqueue
from JSON, checking that a caller may touch a task, and results as JSON.

A task enqueued through the gateway carries its HTTP principal in the header
OWNER_HEADER: at the broker every such task belongs to the gateway's own key, so
the gateway keeps callers apart itself (docs/web.md, "Authentication").
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator
from typing import Any, Final

from zbroker.client.aclient import AsyncClient
from zbroker.client.documents import data_document, task_document
from zbroker.client.durable import TaskStatus
from zbroker.client.errors import TaskFailed, TaskPending
from zbroker.client.options import TaskOptions
from zbroker.protocol.access import Principal
from zbroker.web.errors import ApiError, bad_request

OWNER_HEADER: Final = "web.principal"
# The longest a result call (REST or WebSocket) may wait for a task to end.
MAX_WAIT_S: Final = 300.0
# Payload bytes a task's record shows (GET /tasks/{id}, WebSocket `status`) when the
# caller does not say.
DEFAULT_PREVIEW_BYTES: Final = 1024

# The keys of an enqueue's JSON besides its options.
_PAYLOAD_KEYS: Final = ("payload", "text", "base64")
# Options of TaskOptions a JSON enqueue may give, with the JSON types each takes.
_NUMBER: Final = (int, float)
OPTION_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "priority": (int,),
    "delay_s": _NUMBER,
    "not_before": _NUMBER,
    "ttl_s": _NUMBER,
    "max_attempts": (int,),
    "timeout_s": _NUMBER,
    "key": (str,),
    "headers": (dict,),
    "depends_on": (list,),
    "run_anyway": (bool,),
    "input": (str,),
    "require": (list,),
    "prefer": (list,),
    "affinity": (str,),
    "concurrency_key": (str,),
    "debounce_s": _NUMBER,
}

ENQUEUE_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["service"],
    "additionalProperties": False,
    "properties": {
        "service": {"type": "string", "minLength": 1},
        "payload": {"description": "Any JSON value: the payload is its UTF-8 JSON text."},
        "text": {"type": "string", "description": "The payload as UTF-8 text."},
        "base64": {"type": "string", "description": "The payload's bytes, base64."},
        "priority": {"type": "integer", "minimum": -128, "maximum": 127},
        "delay_s": {"type": "number", "minimum": 0},
        "not_before": {"type": "number", "description": "Seconds since the epoch."},
        "ttl_s": {"type": "number", "minimum": 0},
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "key": {"type": "string", "description": "Idempotency key."},
        "headers": {"type": "object"},
        "depends_on": {
            "type": "array",
            "items": {
                "oneOf": [
                    {"type": "string", "description": "A task id."},
                    {
                        "type": "object",
                        "required": ["service", "key"],
                        "properties": {"service": {"type": "string"}, "key": {"type": "string"}},
                    },
                ]
            },
        },
        "run_anyway": {"type": "boolean"},
        "input": {"type": "string", "enum": ["result", "results"]},
        "require": {"type": "array", "items": {"type": "string"}},
        "prefer": {"type": "array", "items": {"type": "string"}},
        "affinity": {"type": "string"},
        "concurrency_key": {"type": "string"},
        "debounce_s": {"type": "number", "exclusiveMinimum": 0},
    },
}

DATA_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "description": "Bytes: {text} when they are UTF-8, else {base64}.",
    "properties": {"text": {"type": "string"}, "base64": {"type": "string"}},
}

RESULT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["id", "state"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string"},
        "pending": {"type": "boolean", "description": "True: not ended yet (HTTP 202)."},
        "frames": {"type": "array", "items": DATA_SCHEMA},
        "result": {"oneOf": [DATA_SCHEMA, {"type": "null"}]},
    },
}


def json_body(raw: bytes) -> Any:
    """`raw` as JSON; ApiError bad_request when it is not (UTF-8) JSON."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not JSON: {exc}") from None


def _payload(body: dict[str, Any]) -> bytes:
    given = [k for k in _PAYLOAD_KEYS if k in body]
    if len(given) > 1:
        raise bad_request("give one of payload, text and base64")
    if not given:
        return b""
    value = body[given[0]]
    if given[0] == "payload":
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    if not isinstance(value, str):
        raise bad_request(f"{given[0]} must be a string")
    if given[0] == "text":
        return value.encode()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("base64 is not valid base64") from None


def _dependency(ref: Any) -> str | tuple[str, str]:
    if isinstance(ref, str):
        return ref
    if isinstance(ref, dict) and set(ref) == {"service", "key"}:
        return (str(ref["service"]), str(ref["key"]))
    raise bad_request("depends_on items are task ids or {service, key} objects")


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """The TaskOptions keywords of an enqueue's JSON, each of its JSON type."""
    options: dict[str, Any] = {}
    for name, value in body.items():
        if name == "service" or name in _PAYLOAD_KEYS:
            continue
        types = OPTION_TYPES.get(name)
        if types is None:
            raise bad_request(f"unknown field {name!r}")
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise bad_request(f"{name} has the wrong type")
        options[name] = value
    if "depends_on" in options:
        options["depends_on"] = tuple(_dependency(r) for r in options["depends_on"])
    for name in ("require", "prefer"):
        if name in options:
            options[name] = tuple(options[name])
    return options


def read_enqueue(body: Any, principal: Principal) -> tuple[str, bytes, TaskOptions]:
    """The service, payload and options of an enqueue's JSON (ApiError when wrong).
    A principal that is not an admin must be allowed the service, and its name goes
    into the task's OWNER_HEADER."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    service = body.get("service")
    if not isinstance(service, str) or not service:
        raise bad_request("service must be a non-empty string")
    if not principal.may_request(service):
        raise ApiError("forbidden", f"principal {principal.name!r} may not enqueue to {service!r}")
    options = _options(body)
    headers = dict(options.get("headers") or {})
    if OWNER_HEADER in headers:
        raise bad_request(f"header {OWNER_HEADER!r} is the gateway's to set")
    if not principal.admin:
        headers[OWNER_HEADER] = principal.name
    if headers:
        options["headers"] = headers
    try:
        return service, _payload(body), TaskOptions(**options)
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc)) from None


async def owned(
    client: AsyncClient, principal: Principal, task_id: str, preview: int = 0
) -> TaskStatus | None:
    """Check that `principal` may act on `task_id`: an admin always (None is returned,
    nothing asked), anyone else only on the tasks it enqueued through the gateway
    (the status is returned, with `preview` bytes of the payload). Someone else's
    task is `not_found`, as an unknown id."""
    if principal.admin:
        return None
    status = await client.status(task_id, preview)
    if status.headers.get(OWNER_HEADER) != principal.name:
        raise ApiError("not_found", f"no task {task_id!r} of {principal.name!r}")
    return status


async def record_document(
    client: AsyncClient, principal: Principal, task_id: str, preview: int = 0
) -> Any:
    """A task's record and history (`zbroker task --json`): any task's for an observer
    or an admin, only its own for anyone else. With `preview`, `payload` shows the
    payload's first bytes (payload_document), or null when the broker no longer holds it."""
    mine = None if principal.may_observe() else await owned(client, principal, task_id, preview)
    status = mine or await client.status(task_id, preview)
    document = task_document(status)
    if preview:
        document.setdefault("payload", None)
    return document


async def result_document(
    client: AsyncClient, principal: Principal, task_id: str, wait_s: float
) -> dict[str, Any]:
    """A task's result as RESULT_SCHEMA: its frames once done; `pending` with its state
    when it has not ended within `wait_s`; ApiError task_failed when it ended without."""
    await owned(client, principal, task_id)
    try:
        frames = await client.result_frames(task_id, timeout_s=wait_s)
    except TaskPending as exc:
        return {"id": task_id, "state": exc.state or "pending", "pending": True}
    except TaskFailed as exc:
        raise ApiError(
            "task_failed", str(exc), state=str(exc.state), task_id=task_id, reason=exc.error
        ) from None
    return end_document(task_id, frames)


def end_document(task_id: str, frames: list[bytes]) -> dict[str, Any]:
    """A done task's result frames (RESULT_SCHEMA): `result` is the only frame (b""
    for none), null for several."""
    docs = [data_document(f) for f in frames]
    only = docs[0] if len(docs) == 1 else (data_document(b"") if not docs else None)
    return {"id": task_id, "state": "done", "frames": docs, "result": only}


async def check_task(client: AsyncClient, principal: Principal, task_id: str) -> None:
    """ApiError or TaskNotFound unless `task_id` exists and `principal` may act on it."""
    if await owned(client, principal, task_id) is None:
        await client.status(task_id)


async def stream_documents(
    client: AsyncClient, task_id: str, offset: int
) -> AsyncGenerator[dict[str, Any]]:
    """A task's stream from `offset`: each chunk as `{"offset", "attempt", DATA}`, then
    its end_document (which alone has a `state`). A task that ended without a result
    raises its TaskFailed after its chunks. Closing this closes the stream (the task
    runs on)."""
    async with client.read_stream(task_id, offset) as stream:
        async for chunk in stream:
            yield {"offset": stream.offset - 1, "attempt": stream.attempt, **data_document(chunk)}
        frames = stream.result_frames
    yield end_document(task_id, frames)


async def cancel_document(client: AsyncClient, principal: Principal, task_id: str) -> Any:
    """Cancel a task the principal may act on: `{"id", "was"}` (its state before)."""
    await owned(client, principal, task_id)
    was = await client.cancel(task_id)
    return {"id": task_id, "was": str(was.value)}
