"""The broker state machine: routes requests from clients to ready workers and back.

Rules it keeps (7/MDP and 8/MMI, plus what the RFCs leave to the broker):
  1. Work is pushed only to a worker that is ready, one request per MDP worker;
     the worker that has waited longest gets the next request (fair rotation).
  2. A request lives in exactly one place: a service queue, or one worker.
     When that worker dies (heartbeat expiry, DISCONNECT, unreachable, protocol
     violation) the request goes back to the *front* of its queue.
  3. Anything from a worker the broker does not know, or a valid but unexpected
     command, is answered with DISCONNECT; the worker then re-registers. So a
     late REPLY from a worker declared dead is dropped, never delivered twice.
  4. Malformed input is dropped and counted; it never raises out of `receive`.

It never touches a socket or reads the clock: frames and `now` come in as
arguments, frames to send go out through `outbox`.
"""

from __future__ import annotations

import logging

from zbroker.core.model import CoreSettings, Request, Service, Stats, Worker
from zbroker.protocol import mdp
from zbroker.protocol.errors import ProtocolError

log = logging.getLogger("zbroker.core")

_MDPC01 = mdp.MDPC01
_MDPW01 = mdp.MDPW01
_EMPTY = mdp.EMPTY
_REQUEST = mdp.REQUEST
_HEARTBEAT = mdp.HEARTBEAT
_DISCONNECT = mdp.DISCONNECT
_WorkerReply = mdp.WorkerReply
_WorkerHeartbeat = mdp.WorkerHeartbeat
_WorkerReady = mdp.WorkerReady


def _hex(identity: bytes) -> str:
    return identity.hex()


class Broker:
    """Sans-IO Majordomo broker core.

    Feed it with `receive(frames, now)` for every message read from the ROUTER
    socket (frames[0] is the routing id), `tick(now)` whenever `now >=
    next_tick_at`, and `undeliverable(frames, now)` for every outgoing message
    the socket refused. After each call, send and clear `outbox`: each entry is
    a complete multipart message whose first frame is the destination routing id.
    """

    def __init__(self, settings: CoreSettings, now: float) -> None:
        self.settings = settings
        self.services: dict[bytes, Service] = {}
        self.workers: dict[bytes, Worker] = {}
        self.outbox: list[list[bytes]] = []
        self.stats = Stats()
        self.next_tick_at = now + settings.tick_interval_s
        self._next_request_id = 1
        self._worker_expiry_s = settings.worker_expiry_s
        self._heartbeat_interval_s = settings.heartbeat_interval_s
        self._debug = log.isEnabledFor(logging.DEBUG)

    # ------------------------------------------------------------ inputs

    def receive(self, frames: list[bytes], now: float) -> None:
        """One message from the ROUTER socket: [routing id, empty, header, ...]."""
        n = len(frames)
        if n < 4:
            self._malformed("missing_frames", frames)
            return
        if n > self.settings.max_frames:
            self._malformed("too_many_frames", frames)
            return
        if sum(map(len, frames)) > self.settings.max_message_bytes:
            self._malformed("oversized", frames)
            return
        header = frames[2]
        try:
            if header == _MDPW01:
                self._on_worker(frames[0], mdp.decode_worker(frames[1:]), now)
            elif header == _MDPC01:
                self._on_client(frames[0], mdp.decode_client(frames[1:]), now)
            else:
                self._malformed("bad_header", frames)
        except ProtocolError as exc:
            self._malformed(exc.reason, frames)

    def tick(self, now: float) -> None:
        """Timers: worker expiry, heartbeats to workers, expiry of queued requests."""
        self.next_tick_at = now + self.settings.tick_interval_s
        interval = self._heartbeat_interval_s
        for worker in list(self.workers.values()):
            if worker.expires_at <= now:
                self.stats.workers_expired += 1
                log.info(
                    "worker %s (%s) expired: silent for %.1fs",
                    _hex(worker.identity),
                    worker.service.name.decode(errors="replace"),
                    self._worker_expiry_s,
                )
                self._remove_worker(worker, now)
            elif worker.heartbeat_at <= now:
                worker.heartbeat_at = now + interval
                self.outbox.append([worker.identity, _EMPTY, _MDPW01, _HEARTBEAT])
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
                    name.decode(errors="replace"),
                    expiry,
                )
            if not queue and not service.workers:
                del self.services[name]

    def undeliverable(self, frames: list[bytes], now: float) -> None:
        """The socket refused `frames` (peer gone, or its pipe full)."""
        identity = frames[0]
        header = frames[2] if len(frames) > 2 else b""
        if header == _MDPW01:
            worker = self.workers.get(identity)
            if worker is not None:
                self.stats.workers_unreachable += 1
                log.info("worker %s unreachable: connection gone", _hex(identity))
                self._remove_worker(worker, now)
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
            service = self.services[name] = Service(name)
        if len(service.queue) >= self.settings.max_queued_per_service:
            self.stats.refused_queue_full += 1
            log.warning("queue for %s full: request refused", name.decode(errors="replace"))
            return
        request = Request(self._next_request_id, identity, name, msg.body, now)
        self._next_request_id += 1
        self.stats.requests += 1
        if self._debug:
            log.debug(
                "request #%d from client %s for %s",
                request.id,
                _hex(identity),
                name.decode(errors="replace"),
            )
        if service.idle and not service.queue:
            ident = next(iter(service.idle))
            self._deliver(service.idle.pop(ident), request, now)
        else:
            service.queue.append(request)

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

    # ------------------------------------------------------------ workers

    def _on_worker(self, identity: bytes, msg: mdp.WorkerMessage, now: float) -> None:
        worker = self.workers.get(identity)
        kind = type(msg)
        if kind is _WorkerReply:
            assert isinstance(msg, mdp.WorkerReply)
            if worker is None:
                # Typically a worker we declared dead answering late: its request
                # has been requeued, so this reply must not reach the client.
                self.stats.late_replies_dropped += 1
                self._send_disconnect(identity, "REPLY from unknown worker")
                return
            request = worker.request
            if request is None or msg.client != request.client:
                self._kick(worker, now, "REPLY without a matching request")
                return
            worker.expires_at = now + self._worker_expiry_s
            worker.request = None
            self.stats.replies += 1
            # Hand the worker its next request before forwarding the reply: the
            # worker's round trip is what bounds MDP throughput.
            service = worker.service
            if service.queue:
                self._deliver(worker, service.queue.popleft(), now)
            else:
                service.idle[identity] = worker
            self.outbox.append([request.client, _EMPTY, _MDPC01, request.service, *msg.body])
            if self._debug:
                log.debug(
                    "reply #%d from worker %s to client %s",
                    request.id,
                    _hex(identity),
                    _hex(request.client),
                )
        elif kind is _WorkerHeartbeat:
            if worker is None:
                self._send_disconnect(identity, "HEARTBEAT from unknown worker")
            else:
                worker.expires_at = now + self._worker_expiry_s
        elif kind is _WorkerReady:
            assert isinstance(msg, mdp.WorkerReady)
            if worker is not None:
                self._kick(worker, now, "second READY")
            elif not msg.service or msg.service.startswith(mdp.MMI_PREFIX):
                self._send_disconnect(identity, f"READY for reserved name {msg.service!r}")
            else:
                self._register(identity, msg.service, now)
        else:  # DISCONNECT
            if worker is not None:
                self.stats.workers_disconnected += 1
                log.info("worker %s disconnected", _hex(identity))
                self._remove_worker(worker, now)

    def _register(self, identity: bytes, name: bytes, now: float) -> None:
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(name)
        worker = Worker(identity, service, now, self.settings)
        self.workers[identity] = worker
        service.workers[identity] = worker
        service.idle[identity] = worker
        self.stats.workers_registered += 1
        log.info("worker %s ready for %s", _hex(identity), name.decode(errors="replace"))
        self._dispatch(service, now)

    def _remove_worker(self, worker: Worker, now: float) -> None:
        """Forget the worker; its request, if any, goes back to the front of the queue."""
        identity = worker.identity
        service = worker.service
        del self.workers[identity]
        del service.workers[identity]
        service.idle.pop(identity, None)
        request = worker.request
        if request is not None:
            worker.request = None
            service.queue.appendleft(request)
            self.stats.requeued += 1
            log.info("request #%d requeued: worker %s is gone", request.id, _hex(worker.identity))
            self._dispatch(service, now)

    def _kick(self, worker: Worker, now: float, why: str) -> None:
        self._send_disconnect(worker.identity, why)
        self.stats.workers_disconnected += 1
        self._remove_worker(worker, now)

    def _send_disconnect(self, identity: bytes, why: str) -> None:
        self.stats.disconnects_sent += 1
        log.info("DISCONNECT to %s: %s", _hex(identity), why)
        self.outbox.append([identity, _EMPTY, _MDPW01, _DISCONNECT])

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, service: Service, now: float) -> None:
        queue = service.queue
        idle = service.idle
        while queue and idle:
            ident = next(iter(idle))
            self._deliver(idle.pop(ident), queue.popleft(), now)

    def _deliver(self, worker: Worker, request: Request, now: float) -> None:
        worker.request = request
        request.delivered += 1
        # The request itself tells the worker we are alive; skip the next heartbeat.
        worker.heartbeat_at = now + self._heartbeat_interval_s
        self.outbox.append(
            [worker.identity, _EMPTY, _MDPW01, _REQUEST, request.client, _EMPTY, *request.body]
        )
        if self._debug:
            log.debug(
                "deliver #%d (%s, attempt %d) to worker %s",
                request.id,
                request.service.decode(errors="replace"),
                request.delivered,
                _hex(worker.identity),
            )

    # ------------------------------------------------------------ errors

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
