"""The asyncio client for durable tasks (ZBC01): many coroutines, one DEALER socket.

Every call picks request ids (rids) that are never reused and registers them;
one reader task receives every answer and hands it to the call that owns its
rid, so any number of calls may be outstanding on the socket at once. The
retry and resume logic is the blocking Client's (`_calls`), driven here with
awaits instead of blocking polls.

When a call finds the broker silent, the socket is replaced, as the blocking
Client does; every other call outstanding on the old socket is told at once
and sends again on the new one (an enqueue with its idempotency key, a wait
for a result as RESULT by task id), so none of them waits for a timeout of
its own. For a call that has heard nothing since it last sent, the
replacement counts as an unanswered attempt (see `_calls`), so a call's
bounds hold whatever the other calls on the socket do.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import zmq
import zmq.asyncio

from zbroker.client import _calls
from zbroker.client._calls import Payload, When
from zbroker.client.client import DEFAULT_RESULT_TIMEOUT_S, ClientStats
from zbroker.client.durable import DeadLetter, TaskId, TaskState, TaskStatus
from zbroker.client.errors import CallTimeout, ClientClosed, connected_socket, zmq_boundary
from zbroker.protocol import DEFAULT_ENDPOINT, zbc
from zbroker.protocol.errors import ProtocolError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Replaced:
    generation: int  # the connection that replaced the call's one


class _Closed:
    pass


_CLOSED = _Closed()

_Item = zbc.Answer | _Replaced | _Closed


@dataclass(eq=False, slots=True)
class _Call:
    """One outstanding call: its inbox, and the rids it sent on connection `generation`."""

    generation: int
    inbox: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    rids: set[int] = field(default_factory=set)


class AsyncClient:
    """The durable-task calls of `Client`, as coroutines, for asyncio programs.

    Same methods, options, errors and guarantees as the blocking Client's
    durable calls (`enqueue`, `enqueue_many`, `request`, `request_frames`,
    `result`, `result_frames`, `status`, `cancel`, `dead_letters`, `redrive`);
    calls from many coroutines share one socket and run concurrently. Use it
    from one event loop; it has no MDP calls (use Client for those).

    `async with AsyncClient(...) as client:` closes it on exit; `close()` does
    the same from synchronous code. Calls still outstanding then raise ClientClosed.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        poll_s: float = 10.0,
        max_message_bytes: int = _calls.DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        _calls.check_settings(timeout_s, retries, poll_s)
        _calls.check_message_bytes(max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retries = retries
        self.poll_s = poll_s
        self.stats = ClientStats()
        self._rids = itertools.count(1)
        self._context = _async_context(context)
        self._socket: zmq.asyncio.Socket | None = connected_socket(
            self._context, zmq.DEALER, endpoint
        )
        self._generation = 0  # bumped each time the socket is replaced
        self._routes: dict[int, _Call] = {}  # rid -> call, for the current socket
        self._calls: set[_Call] = set()
        self._reader: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

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
        self._socket.close(linger=0)
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

    # ------------------------------------------------------------ durable tasks

    async def enqueue(
        self,
        service: str | bytes,
        payload: Payload,
        *,
        priority: int = 0,
        delay_s: float | None = None,
        not_before: When | None = None,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        key: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> TaskId:
        """Store one task; return its id once committed. See `Client.enqueue`.

        Without `key`, one is generated for the call, so a resend after a lost
        answer never stores the task twice.
        """
        plan = _calls.plan_enqueue(
            self._settings(),
            service,
            payload,
            priority=priority,
            delay_s=delay_s,
            not_before=not_before,
            ttl_s=ttl_s,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            key=key,
            headers=headers,
        )
        return await self._run(plan, "enqueue")

    async def enqueue_many(
        self,
        service: str | bytes,
        payloads: Sequence[Payload],
        *,
        keys: Sequence[str | None] | None = None,
        priority: int = 0,
        delay_s: float | None = None,
        not_before: When | None = None,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        headers: dict[str, Any] | None = None,
    ) -> list[TaskId]:
        """Store a batch of tasks; return their ids in payload order. See `Client.enqueue_many`."""
        plan = _calls.plan_enqueue_many(
            self._settings(),
            service,
            payloads,
            keys=keys,
            priority=priority,
            delay_s=delay_s,
            not_before=not_before,
            ttl_s=ttl_s,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            headers=headers,
        )
        return await self._run(plan, "enqueue_many")

    async def request(
        self,
        service: str | bytes,
        payload: Payload,
        timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S,
        *,
        priority: int = 0,
        delay_s: float | None = None,
        not_before: When | None = None,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
        task_timeout_s: float | None = None,
        key: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> bytes:
        """Enqueue one task and wait until it ends; its one-frame result. See `Client.request`.

        A lost connection is survived by resuming the wait with RESULT by task
        id, never by enqueueing again.
        """
        frames = await self.request_frames(
            service,
            payload,
            timeout_s,
            priority=priority,
            delay_s=delay_s,
            not_before=not_before,
            ttl_s=ttl_s,
            max_attempts=max_attempts,
            task_timeout_s=task_timeout_s,
            key=key,
            headers=headers,
        )
        return _calls.one_frame(frames)

    async def request_frames(
        self,
        service: str | bytes,
        payload: Payload,
        timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S,
        *,
        priority: int = 0,
        delay_s: float | None = None,
        not_before: When | None = None,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
        task_timeout_s: float | None = None,
        key: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> list[bytes]:
        """`request()` for results of any number of frames: returns every result frame."""
        plan = _calls.plan_request(
            self._settings(),
            service,
            payload,
            timeout_s,
            priority=priority,
            delay_s=delay_s,
            not_before=not_before,
            ttl_s=ttl_s,
            max_attempts=max_attempts,
            task_timeout_s=task_timeout_s,
            key=key,
            headers=headers,
        )
        return await self._run(plan, "request")

    async def result(
        self, task_id: str, timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S
    ) -> bytes:
        """Wait up to `timeout_s` for task `task_id` to end; its result. See `Client.result`."""
        return _calls.one_frame(await self.result_frames(task_id, timeout_s))

    async def result_frames(
        self, task_id: str, timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S
    ) -> list[bytes]:
        """`result()` for results of any number of frames: returns every result frame."""
        return await self._run(_calls.plan_result(self._settings(), task_id, timeout_s), "result")

    async def queues(self) -> list[dict[str, Any]]:
        """Every service's queue figures, exact at the moment of the call: ready,
        delayed, inflight, dead, done (retained), requests (MDP, waiting), workers,
        credit, credit_in_use, oldest_age_s (of the oldest waiting task or request)."""
        return await self._run(_calls.plan_admin(self._settings(), zbc.QUEUES, "queues"), "queues")

    async def drain(self, worker: str) -> int:
        """Stop giving tasks to `worker` (its id in hex, from `workers()`); the tasks it
        holds finish. Returns how many it holds. Raises a BrokerError with code
        `not_found` (TaskNotFound) for an unknown worker."""
        answer = await self._run(
            _calls.plan_control(self._settings(), zbc.DRAIN, worker=worker), "drain"
        )
        return int(answer["tasks"])

    async def broker_stats(self) -> dict[str, Any]:
        """The broker's counters (requests, tasks enqueued/done/retried/dead..., malformed
        input by reason), its journal's figures and its uptime."""
        return await self._run(_calls.plan_control(self._settings(), zbc.STATS), "stats")

    async def limit(self, service: str, limit: int | None) -> None:
        """At most `limit` tasks and requests of `service` at its workers together
        (None: no limit). Kept in the journal: it holds across a broker restart."""
        await self._run(
            _calls.plan_control(self._settings(), zbc.LIMIT, service=service, limit=limit),
            "limit",
        )

    async def purge(self, service: str) -> int:
        """Cancel every waiting (ready or delayed) task of `service`; how many. Running
        tasks are left alone."""
        return await self._run(_calls.plan_purge(self._settings(), service), "purge")

    async def drop_dead_letters(self, service: str, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters of `service` (those listed, or all); how many."""
        return await self._run(_calls.plan_drop(self._settings(), service, ids), "drop")

    async def tasks(
        self,
        service: str,
        state: str,
        *,
        limit: int = 100,
        after: int = 0,
        older_than_s: float = 0.0,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """A page of `service`'s tasks in `state` (ready, delayed, inflight, dead, done,
        cancelled, expired) at least `older_than_s` old: (records, next `after` or None)."""
        plan = _calls.plan_tasks(self._settings(), service, state, limit, after, older_than_s)
        return await self._run(plan, "tasks")

    async def pause(self, service: str) -> None:
        """Stop deliveries of `service` (tasks and requests wait) until `resume()`.
        Kept in the journal: it holds across a broker restart."""
        await self._run(_calls.plan_control(self._settings(), zbc.PAUSE, service=service), "pause")

    async def resume(self, service: str) -> None:
        """Deliver `service`'s work again after `pause()`."""
        await self._run(
            _calls.plan_control(self._settings(), zbc.RESUME, service=service), "resume"
        )

    async def workers(self) -> list[dict[str, Any]]:
        """Every registered worker: worker (routing id, hex), service, dialect, credit,
        tasks (ids held), tags, metrics (from its heartbeats), last_seen_s."""
        return await self._run(
            _calls.plan_admin(self._settings(), zbc.WORKERS, "workers"), "workers"
        )

    async def status(self, task_id: str) -> TaskStatus:
        """What the broker knows of task `task_id` now. Raises TaskNotFound for an unknown id."""
        return await self._run(_calls.plan_status(self._settings(), task_id), "status")

    async def cancel(self, task_id: str) -> TaskState:
        """Cancel task `task_id` unless it has ended; the state it was in. See `Client.cancel`."""
        return await self._run(_calls.plan_cancel(self._settings(), task_id), "cancel")

    async def dead_letters(self, service: str | bytes, limit: int | None = 100) -> list[DeadLetter]:
        """Up to `limit` dead letters of `service` (None: all), oldest first, page by page."""
        plan = _calls.plan_dead_letters(self._settings(), service, limit)
        return await self._run(plan, "dead_letters")

    async def redrive(self, service: str | bytes, ids: Sequence[str] | None = None) -> list[str]:
        """Put dead letters of `service` (all, or those in `ids`) back in its queue; their ids."""
        return await self._run(_calls.plan_redrive(self._settings(), service, ids), "redrive")

    # ---------------------------------------------------------------- private

    def _settings(self) -> _calls.Settings:
        _calls.check_settings(self.timeout_s, self.retries, self.poll_s)
        return _calls.Settings(
            self.timeout_s, self.retries, self.poll_s, self._next_rid, self.max_message_bytes
        )

    def _next_rid(self) -> int:
        return next(self._rids)

    def _open_socket(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            raise ClientClosed("this AsyncClient is closed")
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
                        if call.generation != self._generation:
                            call.generation = self._generation
                            call.rids.clear()
                        call.rids.add(op.rid)
                        self._routes[op.rid] = call
                        await sock.send_multipart(op.frames)
                        self.stats.count_send(op.kind)
                    elif isinstance(op, _calls.Wait):
                        # REPLACED when another call replaced the socket since this
                        # one sent; the plan counts it against this call's retries.
                        event = await self._next_event(call, op.timeout_s)
                    elif call.generation == self._generation:
                        # The broker was silent to this call on the current socket:
                        # replace it (unless another call already has since we sent).
                        self._replace_socket()
        except CallTimeout:
            self.stats.timeouts += 1
            raise
        finally:
            plan.close()
            if call is not None:
                self._calls.discard(call)
                for rid in call.rids:
                    if self._routes.get(rid) is call:
                        del self._routes[rid]

    async def _next_event(self, call: _Call, timeout_s: float) -> _calls.Event:
        """The call's next answer, TIMEOUT, or REPLACED (its socket was replaced)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
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
                raise ClientClosed("this AsyncClient was closed while the call waited")
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
        """Hand every answer on `sock` to the call that owns its rid, until the socket closes."""
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                return  # closed or replaced under us
            self._dispatch(frames)

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

    def _replace_socket(self) -> None:
        """Close the socket, open a fresh one, and tell every outstanding call to send again."""
        old = self._open_socket()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._reader = None
        old.close(linger=0)
        self._routes.clear()
        self._socket = connected_socket(self._context, zmq.DEALER, self.endpoint)
        self._generation += 1
        self._ensure_reader()
        for call in self._calls:
            call.inbox.put_nowait(_Replaced(self._generation))


def _async_context(context: zmq.Context[Any] | None) -> zmq.asyncio.Context:
    """An asyncio context: the shared one, the one given, or a shadow of a plain one."""
    if context is None:
        return zmq.asyncio.Context.instance()
    if isinstance(context, zmq.asyncio.Context):
        return context
    return zmq.asyncio.Context(context)
