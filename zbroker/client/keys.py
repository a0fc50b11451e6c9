"""CURVE keys for clients, workers, services, publishers and subscribers, and the
handshake watch that turns a refused authentication into an error.

A broker started with `--auth` (docs/security.md) admits a peer by its CURVE key.
Give every socket of a peer the broker's public key and the peer's own certificate:

    creds = Credentials.load("keys/broker.key", "keys/tts-worker.key_secret")
    Client(endpoint, credentials=creds)

The files are those `zbroker keys new NAME` writes (pyzmq's zmq.auth format); the
broker's key may also be given as its 40-character Z85 text, as its log prints it.

Every socket the library opens is watched (libzmq's monitor events): when the
broker refuses the handshake (an unknown key, a key without a role for that
endpoint), or one side uses CURVE and the other does not, the call waiting on it
raises AuthenticationFailed at once instead of waiting for its timeout.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from zbroker.client.endpoints import Endpoints, joined, parse_endpoints
from zbroker.client.errors import (
    DEFAULT_HWM,
    AuthenticationFailed,
    ClientError,
    EndpointError,
    zmq_boundary,
)

_Z85_KEY_CHARS = 40
_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
# Connections the broker closed during the CURVE handshake, in a row, before that is
# taken as a refusal (a wrong server key looks like this: the broker cannot read us).
_SILENT_CLOSES = 2
_MECHANISM_MISMATCH = 0x11000001
# Several endpoints: how often a connection is pinged (ZMTP PING, answered by the
# broker's libzmq itself) and how long without any traffic before it is dropped.
_HEARTBEAT_IVL_MS = 1000
_HEARTBEAT_TIMEOUT_MS = 3000  # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


@dataclass(frozen=True, slots=True)
class Credentials:
    """The broker's public key and this peer's key pair, all Z85."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    @classmethod
    def load(
        cls, server_key: str | os.PathLike[str], certificate: str | os.PathLike[str]
    ) -> Credentials:
        """From the broker's public key (a .key file, or its Z85 text) and this peer's
        secret certificate file (NAME.key_secret)."""
        server = os.fspath(server_key)
        if len(server) == _Z85_KEY_CHARS and not Path(server).exists():
            server_z85 = server.encode("ascii")
        else:
            server_z85, _ = _read_certificate(server)
        public, secret = _read_certificate(os.fspath(certificate))
        if secret is None:
            raise ClientError(
                f"{os.fspath(certificate)} holds no secret key: give the NAME.key_secret file"
            )
        return cls(server_z85, public, secret)

    @classmethod
    def from_environment(cls) -> Credentials | None:
        """From ZBROKER_SERVER_KEY and ZBROKER_KEY (a .key_secret file), when both are
        set; None when neither is."""
        server, mine = os.environ.get("ZBROKER_SERVER_KEY"), os.environ.get("ZBROKER_KEY")
        if not server and not mine:
            return None
        if not server or not mine:
            raise ClientError("set both ZBROKER_SERVER_KEY and ZBROKER_KEY, or neither")
        return cls.load(server, mine)

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make `sock` (before it connects) a CURVE client of the broker."""
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key


def _read_certificate(path: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ClientError(f"cannot read certificate {path}: {exc}") from None


class _Watch:
    """A socket's monitor, and what its handshakes came to so far."""

    __slots__ = (
        "curve",
        "disconnects",
        "endpoint",
        "failure",
        "handshakes",
        "monitor",
        "owner",
        "several",
        "shaking",
        "silent_closes",
        "up",
    )

    def __init__(
        self, owner: zmq.Socket[Any], endpoint: str, curve: bool, several: bool = False
    ) -> None:
        self.owner = owner  # the monitor socket as made (an asyncio one for asyncio sockets)
        # A blocking view of it, read without blocking whatever the socket's kind.
        self.monitor: zmq.Socket[bytes] = zmq.Socket.shadow(owner.underlying)
        self.endpoint = endpoint
        self.curve = curve
        # Connected to several brokers: a handshake that times out or a connection
        # closed during it is no refusal (a frozen or stepping-down broker does that).
        self.several = several
        self.failure: str | None = None
        self.silent_closes = 0
        self.shaking = False  # connected, handshake not yet done
        self.handshakes = 0  # completed so far, every endpoint together
        self.disconnects = 0  # connections lost after their handshake, every endpoint together
        self.up: set[bytes] = set()  # endpoints whose connection completed its handshake

    def read(self) -> None:
        """Take every event waiting (never blocks); remember the first failure."""
        monitor = self.monitor
        while self.failure is None:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # closed under us: the socket is being closed
            self._take(dict(parse_monitor_message(frames)))

    def _take(self, event: dict[str, Any]) -> None:
        kind, value, endpoint = event["event"], event["value"], event.get("endpoint", b"")
        if kind == zmq.EVENT_CONNECTED:
            self.shaking = True
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.shaking = False
            self.silent_closes = 0
            self.handshakes += 1
            self.up.add(endpoint)
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.failure = (
                f"the broker refused this key (ZAP status {value}): it is unknown to the"
                " broker's auth file, or its principal has no role for this endpoint"
            )
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
            self.failure = (
                "the broker does not use CURVE: start it with --auth, or connect without keys"
                if self.curve
                else "the broker asks for CURVE authentication: give the broker's public key"
                " and this peer's certificate (docs/security.md)"
            )
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self.several:
            self.shaking = False  # a silent peer (frozen, stepping down): try the others
        elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
            self.failure = (
                "the CURVE handshake failed: is the broker's public key right (its log prints"
                " it at start), and does the broker run with --auth?"
                if self.curve
                else "the broker asks for CURVE authentication: give the broker's public key"
                " and this peer's certificate (docs/security.md)"
            )
        elif kind == zmq.EVENT_DISCONNECTED and not self.shaking:
            if endpoint in self.up:  # a connection that had completed its handshake
                self.up.discard(endpoint)
                self.disconnects += 1
        elif kind == zmq.EVENT_DISCONNECTED and self.shaking:
            self.shaking = False
            if self.curve and not self.several:
                self.silent_closes += 1
                if self.silent_closes >= _SILENT_CLOSES:
                    self.failure = (
                        "the broker closed the connection during the CURVE handshake: is the"
                        " broker's public key right (its log prints it at start)?"
                    )

    def check(self) -> None:
        self.read()
        if self.failure is not None:
            raise AuthenticationFailed(self.endpoint, self.failure)


_POLLIN = int(zmq.POLLIN)
_WATCHES: weakref.WeakKeyDictionary[zmq.Socket[Any], _Watch] = weakref.WeakKeyDictionary()


def watch(sock: zmq.Socket[Any], endpoint: str, curve: bool, several: bool = False) -> None:
    """Watch `sock`'s handshakes (before it connects); `several`: it connects to several
    brokers, and only a definite refusal (ZAP, a mechanism mismatch) is an error."""
    _WATCHES[sock] = _Watch(sock.get_monitor_socket(_EVENTS), endpoint, curve, several)


def took_over(sock: zmq.Socket[Any]) -> bool:
    """Whether, on `sock` (as far as its monitor was read: `check` reads it), a
    connection was lost and then another handshake completed: on a socket connected to
    several brokers, another broker came up after the one it used went away (a standby
    took over), or the same one came back. Two brokers both up, as when a group's
    endpoints are mixed with another broker's, do not count."""
    found = _WATCHES.get(sock)
    return found is not None and found.disconnects >= 1 and found.handshakes >= 2


def check(sock: zmq.Socket[Any]) -> None:
    """Raise AuthenticationFailed if a handshake of `sock` failed (never blocks)."""
    found = _WATCHES.get(sock)
    if found is not None:
        found.check()


def monitor_of(sock: zmq.Socket[Any]) -> zmq.Socket[Any] | None:
    """The monitor socket to poll beside `sock` (readable when a handshake event came)."""
    found = _WATCHES.get(sock)
    return None if found is None else found.monitor


def monitor_owner(sock: zmq.Socket[Any]) -> zmq.Socket[Any] | None:
    """The monitor socket as made for `sock` (an asyncio socket for an asyncio one)."""
    found = _WATCHES.get(sock)
    return None if found is None else found.owner


def wait_readable(sock: zmq.Socket[Any], timeout_ms: int) -> bool:
    """Like `sock.poll(timeout_ms, POLLIN)` (a negative timeout: no limit), but a failed
    handshake raises AuthenticationFailed as soon as libzmq reports it."""
    found = _WATCHES.get(sock)
    if found is None:
        return bool(zmq.zmq_poll([(sock, _POLLIN)], timeout_ms))
    if found.failure is not None:
        raise AuthenticationFailed(found.endpoint, found.failure)
    # An event the monitor holds already makes the poll return at once.
    items = [(sock, _POLLIN), (found.monitor, _POLLIN)]
    deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000.0
    while True:
        ready = zmq.zmq_poll(items, timeout_ms)
        if any(s is sock for s, _ in ready):
            return True
        if not ready:
            return False
        found.check()  # only the monitor spoke: raise, or wait on
        if deadline is not None:
            timeout_ms = math.ceil((deadline - time.monotonic()) * 1000.0)
            if timeout_ms <= 0:
                return False


def close_socket(sock: zmq.Socket[Any], linger: int = 0) -> None:
    """Close `sock` (with `linger` ms for what it has not sent) and its watch."""
    found = _WATCHES.pop(sock, None)
    if found is not None:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        found.owner.close(linger=0)
    sock.close(linger=linger)


_S = TypeVar("_S", bound=zmq.Socket[Any])


def connected_socket(
    context: zmq.Context[_S],
    kind: int,
    endpoint: Endpoints,
    hwm: int = DEFAULT_HWM,
    credentials: Credentials | None = None,
) -> _S:
    """A new socket of `kind`, with explicit high-water marks, connected to `endpoint`
    (one, or several: see zbroker.client.endpoints): a CURVE client when `credentials`
    are given; its handshakes watched either way (zbroker.client.keys), so that a
    refused one is an error, not a silent wait.

    Connected to several brokers, it queues messages only to connections whose
    handshake completed (ZMQ_IMMEDIATE): the broker that is bound and alive, never a
    standby that does not listen or a frozen one that never completes a handshake.
    A send then may find no connection yet: callers send without blocking and wait
    for POLLOUT within their own timeouts.
    """
    endpoints = parse_endpoints(endpoint)
    several = len(endpoints) > 1
    with zmq_boundary("opening a socket"):
        sock = context.socket(kind)
    sock.linger = 0
    sock.sndhwm = hwm
    sock.rcvhwm = hwm
    if several:
        sock.immediate = 1
        # ZMTP heartbeats: a connection to a frozen broker (SIGSTOP, a hung host) is
        # dropped, so nothing more is queued to it once the other broker took over.
        sock.heartbeat_ivl = _HEARTBEAT_IVL_MS
        sock.heartbeat_timeout = _HEARTBEAT_TIMEOUT_MS
    if credentials is not None:
        credentials.apply(sock)
    watch(sock, joined(endpoints), credentials is not None, several)
    for each in endpoints:
        try:
            sock.connect(each)
        except zmq.ZMQError as exc:
            close_socket(sock)
            raise EndpointError(f"cannot connect to {each!r}: {exc}") from exc
    return sock
