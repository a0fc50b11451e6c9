"""A 7/MDP worker whose socket lives in an I/O thread of its own.

The I/O thread owns the DEALER socket and every timer: it registers (READY),
heartbeats on time even while a handler runs for minutes, receives requests
and sends replies.  The handler runs in the thread that called `Worker.run`.
Requests cross over through a SimpleQueue, replies come back through an
inproc PAIR socket the I/O thread polls with the DEALER, so no zmq socket is
ever touched by two threads.

Each connection to the broker has a generation number.  A reply computed for
a request that arrived on an earlier connection is dropped: the broker has
forgotten that request's worker and requeued it, so answering on the new
connection could only confuse it.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import zmq

from zbroker.client.errors import ClientError, WorkerError, connected_socket
from zbroker.protocol import mdp
from zbroker.protocol.errors import ProtocolError

logger = logging.getLogger(__name__)

# How long a closed DEALER may keep trying to deliver its last messages
# (a final REPLY, DISCONNECT) before they are thrown away.
_GOODBYE_LINGER_MS = 500

# Handler thread -> I/O thread, first frame of each message on the PAIR socket.
_REPLY = b"R"  # generation, client, body...
_FAILED = b"F"  # generation
_STOP = b"S"


@dataclass(frozen=True, slots=True)
class Request:
    """One request handed to a worker's handler."""

    client: bytes  # the requester's address at the broker: opaque, useful in logs
    body: tuple[bytes, ...]

    @property
    def payload(self) -> bytes:
        """The first body frame, or b"" for an empty body."""
        return self.body[0] if self.body else b""


Reply = bytes | Sequence[bytes]
Handler = Callable[[Request], Reply]


@dataclass(slots=True)
class WorkerStats:
    """What a Worker has done since it was created. Counters only ever grow."""

    handled: int = 0  # replies sent to the broker
    failed: int = 0  # handler calls that raised (or returned something that is not frames)
    # Dropped because the connection they belong to was replaced meanwhile; each
    # counter has a single writer thread, so no lock is needed.
    stale_requests_skipped: int = 0  # queued, never handed to the handler
    stale_replies_dropped: int = 0  # computed, never sent
    reconnects: int = 0  # connections opened after the first one
    malformed: int = 0  # messages from the broker that could not be decoded


@dataclass(frozen=True, slots=True)
class _Job:
    request: Request
    generation: int


@dataclass(frozen=True, slots=True)
class _IoFailed:
    error: BaseException


class _StopSignal:
    """Queued by `Worker.stop` to wake the handler thread."""


_STOP_SIGNAL = _StopSignal()

_InboxItem = _Job | _IoFailed | _StopSignal


class Worker:
    """Serves one service: calls `handler` for each request the broker pushes to it.

    `handler(request)` returns the reply body, one `bytes` frame or a sequence
    of them.  If it raises, the exception is logged and the worker
    re-registers on a fresh connection (DISCONNECT, then READY), which makes
    the broker requeue the request for another worker.  MDP has no way to
    report a failure to the client, so a request that makes every worker fail
    ("poison") keeps bouncing, slowed only by a growing re-registration
    delay: handlers should catch what they can answer themselves.

    The worker heartbeats every `heartbeat_interval_s` and also answers each
    HEARTBEAT from the broker, so it keeps pace with a broker configured with a
    shorter interval. The broker is presumed gone after `liveness` intervals
    of silence (keep `heartbeat_interval_s` at or above the broker's interval,
    or a slower broker looks dead); the worker then reconnects, waiting
    `reconnect_delay_s` doubling up to `max_reconnect_delay_s` between attempts.

    A Worker runs once: `run()` in the calling thread, or `start()` in a
    background thread; `stop()` ends either.
    """

    def __init__(
        self,
        endpoint: str,
        service: str | bytes,
        handler: Handler,
        *,
        heartbeat_interval_s: float = 2.5,
        liveness: int = 3,
        reconnect_delay_s: float = 0.1,
        max_reconnect_delay_s: float = 2.5,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        name = service.encode() if isinstance(service, str) else service
        if not name:
            raise ValueError("service name must not be empty")
        if name.startswith(mdp.MMI_PREFIX):
            raise ValueError("services starting with 'mmi.' are answered by the broker itself")
        if not heartbeat_interval_s > 0:
            raise ValueError("heartbeat_interval_s must be positive")
        if liveness < 1:
            raise ValueError("liveness must be at least 1")
        if not 0 < reconnect_delay_s <= max_reconnect_delay_s:
            raise ValueError("need 0 < reconnect_delay_s <= max_reconnect_delay_s")
        self.endpoint = endpoint
        self.service = name
        self.handler = handler
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.reconnect_delay_s = reconnect_delay_s
        self.max_reconnect_delay_s = max_reconnect_delay_s
        self.stats = WorkerStats()
        self._context = context if context is not None else zmq.Context.instance()
        self._inbox: queue.SimpleQueue[_InboxItem] = queue.SimpleQueue()
        self._link: _Link | None = None
        # Plain attributes, not locks: stop() may run inside a signal handler
        # that interrupted the very thread that holds a lock.
        self._started = False
        self._stop_requested = False
        self._run_thread_id: int | None = None
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public

    @property
    def connected(self) -> bool:
        """True while the broker is talking to this worker on its current connection."""
        link = self._link
        return link is not None and link.connected

    def run(self) -> None:
        """Serve requests in the calling thread until `stop()` is called.

        Raises `WorkerError` if the I/O thread fails (it cannot reach the
        endpoint at all, for instance).
        """
        self._claim()
        self._run()

    def start(self) -> Worker:
        """Run the worker in a background (daemon) thread; returns at once."""
        self._claim()
        name = self.service.decode(errors="replace")
        self._thread = threading.Thread(target=self._run, name=f"zbroker-worker-{name}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop serving: a running handler finishes and its reply is sent, then DISCONNECT.

        Returns True once `run()` has returned (or never ran), False if it
        is still running after `timeout_s`.  Safe to call from a signal
        handler; called in the thread that runs `run()` it returns False at
        once and `run()` returns shortly after.
        """
        self._stop_requested = True
        self._inbox.put(_STOP_SIGNAL)  # SimpleQueue.put is reentrant: signal-handler safe
        if not self._started:
            return True
        if threading.get_ident() == self._run_thread_id:
            return False
        return self._finished.wait(timeout_s)

    def __enter__(self) -> Worker:
        """Start in a background thread; leaving the block stops it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------- the handler thread

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError("a Worker runs only once; create a new one")
        self._started = True

    def _run(self) -> None:
        self._run_thread_id = threading.get_ident()
        try:
            if self._stop_requested:
                return
            pair_endpoint = f"inproc://zbroker-worker-{uuid.uuid4().hex}"
            pair = self._context.socket(zmq.PAIR)
            try:
                pair.linger = 0
                pair.bind(pair_endpoint)
                self._serve_with_link(pair, pair_endpoint)
            finally:
                pair.close(linger=0)
        finally:
            self._finished.set()

    def _serve_with_link(self, pair: zmq.Socket[bytes], pair_endpoint: str) -> None:
        link = _Link(self, pair_endpoint)
        self._link = link
        name = self.service.decode(errors="replace")
        io_thread = threading.Thread(target=link.run, name=f"zbroker-worker-io-{name}")
        io_thread.daemon = True
        io_thread.start()
        try:
            link.ready.wait()
            self._serve(pair, link)
        finally:
            if not _send_to_io(pair, [_STOP]):
                link.abandoned = True
            io_thread.join(timeout=max(5.0, 2 * self.heartbeat_interval_s))

    def _serve(self, pair: zmq.Socket[bytes], link: _Link) -> None:
        while True:
            item = self._inbox.get()
            if self._stop_requested or isinstance(item, _StopSignal):
                return
            if isinstance(item, _IoFailed):
                if isinstance(item.error, ClientError):
                    raise item.error
                raise WorkerError("the worker's I/O thread failed") from item.error
            if item.generation != link.generation:
                self.stats.stale_requests_skipped += 1
                continue
            self._handle(pair, item)

    def _handle(self, pair: zmq.Socket[bytes], job: _Job) -> None:
        generation = job.generation.to_bytes(8, "big")
        try:
            frames = _reply_frames(self.handler(job.request))
        except Exception:
            self.stats.failed += 1
            logger.exception(
                "handler for service %r failed; re-registering so the broker requeues the request",
                self.service.decode(errors="replace"),
            )
            _send_to_io(pair, [_FAILED, generation])
            return
        _send_to_io(pair, [_REPLY, generation, job.request.client, *frames])


class _Link:
    """The I/O thread of a Worker: owns the DEALER socket and every timer."""

    def __init__(self, worker: Worker, pair_endpoint: str) -> None:
        self._worker = worker
        self._pair_endpoint = pair_endpoint
        self._expiry_s = worker.heartbeat_interval_s * worker.liveness
        self._poller = zmq.Poller()
        self._dealer: zmq.Socket[bytes] | None = None
        self._expires_at = 0.0
        self._heartbeat_at = 0.0
        self._reconnect_at: float | None = None
        self._backoff_s = worker.reconnect_delay_s
        self._failure_delay_s = worker.reconnect_delay_s
        # Read by the handler thread; only this thread writes them.
        self.generation = 0
        self.connected = False
        self.ready = threading.Event()
        self.abandoned = False  # set by the handler thread if it could not send _STOP

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            logger.exception("I/O thread of worker %r failed", self._worker.service)
            self._worker._inbox.put(_IoFailed(exc))
        finally:
            self.connected = False
            self.ready.set()

    def _run(self) -> None:
        pair = self._worker._context.socket(zmq.PAIR)
        try:
            pair.linger = 0
            pair.connect(self._pair_endpoint)
            self.ready.set()
            self._poller.register(pair, zmq.POLLIN)
            self._open()
            while not self.abandoned:
                events = dict(self._poller.poll(self._poll_timeout_ms()))
                if pair in events and not self._drain_pair(pair):
                    return
                if self._dealer is not None and self._dealer in events:
                    self._drain_dealer()
                self._on_timers(time.monotonic())
        finally:
            self._close(disconnect=False)
            pair.close(linger=0)

    # ------------------------------------------------------------ connection

    def _open(self) -> None:
        w = self._worker
        if self.generation:
            w.stats.reconnects += 1
        self.generation += 1
        self._dealer = connected_socket(w._context, zmq.DEALER, w.endpoint)
        self._poller.register(self._dealer, zmq.POLLIN)
        now = time.monotonic()
        self._expires_at = now + self._expiry_s
        self._reconnect_at = None
        self._send(mdp.worker_ready(w.service))
        logger.debug(
            "worker %r: READY sent to %s (connection %d)", w.service, w.endpoint, self.generation
        )

    def _close(self, *, disconnect: bool, linger_ms: int = _GOODBYE_LINGER_MS) -> None:
        dealer = self._dealer
        if dealer is None:
            return
        self.connected = False
        if disconnect:
            self._send(mdp.worker_disconnect())
        self._poller.unregister(dealer)
        dealer.close(linger=linger_ms if disconnect else 0)
        self._dealer = None

    def _reconnect_after(self, delay_s: float) -> None:
        self._reconnect_at = time.monotonic() + delay_s

    def _send(self, frames: list[bytes]) -> None:
        assert self._dealer is not None
        try:
            self._dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            # Only when the broker has been unreachable long enough to fill the
            # pipe; the liveness timer will replace this connection anyway.
            logger.warning(
                "worker %r: send queue to the broker full, message dropped", self._worker.service
            )
            return
        # Any command counts as a heartbeat, and MDP asks peers not to send
        # HEARTBEAT alongside other commands.
        self._heartbeat_at = time.monotonic() + self._worker.heartbeat_interval_s

    # --------------------------------------------------------------- the loop

    def _poll_timeout_ms(self) -> int:
        if self._dealer is not None:
            due = min(self._heartbeat_at, self._expires_at)
        elif self._reconnect_at is not None:
            due = self._reconnect_at
        else:
            due = time.monotonic() + self._worker.heartbeat_interval_s
        return max(0, math.ceil((due - time.monotonic()) * 1000))

    def _drain_pair(self, pair: zmq.Socket[bytes]) -> bool:
        """Act on everything the handler thread sent; False when told to stop."""
        w = self._worker
        while True:
            try:
                message = pair.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            kind = message[0]
            if kind == _STOP:
                # A reply queued just before is on the DEALER already: the
                # lingering close delivers it ahead of DISCONNECT.
                self._close(disconnect=True)
                return False
            current = int.from_bytes(message[1], "big") == self.generation and (
                self._dealer is not None
            )
            if kind == _REPLY:
                if current:
                    # Counted first so that whoever gets the reply also sees the count.
                    w.stats.handled += 1
                    self._send(mdp.worker_reply(message[2], message[3:]))
                    self._failure_delay_s = w.reconnect_delay_s
                else:
                    w.stats.stale_replies_dropped += 1
                    logger.info("worker %r: dropped a reply from an earlier connection", w.service)
            elif kind == _FAILED and current:
                self._close(disconnect=True)
                # Grows while requests keep failing, so a poison request that
                # fails on every worker cannot spin the broker at full speed.
                self._reconnect_after(self._failure_delay_s)
                self._failure_delay_s = min(2 * self._failure_delay_s, w.max_reconnect_delay_s)

    def _drain_dealer(self) -> None:
        w = self._worker
        dealer = self._dealer
        assert dealer is not None
        while True:
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._expires_at = time.monotonic() + self._expiry_s
            try:
                message = mdp.decode_from_broker_to_worker(frames)
            except ProtocolError as exc:
                w.stats.malformed += 1
                logger.warning("worker %r: dropped a malformed message: %s", w.service, exc)
                continue
            if isinstance(message, mdp.BrokerDisconnect):
                logger.info("worker %r: broker sent DISCONNECT, re-registering", w.service)
                self._close(disconnect=False)
                self._reconnect_after(self._next_backoff())
                return
            if not self.connected:
                self.connected = True
                self._backoff_s = w.reconnect_delay_s
            if isinstance(message, mdp.BrokerRequest):
                w._inbox.put(_Job(Request(message.client, message.body), self.generation))
            elif isinstance(message, mdp.BrokerHeartbeat):
                # Answer at the broker's pace, so a broker configured with a shorter
                # interval than this worker's never declares it dead. Any send resets
                # our own timer, so heartbeats do not double up.
                self._send(mdp.worker_heartbeat())

    def _on_timers(self, now: float) -> None:
        if self._dealer is None:
            if self._reconnect_at is not None and now >= self._reconnect_at:
                self._open()
            return
        if now >= self._expires_at:
            logger.warning(
                "worker %r: nothing heard from %s for %.1fs, reconnecting",
                self._worker.service,
                self._worker.endpoint,
                self._expiry_s,
            )
            # The broker is most likely gone: do not let a goodbye linger.
            self._close(disconnect=True, linger_ms=0)
            self._reconnect_after(self._next_backoff())
            return
        if now >= self._heartbeat_at:
            self._send(mdp.worker_heartbeat())

    def _next_backoff(self) -> float:
        delay_s = self._backoff_s
        self._backoff_s = min(2 * delay_s, self._worker.max_reconnect_delay_s)
        return delay_s


def _send_to_io(pair: zmq.Socket[bytes], frames: list[bytes]) -> bool:
    """Hand a message to the I/O thread without ever blocking (it may be gone)."""
    try:
        pair.send_multipart(frames, zmq.NOBLOCK)
    except zmq.ZMQError:
        return False
    return True


def _reply_frames(result: Reply) -> list[bytes]:
    if isinstance(result, bytes):
        return [result]
    if isinstance(result, str) or not isinstance(result, Sequence):
        raise TypeError(
            f"a handler must return bytes or a sequence of bytes, not {type(result).__name__}"
        )
    frames: list[bytes] = []
    for frame in result:
        if not isinstance(frame, bytes):
            raise TypeError(f"reply frames must be bytes, got {type(frame).__name__}")
        frames.append(frame)
    return frames
