"""The broker state machine: routes requests from clients to ready workers and back.

Rules it keeps (7/MDP and 8/MMI, zbroker's ZBW01 workers, and what the RFCs
leave to the broker):
  1. Work is pushed only within a worker's credit: one request for a stock
     MDP worker, the declared credit for a ZBW01 worker. Among the workers
     with spare credit, the one that has waited longest goes first (fair
     rotation).
  2. A request lives in exactly one place: a service queue, or one worker.
     When the broker takes it back (the worker died, broke the protocol, or
     did not acknowledge in time) it goes to the *front* of its queue, and its
     next delivery carries a higher attempt number.
  3. Results are fenced: a REPLY, DONE, FAIL or PROGRESS about an attempt the
     worker no longer holds is refused, so a client never gets two replies.
  4. Anything from a worker the broker does not know, or a valid but
     unexpected command, is answered with DISCONNECT; the worker then
     re-registers (as after a broker restart).
  5. Malformed input is dropped and counted; it never raises out of `receive`.
     A ZBC01 call the broker refuses gets an ERROR its sender can read.
Durable tasks (ZBC01 clients, the journal) follow the rules in `core.durable`.

It never touches a socket or reads the clock: frames and `now` come in as
arguments, frames to send go out through `outbox`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from zbroker.core.durable import DurableTasks
from zbroker.core.model import (
    Request,
    Service,
    ServiceFigures,
    Stats,
    Worker,
    WorkerDialect,
)
from zbroker.core.settings import CoreSettings
from zbroker.journal.base import Journal
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.errors import ProtocolError

log = logging.getLogger("zbroker.core")

_MDPC01 = mdp.MDPC01
_MDPW01 = mdp.MDPW01
_ZBW01 = ext.ZBW01
_ZBC01 = zbc.ZBC01
_EMPTY = mdp.EMPTY
_MDP_REQUEST = mdp.REQUEST
_MDP_HEARTBEAT = mdp.HEARTBEAT
_MDP_DISCONNECT = mdp.DISCONNECT
_ZBW_TASK = ext.TASK
_ZBW_HEARTBEAT = ext.HEARTBEAT
_ZBW_DISCONNECT = ext.DISCONNECT
_MDP = WorkerDialect.MDP
_ZBW = WorkerDialect.ZBW


def _hex(identity: bytes) -> str:
    return identity.hex()


def _name(service: bytes) -> str:
    """A service name for the log: whole when short, else cut (a peer's name may be
    megabytes long, and every log line would carry it)."""
    if len(service) > _NAME_SHOWN:
        return f"{service[:_NAME_SHOWN].decode(errors='replace')}... ({len(service)} bytes)"
    return service.decode(errors="replace")


_NAME_SHOWN = 200


class Broker(DurableTasks):
    """Sans-IO broker core.

    `journal` holds durable tasks (None: ZBC01 calls are refused); the core
    writes to it but never commits: the caller commits once per pass, *before*
    sending the outbox. `now` is a monotonic clock; `now + epoch_offset` is
    the wall-clock time (seconds since the epoch) written into task records.

    Feed it with `receive(frames, now)` for every message read from the ROUTER
    socket (frames[0] is the routing id), or `receive_many(messages, now)` for all
    the messages of one pass (the same, except that deliveries are decided once,
    after the last message: requests that arrive together leave together, as one
    TASKS per worker that takes them), `tick(now)` whenever `now >=
    next_tick_at`, and `undeliverable(frames, now)` for every outgoing message
    the socket refused. After each call, send and clear `outbox`: each entry is
    a complete multipart message whose first frame is the destination routing id.
    """

    def __init__(
        self,
        settings: CoreSettings,
        now: float,
        journal: Journal | None = None,
        epoch_offset: float = 0.0,
    ) -> None:
        self.settings = settings
        self.services: dict[bytes, Service] = {}
        # The figures of services whose idle Service object was let go: their totals
        # since the start carry on when the service comes back (counters never fall).
        self.kept_figures: dict[bytes, ServiceFigures] = {}
        self.workers: dict[bytes, Worker] = {}
        self.outbox: list[list[bytes]] = []
        self.stats = Stats()
        self.next_tick_at = now + settings.tick_interval_s
        self._next_request_id = 1
        self._worker_expiry_s = settings.worker_expiry_s
        self._heartbeat_interval_s = settings.heartbeat_interval_s
        self._debug = log.isEnabledFor(logging.DEBUG)
        # Inside _one_dispatch: the services to dispatch once, when it ends.
        self._deferred: dict[bytes, Service] | None = None
        self._init_durable(journal, now, epoch_offset)

    # ------------------------------------------------------------ inputs

    def receive(self, frames: list[bytes], now: float) -> None:
        """One message from the ROUTER socket: [routing id, empty, header, ...]."""
        n = len(frames)
        if n < 4:
            self._malformed("missing_frames", frames)
            return
        if n > self.settings.max_frames:
            self._too_large("too_many_frames", frames)
            return
        if sum(map(len, frames)) > self.settings.max_message_bytes:
            self._too_large("oversized", frames)
            return
        header = frames[2]
        try:
            if header == _ZBC01:
                try:
                    call = zbc.decode_client(frames[1:])
                except zbc.CallError as exc:
                    self._refuse(frames[0], exc.rid, exc.code, exc.message)
                    return
                self._on_zbc(frames[0], call, now)
            elif header == _ZBW01:
                self._on_zbw(frames[0], ext.decode_worker(frames[1:]), now)
            elif header == _MDPC01:
                self._on_client(frames[0], mdp.decode_client(frames[1:]), now)
            elif header == _MDPW01:
                self._on_mdp_worker(frames[0], mdp.decode_worker(frames[1:]), now)
            else:
                self._malformed("bad_header", frames)
        except ProtocolError as exc:
            self._malformed(exc.reason, frames)

    def receive_many(self, messages: list[list[bytes]], now: float) -> None:
        """`receive` each message, then dispatch every service they gave work or
        credit to, once. Deferring the dispatch to the end of the pass changes no
        outcome (nothing is sent before the pass ends anyway), only how the
        deliveries are grouped into messages."""
        with self._one_dispatch(now):
            receive = self.receive
            for frames in messages:
                receive(frames, now)

    @contextmanager
    def _one_dispatch(self, now: float) -> Iterator[None]:
        """Defer every dispatch inside the block to its end, one per service (inside
        another such block: to the end of that one). Not on an exception."""
        if self._deferred is not None:
            yield
            return
        deferred: dict[bytes, Service] = {}
        self._deferred = deferred
        try:
            yield
        finally:
            self._deferred = None
        for service in deferred.values():
            self._deliver(service, now)

    def tick(self, now: float) -> None:
        """Timers: worker expiry, heartbeats, acknowledgement deadlines, request expiry."""
        self.next_tick_at = now + self.settings.tick_interval_s
        interval = self._heartbeat_interval_s
        for worker in list(self.workers.values()):
            if worker.expires_at <= now:
                self.stats.workers_expired += 1
                log.info(
                    "worker %s (%s) expired: silent for %.1fs",
                    _hex(worker.identity),
                    _name(worker.service.name),
                    self._worker_expiry_s,
                )
                self._remove_worker(worker, now, "expired")
                continue
            if worker.heartbeat_at <= now:
                worker.heartbeat_at = now + interval
                if worker.dialect is _MDP:
                    self.outbox.append([worker.identity, _EMPTY, _MDPW01, _MDP_HEARTBEAT])
                else:
                    self.outbox.append([worker.identity, _EMPTY, _ZBW01, _ZBW_HEARTBEAT])
            if worker.tasks:
                self._check_deadlines(worker, now)
                if worker.identity not in self.workers:
                    continue  # an MDP worker let go for overrunning a task's timeout
            if worker.dialect is _ZBW and worker.tasks:
                self._take_back_unacked(worker, now)
        self._durable_tick(now)
        expiry = self.settings.request_expiry_s
        for name, service in list(self.services.items()):
            queue = service.queue
            # Requeued requests go to the front and are older, so the front is the oldest.
            while queue and queue[0].enqueued_at + expiry <= now:
                request = queue.popleft()
                self.stats.expired += 1
                log.info(
                    "request #%d for %s expired after %.1fs in queue",
                    request.id,
                    _name(name),
                    expiry,
                )
            if (
                not queue
                and not service.workers
                and not service.waiting_count
                and not service.paused
                and service.limit is None
            ):
                del self.services[name]
                if service.figures.counted:
                    self.kept_figures[name] = service.figures

    def undeliverable(self, frames: list[bytes], now: float) -> None:
        """The socket refused `frames` (peer gone, or its pipe full)."""
        identity = frames[0]
        header = frames[2] if len(frames) > 2 else b""
        if header in (_MDPW01, _ZBW01):
            worker = self.workers.get(identity)
            if worker is not None:
                self.stats.workers_unreachable += 1
                log.info("worker %s unreachable: connection gone", _hex(identity))
                self._remove_worker(worker, now, "unreachable")
        elif header == _MDPC01:
            self.stats.replies_undeliverable += 1
            if self._debug:
                log.debug("reply to client %s undeliverable: client gone", _hex(identity))

    # ------------------------------------------------------------ clients

    def _on_client(self, identity: bytes, msg: mdp.ClientRequest, now: float) -> None:
        name = msg.service
        if name.startswith(mdp.MMI_PREFIX):
            self._on_mmi(identity, msg, now)
            return
        service = self.services.get(name)
        if service is None:
            service = self._service(name)
        if len(service.queue) >= self.settings.max_queued_per_service and self._deferred:
            # A deferred dispatch would have made room by now: make it.
            self._deferred.pop(name, None)
            self._deliver(service, now)
        if len(service.queue) >= self.settings.max_queued_per_service:
            self.stats.refused_queue_full += 1
            log.warning("queue for %s full: request refused", _name(name))
            return
        request = Request(self._next_request_id, identity, name, msg.body, now)
        self._next_request_id += 1
        self.stats.requests += 1
        if self._debug:
            log.debug("request #%d from client %s for %s", request.id, _hex(identity), _name(name))
        service.queue.append(request)
        if service.ready:
            self._dispatch(service, now)

    def _on_mmi(self, identity: bytes, msg: mdp.ClientRequest, now: float) -> None:
        self.stats.mmi_requests += 1
        if msg.service == mdp.MMI_SERVICE:
            service = self.services.get(msg.body[0]) if msg.body else None
            alive = service is not None and any(
                w.expires_at > now for w in service.workers.values()
            )
            code = mdp.MMI_FOUND if alive else mdp.MMI_NOT_FOUND
        else:
            code = mdp.MMI_NOT_IMPLEMENTED
        self.outbox.append([identity, _EMPTY, _MDPC01, msg.service, code])

    # ------------------------------------------------------- MDP workers

    def _on_mdp_worker(self, identity: bytes, msg: mdp.WorkerMessage, now: float) -> None:
        worker = self.workers.get(identity)
        if worker is not None and worker.dialect is not _MDP:
            self._kick(worker, now, "MDPW01 command from a ZBW01 worker")
            return
        kind = type(msg)
        if kind is mdp.WorkerReply:
            assert isinstance(msg, mdp.WorkerReply)
            if worker is None:
                # Typically a worker we declared dead answering late: its request
                # has been requeued, so this reply must not reach the client.
                self.stats.late_replies_dropped += 1
                self._disconnect_mdp(identity, "REPLY from unknown worker")
                return
            request = next(iter(worker.tasks.values()), None)
            if request is None or msg.client != request.client:
                self._kick(worker, now, "REPLY without a matching request")
                return
            worker.expires_at = now + self._worker_expiry_s
            self._complete(worker, request, msg.body, now)
        elif kind is mdp.WorkerHeartbeat:
            if worker is None:
                self._disconnect_mdp(identity, "HEARTBEAT from unknown worker")
            else:
                worker.expires_at = now + self._worker_expiry_s
                if self.event_prefixes:
                    self._ping(worker)
        elif kind is mdp.WorkerReady:
            assert isinstance(msg, mdp.WorkerReady)
            if worker is not None:
                self._kick(worker, now, "second READY")
            elif not msg.service or msg.service.startswith(mdp.MMI_PREFIX):
                self._disconnect_mdp(identity, f"READY for reserved name {msg.service!r}")
            else:
                self._register(identity, msg.service, now, _MDP, 1, ())
        elif worker is not None:  # DISCONNECT
            self.stats.workers_disconnected += 1
            log.info("worker %s disconnected", _hex(identity))
            self._remove_worker(worker, now, "disconnected")

    # ----------------------------------------------------- ZBW01 workers

    def _on_zbw(self, identity: bytes, msg: ext.WorkerMessage, now: float) -> None:
        worker = self.workers.get(identity)
        kind = type(msg)
        if worker is not None and worker.dialect is not _ZBW:
            self._kick(worker, now, "ZBW01 command from an MDP worker")
            return
        if worker is None:
            if kind is ext.Ready:
                assert isinstance(msg, ext.Ready)
                name = msg.service.encode()
                if name.startswith(mdp.MMI_PREFIX):
                    self._disconnect_zbw(identity, f"service name {_name(name)!r} is reserved")
                else:
                    self._register(identity, name, now, _ZBW, msg.credit, msg.tags, msg.batch)
            elif kind is not ext.Disconnect:
                if kind is ext.Done:
                    self.stats.late_replies_dropped += 1
                self._disconnect_zbw(identity, "unknown worker: send READY")
            return
        worker.expires_at = now + self._worker_expiry_s
        if kind is ext.Done:
            assert isinstance(msg, ext.Done)
            request = self._fenced(worker, msg.id, msg.attempt)
            if request is not None:
                self._complete(worker, request, msg.result, now)
        elif kind is ext.Dones:
            assert isinstance(msg, ext.Dones)
            # Free all the credit first, then refill it with one dispatch (one TASKS).
            with self._one_dispatch(now):
                for done in msg.items:
                    request = self._fenced(worker, done.id, done.attempt)
                    if request is not None:
                        self._complete(worker, request, done.result, now)
        elif kind is ext.Ack:
            assert isinstance(msg, ext.Ack)
            for task_id, attempt in msg.tasks:
                request = self._fenced(worker, task_id, attempt)
                if request is not None:
                    request.ack_by = 0.0
                    if self._debug:
                        log.debug(
                            "ack %s attempt %d (%s) from worker %s",
                            task_id,
                            attempt,
                            _name(worker.service.name),
                            _hex(identity),
                        )
        elif kind is ext.Heartbeat:
            assert isinstance(msg, ext.Heartbeat)
            if msg.metrics:
                worker.metrics = msg.metrics
            elif not msg.metrics_ok:
                self.stats.bad_metrics += 1
            if self.event_prefixes:
                self._ping(worker)
        elif kind is ext.Progress:
            assert isinstance(msg, ext.Progress)
            request = self._fenced(worker, msg.id, msg.attempt)
            if request is not None:
                request.ack_by = 0.0  # progress proves the worker has the task
                if request.task is not None:
                    self._record_progress(request, msg.data, now)
                if request.task is not None and self.event_prefixes:
                    self._emit(
                        "task.progress." + request.task.service,
                        {"id": msg.id, "attempt": msg.attempt, "data": list(msg.data)},
                    )
        elif kind is ext.Fail:
            assert isinstance(msg, ext.Fail)
            request = self._fenced(worker, msg.id, msg.attempt)
            if request is not None:
                self._on_fail(worker, request, msg, now)
        elif kind is ext.Ready:
            self._kick(worker, now, "second READY")
        else:  # DISCONNECT
            self.stats.workers_disconnected += 1
            log.info("worker %s disconnected", _hex(identity))
            self._remove_worker(worker, now, "disconnected")

    def _fenced(self, worker: Worker, task_id: str, attempt: int) -> Request | None:
        """The request this worker holds under (task_id, attempt), else None (refused)."""
        request = worker.tasks.get(task_id)
        if request is None or request.attempt != attempt:
            self.stats.stale_refused += 1
            if self._debug:
                log.debug(
                    "refused stale report for %s attempt %d from worker %s",
                    task_id,
                    attempt,
                    _hex(worker.identity),
                )
            return None
        return request

    def _on_fail(self, worker: Worker, request: Request, msg: ext.Fail, now: float) -> None:
        self.stats.failures += 1
        self._release(worker, request)
        if request.task is not None:
            reason = msg.reason or "failed"
            self._take_back(request, reason, now, msg.delay_s, final=not msg.retry)
            self._dispatch(worker.service, now)
            return
        self._retry_request(worker.service, request, msg.reason, retry=msg.retry)
        self._dispatch(worker.service, now)

    def _retry_request(self, service: Service, request: Request, why: str, retry: bool) -> None:
        """An MDP-origin request whose attempt failed: back to the front of its queue,
        unless it was not to be retried or has had request_max_attempts already."""
        if retry and request.attempt < self.settings.request_max_attempts:
            log.info(
                "request %s failed on attempt %d (%s): retrying", request.tid, request.attempt, why
            )
            request.ack_by = 0.0
            service.queue.appendleft(request)
            self.stats.requeued += 1
            return
        # An MDP client has no way to hear about a failure: it will time out.
        self.stats.failed_permanently += 1
        log.warning(
            "request %s for %s failed for good on attempt %d: %s",
            request.tid,
            _name(request.service),
            request.attempt,
            why,
        )

    def _take_back_unacked(self, worker: Worker, now: float) -> None:
        late = [r for r in worker.tasks.values() if r.ack_by and r.ack_by <= now]
        if not late:
            return
        service = worker.service
        for request in reversed(late):
            self.stats.ack_timeouts += 1
            log.info(
                "request %s attempt %d not acknowledged by worker %s: taken back",
                request.tid,
                request.attempt,
                _hex(worker.identity),
            )
            self.outbox.append([worker.identity, *ext.cancel(request.tid, request.attempt)])
            self._release(worker, request)
            request.ack_by = 0.0
            if request.task is not None:
                self.stats.requeued += 1
                self._take_back(request, "not acknowledged in time", now, 0.0)
            else:
                # Counted as an attempt, as a FAIL would be: a worker that never
                # acknowledges cannot take the same request forever.
                self._retry_request(service, request, "not acknowledged in time", retry=True)
        self._dispatch(service, now)

    # ------------------------------------------------------------ workers

    def _register(
        self,
        identity: bytes,
        name: bytes,
        now: float,
        dialect: WorkerDialect,
        credit: int,
        tags: tuple[str, ...],
        batch: bool = False,
    ) -> None:
        service = self._service(name)
        worker = Worker(identity, service, now, self.settings, dialect, credit, tags)
        worker.batch = batch
        self.workers[identity] = worker
        service.workers[identity] = worker
        service.ready[identity] = worker
        self.stats.workers_registered += 1
        if self.event_prefixes:
            self._emit(
                "worker.ready",
                {
                    "worker": identity.hex(),
                    "service": _name(name),
                    "dialect": dialect.value,
                    "credit": credit,
                    "tags": list(tags),
                },
            )
        log.info(
            "worker %s ready for %s (%s, credit %d)",
            _hex(identity),
            _name(name),
            dialect.value,
            credit,
        )
        self._dispatch(service, now)
        if not worker.tasks:
            # Greet at once, so the worker knows it is registered without waiting a
            # whole heartbeat interval (a delivered task says the same).
            worker.heartbeat_at = now + self._heartbeat_interval_s
            if dialect is _MDP:
                self.outbox.append([identity, _EMPTY, _MDPW01, _MDP_HEARTBEAT])
            else:
                self.outbox.append([identity, _EMPTY, _ZBW01, _ZBW_HEARTBEAT])

    def _ping(self, worker: Worker) -> None:
        self._emit(
            "heartbeat.ping",
            {
                "worker": worker.identity.hex(),
                "service": _name(worker.service.name),
                "tasks": len(worker.tasks),
                "credit": worker.credit,
                "metrics": worker.metrics,
            },
        )

    def _service(self, name: bytes) -> Service:
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(name)
            kept = self.kept_figures.pop(name, None)
            if kept is not None:
                service.figures = kept
        return service

    def _release(self, worker: Worker, request: Request) -> None:
        """The worker no longer holds `request`; it has credit again."""
        del worker.tasks[request.tid]
        if request.task is not None:
            del self._holders[request.tid]
        if worker.identity not in worker.service.ready and not worker.draining:
            worker.service.ready[worker.identity] = worker

    def _complete(
        self, worker: Worker, request: Request, body: tuple[bytes, ...], now: float
    ) -> None:
        self._release(worker, request)
        service = worker.service
        # Hand out the next request before forwarding the reply: a worker's round
        # trip through the broker is what bounds throughput.
        if service.queue or service.ready_count:
            self._dispatch(service, now)
        if request.task is not None:
            self._task_done(request, body, now)
            return
        self.stats.replies += 1
        self.outbox.append([request.client, _EMPTY, _MDPC01, request.service, *body])
        if self._debug:
            log.debug(
                "reply %s from worker %s to client %s",
                request.tid,
                _hex(worker.identity),
                _hex(request.client),
            )

    def _remove_worker(self, worker: Worker, now: float, why: str) -> None:
        """Forget the worker; the requests it held go back to the front of the queue."""
        identity = worker.identity
        service = worker.service
        if self.event_prefixes:
            self._emit(
                "worker.down",
                {"worker": identity.hex(), "service": _name(service.name), "reason": why},
            )
        del self.workers[identity]
        del service.workers[identity]
        service.ready.pop(identity, None)
        if worker.tasks:
            held = list(worker.tasks.values())
            worker.tasks.clear()
            for request in held:
                if request.task is not None:
                    del self._holders[request.tid]
            requests = 0
            for request in reversed(held):
                request.ack_by = 0.0
                if request.task is not None:
                    self._take_back(request, "the worker holding it is gone", now, 0.0)
                else:
                    service.queue.appendleft(request)
                    requests += 1
            # Durable tasks are counted as retried by _take_back; `requeued` is for
            # MDP requests only, as everywhere else.
            self.stats.requeued += requests
            log.info(
                "worker %s is gone: %d MDP request(s) requeued, %d task(s) taken back",
                _hex(worker.identity),
                requests,
                len(held) - requests,
            )
            self._dispatch(service, now)

    def _kick(self, worker: Worker, now: float, why: str) -> None:
        if worker.dialect is _MDP:
            self._disconnect_mdp(worker.identity, why)
        else:
            self._disconnect_zbw(worker.identity, why)
        self.stats.workers_disconnected += 1
        self._remove_worker(worker, now, f"protocol: {why}")

    def _disconnect_mdp(self, identity: bytes, why: str) -> None:
        self.stats.disconnects_sent += 1
        log.info("DISCONNECT to %s: %s", _hex(identity), why)
        self.outbox.append([identity, _EMPTY, _MDPW01, _MDP_DISCONNECT])

    def _disconnect_zbw(self, identity: bytes, why: str) -> None:
        self.stats.disconnects_sent += 1
        log.info("DISCONNECT to %s: %s", _hex(identity), why)
        self.outbox.append([identity, *ext.disconnect(why)])

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, service: Service, now: float) -> None:
        """Deliver what `service` has to its ready workers: now, or at the end of the
        enclosing _one_dispatch block (a pass of receive_many, a DONES)."""
        deferred = self._deferred
        if deferred is None:
            self._deliver(service, now)
        else:
            deferred[service.name] = service

    def _deliver(self, service: Service, now: float) -> None:
        if service.paused:
            return
        queue = service.queue
        ready = service.ready
        ack_by = now + self.settings.ack_timeout_s
        # Workers that take TASKS get everything of this dispatch in one message.
        batches: dict[Worker, list[Request]] | None = None
        room = -1  # deliveries left under the service's concurrency limit; -1: no limit
        if service.limit is not None:
            # None left, too, when the limit was lowered below what is running now.
            room = max(0, service.limit - sum(len(w.tasks) for w in service.workers.values()))
        while ready and (queue or service.ready_count) and room != 0:
            room -= 1
            identity = next(iter(ready))
            if queue:
                worker = ready.pop(identity)
                request = queue.popleft()
                request.attempt += 1
            else:
                # MDP requests first (someone is waiting on a socket), then durable tasks.
                record = self._next_task(service, now)
                if record is None:
                    break
                worker = ready.pop(identity)
                request = self._start_attempt(record, worker, now)
            worker.tasks[request.tid] = request
            # The delivery itself tells the worker we are alive: skip the next heartbeat.
            worker.heartbeat_at = now + self._heartbeat_interval_s
            if worker.dialect is _MDP:
                self.outbox.append(
                    [identity, _EMPTY, _MDPW01, _MDP_REQUEST, request.client, _EMPTY, *request.body]
                )
            else:
                request.ack_by = ack_by
                if worker.batch:
                    if batches is None:
                        batches = {}
                    batches.setdefault(worker, []).append(request)
                else:
                    self.outbox.append([identity, *self._task_frames(request, service)])
                if len(worker.tasks) < worker.credit:
                    ready[identity] = worker  # back of the rotation
            if self._debug:
                log.debug(
                    "deliver %s (%s, attempt %d) to worker %s",
                    request.tid,
                    _name(service.name),
                    request.attempt,
                    _hex(identity),
                )
        if batches:
            for worker, requests in batches.items():
                self._send_tasks(worker, requests, service)

    def _task_frames(self, request: Request, service: Service) -> list[bytes]:
        """TASK for one attempt, without the routing id."""
        task = request.task
        if task is None:
            meta = ext.task_meta(request.tid, request.attempt, _name(service.name))
        else:
            meta = ext.task_meta(
                request.tid, request.attempt, task.service, task.headers, task.timeout_s
            )
        return [_EMPTY, _ZBW01, _ZBW_TASK, meta, *request.body]

    def _send_tasks(self, worker: Worker, requests: list[Request], service: Service) -> None:
        """Several attempts to one worker that accepts TASKS: one message per MAX_BATCH."""
        if len(requests) == 1:
            self.outbox.append([worker.identity, *self._task_frames(requests[0], service)])
            return
        name = _name(service.name)
        for start in range(0, len(requests), ext.MAX_BATCH):
            chunk = requests[start : start + ext.MAX_BATCH]
            entries = []
            frames: list[bytes] = []
            for request in chunk:
                task = request.task
                if task is None:
                    entry = ext.task_entry(request.tid, request.attempt, name, len(request.body))
                else:
                    entry = ext.task_entry(
                        request.tid,
                        request.attempt,
                        task.service,
                        len(request.body),
                        task.headers,
                        task.timeout_s,
                    )
                entries.append(entry)
                frames.extend(request.body)
            self.outbox.append([worker.identity, *ext.tasks_header(entries), *frames])

    # ------------------------------------------------------------ errors

    def _too_large(self, reason: str, frames: list[bytes]) -> None:
        """Over a size cap: dropped and counted; a ZBC01 call also gets an ERROR."""
        self._malformed(reason, frames)
        if len(frames) > 4 and frames[2] == _ZBC01 and len(frames[4]) < 65536:
            try:
                rid = ext.unpack_meta(frames[4]).get("rid")
            except ProtocolError:
                return
            if type(rid) is int:
                limit = (
                    f"{self.settings.max_frames} frames, {self.settings.max_message_bytes} bytes"
                )
                self._refuse(frames[0], rid, zbc.E_TOO_LARGE, f"message over the cap ({limit})")

    def _malformed(self, reason: str, frames: list[bytes]) -> None:
        malformed = self.stats.malformed
        assert malformed is not None
        malformed[reason] += 1
        if self._debug:
            log.debug(
                "dropped malformed message (%s) from %s: %d frames",
                reason,
                _hex(frames[0]) if frames else "?",
                len(frames),
            )
