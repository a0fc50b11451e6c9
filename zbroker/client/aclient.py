"""AsyncClient: the durable-task calls (ZBC01), their options and their documentation.

Written once, in zbroker/client/aclient.py, for both clients:
scripts/unasync.py generates zbroker/client/client.py from it by token
substitution (the asyncio names become the blocking ones, awaits go). Edit
aclient.py, then run `python3 dev.py unasync`; `python3 dev.py test` fails
while client.py is stale.

How the calls use the socket is what differs between the two clients, and
is written twice, in `_base`. What the calls send, resend and resume is
written once too, as the sans-IO plans of `_calls`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from zbroker.client import _base, _calls
from zbroker.client._base import (
    DEFAULT_RESULT_TIMEOUT_S,
    AsyncClientBase,
    AsyncClientContext,
    ClientStats,
)
from zbroker.client._calls import Payload
from zbroker.client.durable import DeadLetter, TaskId, TaskState, TaskStatus
from zbroker.client.endpoints import Endpoints, joined, parse_endpoints
from zbroker.client.keys import Credentials
from zbroker.client.options import TaskOptions, When, pick_options
from zbroker.client.schedules import (
    ScheduleInfo,
    plan_schedule,
    plan_schedules,
    plan_unschedule,
)
from zbroker.protocol import DEFAULT_ENDPOINT, zbc
from zbroker.protocol.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_QUEUES_PAGE,
    STREAM_WINDOW_DEFAULT,
)


class AsyncClient(AsyncClientBase):
    """A client of the broker's durable tasks (ZBC01): store them, wait for their ends, steer them.

    Durable calls (`enqueue`, `enqueue_many`, `request`, `result`, `status`,
    `cancel`, `dead_letters`, `redrive`, and the admin calls behind the
    `zbroker` command) wait up to `timeout_s` for each answer; an unanswered
    attempt is sent again on a fresh socket, up to `retries` times, then
    `CallTimeout` is raised. Resending is always safe: enqueues carry an
    idempotency key (generated when none is given), a wait for a task's end is
    resumed by its id, and every other call is harmless to repeat.

    Task options go either as keywords (`priority=5`) or as one
    `options=TaskOptions(priority=5)`; a call given both raises TypeError.

    The asyncio client's calls are coroutines: calls from many coroutines share
    one socket and run concurrently; use it from one event loop, and close it
    with `async with` or `aclose()`. The blocking client's calls block; it is
    not thread-safe (use one per thread), closes with `with` or `close()`, and
    also speaks plain 7/MDP (`mdp_request`, Lazy Pirate: a resent MDP request
    may run twice on the service side) and 8/MMI (`mmi_service`).

    `endpoint` is one broker's ROUTER endpoint, or several ("tcp://a:5555,tcp://b:5555"
    or a list) of brokers of which one is active: the client follows the active one,
    and an attempt that no broker answers is sent again, as above, to whichever
    broker answers (docs/python-client.md, "Several brokers").
    """

    def __init__(
        self,
        endpoint: Endpoints = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        poll_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        context: AsyncClientContext | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        _calls.check_settings(timeout_s, retries, poll_s)
        _calls.check_message_bytes(max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self.endpoints = parse_endpoints(endpoint)
        self.endpoint = joined(self.endpoints)
        # CURVE keys for a broker started with --auth (zbroker.client.keys).
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.retries = retries
        self.poll_s = poll_s
        self.stats = ClientStats()
        self._rids = itertools.count(1)
        super().__init__(context)

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
        depends_on: Sequence[zbc.DependencyRef] = (),
        run_anyway: bool = False,
        input: str | None = None,
        require: Sequence[str] = (),
        prefer: Sequence[str] = (),
        affinity: str | None = None,
        concurrency_key: str | None = None,
        debounce_s: float | None = None,
        options: TaskOptions | None = None,
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
        `headers` (a map given to the worker), `depends_on`, `run_anyway` and
        `input` (a task that waits for other tasks), `require` and `prefer` (worker
        tags), `affinity` and `concurrency_key`, `debounce_s` (with `key`: later
        enqueues of the key replace the waiting task's payload; docs/scheduling.md);
        or all of them as one `options=TaskOptions(...)` instead (TypeError when
        both are given).

        Without `key`, one is generated for this call, so a resend after a lost
        answer never stores the task twice. Raises QueueFull, BadRequest or
        another BrokerError when refused, CallTimeout when the broker never answered.
        """
        chosen = pick_options(
            options,
            TaskOptions(
                priority=priority,
                delay_s=delay_s,
                not_before=not_before,
                ttl_s=ttl_s,
                max_attempts=max_attempts,
                timeout_s=timeout_s,
                key=key,
                headers=headers,
                depends_on=tuple(depends_on),
                run_anyway=run_anyway,
                input=input,
                require=tuple(require),
                prefer=tuple(prefer),
                affinity=affinity,
                concurrency_key=concurrency_key,
                debounce_s=debounce_s,
            ),
        )
        plan = _calls.plan_enqueue(self._settings(), service, payload, chosen)
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
        depends_on: Sequence[zbc.DependencyRef] = (),
        run_anyway: bool = False,
        input: str | None = None,
        require: Sequence[str] = (),
        prefer: Sequence[str] = (),
        affinity: str | None = None,
        concurrency_key: str | None = None,
        options: TaskOptions | None = None,
    ) -> list[TaskId]:
        """Store a batch of tasks for `service`, with the same options; return their ids in order.

        One ENQUEUE message (one journal commit) carries up to 10,000 tasks;
        a larger batch goes as several messages, one after the other, and if
        one of them fails, the ones before it stay stored. `keys`, when given,
        holds one idempotency key or None per payload; every task without a
        key gets a generated one, so resends never store duplicates. Each
        returned TaskId's `existing` says whether its key matched a stored
        task. The other options are those of `enqueue()` (`options` may not
        hold a `key`: a batch takes `keys`). An empty batch returns [].
        """
        chosen = pick_options(
            options,
            TaskOptions(
                priority=priority,
                delay_s=delay_s,
                not_before=not_before,
                ttl_s=ttl_s,
                max_attempts=max_attempts,
                timeout_s=timeout_s,
                headers=headers,
                depends_on=tuple(depends_on),
                run_anyway=run_anyway,
                input=input,
                require=tuple(require),
                prefer=tuple(prefer),
                affinity=affinity,
                concurrency_key=concurrency_key,
            ),
        )
        plan = _calls.plan_enqueue_many(self._settings(), service, payloads, keys, chosen)
        return await self._run(plan, "enqueue_many")

    async def chain(
        self,
        steps: Sequence[tuple[str | bytes, Payload | None]],
        *,
        key: str | None = None,
        options: TaskOptions | None = None,
    ) -> list[TaskId]:
        """Enqueue tasks that run one after the other: each step waits for the one
        before it and is given its result. Returns their ids in order; the last
        one's result is the chain's (`result(ids[-1])`).

        `steps` are `(service, payload)` pairs. The first step's payload is its
        payload; a later step's payload (None or b"" for none) is followed by the
        previous step's result frames, which the broker hands over when that step
        is done (`input="result"`). A step that fails for good ends every step
        after it `upstream_failed` (TaskUpstreamFailed). `options` apply to every
        step (except `depends_on` and `input`, which the chain sets). Each step is
        one ENQUEUE: if this call fails halfway, the steps before stay stored.
        `key` makes the chain idempotent: step i gets the key `f"{key}:{i}"`, so a
        chain enqueued again with the same key (after a crash, say) returns the ids
        of the steps stored before and stores only the missing ones.
        """
        base = _calls.graph_base(options, "chain()")
        ids: list[TaskId] = []
        for i, (service, payload) in enumerate(steps):
            step = base
            if ids:
                step = _calls.depending(base, (ids[-1],), zbc.INPUT_RESULT)
            if key is not None:
                step = dataclasses.replace(step, key=f"{key}:{i}")
            plan = _calls.plan_enqueue(self._settings(), service, payload or [], step)
            ids.append(await self._run(plan, "chain"))
        return ids

    async def fan_in(
        self,
        parts: Sequence[tuple[str | bytes, Payload]],
        then: tuple[str | bytes, Payload | None],
        *,
        key: str | None = None,
        options: TaskOptions | None = None,
    ) -> list[TaskId]:
        """Enqueue `parts` (run side by side), then one task that waits for them all
        and is given every result. Returns the parts' ids and, last, the joining
        task's, whose result is the whole's (`result(ids[-1])`).

        `then` is `(service, payload)`: its payload (None for none) is followed by
        one frame, a msgpack list with each part's result frames in order
        (`input="results"`; `unpack_results()` reads it). Consecutive parts of one
        service go in one ENQUEUE. If a part fails for good, the joining task ends
        `upstream_failed`. `options` apply to every task, as in `chain()`; `key`
        makes it idempotent like `chain()`'s (`f"{key}:{i}"` for part i,
        `f"{key}:join"` for the joining task).
        """
        base = _calls.graph_base(options, "fan_in()")
        if not 1 <= len(parts) <= zbc.MAX_DEPENDENCIES:
            raise ValueError(f"fan_in() takes 1..{zbc.MAX_DEPENDENCIES} parts")
        ids: list[TaskId] = []
        start = 0
        while start < len(parts):
            service = parts[start][0]
            end = start
            while end < len(parts) and parts[end][0] == service:
                end += 1
            payloads = [payload for _, payload in parts[start:end]]
            keys = None if key is None else [f"{key}:{i}" for i in range(start, end)]
            batch = _calls.plan_enqueue_many(self._settings(), service, payloads, keys, base)
            ids.extend(await self._run(batch, "fan_in"))
            start = end
        joined = _calls.depending(base, tuple(ids), zbc.INPUT_RESULTS)
        if key is not None:
            joined = dataclasses.replace(joined, key=f"{key}:join")
        last = _calls.plan_enqueue(self._settings(), then[0], then[1] or [], joined)
        ids.append(await self._run(last, "fan_in"))
        return ids

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
        depends_on: Sequence[zbc.DependencyRef] = (),
        run_anyway: bool = False,
        input: str | None = None,
        require: Sequence[str] = (),
        prefer: Sequence[str] = (),
        affinity: str | None = None,
        concurrency_key: str | None = None,
        options: TaskOptions | None = None,
    ) -> bytes:
        """Enqueue one durable task and wait until it ends; return its one-frame result.

        Like `enqueue()` followed by `result()`, in one round trip. `timeout_s`
        bounds the wait for the task to end (None: no bound); the task's own
        run-time limit is `task_timeout_s` (`timeout_s` of a TaskOptions), the
        other options are those of `enqueue()`. If the connection is lost while
        waiting, the wait resumes by task id (RESULT) on a fresh socket: the
        task is never enqueued twice.

        Raises TaskDead, TaskCancelled or TaskExpired when the task ended
        without a result; TaskPending when it has not ended after `timeout_s`
        (it still runs: fetch its result later with `result(e.task_id)`);
        ReplyError when the result has several frames (use `request_frames`; a
        result of no frames reads as b""); BrokerError subclasses when refused; CallTimeout
        when the broker stopped answering.
        """
        chosen = pick_options(
            options,
            TaskOptions(
                priority=priority,
                delay_s=delay_s,
                not_before=not_before,
                ttl_s=ttl_s,
                max_attempts=max_attempts,
                timeout_s=task_timeout_s,
                key=key,
                headers=headers,
                depends_on=tuple(depends_on),
                run_anyway=run_anyway,
                input=input,
                require=tuple(require),
                prefer=tuple(prefer),
                affinity=affinity,
                concurrency_key=concurrency_key,
            ),
            timeout_name="task_timeout_s",
        )
        plan = _calls.plan_request(self._settings(), service, payload, timeout_s, chosen)
        return _calls.one_frame(await self._run(plan, "request"))

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
        depends_on: Sequence[zbc.DependencyRef] = (),
        run_anyway: bool = False,
        input: str | None = None,
        require: Sequence[str] = (),
        prefer: Sequence[str] = (),
        affinity: str | None = None,
        concurrency_key: str | None = None,
        options: TaskOptions | None = None,
    ) -> list[bytes]:
        """`request()` for results of any number of frames: returns every result frame."""
        chosen = pick_options(
            options,
            TaskOptions(
                priority=priority,
                delay_s=delay_s,
                not_before=not_before,
                ttl_s=ttl_s,
                max_attempts=max_attempts,
                timeout_s=task_timeout_s,
                key=key,
                headers=headers,
                depends_on=tuple(depends_on),
                run_anyway=run_anyway,
                input=input,
                require=tuple(require),
                prefer=tuple(prefer),
                affinity=affinity,
                concurrency_key=concurrency_key,
            ),
            timeout_name="task_timeout_s",
        )
        plan = _calls.plan_request(self._settings(), service, payload, timeout_s, chosen)
        return await self._run(plan, "request")

    def stream(
        self,
        service: str | bytes,
        payload: Payload,
        timeout_s: float | None = None,
        *,
        window: int = STREAM_WINDOW_DEFAULT,
        attempts: str = "all",
        cancel_on_abandon: bool = True,
        priority: int = 0,
        delay_s: float | None = None,
        not_before: When | None = None,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
        task_timeout_s: float | None = None,
        key: str | None = None,
        headers: dict[str, Any] | None = None,
        depends_on: Sequence[zbc.DependencyRef] = (),
        run_anyway: bool = False,
        input: str | None = None,
        require: Sequence[str] = (),
        prefer: Sequence[str] = (),
        affinity: str | None = None,
        concurrency_key: str | None = None,
        options: TaskOptions | None = None,
    ) -> _base.AsyncTaskStream:
        """Enqueue one durable task and read its stream: the chunks its worker sends
        (`task.emit`, or a generator handler) as they come, then its result.

        Returns a stream (iterate it; it sends nothing before that): each
        chunk is bytes, given once and in order, and once the loop ends,
        `.result` is the task's result and `.task_id` its id. Closing it early
        (`close()`, or a `with` block around it; a `break` alone does not close
        it) abandons the stream, which cancels the task (`cancel_on_abandon`,
        on by default here; the worker's handler sees the cancellation within a
        heartbeat interval). `window`: chunks the broker may send ahead of what
        was read (flow control); `attempts="current"` skips chunks of attempts
        older than the task's current one (when `attempt` grows, the task started
        again). `timeout_s` bounds the whole stream (None: no bound; a broker that
        goes silent still fails it, CallTimeout); the task options are those of
        `enqueue()`. A lost connection is resumed by task id from the next offset:
        no chunk is lost or given twice. Raises what `request()` raises.
        """
        chosen = pick_options(
            options,
            TaskOptions(
                priority=priority,
                delay_s=delay_s,
                not_before=not_before,
                ttl_s=ttl_s,
                max_attempts=max_attempts,
                timeout_s=task_timeout_s,
                key=key,
                headers=headers,
                depends_on=tuple(depends_on),
                run_anyway=run_anyway,
                input=input,
                require=tuple(require),
                prefer=tuple(prefer),
                affinity=affinity,
                concurrency_key=concurrency_key,
            ),
            timeout_name="task_timeout_s",
        )
        how = _calls.follow(window, attempts, cancel_on_abandon)
        plan = _calls.plan_stream(self._settings(), service, payload, timeout_s, chosen, how)
        return self._stream(plan, "stream", None, 0)

    def read_stream(
        self,
        task_id: str,
        offset: int = 0,
        timeout_s: float | None = None,
        *,
        window: int = STREAM_WINDOW_DEFAULT,
        attempts: str = "all",
        cancel_on_abandon: bool = False,
    ) -> _base.AsyncTaskStream:
        """Read the stream of an existing task from `offset`: the chunks kept so far,
        then the rest as they come, then its result (the same stream as `stream()`
        returns). A reader that lost its place resumes with the `offset` it had.
        Abandoning it cancels the task only with `cancel_on_abandon=True`.
        Raises TaskNotFound for an unknown task (or one whose retention ended).
        """
        how = _calls.follow(window, attempts, cancel_on_abandon)
        plan = _calls.plan_read_stream(self._settings(), task_id, offset, timeout_s, how)
        return self._stream(plan, "read_stream", task_id, offset)

    async def result(
        self,
        task_id: str,
        timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S,
    ) -> bytes:
        """Wait up to `timeout_s` (None: no bound) for task `task_id` to end; return its result.

        Works from any connection, any time after the enqueue, for as long as
        the broker keeps the task's record. `timeout_s=0` asks once without
        waiting. If the connection is lost while waiting, the wait resumes on a
        fresh socket. Raises TaskPending when the task has not ended in time,
        TaskDead / TaskCancelled / TaskExpired when it ended without a result,
        TaskNotFound for an unknown id, ReplyError when the result has several
        frames (use `result_frames`; no frames reads as b""), CallTimeout when the broker is silent.
        """
        return _calls.one_frame(await self.result_frames(task_id, timeout_s))

    async def result_frames(
        self, task_id: str, timeout_s: float | None = DEFAULT_RESULT_TIMEOUT_S
    ) -> list[bytes]:
        """`result()` for results of any number of frames: returns every result frame."""
        return await self._run(_calls.plan_result(self._settings(), task_id, timeout_s), "result")

    async def queues(self, page_size: int = MAX_QUEUES_PAGE) -> list[dict[str, Any]]:
        """Every service's queue figures, in name order: ready, delayed, inflight,
        dead, done (retained), requests (MDP, waiting), workers, credit,
        credit_in_use, oldest_age_s (of the oldest waiting task or request)...

        Fetched in pages of `page_size` services (1..1000), one call each; each page
        is exact when it is read, the list is not one atomic read."""
        return await self._run(_calls.plan_queues(self._settings(), page_size), "queues")

    async def queues_page(
        self, limit: int = MAX_QUEUES_PAGE, after: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of `queues()`: up to `limit` services after the one named `after`
        (None: from the first): (rows, the `after` of the next page, or None)."""
        return await self._run(_calls.plan_queues_page(self._settings(), limit, after), "queues")

    async def drain(self, worker: str) -> int:
        """Stop giving tasks to `worker` (its id in hex, from `workers()`); the tasks it
        holds finish. Returns how many it holds. Raises a BrokerError with code
        `not_found` (TaskNotFound) for an unknown worker."""
        plan = _calls.plan_control(self._settings(), zbc.DRAIN, worker=worker)
        answer = await self._run(plan, "drain")
        return int(answer["tasks"])

    async def broker_stats(self) -> dict[str, Any]:
        """The broker's counters (requests, tasks enqueued/done/retried/dead..., malformed
        input by reason), its journal's figures and its uptime."""
        return await self._run(_calls.plan_control(self._settings(), zbc.STATS), "stats")

    async def limit(self, service: str, limit: int | None, *, per_key: bool = False) -> None:
        """At most `limit` tasks and requests of `service` at its workers together
        (None: no limit); with `per_key`, at most `limit` tasks of each concurrency key
        of the service instead. Kept in the journal: it holds across a broker restart."""
        fields: dict[str, Any] = {"service": service, "limit": limit}
        if per_key:
            fields["per_key"] = True
        await self._run(_calls.plan_control(self._settings(), zbc.LIMIT, **fields), "limit")

    async def rate(
        self,
        service: str,
        per_s: float | None,
        *,
        burst: int | None = None,
        per_key: bool = False,
    ) -> None:
        """Hand out at most `per_s` tasks of `service` per second (None: no rate), in
        bursts of up to `burst` (default: `per_s` rounded up); with `per_key`, that
        rate for each concurrency key of the service instead. A token bucket, kept in
        the journal: it holds across a broker restart."""
        fields: dict[str, Any] = {"service": service, "rate": per_s}
        if burst is not None:
            fields["burst"] = burst
        if per_key:
            fields["per_key"] = True
        await self._run(_calls.plan_control(self._settings(), zbc.RATE, **fields), "rate")

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
        """A page of `service`'s tasks in `state` (any TaskState: ready, delayed, blocked,
        inflight, dead, done, cancelled, expired, upstream_failed) at least
        `older_than_s` old: (records, next `after` or None)."""
        plan = _calls.plan_tasks(self._settings(), service, state, limit, after, older_than_s)
        return await self._run(plan, "tasks")

    async def pause(self, service: str) -> None:
        """Stop deliveries of `service` (tasks and requests wait) until `resume()`.
        Kept in the journal: it holds across a broker restart."""
        await self._run(_calls.plan_control(self._settings(), zbc.PAUSE, service=service), "pause")

    async def resume(self, service: str) -> None:
        """Deliver `service`'s work again after `pause()`."""
        plan = _calls.plan_control(self._settings(), zbc.RESUME, service=service)
        await self._run(plan, "resume")

    async def workers(self) -> list[dict[str, Any]]:
        """Every registered worker: worker (routing id, hex), service, dialect, credit,
        tasks (ids held), tags, metrics (from its heartbeats), last_seen_s."""
        plan = _calls.plan_admin(self._settings(), zbc.WORKERS, "workers")
        return await self._run(plan, "workers")

    async def status(self, task_id: str, preview: int = 0) -> TaskStatus:
        """What the broker knows of task `task_id` now. Raises TaskNotFound for an unknown id.

        With `preview` (bytes, at most MAX_PREVIEW_BYTES), `payload` also holds the
        payload's frame and byte counts and its first frame's first `preview` bytes."""
        plan = _calls.plan_status(self._settings(), task_id, preview)
        return await self._run(plan, "status")

    async def cancel(self, task_id: str) -> TaskState:
        """Cancel task `task_id` unless it has already ended; return the state it was in.

        A queued or delayed task never runs; a running one is taken back from
        its worker and its result is discarded. Raises TaskConflict when the
        task had already ended (done, dead, cancelled, expired) and TaskNotFound
        for an unknown id. If the answer to a first attempt was lost, the
        resend finds the task cancelled and raises TaskConflict: `status()` then
        shows `cancelled`.
        """
        return await self._run(_calls.plan_cancel(self._settings(), task_id), "cancel")

    async def dead_letters(self, service: str | bytes, limit: int | None = 100) -> list[DeadLetter]:
        """Up to `limit` dead letters of `service` (None: all), oldest first.

        Fetched in pages of up to 1000, one call each; the list is a snapshot
        taken page by page, not one atomic read.
        """
        plan = _calls.plan_dead_letters(self._settings(), service, limit)
        return await self._run(plan, "dead_letters")

    async def redrive(self, service: str | bytes, ids: Sequence[str] | None = None) -> list[str]:
        """Put dead letters of `service` back in its queue (all of them, or those in `ids`).

        Each redriven task is ready again with its attempts reset. Returns the
        ids actually redriven: listed ids that are not dead letters of
        `service` are skipped.
        """
        return await self._run(_calls.plan_redrive(self._settings(), service, ids), "redrive")

    # ---------------------------------------------------------- recurring tasks

    async def schedule(
        self,
        name: str,
        service: str | bytes,
        payload: Payload = b"",
        *,
        every_s: float | None = None,
        cron: str | None = None,
        tz: str | None = None,
        priority: int = 0,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
        headers: dict[str, Any] | None = None,
    ) -> ScheduleInfo:
        """Have the broker enqueue `payload` to `service` every `every_s` seconds (a
        whole number, at least 1), or at the instants of `cron` (five fields, in UTC
        or in the IANA time zone `tz`), until `unschedule(name)`. Returns the schedule.

        Kept in the broker's journal. Each firing is an ordinary task with the
        idempotency key `schedule:<name>:<instant>`, so a broker restart neither skips
        nor repeats one; instants missed while the broker was stopped fire once, for
        the latest. The options are those of each firing's task. A schedule of the
        same name is replaced (the same definition again changes nothing). Raises
        ValueError for a rule the broker would refuse, BrokerError when refused.
        """
        chosen = TaskOptions(
            priority=priority,
            ttl_s=ttl_s,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            headers=headers,
        )
        plan = plan_schedule(self._settings(), name, service, payload, every_s, cron, tz, chosen)
        return await self._run(plan, "schedule")

    async def schedules(self) -> list[ScheduleInfo]:
        """Every schedule the broker keeps, by name: rule, next and last firing, count."""
        return await self._run(plan_schedules(self._settings()), "schedules")

    async def unschedule(self, name: str) -> bool:
        """Remove schedule `name`: True, or False when there was none. Firings already
        enqueued stay."""
        return await self._run(plan_unschedule(self._settings(), name), "unschedule")

    # ---------------------------------------------------------------- private

    def _settings(self) -> _calls.Settings:
        _calls.check_settings(self.timeout_s, self.retries, self.poll_s)
        return _calls.Settings(
            self.timeout_s, self.retries, self.poll_s, self._next_rid, self.max_message_bytes
        )

    def _next_rid(self) -> int:
        return next(self._rids)
