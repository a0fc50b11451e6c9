"""Topic events on the pub/sub bus: two frames, the topic and a msgpack envelope.

Frame 0 is the event type used as the topic (subscribers filter by prefix),
frame 1 is a msgpack map ``{type, source, payload, timestamp}`` plus the
optional ``correlation_id`` and ``reply_to``.  Pure codec, no sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from zbroker.protocol.errors import ProtocolError

MAX_TOPIC_BYTES = 255


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
    topic = event.type.encode()
    if not topic or len(topic) > MAX_TOPIC_BYTES:
        raise ValueError(f"event type must be 1..{MAX_TOPIC_BYTES} bytes of UTF-8")
    envelope: dict[str, Any] = {
        "type": event.type,
        "source": event.source,
        "payload": event.payload,
        "timestamp": event.timestamp,
    }
    if event.correlation_id is not None:
        envelope["correlation_id"] = event.correlation_id
    if event.reply_to is not None:
        envelope["reply_to"] = event.reply_to
    return [topic, msgpack.packb(envelope, use_bin_type=True)]


def decode_event(frames: Sequence[bytes]) -> Event:
    """[topic, envelope] -> Event; anything else is a ProtocolError."""
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
    return Event(
        type=event_type,
        source=source,
        payload=envelope.get("payload"),
        timestamp=timestamp,
        correlation_id=correlation_id if isinstance(correlation_id, str) else None,
        reply_to=reply_to if isinstance(reply_to, str) else None,
    )
