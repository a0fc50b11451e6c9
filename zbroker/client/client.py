"""The blocking client: durable tasks over ZBC01, plus 7/MDP request/reply and 8/MMI.

Owns one DEALER socket at a time and replaces it after every unanswered
attempt (Lazy Pirate), so a late reply to an abandoned MDP attempt can never
be taken for the answer to a later request. Durable calls quote a request id
(rid) that is never reused, so answers are matched to calls exactly; their
retry and resume logic lives in `_calls` and is shared with AsyncClient.
Speaks only through `zbroker.protocol`; no broker internals.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

from zbroker.client import _calls
from zbroker.client._calls import Payload, When
from zbroker.client._owner import SocketOwner
from zbroker.client.durable import DeadLetter, TaskId, TaskState, TaskStatus
from zbroker.client.errors import (
    CallTimeout,
    ReplyError,
    RequestTimeout,
    connected_socket,
    zmq_boundary,
)
from zbroker.protocol import DEFAULT_ENDPOINT, mdp, zbc
from zbroker.protocol.errors import ProtocolError

T = TypeVar("T")
Body = bytes | Sequence[bytes]

# How long request() and result() wait for a task to end unless told otherwise.
DEFAULT_RESULT_TIMEOUT_S = 60.0


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


class Client(SocketOwner):
    """A blocking client of the broker: durable tasks (ZBC01), and 7/MDP request/reply.

    Durable calls (`enqueue`, `enqueue_many`, `request`, `result`, `status`,
    `cancel`, `dead_letters`, `redrive`) wait up to `timeout_s` for each
    answer; an unanswered attempt is sent again on a fresh socket, up to
    `retries` times, then `CallTimeout` is raised. Resending is always safe:
    enqueues carry an idempotency key (generated when none is given), a wait
    for a task's end is resumed by its id, and every other call is harmless to
    repeat.

    `mdp_request` speaks plain 7/MDP (Lazy Pirate): a resent MDP request may
    run twice on the service side.

    Not thread-safe: use one Client per thread (or AsyncClient on an event loop).
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        poll_s: float = 10.0,
        max_message_bytes: int = _calls.DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
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
        self._context = context if context is not None else zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = connected_socket(
            self._context, zmq.DEALER, endpoint
        )

    # ------------------------------------------------------------ durable tasks

    def enqueue(
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
        """Store one task for `service` and return its id once the broker has committed it.

        When this returns, the task is in the broker's journal and will run
        (at least once) on a worker of `service`. `payload` is one bytes frame
        or a sequence of frames. Options: `priority` (-128..127, higher runs
        first), `delay_s` or `not_before` (a datetime, or seconds since the
        epoch), `ttl_s` (expire unless started within it), `max_attempts`,
        `timeout_s` (run-time limit of one attempt), `key` (idempotency key: an
        enqueue whose key matches a stored task returns that task's id and
        stores nothing; the returned TaskId then has `existing` True),
        `headers` (a map given to the worker).

        Without `key`, one is generated for this call, so a resend after a lost
        answer never stores the task twice. Raises QueueFull, BadRequest or
        another BrokerError when refused, CallTimeout when the broker never answered.
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
        return self._run(plan, "enqueue")

    def enqueue_many(
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
        """Store a batch of tasks for `service`, with the same options; return their ids in order.

        One ENQUEUE message (one journal commit) carries up to 10,000 tasks;
        a larger batch goes as several messages, one after the other, and if
        one of them fails, the ones before it stay stored. `keys`, when given,
        holds one idempotency key or None per payload; every task without a
        key gets a generated one, so resends never store duplicates. Each
        returned TaskId's `existing` says whether its key matched a stored
        task. The other options are those of `enqueue()`. An empty batch
        returns [].
        """
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
        return self._run(plan, "enqueue_many")

    def request(
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
        """Enqueue one durable task and wait until it ends; return its one-frame result.

        Like `enqueue()` followed by `result()`, in one round trip. `timeout_s`
        bounds the wait for the task to end (None: no bound); the task's own
        run-time limit is `task_timeout_s`, the other options are those of
        `enqueue()`. If the connection is lost while waiting, the wait resumes
        by task id (RESULT) on a fresh socket: the task is never enqueued twice.

        Raises TaskDead, TaskCancelled or TaskExpired when the task ended
        without a result; TaskPending when it has not ended after `timeout_s`
        (it still runs: fetch its result later with `result(e.task_id)`);
        ReplyError when the result has several frames (use `request_frames`; a
        result of no frames reads as b""); BrokerError subclasses when refused; CallTimeout
        when the broker stopped answering.
        """
        return _calls.one_frame(
            self.request_frames(
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
        )

    def request_frames(
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
        return self._run(plan, "request")

    def result(self, task_id: str, timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S) -> bytes:
        """Wait up to `timeout_s` (None: no bound) for task `task_id` to end; return its result.

        Works from any connection, any time after the enqueue, for as long as
        the broker keeps the task's record. `timeout_s=0` asks once without
        waiting. If the connection is lost while waiting, the wait resumes on a
        fresh socket. Raises TaskPending when the task has not ended in time,
        TaskDead / TaskCancelled / TaskExpired when it ended without a result,
        TaskNotFound for an unknown id, ReplyError when the result has several
        frames (use `result_frames`; no frames reads as b""), CallTimeout when the broker is silent.
        """
        return _calls.one_frame(self.result_frames(task_id, timeout_s))

    def result_frames(
        self, task_id: str, timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S
    ) -> list[bytes]:
        """`result()` for results of any number of frames: returns every result frame."""
        return self._run(_calls.plan_result(self._settings(), task_id, timeout_s), "result")

    def queues(self) -> list[dict[str, Any]]:
        """Every service's queue figures, exact at the moment of the call: ready,
        delayed, inflight, dead, done (retained), requests (MDP, waiting), workers,
        credit, credit_in_use, oldest_age_s (of the oldest waiting task or request)."""
        return self._run(_calls.plan_admin(self._settings(), zbc.QUEUES, "queues"), "queues")

    def drain(self, worker: str) -> int:
        """Stop giving tasks to `worker` (its id in hex, from `workers()`); the tasks it
        holds finish. Returns how many it holds. Raises a BrokerError with code
        `not_found` (TaskNotFound) for an unknown worker."""
        answer = self._run(_calls.plan_control(self._settings(), zbc.DRAIN, worker=worker), "drain")
        return int(answer["tasks"])

    def broker_stats(self) -> dict[str, Any]:
        """The broker's counters (requests, tasks enqueued/done/retried/dead..., malformed
        input by reason), its journal's figures and its uptime."""
        return self._run(_calls.plan_control(self._settings(), zbc.STATS), "stats")

    def limit(self, service: str, limit: int | None) -> None:
        """At most `limit` tasks and requests of `service` at its workers together
        (None: no limit). Kept in the journal: it holds across a broker restart."""
        self._run(
            _calls.plan_control(self._settings(), zbc.LIMIT, service=service, limit=limit),
            "limit",
        )

    def purge(self, service: str) -> int:
        """Cancel every waiting (ready or delayed) task of `service`; how many. Running
        tasks are left alone."""
        return self._run(_calls.plan_purge(self._settings(), service), "purge")

    def drop_dead_letters(self, service: str, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters of `service` (those listed, or all); how many."""
        return self._run(_calls.plan_drop(self._settings(), service, ids), "drop")

    def tasks(
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
        return self._run(plan, "tasks")

    def pause(self, service: str) -> None:
        """Stop deliveries of `service` (tasks and requests wait) until `resume()`.
        Kept in the journal: it holds across a broker restart."""
        self._run(_calls.plan_control(self._settings(), zbc.PAUSE, service=service), "pause")

    def resume(self, service: str) -> None:
        """Deliver `service`'s work again after `pause()`."""
        self._run(_calls.plan_control(self._settings(), zbc.RESUME, service=service), "resume")

    def workers(self) -> list[dict[str, Any]]:
        """Every registered worker: worker (routing id, hex), service, dialect, credit,
        tasks (ids held), tags, metrics (from its heartbeats), last_seen_s."""
        return self._run(_calls.plan_admin(self._settings(), zbc.WORKERS, "workers"), "workers")

    def status(self, task_id: str) -> TaskStatus:
        """What the broker knows of task `task_id` now. Raises TaskNotFound for an unknown id."""
        return self._run(_calls.plan_status(self._settings(), task_id), "status")

    def cancel(self, task_id: str) -> TaskState:
        """Cancel task `task_id` unless it has already ended; return the state it was in.

        A queued or delayed task never runs; a running one is taken back from
        its worker and its result is discarded. Raises TaskConflict when the
        task had already ended (done, dead, cancelled, expired) and TaskNotFound
        for an unknown id. If the answer to a first attempt was lost, the
        resend finds the task cancelled and raises TaskConflict: `status()` then
        shows `cancelled`.
        """
        return self._run(_calls.plan_cancel(self._settings(), task_id), "cancel")

    def dead_letters(self, service: str | bytes, limit: int | None = 100) -> list[DeadLetter]:
        """Up to `limit` dead letters of `service` (None: all), oldest first.

        Fetched in pages of up to 1000, one call each; the list is a snapshot
        taken page by page, not one atomic read.
        """
        plan = _calls.plan_dead_letters(self._settings(), service, limit)
        return self._run(plan, "dead_letters")

    def redrive(self, service: str | bytes, ids: Sequence[str] | None = None) -> list[str]:
        """Put dead letters of `service` back in its queue (all of them, or those in `ids`).

        Each redriven task is ready again with its attempts reset. Returns the
        ids actually redriven: listed ids that are not dead letters of
        `service` are skipped.
        """
        return self._run(_calls.plan_redrive(self._settings(), service, ids), "redrive")

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
                sock.send_multipart(message)
                self.stats.sent += 1
                try:
                    reply = self._await_reply(sock, service_b, attempt_timeout_s)
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
                    raise RequestTimeout(service_b, attempt_timeout_s, attempts)
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

    def _settings(self) -> _calls.Settings:
        _calls.check_settings(self.timeout_s, self.retries, self.poll_s)
        return _calls.Settings(
            self.timeout_s, self.retries, self.poll_s, self._next_rid, self.max_message_bytes
        )

    def _next_rid(self) -> int:
        return next(self._rids)

    def _run(self, plan: _calls.Plan[T], what: str) -> T:
        """Carry out a durable-call plan on this client's socket (see `_calls`)."""
        try:
            sock = self._open_socket()
            self.stats.calls += 1
            mine: set[int] = set()  # rids of this call on the current socket
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
                        sock.send_multipart(op.frames)
                        self.stats.count_send(op.kind)
                        event = None
                    elif isinstance(op, _calls.Wait):
                        event = self._await_answer(sock, mine, op.timeout_s)
                    else:
                        sock = self._replace_socket()
                        mine.clear()
                        event = None
        except CallTimeout:
            self.stats.timeouts += 1
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
            if not sock.poll(remaining_ms, zmq.POLLIN):
                return _calls.TIMEOUT
            frames = sock.recv_multipart()
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

    def _replace_socket(self) -> zmq.Socket[bytes]:
        self.close()
        self._socket = connected_socket(self._context, zmq.DEALER, self.endpoint)
        return self._socket

    def _await_reply(
        self, sock: zmq.Socket[bytes], service: bytes, timeout_s: float
    ) -> list[bytes] | None:
        """The body of the next MDP reply for `service`, or None at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not sock.poll(remaining_ms, zmq.POLLIN):
                return None
            frames = sock.recv_multipart()
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


def _service_name(service: str | bytes) -> bytes:
    name = service.encode() if isinstance(service, str) else service
    if not isinstance(name, bytes) or not name:
        raise ValueError("service name must be a non-empty str or bytes")
    return name


def _body_frames(body: Body) -> list[bytes]:
    if isinstance(body, bytes):
        return [body]
    if isinstance(body, str):
        raise TypeError("body must be bytes or a sequence of bytes, not str: encode it first")
    frames = list(body)
    for frame in frames:
        if not isinstance(frame, bytes):
            raise TypeError(f"body frames must be bytes, got {type(frame).__name__}")
    return frames
