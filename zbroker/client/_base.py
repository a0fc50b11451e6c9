"""How the two clients use their socket: the one part of them that is written twice.

Everything else of Client and AsyncClient (their calls, options and
documentation) is written once, in `aclient.py`, and Client is generated from
it (scripts/unasync.py). Each client class derives from its base here:

- `AsyncClientBase`: many calls at once on one DEALER socket; a reader task
  hands every answer to the call that owns its rid (request id), and a socket
  found silent is replaced for every call on it at once.
- `ClientBase`: one call at a time; each polls the socket for its own answers,
  and the socket is replaced after every unanswered attempt (Lazy Pirate). It
  also speaks 7/MDP request/reply and 8/MMI, which only the blocking client has.

Both carry out the sans-IO plans of `_calls` with `_run(plan, what)`; neither
knows what a plan does. Speaks only through `zbroker.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeAlias, TypeVar

import zmq
import zmq.asyncio

from zbroker.client import _calls, _wire, keys
from zbroker.client._owner import SocketOwner
from zbroker.client.errors import (
    AuthenticationFailed,
    BrokerError,
    CallTimeout,
    ClientClosed,
    ReplyError,
    RequestTimeout,
    TaskFailed,
    zmq_boundary,
)
from zbroker.client.keys import connected_socket
from zbroker.protocol import mdp, zbc
from zbroker.protocol.errors import ProtocolError

T = TypeVar("T")
Body = bytes | Sequence[bytes]

# What each client's `context=` takes: the blocking one, a plain context; the asyncio one,
# an asyncio context or a plain one it shadows.
ClientContext: TypeAlias = zmq.Context[zmq.Socket[bytes]]
AsyncClientContext: TypeAlias = zmq.Context[Any]

# How long request() and result() wait for a task to end unless told otherwise.
DEFAULT_RESULT_TIMEOUT_S = 60.0

# How often the asyncio client tries again to send a message no connection could take
# yet (several endpoints, no broker's handshake completed): between two tries it waits.
_SEND_RETRY_S = 0.02


class _StreamState:
    """What both stream classes show of a stream while it runs, and its end."""

    def __init__(self, task_id: str | None, offset: int) -> None:
        self.task_id = task_id  # None until a STREAM is accepted
        self.offset = offset  # the offset of the next chunk
        self.attempt = 0  # the attempt of the last chunk (0 before the first)
        self.frames: list[bytes] | None = None  # the result, once the task is done
        self.ended = False  # its end was read: the result, or the error it raised

    def deliver(self, op: _calls.Deliver) -> Iterator[bytes]:
        self.task_id = op.task_id
        for i, chunk in enumerate(op.chunks):
            self.offset = op.offset + i + 1
            self.attempt = op.attempt
            yield chunk

    def finish(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.ended = True

    @property
    def result_frames(self) -> list[bytes]:
        if self.frames is None:
            raise RuntimeError("the stream has not ended: read it to its end first")
        return self.frames

    @property
    def result(self) -> bytes:
        return _calls.one_frame(self.result_frames)


class _Accepted:
    """What a stream driver yields for an acceptance (the id is known): not a chunk."""


_ACCEPTED = _Accepted()


class _StreamView:
    """What both stream classes show: where the stream is, and its end."""

    _state: _StreamState

    @property
    def task_id(self) -> str | None:
        return self._state.task_id

    @property
    def offset(self) -> int:
        return self._state.offset

    @property
    def attempt(self) -> int:
        return self._state.attempt

    @property
    def ended(self) -> bool:
        """True once the task's end was read (its result, or the error it raised)."""
        return self._state.ended

    @property
    def result(self) -> bytes:
        """The one-frame result, once the loop has ended (RuntimeError before)."""
        return self._state.result

    @property
    def result_frames(self) -> list[bytes]:
        return self._state.result_frames


@dataclass(slots=True)
class ClientStats:
    """What a Client or AsyncClient has seen since it was created. Counters only ever grow."""

    requests: int = 0  # MDP calls: mdp_request(), mdp_request_frames(), mmi_service()
    calls: int = 0  # durable-task calls (enqueue, request, result, status...)
    sent: int = 0  # messages put on the wire, resends included
    resends: int = 0  # a message sent again after its attempt got no answer
    resumes: int = 0  # RESULT sent on a fresh connection to pick up a wait by task id
    replies: int = 0  # MDP replies received
    answers: int = 0  # ZBC01 answers received for a waiting call
    timeouts: int = 0  # calls that raised RequestTimeout or CallTimeout (broker silent)
    unexpected_answers: int = 0  # ZBC01 answers no call waits for (late, abandoned): ignored
    mismatched_replies: int = 0  # MDP replies for another service: ignored
    malformed_replies: int = 0  # neither an MDP reply nor a ZBC01 answer: ignored

    def count_send(self, kind: str) -> None:
        self.sent += 1
        if kind == "resend":
            self.resends += 1
        elif kind == "resume":
            self.resumes += 1


def _send_now(sock: zmq.Socket[Any], pending: deque[_calls.Send], stats: ClientStats) -> bool:
    """Send what `pending` holds, in order, without blocking; True once all went.

    A socket connected to several brokers takes a message only once a broker's
    handshake completed (ZMQ_IMMEDIATE); what it refuses waits in `pending` and
    goes within the call's next wait (`_flush`), or the attempt ends unanswered.
    """
    while pending:
        op = pending[0]
        try:
            _wire.send(sock, op.frames, _wire.NOBLOCK)
        except zmq.Again:
            return False
        pending.popleft()
        stats.count_send(op.kind)
    return True


def _flush(
    sock: zmq.Socket[bytes], pending: deque[_calls.Send], stats: ClientStats, timeout_s: float
) -> float | None:
    """Send what `pending` holds within `timeout_s`: the time left of it, or None if
    no connection took it in time (the attempt then ends unanswered)."""
    if not pending:
        return timeout_s
    deadline = time.monotonic() + timeout_s
    while not _send_now(sock, pending, stats):
        remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLOUT):
            return None
    return max(0.0, deadline - time.monotonic())


# ------------------------------------------------------------ the asyncio client


@dataclass(frozen=True, slots=True)
class _Replaced:
    generation: int  # the connection that replaced the call's one


class _Closed:
    pass


_CLOSED = _Closed()

_Item = zbc.Answer | _Replaced | _Closed | AuthenticationFailed


@dataclass(eq=False, slots=True)
class _Call:
    """One outstanding call: its inbox, and the rids it sent on connection `generation`."""

    generation: int
    inbox: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    rids: set[int] = field(default_factory=set)


class AsyncClientBase:
    """AsyncClient's socket: any number of calls at once, from coroutines of one event loop.

    Every call picks rids that are never reused and registers them; one reader
    task receives every answer and hands it to the call that owns its rid. When
    a call finds the broker silent, the socket is replaced, as the blocking
    client does; every other call outstanding on the old socket is told at
    once and sends again on the new one (an enqueue with its idempotency key,
    a wait for a result as RESULT by task id), so none of them waits for a
    timeout of its own. For a call that has heard nothing since it last sent,
    the replacement counts as an unanswered attempt (see `_calls`), so a
    call's bounds hold whatever the other calls on the socket do.

    `async with` closes it on exit; `close()` does the same from synchronous
    code. Calls still outstanding then raise ClientClosed.
    """

    endpoint: str  # the endpoints, comma-separated
    endpoints: tuple[str, ...]
    stats: ClientStats
    credentials: keys.Credentials | None

    def __init__(self, context: AsyncClientContext | None) -> None:
        self._context = _async_context(context)
        self._socket: zmq.asyncio.Socket | None = connected_socket(
            self._context, zmq.DEALER, self.endpoints, credentials=self.credentials
        )
        self._generation = 0  # bumped each time the socket is replaced
        self._routes: dict[int, _Call] = {}  # rid -> call, for the current socket
        self._calls: set[_Call] = set()
        self._reader: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._socket is None

    def close(self) -> None:
        """Close the socket; outstanding calls raise ClientClosed. Idempotent."""
        if self._socket is None:
            return
        if self._reader is not None and not self._reader.done():
            # The reader's loop may be gone already (closed at interpreter exit).
            with contextlib.suppress(RuntimeError):
                self._reader.cancel()
        keys.close_socket(self._socket)
        self._socket = None
        self._routes.clear()
        for call in self._calls:
            call.inbox.put_nowait(_CLOSED)

    async def aclose(self) -> None:
        """`close()`, then wait for the reader task to finish."""
        reader = self._reader
        self.close()
        if reader is not None and not reader.done():
            await asyncio.wait([reader])

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _open_socket(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            raise ClientClosed(f"this {type(self).__name__} is closed")
        return self._socket

    async def _run(self, plan: _calls.Plan[T], what: str) -> T:
        """Carry out a durable-call plan (see `_calls`) on the shared socket."""
        call: _Call | None = None
        try:
            self._open_socket()
            self._ensure_reader()
            self.stats.calls += 1
            call = _Call(self._generation)
            self._calls.add(call)
            pending: deque[_calls.Send] = deque()  # sent, not yet taken by the socket
            event: _calls.Event = None
            with zmq_boundary(what):
                while True:
                    try:
                        op = plan.send(event)
                    except StopIteration as finished:
                        result: T = finished.value
                        return result
                    event = None
                    if isinstance(op, _calls.Send):
                        sock = self._open_socket()
                        keys.check(sock)
                        if call.generation != self._generation:
                            call.generation = self._generation
                            call.rids.clear()
                            pending.clear()
                        call.rids.add(op.rid)
                        self._routes[op.rid] = call
                        pending.append(op)
                        await self._send_pending(sock, pending)
                    elif isinstance(op, _calls.Wait):
                        # REPLACED when another call replaced the socket since this
                        # one sent; the plan counts it against this call's retries.
                        event = await self._next_event(call, op.timeout_s, pending)
                    elif call.generation == self._generation:
                        # The broker was silent to this call on the current socket:
                        # replace it (unless another call already has since we sent).
                        self._replace_socket()
        except CallTimeout as exc:
            self.stats.timeouts += 1
            exc.tried(self.endpoints)
            raise
        finally:
            plan.close()
            if call is not None:
                self._calls.discard(call)
                for rid in call.rids:
                    if self._routes.get(rid) is call:
                        del self._routes[rid]

    async def _send_pending(self, sock: zmq.asyncio.Socket, pending: deque[_calls.Send]) -> bool:
        """Send what `pending` holds, in order, without blocking; True once all went
        (the asyncio socket's own send, so that its reader is woken as it should be)."""
        while pending:
            op = pending[0]
            try:
                await sock.send_multipart(op.frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
            pending.popleft()
            self.stats.count_send(op.kind)
        return True

    async def _next_event(
        self, call: _Call, timeout_s: float, pending: deque[_calls.Send] | None = None
    ) -> _calls.Event:
        """The call's next answer, TIMEOUT, or REPLACED (its socket was replaced).

        What `pending` holds (messages no connection could take yet: several
        endpoints, no broker's handshake completed) is sent first, tried again
        until the wait's deadline; the attempt is unanswered if it never goes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while pending and call.generation == self._generation:
            sock = self._open_socket()
            keys.check(sock)
            if await self._send_pending(sock, pending):
                break
            if loop.time() >= deadline:
                return _calls.TIMEOUT
            await asyncio.sleep(min(_SEND_RETRY_S, max(0.0, deadline - loop.time())))
        while True:
            self._ensure_reader()
            remaining = deadline - loop.time()
            if remaining <= 0 and call.inbox.empty():
                return _calls.TIMEOUT
            try:
                item = await asyncio.wait_for(call.inbox.get(), max(0.0, remaining))
            except TimeoutError:
                return _calls.TIMEOUT
            if isinstance(item, _Closed):
                raise ClientClosed(f"this {type(self).__name__} was closed while the call waited")
            if isinstance(item, AuthenticationFailed):
                raise item
            if isinstance(item, _Replaced):
                if item.generation <= call.generation:
                    continue  # it has already sent on the new socket
                return _calls.REPLACED
            return item

    def _ensure_reader(self) -> None:
        """A reader task for the current socket, running on the current event loop."""
        sock = self._open_socket()
        loop = asyncio.get_running_loop()
        reader = self._reader
        if reader is not None and not reader.done() and reader.get_loop() is loop:
            return
        if reader is not None and not reader.done():
            with contextlib.suppress(RuntimeError):
                reader.cancel()  # left behind on another event loop
        self._reader = loop.create_task(self._read(sock), name="zbroker-aclient-reader")

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        """Hand every answer on `sock` to the call that owns its rid, until the socket
        closes; a failed handshake is handed to every call instead."""
        monitor = keys.monitor_owner(sock)
        watching = None if monitor is None else asyncio.ensure_future(self._watch(sock, monitor))
        try:
            while True:
                try:
                    frames = await sock.recv_multipart()
                except zmq.ZMQError:
                    return  # closed or replaced under us
                self._dispatch(frames)
        finally:
            if watching is not None:
                watching.cancel()

    async def _watch(self, sock: zmq.asyncio.Socket, monitor: Any) -> None:
        """Wait for `sock`'s handshake events; a failure ends every call waiting."""
        while True:
            try:
                await monitor.poll(None, zmq.POLLIN)
                keys.check(sock)
            except AuthenticationFailed as exc:
                for call in self._calls:
                    call.inbox.put_nowait(exc)
                return
            except zmq.ZMQError:
                return

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) < 2 or frames[1] != zbc.ZBC01:
            self.stats.malformed_replies += 1
            return
        try:
            answer = zbc.decode_answer(frames)
        except ProtocolError:
            self.stats.malformed_replies += 1
            return
        call = self._routes.get(answer.rid)
        if call is None:
            self.stats.unexpected_answers += 1
            return
        self.stats.answers += 1
        call.inbox.put_nowait(answer)

    def _stream(
        self, plan: _calls.Plan[list[bytes]], what: str, task_id: str | None, offset: int
    ) -> AsyncTaskStream:
        """A stream plan, run as the returned stream is read."""
        return AsyncTaskStream(lambda state: _drive_async(self, plan, what, state), task_id, offset)

    def _replace_socket(self) -> None:
        """Close the socket, open a fresh one, and tell every outstanding call to send again."""
        old = self._open_socket()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._reader = None
        keys.close_socket(old)
        self._routes.clear()
        self._socket = connected_socket(
            self._context, zmq.DEALER, self.endpoints, credentials=self.credentials
        )
        self._generation += 1
        self._ensure_reader()
        for call in self._calls:
            call.inbox.put_nowait(_Replaced(self._generation))


class AsyncTaskStream(_StreamView):
    """A task's stream, as the asyncio client reads it: an async iterator of chunks.

    `async for chunk in stream` gives each chunk (bytes) once, in order; then
    `stream.result` is the task's result (`result_frames`: every frame). A task
    that ends without a result raises its TaskFailed (TaskDead, TaskCancelled,
    TaskExpired) from the loop. `task_id` is known once the task was accepted
    (`await stream.started()` waits for that), `offset` is the offset of the next
    chunk (what `read_stream(task_id, offset)` would resume from) and `attempt`
    the attempt of the last chunk: when it grows, the task started again and what
    came before belongs to an attempt that failed.

    Closing it before the end (`await stream.aclose()`, or leaving an `async
    with` block around it) abandons the stream: the broker is told (CLOSE) and,
    when the call asked (`cancel_on_abandon`, the default of `stream()`), cancels
    the task. A `break` alone does not close it (Python does not close an
    iterator a loop leaves): use `async with`.
    """

    def __init__(
        self,
        run: Callable[[_StreamState], AsyncIterator[bytes | _Accepted]],
        task_id: str | None,
        offset: int,
    ) -> None:
        self._state = _StreamState(task_id, offset)
        self._it = run(self._state)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunk = await self._it.__anext__()
            if not isinstance(chunk, _Accepted):
                return chunk

    async def started(self) -> str:
        """Wait until the task is accepted (a STREAM) and return its id."""
        while self._state.task_id is None:
            chunk = await self._it.__anext__()
            assert chunk is _ACCEPTED, "a chunk before the acceptance"
        return self._state.task_id

    async def aclose(self) -> None:
        """Abandon the stream (a no-op once it ended)."""
        await self._it.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _drive_async(
    client: AsyncClientBase, plan: _calls.Plan[list[bytes]], what: str, state: _StreamState
) -> AsyncIterator[bytes | _Accepted]:
    """Carry out a stream plan on the asyncio client's shared socket (see `_run`),
    yielding each chunk as it is delivered."""
    call: _Call | None = None
    rid: int | None = None
    try:
        client._open_socket()
        client._ensure_reader()
        client.stats.calls += 1
        call = _Call(client._generation)
        client._calls.add(call)
        pending: deque[_calls.Send] = deque()
        event: _calls.Event = None
        while True:
            try:
                op = plan.send(event)
            except StopIteration as finished:
                state.finish(finished.value)
                return
            except (TaskFailed, BrokerError):
                state.ended = True  # the broker ended the call: nothing to close
                raise
            event = None
            if isinstance(op, _calls.Deliver):
                if not op.chunks:
                    state.task_id = op.task_id
                    yield _ACCEPTED
                for chunk in state.deliver(op):
                    yield chunk
                continue
            with zmq_boundary(what):
                if isinstance(op, _calls.Send):
                    sock = client._open_socket()
                    keys.check(sock)
                    if call.generation != client._generation:
                        call.generation = client._generation
                        call.rids.clear()
                        pending.clear()
                    call.rids.add(op.rid)
                    client._routes[op.rid] = call
                    if op.kind != "credit":
                        rid = op.rid
                    pending.append(op)
                    await client._send_pending(sock, pending)
                elif isinstance(op, _calls.Wait):
                    event = await client._next_event(call, op.timeout_s, pending)
                elif call.generation == client._generation:
                    client._replace_socket()
    except CallTimeout as exc:
        client.stats.timeouts += 1
        exc.tried(client.endpoints)
        raise
    finally:
        plan.close()
        if call is not None:
            _leave_async(client, call, None if state.ended else rid)


def _leave_async(client: AsyncClientBase, call: _Call, rid: int | None) -> None:
    """A stream's call is over: its routes go; `rid` not None: it ended early, so the
    broker is told (CLOSE) if the socket it was sent on is still the client's."""
    client._calls.discard(call)
    for each in call.rids:
        if client._routes.get(each) is call:
            del client._routes[each]
    sock = client._socket
    if rid is not None and sock is not None and call.generation == client._generation:
        with contextlib.suppress(zmq.ZMQError):
            # The plain socket's send: no future to await, safe while closing.
            zmq.Socket.send_multipart(sock, zbc.call(zbc.CLOSE, rid), zmq.NOBLOCK)


def _async_context(context: AsyncClientContext | None) -> zmq.asyncio.Context:
    """An asyncio context: the shared one, the one given, or a shadow of a plain one."""
    if context is None:
        return zmq.asyncio.Context.instance()
    if isinstance(context, zmq.asyncio.Context):
        return context
    return zmq.asyncio.Context(context)


# ------------------------------------------------------------ the blocking client


class ClientBase(SocketOwner):
    """Client's socket: one call at a time, and 7/MDP request/reply beside the durable calls.

    Owns one DEALER socket at a time and replaces it after every unanswered
    attempt (Lazy Pirate), so a late reply to an abandoned MDP attempt can never
    be taken for the answer to a later request. Durable calls quote a rid that
    is never reused, so answers are matched to calls exactly.
    """

    endpoint: str  # the endpoints, comma-separated
    endpoints: tuple[str, ...]
    stats: ClientStats
    timeout_s: float
    retries: int
    credentials: keys.Credentials | None

    def __init__(self, context: ClientContext | None) -> None:
        self._context = context if context is not None else zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = connected_socket(
            self._context, zmq.DEALER, self.endpoints, credentials=self.credentials
        )

    # ------------------------------------------------------------------- MDP

    def mdp_request(
        self, service: str | bytes, body: Body, timeout_s: float | None = None
    ) -> bytes:
        """7/MDP: send `body` to `service` and return the reply, which must be exactly one frame.

        Not durable: the broker holds MDP requests in memory only, and a resend
        after a timeout may run the request twice. Raises `ReplyError` when the
        reply has zero or several frames (use `mdp_request_frames` for those
        services) and `RequestTimeout` when no reply came back.
        """
        frames = self.mdp_request_frames(service, body, timeout_s)
        if len(frames) != 1:
            raise ReplyError(
                "reply_frames", f"expected a one-frame reply, got {len(frames)} frames"
            )
        return frames[0]

    def mdp_request_frames(
        self, service: str | bytes, body: Body, timeout_s: float | None = None
    ) -> list[bytes]:
        """7/MDP: send `body` (one frame or several) to `service` and return every reply frame.

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
                started = time.monotonic()
                # Several endpoints: no connection may take it yet (see `_flush`).
                sent = _wire.send_within(sock, message, attempt_timeout_s)
                try:
                    reply = None
                    if sent:
                        self.stats.sent += 1
                        spent_s = time.monotonic() - started
                        reply = self._await_reply(sock, service_b, attempt_timeout_s - spent_s)
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
                    timeout = RequestTimeout(service_b, attempt_timeout_s, attempts)
                    timeout.tried(self.endpoints)
                    raise timeout
                self.stats.resends += 1

    def mmi_service(self, name: str | bytes, timeout_s: float | None = None) -> bool:
        """8/MMI: True when a worker for service `name` is registered with the broker now."""
        reply = self.mdp_request_frames(mdp.MMI_SERVICE, [_service_name(name)], timeout_s)
        code = reply[0] if reply else b""
        if code == mdp.MMI_FOUND:
            return True
        if code == mdp.MMI_NOT_FOUND:
            return False
        raise ReplyError("mmi_status", f"unexpected mmi.service status {code[:16]!r}")

    # ---------------------------------------------------------------- private

    def _run(self, plan: _calls.Plan[T], what: str) -> T:
        """Carry out a durable-call plan on this client's socket (see `_calls`)."""
        try:
            sock = self._open_socket()
            self.stats.calls += 1
            mine: set[int] = set()  # rids of this call on the current socket
            pending: deque[_calls.Send] = deque()  # sent, not yet taken by the socket
            event: _calls.Event = None
            with zmq_boundary(what):
                while True:
                    try:
                        op = plan.send(event)
                    except StopIteration as finished:
                        result: T = finished.value
                        return result
                    if isinstance(op, _calls.Send):
                        mine.add(op.rid)
                        pending.append(op)
                        _send_now(sock, pending, self.stats)
                        event = None
                    elif isinstance(op, _calls.Wait):
                        left_s = _flush(sock, pending, self.stats, op.timeout_s)
                        if left_s is None:
                            event = _calls.TIMEOUT
                        else:
                            event = self._await_answer(sock, mine, left_s)
                    else:
                        sock = self._replace_socket()
                        mine.clear()
                        pending.clear()
                        event = None
        except CallTimeout as exc:
            self.stats.timeouts += 1
            exc.tried(self.endpoints)
            raise
        finally:
            plan.close()

    def _await_answer(
        self, sock: zmq.Socket[bytes], rids: set[int], timeout_s: float
    ) -> _calls.Event:
        """The next ZBC01 answer to one of `rids`, or TIMEOUT after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = max(0, math.ceil((deadline - time.monotonic()) * 1000))
            if not keys.wait_readable(sock, remaining_ms):
                return _calls.TIMEOUT
            frames = _wire.recv(sock)
            if len(frames) < 2 or frames[1] != zbc.ZBC01:
                if len(frames) >= 2 and frames[1] == mdp.MDPC01:
                    self.stats.mismatched_replies += 1  # a stray MDP reply
                else:
                    self.stats.malformed_replies += 1
                continue
            try:
                answer = zbc.decode_answer(frames)
            except ProtocolError:
                self.stats.malformed_replies += 1
                continue
            if answer.rid not in rids:
                self.stats.unexpected_answers += 1
                continue
            self.stats.answers += 1
            return answer

    def _stream(
        self, plan: _calls.Plan[list[bytes]], what: str, task_id: str | None, offset: int
    ) -> TaskStream:
        """A stream plan, run as the returned stream is read."""
        return TaskStream(lambda state: _drive(self, plan, what, state), task_id, offset)

    def _replace_socket(self) -> zmq.Socket[bytes]:
        self.close()
        self._socket = connected_socket(
            self._context, zmq.DEALER, self.endpoints, credentials=self.credentials
        )
        return self._socket

    def _await_reply(
        self, sock: zmq.Socket[bytes], service: bytes, timeout_s: float
    ) -> list[bytes] | None:
        """The body of the next MDP reply for `service`, or None at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not keys.wait_readable(sock, remaining_ms):
                return None
            frames = _wire.recv(sock)
            if len(frames) >= 2 and frames[1] == zbc.ZBC01:
                self.stats.unexpected_answers += 1  # a late answer to a durable call
                continue
            try:
                reply_service, body = mdp.decode_reply_to_client(frames)
            except ProtocolError:
                self.stats.malformed_replies += 1
                continue
            if reply_service != service:
                self.stats.mismatched_replies += 1
                continue
            return list(body)


class TaskStream(_StreamView):
    """A task's stream, as the blocking client reads it: an iterator of chunks.

    `for chunk in stream` gives each chunk (bytes) once, in order; then
    `stream.result` is the task's result (`result_frames`: every frame). A task
    that ends without a result raises its TaskFailed (TaskDead, TaskCancelled,
    TaskExpired) from the loop. `task_id` is known once the task was accepted
    (`stream.started()` waits for that), `offset` is the offset of the next
    chunk (what `read_stream(task_id, offset)` would resume from) and `attempt`
    the attempt of the last chunk: when it grows, the task started again and what
    came before belongs to an attempt that failed.

    Each stream reads on a connection of its own, so the client's other calls may
    be made from inside the loop. Closing it before the end (`stream.close()`,
    leaving a `with` block around it, or dropping the last reference to it)
    abandons the stream: the broker is told (CLOSE, then the connection closes)
    and, when the call asked (`cancel_on_abandon`, the default of `stream()`),
    cancels the task. A `break` alone does not close it (Python does not close an
    iterator a loop leaves): use `with`.
    """

    def __init__(
        self,
        run: Callable[[_StreamState], Iterator[bytes | _Accepted]],
        task_id: str | None,
        offset: int,
    ) -> None:
        self._state = _StreamState(task_id, offset)
        self._it = run(self._state)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes:
        while True:
            chunk = next(self._it)
            if not isinstance(chunk, _Accepted):
                return chunk

    def started(self) -> str:
        """Wait until the task is accepted (a STREAM) and return its id."""
        while self._state.task_id is None:
            chunk = next(self._it)
            assert chunk is _ACCEPTED, "a chunk before the acceptance"
        return self._state.task_id

    def close(self) -> None:
        """Abandon the stream (a no-op once it ended)."""
        self._it.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drive(
    client: ClientBase, plan: _calls.Plan[list[bytes]], what: str, state: _StreamState
) -> Iterator[bytes | _Accepted]:
    """Carry out a stream plan on a connection of its own, yielding each chunk as it
    is delivered; closing it early sends CLOSE and closes the connection."""
    client._open_socket()  # ClientClosed on a closed client
    sock = connected_socket(
        client._context, zmq.DEALER, client.endpoints, credentials=client.credentials
    )
    rid: int | None = None
    mine: set[int] = set()
    pending: deque[_calls.Send] = deque()
    try:
        client.stats.calls += 1
        event: _calls.Event = None
        while True:
            try:
                op = plan.send(event)
            except StopIteration as finished:
                state.finish(finished.value)
                return
            except (TaskFailed, BrokerError):
                state.ended = True  # the broker ended the call: nothing to close
                raise
            event = None
            if isinstance(op, _calls.Deliver):
                if not op.chunks:
                    state.task_id = op.task_id
                    yield _ACCEPTED
                yield from state.deliver(op)
                continue
            with zmq_boundary(what):
                if isinstance(op, _calls.Send):
                    mine.add(op.rid)
                    if op.kind != "credit":
                        rid = op.rid
                    pending.append(op)
                    _send_now(sock, pending, client.stats)
                elif isinstance(op, _calls.Wait):
                    left_s = _flush(sock, pending, client.stats, op.timeout_s)
                    if left_s is None:
                        event = _calls.TIMEOUT
                    else:
                        event = client._await_answer(sock, mine, left_s)
                else:
                    keys.close_socket(sock)
                    sock = connected_socket(
                        client._context,
                        zmq.DEALER,
                        client.endpoints,
                        credentials=client.credentials,
                    )
                    mine.clear()
                    pending.clear()
    except CallTimeout as exc:
        client.stats.timeouts += 1
        exc.tried(client.endpoints)
        raise
    finally:
        plan.close()
        if not state.ended and rid is not None:
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(zbc.call(zbc.CLOSE, rid), zmq.NOBLOCK)
        keys.close_socket(sock)


def _service_name(service: str | bytes) -> bytes:
    name = service.encode() if isinstance(service, str) else service
    if not isinstance(name, bytes) or not name:
        raise ValueError("service name must be a non-empty str or bytes")
    return name


def _body_frames(body: Body) -> list[bytes]:
    return list(_calls.payload_frames(body, "body"))
