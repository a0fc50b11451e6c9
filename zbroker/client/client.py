"""A blocking 7/MDP client with Lazy Pirate retries, and 8/MMI service discovery.

Owns one DEALER socket at a time and replaces it after every timeout, so a
late reply to an abandoned attempt can never be taken for the answer to a
later request.  Speaks only through `zbroker.protocol.mdp`; no broker internals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from zbroker.client._owner import SocketOwner
from zbroker.client.errors import (
    ReplyError,
    RequestTimeout,
    connected_socket,
    zmq_boundary,
)
from zbroker.protocol import DEFAULT_ENDPOINT, mdp
from zbroker.protocol.errors import ProtocolError

Body = bytes | Sequence[bytes]


@dataclass(slots=True)
class ClientStats:
    """What a Client has seen since it was created. Counters only ever grow."""

    requests: int = 0  # calls to request()/request_frames()
    sent: int = 0  # messages put on the wire, resends included
    resends: int = 0
    replies: int = 0
    timeouts: int = 0  # requests that raised RequestTimeout
    mismatched_replies: int = 0  # replies for another service: ignored
    malformed_replies: int = 0  # not MDPC01 at all: ignored


class Client(SocketOwner):
    """Sends requests to services through the broker and waits for their replies.

    A request that gets no reply within `timeout_s` is resent on a fresh
    socket, up to `retries` times, then `RequestTimeout` is raised.  A resent
    request may run twice on the service side (at-least-once), so services
    should be idempotent or tolerate duplicates.

    Not thread-safe: use one Client per thread.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if retries < 0:
            raise ValueError("retries must be zero or more")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.stats = ClientStats()
        self._context = context if context is not None else zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = connected_socket(
            self._context, zmq.DEALER, endpoint
        )

    # ------------------------------------------------------------------ public

    def request(self, service: str | bytes, body: Body, timeout_s: float | None = None) -> bytes:
        """Send `body` to `service` and return the reply, which must be exactly one frame.

        Raises `ReplyError` when the reply has zero or several frames (use
        `request_frames` for those services) and `RequestTimeout` when no reply
        came back.
        """
        frames = self.request_frames(service, body, timeout_s)
        if len(frames) != 1:
            raise ReplyError(
                "reply_frames", f"expected a one-frame reply, got {len(frames)} frames"
            )
        return frames[0]

    def request_frames(
        self, service: str | bytes, body: Body, timeout_s: float | None = None
    ) -> list[bytes]:
        """Send `body` (one frame or several) to `service` and return every reply frame.

        `timeout_s` overrides the client's per-attempt timeout for this call.
        """
        sock = self._open_socket()
        service_b = _service_name(service)
        message = mdp.client_request(service_b, _body_frames(body))
        attempt_timeout_s = self.timeout_s if timeout_s is None else timeout_s
        if not attempt_timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.stats.requests += 1
        attempts = 0
        with zmq_boundary(f"request to {service_b!r}"):
            while True:
                attempts += 1
                sock.send_multipart(message)
                self.stats.sent += 1
                try:
                    reply = self._await_reply(sock, service_b, attempt_timeout_s)
                except BaseException:
                    # Interrupted (Ctrl-C, say) with the request outstanding: its
                    # reply must not become the answer to this client's next call.
                    self._replace_socket()
                    raise
                if reply is not None:
                    self.stats.replies += 1
                    return reply
                # Lazy Pirate: the abandoned attempt may still be answered; that
                # answer must land on a socket nobody reads any more.
                sock = self._replace_socket()
                if attempts > self.retries:
                    self.stats.timeouts += 1
                    raise RequestTimeout(service_b, attempt_timeout_s, attempts)
                self.stats.resends += 1

    def mmi_service(self, name: str | bytes, timeout_s: float | None = None) -> bool:
        """8/MMI: True when a worker for service `name` is registered with the broker now."""
        reply = self.request_frames(mdp.MMI_SERVICE, [_service_name(name)], timeout_s)
        code = reply[0] if reply else b""
        if code == mdp.MMI_FOUND:
            return True
        if code == mdp.MMI_NOT_FOUND:
            return False
        raise ReplyError("mmi_status", f"unexpected mmi.service status {code[:16]!r}")

    # ---------------------------------------------------------------- private

    def _replace_socket(self) -> zmq.Socket[bytes]:
        self.close()
        self._socket = connected_socket(self._context, zmq.DEALER, self.endpoint)
        return self._socket

    def _await_reply(
        self, sock: zmq.Socket[bytes], service: bytes, timeout_s: float
    ) -> list[bytes] | None:
        """The body of the next reply for `service`, or None at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLIN):
                return None
            frames = sock.recv_multipart()
            try:
                reply_service, body = mdp.decode_reply_to_client(frames)
            except ProtocolError:
                self.stats.malformed_replies += 1
                continue
            if reply_service != service:
                self.stats.mismatched_replies += 1
                continue
            return list(body)


def _service_name(service: str | bytes) -> bytes:
    name = service.encode() if isinstance(service, str) else service
    if not isinstance(name, bytes) or not name:
        raise ValueError("service name must be a non-empty str or bytes")
    return name


def _body_frames(body: Body) -> list[bytes]:
    if isinstance(body, bytes):
        return [body]
    if isinstance(body, str):
        raise TypeError("body must be bytes or a sequence of bytes, not str: encode it first")
    frames = list(body)
    for frame in frames:
        if not isinstance(frame, bytes):
            raise TypeError(f"body frames must be bytes, got {type(frame).__name__}")
    return frames
