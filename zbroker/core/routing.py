"""Routing: workers of every dialect, and the delivery of work within their credit.

Rules it keeps (7/MDP, 18/MDP, zbroker's ZBW01, and what the RFCs leave to the broker):
  1. Work is pushed only within a worker's credit: one request for a stock MDP
     worker, the declared credit for a ZBW01 worker. Among the workers with
     spare credit, the one that has waited longest goes first (fair rotation).
     MDP requests go before durable tasks (someone is waiting on a socket).
  2. Results are fenced: a REPLY, FINAL, PARTIAL, DONE, FAIL, PROGRESS or CHUNK
     about an attempt the worker no longer holds is refused, so nothing is
     answered twice.
  3. Whatever ends a worker's hold on some work (an answer, a failure, a
     timeout, the worker's death), the owner of that work decides what follows
     (`MdpRequests` or `DurableTasks`, through `AttemptOwner`); routing only
     frees the credit and refills it.
  4. Anything from a worker the broker does not know, or a valid but
     unexpected command, is answered with DISCONNECT; the worker then
     re-registers (as after a broker restart).
It owns the Worker records and each service's ready rotation; it never writes
the journal.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable
from typing import Any

from zbroker.core.dialects import BY_HEADER, MDP, ZBW, Dialect, ZbwDialect
from zbroker.core.model import Held, MdpRequest, Service, Stats, Worker, WorkerDialect
from zbroker.core.names import hex_id, shown
from zbroker.core.requests import MdpRequests
from zbroker.core.services import ServiceDirectory
from zbroker.core.settings import CoreSettings
from zbroker.core.sink import EventSink, Outputs
from zbroker.core.tasks import DurableTasks
from zbroker.protocol import ext, mdp
from zbroker.protocol.limits import ZBW_MAX_BATCH

log = logging.getLogger("zbroker.core")

# The soonest a service held back by a rate or by placement is dispatched again.
_MIN_WAKE_S = 0.001


class Routing:
    """Workers (MDPW01, MDPW02, ZBW01) and the delivery of requests and tasks to them."""

    def __init__(
        self,
        settings: CoreSettings,
        stats: Stats,
        out: Outputs,
        sink: EventSink,
        directory: ServiceDirectory,
        requests: MdpRequests,
        tasks: DurableTasks,
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._out = out
        self._sink = sink
        self._directory = directory
        self._tasks = tasks
        self._requests = requests
        self.workers: dict[bytes, Worker] = {}
        self._worker_expiry_s = settings.worker_expiry_s
        self._heartbeat_interval_s = settings.heartbeat_interval_s
        self._debug = log.isEnabledFor(logging.DEBUG)
        # Inside a deferral block: the services to dispatch once, when it ends.
        self._deferred: dict[bytes, Service] | None = None
        # The service `_deliver` is delivering now (None: none).
        self._delivering: Service | None = None
        # Services a rate held back, to dispatch again at `wake_at` (the earliest time
        # one of them has a token again).
        self._throttled: dict[bytes, Service] = {}
        self.wake_at = math.inf
        # Keys each worker's alias: unguessable, and the same only within this run.
        self._alias_key = random.Random(settings.seed).getrandbits(128).to_bytes(16, "big")
        self._by_alias: dict[str, Worker] = {}
        # A registered ZBW01 worker's message, by type -> its handler.
        self._zbw_handlers: dict[type, Callable[[Worker, Any, float], None]] = {
            ext.Done: self._zbw_done,
            ext.Dones: self._zbw_dones,
            ext.Ack: self._zbw_ack,
            ext.Heartbeat: self._zbw_heartbeat,
            ext.Progress: self._zbw_progress,
            ext.Chunk: self._zbw_chunk,
            ext.Fail: self._zbw_fail,
            ext.Ready: self._zbw_second_ready,
            ext.Disconnect: self._zbw_disconnect,
            ext.Tags: self._zbw_tags,
        }

    # ------------------------------------------------------------ dispatch

    def defer_dispatches(self) -> bool:
        """Defer every dispatch from here to `release_dispatches`, one per service
        (inside another such block: to the end of that one, and this answers False,
        so the caller releases nothing). Nothing is sent before a pass ends anyway:
        this changes only how deliveries are grouped into messages (requests that
        arrive together leave together, one TASKS per worker that takes them). Two
        calls, not a context manager: this runs once per pass and per DONES, and a
        generator-based `with` costs more than the rest of a small pass."""
        if self._deferred is not None:
            return False
        self._deferred = {}
        return True

    def release_dispatches(self, began: bool, now: float) -> None:
        """End the block `defer_dispatches` began (when `began`): deliver each
        deferred service once."""
        if not began:
            return
        deferred = self._deferred
        self._deferred = None
        if deferred:
            for service in deferred.values():
                self._deliver(service, now)

    def abandon_dispatches(self, began: bool) -> None:
        """End the block without delivering (an exception is on its way up)."""
        if began:
            self._deferred = None

    def dispatch(self, service: Service, now: float) -> None:
        """Deliver what `service` has to its ready workers: now, or at the end of the
        enclosing `defer_dispatches` block. Asked while delivering that very service (a
        task it expired ended others, and made one of its own ready): nothing to do,
        the delivery under way takes what became ready."""
        deferred = self._deferred
        if deferred is None:
            if service is not self._delivering:
                self._deliver(service, now)
        else:
            deferred[service.name] = service

    def catch_up(self, service: Service, now: float) -> None:
        """Make a dispatch of `service` that is deferred to the end of the block now."""
        if self._deferred is not None:
            self._deferred.pop(service.name, None)
            self._deliver(service, now)

    def _deliver(self, service: Service, now: float) -> None:
        if service.paused:
            return
        outer, self._delivering = self._delivering, service
        self._deliver_to_ready(service, now)
        self._delivering = outer

    def _deliver_to_ready(self, service: Service, now: float) -> None:
        queue = service.queue
        ready = service.ready
        tasks = self._tasks
        requests = self._requests
        outbox = self._out.outbox
        ack_by = now + self._settings.ack_timeout_s
        # Workers that take TASKS get everything of this dispatch in one message.
        batches: dict[Worker, list[Held]] | None = None
        # Deliveries left under the service's concurrency limit and rate; -1: no bound.
        room = -1 if service.limit is None and service.rate is None else self._room(service, now)
        start_room = room
        while ready and (queue or service.ready_count) and room != 0:
            identity = next(iter(ready))
            held: Held
            if queue:
                worker = ready.pop(identity)
                held = requests.take(service)
                held.attempt += 1
            elif not (
                service.placing or service.key_limit is not None or service.key_rate is not None
            ):
                record = tasks.next_ready(service, now)
                if record is None:
                    break
                worker = ready.pop(identity)
                held = tasks.start(record, worker, now)
            else:
                # Tasks with placement or flow-control rules: core/placement.py chooses.
                chosen = tasks.next_placed(service, now)
                if chosen is None:
                    break
                record, worker = chosen
                identity = worker.identity
                del ready[identity]
                held = tasks.start(record, worker, now)
            worker.tasks[held.tid] = held
            # The delivery itself tells the worker we are alive: skip the next heartbeat.
            worker.heartbeat_at = now + self._heartbeat_interval_s
            dialect = worker.dialect
            if dialect.acknowledges:
                held.ack_by = ack_by
                if worker.batch:
                    if batches is None:
                        batches = {}
                    batches.setdefault(worker, []).append(held)
                else:
                    outbox.append([identity, *dialect.task(held, shown(service.name))])
                if len(worker.tasks) < worker.credit:
                    ready[identity] = worker  # back of the rotation
            else:
                outbox.append([identity, *dialect.task(held, "")])
            room -= 1  # one delivery made (from -1: stays below 0, no bound)
            if self._debug:
                log.debug(
                    "deliver %s (%s, attempt %d) to worker %s",
                    held.tid,
                    shown(service.name),
                    held.attempt,
                    worker.alias,
                )
        if batches is not None or start_room != -1 or service.placing or service.key_rate:
            self._after_deliveries(service, batches, start_room, room, now)

    def _after_deliveries(
        self,
        service: Service,
        batches: dict[Worker, list[Held]] | None,
        start_room: int,
        room: int,
        now: float,
    ) -> None:
        """What a dispatch ends with: the TASKS messages of the workers that take them,
        and the rates' accounts."""
        if batches:
            name = shown(service.name)
            for worker, held_list in batches.items():
                self._send_tasks(worker, held_list, name)
        if start_room != -1 or service.placing or service.key_rate is not None:
            self._after_rates(service, start_room, room, now)

    def _room(self, service: Service, now: float) -> int:
        """How many deliveries the service's limit and rate allow now (-1: no bound)."""
        room = -1
        if service.limit is not None:
            # None left, too, when the limit was lowered below what is running now.
            room = max(0, service.limit - sum(len(w.tasks) for w in service.workers.values()))
        bucket = service.rate
        if bucket is not None:
            tokens = bucket.available(now)
            room = tokens if room == -1 else min(room, tokens)
        return room

    def _after_rates(self, service: Service, start_room: int, room: int, now: float) -> None:
        """Spend the rate's tokens on what this dispatch delivered, and when a rate (or
        placement's look past the window) held work back, dispatch the service again
        when that is due."""
        bucket = service.rate
        due = math.inf
        if bucket is not None:
            bucket.spend(start_room - room)  # one per delivery made
            work_left = bool(service.queue or service.ready_count) and bool(service.ready)
            if work_left and bucket.available(now) == 0:
                due = bucket.due_at(now)
        if (service.placing or service.key_rate is not None) and (
            service.ready and service.ready_count
        ):
            # Tasks wait while workers have credit: when a key's rate lets one go, or
            # the next look past the window is due (as the choice that ended this
            # dispatch said).
            due = min(due, self._tasks.placement.throttled_until)
        if due < math.inf:
            due = max(due, now + _MIN_WAKE_S)  # never a wake in the past: no busy loop
            self._throttled[service.name] = service
            if due < self.wake_at:
                self.wake_at = due

    def _send_tasks(self, worker: Worker, held_list: list[Held], name: str) -> None:
        """Several deliveries to one worker that accepts TASKS: a message per MAX_BATCH."""
        dialect = worker.dialect
        assert isinstance(dialect, ZbwDialect)
        outbox = self._out.outbox
        if len(held_list) == 1:
            outbox.append([worker.identity, *dialect.task(held_list[0], name)])
            return
        for start in range(0, len(held_list), ZBW_MAX_BATCH):
            chunk = held_list[start : start + ZBW_MAX_BATCH]
            outbox.append([worker.identity, *dialect.tasks(chunk, name)])

    # ------------------------------------------------------- MDP workers

    def on_mdp_worker(
        self, identity: bytes, msg: mdp.WorkerMessage, now: float, dialect: Dialect = MDP
    ) -> None:
        """A message of a Majordomo worker: 7/MDP (`dialect` MDP), or 18/MDP (MDP02),
        whose FINAL comes as a WorkerReply and which alone sends WorkerPartial."""
        worker = self.workers.get(identity)
        if worker is not None and worker.dialect is not dialect:
            self._kick(worker, now, f"{dialect.value} command from a {worker.dialect.value} worker")
            return
        kind = type(msg)
        if kind is mdp.WorkerReply:
            assert isinstance(msg, mdp.WorkerReply)
            if worker is None:
                # Typically a worker we declared dead answering late: its request
                # has been requeued, so this reply must not reach the client.
                self._stats.late_replies_dropped += 1
                self._disconnect(identity, dialect, "REPLY from unknown worker")
                return
            held = next(iter(worker.tasks.values()), None)
            if held is None or msg.client != held.client:
                self._kick(worker, now, "REPLY without a matching request")
                return
            worker.expires_at = now + self._worker_expiry_s
            self._complete(worker, held, msg.body, now)
        elif kind is mdp.WorkerPartial:
            assert isinstance(msg, mdp.WorkerPartial)
            self._mdp_partial(identity, worker, dialect, msg, now)
        elif kind is mdp.WorkerHeartbeat:
            if worker is None:
                self._disconnect(identity, dialect, "HEARTBEAT from unknown worker")
            else:
                worker.expires_at = now + self._worker_expiry_s
                if self._sink.prefixes:
                    self._ping(worker)
        elif kind is mdp.WorkerReady:
            assert isinstance(msg, mdp.WorkerReady)
            if worker is not None:
                self._kick(worker, now, "second READY")
            elif not msg.service or msg.service.startswith(mdp.MMI_PREFIX):
                self._disconnect(identity, dialect, f"READY for reserved name {msg.service!r}")
            else:
                self._register(identity, msg.service, now, dialect, 1, ())
        elif worker is not None:  # DISCONNECT
            self._stats.workers_disconnected += 1
            log.info("worker %s disconnected", worker.alias)
            self.remove(worker, now, "disconnected")

    def _mdp_partial(
        self,
        identity: bytes,
        worker: Worker | None,
        dialect: Dialect,
        msg: mdp.WorkerPartial,
        now: float,
    ) -> None:
        """An MDPW02 PARTIAL: fenced like a FINAL, then part of the answer. For an MDP
        client, relayed whole (MdpRequests.partial); for a durable task, each body
        frame is a chunk of its stream, exactly as the frames of a ZBW01 CHUNK."""
        if worker is None:
            # A worker declared dead still talking: its request went elsewhere.
            self._stats.stale_refused += 1
            self._disconnect(identity, dialect, "PARTIAL from unknown worker")
            return
        held = next(iter(worker.tasks.values()), None)
        if held is None or msg.client != held.client:
            self._kick(worker, now, "PARTIAL without a matching request")
            return
        worker.expires_at = now + self._worker_expiry_s
        if type(held) is MdpRequest:
            self._requests.partial(held, msg.body, now)
        else:
            held.owner.chunk(held, msg.body, now)

    # ----------------------------------------------------- ZBW01 workers

    def on_zbw_worker(self, identity: bytes, msg: ext.WorkerMessage, now: float) -> None:
        worker = self.workers.get(identity)
        if worker is None:
            self._zbw_stranger(identity, msg, now)
        elif worker.dialect is not ZBW:
            self._kick(worker, now, "ZBW01 command from an MDP worker")
        else:
            worker.expires_at = now + self._worker_expiry_s
            self._zbw_handlers[type(msg)](worker, msg, now)

    def _zbw_stranger(self, identity: bytes, msg: ext.WorkerMessage, now: float) -> None:
        """A ZBW01 message from a routing id that is no registered worker."""
        kind = type(msg)
        if kind is ext.Ready:
            assert isinstance(msg, ext.Ready)
            name = msg.service.encode()
            if name.startswith(mdp.MMI_PREFIX):
                self._disconnect(identity, ZBW, f"service name {shown(name)!r} is reserved")
            else:
                self._register(identity, name, now, ZBW, msg.credit, msg.tags, msg.batch)
        elif kind is not ext.Disconnect:
            if kind is ext.Done:
                self._stats.late_replies_dropped += 1
            self._disconnect(identity, ZBW, "unknown worker: send READY")

    def _zbw_done(self, worker: Worker, msg: ext.Done, now: float) -> None:
        held = self._fenced(worker, msg.id, msg.attempt)
        if held is not None:
            self._complete(worker, held, msg.result, now)

    def _zbw_dones(self, worker: Worker, msg: ext.Dones, now: float) -> None:
        # Free all the credit first, then refill it with one dispatch (one TASKS).
        began = self.defer_dispatches()
        try:
            for done in msg.items:
                held = self._fenced(worker, done.id, done.attempt)
                if held is not None:
                    self._complete(worker, held, done.result, now)
        except BaseException:
            self.abandon_dispatches(began)
            raise
        self.release_dispatches(began, now)

    def _zbw_ack(self, worker: Worker, msg: ext.Ack, now: float) -> None:
        for task_id, attempt in msg.tasks:
            held = self._fenced(worker, task_id, attempt)
            if held is not None:
                held.ack_by = 0.0
                if self._debug:
                    log.debug(
                        "ack %s attempt %d (%s) from worker %s",
                        task_id,
                        attempt,
                        shown(worker.service.name),
                        worker.alias,
                    )

    def _zbw_heartbeat(self, worker: Worker, msg: ext.Heartbeat, now: float) -> None:
        if msg.metrics:
            worker.metrics = msg.metrics
        elif not msg.metrics_ok:
            self._stats.bad_metrics += 1
        if self._sink.prefixes:
            self._ping(worker)

    def _zbw_progress(self, worker: Worker, msg: ext.Progress, now: float) -> None:
        held = self._fenced(worker, msg.id, msg.attempt)
        if held is not None:
            held.ack_by = 0.0  # progress proves the worker has the task
            held.owner.progress(held, msg.data, now)

    def _zbw_chunk(self, worker: Worker, msg: ext.Chunk, now: float) -> None:
        held = self._fenced(worker, msg.id, msg.attempt)
        if held is not None:
            held.ack_by = 0.0  # a chunk proves the worker has the task
            held.owner.chunk(held, msg.data, now)

    def _zbw_fail(self, worker: Worker, msg: ext.Fail, now: float) -> None:
        held = self._fenced(worker, msg.id, msg.attempt)
        if held is not None:
            self._stats.failures += 1
            self._release(worker, held)
            held.owner.fail(held, msg.reason or "failed", msg.delay_s, msg.retry, now)
            self.dispatch(worker.service, now)

    def _zbw_tags(self, worker: Worker, msg: ext.Tags, now: float) -> None:
        """TAGS: the worker's tags from now on; tasks that wait for them may go to it."""
        worker.tags = msg.tags
        log.info("worker %s tags now %s", worker.alias, ", ".join(msg.tags) or "none")
        if self._sink.prefixes:
            self._sink.emit(
                "worker.tags",
                {
                    "worker": worker.alias,
                    "service": shown(worker.service.name),
                    "tags": list(msg.tags),
                },
            )
        if worker.identity in worker.service.ready:
            self.dispatch(worker.service, now)

    def _zbw_second_ready(self, worker: Worker, msg: ext.Ready, now: float) -> None:
        self._kick(worker, now, "second READY")

    def _zbw_disconnect(self, worker: Worker, msg: ext.Disconnect, now: float) -> None:
        self._stats.workers_disconnected += 1
        log.info("worker %s disconnected", worker.alias)
        self.remove(worker, now, "disconnected")

    def _fenced(self, worker: Worker, task_id: str, attempt: int) -> Held | None:
        """What this worker holds under (task_id, attempt), else None (refused)."""
        held = worker.tasks.get(task_id)
        if held is None or held.attempt != attempt:
            self._stats.stale_refused += 1
            if self._debug:
                log.debug(
                    "refused stale report for %s attempt %d from worker %s",
                    task_id,
                    attempt,
                    worker.alias,
                )
            return None
        return held

    # ------------------------------------------------------------ workers

    def _register(
        self,
        identity: bytes,
        name: bytes,
        now: float,
        dialect: Dialect,
        credit: int,
        tags: tuple[str, ...],
        batch: bool = False,
    ) -> None:
        service = self._directory.get(name)
        worker = Worker(identity, service, now, self._settings, dialect, credit, tags)
        worker.batch = batch
        worker.alias = self._alias(identity)
        self.workers[identity] = worker
        self._by_alias[worker.alias] = worker
        service.workers[identity] = worker
        service.ready[identity] = worker
        self._stats.workers_registered += 1
        if self._sink.prefixes:
            self._sink.emit(
                "worker.ready",
                {
                    "worker": worker.alias,
                    "service": shown(name),
                    "dialect": dialect.value,
                    "credit": credit,
                    "tags": list(tags),
                },
            )
        log.info(
            "worker %s ready for %s (%s, credit %d)",
            worker.alias,
            shown(name),
            dialect.value,
            credit,
        )
        self.dispatch(service, now)
        if not worker.tasks:
            # Greet at once, so the worker knows it is registered without waiting a
            # whole heartbeat interval (a delivered task says the same).
            worker.heartbeat_at = now + self._heartbeat_interval_s
            self._out.outbox.append([identity, *dialect.heartbeat])

    def _ping(self, worker: Worker) -> None:
        self._sink.emit(
            "heartbeat.ping",
            {
                "worker": worker.alias,
                "service": shown(worker.service.name),
                "tasks": len(worker.tasks),
                "credit": worker.credit,
                "metrics": worker.metrics,
            },
        )

    def _release(self, worker: Worker, held: Held) -> None:
        """The worker no longer holds `held`; it has credit again."""
        del worker.tasks[held.tid]
        if worker.identity not in worker.service.ready and not worker.draining:
            worker.service.ready[worker.identity] = worker

    def _complete(self, worker: Worker, held: Held, body: tuple[bytes, ...], now: float) -> None:
        self._release(worker, held)
        service = worker.service
        # Hand out the next piece of work before answering: a worker's round trip
        # through the broker is what bounds throughput.
        if service.queue or service.ready_count:
            self.dispatch(service, now)
        held.owner.complete(held, body, now)

    def withdraw(
        self, worker: Worker, held: Held, now: float, why: str, tell: bool = False
    ) -> None:
        """Take `held` from its worker without an outcome (its owner already decided):
        a ZBW01 worker gets a CANCEL (saying `why` when `tell`), an MDP worker (7/MDP
        cannot cancel) is let go."""
        self._release(worker, held)
        cancel = worker.dialect.cancel(held, why if tell else None)
        if cancel is None:
            self._kick(worker, now, why)
        else:
            self._out.outbox.append([worker.identity, *cancel])
            self.dispatch(worker.service, now)

    def _alias(self, identity: bytes) -> str:
        """The id operators and peers see for the worker at `identity`: a keyed hash,
        so nothing the broker says reveals a routing id (runtime/routing_ids.py)."""
        return hashlib.blake2b(identity, key=self._alias_key, digest_size=5).hexdigest()

    def find(self, alias: str) -> Worker | None:
        """The worker operators know as `alias` (WORKERS, events, histories)."""
        return self._by_alias.get(alias)

    def drain(self, worker: Worker) -> None:
        """No new work for `worker`; what it holds, it finishes."""
        worker.draining = True
        worker.service.ready.pop(worker.identity, None)

    def remove(self, worker: Worker, now: float, why: str) -> None:
        """Forget the worker; its owners take back what it held (requests to the front
        of their queue, task attempts ended)."""
        identity = worker.identity
        service = worker.service
        if self._sink.prefixes:
            self._sink.emit(
                "worker.down",
                {"worker": worker.alias, "service": shown(service.name), "reason": why},
            )
        del self.workers[identity]
        if self._by_alias.get(worker.alias) is worker:
            del self._by_alias[worker.alias]
        del service.workers[identity]
        service.ready.pop(identity, None)
        if not service.workers:
            self._directory.maybe_idle(service)  # let go at the next tick if idle
        if worker.tasks:
            held_list = list(worker.tasks.values())
            worker.tasks.clear()
            for held in reversed(held_list):  # requests keep their order at the front
                held.ack_by = 0.0
                held.owner.take_back(held, "the worker holding it is gone", now)
            requests = sum(1 for held in held_list if type(held) is MdpRequest)
            log.info(
                "worker %s is gone: %d MDP request(s) requeued, %d task(s) taken back",
                worker.alias,
                requests,
                len(held_list) - requests,
            )
            self.dispatch(service, now)

    def _kick(self, worker: Worker, now: float, why: str) -> None:
        self._disconnect(worker.identity, worker.dialect, why)
        self._stats.workers_disconnected += 1
        self.remove(worker, now, f"protocol: {why}")

    def _disconnect(self, identity: bytes, dialect: WorkerDialect, why: str) -> None:
        self._stats.disconnects_sent += 1
        log.info("DISCONNECT to %s: %s", hex_id(identity), why)
        self._out.outbox.append([identity, *dialect.disconnect(why)])

    def turn_away(self, identity: bytes, header: bytes, why: str) -> None:
        """A worker's message (with protocol `header`) refused before it was read
        (core/guard.py): DISCONNECT in its dialect."""
        self._disconnect(identity, BY_HEADER[header], why)

    def gone(self, identity: bytes, now: float) -> None:
        """A message to worker `identity` could not be sent: its connection is gone."""
        worker = self.workers.get(identity)
        if worker is not None:
            self._stats.workers_unreachable += 1
            log.info("worker %s unreachable: connection gone", worker.alias)
            self.remove(worker, now, "unreachable")

    # ------------------------------------------------------------ timers

    def tick(self, now: float) -> None:
        """Worker expiry, heartbeats, task deadlines and acknowledgement deadlines, and
        the services a rate held back."""
        if self.wake_at <= now:
            throttled, self._throttled = self._throttled, {}
            self.wake_at = math.inf  # else a stale time would make every pass tick
            for service in throttled.values():
                if self._directory.services.get(service.name) is service:
                    self.dispatch(service, now)
        interval = self._heartbeat_interval_s
        outbox = self._out.outbox
        for worker in list(self.workers.values()):
            if worker.expires_at <= now:
                self._stats.workers_expired += 1
                log.info(
                    "worker %s (%s) expired: silent for %.1fs",
                    worker.alias,
                    shown(worker.service.name),
                    self._worker_expiry_s,
                )
                self.remove(worker, now, "expired")
                continue
            if worker.heartbeat_at <= now:
                worker.heartbeat_at = now + interval
                outbox.append([worker.identity, *worker.dialect.heartbeat])
            if worker.tasks:
                self._check_deadlines(worker, now)
                if worker.identity not in self.workers:
                    continue  # an MDP worker let go for overrunning a task's timeout
            if worker.dialect.acknowledges and worker.tasks:
                self._take_back_unacked(worker, now)

    def _check_deadlines(self, worker: Worker, now: float) -> None:
        """Work of `worker` past its time limit fails (and retries or dies)."""
        late = [h for h in worker.tasks.values() if h.deadline and h.deadline <= now]
        for held in late:
            self._stats.tasks_timed_out += 1
            self._release(worker, held)
            cancel = worker.dialect.cancel(held)
            held.owner.timed_out(held, now)
            if cancel is None:
                self._kick(worker, now, f"task {held.tid} timed out")
                return
            self._out.outbox.append([worker.identity, *cancel])
        if late:
            self.dispatch(worker.service, now)

    def _take_back_unacked(self, worker: Worker, now: float) -> None:
        late = [h for h in worker.tasks.values() if h.ack_by and h.ack_by <= now]
        if not late:
            return
        dialect = worker.dialect
        for held in reversed(late):
            self._stats.ack_timeouts += 1
            log.info(
                "request %s attempt %d not acknowledged by worker %s: taken back",
                held.tid,
                held.attempt,
                worker.alias,
            )
            cancel = dialect.cancel(held)
            if cancel is not None:  # only workers that acknowledge get here
                self._out.outbox.append([worker.identity, *cancel])
            self._release(worker, held)
            held.ack_by = 0.0
            held.owner.not_acknowledged(held, now)
        self.dispatch(worker.service, now)
