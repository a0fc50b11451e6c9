"""Codecs: round trips, and garbage only ever gives ProtocolError."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbroker.protocol import mdp
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.events import Event, decode_event, encode_event

body_st = st.lists(st.binary(max_size=64), max_size=5)


@given(st.binary(min_size=1, max_size=40), body_st)
def test_client_request_round_trip(service: bytes, body: list[bytes]) -> None:
    frames = mdp.client_request(service, body)
    msg = mdp.decode_client(frames)
    assert msg == mdp.ClientRequest(service, tuple(body))


@given(st.binary(max_size=16), body_st)
def test_worker_reply_and_request_round_trip(client: bytes, body: list[bytes]) -> None:
    assert mdp.decode_worker(mdp.worker_reply(client, body)) == mdp.WorkerReply(client, tuple(body))
    got = mdp.decode_from_broker_to_worker(mdp.worker_request(client, body))
    assert got == mdp.BrokerRequest(client, tuple(body))


@given(st.binary(min_size=1, max_size=40), body_st)
def test_client_reply_round_trip(service: bytes, body: list[bytes]) -> None:
    assert mdp.decode_reply_to_client(mdp.client_reply(service, body)) == (service, tuple(body))


def test_worker_commands_decode() -> None:
    assert mdp.decode_worker(mdp.worker_ready(b"svc")) == mdp.WorkerReady(b"svc")
    assert mdp.decode_worker(mdp.worker_heartbeat()) == mdp.WorkerHeartbeat()
    assert mdp.decode_worker(mdp.worker_disconnect()) == mdp.WorkerDisconnect()
    assert mdp.decode_from_broker_to_worker(mdp.worker_heartbeat()) == mdp.BrokerHeartbeat()
    assert mdp.decode_from_broker_to_worker(mdp.worker_disconnect()) == mdp.BrokerDisconnect()


def test_wire_bytes_are_exactly_those_of_the_rfc() -> None:
    assert mdp.worker_ready(b"echo") == [b"", b"MDPW01", b"\x01", b"echo"]
    assert mdp.worker_request(b"C", [b"x"]) == [b"", b"MDPW01", b"\x02", b"C", b"", b"x"]
    assert mdp.worker_reply(b"C", [b"x"]) == [b"", b"MDPW01", b"\x03", b"C", b"", b"x"]
    assert mdp.worker_heartbeat() == [b"", b"MDPW01", b"\x04"]
    assert mdp.worker_disconnect() == [b"", b"MDPW01", b"\x05"]
    assert mdp.client_request(b"echo", [b"x"]) == [b"", b"MDPC01", b"echo", b"x"]


garbage_st = st.lists(st.binary(max_size=10), max_size=8)


@settings(max_examples=500)
@given(garbage_st)
def test_garbage_gives_protocol_errors_only(frames: list[bytes]) -> None:
    for decode in (
        mdp.decode_client,
        mdp.decode_worker,
        mdp.decode_from_broker_to_worker,
        mdp.decode_reply_to_client,
        decode_event,
    ):
        try:
            decode(frames)
        except ProtocolError as exc:
            assert exc.reason


@settings(max_examples=300)
@given(
    st.text(min_size=1, max_size=30),
    st.text(max_size=20),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=10,
    ),
    st.floats(allow_nan=False, allow_infinity=False),
    st.none() | st.text(max_size=10),
)
def test_event_round_trip(
    type_: str, source: str, payload: object, ts: float, corr: str | None
) -> None:
    event = Event(type_, source, payload, ts, correlation_id=corr, reply_to=corr)
    got = decode_event(encode_event(event))
    assert got.type == type_ and got.source == source and got.correlation_id == corr
    assert math.isclose(got.timestamp, ts) or got.timestamp == ts
    assert msgpack.packb(got.payload) == msgpack.packb(payload)


def test_event_topic_is_the_type_so_prefix_subscriptions_work() -> None:
    frames = encode_event(Event("fs.change", "watcher", {"path": "/a"}, 1.0))
    assert frames[0] == b"fs.change"


@pytest.mark.parametrize(
    "frames",
    [
        [b"t"],
        [b"t", b"\xc1"],  # msgpack's never-used byte
        [b"t", msgpack.packb([1, 2])],
        [b"t", msgpack.packb({"source": "x"})],
        [b"t", msgpack.packb({"type": 5})],
    ],
)
def test_bad_events_are_protocol_errors(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode_event(frames)


def test_empty_event_type_is_refused_locally() -> None:
    with pytest.raises(ValueError):
        encode_event(Event("", "s", None, 0.0))
