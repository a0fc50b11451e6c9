"""The topic event bus: an XSUB endpoint (publishers connect) joined to an XPUB
endpoint (subscribers connect) by libzmq's steerable proxy in its own thread.

Subscribers filter by topic prefix (frame 0). Slow subscribers lose events at
their high-water mark rather than stalling the bus; that is pub/sub's contract.
"""

from __future__ import annotations

import logging
import threading
from itertools import count

import zmq

from zbroker.runtime.errors import BindError

log = logging.getLogger("zbroker.events")
_ids = count(1)


class EventProxy:
    """Binds both endpoints at construction (so bind errors surface at once), forwards in
    a daemon thread until `stop()`."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        events_in: str,
        events_out: str,
        hwm: int,
        max_frame_bytes: int = -1,
    ):
        self._ctx = ctx
        self.inproc_in = f"inproc://zbroker-events-in-{next(_ids)}"
        self._xsub = ctx.socket(zmq.XSUB)
        self._xpub = ctx.socket(zmq.XPUB)
        for sock in (self._xsub, self._xpub):
            sock.linger = 0
            sock.sndhwm = hwm
            sock.rcvhwm = hwm
            # A peer that sends a larger frame is disconnected by libzmq before the
            # frame is read into memory (-1: no limit).
            sock.maxmsgsize = max_frame_bytes
        try:
            self._xsub.bind(events_in)
            self.events_in = self._xsub.getsockopt_string(zmq.LAST_ENDPOINT)
            self._xsub.bind(self.inproc_in)  # the broker's own lifecycle publisher
            self._xpub.bind(events_out)
        except zmq.ZMQError as exc:
            self._xsub.close()
            self._xpub.close()
            raise BindError(
                f"cannot bind event endpoints {events_in} / {events_out}: {exc}"
            ) from exc
        self.events_out = self._xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        control_endpoint = f"inproc://zbroker-events-control-{next(_ids)}"
        self._control = ctx.socket(zmq.PAIR)
        self._control.linger = 0
        self._control.bind(control_endpoint)
        self._control_peer = ctx.socket(zmq.PAIR)
        self._control_peer.linger = 0
        self._control_peer.connect(control_endpoint)
        self._thread = threading.Thread(target=self._run, name="zbroker-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, self._control_peer)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:  # pragma: no cover - only on libzmq failures
            log.error("event proxy stopped: %s", exc)
        finally:
            for sock in (self._xsub, self._xpub, self._control_peer):
                sock.close(linger=0)

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._thread.is_alive():
            self._control.send(b"TERMINATE")
            self._thread.join(timeout_s)
        self._control.close(linger=0)
