"""The ZBC01 codec: what clients send round-trips; anything else is a ProtocolError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zbroker.protocol import limits, zbc
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.states import TaskState

frames_st = st.lists(st.binary(max_size=20), max_size=5)


@given(st.lists(frames_st, min_size=1, max_size=6), st.integers(-128, 127))
def test_batch_enqueue_round_trip(payloads: list[list[bytes]], priority: int) -> None:
    options = zbc.TaskOptions(priority=priority, ttl_s=3.5, headers={"reply_to": "x"})
    msg = zbc.decode_client(zbc.enqueue(7, "svc", payloads, options, batch=True))
    assert isinstance(msg, zbc.Enqueue)
    assert msg.rid == 7 and msg.service == "svc" and not msg.wait
    assert msg.payloads == tuple(tuple(p) for p in payloads)
    assert msg.options == options


def test_single_enqueue_and_request_carry_every_option() -> None:
    options = zbc.TaskOptions(
        priority=-3, delay_s=2.0, ttl_s=9.0, max_attempts=5, timeout_s=1.5, key="k", headers={}
    )
    msg = zbc.decode_client(zbc.enqueue(1, "svc", [[b"a", b"b"]], options))
    assert isinstance(msg, zbc.Enqueue) and msg.payloads == ((b"a", b"b"),)
    assert msg.options == options
    req = zbc.decode_client(zbc.request(2, "svc", [b"q"], wait_s=4.0))
    assert isinstance(req, zbc.Enqueue) and req.wait and req.wait_s == 4.0


@pytest.mark.parametrize(
    ("command", "fields", "expected"),
    [
        (zbc.RESULT, {"id": "t1", "wait_s": 2}, zbc.Result(3, "t1", 2.0)),
        (zbc.STATUS, {"id": "t1"}, zbc.Status(3, "t1")),
        (zbc.STATUS, {"id": "t1", "preview": 64}, zbc.Status(3, "t1", 64)),
        (zbc.CANCEL, {"id": "t1"}, zbc.Cancel(3, "t1")),
        (zbc.DEAD, {"service": "s", "limit": 5, "after": 9}, zbc.Dead(3, "s", 5, 9)),
        (zbc.REDRIVE, {"service": "s", "ids": ["a"]}, zbc.Redrive(3, "s", ("a",))),
        (zbc.REDRIVE, {"service": "s"}, zbc.Redrive(3, "s", None)),
        (zbc.DROP, {"service": "s", "ids": ["a", "b"]}, zbc.Drop(3, "s", ("a", "b"))),
        (zbc.DROP, {"service": "s"}, zbc.Drop(3, "s", None)),
        (
            zbc.TASKS,
            {"service": "s", "state": "inflight", "limit": 7, "after": 2},
            zbc.ListTasks(3, "s", TaskState.INFLIGHT, 7, 2),
        ),
    ],
)
def test_calls_round_trip(command: bytes, fields: dict[str, object], expected: object) -> None:
    assert zbc.decode_client(zbc.call(command, 3, **fields)) == expected


@pytest.mark.parametrize(
    ("meta", "frames", "needle"),
    [
        ({"service": "s", "priority": 128}, [b"x"], "priority"),
        ({"service": "s", "priority": True}, [b"x"], "priority"),
        ({"service": ""}, [b"x"], "service"),
        ({"service": "s", "delay_s": -1}, [b"x"], "delay_s"),
        ({"service": "s", "delay_s": 1, "not_before": 5}, [b"x"], "not both"),
        ({"service": "s", "timeout_s": 0}, [b"x"], "timeout_s"),
        ({"service": "s", "max_attempts": 0}, [b"x"], "max_attempts"),
        ({"service": "s", "counts": [2]}, [b"x"], "add up"),
        ({"service": "s", "counts": []}, [], "counts"),
        ({"service": "s", "counts": [1, 1], "keys": ["a"]}, [b"x", b"y"], "keys"),
        ({"service": "s", "counts": [1, 1], "key": "a"}, [b"x", b"y"], "'key' is for one"),
        ({"service": "s", "headers": [1]}, [b"x"], "headers"),
    ],
)
def test_bad_enqueues_are_call_errors_with_the_rid(
    meta: dict[str, object], frames: list[bytes], needle: str
) -> None:
    packed = msgpack.packb({"rid": 5, **meta})
    with pytest.raises(zbc.CallError) as caught:
        zbc.decode_client([b"", zbc.ZBC01, zbc.ENQUEUE, packed, *frames])
    assert caught.value.rid == 5 and caught.value.code == zbc.E_BAD_REQUEST
    assert needle in caught.value.message


def test_unknown_command_and_stray_frames_are_call_errors() -> None:
    packed = msgpack.packb({"rid": 1, "id": "t"})
    with pytest.raises(zbc.CallError):
        zbc.decode_client([b"", zbc.ZBC01, b"\x7f", packed])
    with pytest.raises(zbc.CallError):
        zbc.decode_client([b"", zbc.ZBC01, zbc.STATUS, packed, b"extra"])


@given(st.lists(st.binary(max_size=12), max_size=6))
def test_garbage_gives_protocol_errors_only(frames: list[bytes]) -> None:
    for message in (frames, [b"", zbc.ZBC01, *frames]):
        with contextlib.suppress(ProtocolError):
            zbc.decode_client(message)


def test_answers_round_trip() -> None:
    ok = zbc.decode_answer(zbc.reply(4, {"id": "t", "state": "done"}, [b"r"]))
    assert ok.ok and ok.rid == 4 and ok.meta["state"] == "done" and ok.frames == (b"r",)
    err = zbc.decode_answer(zbc.error(4, zbc.E_NOT_FOUND, "no task"))
    assert not err.ok and err.code == zbc.E_NOT_FOUND and err.message == "no task"
    with pytest.raises(ProtocolError):
        zbc.decode_answer([b"", b"MDPC01", b"x", b"y"])


values_st = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
known_keys = st.sampled_from(
    [
        "rid", "service", "priority", "delay_s", "not_before", "ttl_s", "max_attempts",
        "timeout_s", "key", "keys", "headers", "counts", "wait_s", "id", "limit", "after", "ids",
    ]
)  # fmt: skip


@given(
    st.sampled_from([zbc.ENQUEUE, zbc.REQUEST, zbc.RESULT, zbc.STATUS, zbc.CANCEL, zbc.DEAD,
                     zbc.REDRIVE]),
    st.dictionaries(known_keys, values_st, max_size=8),
    st.lists(st.binary(max_size=4), max_size=3),
)  # fmt: skip
def test_wrong_field_types_give_protocol_errors_only(
    command: bytes, meta: dict[str, object], frames: list[bytes]
) -> None:
    with contextlib.suppress(ProtocolError):
        zbc.decode_client([b"", zbc.ZBC01, command, msgpack.packb(meta), *frames])


def test_a_call_without_options_gets_the_defaults_each_its_own() -> None:
    first = zbc.decode_client(zbc.enqueue(1, "svc", [[b"a"]]))
    second = zbc.decode_client(zbc.request(2, "svc", [b"b"], wait_s=3.0))
    assert isinstance(first, zbc.Enqueue) and isinstance(second, zbc.Enqueue)
    assert first.options == second.options == zbc.TaskOptions()
    assert first.options.headers is not second.options.headers  # never shared
    assert second.wait and second.wait_s == 3.0


@pytest.mark.parametrize(
    ("command", "answer_type"), [(zbc.REDRIVE, zbc.Redrive), (zbc.DROP, zbc.Drop)]
)
def test_redrive_and_drop_take_up_to_max_batch_ids(
    command: bytes, answer_type: type[zbc.Redrive] | type[zbc.Drop]
) -> None:
    # Given exactly MAX_BATCH ids, when decoded, then every one of them is kept
    ids = [f"t{i}" for i in range(zbc.MAX_BATCH)]
    msg = zbc.decode_client(zbc.call(command, 9, service="s", ids=ids))
    assert isinstance(msg, answer_type) and msg.ids == tuple(ids)


@pytest.mark.parametrize("command", [zbc.REDRIVE, zbc.DROP])
def test_redrive_and_drop_refuse_a_list_over_max_batch_whole(command: bytes) -> None:
    # Given one id more than MAX_BATCH, then the call is refused, not cut short
    ids = [f"t{i}" for i in range(zbc.MAX_BATCH + 1)]
    with pytest.raises(zbc.CallError) as caught:
        zbc.decode_client(zbc.call(command, 9, service="s", ids=ids))
    assert caught.value.rid == 9 and caught.value.code == zbc.E_BAD_REQUEST
    assert f"{zbc.MAX_BATCH + 1} task ids" in caught.value.message
    assert f"at most {zbc.MAX_BATCH}" in caught.value.message


@pytest.mark.parametrize("command", [zbc.REDRIVE, zbc.DROP])
@pytest.mark.parametrize("ids", ["t1", ["t1", 2], {"t1": 1}])
def test_redrive_and_drop_refuse_ids_that_are_not_a_list_of_strings(
    command: bytes, ids: object
) -> None:
    with pytest.raises(zbc.CallError) as caught:
        zbc.decode_client(zbc.call(command, 4, service="s", ids=ids))
    assert caught.value.code == zbc.E_BAD_REQUEST and "'ids'" in caught.value.message


@pytest.mark.parametrize("preview", [-1, 1.5, "64", True, limits.MAX_PREVIEW_BYTES + 1])
def test_status_refuses_a_preview_that_is_no_byte_count_within_the_cap(preview: object) -> None:
    with pytest.raises(zbc.CallError) as caught:
        zbc.decode_client(zbc.call(zbc.STATUS, 6, id="t1", preview=preview))
    assert caught.value.rid == 6 and caught.value.code == zbc.E_BAD_REQUEST
    assert "'preview'" in caught.value.message


def test_tasks_takes_every_state_by_its_wire_name_and_nothing_else() -> None:
    for state in TaskState:
        msg = zbc.decode_client(zbc.call(zbc.TASKS, 1, service="s", state=state.value))
        assert isinstance(msg, zbc.ListTasks) and msg.state is state
    for wrong in ("READY", "running", 3):
        with pytest.raises(zbc.CallError) as caught:
            zbc.decode_client(zbc.call(zbc.TASKS, 1, service="s", state=wrong))
        assert caught.value.code == zbc.E_BAD_REQUEST
        assert ", ".join(zbc.LISTABLE_STATES) in caught.value.message
