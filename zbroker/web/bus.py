"""The gateway's side of the event bus: one SUB socket shared by every follower
(an SSE response or a WebSocket), subscribed to the union of their prefixes, and
one publishing socket for what callers publish, opened when the gateway starts.

The publishing socket is an XPUB, not a PUB: it reads the subscriptions the bus
sends it, so that a publish made before they arrived (just after the start, or
just after a follower subscribed) waits for them, for at most PUBLISH_WAIT_S,
instead of being dropped by ZeroMQ's "slow joiner".

A follower whose reader is slow never slows the others: its queue is bounded,
and what does not fit is dropped and counted (it is told how many).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any, Final

import zmq
import zmq.asyncio

from zbroker.client.errors import DEFAULT_HWM, zmq_boundary
from zbroker.client.keys import Credentials, check, close_socket, connected_socket
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.events import Event, decode_events, encode_event

# Events waiting for one follower's reader; beyond this they are dropped.
FOLLOWER_QUEUE: Final = 1000
# How long a publish waits for the bus's subscriptions to reach the gateway.
PUBLISH_WAIT_S: Final = 2.0
# Subscription messages an XPUB hands up: a first byte of 1 (subscribe) or 0.
_SUBSCRIBE: Final = 1
_UNSUBSCRIBE: Final = 0


class Follower:
    """One reader of events: its prefixes and a bounded queue of matching events."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub
        self.prefixes: set[str] = set()
        self.queue: asyncio.Queue[Event] = asyncio.Queue(FOLLOWER_QUEUE)
        self.dropped = 0

    def wants(self, topic: str) -> bool:
        return any(topic.startswith(p) for p in self.prefixes)

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    def subscribe(self, prefix: str) -> None:
        if prefix not in self.prefixes:
            self.prefixes.add(prefix)
            self.hub.add_prefix(prefix)

    def unsubscribe(self, prefix: str) -> None:
        if prefix in self.prefixes:
            self.prefixes.discard(prefix)
            self.hub.remove_prefix(prefix)

    def close(self) -> None:
        for prefix in list(self.prefixes):
            self.unsubscribe(prefix)
        self.hub.followers.discard(self)


class BusPublisher:
    """The gateway's XPUB socket on the bus's XSUB endpoint, and the prefixes the bus
    has subscribed to on it so far (they arrive a moment after it connects)."""

    def __init__(
        self, context: zmq.asyncio.Context, endpoint: str, credentials: Credentials | None
    ) -> None:
        self.prefixes: set[bytes] = set()
        self.opened_at = time.monotonic()
        self._socket: zmq.asyncio.Socket = connected_socket(
            context, zmq.XPUB, endpoint, DEFAULT_HWM, credentials
        )
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def has_subscriber(self, topic: bytes) -> bool:
        return any(topic.startswith(prefix) for prefix in self.prefixes)

    async def ready_for(self, topic: bytes, followed_here: bool) -> None:
        """Wait (at most PUBLISH_WAIT_S) until `topic` can reach its subscribers: until
        the bus subscribed to it, if a follower of this gateway wants it; else until
        the bus sent any subscription, or PUBLISH_WAIT_S after the socket opened (a bus
        that has no subscriber sends none)."""
        deadline = time.monotonic() + PUBLISH_WAIT_S
        if not followed_here:
            deadline = min(deadline, self.opened_at + PUBLISH_WAIT_S)
        while not (self.has_subscriber(topic) or (self.prefixes and not followed_here)):
            check(self._socket)  # a refused handshake is an error, not a wait
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                # Woken by a subscription; the monitor is read again every 100 ms.
                await asyncio.wait_for(self._changed.wait(), min(remaining_s, 0.1))

    async def send(self, frames: list[bytes]) -> None:
        check(self._socket)
        with zmq_boundary("publishing an event"):
            # An XPUB drops at a subscriber's high-water mark: this never waits.
            await self._socket.send_multipart(frames)

    async def _read(self) -> None:
        while True:
            message = await self._socket.recv()
            if message[:1] == bytes([_SUBSCRIBE]):
                self.prefixes.add(message[1:])
            elif message[:1] == bytes([_UNSUBSCRIBE]):
                self.prefixes.discard(message[1:])
            self._changed.set()

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        close_socket(self._socket)


class EventHub:
    """The SUB socket (opened with the first follower) and the publishing socket (opened
    by `start`, with the gateway), both with the gateway's credentials."""

    def __init__(
        self, events_in: str, events_out: str, credentials: Credentials | None = None
    ) -> None:
        self.events_in = events_in
        self.events_out = events_out
        self.credentials = credentials
        self.followers: set[Follower] = set()
        self.malformed = 0
        self._counts: Counter[str] = Counter()
        self._context: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._publisher: BusPublisher | None = None

    def start(self) -> BusPublisher:
        """Open the publishing socket now, so that the bus's subscriptions reach it
        before the first publish (call on the gateway's loop)."""
        if self._publisher is None:
            self._publisher = BusPublisher(self._ctx(), self.events_in, self.credentials)
        return self._publisher

    def _ctx(self) -> zmq.asyncio.Context:
        if self._context is None:
            self._context = zmq.asyncio.Context()
        return self._context

    def follower(self) -> Follower:
        follower = Follower(self)
        self.followers.add(follower)
        return follower

    def add_prefix(self, prefix: str) -> None:
        self._counts[prefix] += 1
        if self._counts[prefix] == 1:
            self._socket().subscribe(prefix.encode())

    def remove_prefix(self, prefix: str) -> None:
        self._counts[prefix] -= 1
        if self._counts[prefix] <= 0:
            del self._counts[prefix]
            if self._sub is not None:
                self._sub.unsubscribe(prefix.encode())

    async def publish(
        self,
        type: str,
        payload: Any,
        *,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> Event:
        """Publish one event, once the bus's subscriptions to it reached the gateway
        (BusPublisher.ready_for). ValueError: a topic no one could match; TypeError: a
        payload msgpack cannot hold; AuthenticationFailed: the gateway's key."""
        publisher = self.start()
        event = Event(type, "web", payload, time.time(), correlation_id, reply_to)
        frames = encode_event(event)  # a bad topic or payload is refused before waiting
        followed_here = any(type.startswith(prefix) for prefix in self._counts)
        await publisher.ready_for(type.encode(), followed_here)
        await publisher.send(frames)
        return event

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sub is None:
            sock = self._ctx().socket(zmq.SUB)
            sock.linger = 0
            sock.rcvhwm = DEFAULT_HWM
            if self.credentials is not None:
                self.credentials.apply(sock)
            sock.connect(self.events_out)
            self._sub = sock
            self._reader = asyncio.get_running_loop().create_task(self._read(sock))
        return self._sub

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                events = decode_events(frames)
            except ProtocolError:
                self.malformed += 1
                continue
            for event in events:
                for follower in self.followers:
                    if follower.wants(event.type):
                        follower.offer(event)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._publisher is not None:
            await self._publisher.close()
        if self._sub is not None:
            self._sub.close(linger=0)
        if self._context is not None:
            self._context.term()
