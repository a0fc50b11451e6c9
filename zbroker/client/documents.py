"""The JSON documents of the inspection answers: what `zbroker queues --json`,
`workers --json`, `task --json`, `dlq list --json` print and what `zbroker web`
serves under /api/v1. One home, so the command line and the HTTP API cannot
drift apart.

Pure functions over what the client calls return; no I/O.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from zbroker.client.durable import DeadLetter, PayloadPreview, TaskStatus
from zbroker.protocol.events import Event

# The prefix of a bytes value that is not UTF-8, shown as base64.
BASE64_PREFIX = "base64:"


def jsonable(value: Any) -> Any:
    """`value` as JSON can hold it: bytes become text when they are UTF-8, else
    "base64:..."; tuples become lists; NaN and infinities become their names; an
    unknown type (a msgpack extension, say) its repr, never a crash."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return BASE64_PREFIX + base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    if value is None or isinstance(value, str | int | float):
        return value
    return repr(value)


def queues_document(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`zbroker queues --json`: every service's row of `Client.queues()`."""
    return jsonable(rows)  # type: ignore[no-any-return]


def workers_document(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`zbroker workers --json`: every worker's row of `Client.workers()`."""
    return jsonable(rows)  # type: ignore[no-any-return]


def tasks_document(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`zbroker tasks --json`: a page of a service's tasks in one state."""
    return jsonable(rows)  # type: ignore[no-any-return]


def stats_document(view: dict[str, Any]) -> dict[str, Any]:
    """`zbroker status --json`: the broker's STATS answer, without its request id."""
    shown = {k: v for k, v in view.items() if k != "rid"}
    return jsonable(shown)  # type: ignore[no-any-return]


def task_document(status: TaskStatus) -> dict[str, Any]:
    """`zbroker task --json`: one task's record and history, and `payload` (as
    payload_document) when the status was asked with a preview."""
    out = dataclasses.asdict(status)
    del out["payload"]
    out["state"] = status.state.value
    shown: dict[str, Any] = jsonable(out)
    if status.payload is not None:
        shown["payload"] = payload_document(status.payload)
    return shown


def payload_document(payload: PayloadPreview) -> dict[str, Any]:
    """The start of a payload: its frame and byte counts, and the preview as
    data_document. A preview cut inside a UTF-8 character still shows as text."""
    preview = payload.preview
    if len(preview) < payload.total_bytes:
        preview = _without_cut_character(preview)
    return {
        "frames": payload.frames,
        "bytes": payload.total_bytes,
        "preview": data_document(preview),
    }


def _without_cut_character(data: bytes) -> bytes:
    """`data` less a UTF-8 character its end cuts short (up to 3 bytes), if it is
    UTF-8 but for that; else `data` as it is."""
    try:
        data.decode()
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
            return data[: exc.start]
    return data


def dead_letters_document(letters: Sequence[DeadLetter]) -> list[dict[str, Any]]:
    """`zbroker dlq list --json`: a service's dead letters, oldest first."""
    return [jsonable(dataclasses.asdict(letter)) for letter in letters]


def event_document(event: Event) -> dict[str, Any]:
    """`zbroker tail --json`: one event of the bus (optional fields only when set)."""
    record: dict[str, Any] = {
        "type": event.type,
        "source": event.source,
        "payload": jsonable(event.payload),
        "timestamp": event.timestamp,
    }
    if event.correlation_id is not None:
        record["correlation_id"] = event.correlation_id
    if event.reply_to is not None:
        record["reply_to"] = event.reply_to
    return record


def data_document(data: bytes) -> dict[str, str]:
    """Bytes as `{"text": ...}` when they are UTF-8, else `{"base64": ...}` (the shape of
    `zbroker tail --task --json` chunks and of the gateway's results)."""
    try:
        return {"text": data.decode()}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}
