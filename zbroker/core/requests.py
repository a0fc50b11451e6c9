"""MDP clients' requests (7/MDP, 18/MDP, 8/MMI): queued in memory, answered, or expired.

Rules it keeps:
  1. A request lives in exactly one place: its service's queue, or one worker.
     Taken back from a worker (gone, broke the protocol) it goes to the *front*
     of its queue; its next delivery carries a higher attempt number.
  2. A request a ZBW01 worker failed, or did not acknowledge in time, runs again
     while it has had fewer than request_max_attempts; then it is dropped and
     counted (an MDP client has no way to hear of a failure: it times out).
  3. A request still queued after request_expiry_s is dropped and counted; a
     full queue refuses new ones. Expiry is a timer by deadline: a heap holds,
     per service with queued requests, when its oldest request expires, so a tick
     looks only at the queues that have something due, never at every service.
  4. An MDPC01 client gets one REPLY. An MDPC02 client (18/MDP) gets its answer as
     it comes: a PARTIAL for each an MDPW02 worker sends and for each chunk of a
     ZBW01 worker's CHUNK, then one FINAL (the FINAL, REPLY or DONE). What an
     MDPC01 client cannot take (PARTIALs, chunks) is dropped and counted.
Requests are never written to the journal: 7/MDP promises no durability.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math

from zbroker.core.model import Delivery, Held, MdpRequest, Service, Stats
from zbroker.core.names import hex_id, shown
from zbroker.core.services import ServiceDirectory
from zbroker.core.settings import CoreSettings
from zbroker.core.sink import Outputs
from zbroker.protocol import mdp

log = logging.getLogger("zbroker.core")

_EMPTY = mdp.EMPTY
_MDPC01 = mdp.MDPC01
_MDPC02 = mdp.MDPC02
_PARTIAL = mdp.C02_PARTIAL
_FINAL = mdp.C02_FINAL


class MdpRequests:
    """MDP clients' requests, from arrival to reply; the owner of every MdpRequest."""

    def __init__(
        self,
        settings: CoreSettings,
        stats: Stats,
        out: Outputs,
        directory: ServiceDirectory,
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._out = out
        self._directory = directory
        self._routing: Delivery | None = None
        self._next_id = 1
        # Bytes of the requests queued in every service (not those at workers).
        self.queued_bytes = 0
        self._debug = log.isEnabledFor(logging.DEBUG)
        # (when, tiebreak, service): when a queue's front request expires. A service
        # has one live entry, the one whose `when` is its `expire_at`; others are stale.
        self._expiry: list[tuple[float, int, Service]] = []
        self._tiebreak = itertools.count()
        # The owner of MDPC02 clients' requests: this part, answering in 18/MDP.
        self._streaming = StreamingAnswers(self)

    def connect(self, routing: Delivery) -> None:
        """The routing that delivers this part's requests (made after it)."""
        self._routing = routing

    def take(self, service: Service) -> MdpRequest:
        """The front request of `service`'s queue, out of it (the caller delivers it)."""
        request = service.queue.popleft()
        self.queued_bytes -= request.size
        return request

    @property
    def issued(self) -> int:
        """Requests numbered so far (ids run from 1)."""
        return self._next_id - 1

    # ------------------------------------------------------------ arrivals

    def on_request(
        self, identity: bytes, msg: mdp.ClientRequest, now: float, partials: bool = False
    ) -> None:
        """A REQUEST from a client (mmi.* names are answered at once): MDPC01, or MDPC02
        when `partials` (its answers then go out in 18/MDP, parts included)."""
        name = msg.service
        if name.startswith(mdp.MMI_PREFIX):
            self._on_mmi(identity, msg, now, partials)
            return
        routing = self._routing
        assert routing is not None
        service = self._directory.get(name)
        cap = self._settings.max_queued_per_service
        size = sum(map(len, msg.body))
        over_bytes = self.queued_bytes + size > self._settings.max_queued_bytes
        if len(service.queue) >= cap or over_bytes:
            # A dispatch deferred to the end of this pass would have made room by now.
            routing.catch_up(service, now)
            over_bytes = self.queued_bytes + size > self._settings.max_queued_bytes
        if len(service.queue) >= cap or over_bytes:
            self._stats.refused_queue_full += 1
            what = "MDP requests in memory at their byte cap" if over_bytes else "queue full"
            log.warning("request for %s refused: %s", shown(name), what)
            return
        owner = self._streaming if partials else self
        request = MdpRequest(owner, self._next_id, identity, name, msg.body, now, size)
        self.queued_bytes += request.size
        self._next_id += 1
        self._stats.requests += 1
        if self._debug:
            log.debug(
                "request #%d from client %s for %s", request.id, hex_id(identity), shown(name)
            )
        service.queue.append(request)
        if len(service.queue) == 1:
            self._schedule(service)
        if service.ready:
            routing.dispatch(service, now)

    def _on_mmi(self, identity: bytes, msg: mdp.ClientRequest, now: float, partials: bool) -> None:
        self._stats.mmi_requests += 1
        if msg.service == mdp.MMI_SERVICE:
            service = self._directory.services.get(msg.body[0]) if msg.body else None
            alive = service is not None and any(
                w.expires_at > now for w in service.workers.values()
            )
            code = mdp.MMI_FOUND if alive else mdp.MMI_NOT_FOUND
        else:
            code = mdp.MMI_NOT_IMPLEMENTED
        if partials:
            self._out.outbox.append([identity, _MDPC02, _FINAL, msg.service, code])
        else:
            self._out.outbox.append([identity, _EMPTY, _MDPC01, msg.service, code])

    def _schedule(self, service: Service) -> None:
        """Look at `service`'s queue when its front request expires, unless a look is
        already due by then."""
        when = service.queue[0].enqueued_at + self._settings.request_expiry_s
        if when < service.expire_at:
            service.expire_at = when
            heapq.heappush(self._expiry, (when, next(self._tiebreak), service))

    @property
    def expiry_timers(self) -> int:
        """Entries of the expiry heap (live and stale)."""
        return len(self._expiry)

    def expire_due(self, now: float) -> None:
        """Expire the requests due by `now`: only the queues whose timer is due."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            when, _, service = heapq.heappop(heap)
            if when != service.expire_at:
                continue  # superseded by an earlier look
            service.expire_at = math.inf
            self.expire(service, now)
            if service.queue:
                self._schedule(service)
            else:
                self._directory.maybe_idle(service)

    def expire(self, service: Service, now: float) -> None:
        """Drop the requests of `service` queued for longer than request_expiry_s."""
        queue = service.queue
        expiry = self._settings.request_expiry_s
        # Requeued requests go to the front and are older, so the front is the oldest.
        while queue and queue[0].enqueued_at + expiry <= now:
            request = queue.popleft()
            self.queued_bytes -= request.size
            self._stats.expired += 1
            log.info(
                "request #%d for %s expired after %.1fs in queue",
                request.id,
                shown(service.name),
                expiry,
            )

    # ------------------------------------------- the end of a worker's hold

    def complete(self, held: Held, body: tuple[bytes, ...], now: float) -> None:
        """The reply goes to the client that asked."""
        self._stats.replies += 1
        self._out.outbox.append([held.client, _EMPTY, _MDPC01, held.service, *body])
        if self._debug:
            log.debug("reply %s to client %s", held.tid, hex_id(held.client))

    def final(self, held: Held, body: tuple[bytes, ...]) -> None:
        """An MDPC02 client's last answer: FINAL (after it, nothing more for it)."""
        self._stats.replies += 1
        self._out.outbox.append([held.client, _MDPC02, _FINAL, held.service, *body])
        if self._debug:
            log.debug("final %s to client %s", held.tid, hex_id(held.client))

    def partial(self, held: Held, body: tuple[bytes, ...], now: float) -> None:
        """An MDPW02 worker's PARTIAL: to an MDPC02 client as one PARTIAL, body frames
        unchanged; an MDPC01 client has no word for it (each frame counted dropped)."""
        if held.owner is self._streaming:
            self._stats.chunks_received += len(body)
            self._out.outbox.append([held.client, _MDPC02, _PARTIAL, held.service, *body])
        else:
            self._stats.chunks_dropped += len(body)

    def partials(self, held: Held, data: tuple[bytes, ...]) -> None:
        """A ZBW01 worker's CHUNK for an MDPC02 client: each chunk is a PARTIAL, at once."""
        self._stats.chunks_received += len(data)
        outbox = self._out.outbox
        client, service = held.client, held.service
        for chunk in data:
            outbox.append([client, _MDPC02, _PARTIAL, service, chunk])

    def fail(self, held: Held, reason: str, delay_s: float | None, retry: bool, now: float) -> None:
        """Back to the front of its queue, unless it was not to be retried or has had
        request_max_attempts already (`delay_s` does not apply: nothing waits here)."""
        assert type(held) is MdpRequest
        if retry and held.attempt < self._settings.request_max_attempts:
            log.info(
                "request %s failed on attempt %d (%s): retrying", held.tid, held.attempt, reason
            )
            held.ack_by = 0.0
            self._requeue(held)
            return
        # An MDP client has no way to hear about a failure: it will time out.
        self._stats.failed_permanently += 1
        log.warning(
            "request %s for %s failed for good on attempt %d: %s",
            held.tid,
            shown(held.service),
            held.attempt,
            reason,
        )

    def not_acknowledged(self, held: Held, now: float) -> None:
        """Counted as an attempt, as a FAIL would be: a worker that never acknowledges
        cannot take the same request forever."""
        self.fail(held, "not acknowledged in time", None, True, now)

    def timed_out(self, held: Held, now: float) -> None:
        """Requests have no time limit of their own (their deadline stays 0)."""
        self.fail(held, "timed out", None, True, now)

    def chunk(self, held: Held, data: tuple[bytes, ...], now: float) -> None:
        """7/MDP clients (MDPC01) have no word for a partial reply: dropped, counted."""
        self._stats.chunks_dropped += len(data)

    def progress(self, held: Held, data: tuple[bytes, ...], now: float) -> None:
        """Nothing to keep: an MDP client cannot be told of progress."""

    def take_back(self, held: Held, reason: str, now: float) -> None:
        """Its worker is gone: to the front of the queue, first to go again."""
        assert type(held) is MdpRequest
        held.ack_by = 0.0
        self._requeue(held)

    def _requeue(self, held: MdpRequest) -> None:
        """To the front of its queue (it is older than every request there)."""
        service = self._directory.get(held.service)
        service.queue.appendleft(held)
        self.queued_bytes += held.size
        self._schedule(service)
        self._stats.requeued += 1


class StreamingAnswers:
    """The AttemptOwner of MDPC02 clients' requests: MdpRequests in all but the answers,
    which 18/MDP frames as PARTIALs (a ZBW01 worker's chunks, one each) then a FINAL
    (the worker's FINAL, REPLY or DONE)."""

    __slots__ = ("_requests",)

    def __init__(self, requests: MdpRequests) -> None:
        self._requests = requests

    def complete(self, held: Held, body: tuple[bytes, ...], now: float) -> None:
        self._requests.final(held, body)

    def chunk(self, held: Held, data: tuple[bytes, ...], now: float) -> None:
        self._requests.partials(held, data)

    def fail(self, held: Held, reason: str, delay_s: float | None, retry: bool, now: float) -> None:
        self._requests.fail(held, reason, delay_s, retry, now)

    def not_acknowledged(self, held: Held, now: float) -> None:
        self._requests.not_acknowledged(held, now)

    def take_back(self, held: Held, reason: str, now: float) -> None:
        self._requests.take_back(held, reason, now)

    def timed_out(self, held: Held, now: float) -> None:
        self._requests.timed_out(held, now)

    def progress(self, held: Held, data: tuple[bytes, ...], now: float) -> None:
        """Nothing to say: 18/MDP has no word for progress either."""
