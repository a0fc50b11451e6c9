"""CURVE authentication for the broker's endpoints: the auth file and the ZAP handler.

`load_auth(path)` reads `zbroker start --auth FILE` (TOML; paths in it are relative
to the file) into the broker's secret key and a `Policy` (zbroker.protocol.access,
the one home of what each role may do). `ZapHandler` answers libzmq's ZAP requests
(RFC 27) for every CURVE handshake on the ROUTER and both event endpoints: a known
key with a role for that endpoint is admitted and its principal's name becomes the
User-Id that libzmq attaches to every message of the connection; anything else is
refused, and the peer sees the failure at once (status 400).

Fail-closed: the server sockets set ZMQ_ZAP_ENFORCE_DOMAIN, so without a handler
answering, no handshake succeeds; a request the handler cannot read is refused.
"""

from __future__ import annotations

import logging
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

from zbroker.protocol.access import Policy, PolicyError, Principal

log = logging.getLogger("zbroker.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_VERSION = b"1.0"
# A refusal is logged at most this often per reason (a hostile peer can retry fast).
_LOG_EVERY_S = 5.0


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Auth:
    """What the broker serves CURVE with: its own key pair and the principals."""

    public_key: bytes  # Z85
    secret_key: bytes  # Z85
    policy: Policy
    path: Path


def _certificate(base: Path, value: Any, where: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    if type(value) is not str or not value:
        raise AuthFileError(f"{where}: expected the path of a certificate file")
    path = base / value
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise AuthFileError(f"{where}: cannot read certificate {path}: {exc}") from None
    if secret and secret_key is None:
        raise AuthFileError(
            f"{where}: {path} holds no secret key (the broker needs its .key_secret file)"
        )
    return public, secret_key


def _strings(table: dict[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(type(v) is str for v in value):
        raise AuthFileError(f"{where}: `{name}` must be a list of strings")
    return tuple(value)


_PRINCIPAL_FIELDS = frozenset({"name", "key", "roles", "services", "topics"})


def load_auth(path: Path) -> Auth:
    """Read the auth file at `path` (see the module docstring and docs/security.md)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc}") from None
    unknown = sorted(set(data) - {"server_secret", "principal"})
    if unknown:
        raise AuthFileError(f"{path}: unknown key(s) {unknown}; known: server_secret, principal")
    base = path.parent
    if "server_secret" not in data:
        raise AuthFileError(f"{path}: `server_secret` (the broker's .key_secret file) is missing")
    where = f"{path}: server_secret"
    public, secret = _certificate(base, data["server_secret"], where, secret=True)
    assert secret is not None
    tables = data.get("principal", [])
    if not isinstance(tables, list) or not tables:
        raise AuthFileError(f"{path}: no [[principal]] tables: nobody could connect")
    principals = []
    for i, table in enumerate(tables):
        where = f"{path}: principal {str(table.get('name', i + 1))!r}"
        extra = sorted(set(table) - _PRINCIPAL_FIELDS)
        if extra:
            raise AuthFileError(f"{where}: unknown field(s) {extra}")
        name = table.get("name")
        if type(name) is not str:
            raise AuthFileError(f"{where}: `name` must be a string")
        key, _ = _certificate(base, table.get("key"), f"{where}: key", secret=False)
        principals.append(
            Principal(
                name=name,
                key=key.decode("ascii"),
                roles=frozenset(_strings(table, "roles", where)),
                services=_strings(table, "services", where),
                topics=_strings(table, "topics", where),
            )
        )
    try:
        policy = Policy(tuple(principals))
    except PolicyError as exc:
        raise AuthFileError(f"{path}: {exc}") from None
    if public.decode("ascii") in policy.by_key:
        raise AuthFileError(f"{path}: the broker's own key is also a principal's key")
    return Auth(public, secret, policy, path)


def user_id(frame: zmq.Frame) -> str | None:
    """The principal a message's connection authenticated as (its ZAP User-Id);
    None for a connection without one (inproc)."""
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return user if isinstance(user, str) and user else None


def serve_curve(sock: zmq.Socket[bytes], auth: Auth, domain: str) -> None:
    """Make `sock` (before it binds) a CURVE server whose handshakes ZAP decides."""
    sock.curve_server = True
    sock.curve_secretkey = auth.secret_key
    sock.zap_domain = domain.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


class ZapHandler:
    """Answers ZAP requests in a thread of its own, from `start()` to `stop()`.

    Bound at construction (before any server socket binds, so no handshake is ever
    decided without it). Counts what it admitted and refused (`admitted`, `refused`
    by reason), which the broker reports in STATS and /metrics."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], policy: Policy) -> None:
        self.policy = policy
        self.admitted = 0
        self.refused: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}
        self._socket = ctx.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zbroker-zap", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started (a failed start never did)
            self._thread.join(2.0)
        self._socket.close(linger=0)

    def _run(self) -> None:
        sock = self._socket
        while not self._stop.is_set():
            try:
                if not sock.poll(100):
                    continue
                request = sock.recv_multipart()
            except zmq.ZMQError:
                return  # the context is ending
            try:
                reply = self.decide(request)
            except Exception:  # fail closed: a request we cannot read is refused
                log.exception("ZAP request could not be decided; refused")
                reply = _reply(request, b"500", "internal error", b"")
            try:
                sock.send_multipart(reply)
            except zmq.ZMQError:
                return

    def decide(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to `request` (RFC 27: version, request id, domain, address,
        identity, mechanism, credentials...)."""
        if len(request) < 6 or request[0] != _ZAP_VERSION:
            return self._refuse(request, "malformed ZAP request", b"?")
        domain, address, mechanism = request[2], request[3], request[5]
        if mechanism != b"CURVE" or len(request) != 7 or len(request[6]) != 32:
            return self._refuse(request, f"mechanism {mechanism[:16]!r} is not CURVE", address)
        key = z85.encode(request[6]).decode("ascii")
        decision = self.policy.admit(domain.decode("utf-8", "replace"), key)
        if isinstance(decision, str):
            return self._refuse(request, decision, address)
        self.admitted += 1
        log.debug("admitted %s from %s on %s", decision.name, address.decode(), domain.decode())
        return _reply(request, b"200", "OK", decision.name.encode())

    def _refuse(self, request: list[bytes], reason: str, address: bytes) -> list[bytes]:
        self.refused[reason] += 1
        now = time.monotonic()
        if now - self._logged_at.get(reason, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged_at[reason] = now
            log.warning(
                "refused a handshake from %s: %s (%d so far)",
                address.decode("utf-8", "replace")[:64],
                reason,
                self.refused[reason],
            )
        return _reply(request, b"400", reason, b"")


def _reply(request: list[bytes], status: bytes, text: str, user_id: bytes) -> list[bytes]:
    request_id = request[1] if len(request) > 1 else b""
    return [_ZAP_VERSION, request_id, status, text.encode()[:255], user_id, b""]
