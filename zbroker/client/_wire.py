"""Whole messages on a blocking socket through pyzmq's backend calls, with plain int
flags.

pyzmq's `send_multipart` and `recv_multipart` combine enum flags and check every
frame's type on each call: that was a third of a blocking `Client.enqueue`'s own CPU
(docs/performance.md, "The client's share"). These are the same libzmq calls without
it, as the broker's loop makes them (zbroker/runtime/server.py). The frames given are
the library's own (bytes it built, or payloads it checked), never unchecked input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
import zmq.backend

_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)


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
