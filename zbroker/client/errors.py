"""Exceptions of the client library, and the boundary where zmq errors become them.

Callers catch `ClientError` for everything this package raises on purpose;
`zmq.ZMQError` never escapes a public method.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import zmq

from zbroker.protocol.errors import ProtocolError

# Socket-level flow control is set explicitly on every socket we open, so a
# slow peer costs bounded memory instead of whatever the library default is.
DEFAULT_HWM = 10_000


class ClientError(Exception):
    """Base class of every exception the client library raises on purpose."""


class RequestTimeout(ClientError):
    """Raised by `Client.request` when no reply arrived within the timeout, after every retry."""

    def __init__(self, service: bytes, timeout_s: float, attempts: int) -> None:
        name = service.decode(errors="replace")
        super().__init__(
            f"no reply from service {name!r} within {timeout_s:g}s per attempt "
            f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        )
        self.service = service
        self.timeout_s = timeout_s
        self.attempts = attempts


class ReplyError(ClientError, ProtocolError):
    """Raised when a well-formed reply does not have the shape the call expects."""


class ClientClosed(ClientError):
    """Raised when a Client, Publisher or Subscriber is used after `close()`."""


class EndpointError(ClientError, ValueError):
    """Raised when an endpoint cannot be connected to (malformed address, unknown transport)."""


class WorkerError(ClientError):
    """Raised by `Worker.run` when its I/O thread failed and it cannot serve any more."""


# Raised by handlers, never by the library: they tell a Worker how to report a failure.


class NonRetryableError(Exception):
    """Raised by a Worker's handler when no further attempt can succeed: FAIL without retry."""


class RetryLater(Exception):
    """Raised by a Worker's handler to fail this attempt and ask for a retry after `delay_s`."""

    def __init__(self, delay_s: float, reason: str = "") -> None:
        if (
            isinstance(delay_s, bool)
            or not isinstance(delay_s, int | float)
            or not 0 <= delay_s < math.inf
        ):
            raise ValueError("RetryLater needs a finite delay_s of zero or more seconds")
        super().__init__(reason)
        self.delay_s = float(delay_s)
        self.reason = reason


@contextmanager
def zmq_boundary(what: str) -> Iterator[None]:
    """Translate zmq errors raised inside the block into this package's exceptions."""
    try:
        yield
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
            raise ClientClosed(f"{what}: socket or context already closed") from exc
        raise ClientError(f"{what}: {exc}") from exc


def connected_socket(
    context: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str, hwm: int = DEFAULT_HWM
) -> zmq.Socket[bytes]:
    """A new socket of `kind`, with explicit high-water marks, connected to `endpoint`."""
    with zmq_boundary("opening a socket"):
        sock = context.socket(kind)
    sock.linger = 0
    sock.sndhwm = hwm
    sock.rcvhwm = hwm
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        hint = "" if "://" in endpoint else " (expected transport://address, e.g. tcp://host:port)"
        raise EndpointError(f"cannot connect to {endpoint!r}: {exc}{hint}") from exc
    return sock
