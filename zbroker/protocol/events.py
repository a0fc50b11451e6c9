"""Topic events on the pub/sub bus: two frames, the topic and a msgpack envelope.

Frame 0 is the event type used as the topic (subscribers filter by prefix),
frame 1 is a msgpack map ``{type, source, payload, timestamp}`` plus the
optional ``correlation_id`` and ``reply_to``.  A batch of events of one type
carries ``payloads`` (a non-empty array, one event per element) instead of
``payload`` (docs/protocol.md §6).  Pure codec, no sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from zbroker.protocol.errors import ProtocolError

MAX_TOPIC_BYTES = 255
# Events in one batch message, as the broker sends them; receivers accept any number.
MAX_BATCH_EVENTS = 1024


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


def encode_runs(
    runs: Sequence[tuple[str, Sequence[bytes]]], source: str, timestamp: float
) -> list[tuple[bytes, bytes, int]]:
    """(topic, envelope, number of events) for each (type, payloads) run, as the broker
    publishes its lifecycle events: a `payload` envelope for a run of one, a `payloads`
    batch for more. Each payload comes packed already (msgpack, `use_bin_type`), and
    is spliced into the envelope as it is: the bytes are those msgpack would make of
    the map `_envelope` builds. Types are not checked (the caller makes them)."""
    src = _SOURCE_KEY + msgpack.packb(source)
    tail = _TIMESTAMP_KEY + _FLOAT64.pack(0xCB, float(timestamp))
    out = []
    for type, payloads in runs:
        count = len(payloads)
        head = _TYPE_KEY + msgpack.packb(type) + src
        if count == 1:
            envelope = b"".join((head, _PAYLOAD_KEY, payloads[0], tail))
        else:
            envelope = b"".join((head, _PAYLOADS_KEY, _array_header(count), *payloads, tail))
        out.append((type.encode(), envelope, count))
    return out


# The envelope's fixed parts, for encode_runs: a map of four entries and its keys in
# `_envelope`'s order; a float is float64 (msgpack's choice for a Python float).
_TYPE_KEY = b"\x84" + msgpack.packb("type")
_SOURCE_KEY = msgpack.packb("source")
_PAYLOAD_KEY = msgpack.packb("payload")
_PAYLOADS_KEY = msgpack.packb("payloads")
_TIMESTAMP_KEY = msgpack.packb("timestamp")
_FLOAT64 = struct.Struct(">Bd")


def _array_header(count: int) -> bytes:
    """msgpack's array header for `count` elements (fixarray, array 16, array 32)."""
    if count < 16:
        return bytes((0x90 | count,))
    if count < 0x10000:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


class TaskPayloads:
    """Packs the payloads of the three events every task has (`task.enqueued`,
    `task.started`, `task.done`; docs/protocol.md §6.1) for `encode_runs`: the maps'
    headers and keys are packed once, the values spliced in after them (no dict made
    and packed per event). The bytes are msgpack's own for the documented maps, in
    their key order. One per thread (it holds a Packer). `started` and `done` share
    their first four parts but each spells them out: they run once per task, and a
    helper call would cost more than the lines it saves."""

    __slots__ = ("pack",)

    def __init__(self) -> None:
        self.pack = msgpack.Packer(use_bin_type=True).pack

    def enqueued(
        self, priority: int, not_before: float | None, headers: dict[str, Any]
    ) -> tuple[bytes, bytes]:
        """(head, tail) of the task.enqueued payloads of one call, whose tasks share
        all but the id: a payload is head + pack(id) + tail."""
        pack = self.pack
        tail = b"".join(
            (_PRIORITY, pack(priority), _NOT_BEFORE, pack(not_before), _HEADERS, pack(headers))
        )
        return _ENQUEUED_HEAD, tail

    def started(self, task_id: str, attempt: int, worker: str) -> bytes:
        pack = self.pack
        return b"".join(
            (
                _STARTED_HEAD,
                pack(task_id),
                _ATTEMPT,
                _SMALL_INTS[attempt] if 0 <= attempt < 128 else pack(attempt),
                _WORKER,
                pack(worker),
            )
        )

    def done(self, task_id: str, attempt: int, headers: dict[str, Any]) -> bytes:
        pack = self.pack
        return b"".join(
            (
                _DONE_HEAD,
                pack(task_id),
                _ATTEMPT,
                _SMALL_INTS[attempt] if 0 <= attempt < 128 else pack(attempt),
                _HEADERS,
                pack(headers) if headers else _EMPTY_MAP,
            )
        )


_SMALL_INTS = tuple(msgpack.packb(n) for n in range(128))  # positive fixints
_EMPTY_MAP = msgpack.packb({})
_ENQUEUED_HEAD = b"\x84" + msgpack.packb("id")  # {id, priority, not_before, headers}
_STARTED_HEAD = b"\x83" + msgpack.packb("id")  # {id, attempt, worker}
_DONE_HEAD = _STARTED_HEAD  # {id, attempt, headers}
_PRIORITY = msgpack.packb("priority")
_NOT_BEFORE = msgpack.packb("not_before")
_HEADERS = msgpack.packb("headers")
_ATTEMPT = msgpack.packb("attempt")
_WORKER = msgpack.packb("worker")


def _envelope(
    type: str,
    source: str,
    timestamp: float,
    key: str,
    data: Any,
    correlation_id: str | None,
    reply_to: str | None,
) -> dict[str, Any]:
    """The envelope map of §6; `key` is "payload" (one event) or "payloads" (a batch)."""
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
    """[topic, envelope] -> its events in order: one, or each of a batch's `payloads`.
    A message that breaks docs/protocol.md §6 is a ProtocolError."""
    if len(frames) != 2:
        raise ProtocolError("bad_event", f"an event has 2 frames, got {len(frames)}")
    try:
        envelope = msgpack.unpackb(frames[1], raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_event", f"envelope is not msgpack: {exc}") from None
    if not isinstance(envelope, dict):
        raise ProtocolError("bad_event", "envelope is not a map")
    try:
        event_type = envelope["type"]
        source = envelope.get("source", "")
        timestamp = float(envelope.get("timestamp", 0.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError("bad_event", f"envelope field missing or wrong: {exc}") from None
    if not isinstance(event_type, str) or not isinstance(source, str):
        raise ProtocolError("bad_event", "type and source must be strings")
    correlation_id = envelope.get("correlation_id")
    reply_to = envelope.get("reply_to")
    if not isinstance(correlation_id, str):
        correlation_id = None
    if not isinstance(reply_to, str):
        reply_to = None
    if "payloads" in envelope:
        payloads = envelope["payloads"]
        if "payload" in envelope:
            raise ProtocolError("bad_event", "envelope holds both payload and payloads")
        if not isinstance(payloads, list) or not payloads:
            raise ProtocolError("bad_event", "payloads must be a non-empty array")
    else:
        payloads = [envelope.get("payload")]
    if len(payloads) == 1:
        return [Event(event_type, source, payloads[0], timestamp, correlation_id, reply_to)]
    return [
        _event(event_type, source, payload, timestamp, correlation_id, reply_to)
        for payload in payloads
    ]


# A batch makes one Event per element: built through the slots' own descriptors,
# which skips the frozen dataclass's __init__ (one object.__setattr__ call per
# field) and halves the cost of an event. Same fields, same object, same equality.
_new_event = object.__new__
_set_type, _set_source, _set_payload, _set_timestamp, _set_correlation_id, _set_reply_to = (
    vars(Event)[f.name].__set__ for f in fields(Event)
)


def _event(
    type: str,
    source: str,
    payload: Any,
    timestamp: float,
    correlation_id: str | None,
    reply_to: str | None,
) -> Event:
    event: Event = _new_event(Event)
    _set_type(event, type)
    _set_source(event, source)
    _set_payload(event, payload)
    _set_timestamp(event, timestamp)
    _set_correlation_id(event, correlation_id)
    _set_reply_to(event, reply_to)
    return event
