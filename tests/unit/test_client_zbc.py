"""Client and AsyncClient durable calls (ZBC01) against a fake broker: a real ROUTER socket.

The test plays the broker: it reads what the client sent, checks it frame by
frame, and answers (or stays silent) with `zbroker.protocol.zbc`. The client
call under test runs in the background (a thread for Client, an event loop
thread for AsyncClient), so most tests run once per client kind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import zmq

from zbroker.client import (
    AsyncClient,
    BadRequest,
    BrokerError,
    BrokerUnavailable,
    CallTimeout,
    Client,
    ClientClosed,
    ClientStats,
    DeadLetter,
    MessageTooLarge,
    QueueFull,
    ReplyError,
    RequestTimeout,
    TaskCancelled,
    TaskConflict,
    TaskDead,
    TaskExpired,
    TaskId,
    TaskNotFound,
    TaskOptions,
    TaskPending,
    TaskState,
    TaskStatus,
    TooManyWaiters,
    _calls,
)
from zbroker.protocol import zbc
from zbroker.protocol.ext import unpack_meta

pytestmark = pytest.mark.timeout(30)

Ctx = zmq.Context[zmq.Socket[bytes]]
WAIT_S = 5.0  # how long the fake broker waits for the client to send something


# ------------------------------------------------------------ the fake broker


@dataclass
class Received:
    """One message from a client: who sent it (ROUTER routing id), its frames, decoded."""

    peer: bytes
    frames: list[bytes]
    msg: zbc.ClientMessage

    @property
    def meta(self) -> dict[str, Any]:
        return unpack_meta(self.frames[3])


class FakeBroker:
    """A ROUTER on a free loopback port that the test drives by hand."""

    def __init__(self, ctx: Ctx) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def recv(self, timeout_s: float = WAIT_S) -> Received:
        assert self.sock.poll(int(timeout_s * 1000)), f"the client sent nothing in {timeout_s}s"
        peer, *frames = self.sock.recv_multipart()
        return Received(peer, frames, zbc.decode_client(frames))

    def nothing_more(self, timeout_s: float = 0.05) -> bool:
        return not self.sock.poll(int(timeout_s * 1000))

    def send(self, to: Received, frames: list[bytes]) -> None:
        self.sock.send_multipart([to.peer, *frames])

    def reply(self, to: Received, fields: dict[str, Any], frames: tuple[bytes, ...] = ()) -> None:
        self.send(to, zbc.reply(to.msg.rid, fields, frames))

    def error(self, to: Received, code: str, message: str = "refused") -> None:
        self.send(to, zbc.error(to.msg.rid, code, message))


# ------------------------------------------------------------ the clients under test


class Driver:
    """Runs one client's calls in the background: `call(name, ...)` returns a Future."""

    def __init__(self, client: Client | AsyncClient, submit: Callable[..., Future[Any]]) -> None:
        self.client = client
        self._submit = submit

    @property
    def stats(self) -> ClientStats:
        return self.client.stats

    def call(self, name: str, *args: Any, **kw: Any) -> Future[Any]:
        return self._submit(getattr(self.client, name), *args, **kw)


@pytest.fixture
def fake(zmq_ctx: Ctx) -> FakeBroker:
    return FakeBroker(zmq_ctx)


@pytest.fixture
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def make_sync(fake: FakeBroker, ctx: Ctx, stack: ExitStack, **kw: Any) -> Driver:
    client = Client(fake.endpoint, context=ctx, **kw)
    stack.callback(client.close)
    pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
    return Driver(client, pool.submit)


def make_async(
    fake: FakeBroker, ctx: Ctx, stack: ExitStack, loop: asyncio.AbstractEventLoop, **kw: Any
) -> Driver:
    client = AsyncClient(fake.endpoint, context=ctx, **kw)
    stack.callback(lambda: asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(5))

    def submit(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(method(*args, **kwargs), loop)

    return Driver(client, submit)


@pytest.fixture(params=["Client", "AsyncClient"])
def connect(
    request: pytest.FixtureRequest,
    zmq_ctx: Ctx,
    event_loop_thread: asyncio.AbstractEventLoop,
    stack: ExitStack,
    fake: FakeBroker,
) -> Callable[..., Driver]:
    """connect(**client_kwargs) -> a Driver of a Client or an AsyncClient on the fake broker.

    Fixture order matters: clients (closed by `stack`) go before the event loop, which
    goes before the zmq context.
    """

    def make(**kw: Any) -> Driver:
        if request.param == "Client":
            return make_sync(fake, zmq_ctx, stack, **kw)
        return make_async(fake, zmq_ctx, stack, event_loop_thread, **kw)

    return make


def done(fields: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "t1", "state": "done", **(fields or {})}


# ------------------------------------------------------------ enqueue


def test_enqueue_sends_one_enqueue_and_returns_the_committed_id(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given a client
    client = connect()
    # When it enqueues a two-frame payload with options
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    future = client.call(
        "enqueue",
        "tts",
        [b"hello", b"de-DE"],
        priority=5,
        not_before=when,
        ttl_s=60,
        max_attempts=4,
        timeout_s=30,
        headers={"reply_to": "chat"},
    )
    got = fake.recv()
    # Then the broker got one ENQUEUE with the options in its meta and the payload frames after it
    assert got.frames[:3] == [b"", zbc.ZBC01, zbc.ENQUEUE]
    assert got.frames[4:] == [b"hello", b"de-DE"]
    assert isinstance(got.msg, zbc.Enqueue) and not got.msg.wait
    assert got.msg.service == "tts"
    assert got.msg.payloads == ((b"hello", b"de-DE"),)
    options = got.msg.options
    assert (options.priority, options.ttl_s, options.max_attempts) == (5, 60.0, 4)
    assert (options.timeout_s, options.headers) == (30.0, {"reply_to": "chat"})
    assert options.not_before == when.timestamp()
    assert "counts" not in got.meta
    # And an idempotency key was generated for it
    assert isinstance(options.key, str) and len(options.key) >= 16
    # When the broker answers with the id
    fake.reply(got, {"ids": ["t-42"]})
    # Then enqueue returns it
    assert future.result(WAIT_S) == "t-42"
    assert client.stats.calls == 1
    assert client.stats.answers == 1


def test_each_enqueue_gets_its_own_key_and_a_given_key_is_kept(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    keys = []
    for given in (None, None, "order-17"):
        future = client.call("enqueue", "svc", b"x", key=given)
        got = fake.recv()
        assert isinstance(got.msg, zbc.Enqueue)
        keys.append(got.msg.options.key)
        fake.reply(got, {"ids": [f"t{len(keys)}"]})
        future.result(WAIT_S)
    assert keys[0] != keys[1]
    assert keys[2] == "order-17"


def test_an_options_value_goes_on_the_wire_as_the_keywords_do(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given a client, and options as keywords and as one value
    client = connect()
    when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    keywords: dict[str, Any] = {
        "priority": -5,
        "not_before": when,
        "ttl_s": 60,
        "max_attempts": 4,
        "headers": {"reply_to": "chat"},
        "key": "k",
    }
    value = TaskOptions(timeout_s=30, **keywords)
    sent = []
    # When each call sends them both ways (request calls the run-time limit task_timeout_s)
    for name, args, limit in [
        ("enqueue", ("tts", b"x"), {"timeout_s": 30}),
        ("request", ("tts", b"x", 5), {"task_timeout_s": 30}),
        ("request_frames", ("tts", b"x", 5), {"task_timeout_s": 30}),
    ]:
        for kw in ({**keywords, **limit}, {"options": value}):
            future = client.call(name, *args, **kw)
            got = fake.recv()
            assert isinstance(got.msg, zbc.Enqueue)
            sent.append(got.msg.options)
            fake.reply(got, {"id": "t1", "state": "done"} if got.msg.wait else {"ids": ["t1"]})
            future.result(WAIT_S)
    future = client.call(
        "enqueue_many", "tts", [b"x"], options=dataclasses.replace(value, key=None)
    )
    got = fake.recv()
    assert isinstance(got.msg, zbc.Enqueue)
    batch = got.msg.options
    fake.reply(got, {"ids": ["t2"]})
    future.result(WAIT_S)
    # Then every message carries the same options
    expected = zbc.TaskOptions(
        priority=-5,
        not_before=when.timestamp(),
        ttl_s=60.0,
        max_attempts=4,
        timeout_s=30.0,
        key="k",
        headers={"reply_to": "chat"},
    )
    assert sent == [expected] * 6
    assert batch == dataclasses.replace(expected, key=None, keys=batch.keys)
    assert batch.keys is not None and len(batch.keys) == 1


def test_options_with_keywords_are_refused_before_anything_is_sent(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    value = TaskOptions(priority=1)
    refused: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
        ("enqueue", ("svc", b"x"), {"ttl_s": 5}, "ttl_s"),
        ("enqueue_many", ("svc", [b"x"]), {"priority": 2}, "priority"),
        ("request", ("svc", b"x"), {"task_timeout_s": 1, "key": "k"}, "task_timeout_s, key"),
        ("request_frames", ("svc", b"x"), {"headers": {"a": 1}}, "headers"),
    ]
    for name, args, kw, named in refused:
        with pytest.raises(TypeError, match=f"not both \\(also given: {named}\\)"):
            client.call(name, *args, options=value, **kw).result(WAIT_S)
    with pytest.raises(TypeError, match="options must be a TaskOptions"):
        client.call("enqueue", "svc", b"x", options={"priority": 1}).result(WAIT_S)
    assert fake.nothing_more()


def test_unanswered_enqueue_is_resent_on_a_fresh_socket_with_the_same_key(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given a client that waits 0.2 s per attempt
    client = connect(timeout_s=0.2, retries=3)
    future = client.call("enqueue", "svc", b"job")
    # When the broker never answers the first attempt
    first = fake.recv()
    second = fake.recv()
    # Then the same task is sent again from a new connection, same key, new rid
    assert isinstance(first.msg, zbc.Enqueue) and isinstance(second.msg, zbc.Enqueue)
    assert second.peer != first.peer
    assert second.msg.options.key == first.msg.options.key
    assert second.msg.rid != first.msg.rid
    assert second.msg.payloads == first.msg.payloads
    # And the answer to the resend is the call's answer
    fake.reply(second, {"ids": ["t1"], "existing": [0]})
    assert future.result(WAIT_S) == "t1"
    assert client.stats.resends == 1
    # And the match is the call's own first send (its key was generated): not "existing"
    assert future.result(WAIT_S).existing is False


def test_a_silent_broker_ends_the_call_with_call_timeout_naming_the_key(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given a client with one retry and a broker that never answers
    client = connect(timeout_s=0.1, retries=1)
    future = client.call("enqueue", "svc", b"job", key="k-1")
    fake.recv()
    fake.recv()
    # Then, after two attempts, the call fails with CallTimeout (a RequestTimeout)
    with pytest.raises(CallTimeout) as caught:
        future.result(WAIT_S)
    assert isinstance(caught.value, RequestTimeout)
    assert caught.value.attempts == 2
    assert caught.value.key == "k-1"
    assert "k-1" in str(caught.value)
    assert client.stats.timeouts == 1


def test_answers_to_other_rids_and_garbage_are_ignored_and_counted(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("status", "t1")
    got = fake.recv()
    # When the broker first sends an answer for an rid nobody waits for, then garbage
    fake.send(got, zbc.reply(got.msg.rid + 1000, {"task": {}}))
    fake.send(got, [b"", zbc.ZBC01, zbc.REPLY, b"\xc1"])
    fake.send(got, [b"", b"NOPE"])
    # And then the real answer
    fake.reply(got, {"task": {"id": "t1", "service": "svc", "state": "ready"}})
    # Then only the real answer is taken
    assert future.result(WAIT_S).state is TaskState.READY
    assert client.stats.unexpected_answers == 1
    assert client.stats.malformed_replies == 2


def test_enqueue_many_sends_one_batch_with_counts_and_a_key_per_task(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call(
        "enqueue_many", "embed", [b"a", [b"b1", b"b2"], b"c"], keys=[None, "mine", None], ttl_s=5
    )
    got = fake.recv()
    assert isinstance(got.msg, zbc.Enqueue)
    assert got.meta["counts"] == [1, 2, 1]
    assert got.msg.payloads == ((b"a",), (b"b1", b"b2"), (b"c",))
    keys = got.msg.options.keys
    assert keys is not None and keys[1] == "mine"
    assert keys[0] and keys[2] and len(set(keys)) == 3
    assert got.msg.options.ttl_s == 5.0
    fake.reply(got, {"ids": ["t1", "t2", "t3"]})
    assert future.result(WAIT_S) == ["t1", "t2", "t3"]


def test_enqueue_many_of_one_payload_is_a_batch_of_one_with_a_key(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("enqueue_many", "svc", [b"only"])
    got = fake.recv()
    assert isinstance(got.msg, zbc.Enqueue)
    assert got.meta["counts"] == [1] and got.msg.payloads == ((b"only",),)
    # never without an idempotency key: a resend must not store it twice
    keys = got.msg.options.keys
    assert got.msg.options.key is None and keys is not None and len(keys) == 1 and keys[0]
    fake.reply(got, {"ids": ["t1"]})
    assert future.result(WAIT_S) == ["t1"]


def test_enqueue_many_splits_a_batch_over_max_batch(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    n = zbc.MAX_BATCH + 1
    future = client.call("enqueue_many", "svc", [b"%d" % i for i in range(n)])
    first = fake.recv()
    assert isinstance(first.msg, zbc.Enqueue)
    assert len(first.msg.payloads) == zbc.MAX_BATCH
    fake.reply(first, {"ids": [f"a{i}" for i in range(zbc.MAX_BATCH)]})
    second = fake.recv()
    assert isinstance(second.msg, zbc.Enqueue)
    assert second.msg.payloads == ((b"%d" % zbc.MAX_BATCH,),)
    assert second.msg.options.keys is not None and len(second.msg.options.keys) == 1
    fake.reply(second, {"ids": ["last"]})
    ids = future.result(WAIT_S)
    assert len(ids) == n and ids[-1] == "last"


def test_a_key_of_the_callers_that_matched_a_stored_task_is_reported_existing(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    # One task with the caller's key, matched by the broker
    future = client.call("enqueue", "svc", b"x", key="file-3f2a")
    fake.reply(fake.recv(), {"ids": ["t7"], "existing": [0]})
    task_id = future.result(WAIT_S)
    assert task_id == "t7" and task_id.existing is True
    # The same key, not matched this time (say, the stored task's record expired)
    future = client.call("enqueue", "svc", b"x", key="file-3f2a")
    fake.reply(fake.recv(), {"ids": ["t8"]})
    assert future.result(WAIT_S).existing is False
    # A batch: only the caller's keys can be existing, a generated key never is
    future = client.call("enqueue_many", "svc", [b"a", b"b", b"c"], keys=["k-a", None, "k-c"])
    fake.reply(fake.recv(), {"ids": ["t1", "t2", "t3"], "existing": [0, 1]})
    ids = future.result(WAIT_S)
    assert ids == ["t1", "t2", "t3"]
    assert [i.existing for i in ids] == [True, False, False]


def test_existing_indexes_of_a_split_batch_map_to_their_own_message(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    n = zbc.MAX_BATCH + 2
    keys = [f"k{i}" for i in range(n)]
    future = client.call("enqueue_many", "svc", [b"%d" % i for i in range(n)], keys=keys)
    first = fake.recv()
    fake.reply(first, {"ids": [f"a{i}" for i in range(zbc.MAX_BATCH)], "existing": [3]})
    second = fake.recv()
    assert isinstance(second.msg, zbc.Enqueue) and len(second.msg.payloads) == 2
    # Index 1 of the second message is task MAX_BATCH + 1 of the call
    fake.reply(second, {"ids": ["b0", "b1"], "existing": [1]})
    ids = future.result(WAIT_S)
    assert [i for i, task_id in enumerate(ids) if task_id.existing] == [3, zbc.MAX_BATCH + 1]


@pytest.mark.parametrize("existing", [0, "0", [2], [-1], [0, 0], [0.0], [True], [None]], ids=repr)
def test_a_malformed_existing_list_is_a_reply_error(
    connect: Callable[..., Driver], fake: FakeBroker, existing: Any
) -> None:
    client = connect()
    future = client.call("enqueue_many", "svc", [b"a", b"b"], keys=["k1", "k2"])
    fake.reply(fake.recv(), {"ids": ["t1", "t2"], "existing": existing})
    with pytest.raises(ReplyError, match="existing"):
        future.result(WAIT_S)


def test_a_task_id_is_a_str_that_keeps_existing_through_pickle() -> None:
    task_id = TaskId("t9", existing=True)
    assert task_id == "t9" and isinstance(task_id, str) and hash(task_id) == hash("t9")
    assert f"{task_id}" == "t9" and json.dumps([task_id]) == '["t9"]'
    copy = pickle.loads(pickle.dumps(task_id))
    assert copy == "t9" and copy.existing is True and type(copy) is TaskId
    assert TaskId("t1").existing is False


def test_an_answer_with_the_wrong_number_of_ids_is_a_reply_error(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("enqueue_many", "svc", [b"a", b"b"])
    fake.reply(fake.recv(), {"ids": ["only-one"]})
    with pytest.raises(ReplyError):
        future.result(WAIT_S)


# ------------------------------------------------------------ request / result


def test_request_gets_a_receipt_then_the_result_on_the_same_rid(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("request", "echo", b"hi", 10, priority=-3, task_timeout_s=2)
    got = fake.recv()
    # The broker got a REQUEST (enqueue and wait) with the task's own time limit
    assert got.frames[:3] == [b"", zbc.ZBC01, zbc.REQUEST]
    assert isinstance(got.msg, zbc.Enqueue) and got.msg.wait
    assert got.msg.options.timeout_s == 2.0
    assert got.msg.options.priority == -3
    assert got.msg.options.key
    # And it asked the broker to hold the call no longer than the call's own deadline
    assert got.msg.wait_s is not None and 0 < got.msg.wait_s <= 10
    fake.reply(got, {"ids": ["t1"]})
    fake.reply(got, done(), (b"HI",))
    assert future.result(WAIT_S) == b"HI"
    assert fake.nothing_more()


def test_request_whose_broker_wait_ran_out_goes_on_with_result(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given a client that lets the broker hold a wait for 0.2 s at most
    client = connect(poll_s=0.2)
    future = client.call("request", "svc", b"job")
    got = fake.recv()
    assert isinstance(got.msg, zbc.Enqueue) and got.msg.wait_s == 0.2
    # When the REQUEST's second answer says the task is still running
    fake.reply(got, {"ids": ["t1"]})
    fake.reply(got, {"id": "t1", "state": "inflight"})
    # Then the client goes on waiting with RESULT by id on the same connection
    poll = fake.recv()
    assert poll.peer == got.peer
    assert isinstance(poll.msg, zbc.Result) and poll.msg.id == "t1"
    fake.reply(poll, done(), (b"finally",))
    assert future.result(WAIT_S) == b"finally"
    assert client.stats.resumes == 0


def test_request_resumes_with_result_by_id_on_a_fresh_socket(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given a client that lets the broker hold a wait for 0.2 s, and expects
    # its answer at most 0.2 s after that
    client = connect(timeout_s=0.2, poll_s=0.2)
    future = client.call("request", "slow", b"job")
    # When the broker confirms the task, then goes silent on that connection
    request = fake.recv()
    fake.reply(request, {"ids": ["t1"]})
    # Then the client asks for the result by id on a new connection, never enqueueing again
    resumed = fake.recv()
    assert resumed.peer != request.peer
    assert isinstance(resumed.msg, zbc.Result)
    assert resumed.msg.id == "t1" and resumed.msg.wait_s > 0
    fake.reply(resumed, done(), (b"out",))
    assert future.result(WAIT_S) == b"out"
    assert client.stats.resumes == 1
    assert fake.nothing_more()


def test_request_whose_receipt_is_lost_is_resent_with_the_same_key(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect(timeout_s=0.2)
    future = client.call("request", "svc", b"job")
    first = fake.recv()
    second = fake.recv()
    assert isinstance(first.msg, zbc.Enqueue) and isinstance(second.msg, zbc.Enqueue)
    assert second.msg.wait and second.peer != first.peer
    assert second.msg.options.key == first.msg.options.key
    fake.reply(second, {"ids": ["t1"], "existing": [0]})
    fake.reply(second, done(), (b"ok",))
    assert future.result(WAIT_S) == b"ok"


def test_request_answered_with_its_end_only_still_returns_the_result(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given a REQUEST whose receipt never arrived but whose final answer did
    client = connect()
    future = client.call("request", "svc", b"job")
    got = fake.recv()
    fake.reply(got, done(), (b"early",))
    # Then the call returns the result, without asking again
    assert future.result(WAIT_S) == b"early"
    assert fake.nothing_more()


def test_a_wait_the_broker_never_answers_ends_with_call_timeout_naming_the_task(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect(timeout_s=0.1, poll_s=0.1, retries=1)
    future = client.call("result", "t1", 30)
    first, second = fake.recv(), fake.recv()
    assert isinstance(first.msg, zbc.Result) and isinstance(second.msg, zbc.Result)
    assert second.peer != first.peer
    with pytest.raises(CallTimeout) as caught:
        future.result(WAIT_S)
    assert (caught.value.command, caught.value.task_id) == ("RESULT", "t1")
    assert "t1" in str(caught.value)
    assert client.stats.timeouts == 1 and client.stats.resumes == 1


def test_result_long_polls_and_returns_every_frame(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect(poll_s=30)
    future = client.call("result_frames", "t1", 5)
    got = fake.recv()
    assert got.frames[:3] == [b"", zbc.ZBC01, zbc.RESULT]
    assert isinstance(got.msg, zbc.Result)
    assert got.msg.id == "t1" and 0 < got.msg.wait_s <= 5
    fake.reply(got, done(), (b"a", b"", b"c"))
    assert future.result(WAIT_S) == [b"a", b"", b"c"]


def test_result_with_zero_timeout_asks_once_and_raises_task_pending(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("result", "t1", 0)
    got = fake.recv()
    assert isinstance(got.msg, zbc.Result) and got.msg.wait_s == 0
    fake.reply(got, {"id": "t1", "state": "inflight"})
    with pytest.raises(TaskPending) as caught:
        future.result(WAIT_S)
    assert caught.value.task_id == "t1"
    assert caught.value.state == "inflight"
    assert isinstance(caught.value, RequestTimeout)
    assert fake.nothing_more()


def test_result_polls_again_until_its_deadline(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect(poll_s=0.1)
    future = client.call("result", "t1", 0.3)
    polls = 0
    while not future.done():
        if fake.sock.poll(100):
            got = fake.recv()
            assert isinstance(got.msg, zbc.Result) and got.msg.wait_s <= 0.3
            fake.reply(got, {"id": "t1", "state": "delayed"})
            polls += 1
    with pytest.raises(TaskPending) as caught:
        future.result()
    assert caught.value.state == "delayed"
    assert polls >= 2


def test_result_rides_out_a_broker_that_is_shutting_down(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect(timeout_s=0.1)
    future = client.call("result", "t1", 10)
    first = fake.recv()
    fake.error(first, zbc.E_SHUTTING_DOWN, "stopping")
    again = fake.recv()
    assert again.peer != first.peer
    assert isinstance(again.msg, zbc.Result) and again.msg.id == "t1"
    fake.reply(again, done(), (b"after restart",))
    assert future.result(WAIT_S) == b"after restart"


@pytest.mark.parametrize(
    ("state", "exception"),
    [("dead", TaskDead), ("cancelled", TaskCancelled), ("expired", TaskExpired)],
)
def test_a_task_that_ended_without_result_raises_its_failure(
    connect: Callable[..., Driver], fake: FakeBroker, state: str, exception: type[Exception]
) -> None:
    client = connect()
    future = client.call("request", "svc", b"job")
    got = fake.recv()
    fake.reply(got, {"ids": ["t1"]})
    fake.reply(got, {"id": "t1", "state": state, "error": "model exploded"})
    with pytest.raises(exception) as caught:
        future.result(WAIT_S)
    assert caught.value.task_id == "t1"  # type: ignore[attr-defined]
    assert caught.value.error == "model exploded"  # type: ignore[attr-defined]
    assert state in str(caught.value) and "model exploded" in str(caught.value)


def test_a_multi_frame_result_refused_by_result_stays_fetchable(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("result", "t1")
    fake.reply(fake.recv(), done(), (b"a", b"b"))
    with pytest.raises(ReplyError, match="result_frames"):
        future.result(WAIT_S)


def test_a_result_of_no_frames_reads_as_empty_bytes(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("result", "t1")
    fake.reply(fake.recv(), done(), ())
    assert future.result(WAIT_S) == b""


@pytest.mark.parametrize("method", ["result", "request"])
def test_a_wait_with_a_deadline_ends_soon_after_it_when_the_broker_is_silent(
    connect: Callable[..., Driver], fake: FakeBroker, method: str
) -> None:
    # Given a client with many retries, and a broker that never answers
    client = connect(timeout_s=0.2, retries=10, poll_s=10)
    deadline_s = 0.6
    args = ("t1",) if method == "result" else ("svc", b"job")
    # When a wait is given a deadline of its own
    started = time.monotonic()
    future = client.call(method, *args, deadline_s)
    with pytest.raises(CallTimeout) as caught:
        future.result(WAIT_S)
    elapsed = time.monotonic() - started
    # Then it ends by the deadline plus one timeout_s for the last answer
    # (not after every retry: 0.8 s + 10 x 0.2 s), and says what to pick up
    assert deadline_s <= elapsed < 3 * deadline_s
    if method == "result":
        assert (caught.value.command, caught.value.task_id) == ("RESULT", "t1")
    else:
        assert caught.value.command == "REQUEST" and caught.value.key


def test_plans_count_a_replaced_connection_as_an_unanswered_attempt() -> None:
    rids = itertools.count(1)
    s = _calls.Settings(timeout_s=5.0, retries=1, poll_s=10.0, next_rid=lambda: next(rids))
    # A call: each replacement under it is an attempt; it resends at once, no Reconnect
    plan = _calls.plan_status(s, "t1")
    first = plan.send(None)
    assert isinstance(first, _calls.Send) and first.kind == "first"
    assert isinstance(plan.send(None), _calls.Wait)
    again = plan.send(_calls.REPLACED)
    assert isinstance(again, _calls.Send) and again.kind == "resend" and again.rid != first.rid
    assert isinstance(plan.send(None), _calls.Wait)
    with pytest.raises(CallTimeout) as caught:
        plan.send(_calls.REPLACED)
    assert caught.value.attempts == 2
    # A REQUEST's receipt: the same, and every resend keeps the idempotency key
    options = _calls.wire_options(TaskOptions(key="k1"))
    request = _calls.request(s, "svc", (b"job",), options, None, None)
    sent = request.send(None)
    assert isinstance(sent, _calls.Send) and sent.kind == "first"
    assert isinstance(request.send(None), _calls.Wait)
    resent = request.send(_calls.REPLACED)
    assert isinstance(resent, _calls.Send) and resent.kind == "resend"
    msg = zbc.decode_client(resent.frames)
    assert isinstance(msg, zbc.Enqueue) and msg.options.key == "k1"
    assert isinstance(request.send(None), _calls.Wait)
    with pytest.raises(CallTimeout) as caught:
        request.send(_calls.REPLACED)
    assert (caught.value.command, caught.value.key) == ("REQUEST", "k1")
    # A wait: a replacement right after the REQUEST's receipt (heard since the
    # last send) does not count; one after a poll nothing answered does
    wait = _calls.await_result(s, "t1", None, None, answer_due=time.monotonic() + 10)
    assert isinstance(wait.send(None), _calls.Wait)
    for _ in range(2):
        resumed = wait.send(_calls.REPLACED)
        assert isinstance(resumed, _calls.Send) and resumed.kind == "resume"
        assert isinstance(wait.send(None), _calls.Wait)
    # An answer in between starts the count again
    running = zbc.Answer(resumed.rid, True, {"id": "t1", "state": "inflight"})
    polled = wait.send(running)
    assert isinstance(polled, _calls.Send) and polled.kind == "poll"
    assert isinstance(wait.send(None), _calls.Wait)
    assert isinstance(wait.send(_calls.REPLACED), _calls.Send)
    assert isinstance(wait.send(None), _calls.Wait)
    with pytest.raises(CallTimeout) as caught:
        wait.send(_calls.REPLACED)
    assert (caught.value.command, caught.value.task_id) == ("RESULT", "t1")


# ------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("code", "exception"),
    [
        (zbc.E_BAD_REQUEST, BadRequest),
        (zbc.E_NOT_FOUND, TaskNotFound),
        (zbc.E_QUEUE_FULL, QueueFull),
        (zbc.E_TOO_LARGE, MessageTooLarge),
        (zbc.E_CONFLICT, TaskConflict),
        (zbc.E_SHUTTING_DOWN, BrokerUnavailable),
        (zbc.E_UNAVAILABLE, BrokerUnavailable),
        (zbc.E_TOO_MANY_WAITERS, TooManyWaiters),
        ("something_new", BrokerError),
    ],
)
def test_every_error_code_raises_its_exception(
    connect: Callable[..., Driver], fake: FakeBroker, code: str, exception: type[BrokerError]
) -> None:
    client = connect()
    future = client.call("status", "t1")
    fake.error(fake.recv(), code, "the reason")
    with pytest.raises(exception) as caught:
        future.result(WAIT_S)
    assert type(caught.value) is exception
    assert caught.value.code == code
    assert caught.value.message == "the reason"
    assert code in str(caught.value) and "the reason" in str(caught.value)


def test_queue_full_refuses_an_enqueue(connect: Callable[..., Driver], fake: FakeBroker) -> None:
    client = connect()
    future = client.call("enqueue", "svc", b"x")
    fake.error(fake.recv(), zbc.E_QUEUE_FULL, "queue 'svc' holds 1000 tasks")
    with pytest.raises(QueueFull, match="1000 tasks"):
        future.result(WAIT_S)


def test_arguments_are_checked_before_anything_is_sent(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    bad: list[tuple[str, tuple[Any, ...], dict[str, Any], type[Exception]]] = [
        ("enqueue", ("svc", "text"), {}, TypeError),
        ("enqueue", ("svc", [b"a", 1]), {}, TypeError),
        ("enqueue", ("", b"x"), {}, ValueError),
        ("enqueue", ("svc", b"x"), {"priority": 128}, ValueError),
        ("enqueue", ("svc", b"x"), {"delay_s": 1, "not_before": 2.0}, ValueError),
        ("enqueue", ("svc", b"x"), {"max_attempts": 0}, ValueError),
        ("enqueue", ("svc", b"x"), {"ttl_s": -1}, ValueError),
        ("enqueue", ("svc", b"x"), {"key": ""}, ValueError),
        ("enqueue_many", ("svc", [b"a", b"b"]), {"keys": ["one"]}, ValueError),
        ("enqueue_many", ("svc", b"ab"), {}, TypeError),
        ("result", ("t1", -1), {}, ValueError),
        ("status", ("",), {}, ValueError),
        ("dead_letters", ("svc", 0), {}, ValueError),
        ("redrive", ("svc", "t1"), {}, TypeError),
    ]
    for name, args, kw, exception in bad:
        with pytest.raises(exception):
            client.call(name, *args, **kw).result(WAIT_S)
    assert fake.nothing_more()
    assert client.call("enqueue_many", "svc", []).result(WAIT_S) == []


# ------------------------------------------------------------ status, cancel, dead letters


def test_status_decodes_the_task_map(connect: Callable[..., Driver], fake: FakeBroker) -> None:
    client = connect()
    future = client.call("status", "t1")
    got = fake.recv()
    assert got.frames[:3] == [b"", zbc.ZBC01, zbc.STATUS]
    assert got.msg == zbc.Status(got.msg.rid, "t1")
    task = {
        "id": "t1",
        "service": "stt",
        "state": "inflight",
        "attempt": 2,
        "max_attempts": 5,
        "priority": 1,
        "created_at": 1700000000.5,
        "not_before": None,
        "expires_at": 1700000100,
        "timeout_s": 30.0,
        "key": "k",
        "headers": {"lang": "de"},
        "error": "worker died",
        "finished_at": None,
        "keep_until": None,
        "history": [["ready", 1700000000.5]],
        "some_future_field": True,
    }
    fake.reply(got, {"task": task})
    status = future.result(WAIT_S)
    assert status == TaskStatus(
        id="t1",
        service="stt",
        state=TaskState.INFLIGHT,
        attempt=2,
        max_attempts=5,
        priority=1,
        created_at=1700000000.5,
        expires_at=1700000100.0,
        timeout_s=30.0,
        key="k",
        headers={"lang": "de"},
        error="worker died",
        history=(["ready", 1700000000.5],),
    )
    assert not status.final


def test_status_shows_the_attempts_the_broker_did_not_charge(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given a task whose first attempt a broker restart cut short
    client = connect()
    future = client.call("status", "t1")
    got = fake.recv()
    task = {"id": "t1", "service": "stt", "state": "inflight", "attempt": 2, "uncharged": 1}
    task |= {"max_attempts": 1, "priority": 0, "created_at": 1700000000.5}
    # When STATUS answers, Then the client shows the uncharged attempt
    fake.reply(got, {"task": task})
    status = future.result(WAIT_S)
    assert (status.attempt, status.uncharged, status.max_attempts) == (2, 1, 1)


def test_cancel_returns_the_state_the_task_was_in(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("cancel", "t1")
    got = fake.recv()
    assert got.frames[:3] == [b"", zbc.ZBC01, zbc.CANCEL]
    assert got.msg == zbc.Cancel(got.msg.rid, "t1")
    fake.reply(got, {"id": "t1", "state": "cancelled", "was": "delayed"})
    was = future.result(WAIT_S)
    assert was == "delayed"
    assert was is TaskState.DELAYED


def test_dead_letters_follow_next_across_pages(
    connect: Callable[..., Driver], fake: FakeBroker
) -> None:
    client = connect()
    future = client.call("dead_letters", "svc", None)
    entry = {"attempt": 3, "error": "boom", "created_at": 1.0, "finished_at": 2.0}
    first = fake.recv()
    assert first.frames[:3] == [b"", zbc.ZBC01, zbc.DEAD]
    assert first.msg == zbc.Dead(first.msg.rid, "svc", zbc.MAX_LIST, None)
    fake.reply(
        first,
        {"tasks": [{"id": "a", "seq": 1, **entry}, {"id": "b", "seq": 2, **entry}], "next": 2},
    )
    second = fake.recv()
    assert second.msg == zbc.Dead(second.msg.rid, "svc", zbc.MAX_LIST, 2)
    fake.reply(second, {"tasks": [{"id": "c", "seq": 7, **entry}], "next": None})
    letters = future.result(WAIT_S)
    assert [d.id for d in letters] == ["a", "b", "c"]
    assert letters[2] == DeadLetter("c", 7, 3, "boom", 1.0, 2.0)


def test_dead_letters_stop_at_the_limit(connect: Callable[..., Driver], fake: FakeBroker) -> None:
    client = connect()
    future = client.call("dead_letters", "svc", 2)
    got = fake.recv()
    assert isinstance(got.msg, zbc.Dead) and got.msg.limit == 2
    entries = [{"id": i, "seq": n, "attempt": 1} for n, i in enumerate(["a", "b"])]
    fake.reply(got, {"tasks": entries, "next": 1})
    assert [d.id for d in future.result(WAIT_S)] == ["a", "b"]
    assert fake.nothing_more()


def test_redrive_some_or_all(connect: Callable[..., Driver], fake: FakeBroker) -> None:
    client = connect()
    future = client.call("redrive", "svc", ["a", "b"])
    got = fake.recv()
    assert got.msg == zbc.Redrive(got.msg.rid, "svc", ("a", "b"))
    fake.reply(got, {"ids": ["a"]})
    assert future.result(WAIT_S) == ["a"]
    future = client.call("redrive", "svc")
    got = fake.recv()
    assert got.msg == zbc.Redrive(got.msg.rid, "svc", None)
    assert "ids" not in got.meta
    fake.reply(got, {"ids": ["a", "b", "c"]})
    assert future.result(WAIT_S) == ["a", "b", "c"]


def test_a_closed_client_refuses_calls(connect: Callable[..., Driver], fake: FakeBroker) -> None:
    client = connect()
    client.client.close()
    assert client.client.closed
    with pytest.raises(ClientClosed):
        client.call("status", "t1").result(WAIT_S)


# ------------------------------------------------------------ AsyncClient only


@pytest.fixture
def async_client(
    zmq_ctx: Ctx, event_loop_thread: asyncio.AbstractEventLoop, stack: ExitStack, fake: FakeBroker
) -> Callable[..., Driver]:
    return lambda **kw: make_async(fake, zmq_ctx, stack, event_loop_thread, **kw)


def test_async_calls_share_one_socket_and_get_their_own_answers(
    async_client: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given three calls outstanding at once
    client = async_client()
    futures = [client.call("status", f"t{i}") for i in range(3)]
    got = [fake.recv() for _ in range(3)]
    # Then they came over one connection, with distinct rids
    assert len({g.peer for g in got}) == 1
    assert len({g.msg.rid for g in got}) == 3
    # When the broker answers them in reverse order
    for g in reversed(got):
        assert isinstance(g.msg, zbc.Status)
        fake.reply(g, {"task": {"id": g.msg.id, "service": "svc", "state": "ready"}})
    # Then each call got the answer to its own rid
    assert [f.result(WAIT_S).id for f in futures] == ["t0", "t1", "t2"]


def test_async_socket_replacement_makes_every_outstanding_call_resend(
    async_client: Callable[..., Driver], fake: FakeBroker
) -> None:
    # Given two enqueues outstanding and a broker that answers neither
    client = async_client(timeout_s=0.3)
    futures = [client.call("enqueue", "svc", b"%d" % i) for i in range(2)]
    old = [fake.recv(), fake.recv()]
    # When one of them times out and the socket is replaced
    new = [fake.recv(), fake.recv()]
    # Then both are sent again on the new connection, each with its own key
    assert len({g.peer for g in new}) == 1 and new[0].peer != old[0].peer
    old_keys = {g.msg.options.key for g in old}  # type: ignore[union-attr]
    assert {g.msg.options.key for g in new} == old_keys  # type: ignore[union-attr]
    for g in new:
        assert isinstance(g.msg, zbc.Enqueue)
        fake.reply(g, {"ids": [g.msg.payloads[0][0].decode()]})
    assert sorted(f.result(WAIT_S) for f in futures) == ["0", "1"]
    assert client.stats.resends == 2


@pytest.mark.parametrize(
    ("method", "deadline_s", "retries"),
    [("result", None, 1), ("request", None, 1), ("result", 0.6, 20), ("request", 0.6, 20)],
)
def test_async_a_wait_keeps_its_bounds_while_other_calls_replace_the_socket(
    async_client: Callable[..., Driver],
    fake: FakeBroker,
    event_loop_thread: asyncio.AbstractEventLoop,
    method: str,
    deadline_s: float | None,
    retries: int,
) -> None:
    # Given a broker that confirms REQUESTs but answers nothing else, and another
    # coroutine whose calls keep timing out, each time replacing the socket
    # under every outstanding call
    client = async_client(timeout_s=0.2, retries=retries, poll_s=0.4)
    aclient = client.client
    assert isinstance(aclient, AsyncClient)
    stop = threading.Event()

    def broker() -> None:
        while not stop.is_set():
            if fake.sock.poll(20):
                got = fake.recv()
                if isinstance(got.msg, zbc.Enqueue):
                    fake.reply(got, {"ids": ["t1"]})

    async def keep_calling() -> None:
        while True:
            try:
                await aclient.status("other")
            except CallTimeout:
                continue
            except ClientClosed:
                return

    serving = threading.Thread(target=broker)
    serving.start()
    other = asyncio.run_coroutine_threadsafe(keep_calling(), event_loop_thread)
    try:
        time.sleep(0.1)  # the calls' timeouts are staggered
        # When a wait starts on the same client
        args = ("t1",) if method == "result" else ("svc", b"job")
        started = time.monotonic()
        future = client.call(method, *args, deadline_s)
        # Then it ends with CallTimeout within its documented bound: without a
        # deadline, (retries + 1) x (poll_s + timeout_s); with one, the deadline
        # plus one timeout_s. Other calls' replacements do not keep it alive.
        bound = (retries + 1) * (0.4 + 0.2) if deadline_s is None else deadline_s + 0.2
        with pytest.raises(CallTimeout) as caught:
            future.result(3 * bound)
        assert time.monotonic() - started < 3 * bound
        assert caught.value.task_id == "t1"
    finally:
        other.cancel()
        stop.set()
        serving.join(WAIT_S)


def test_async_close_ends_a_waiting_call_with_client_closed(
    async_client: Callable[..., Driver],
    fake: FakeBroker,
    event_loop_thread: asyncio.AbstractEventLoop,
) -> None:
    client = async_client()
    future = client.call("result", "t1", 30)
    fake.recv()
    aclient = client.client
    assert isinstance(aclient, AsyncClient)
    event_loop_thread.call_soon_threadsafe(aclient.close)
    with pytest.raises(ClientClosed):
        future.result(WAIT_S)


def test_async_client_in_asyncio_run(fake: FakeBroker, zmq_ctx: Ctx) -> None:
    # A plain asyncio program: the fake broker answers from a thread
    def broker() -> None:
        got = fake.recv()
        fake.reply(got, {"ids": ["t1"]})
        fake.reply(got, done(), (b"pong",))

    thread = threading.Thread(target=broker)
    thread.start()

    async def main() -> bytes:
        async with AsyncClient(fake.endpoint, context=zmq_ctx) as client:
            return await client.request("svc", b"ping")

    assert asyncio.run(main()) == b"pong"
    thread.join(WAIT_S)


def test_batches_are_split_to_fit_the_broker_caps() -> None:
    from zbroker.client._calls import batch_bounds
    from zbroker.protocol import zbc as codec

    one = [(b"x",)] * (codec.MAX_BATCH + 5)
    assert batch_bounds(one) == [(0, codec.MAX_BATCH), (codec.MAX_BATCH, codec.MAX_BATCH + 5)]
    three_frames = [(b"a", b"b", b"c")] * 6000  # 18000 frames: over BATCH_FRAMES
    bounds = batch_bounds(three_frames)
    assert bounds == [(0, codec.BATCH_FRAMES // 3), (codec.BATCH_FRAMES // 3, 6000)]
    big = [(b"x" * (6 * 1024 * 1024),)] * 3  # 18 MiB: two messages
    assert batch_bounds(big) == [(0, 2), (2, 3)]
    assert batch_bounds([]) == []
    # Keys count too: 2000 tasks of 400 bytes with 200-byte keys are 1.2 MB of a message
    keyed = [(b"p" * 400,)] * 2000
    keys = ["k" * 200] * 2000
    chunks = batch_bounds(keyed, keys, budget=1024 * 1024 - 4096)
    assert len(chunks) == 2 and chunks[0] == (0, 1695)  # 1044480 // (400 + 16 + 200)


@pytest.mark.parametrize("method", ["enqueue", "request"])
def test_a_message_over_the_cap_is_refused_before_it_is_sent(
    connect: Callable[..., Driver], fake: FakeBroker, method: str
) -> None:
    client = connect(max_message_bytes=4096)
    future = client.call(method, "svc", b"x" * 5000)
    with pytest.raises(MessageTooLarge, match="over the broker's cap"):
        future.result(WAIT_S)
    assert fake.nothing_more(0.2)  # nothing reached the wire
    # A batch whose (first) message would be over the cap is refused the same way
    future = client.call("enqueue_many", "svc", [b"x" * 5000, b"ok"])
    with pytest.raises(MessageTooLarge):
        future.result(WAIT_S)
    with pytest.raises(ValueError):
        connect(max_message_bytes=100)
