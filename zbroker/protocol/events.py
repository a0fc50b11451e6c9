"""Topic events on the pub/sub bus: two frames, the topic and a msgpack envelope.

Frame 0 is the event type used as the topic (subscribers filter by prefix),
frame 1 is a msgpack map ``{type, source, payload, timestamp}`` plus the
optional ``correlation_id`` and ``reply_to``.  A batch of events of one type
carries instead of ``payload`` either ``payloads`` (a non-empty array, one event
per element) or ``fields`` and ``rows`` (one event per row, its payload the map
of the fields to the row's values) (docs/protocol.md §6).  Pure codec, no sockets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.limits import MAX_BATCH_EVENTS as MAX_BATCH_EVENTS
from zbroker.protocol.limits import MAX_TOPIC_BYTES as MAX_TOPIC_BYTES


@dataclass(frozen=True, slots=True)
class Event:
    """One event as published on the bus."""

    type: str
    source: str
    payload: Any
    timestamp: float
    correlation_id: str | None = None
    reply_to: str | None = None


def encode_event(event: Event) -> list[bytes]:
    """Event -> [topic, envelope]. Raises ValueError for a type no subscriber could match."""
    return _encode(
        event.type,
        _envelope(
            event.type,
            event.source,
            float(event.timestamp),
            "payload",
            event.payload,
            event.correlation_id,
            event.reply_to,
        ),
    )


def encode_events(
    type: str,
    source: str,
    payloads: Sequence[Any],
    timestamp: float,
    correlation_id: str | None = None,
    reply_to: str | None = None,
) -> list[bytes]:
    """A batch: [topic, envelope with `payloads`], one event per payload, in order."""
    if isinstance(payloads, (str, bytes, bytearray, memoryview)) or not payloads:
        raise ValueError("payloads must be a non-empty sequence (one payload per event)")
    data = list(payloads)
    return _encode(
        type, _envelope(type, source, float(timestamp), "payloads", data, correlation_id, reply_to)
    )


def _encode(type: str, envelope: dict[str, Any]) -> list[bytes]:
    topic = type.encode()
    if not topic or len(topic) > MAX_TOPIC_BYTES:
        raise ValueError(f"event type must be 1..{MAX_TOPIC_BYTES} bytes of UTF-8")
    return [topic, msgpack.packb(envelope, use_bin_type=True)]


# The fields of the broker's three per-task events (docs/protocol.md §6.1), in the
# order of the rows the core makes for them.
ENQUEUED_FIELDS = ("id", "priority", "not_before", "headers")
STARTED_FIELDS = ("id", "attempt", "worker")
DONE_FIELDS = ("id", "attempt", "headers")


def encode_rows(
    type: str,
    source: str,
    fields: Sequence[str],
    rows: Sequence[Sequence[Any]],
    timestamp: float,
    correlation_id: str | None = None,
    reply_to: str | None = None,
) -> list[bytes]:
    """A batch in rows: [topic, envelope with `fields` and `rows`], one event per row,
    its payload the map of `fields` to the row's values (docs/protocol.md §6)."""
    _check_rows(fields, rows)
    envelope = _envelope(
        type, source, float(timestamp), "fields", list(fields), correlation_id, reply_to
    )
    envelope["rows"] = rows  # tuples pack as arrays, as lists do
    return _encode(type, envelope)


def encode_runs(
    runs: Sequence[tuple[str, Sequence[str] | None, Sequence[Any]]],
    source: str,
    timestamp: float,
    pack: Callable[[Any], bytes],
) -> list[tuple[bytes, bytes, int]]:
    """(topic, envelope, number of events) for each (type, fields, items) run, as the
    broker publishes its lifecycle events: with `fields`, the items are rows (tuples in
    the order of `fields`) and go out as a `rows` batch; without, they are payloads,
    a `payload` envelope for a run of one, a `payloads` batch for more. `pack` is a
    msgpack packer's `pack` (reused by the caller): one call per message, nothing
    built per event; nothing is checked (the core makes the runs)."""
    out = []
    for type, run_fields, items in runs:
        count = len(items)
        if run_fields is not None:
            envelope = _envelope(type, source, timestamp, "fields", run_fields, None, None)
            envelope["rows"] = items
        elif count == 1:
            envelope = _envelope(type, source, timestamp, "payload", items[0], None, None)
        else:
            envelope = _envelope(type, source, timestamp, "payloads", items, None, None)
        out.append((type.encode(), pack(envelope), count))
    return out


def _check_rows(fields: Any, rows: Any) -> None:
    """What §6 asks of a `rows` batch; ValueError says what is wrong."""
    if isinstance(fields, (str, bytes)) or not isinstance(fields, (list, tuple)) or not fields:
        raise ValueError("fields must be a non-empty array of field names")
    if not all(isinstance(name, str) for name in fields) or len(set(fields)) != len(fields):
        raise ValueError("fields must be distinct strings")
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("rows must be a non-empty array (one row per event)")
    width = len(fields)
    for row in rows:
        if not isinstance(row, (list, tuple)) or len(row) != width:
            raise ValueError(f"every row must be an array of {width} values, one per field")


def _envelope(
    type: str,
    source: str,
    timestamp: float,
    key: str,
    data: Any,
    correlation_id: str | None,
    reply_to: str | None,
) -> dict[str, Any]:
    """The envelope map of §6; `key` is "payload" (one event), "payloads" or "fields"
    (a batch; "fields" goes with "rows", which the caller adds)."""
    envelope: dict[str, Any] = {"type": type, "source": source, key: data, "timestamp": timestamp}
    if correlation_id is not None:
        envelope["correlation_id"] = correlation_id
    if reply_to is not None:
        envelope["reply_to"] = reply_to
    return envelope


def decode_event(frames: Sequence[bytes]) -> Event:
    """[topic, envelope] of one event -> Event; anything else (a batch of several
    events included) is a ProtocolError."""
    events = decode_events(frames)
    if len(events) != 1:
        raise ProtocolError("bad_event", f"the envelope holds {len(events)} events")
    return events[0]


def decode_events(frames: Sequence[bytes]) -> list[Event]:
    """[topic, envelope] -> its events in order: one, or one per element of a batch's
    `payloads`, or one per row of a batch in rows (its payload the map of `fields` to
    the row). A message that breaks docs/protocol.md §6 is a ProtocolError."""
    envelope = _unpack_envelope(frames)
    event_type = envelope.get("type")
    source = envelope.get("source", "")
    if not isinstance(event_type, str) or not isinstance(source, str):
        raise ProtocolError("bad_event", "type and source must be strings")
    timestamp = _timestamp(envelope.get("timestamp", 0.0))
    correlation_id = envelope.get("correlation_id")
    reply_to = envelope.get("reply_to")
    if not isinstance(correlation_id, str):
        correlation_id = None
    if not isinstance(reply_to, str):
        reply_to = None
    payloads = _payloads(envelope)
    if len(payloads) == 1:
        return [Event(event_type, source, payloads[0], timestamp, correlation_id, reply_to)]
    return [
        _event(event_type, source, payload, timestamp, correlation_id, reply_to)
        for payload in payloads
    ]


def _unpack_envelope(frames: Sequence[bytes]) -> dict[Any, Any]:
    """The envelope map of [topic, envelope] (§6), or a ProtocolError."""
    if len(frames) != 2:
        raise ProtocolError("bad_event", f"an event has 2 frames, got {len(frames)}")
    try:
        envelope = msgpack.unpackb(frames[1], raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_event", f"envelope is not msgpack: {exc}") from None
    if not isinstance(envelope, dict):
        raise ProtocolError("bad_event", "envelope is not a map")
    return envelope


def _timestamp(value: Any) -> float:
    """An envelope's `timestamp` as a finite float (an integer one too large for a
    float is refused as not finite)."""
    if type(value) is float:
        timestamp: float = value
    elif type(value) is int:
        timestamp = float(value) if abs(value) < 1 << 53 else math.inf
    else:
        raise ProtocolError("bad_event", "timestamp must be a number")
    if not math.isfinite(timestamp):
        raise ProtocolError("bad_event", "timestamp must be a finite number")
    return timestamp


def _payloads(envelope: dict[Any, Any]) -> list[Any]:
    """One payload per event of the envelope: its `payload`, its `payloads`, or a map
    per row of its `rows` (at most one of the three, §6)."""
    forms = ("payload" in envelope) + ("payloads" in envelope) + ("rows" in envelope)
    if forms > 1:
        raise ProtocolError("bad_event", "envelope holds more than one of payload, payloads, rows")
    if "rows" in envelope:
        names: Any = envelope.get("fields")
        rows: Any = envelope["rows"]
        try:
            _check_rows(names, rows)
        except ValueError as exc:
            raise ProtocolError("bad_event", str(exc)) from None
        return [dict(zip(names, row, strict=True)) for row in rows]
    if "payloads" in envelope:
        payloads = envelope["payloads"]
        if not isinstance(payloads, list) or not payloads:
            raise ProtocolError("bad_event", "payloads must be a non-empty array")
        return payloads
    return [envelope.get("payload")]


# A batch makes one Event per element: built through the slots' own descriptors,
# which skips the frozen dataclass's __init__ (one object.__setattr__ call per
# field) and halves the cost of an event. Same fields, same object, same equality.
# A compiled (mypyc) Event refuses object.__new__, and its own __init__ is cheap.
_new_event = object.__new__
try:
    _set_type, _set_source, _set_payload, _set_timestamp, _set_correlation_id, _set_reply_to = (
        vars(Event)[f.name].__set__ for f in fields(Event)
    )
    _new_event(Event)
    _SLOT_BUILT = True
except (TypeError, KeyError, AttributeError):
    _SLOT_BUILT = False


def _event(
    type: str,
    source: str,
    payload: Any,
    timestamp: float,
    correlation_id: str | None,
    reply_to: str | None,
) -> Event:
    if not _SLOT_BUILT:
        return Event(type, source, payload, timestamp, correlation_id, reply_to)
    event: Event = _new_event(Event)
    _set_type(event, type)
    _set_source(event, source)
    _set_payload(event, payload)
    _set_timestamp(event, timestamp)
    _set_correlation_id(event, correlation_id)
    _set_reply_to(event, reply_to)
    return event
