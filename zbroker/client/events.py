"""Publishing and subscribing to topic events on the broker's pub/sub bus.

Publishers connect a PUB socket to the broker's XSUB endpoint, subscribers a
SUB socket to its XPUB endpoint.  Given several brokers' endpoints, each socket
connects to all of them: only the active broker's bus is bound, so events flow
through it, and ZeroMQ sends a subscriber's subscriptions again to whichever bus it
connects to next.  Frames are built and parsed only by
`zbroker.protocol.events`; what a peer garbles is dropped and counted here.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import zmq

from zbroker.client._owner import SocketOwner
from zbroker.client.endpoints import Endpoints, joined, parse_endpoints
from zbroker.client.errors import DEFAULT_HWM, zmq_boundary
from zbroker.client.keys import (
    Credentials,
    check,
    close_socket,
    connected_socket,
    wait_readable,
)
from zbroker.protocol import DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.events import Event, decode_events, encode_event, encode_events


class Publisher(SocketOwner):
    """Publishes events to the bus.

    PUB sockets have no delivery guarantee: events published before the
    connection (and the subscriptions flowing back over it) are established
    are silently lost, the usual ZeroMQ "slow joiner".  Publish from a
    long-lived Publisher, and do not rely on the very first events after
    connecting.  When more than `hwm` events are queued for a slow link, the
    newest are dropped rather than blocking the caller.

    `endpoint` may name several brokers' events-in endpoints (a list, or "a,b"):
    events go to the active broker's bus, the only one bound; what is published
    while no bus is connected is dropped, as before the first connection.

    Not thread-safe: use one Publisher per thread.
    """

    def __init__(
        self,
        endpoint: Endpoints = DEFAULT_EVENTS_IN,
        *,
        source: str = "",
        hwm: int = DEFAULT_HWM,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoint)
        self.endpoint = joined(self.endpoints)
        self.source = source
        self.published = 0
        ctx = context if context is not None else zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = connected_socket(
            ctx, zmq.PUB, self.endpoints, hwm, credentials
        )

    def publish(
        self,
        type: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        source: str | None = None,
    ) -> Event:
        """Publish one event with topic `type` and return it as sent.

        `payload` must be serialisable by msgpack (TypeError otherwise); an
        empty or over-long `type` raises ValueError.
        """
        sock = self._open_socket()
        event = Event(
            type=type,
            source=self.source if source is None else source,
            payload=payload,
            timestamp=time.time(),
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
        frames = encode_event(event)
        check(sock)  # a refused handshake is an error here, not silence
        with zmq_boundary(f"publishing {type!r}"):
            sock.send_multipart(frames)
        self.published += 1
        return event

    def publish_many(
        self,
        type: str,
        payloads: Sequence[Any],
        *,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        source: str | None = None,
    ) -> list[Event]:
        """Publish one event of type `type` per payload, in order, as one batch message
        (docs/protocol.md §6): subscribers receive them as separate events, and the
        bus delivers or drops the batch whole. Returns the events as sent.

        `payloads` must be a non-empty sequence (ValueError otherwise) of values
        msgpack can serialise (TypeError otherwise).
        """
        sock = self._open_socket()
        resolved = self.source if source is None else source
        timestamp = time.time()
        frames = encode_events(type, resolved, payloads, timestamp, correlation_id, reply_to)
        check(sock)
        with zmq_boundary(f"publishing {type!r}"):
            sock.send_multipart(frames)
        self.published += len(payloads)
        return [
            Event(type, resolved, payload, timestamp, correlation_id, reply_to)
            for payload in payloads
        ]

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket. Idempotent.

        Events not yet sent are discarded at once by default. With `linger_s`,
        ZeroMQ keeps sending them in the background for up to that long:
        while the process lives on, or while terminating the context waits
        for them.
        """
        if not 0 <= linger_s < math.inf:
            raise ValueError("linger_s must be a finite number of seconds >= 0")
        if self._socket is not None:
            close_socket(self._socket, math.ceil(linger_s * 1000))
            self._socket = None


class Subscriber(SocketOwner):
    """Receives events whose type starts with one of `prefixes` (every event if none).

    Events that cannot be decoded are dropped and counted in `dropped` (one per
    message); they are never raised, because they are another peer's fault. A
    batch message (docs/protocol.md §6) is handed out one event at a time, in
    order; `received` counts events.

    `endpoint` may name several brokers' events-out endpoints (a list, or "a,b"):
    events come from the active broker's bus, and the subscriptions follow it.

    Not thread-safe: use one Subscriber per thread.
    """

    def __init__(
        self,
        endpoint: Endpoints = DEFAULT_EVENTS_OUT,
        *prefixes: str,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.endpoints = parse_endpoints(endpoint)
        self.endpoint = joined(self.endpoints)
        self.dropped = 0
        self.received = 0
        self._pending: deque[Event] = deque()  # the rest of a batch already received
        ctx = context if context is not None else zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = connected_socket(
            ctx, zmq.SUB, self.endpoints, hwm, credentials
        )
        for prefix in prefixes or ("",):
            self.subscribe(prefix)

    def subscribe(self, prefix: str) -> None:
        """Also receive events whose type starts with `prefix` ("" means all)."""
        sock = self._open_socket()
        with zmq_boundary("subscribing"):
            sock.subscribe(prefix.encode())

    def unsubscribe(self, prefix: str) -> None:
        """Undo one earlier `subscribe(prefix)`."""
        sock = self._open_socket()
        with zmq_boundary("unsubscribing"):
            sock.unsubscribe(prefix.encode())

    def recv(self, timeout_s: float | None = None) -> Event | None:
        """The next event, or None if none arrived within `timeout_s` (None: wait forever)."""
        sock = self._open_socket()
        if self._pending:
            self.received += 1
            return self._pending.popleft()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with zmq_boundary("receiving an event"):
            while True:
                if deadline is None:
                    wait_readable(sock, -1)
                else:
                    # A zero (or spent) timeout still takes an event that is already here.
                    remaining_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
                    if not wait_readable(sock, remaining_ms):
                        return None
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                try:
                    events = decode_events(frames)
                except ProtocolError:
                    self.dropped += 1
                    continue
                self.received += 1
                if len(events) > 1:
                    self._pending.extend(events[1:])
                return events[0]

    def __iter__(self) -> Iterator[Event]:
        """Yield events as they arrive, forever: break out of the loop to stop."""
        while True:
            event = self.recv()
            if event is not None:
                yield event
