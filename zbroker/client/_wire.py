"""Whole messages on a blocking socket through pyzmq's backend calls, with plain int
flags.

pyzmq's `send_multipart` and `recv_multipart` combine enum flags and check every
frame's type on each call: that was a third of a blocking `Client.enqueue`'s own CPU
(docs/performance.md, "The client's share"). These are the same libzmq calls without
it, as the broker's loop makes them (zbroker/runtime/server.py). The frames given are
the library's own (bytes it built, or payloads it checked), never unchecked input.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.backend

_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_POLLOUT = int(zmq.POLLOUT)


def send(sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send `frames` as one message. With NOBLOCK, zmq.Again means nothing was sent: a
    message is queued whole or not at all, so only its first frame can be refused."""
    last = len(frames) - 1
    more = flags | _SNDMORE
    for i in range(last):
        _send(sock, frames[i], more)
    _send(sock, frames[last], flags)


def recv(sock: zmq.Socket[Any], flags: int = 0) -> list[bytes]:
    """The next whole message (its frames as bytes); with NOBLOCK, zmq.Again if none."""
    frame: Any = _recv(sock, flags, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _recv(sock, flags, False)
        frames.append(frame.bytes)
    return frames


def send_within(sock: zmq.Socket[Any], frames: Sequence[Any], timeout_s: float) -> bool:
    """Send `frames` as one message, waiting up to `timeout_s` for the socket to take it;
    False (nothing sent) if it did not. A socket connected to several brokers takes a
    message only once a handshake completed (ZMQ_IMMEDIATE): this waits for that
    within the caller's timeout, never forever."""
    try:
        send(sock, frames, NOBLOCK)
        return True
    except zmq.Again:
        pass
    deadline = time.monotonic() + timeout_s
    while True:
        remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 or not sock.poll(remaining_ms, _POLLOUT):
            return False
        try:
            send(sock, frames, NOBLOCK)
            return True
        except zmq.Again:
            continue  # another sender took the room first
