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
    DONE_FIELDS,
    ENQUEUED_FIELDS,
    STARTED_FIELDS,
    Event,
    decode_event,
    decode_events,
    encode_event,
    encode_events,
    encode_rows,
    encode_runs,
)

PACK = msgpack.Packer(use_bin_type=True).pack  # as the runtime's, reused
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
        [b"t", msgpack.packb({"type": "t", "timestamp": "1e300"})],  # a string
        [b"t", msgpack.packb({"type": "t", "timestamp": float("nan")})],
        [b"t", msgpack.packb({"type": "t", "timestamp": float("inf")})],
        [b"t", msgpack.packb({"type": "t", "timestamp": True})],
        [b"t", msgpack.packb({"type": "t", "timestamp": 2**63})],
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
        {"type": "t", "fields": ["a"], "rows": [[1]], "payload": 1},  # two forms
        {"type": "t", "fields": ["a"], "rows": [[1]], "payloads": [1]},
        {"type": "t", "rows": [[1]]},  # rows without fields
        {"type": "t", "fields": [], "rows": [[]]},
        {"type": "t", "fields": "a", "rows": [[1]]},
        {"type": "t", "fields": ["a", "a"], "rows": [[1, 2]]},  # a name twice
        {"type": "t", "fields": ["a", 1], "rows": [[1, 2]]},
        {"type": "t", "fields": ["a"], "rows": []},  # empty batch
        {"type": "t", "fields": ["a"], "rows": [1]},  # a row that is not an array
        {"type": "t", "fields": ["a", "b"], "rows": [[1, 2], [3]]},  # a short row
        {"type": "t", "fields": ["a"], "rows": [[1, 2]]},  # a long row
    ],
)
def test_bad_batches_are_protocol_errors(envelope: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        decode_events([b"t", msgpack.packb(envelope)])


def test_an_envelope_without_payload_is_one_event_with_a_nil_payload() -> None:
    assert decode_events([b"t", msgpack.packb({"type": "t"})]) == [Event("t", "", None, 0.0)]


def test_a_rows_batch_is_one_event_per_row_its_payload_the_fields_map() -> None:
    frames = encode_rows("task.started.tts", "zb", ["id", "n"], [("a", 1), ["b", None]], 3.0, "c")
    assert frames[0] == b"task.started.tts"
    envelope = msgpack.unpackb(frames[1])
    assert (envelope["fields"], envelope["rows"]) == (["id", "n"], [["a", 1], ["b", None]])
    assert decode_events(frames) == [
        Event("task.started.tts", "zb", {"id": "a", "n": 1}, 3.0, "c"),
        Event("task.started.tts", "zb", {"id": "b", "n": None}, 3.0, "c"),
    ]
    assert decode_event(encode_rows("t", "s", ["x"], [[7]], 1.0)) == Event("t", "s", {"x": 7}, 1.0)


@pytest.mark.parametrize(
    ("fields", "rows"),
    [([], [[]]), ("ab", [["a", "b"]]), (["a", "a"], [[1, 2]]), (["a"], []), (["a"], [[1, 2]])],
)
def test_a_bad_rows_batch_is_refused_locally(fields: list[str], rows: list[list[int]]) -> None:
    with pytest.raises(ValueError):
        encode_rows("t", "s", fields, rows, 0.0)


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
        ([b"", ext.ZBW01, ext.READY, msgpack.packb([1, 2])], "bad_meta"),
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


def test_runs_become_one_message_each_rows_or_payloads() -> None:
    runs = [
        ("task.a", None, [{"n": 1}]),
        ("task.b", None, [{"n": 2}, {"n": 3}]),
        ("task.started.c", STARTED_FIELDS, [("t1", 1, "ab"), ("t2", 2, "cd")]),
    ]
    messages = encode_runs(runs, "zbroker", 4.0, PACK)
    assert [(topic, count) for topic, _, count in messages] == [
        (b"task.a", 1),
        (b"task.b", 2),
        (b"task.started.c", 2),
    ]
    assert "payload" in msgpack.unpackb(messages[0][1])
    assert "payloads" in msgpack.unpackb(messages[1][1])
    assert "rows" in msgpack.unpackb(messages[2][1])
    decoded = [decode_events([topic, envelope]) for topic, envelope, _ in messages]
    assert decoded == [
        [Event("task.a", "zbroker", {"n": 1}, 4.0)],
        [Event("task.b", "zbroker", {"n": 2}, 4.0), Event("task.b", "zbroker", {"n": 3}, 4.0)],
        [
            Event("task.started.c", "zbroker", {"id": "t1", "attempt": 1, "worker": "ab"}, 4.0),
            Event("task.started.c", "zbroker", {"id": "t2", "attempt": 2, "worker": "cd"}, 4.0),
        ],
    ]


@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=40),
            st.integers(min_value=-(2**40), max_value=2**40),
            st.one_of(st.none(), st.floats(allow_nan=False)),
            st.dictionaries(
                st.text(max_size=8), st.one_of(st.integers(-5, 300), st.text(), st.binary())
            ),
            st.text(max_size=40),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_the_task_rows_decode_to_the_documented_payload_maps(
    events: list[tuple[str, int, float | None, dict[str, Any], str]],
) -> None:
    # The broker's rows for task.enqueued/started/done (§6.1): what a subscriber gets
    # is the documented map for every row.
    runs = [
        ("task.enqueued.s", ENQUEUED_FIELDS, [(i, n, nb, h) for i, n, nb, h, _ in events]),
        ("task.started.s", STARTED_FIELDS, [(i, n, w) for i, n, _, _, w in events]),
        ("task.done.s", DONE_FIELDS, [(i, n, h) for i, n, _, h, _ in events]),
    ]
    enqueued, started, done = (
        [e.payload for e in decode_events([topic, envelope])]
        for topic, envelope, _ in encode_runs(runs, "zbroker", 1.0, PACK)
    )
    assert enqueued == [
        {"id": i, "priority": n, "not_before": nb, "headers": h} for i, n, nb, h, _ in events
    ]
    assert started == [{"id": i, "attempt": n, "worker": w} for i, n, _, _, w in events]
    assert done == [{"id": i, "attempt": n, "headers": h} for i, n, _, h, _ in events]


@pytest.mark.parametrize("count", [1, 15, 16, 0xFFFF, 0x10000])
def test_runs_of_every_array_size_decode_whole(count: int) -> None:
    rows = [(f"t{i}", i, {"k": "v"} if i % 2 else {}) for i in range(count)]
    [(topic, envelope, n)] = encode_runs([("task.done.é", DONE_FIELDS, rows)], "zb", 2.5, PACK)
    assert (topic, n) == ("task.done.é".encode(), count)
    events = decode_events([topic, envelope])
    assert len(events) == count
    assert events[-1].payload == dict(zip(DONE_FIELDS, rows[-1], strict=True))
