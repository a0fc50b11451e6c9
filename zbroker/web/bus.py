"""The gateway's side of the event bus: one SUB socket shared by every follower
(an SSE response or a WebSocket), subscribed to the union of their prefixes, and
one Publisher for what callers publish.

A follower whose reader is slow never slows the others: its queue is bounded,
and what does not fit is dropped and counted (it is told how many).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any, Final

import zmq
import zmq.asyncio

from zbroker.client.errors import DEFAULT_HWM
from zbroker.client.events import Publisher
from zbroker.client.keys import Credentials
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.events import Event, decode_events

# Events waiting for one follower's reader; beyond this they are dropped.
FOLLOWER_QUEUE: Final = 1000


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


class EventHub:
    """The SUB socket (opened with the first follower) and the PUB socket (with the
    first publish), both with the gateway's credentials."""

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
        self._publisher: Publisher | None = None

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

    def publish(self, type: str, payload: Any, **fields: Any) -> Event:
        """Publish one event (ValueError: a topic no one could match; TypeError: a
        payload msgpack cannot hold; AuthenticationFailed: the gateway's key)."""
        if self._publisher is None:
            self._publisher = Publisher(self.events_in, source="web", credentials=self.credentials)
        return self._publisher.publish(type, payload, **fields)

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sub is None:
            self._context = zmq.asyncio.Context()
            sock = self._context.socket(zmq.SUB)
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
        if self._sub is not None:
            self._sub.close(linger=0)
        if self._context is not None:
            self._context.term()
        if self._publisher is not None:
            self._publisher.close()
