"""The broker core: a sans-IO state machine made of a few parts, and its one entrance.

`Broker` decodes each message by its protocol header and hands it to the part
that owns what it is about; it never decides anything itself. The parts
(docs/architecture.md, "The core's parts"):

  ServiceDirectory  the services by name, made on first use, let go when idle
  MdpRequests       MDP clients' requests (7/MDP, 18/MDP) and 8/MMI; owner of
                    MdpRequest
  DurableTasks      durable tasks in the journal, the attempts workers hold,
                    and `apply`, the only mover of the task lifecycle table;
                    with ReadyWindows (each service's best ready tasks in
                    memory) and Waiters (calls waiting for a task to end)
  Routing           workers of every dialect, delivery within credit, fences,
                    heartbeats, expiry and time limits
  AdminViews        QUEUES, WORKERS, STATS, STATUS, TASKS, DEAD (read only)
  OperatorControls  PURGE, REDRIVE, DROP, PAUSE, LIMIT, DRAIN
  EventSink         which lifecycle events are wanted, grouped into batches
  Schedules         recurring tasks: their rules in the journal, their firings

Rules it keeps at the door:
  1. Malformed input is dropped and counted; it never raises out of `receive`.
     A ZBC01 call the broker refuses gets an ERROR its sender can read.
  2. A message over the frame or byte cap is dropped unread (a ZBC01 call
     that says who it is gets `too_large`).
It never touches a socket or reads the clock: frames and `now` come in as
arguments, frames to send go out through `outbox`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from zbroker.core.controls import OperatorControls
from zbroker.core.dialects import MDP02
from zbroker.core.guard import Guard, ready_service
from zbroker.core.model import Service, Stats, Worker
from zbroker.core.names import hex_id
from zbroker.core.requests import MdpRequests
from zbroker.core.routing import Routing
from zbroker.core.schedules import Schedules
from zbroker.core.services import ServiceDirectory
from zbroker.core.settings import CoreSettings
from zbroker.core.sink import EventEntry, EventSink, Outputs
from zbroker.core.tasks import DurableTasks
from zbroker.core.views import AdminViews
from zbroker.journal.base import Journal
from zbroker.protocol import ext, limits, mdp, zbc
from zbroker.protocol.access import CHOSEN_ID, FORBIDDEN_PREFIX, Policy, broker_given
from zbroker.protocol.errors import ProtocolError

log = logging.getLogger("zbroker.core")

_MDPC01 = mdp.MDPC01
_MDPW01 = mdp.MDPW01
_ZBW01 = ext.ZBW01
_ZBC01 = zbc.ZBC01
# 18/MDP has no empty frame: its header is the frame right after the routing id.
_MDPC02 = mdp.MDPC02
_MDPW02 = mdp.MDPW02
# The headers of the other protocols, which come after the empty frame.
_FRAME2_HEADERS = frozenset({_MDPC01, _MDPW01, _ZBW01, _ZBC01})


class Broker:
    """Sans-IO broker core.

    `journal` holds durable tasks (None: ZBC01 task calls are refused); the core
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
    a complete multipart message whose first frame is the destination routing id;
    then publish and clear `events`.
    """

    def __init__(
        self,
        settings: CoreSettings,
        now: float,
        journal: Journal | None = None,
        epoch_offset: float = 0.0,
        policy: Policy | None = None,
    ) -> None:
        self.settings = settings
        self.stats = Stats()
        # Authenticated brokers only: every message is checked against its sender.
        self.guard: Guard | None = None
        # What the runtime counts of authentication (handshakes admitted, and refused
        # by reason; the event bus's refusals), for STATS: set by the runtime.
        self.runtime_figures: Callable[[], dict[str, Any]] | None = None
        # What the running broker is (version, compiled or pure-Python core), for
        # STATS `build`: set by the runtime, which knows its process.
        self.build: dict[str, Any] = {}
        self._out = Outputs()
        self.sink = EventSink(self._out)
        self.directory = ServiceDirectory(settings.max_departed_services)
        self.directory.now = now
        self.requests = MdpRequests(settings, self.stats, self._out, self.directory)
        self.tasks = DurableTasks(
            settings, self.stats, self._out, self.sink, self.directory, journal, epoch_offset
        )
        self.routing = Routing(
            settings, self.stats, self._out, self.sink, self.directory, self.requests, self.tasks
        )
        self.requests.connect(self.routing)
        self.tasks.connect(self.routing)
        self.views = AdminViews(
            settings, self.stats, self.directory, self.routing.workers, self.tasks, now
        )
        self.controls = OperatorControls(self._out, self.directory, self.routing, self.tasks)
        self.schedules = Schedules(settings, self.stats, self._out, self.sink, self.tasks)
        if policy is not None:
            self.guard = Guard(
                policy, self.stats, self.directory, settings.max_services_per_principal
            )
        self._tick_at = now + settings.tick_interval_s
        self._calls = self._call_table()
        if journal is not None:
            self.tasks.recover(now)
            self.schedules.load(now)
            if policy is not None:
                self.tasks.count_owners()

    # ------------------------------------------------- what the runtime reads

    @property
    def outbox(self) -> list[list[bytes]]:
        """Messages to send after this pass's commit, in order."""
        return self._out.outbox

    @outbox.setter
    def outbox(self, messages: list[list[bytes]]) -> None:
        self._out.outbox = messages

    @property
    def events(self) -> list[EventEntry]:
        """Lifecycle events to publish after this pass's commit (core/sink.py)."""
        return self._out.events

    @events.setter
    def events(self, entries: list[EventEntry]) -> None:
        self._out.events = entries

    @property
    def next_tick_at(self) -> float:
        """When `tick` must run next (monotonic)."""
        return min(self._tick_at, self.tasks.wake_at, self.routing.wake_at, self.schedules.wake_at)

    @property
    def services(self) -> dict[bytes, Service]:
        return self.directory.services

    @property
    def workers(self) -> dict[bytes, Worker]:
        return self.routing.workers

    @property
    def journal(self) -> Journal | None:
        return self.tasks.journal

    def set_subscriptions(self, prefixes: frozenset[str]) -> None:
        """The topic prefixes subscribers of the bus hold now (the runtime tracks them)."""
        self.sink.set_subscriptions(prefixes)

    # ------------------------------------------------------------ inputs

    def receive(self, frames: list[bytes], now: float, sender: str | None = None) -> None:
        """One message from the ROUTER socket: [routing id, empty, header, ...], or for
        18/MDP [routing id, header, command, ...].
        `sender`: the principal its connection authenticated as (the ZAP User-Id);
        on a broker with a policy, a message is checked against it (core/guard.py)."""
        self.directory.now = now
        n = len(frames)
        if n < 4 and (n < 3 or frames[1] != _MDPW02):
            # Only an MDPW02 HEARTBEAT or DISCONNECT is as short as three frames.
            self._malformed("missing_frames", frames)
            return
        settings = self.settings
        if n > settings.max_frames:
            self._too_large("too_many_frames", frames)
            return
        if sum(map(len, frames)) > settings.max_message_bytes:
            self._too_large("oversized", frames)
            return
        if self.guard is not None:
            self._receive_guarded(frames, now, sender)
            return
        header = frames[2]
        try:
            if header == _ZBC01:
                try:
                    call = zbc.decode_client(frames[1:])
                except zbc.CallError as refused:  # not `exc`: compiled, a name has one type
                    self.tasks.refuse(frames[0], refused.rid, refused.code, refused.message)
                    return
                self._on_call(frames[0], call, now)
            elif header == _ZBW01:
                self.routing.on_zbw_worker(frames[0], ext.decode_worker(frames[1:]), now)
            elif header == _MDPC01:
                self.requests.on_request(frames[0], mdp.decode_client(frames[1:]), now)
            elif header == _MDPW01:
                self.routing.on_mdp_worker(frames[0], mdp.decode_worker(frames[1:]), now)
            else:
                header = frames[1]
                if header == _MDPW02:
                    msg = mdp.decode_worker02(frames[1:])
                    self.routing.on_mdp_worker(frames[0], msg, now, MDP02)
                elif header == _MDPC02:
                    request = mdp.decode_client02(frames[1:])
                    self.requests.on_request(frames[0], request, now, partials=True)
                else:
                    self._malformed("bad_header", frames)
        except ProtocolError as exc:
            self._malformed(exc.reason, frames)

    @staticmethod
    def _header(frames: list[bytes]) -> bytes:
        """The protocol header of a message (with its routing id), wherever its protocol
        puts it; b"" when it has none the broker knows."""
        header = frames[2] if len(frames) > 2 else b""
        if header in _FRAME2_HEADERS:
            return header
        header = frames[1] if len(frames) > 1 else b""
        return header if header in (_MDPC02, _MDPW02) else b""

    def receive_many(
        self, messages: list[list[bytes]], now: float, senders: list[str | None] | None = None
    ) -> None:
        """`receive` each message (from the sender at the same place of `senders`),
        then dispatch every service they gave work or credit to, once (see
        Routing.defer_dispatches)."""
        routing = self.routing
        began = routing.defer_dispatches()
        try:
            receive = self.receive
            if senders is None:
                for frames in messages:
                    receive(frames, now)
            else:
                for frames, sender in zip(messages, senders, strict=True):
                    receive(frames, now, sender)
        except BaseException:
            routing.abandon_dispatches(began)
            raise
        routing.release_dispatches(began, now)

    def tick(self, now: float) -> None:
        """Timers: workers, heartbeats, deadlines, delays, retention, waits, schedules,
        requests.
        Each looks only at what is due (or, for idle services, what may have become
        idle since the last tick): nothing here visits every service."""
        self._tick_at = now + self.settings.tick_interval_s
        self.directory.now = now
        self.tasks.wake_at = math.inf
        self.routing.tick(now)
        self.tasks.tick(now)
        self.schedules.tick(now)
        self.requests.expire_due(now)
        self.directory.let_go_idle()

    def undeliverable(self, frames: list[bytes], now: float) -> None:
        """The socket refused `frames` (peer gone, or its pipe full)."""
        self.directory.now = now
        header = self._header(frames)
        if header in (_MDPW01, _ZBW01, _MDPW02):
            self.routing.gone(frames[0], now)
        elif header in (_MDPC01, _MDPC02):
            self.stats.replies_undeliverable += 1
            log.debug("reply to client %s undeliverable: client gone", hex_id(frames[0]))
        elif header == _ZBC01:
            self.stats.replies_undeliverable += 1
            self.tasks.caller_gone(frames[0], now)

    def connection_closed(self, identity: bytes, now: float) -> None:
        """The connection of caller `identity` closed: its waiting calls end (nobody
        is left to answer)."""
        self.directory.now = now
        self.tasks.caller_gone(identity, now)

    # ------------------------------------------------------- ZBC01 calls

    def _call_table(self) -> dict[type, Callable[[bytes, Any, float], None]]:
        """ZBC01 call type -> the part's handler. Calls that need the journal are
        refused by `_on_call` when there is none."""
        tasks, views, controls = self.tasks, self.views, self.controls

        def answer(view: Callable[[Any, float], dict[str, Any] | None]) -> Any:
            def handle(identity: bytes, msg: Any, now: float) -> None:
                fields = view(msg, now)
                if fields is None:
                    self.tasks.refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no task {msg.id!r}")
                else:
                    self._out.outbox.append([identity, *zbc.reply(msg.rid, fields)])

            return handle

        return {
            zbc.Enqueue: tasks.enqueue,
            zbc.Result: tasks.result,
            zbc.Read: tasks.read,
            zbc.More: tasks.streams.more,
            zbc.Close: tasks.close,
            zbc.Cancel: tasks.cancel,
            zbc.Status: answer(lambda msg, now: views.status(msg)),
            zbc.Queues: answer(views.queues),
            zbc.Workers: answer(lambda msg, now: views.workers(now)),
            zbc.Stats: answer(lambda msg, now: self._stats_view(now)),
            zbc.ListTasks: answer(views.list_tasks),
            zbc.Dead: answer(lambda msg, now: views.dead(msg)),
            zbc.Purge: controls.purge,
            zbc.Drop: controls.drop,
            zbc.Redrive: controls.redrive,
            zbc.Limit: controls.limit,
            zbc.Rate: controls.rate,
            zbc.Pause: controls.pause,
            zbc.Drain: lambda identity, msg, now: controls.drain(identity, msg),
            zbc.Schedule: self.schedules.add,
            zbc.ListSchedules: self.schedules.list,
            zbc.Unschedule: self.schedules.remove,
        }

    def _stats_view(self, now: float) -> dict[str, Any]:
        """STATS: the views' figures, the runtime's `group` (a broker of an
        active/standby group: its lease), and on an authenticated broker what was
        refused by kind (the guard's, and the runtime's: handshakes, the event bus)."""
        view = self.views.stats(now)
        view["build"] = self.build
        if self.tasks.journal is not None:
            view["schedules"] = self.schedules.summary()
        figures = self.runtime_figures() if self.runtime_figures is not None else {}
        if "group" in figures:
            view["group"] = figures["group"]
        guard = self.guard
        if guard is not None:
            refused: dict[str, int] = dict(guard.forbidden)
            for kind, count in figures.get("refused", {}).items():
                refused[kind] = refused.get(kind, 0) + count
            view["auth"] = {"refused": refused, "admitted": figures.get("admitted", 0)}
        return view

    # Calls answered without a journal: inspection and the controls of workers
    # and services (a memory-only broker has queues and workers to show).
    _WITHOUT_JOURNAL = frozenset(
        {zbc.Queues, zbc.Workers, zbc.Stats, zbc.Limit, zbc.Rate, zbc.Pause, zbc.Drain}
    )

    def _on_call(
        self, identity: bytes, msg: zbc.ClientMessage, now: float, owner: str | None = None
    ) -> None:
        kind = type(msg)
        if self.tasks.journal is None and kind not in self._WITHOUT_JOURNAL:
            self.tasks.refuse(identity, msg.rid, zbc.E_UNAVAILABLE, "this broker keeps no tasks")
            return
        if owner is not None:
            # Authenticated: the sender owns what it enqueues, and its waits count.
            if kind is zbc.Enqueue:
                assert isinstance(msg, zbc.Enqueue)
                self.tasks.enqueue(identity, msg, now, owner)
                return
            if kind is zbc.Result:
                assert isinstance(msg, zbc.Result)
                self.tasks.result(identity, msg, now, owner)
                return
            if kind is zbc.Read:
                assert isinstance(msg, zbc.Read)
                self.tasks.read(identity, msg, now, owner)
                return
        self._calls[kind](identity, msg, now)

    # ------------------------------------------------ authenticated brokers

    def _receive_guarded(self, frames: list[bytes], now: float, sender: str | None) -> None:
        """`receive` on a broker with a policy: each message is decoded, then checked
        against its sender's principal (its roles, then its quotas) before its part
        sees it. A task it enqueues is the sender's own; a service it makes exist
        counts against it."""
        header = self._header(frames)
        if not broker_given(frames[0]):
            self._chosen_id(frames, header)
            return
        try:
            if header == _ZBC01:
                self._guarded_call(frames, now, sender)
            elif header in (_MDPC01, _MDPC02):
                self._guarded_request(frames, now, sender, header == _MDPC02)
            elif header in (_ZBW01, _MDPW01, _MDPW02):
                self._guarded_worker(frames, now, sender, header)
            else:
                self._malformed("bad_header", frames)
        except ProtocolError as exc:
            self._malformed(exc.reason, frames)

    def _chosen_id(self, frames: list[bytes], header: bytes) -> None:
        """A message on a connection whose routing id the peer chose: refused, in the
        way its protocol has (a ZBC01 call: `forbidden`; a worker: DISCONNECT)."""
        guard = self.guard
        assert guard is not None
        guard.refused("routing_id")
        identity = frames[0]
        if header == _ZBC01:
            try:
                rid = zbc.decode_client(frames[1:]).rid
            except (zbc.CallError, ProtocolError):
                return
            self.tasks.refuse(identity, rid, zbc.E_FORBIDDEN, CHOSEN_ID)
        elif header in (_ZBW01, _MDPW01, _MDPW02):
            self.routing.turn_away(identity, header, f"{FORBIDDEN_PREFIX} {CHOSEN_ID}")

    def _guarded_call(self, frames: list[bytes], now: float, sender: str | None) -> None:
        """A ZBC01 call: refused with `forbidden` (roles) or `queue_full` (quotas)."""
        guard = self.guard
        assert guard is not None
        identity = frames[0]
        try:
            call = zbc.decode_client(frames[1:])
        except zbc.CallError as exc:
            self.tasks.refuse(identity, exc.rid, exc.code, exc.message)
            return
        who = guard.sender(sender)
        why = guard.call(who, call, self.tasks.journal)
        if why is not None:
            self.tasks.refuse(identity, call.rid, zbc.E_FORBIDDEN, why)
            return
        name = call.service.encode() if type(call) is zbc.Enqueue else None
        if name is not None and (why := guard.creates_too_many(who, name)) is not None:
            self.tasks.refuse(identity, call.rid, zbc.E_QUEUE_FULL, why)
            return
        self._on_call(identity, call, now, sender)
        if name is not None and sender is not None:
            self.directory.credit(name, sender)

    def _guarded_request(
        self, frames: list[bytes], now: float, sender: str | None, partials: bool
    ) -> None:
        """An MDP request, 7/MDP or (`partials`) 18/MDP: dropped and counted when refused
        (MDP has no error reply)."""
        guard = self.guard
        assert guard is not None
        decode = mdp.decode_client02 if partials else mdp.decode_client
        request = decode(frames[1:])
        who = guard.sender(sender)
        if not guard.mdp_request(who, request.service):
            return
        if guard.creates_too_many(who, request.service) is not None:
            return
        self.requests.on_request(frames[0], request, now, partials)
        if sender is not None:
            self.directory.credit(request.service, sender)

    def _guarded_worker(
        self, frames: list[bytes], now: float, sender: str | None, header: bytes
    ) -> None:
        """A worker's message (of protocol `header`): see `_worker_admitted`."""
        identity = frames[0]
        msg: Any
        if header == _ZBW01:
            msg = ext.decode_worker(frames[1:])
        elif header == _MDPW02:
            msg = mdp.decode_worker02(frames[1:])
        else:
            msg = mdp.decode_worker(frames[1:])
        if not self._worker_admitted(identity, msg, sender, header):
            return
        if header == _ZBW01:
            self.routing.on_zbw_worker(identity, msg, now)
        elif header == _MDPW02:
            self.routing.on_mdp_worker(identity, msg, now, MDP02)
        else:
            self.routing.on_mdp_worker(identity, msg, now)
        worker = self.routing.workers.get(identity)
        if worker is not None and worker.principal is None and sender is not None:
            # A READY just registered it: it belongs to the READY's sender.
            worker.principal = sender
            self.directory.credit(worker.service.name, sender)

    def _worker_admitted(
        self, identity: bytes, msg: Any, sender: str | None, header: bytes
    ) -> bool:
        """A worker's message on a broker with a policy: a READY only for a service
        the sender may serve (else DISCONNECT with the reason); any message only
        from the principal that registered the worker (else dropped and counted)."""
        guard = self.guard
        assert guard is not None
        service = ready_service(header, msg)
        if service is not None:
            who = guard.sender(sender)
            why = guard.worker_ready(who, service)
            if why is None and (too_many := guard.creates_too_many(who, service.encode())):
                why = f"{FORBIDDEN_PREFIX} {too_many}"
            if why is not None:
                self.routing.turn_away(identity, header, why)
                return False
        worker = self.routing.workers.get(identity)
        if worker is not None and worker.principal != sender:
            guard.refused("worker")
            return False
        return True

    # ------------------------------------------------------------ errors

    def _too_large(self, reason: str, frames: list[bytes]) -> None:
        """Over a size cap: dropped and counted; a ZBC01 call also gets an ERROR."""
        self._malformed(reason, frames)
        if (
            len(frames) > 4
            and frames[2] == _ZBC01
            and len(frames[4]) < limits.MAX_OVERSIZED_META_BYTES
        ):
            try:
                rid = ext.unpack_meta(frames[4]).get("rid")
            except ProtocolError:
                return
            if type(rid) is int:
                settings = self.settings
                limit = f"{settings.max_frames} frames, {settings.max_message_bytes} bytes"
                self.tasks.refuse(
                    frames[0], rid, zbc.E_TOO_LARGE, f"message over the cap ({limit})"
                )

    def _malformed(self, reason: str, frames: list[bytes]) -> None:
        malformed = self.stats.malformed
        assert malformed is not None
        malformed[reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "dropped malformed message (%s) from %s: %d frames",
                reason,
                hex_id(frames[0]) if frames else "?",
                len(frames),
            )
