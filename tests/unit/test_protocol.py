"""Codecs: round trips, and garbage only ever gives ProtocolError."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbroker.protocol import ext, mdp
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.events import (
    Event,
    TaskPayloads,
    decode_event,
    decode_events,
    encode_event,
    encode_events,
    encode_runs,
)

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
        decode_events,
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


def test_a_batch_envelope_is_its_events_in_order_with_the_shared_fields() -> None:
    frames = encode_events("task.done.tts", "zbroker", [{"id": "a"}, None, [1]], 2.5, "c-7")
    assert frames[0] == b"task.done.tts"
    assert msgpack.unpackb(frames[1])["payloads"] == [{"id": "a"}, None, [1]]
    events = decode_events(frames)
    assert [e.payload for e in events] == [{"id": "a"}, None, [1]]
    assert {(e.type, e.source, e.timestamp, e.correlation_id) for e in events} == {
        ("task.done.tts", "zbroker", 2.5, "c-7")
    }
    # A single event is a list of one; decode_event refuses a batch of several.
    assert decode_events(encode_event(Event("a", "s", 5, 1.0))) == [Event("a", "s", 5, 1.0)]
    assert decode_event(encode_events("a", "s", [5], 1.0)) == Event("a", "s", 5, 1.0)
    with pytest.raises(ProtocolError, match="holds 3 events"):
        decode_event(frames)


@pytest.mark.parametrize(
    "envelope",
    [
        {"type": "t", "payloads": []},  # empty batch
        {"type": "t", "payloads": {"a": 1}},  # not an array
        {"type": "t", "payloads": "ab"},
        {"type": "t", "payloads": [1], "payload": 1},  # both forms
        {"type": "t", "source": 3, "payloads": [1]},
    ],
)
def test_bad_batches_are_protocol_errors(envelope: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        decode_events([b"t", msgpack.packb(envelope)])


def test_an_envelope_without_payload_is_one_event_with_a_nil_payload() -> None:
    assert decode_events([b"t", msgpack.packb({"type": "t"})]) == [Event("t", "", None, 0.0)]


@pytest.mark.parametrize("payloads", [[], (), b"ab", "ab"])
def test_an_empty_or_non_sequence_batch_is_refused_locally(payloads: object) -> None:
    with pytest.raises(ValueError):
        encode_events("t", "s", payloads, 0.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ ZBW01

id_st = st.text(min_size=1, max_size=12)
attempt_st = st.integers(min_value=0, max_value=2**31)


@given(id_st, attempt_st, body_st)
def test_zbw_done_and_progress_round_trip(task_id: str, attempt: int, body: list[bytes]) -> None:
    assert ext.decode_worker(ext.done(task_id, attempt, body)) == ext.Done(
        task_id, attempt, tuple(body)
    )
    assert ext.decode_worker(ext.progress(task_id, attempt, body)) == ext.Progress(
        task_id, attempt, tuple(body)
    )


@given(id_st, attempt_st, st.text(max_size=30), st.booleans(), st.none() | st.floats(0, 1e6))
def test_zbw_fail_round_trip(
    task_id: str, attempt: int, reason: str, retry: bool, delay_s: float | None
) -> None:
    frames = ext.fail(task_id, attempt, reason, retry=retry, delay_s=delay_s)
    assert ext.decode_worker(frames) == ext.Fail(task_id, attempt, reason, retry, delay_s)


def test_zbw_ready_ack_heartbeat_disconnect() -> None:
    assert ext.decode_worker(ext.ready("tts", 4, ["gpu"])) == ext.Ready("tts", 4, ("gpu",))
    assert ext.decode_worker(ext.ack([("a", 1), ("b", 2)])) == ext.Ack((("a", 1), ("b", 2)))
    assert ext.decode_worker(ext.heartbeat({"cpu": 1.5})) == ext.Heartbeat({"cpu": 1.5})
    assert ext.decode_worker(ext.heartbeat()) == ext.Heartbeat()
    assert ext.decode_worker(ext.disconnect("bye")) == ext.Disconnect()


@given(id_st, attempt_st, st.text(min_size=1, max_size=10), body_st)
def test_zbw_task_round_trip(task_id: str, attempt: int, service: str, body: list[bytes]) -> None:
    frames = [b"", ext.ZBW01, ext.TASK, ext.task_meta(task_id, attempt, service, {"k": 1}), *body]
    got = ext.decode_for_worker(frames)
    assert got == ext.Task(task_id, attempt, service, tuple(body), {"k": 1})
    assert ext.decode_for_worker(ext.cancel(task_id, attempt)) == ext.Cancel(task_id, attempt)


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"", ext.ZBW01, ext.READY, ext.pack_meta({"service": "", "credit": 1})], "bad_meta"),
        ([b"", ext.ZBW01, ext.READY, ext.pack_meta({"service": "s", "credit": 0})], "bad_meta"),
        ([b"", ext.ZBW01, ext.READY, ext.pack_meta({"service": "s", "credit": True})], "bad_meta"),
        ([b"", ext.ZBW01, ext.READY, b"\xc1"], "bad_meta"),
        ([b"", ext.ZBW01, ext.READY, ext.pack_meta([1, 2])], "bad_meta"),
        ([b"", ext.ZBW01, ext.DONE, ext.pack_meta({"id": 5, "attempt": 1})], "bad_meta"),
        ([b"", ext.ZBW01, ext.DONE, ext.pack_meta({"id": "x", "attempt": "1"})], "bad_meta"),
        ([b"", ext.ZBW01, ext.ACK, ext.pack_meta({"tasks": []})], "bad_meta"),
        ([b"", ext.ZBW01, ext.ACK, ext.pack_meta({"tasks": [["x"]]})], "bad_meta"),
        (
            [b"", ext.ZBW01, ext.FAIL, ext.pack_meta({"id": "x", "attempt": 1, "delay_s": -1})],
            "bad_meta",
        ),
        (
            [
                b"",
                ext.ZBW01,
                ext.FAIL,
                ext.pack_meta({"id": "x", "attempt": 1, "delay_s": float("nan")}),
            ],
            "bad_meta",
        ),
        (
            [
                b"",
                ext.ZBW01,
                ext.FAIL,
                ext.pack_meta({"id": "x", "attempt": 1, "delay_s": float("inf")}),
            ],
            "bad_meta",
        ),
        ([b"", ext.ZBW01, ext.DONE], "missing_frames"),
        ([b"", ext.ZBW01, b"\x7f"], "unknown_command"),
        ([b"x", ext.ZBW01, ext.HEARTBEAT], "bad_delimiter"),
    ],
)
def test_zbw_bad_messages_are_protocol_errors(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        ext.decode_worker(frames)
    assert info.value.reason == reason


@settings(max_examples=300)
@given(garbage_st)
def test_zbw_garbage_gives_protocol_errors_only(frames: list[bytes]) -> None:
    for decode in (ext.decode_worker, ext.decode_for_worker):
        try:
            decode(frames)
        except ProtocolError as exc:
            assert exc.reason


def test_zbw_tasks_and_dones_round_trip() -> None:
    entries = [
        ext.task_entry("a", 1, "svc", 2, {"h": 1}, 3.0),
        ext.task_entry("b", 2, "svc", 0),
    ]
    message = ext.decode_for_worker([*ext.tasks_header(entries), b"p1", b"p2"])
    assert message == ext.Tasks(
        (ext.Task("a", 1, "svc", (b"p1", b"p2"), {"h": 1}, 3.0), ext.Task("b", 2, "svc", ()))
    )
    dones = ext.decode_worker(ext.dones([("a", 1, [b"r1", b"r2"]), ("b", 2, [])]))
    assert dones == ext.Dones((ext.Done("a", 1, (b"r1", b"r2")), ext.Done("b", 2, ())))
    assert ext.decode_worker(ext.ready("s", 3, batch=True)) == ext.Ready("s", 3, (), True)


@pytest.mark.parametrize(
    "frames",
    [
        [b"", ext.ZBW01, ext.DONES, msgpack.packb({"tasks": [["a", 1, 2]]}), b"only one"],
        [b"", ext.ZBW01, ext.DONES, msgpack.packb({"tasks": []})],
        [b"", ext.ZBW01, ext.DONES, msgpack.packb({"tasks": [["a", "1", 0]]})],
        [b"", ext.ZBW01, ext.READY, msgpack.packb({"service": "s", "batch": 1})],
    ],
)
def test_zbw_bad_batches_are_protocol_errors(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        ext.decode_worker(frames)


def test_runs_become_one_message_each_a_single_event_in_the_plain_form() -> None:
    pack = msgpack.Packer(use_bin_type=True).pack
    runs = [("task.a", [pack({"n": 1})]), ("task.b", [pack({"n": 2}), pack({"n": 3})])]
    messages = encode_runs(runs, "zbroker", 4.0)
    assert [(topic, count) for topic, _, count in messages] == [(b"task.a", 1), (b"task.b", 2)]
    assert "payload" in msgpack.unpackb(messages[0][1])
    assert "payloads" in msgpack.unpackb(messages[1][1])
    decoded = [decode_events([topic, envelope]) for topic, envelope, _ in messages]
    assert decoded == [
        [Event("task.a", "zbroker", {"n": 1}, 4.0)],
        [Event("task.b", "zbroker", {"n": 2}, 4.0), Event("task.b", "zbroker", {"n": 3}, 4.0)],
    ]


@pytest.mark.parametrize("count", [1, 2, 15, 16, 17, 0xFFFF, 0x10000])
def test_spliced_runs_are_the_bytes_msgpack_makes_of_the_envelope(count: int) -> None:
    # encode_runs splices packed payloads into a hand-made envelope: it must be byte
    # for byte what msgpack makes of the map (every array header size included).
    payloads = [
        {"id": f"t{i}", "n": i, "headers": {"k": "v"} if i % 2 else {}} for i in range(count)
    ]
    pack = msgpack.Packer(use_bin_type=True).pack
    [(topic, envelope, n)] = encode_runs([("task.x.é", [pack(p) for p in payloads])], "zb", 2.5)
    key, data = ("payload", payloads[0]) if count == 1 else ("payloads", payloads)
    expected = {"type": "task.x.é", "source": "zb", key: data, "timestamp": 2.5}
    assert (topic, n) == ("task.x.é".encode(), count)
    assert envelope == msgpack.packb(expected, use_bin_type=True)


@given(
    st.text(min_size=1, max_size=40),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.one_of(st.none(), st.floats(allow_nan=False)),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(-5, 300), st.text(), st.binary())),
    st.text(max_size=40),
)
def test_task_payloads_are_the_bytes_msgpack_makes_of_the_documented_maps(
    task_id: str, number: int, not_before: float | None, headers: dict[str, Any], worker: str
) -> None:
    payloads = TaskPayloads()
    head, tail = payloads.enqueued(number, not_before, headers)
    documented = {"id": task_id, "priority": number, "not_before": not_before, "headers": headers}
    assert head + payloads.pack(task_id) + tail == msgpack.packb(documented)
    started = {"id": task_id, "attempt": number, "worker": worker}
    assert payloads.started(task_id, number, worker) == msgpack.packb(started)
    done = {"id": task_id, "attempt": number, "headers": headers}
    assert payloads.done(task_id, number, headers) == msgpack.packb(done)
