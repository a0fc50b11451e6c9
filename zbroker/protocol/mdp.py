"""Majordomo frames <-> typed messages: 7/MDP (MDP/0.1), 18/MDP (MDP/0.2), 8/MMI.

Owns the exact byte layout of MDP as the broker sees it on its ROUTER socket.
Never touches a socket, the clock or broker state: frames in, objects out.

Frame lists handed to the decoders *exclude* the ROUTER routing id; encoders
for broker->peer messages return the frames *after* the routing id too, so the
caller prepends it.  7/MDP messages (MDPC01, MDPW01) start with the empty
delimiter frame a REQ socket adds (DEALER peers must send it themselves);
18/MDP messages (MDPC02, MDPW02) have none: their first frame is the header,
the second a command byte, for clients as for workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zbroker.protocol.errors import ProtocolError

MDPC01 = b"MDPC01"
MDPW01 = b"MDPW01"

# 7/MDP worker commands (one byte each).
READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
HEARTBEAT = b"\x04"
DISCONNECT = b"\x05"

COMMAND_NAMES = {
    READY: "READY",
    REQUEST: "REQUEST",
    REPLY: "REPLY",
    HEARTBEAT: "HEARTBEAT",
    DISCONNECT: "DISCONNECT",
}

# 18/MDP (MDP/0.2): its own headers, and command bytes of its own on both sides.
MDPC02 = b"MDPC02"
MDPW02 = b"MDPW02"

# MDPC02 commands: the client sends only REQUEST, the broker only PARTIAL and FINAL.
C02_REQUEST = b"\x01"
C02_PARTIAL = b"\x02"
C02_FINAL = b"\x03"

# MDPW02 commands (7/MDP's REPLY became PARTIAL and FINAL, so the rest moved up).
W02_READY = b"\x01"
W02_REQUEST = b"\x02"
W02_PARTIAL = b"\x03"
W02_FINAL = b"\x04"
W02_HEARTBEAT = b"\x05"
W02_DISCONNECT = b"\x06"

CLIENT02_COMMAND_NAMES = {
    C02_REQUEST: "REQUEST",
    C02_PARTIAL: "PARTIAL",
    C02_FINAL: "FINAL",
}
WORKER02_COMMAND_NAMES = {
    W02_READY: "READY",
    W02_REQUEST: "REQUEST",
    W02_PARTIAL: "PARTIAL",
    W02_FINAL: "FINAL",
    W02_HEARTBEAT: "HEARTBEAT",
    W02_DISCONNECT: "DISCONNECT",
}

# 8/MMI: the broker answers every service whose name starts with this prefix itself.
MMI_PREFIX = b"mmi."
MMI_SERVICE = b"mmi.service"
MMI_FOUND = b"200"
MMI_NOT_FOUND = b"404"
MMI_NOT_IMPLEMENTED = b"501"

EMPTY = b""


# ---------------------------------------------------------------- messages in


# Built once per message (or task) on the hot path: not frozen, whose __init__ costs
# about 3x more in CPython 3.11 (bench/instructions.py). Treat it as a value all the same
# (it hashes by its fields, as a frozen one would).
@dataclass(slots=True, unsafe_hash=True)
class ClientRequest:
    """MDPC01 request: a client asks `service` to handle `body`."""

    service: bytes
    body: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """MDPW01 READY: the worker offers `service`."""

    service: bytes


@dataclass(frozen=True, slots=True)
class WorkerReply:
    """MDPW01 REPLY, or MDPW02 FINAL: the worker's answer to the request it was given
    for `client`, its last word on it (18/MDP's FINAL is 7/MDP's REPLY after zero or
    more PARTIALs)."""

    client: bytes
    body: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class WorkerPartial:
    """MDPW02 PARTIAL: part of the answer to the request it was given for `client`;
    a FINAL (a WorkerReply) follows."""

    client: bytes
    body: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class WorkerHeartbeat:
    """MDPW01 HEARTBEAT."""


@dataclass(frozen=True, slots=True)
class WorkerDisconnect:
    """MDPW01 DISCONNECT."""


WorkerMessage = WorkerReady | WorkerReply | WorkerPartial | WorkerHeartbeat | WorkerDisconnect
_HEARTBEAT = WorkerHeartbeat()
_DISCONNECT = WorkerDisconnect()


def decode_client(frames: Sequence[bytes]) -> ClientRequest:
    """Decode an MDPC01 message (frames after the routing id: empty, header, service, body)."""
    if len(frames) < 3:
        raise ProtocolError("missing_frames", "MDPC01 request needs a service frame")
    if frames[0]:
        raise ProtocolError("bad_delimiter", "first frame must be empty")
    if not frames[2]:
        raise ProtocolError("bad_service", "empty service name")
    return ClientRequest(frames[2], tuple(frames[3:]))


def decode_worker(frames: Sequence[bytes]) -> WorkerMessage:
    """Decode an MDPW01 message (frames after the routing id: empty, header, command, ...)."""
    n = len(frames)
    if n < 3:
        raise ProtocolError("missing_frames", "MDPW01 message needs a command frame")
    if frames[0]:
        raise ProtocolError("bad_delimiter", "first frame must be empty")
    command = frames[2]
    if command == REPLY:
        if n < 5:
            raise ProtocolError("missing_frames", "REPLY needs client address and empty frame")
        if frames[4]:
            raise ProtocolError("bad_delimiter", "REPLY needs an empty frame after the address")
        return WorkerReply(frames[3], tuple(frames[5:]))
    if command == HEARTBEAT:
        if n != 3:
            raise ProtocolError("extra_frames", "HEARTBEAT has exactly three frames")
        return _HEARTBEAT
    if command == READY:
        if n != 4:
            raise ProtocolError("missing_frames" if n < 4 else "extra_frames", "READY: service")
        return WorkerReady(frames[3])
    if command == DISCONNECT:
        if n != 3:
            raise ProtocolError("extra_frames", "DISCONNECT has exactly three frames")
        return _DISCONNECT
    raise ProtocolError("unknown_command", f"unknown MDPW01 command {command[:8]!r}")


def decode_client02(frames: Sequence[bytes]) -> ClientRequest:
    """Decode an MDPC02 message (frames after the routing id: header, command, service,
    body). A client sends only REQUEST; PARTIAL and FINAL go the other way."""
    if len(frames) < 3:
        raise ProtocolError("missing_frames", "MDPC02 REQUEST needs a command and a service")
    command = frames[1]
    if command != C02_REQUEST:
        raise ProtocolError("unknown_command", f"MDPC02 command {command[:8]!r} from a client")
    if not frames[2]:
        raise ProtocolError("bad_service", "empty service name")
    return ClientRequest(frames[2], tuple(frames[3:]))


def decode_worker02(frames: Sequence[bytes]) -> WorkerMessage:
    """Decode an MDPW02 message (frames after the routing id: header, command, ...).
    FINAL decodes as a WorkerReply (it ends the request as 7/MDP's REPLY does); a
    PARTIAL must carry at least one body frame (18/MDP: five frames or more)."""
    n = len(frames)
    if n < 2:
        raise ProtocolError("missing_frames", "MDPW02 message needs a command frame")
    command = frames[1]
    if command in (W02_PARTIAL, W02_FINAL):
        if n < 4:
            raise ProtocolError("missing_frames", "needs a client address and an empty frame")
        if frames[3]:
            raise ProtocolError("bad_delimiter", "needs an empty frame after the address")
        if command == W02_FINAL:
            return WorkerReply(frames[2], tuple(frames[4:]))
        if n < 5:
            raise ProtocolError("missing_frames", "PARTIAL needs at least one body frame")
        return WorkerPartial(frames[2], tuple(frames[4:]))
    if command == W02_HEARTBEAT:
        if n != 2:
            raise ProtocolError("extra_frames", "HEARTBEAT has exactly two frames")
        return _HEARTBEAT
    if command == W02_READY:
        if n != 3:
            raise ProtocolError("missing_frames" if n < 3 else "extra_frames", "READY: service")
        return WorkerReady(frames[2])
    if command == W02_DISCONNECT:
        if n != 2:
            raise ProtocolError("extra_frames", "DISCONNECT has exactly two frames")
        return _DISCONNECT
    raise ProtocolError("unknown_command", f"unknown MDPW02 command {command[:8]!r}")


# ---------------------------------------------------------- broker -> peer


def client_reply(service: bytes, body: Sequence[bytes]) -> list[bytes]:
    """Broker -> client: the reply to a request for `service`."""
    return [EMPTY, MDPC01, service, *body]


def worker_request(client: bytes, body: Sequence[bytes]) -> list[bytes]:
    """Broker -> worker: handle `body` for `client`."""
    return [EMPTY, MDPW01, REQUEST, client, EMPTY, *body]


def worker_heartbeat() -> list[bytes]:
    return [EMPTY, MDPW01, HEARTBEAT]


def worker_disconnect() -> list[bytes]:
    return [EMPTY, MDPW01, DISCONNECT]


def client_partial(service: bytes, body: Sequence[bytes]) -> list[bytes]:
    """Broker -> MDPC02 client: part of the answer to its request for `service`."""
    return [MDPC02, C02_PARTIAL, service, *body]


def client_final(service: bytes, body: Sequence[bytes]) -> list[bytes]:
    """Broker -> MDPC02 client: the last answer to its request for `service`."""
    return [MDPC02, C02_FINAL, service, *body]


def worker02_request(client: bytes, body: Sequence[bytes]) -> list[bytes]:
    """Broker -> MDPW02 worker: handle `body` for `client`."""
    return [MDPW02, W02_REQUEST, client, EMPTY, *body]


def worker02_heartbeat() -> list[bytes]:
    """HEARTBEAT of 18/MDP, either way."""
    return [MDPW02, W02_HEARTBEAT]


def worker02_disconnect() -> list[bytes]:
    """DISCONNECT of 18/MDP, either way."""
    return [MDPW02, W02_DISCONNECT]


# ---------------------------------------- peer -> broker (used by clients)


def client_request(service: bytes, body: Sequence[bytes]) -> list[bytes]:
    """Client -> broker over a DEALER socket (a REQ socket adds the empty frame itself)."""
    return [EMPTY, MDPC01, service, *body]


def worker_ready(service: bytes) -> list[bytes]:
    return [EMPTY, MDPW01, READY, service]


def worker_reply(client: bytes, body: Sequence[bytes]) -> list[bytes]:
    return [EMPTY, MDPW01, REPLY, client, EMPTY, *body]


def client02_request(service: bytes, body: Sequence[bytes]) -> list[bytes]:
    """MDPC02 client -> broker (over a DEALER socket: 18/MDP has no empty frame)."""
    return [MDPC02, C02_REQUEST, service, *body]


def worker02_ready(service: bytes) -> list[bytes]:
    return [MDPW02, W02_READY, service]


def worker02_partial(client: bytes, body: Sequence[bytes]) -> list[bytes]:
    return [MDPW02, W02_PARTIAL, client, EMPTY, *body]


def worker02_final(client: bytes, body: Sequence[bytes]) -> list[bytes]:
    return [MDPW02, W02_FINAL, client, EMPTY, *body]


@dataclass(frozen=True, slots=True)
class BrokerRequest:
    """Broker -> worker REQUEST as a worker decodes it."""

    client: bytes
    body: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class BrokerHeartbeat:
    """Broker -> worker HEARTBEAT."""


@dataclass(frozen=True, slots=True)
class BrokerDisconnect:
    """Broker -> worker DISCONNECT: the worker must re-register."""


BrokerToWorker = BrokerRequest | BrokerHeartbeat | BrokerDisconnect


def decode_from_broker_to_worker(frames: Sequence[bytes]) -> BrokerToWorker:
    """Worker side: decode what a DEALER worker receives (empty, MDPW01, command, ...)."""
    if len(frames) < 3 or frames[0] or frames[1] != MDPW01:
        raise ProtocolError("bad_header", "not an MDPW01 message")
    command = frames[2]
    if command == REQUEST:
        if len(frames) < 5 or frames[4]:
            raise ProtocolError("missing_frames", "REQUEST needs client address and empty frame")
        return BrokerRequest(frames[3], tuple(frames[5:]))
    if command == HEARTBEAT:
        return BrokerHeartbeat()
    if command == DISCONNECT:
        return BrokerDisconnect()
    raise ProtocolError("unknown_command", f"unexpected command {command[:8]!r} for a worker")


def decode_reply_to_client(frames: Sequence[bytes]) -> tuple[bytes, tuple[bytes, ...]]:
    """Client side: decode a reply on a DEALER socket (empty, MDPC01, service, body...)."""
    if len(frames) < 3 or frames[0] or frames[1] != MDPC01:
        raise ProtocolError("bad_header", "not an MDPC01 reply")
    return frames[2], tuple(frames[3:])
