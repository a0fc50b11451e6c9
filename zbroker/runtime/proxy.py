"""The topic event bus: an XSUB endpoint (publishers connect) joined to an XPUB
endpoint (subscribers connect) by libzmq's steerable proxy in its own thread.

Subscribers filter by topic prefix (frame 0). Slow subscribers lose events at
their high-water mark rather than stalling the bus; that is pub/sub's contract.

With `--auth` both endpoints are CURVE servers and the bus is forwarded by a
loop of ours instead of libzmq's proxy, so that each message is checked against
its sender's principal (zbroker.protocol.access): an event is forwarded only if
its publisher may publish its topic (never one of the broker's own, BROKER_TOPICS),
a subscription is applied (XPUB_MANUAL) only if its subscriber may hold that
prefix. What is refused is dropped and counted (`refused`): pub/sub has no reply.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from itertools import count

import zmq

from zbroker.protocol.access import DOMAIN_EVENTS_IN, DOMAIN_EVENTS_OUT, Policy
from zbroker.runtime.auth import Auth, serve_curve, user_id
from zbroker.runtime.errors import BindError

log = logging.getLogger("zbroker.events")
_ids = count(1)
# Refused subscriptions logged one by one; past this many, only counted.
_LOGGED_REFUSALS = 20


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
        auth: Auth | None = None,
    ):
        self._ctx = ctx
        self._policy: Policy | None = None if auth is None else auth.policy
        # Messages the guarded bus dropped, by kind: publish, subscribe.
        self.refused: Counter[str] = Counter()
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
        if auth is not None:
            serve_curve(self._xsub, auth, DOMAIN_EVENTS_IN)
            serve_curve(self._xpub, auth, DOMAIN_EVENTS_OUT)
            # Subscriptions take effect only when the loop applies them (_subscription).
            self._xpub.setsockopt(zmq.XPUB_MANUAL, 1)
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
            if self._policy is None:
                self._run_open()
            else:
                self._run_guarded(self._policy)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:  # pragma: no cover - only on libzmq failures
            log.error("event proxy stopped: %s", exc)
        finally:
            for sock in (self._xsub, self._xpub, self._control_peer):
                sock.close(linger=0)

    def _run_open(self) -> None:
        """libzmq's proxy, until STOP. It gives up on EAGAIN, a send to a peer whose pipe
        is full (a publisher that never reads the subscriptions it is sent, say): what
        it was moving is dropped and counted, and the proxy goes on, so that no peer
        can stop the event bus."""
        while True:
            try:
                zmq.proxy_steerable(self._xsub, self._xpub, None, self._control_peer)
                return
            except zmq.Again:
                self.refused["full_pipe"] += 1
                if self.refused["full_pipe"] <= _LOGGED_REFUSALS:
                    log.warning(
                        "event bus: a message dropped at a peer's full pipe (%d so far); "
                        "the bus goes on",
                        self.refused["full_pipe"],
                    )

    def _run_guarded(self, policy: Policy) -> None:
        """Forward events and subscriptions, each checked against its sender."""
        xsub, xpub, control = self._xsub, self._xpub, self._control_peer
        poller = zmq.Poller()
        for sock in (xsub, xpub, control):
            poller.register(sock, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if control in ready:
                control.recv()
                return
            if xsub in ready:
                self._events(xsub, xpub, policy)
            if xpub in ready:
                self._subscriptions(xpub, xsub, policy)

    def _events(self, xsub: zmq.Socket[bytes], xpub: zmq.Socket[bytes], policy: Policy) -> None:
        for _ in range(1000):  # then let subscriptions have their turn
            try:
                first = xsub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [first]
            while frames[-1].more:
                frames.append(xsub.recv(copy=False))
            sender = user_id(first)
            # No User-Id: the broker's own lifecycle publisher (inproc, not CURVE).
            if sender is not None:
                principal = policy.by_name.get(sender)
                if principal is None or not principal.may_publish(first.bytes):
                    self.refused["publish"] += 1
                    continue
            # XPUB drops at subscribers' high-water marks; Again only if there are none.
            with contextlib.suppress(zmq.Again):
                xpub.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def _subscriptions(
        self, xpub: zmq.Socket[bytes], xsub: zmq.Socket[bytes], policy: Policy
    ) -> None:
        while True:
            try:
                frame = xpub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            message = frame.bytes
            if not message or message[0] not in (0, 1):
                continue
            prefix = message[1:]
            sender = user_id(frame)
            if sender is None and message[0] == 0:
                # A subscriber left: libzmq takes back, without a User-Id, what this
                # loop applied for it. Only upstream needs telling.
                xsub.send(message)
                continue
            principal = None if sender is None else policy.by_name.get(sender)
            if principal is None or not principal.may_subscribe(prefix):
                if message[0] == 1:
                    self.refused["subscribe"] += 1
                    if self.refused["subscribe"] <= _LOGGED_REFUSALS:
                        log.warning(
                            "refused subscription of %s to %r: not within its topics%s",
                            sender,
                            prefix[:64],
                            " (further refusals are only counted)"
                            if self.refused["subscribe"] == _LOGGED_REFUSALS
                            else "",
                        )
                continue
            # XPUB_MANUAL: applies to the subscriber the last message came from.
            xpub.setsockopt(zmq.SUBSCRIBE if message[0] == 1 else zmq.UNSUBSCRIBE, prefix)
            xsub.send(message)

    def stop(self, timeout_s: float = 2.0) -> None:
        if self._thread.is_alive():
            self._control.send(b"TERMINATE")
            self._thread.join(timeout_s)
        self._control.close(linger=0)
