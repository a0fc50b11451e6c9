"""Which callers' connections are still open, so a call waiting for a result ends
when its caller's connection does.

libzmq tells a ROUTER of a closed connection only through a draft API, but two
stable ones say enough: every message carries the file descriptor it was read
from (ZMQ_SRCFD), and the socket monitor reports EVENT_DISCONNECTED with that
descriptor. The loop notes the routing id of each call that will wait (REQUEST,
RESULT) under its descriptor; when the descriptor closes, those callers are gone.

A descriptor is reused by the next connection the kernel accepts. If a new
connection's call is read in the same pass as the monitor reports the old one
closed, that call's wait ends too; its client asks again (RESULT by task id)
when its attempt times out, as after any lost connection.
"""

from __future__ import annotations

import logging
import resource

import zmq
from zmq.utils.monitor import recv_monitor_message

from zbroker.protocol import zbc

log = logging.getLogger("zbroker.runtime")

# The ZBC01 calls that may wait for a result (frame 3 of a message as read).
WAITING_CALLS = frozenset({zbc.REQUEST, zbc.RESULT})
_SRCFD = int(zmq.SRCFD)


class Connections:
    """The ROUTER's monitor, and the waiting callers noted per descriptor."""

    def __init__(self, router: zmq.Socket[bytes]) -> None:
        self._router = router
        self._debug = log.isEnabledFor(logging.DEBUG)
        events = zmq.EVENT_DISCONNECTED | (zmq.EVENT_ACCEPTED if self._debug else 0)
        self.monitor: zmq.Socket[bytes] = router.get_monitor_socket(events)
        self._callers: dict[int, set[bytes]] = {}

    def note(self, frame: zmq.Frame, identity: bytes) -> None:
        """A call that may wait came from `identity` on the connection of `frame`."""
        fd = frame.get(_SRCFD)
        if isinstance(fd, int) and fd >= 0:
            self._callers.setdefault(fd, set()).add(identity)

    def closed(self) -> list[bytes]:
        """The callers whose connection closed since the last call (never blocks)."""
        gone: list[bytes] = []
        monitor = self.monitor
        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            fd = event["value"]
            if event["event"] == zmq.EVENT_DISCONNECTED:
                gone += self._callers.pop(fd, ())
            if self._debug:
                what = "accepted" if event["event"] == zmq.EVENT_ACCEPTED else "closed"
                log.debug("connection %s on %s (fd %s)", what, event["endpoint"], fd)
        return gone

    def close(self) -> None:
        self._router.disable_monitor()
        self.monitor.close(linger=0)


def raise_file_limit() -> int:
    """Let the broker hold as many connections as the system allows: its soft limit
    of open files raised to the hard one (each connection takes a descriptor).
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard
