"""A ZBW01 worker: declared credit, task ids and attempts, ACK, progress, chunks, DONE/FAIL, CANCEL.

Three roles, and only one of them touches zmq:

- The I/O thread owns the DEALER socket and every timer. It registers (READY
  with credit = the handlers free: concurrency less those still running attempts
  of an earlier connection), acknowledges every TASK as soon as it is read
  (one ACK per drain of the socket, so the broker's ACK deadline never bites a
  busy worker), heartbeats on time however long handlers run, and sends what
  the handlers report.
- Handler threads run the handler: `concurrency` threads for a plain function,
  or one thread whose asyncio loop runs up to `concurrency` coroutines for an
  `async def` handler (or async generator). They never touch zmq: reports
  (results, progress, stream chunks) go through a `_Mailbox`, a SimpleQueue plus
  a socket pair that wakes the I/O thread, so any thread may report. A generator
  handler is driven by its runner: each value it yields is emitted as a chunk.
- The thread that calls `run()` supervises: it starts the others, waits for
  `stop()`, and shuts them down in order (handlers first, so their results
  reach the wire before DISCONNECT).

Each connection has a generation number, and the I/O thread keeps the
attempts it holds on the current connection. A result is sent only while its
attempt is still held: results from an older connection (the broker forgot
that worker; a restarted broker even reuses task ids) and results of attempts
the broker took back with CANCEL are dropped here and counted.

Stream chunks (`task.emit()`, docs/protocol.md §13) leave as CHUNK messages:
the chunks of one task read from the mailbox in one go share a message, and a
task's pending chunks always leave before its DONE or FAIL, even when that
result is batched into a DONES. Chunks of an attempt that is no longer held
are dropped and counted, like its result.

What the broker must get (ACK, CHUNK, DONE, DONES, FAIL) is never dropped while its
connection lasts: when the socket's send queue is full (the broker is alive
but behind), it waits in the link's outbox, in order, and goes out as soon as
the socket is writable again (POLLOUT); the I/O thread never blocks on it and
keeps reading and timing meanwhile. PROGRESS is advisory: it is dropped and
counted then.
Every message fits the broker's caps (`max_message_bytes`, MAX_FRAMES frames):
results are split across DONES, and a result too large to send at all fails
its attempt for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import zmq

from zbroker.client import _wire
from zbroker.client._calls import check_message_bytes
from zbroker.client.endpoints import Endpoints, joined, parse_endpoints
from zbroker.client.errors import (
    AuthenticationFailed,
    ClientError,
    Forbidden,
    NonRetryableError,
    RetryLater,
    WorkerError,
)
from zbroker.client.keys import (
    Credentials,
    check,
    close_socket,
    connected_socket,
    monitor_of,
    took_over,
)
from zbroker.protocol import DEFAULT_ENDPOINT, ext, mdp, zbc
from zbroker.protocol.access import FORBIDDEN_PREFIX
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.limits import DEFAULT_MAX_MESSAGE_BYTES, MAX_FRAMES

logger = logging.getLogger(__name__)

# How long a closed DEALER may keep trying to deliver its last messages
# (final results, DISCONNECT) before they are thrown away.
_GOODBYE_LINGER_MS = 500
# What stop() waits beyond its own timeout: flushing results, DISCONNECT, joining the I/O thread.
_SHUTDOWN_GRACE_S = 5.0
_IO_JOIN_S = 4.0
# How long run()'s thread may sleep before it gives pending signal handlers a turn.
_SIGNAL_CHECK_S = 0.5
# FAIL reasons and metrics travel in the metadata frame, which should stay small.
_MAX_REASON_CHARS = 2000
_MAX_METRICS_BYTES = 64 * 1024
# Messages read per drain of the DEALER, so timers and reports are never starved.
_MAX_DRAIN = 1000
# The broker drops, without a word, any message over its --max-message-bytes (16 MiB by
# default) or over MAX_FRAMES frames, counting the routing id it prepends (docs/protocol.md §7).


# Result (or progress) frames per message: the cap less routing id, "", ZBW01, command, meta.
_MAX_FRAMES = MAX_FRAMES - 5
# Room kept in every message for what is not result bytes: the routing id (up to 255
# bytes), the delimiter, header and command frames, and the meta map's own header.
_MESSAGE_OVERHEAD = 512
# What one result adds to the meta frame besides its id: [id, attempt, n] or {id, attempt}.
_ENTRY_OVERHEAD = 32
# Dropped progress is logged at most this often.
_PROGRESS_WARN_EVERY_S = 60.0
# How long a graceful stop lets outcomes held back by a slow broker drain before DISCONNECT.
_FLUSH_ON_STOP_S = 2.0

_EVENT_LOCK = threading.Lock()

Result = bytes | Sequence[bytes]
# What `Task.emit()` takes, and what a generator handler may yield: one chunk.
ChunkData = bytes | bytearray | memoryview | str
# A generator handler (sync or async) is typed by what it yields, as Iterator or as
# Generator: at run time, what it returns when it is a generator is the result.
Handler = Callable[
    ["Task"], Result | Awaitable[Result] | Iterator[ChunkData] | AsyncIterator[ChunkData]
]
Metrics = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True, slots=True, eq=False)
class Task:
    """One attempt of a task, as the handler gets it.

    Compared by identity: two deliveries of the same task are two attempts.
    A Task built by hand (to unit-test a handler) works too: `progress()` and
    `emit()` then go nowhere and it is never cancelled.
    """

    id: str
    attempt: int  # 1 for the first delivery; the broker's fencing token
    service: str
    frames: tuple[bytes, ...] = ()
    headers: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    # The ids of the tasks it depended on (`depends_on`), in the enqueue's order: read
    # their results with a client's `result()`, or have them handed over (`input`).
    depends_on: tuple[str, ...] = ()
    # Made on first use: most tasks are never cancelled nor waited on.
    _cancel_event: threading.Event | None = field(default=None, init=False, repr=False)
    _cancel_reason: str | None = field(default=None, init=False, repr=False)
    _generation: int = field(default=0, init=False, repr=False)
    _mailbox: _Mailbox | None = field(default=None, init=False, repr=False)
    _worker: Worker | None = field(default=None, init=False, repr=False)
    # Set once the handler has returned (or raised): chunks emitted later are dropped.
    _ended: bool = field(default=False, init=False, repr=False)

    @property
    def payload(self) -> bytes:
        """The first payload frame, or b"" when there is none."""
        return self.frames[0] if self.frames else b""

    @property
    def cancelled(self) -> bool:
        """True once the broker took this attempt back: its result will not be sent."""
        event = self._cancel_event
        return event is not None and event.is_set()

    @property
    def cancel_reason(self) -> str | None:
        """Why the broker cancelled this attempt, when its CANCEL said so (a stream
        past its cap, say); None otherwise, and while the attempt is not cancelled."""
        return self._cancel_reason

    def wait_cancelled(self, timeout_s: float | None = None) -> bool:
        """Wait up to `timeout_s` (None: forever) for a cancellation; True if it came."""
        return self._event().wait(timeout_s)

    def _event(self) -> threading.Event:
        event = self._cancel_event
        if event is None:
            with _EVENT_LOCK:  # the I/O thread and a handler may both get here first
                event = self._cancel_event
                if event is None:
                    event = threading.Event()
                    object.__setattr__(self, "_cancel_event", event)
        return event

    def progress(self, *data: bytes) -> None:
        """Send PROGRESS for this attempt, with optional data frames. Callable from any thread.

        Progress of an attempt that is no longer held (cancelled, finished, or
        from an earlier connection) is dropped silently: it is advisory.
        """
        for frame in data:
            if not isinstance(frame, bytes):
                raise TypeError(f"progress frames must be bytes, got {type(frame).__name__}")
        mailbox = self._mailbox
        if mailbox is not None:
            mailbox.post(_Progress(self, data))

    def emit(self, chunk: ChunkData) -> bool:
        """Append `chunk` to the task's stream (docs/protocol.md §13); True if it was queued
        (it is still dropped if the attempt ends before it leaves).

        `chunk` is bytes (or bytearray, memoryview), or a str, sent as UTF-8;
        anything else raises TypeError, and a chunk too large for any message
        (over `max_message_bytes` less its headers) raises ValueError. Callable
        from any thread and from async handlers (no await: it never blocks on
        the network). The chunks of an attempt go out in the order they were
        emitted, several in one CHUNK message when they come close together,
        and all of them before the attempt's result.

        Once the attempt is over (cancelled, its handler returned, its connection
        replaced, the worker stopped) it is a no-op that returns False, counted
        in `stats.stale_chunks_dropped`; it never raises for that. A Task built
        by hand has no stream: False.
        """
        data = _chunk_bytes(chunk)
        worker = self._worker
        if worker is None:
            return False
        too_large = worker._chunk_too_large(self, data)
        if too_large is not None:
            raise ValueError(too_large)
        mailbox = self._mailbox
        if self._ended or self.cancelled or mailbox is None or not mailbox.post(_Chunk(self, data)):
            worker._bump("stale_chunks_dropped")
            return False
        return True


@dataclass(slots=True)
class WorkerStats:
    """What a Worker has done since it was created. Counters only ever grow."""

    received: int = 0  # TASK messages: attempts pushed to this worker
    acked: int = 0  # attempts acknowledged to the broker
    handled: int = 0  # results sent (DONE, or one entry of a DONES), counted as they go out
    failed: int = 0  # FAIL sent: the handler raised, or returned something unsendable
    cancelled: int = 0  # attempts the broker took back (CANCEL) while this worker held them
    not_started: int = 0  # attempts never handed to the handler: cancelled, stale, or stopping
    stale_results_dropped: int = 0  # results not sent: attempt cancelled or connection replaced
    progress_sent: int = 0
    progress_dropped: int = 0  # PROGRESS not sent: the broker was behind, or it was too large
    chunks_sent: int = 0  # stream chunks sent (CHUNK frames), counted as they go out
    stale_chunks_dropped: int = 0  # chunks not sent: their attempt was over (task.emit())
    results_too_large: int = 0  # results over the broker's message cap: failed for good instead
    reconnects: int = 0  # connections opened after the first one
    malformed: int = 0  # messages from the broker that could not be decoded
    metrics_errors: int = 0  # calls of the metrics callable that failed or returned garbage
    broker_stopping: int = 0  # STOPPING notices: the broker was stopping (a restart, say)
    tags_sent: int = 0  # TAGS: tag changes sent to the broker (`set_tags`)
    ready_waits: int = 0  # READY sent once a broker's handshake completed (several endpoints)


def _check_tags(tags: Sequence[str]) -> None:
    if isinstance(tags, str | bytes) or not all(isinstance(t, str) for t in tags):
        raise TypeError("tags must be a sequence of str")
    if len(tags) > ext.MAX_TAGS:
        raise ValueError(f"at most {ext.MAX_TAGS} tags")


# ------------------------------------------------------------ internal messages


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How an attempt ended: `result` frames for DONE, or None and a FAIL description."""

    task: Task
    result: tuple[bytes, ...] | None
    reason: str = ""
    retry: bool = True
    delay_s: float | None = None


@dataclass(frozen=True, slots=True)
class _Progress:
    task: Task
    data: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class _Chunk:
    """One chunk for the stream of `task`'s attempt (`Task.emit`)."""

    task: Task
    data: bytes


@dataclass(frozen=True, slots=True)
class _Tags:
    """The worker's tags changed (`Worker.set_tags`): tell the broker (TAGS)."""

    tags: tuple[str, ...]


class _Shutdown:
    """The last report: send DISCONNECT, close, end the I/O thread."""


_SHUTDOWN = _Shutdown()
_Report = _Outcome | _Progress | _Chunk | _Tags | _Shutdown


@dataclass(frozen=True, slots=True)
class _StopRequest:
    timeout_s: float


@dataclass(frozen=True, slots=True)
class _Crashed:
    error: BaseException
    where: str


_Control = _StopRequest | _Crashed


class _Mailbox:
    """Reports from any thread to the I/O thread: a queue, and a socket pair to wake it."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[_Report] = queue.SimpleQueue()
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        # Guards `closed` and the writer: a report must never race the close.
        self._lock = threading.Lock()
        self._closed = False
        # A wakeup is on its way: the I/O thread will read the queue, no need for another.
        self._woken = False

    def post(self, report: _Report) -> bool:
        """Queue `report` and wake the I/O thread; False once the mailbox is closed."""
        with self._lock:
            if self._closed:
                return False
            self.queue.put(report)
            if not self._woken:
                self._woken = True
                # Full of wakeups already if it would block: one is enough.
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    self._writer.send(b"\0")
            return True

    def clear_wakeups(self) -> None:
        """Called by the I/O thread before it reads the queue: a report posted after
        this point wakes it again."""
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        # Only now, with every wakeup read: a poster that still saw True put its
        # report in the queue before this line, so the read that follows gets it.
        self._woken = False

    def close(self) -> list[_Report]:
        """Refuse further reports; returns those nobody read."""
        with self._lock:
            self._closed = True
            self.reader.close()
            self._writer.close()
        left: list[_Report] = []
        while True:
            try:
                left.append(self.queue.get_nowait())
            except queue.Empty:
                return left


# ------------------------------------------------------------ the worker


class Worker:
    """Serves one service over ZBW01: calls `handler(task)` for each task the broker pushes.

    Up to `concurrency` handlers run at once, and the worker declares that
    credit to the broker. A plain function runs in `concurrency` handler
    threads; an `async def` handler runs in one event loop (in a thread of its
    own) as up to `concurrency` coroutines. The thread that calls `run()` only
    supervises.

    The handler returns the result, one `bytes` frame or a sequence of them
    (sent as DONE). If it raises, the attempt fails (FAIL) and the broker
    retries it, up to its attempt limit: raise `NonRetryableError` when no
    attempt can succeed, or `RetryLater(delay_s)` to ask for a later retry.
    A result that is not bytes frames fails the attempt for good.

    Streams (docs/protocol.md §13): a handler appends chunks to its task's
    stream with `task.emit(chunk)`, and they reach the broker before its
    result. A generator handler streams by yielding: a generator function
    (run in the handler threads) or a function returning a generator has each
    yielded value emitted, and what it returns is the result (returning
    nothing gives `b""`); an async generator function (run on the event loop
    like `async def`) has each yielded value emitted, and its result is always
    `b""` (an async generator cannot return a value: a handler that needs a
    result besides its stream is an `async def` that calls `task.emit()`). A
    value that is neither bytes nor str fails the attempt for good. Once the
    attempt is cancelled, a generator is not resumed: it is closed at its
    `yield` (an async generator's coroutine is cancelled at once, at its
    current `await`), and `task.cancel_reason` says why when the broker did.

    The worker heartbeats every `heartbeat_interval_s` and also answers each
    HEARTBEAT from the broker, so it keeps pace with a broker configured with
    a shorter interval. The broker is presumed gone after `liveness`
    intervals of silence; the worker then reconnects, waiting
    `reconnect_delay_s` doubling up to `max_reconnect_delay_s` between
    attempts. If `metrics` is given, the I/O thread calls it at most once per
    interval and attaches the map it returns to a heartbeat.

    Every message stays within `max_message_bytes` (set it to the broker's
    `--max-message-bytes`) and the broker's 16384 frames: results that finish
    together leave in as many DONES as that takes, and a result too large to
    be sent at all fails its attempt for good. Outcomes are never dropped when
    the broker falls behind: they wait, in order, until the socket takes them.

    A Worker runs once: `run()` in the calling thread, or `start()` in a
    background thread; `stop()` ends either gracefully.
    """

    def __init__(
        self,
        endpoint: Endpoints = DEFAULT_ENDPOINT,
        service: str | bytes | None = None,
        handler: Handler | None = None,
        *,
        concurrency: int = 1,
        tags: Sequence[str] = (),
        heartbeat_interval_s: float = 2.5,
        liveness: int = 3,
        reconnect_delay_s: float = 0.1,
        max_reconnect_delay_s: float = 2.5,
        metrics: Metrics | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        if service is None:
            raise TypeError("Worker() needs a service name")
        if handler is None or not callable(handler):
            raise TypeError("Worker() needs a callable handler")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise TypeError("concurrency must be an int")
        if not 1 <= concurrency <= ext.MAX_CREDIT:
            raise ValueError(f"concurrency must be between 1 and {ext.MAX_CREDIT}")
        _check_tags(tags)
        if not heartbeat_interval_s > 0:
            raise ValueError("heartbeat_interval_s must be positive")
        if liveness < 1:
            raise ValueError("liveness must be at least 1")
        if not 0 < reconnect_delay_s <= max_reconnect_delay_s:
            raise ValueError("need 0 < reconnect_delay_s <= max_reconnect_delay_s")
        if metrics is not None and not callable(metrics):
            raise TypeError("metrics must be a callable returning a map, or None")
        check_message_bytes(max_message_bytes)
        self.endpoints = parse_endpoints(endpoint)
        self.endpoint = joined(self.endpoints)
        self.service = _service_name(service)
        self.handler = handler
        self.concurrency = concurrency
        self.tags = tuple(tags)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.reconnect_delay_s = reconnect_delay_s
        self.max_reconnect_delay_s = max_reconnect_delay_s
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        # CURVE keys for a broker started with --auth (zbroker.client.keys).
        self.credentials = credentials
        # What the results (and their meta entries) of one DONE or DONES may add up to.
        self._results_budget = max_message_bytes - _MESSAGE_OVERHEAD
        # Async handlers (coroutine or async generator functions) run on the event loop.
        self.is_async = _is_async(handler)
        self.stats = WorkerStats()
        self._context = context if context is not None else zmq.Context.instance()
        # Like Client: a bad endpoint fails here, not later in a background thread.
        close_socket(connected_socket(self._context, zmq.DEALER, self.endpoints))
        self._control: queue.SimpleQueue[_Control] = queue.SimpleQueue()
        self._stats_lock = threading.Lock()
        self._running = 0
        self._link: _Link | None = None
        self._runner: _ThreadRunner | _AsyncRunner | None = None
        self._mailbox: _Mailbox | None = None
        # Plain attributes, not locks: stop() may run inside a signal handler
        # that interrupted the very thread that holds a lock.
        self._started = False
        self._stop_requested = False
        self._draining = False  # no new task is started once this is set
        self._clean_stop = True
        self._run_thread_id: int | None = None
        self._handler_thread_ids: set[int] = set()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ public

    @property
    def connected(self) -> bool:
        """True once the broker has greeted the current connection, until it is lost."""
        link = self._link
        return link is not None and link.connected

    @property
    def credit(self) -> int:
        """The credit the current connection declared: `concurrency` less the handlers
        that were still running attempts of an older connection when it registered
        (0 before the first READY)."""
        link = self._link
        return 0 if link is None else link.credit

    @property
    def running(self) -> int:
        """How many handler calls are running right now."""
        return self._running

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called (or the worker is ending): no new task will start."""
        return self._stop_requested or self._draining

    @property
    def stopped(self) -> bool:
        """True once the worker has ended, stopped or failed: it serves nothing any more."""
        return self._finished.is_set()

    @property
    def error(self) -> BaseException | None:
        """What ended a worker started with `start()` when it failed (`run()` raises it
        instead); None while it runs and after a clean stop."""
        return self._error

    def run(self) -> None:
        """Serve until `stop()` is called; the calling thread supervises the handler threads.

        Raises `WorkerError` if the I/O thread fails. A `KeyboardInterrupt`
        (Ctrl-C) ends the worker at once: DISCONNECT is sent without waiting
        for running handlers, and the broker requeues their attempts.
        """
        self._claim()
        self._run()

    def start(self) -> Worker:
        """Run the worker in a background (daemon) thread; returns at once."""
        self._claim()
        self._thread = threading.Thread(
            target=self._run_in_background, name=f"zbroker-worker-{self.service}", daemon=True
        )
        self._thread.start()
        return self

    def set_tags(self, tags: Sequence[str]) -> None:
        """Change the worker's tags (a model loaded or unloaded) without registering
        again: the broker places tasks that `require` or `prefer` tags by these from
        now on (TAGS; a reconnect's READY carries them too). Safe from any thread."""
        _check_tags(tags)
        self.tags = tuple(tags)
        mailbox = self._mailbox
        if mailbox is not None:
            mailbox.post(_Tags(self.tags))

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop gracefully; True if every running handler finished within `timeout_s`.

        No new task is started. Running handlers finish and their results are
        sent, then DISCONNECT, which makes the broker requeue the tasks this
        worker received but never started. Handlers still running after
        `timeout_s` are abandoned (the broker requeues their attempts and
        their late results are dropped) and False is returned.

        Safe to call from a signal handler and from a handler; called in the
        thread that runs `run()` or in a handler thread it returns False at
        once and the worker stops shortly after. Before `start()`/`run()` it
        returns True and the worker can no longer be started.
        """
        self._stop_requested = True
        if not self._started:
            return True
        self._control.put(_StopRequest(timeout_s))  # SimpleQueue.put is reentrant
        me = threading.get_ident()
        if me == self._run_thread_id or me in self._handler_thread_ids:
            return False
        return self._finished.wait(timeout_s + _SHUTDOWN_GRACE_S) and self._clean_stop

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

    # --------------------------------------------------------- supervision

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError("a Worker runs only once; create a new one")
        if self._stop_requested:
            raise RuntimeError("this Worker was stopped before it started; create a new one")
        self._started = True

    def _run_in_background(self) -> None:
        self._run(background=True)

    def _run(self, background: bool = False) -> None:
        self._run_thread_id = threading.get_ident()
        try:
            if not self._stop_requested:  # stop() may have raced start()
                self._supervise()
        except BaseException as exc:
            if not background:
                raise
            # Nobody waits on this thread: keep the error where `error` shows it, and say it.
            self._error = exc
            logger.error("worker for %r failed and stopped: %s", self.service, exc, exc_info=exc)
        finally:
            self._finished.set()

    def _supervise(self) -> None:
        mailbox = self._mailbox = _Mailbox()
        runner = self._runner = _AsyncRunner(self) if self.is_async else _ThreadRunner(self)
        link = self._link = _Link(self, mailbox)
        io_thread = threading.Thread(
            target=link.run, name=f"zbroker-worker-io-{self.service}", daemon=True
        )
        stop_timeout_s = 0.0
        try:
            runner.start()
            io_thread.start()
            item = self._next_control()  # Ctrl-C in run() lands here
            if isinstance(item, _Crashed):
                if isinstance(item.error, ClientError) or not isinstance(item.error, Exception):
                    raise item.error
                raise WorkerError(f"{item.where} of the worker failed") from item.error
            stop_timeout_s = item.timeout_s
        finally:
            self._draining = True
            try:
                self._clean_stop = runner.shutdown(stop_timeout_s)
            finally:
                # Queued behind every result the handlers reported: they go out first.
                mailbox.post(_SHUTDOWN)
                if io_thread.ident is not None:
                    io_thread.join(_IO_JOIN_S)
                left = mailbox.close()
                dropped = sum(isinstance(r, _Outcome) for r in left)
                if dropped:
                    self._bump("stale_results_dropped", dropped)
                chunks = sum(isinstance(r, _Chunk) for r in left)
                if chunks:
                    self._bump("stale_chunks_dropped", chunks)

    def _next_control(self) -> _Control:
        # Wait in slices: a signal that arrives just before this thread blocks would
        # not run its Python handler (which may call stop()) until the thread wakes.
        while True:
            try:
                return self._control.get(timeout=_SIGNAL_CHECK_S)
            except queue.Empty:
                continue

    def _crashed(self, error: BaseException, where: str) -> None:
        self._control.put(_Crashed(error, where))

    # ------------------------------------------------ shared by the runners

    def _may_start(self, task: Task) -> bool:
        link = self._link
        if self.stopping or task.cancelled or link is None or task._generation != link.generation:
            self._bump("not_started")
            return False
        return True

    def _call(self, task: Task) -> _Outcome:
        self._count_running(1)
        try:
            try:
                result: object = self.handler(task)
                if inspect.isgenerator(result):
                    result = _drive(task, result)
                    if result is None:
                        result = b""
            except _Stopped:
                return self._stopped(task)
            except Exception as exc:
                return self._failure(task, exc)
            return self._success(task, result)
        finally:
            object.__setattr__(task, "_ended", True)
            self._count_running(-1)

    async def _call_async(self, task: Task) -> _Outcome:
        self._count_running(1)
        try:
            try:
                result: object = self.handler(task)
                if inspect.isasyncgen(result):
                    await _drive_async(task, result)
                    result = b""
                elif inspect.isawaitable(result):
                    result = await result
            except _Stopped:
                return self._stopped(task)
            except Exception as exc:
                return self._failure(task, exc)
            return self._success(task, result)
        finally:
            object.__setattr__(task, "_ended", True)
            self._count_running(-1)

    def _stopped(self, task: Task) -> _Outcome:
        """A generator handler stopped because its attempt was cancelled: the broker
        has the task back, so this outcome is dropped as stale by the I/O thread."""
        logger.info(
            "handler for service %r: stopped the generator of task %s attempt %d (cancelled%s)",
            self.service,
            task.id,
            task.attempt,
            f": {task.cancel_reason}" if task.cancel_reason else "",
        )
        return _Outcome(task, None, "the attempt was cancelled", retry=True)

    def _success(self, task: Task, result: object) -> _Outcome:
        if inspect.isasyncgen(result):
            reason = "handler returned an async generator: make the handler itself one"
        elif inspect.isgenerator(result):
            result.close()
            reason = "handler returned a generator from a coroutine: make the handler one"
        elif inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never awaited: close it rather than leak a warning
            reason = "handler returned an awaitable: declare it with `async def`"
        else:
            try:
                frames = _result_frames(result)
            except TypeError as exc:
                reason = str(exc)
            else:
                too_large = self._too_large(task, frames)
                if too_large is None:
                    return _Outcome(task, frames)
                reason = too_large
                self._bump("results_too_large")
        logger.error(
            "handler for service %r, task %s attempt %d: %s (failed for good)",
            self.service,
            task.id,
            task.attempt,
            reason,
        )
        return _Outcome(task, None, reason, retry=False)

    def _too_large(self, task: Task, frames: Sequence[bytes]) -> str | None:
        """Why `frames` cannot be one DONE the broker accepts, or None if they can."""
        if len(frames) > _MAX_FRAMES:
            return (
                f"result of {len(frames)} frames is over the broker's message cap"
                f" ({_MAX_FRAMES} frames)"
            )
        size = sum(map(len, frames))
        if _entry_bytes(task.id, size) > self._results_budget:
            return (
                f"result of {size} bytes is over the broker's message cap"
                f" ({self.max_message_bytes} bytes, Worker max_message_bytes)"
            )
        return None

    def _chunk_too_large(self, task: Task, data: bytes) -> str | None:
        """Why `data` cannot be a chunk of a CHUNK the broker accepts, or None if it can."""
        if _entry_bytes(task.id, len(data)) > self._results_budget:
            return (
                f"chunk of {len(data)} bytes is over the broker's message cap"
                f" ({self.max_message_bytes} bytes, Worker max_message_bytes)"
            )
        return None

    def _failure(self, task: Task, exc: Exception) -> _Outcome:
        """Called inside the `except` block, so that logger.exception has the traceback."""
        reason = _reason(exc)
        if isinstance(exc, RetryLater):
            logger.info(
                "handler for service %r, task %s attempt %d: retry in %gs (%s)",
                self.service,
                task.id,
                task.attempt,
                exc.delay_s,
                reason,
            )
            return _Outcome(task, None, reason, retry=True, delay_s=exc.delay_s)
        retry = not isinstance(exc, NonRetryableError)
        logger.exception(
            "handler for service %r failed on task %s attempt %d%s",
            self.service,
            task.id,
            task.attempt,
            "" if retry else " (not retryable)",
        )
        return _Outcome(task, None, reason, retry=retry)

    def _report(self, outcome: _Outcome) -> None:
        mailbox = self._mailbox
        if mailbox is None or not mailbox.post(outcome):
            self._bump("stale_results_dropped")  # the worker has stopped meanwhile

    def _bump(self, counter: str, n: int = 1) -> None:
        # Several threads count; `+=` on an attribute is not atomic.
        with self._stats_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + n)

    def _count_running(self, delta: int) -> None:
        with self._stats_lock:
            self._running += delta


# ------------------------------------------------------------ handler runners


class _ThreadRunner:
    """A plain handler: `concurrency` threads, each running one task at a time."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._tasks: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(
                target=self._serve, name=f"zbroker-worker-{worker.service}-{i}", daemon=True
            )
            for i in range(worker.concurrency)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, tasks: list[Task]) -> None:
        put = self._tasks.put
        for task in tasks:
            put(task)

    def cancel(self, task: Task) -> None:
        """A running function cannot be interrupted: it sees `task.cancelled` instead."""

    def shutdown(self, timeout_s: float) -> bool:
        """Let running handlers finish (tasks still queued are not started); True if they did."""
        for _ in self._threads:
            self._tasks.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _serve(self) -> None:
        worker = self._worker
        worker._handler_thread_ids.add(threading.get_ident())
        try:
            while True:
                task = self._tasks.get()
                if task is None:
                    return
                if worker._may_start(task):
                    worker._report(worker._call(task))
        except BaseException as exc:  # SystemExit from a handler, say: it ends the worker
            worker._crashed(exc, "a handler thread")


class _AsyncRunner:
    """An `async def` handler: one thread whose event loop runs up to `concurrency` coroutines."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: asyncio.Queue[Task | None] | None = None
        self._running: dict[Task, asyncio.Future[_Outcome]] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name=f"zbroker-worker-{worker.service}-loop", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def submit(self, tasks: list[Task]) -> None:
        # One wakeup of the loop for everything one read of the socket brought.
        if not self._call_soon(self._put_many, tasks):
            self._worker._bump("not_started", len(tasks))

    def cancel(self, task: Task) -> None:
        """Cancel the coroutine running `task`, if any: its attempt is over."""
        self._call_soon(self._cancel_now, task)

    def shutdown(self, timeout_s: float) -> bool:
        for _ in range(self._worker.concurrency):
            self._call_soon(self._put, None)
        if self._thread.ident is None:
            return True
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            return True
        # Abandoned: their attempts go back to the broker with our DISCONNECT anyway.
        self._call_soon(self._cancel_all)
        self._thread.join(1.0)
        return False

    # In the loop's thread from here on.

    def _main(self) -> None:
        worker = self._worker
        worker._handler_thread_ids.add(threading.get_ident())
        try:
            loop = self._loop = asyncio.new_event_loop()
            self._tasks = asyncio.Queue()
        finally:
            self._ready.set()  # start() must not wait forever, even if that failed
        try:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            worker._crashed(exc, "the event loop thread")
        finally:
            try:
                _cancel_remaining(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> bool:
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the worker is stopping
            return False
        return True

    def _put(self, task: Task | None) -> None:
        assert self._tasks is not None
        self._tasks.put_nowait(task)

    def _put_many(self, tasks: list[Task]) -> None:
        assert self._tasks is not None
        for task in tasks:
            self._tasks.put_nowait(task)

    def _cancel_now(self, task: Task) -> None:
        future = self._running.get(task)
        if future is not None:
            future.cancel()

    def _cancel_all(self) -> None:
        for task, future in list(self._running.items()):
            task._event().set()
            future.cancel()

    async def _serve(self) -> None:
        await asyncio.gather(*(self._consume() for _ in range(self._worker.concurrency)))

    async def _consume(self) -> None:
        worker = self._worker
        assert self._tasks is not None
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        while True:
            task = await self._tasks.get()
            if task is None:
                return
            if not worker._may_start(task):
                continue
            # The handler runs as its own asyncio task, so that cancelling it (the
            # broker took the attempt back) leaves this consumer running.
            future = loop.create_task(worker._call_async(task))
            self._running[task] = future
            outcome: _Outcome | None = None
            try:
                outcome = await future
            except asyncio.CancelledError:
                if me is not None and me.cancelling():
                    raise  # this consumer itself is being cancelled: the loop is closing
            finally:
                del self._running[task]
            if outcome is not None:
                worker._report(outcome)
            elif not task.cancelled:
                # Cancelled by something inside the handler, not by the broker.
                reason = "CancelledError: the handler's coroutine was cancelled"
                logger.error("handler for service %r: %s", worker.service, reason)
                worker._report(_Outcome(task, None, reason, retry=True))


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    pending = asyncio.all_tasks(loop)
    if not pending:
        return
    for pending_task in pending:
        pending_task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


# ------------------------------------------------------------ the I/O thread


@dataclass(slots=True)
class _Pending:
    """A message the broker must get (ACK, CHUNK, DONE, DONES, FAIL), in the order it was made."""

    frames: list[bytes]
    stat: str  # the WorkerStats counter it adds `n` to as it goes out
    n: int


_OUTCOME_STATS = ("handled", "failed")
_CHUNK_STAT = "chunks_sent"


class _Link:
    """The I/O thread of a Worker: owns the DEALER socket, every timer, and the held attempts."""

    def __init__(self, worker: Worker, mailbox: _Mailbox) -> None:
        self._worker = worker
        self._mailbox = mailbox
        self._interval_s = worker.heartbeat_interval_s
        self._expiry_s = worker.heartbeat_interval_s * worker.liveness
        self._poller = zmq.Poller()
        self._dealer: zmq.Socket[bytes] | None = None
        # The dealer's handshake monitor (zbroker.client.keys), polled beside it.
        self._monitor: zmq.Socket[bytes] | None = None
        self._expires_at = 0.0
        self._heartbeat_at = 0.0
        self._metrics_at = 0.0
        self._reconnect_at: float | None = None
        self._backoff_s = worker.reconnect_delay_s
        # The attempts held on the current connection, by task id.
        self._held: dict[str, Task] = {}
        # The credit declared on the current connection (its READY).
        self.credit = 0
        # Logged once per wait: every handler still runs an attempt of an old connection.
        self._waiting_logged = False
        # Messages of the current connection that may not be dropped and that the
        # socket could not take yet (its send queue is full: the broker is behind).
        # Sent first, in order, as soon as it is writable again (POLLOUT).
        self._outbox: deque[_Pending] = deque()
        self._watching_out = False
        self._progress_warned_at: float | None = None  # when dropped progress was last logged
        # Read by other threads; only this thread writes them.
        self.generation = 0
        self.connected = False

    def run(self) -> None:
        try:
            self._run()
        except (AuthenticationFailed, Forbidden) as exc:
            logger.error("worker %r stops: %s", self._worker.service, exc)
            self._worker._crashed(exc, "the I/O thread")
        except BaseException as exc:
            logger.exception("I/O thread of worker %r failed", self._worker.service)
            self._worker._crashed(exc, "the I/O thread")
        finally:
            self._close(disconnect=False)

    def _run(self) -> None:
        wakeup = self._mailbox.reader.fileno()  # the poller reports a native socket by its fd
        self._poller.register(wakeup, zmq.POLLIN)
        self._open()
        while True:
            events = dict(self._poller.poll(self._poll_timeout_ms()))
            if wakeup in events and not self._on_reports():
                return
            dealer = self._dealer
            if dealer is not None and self._monitor in events:
                check(dealer)  # a refused handshake ends the worker with the reason
                if len(self._worker.endpoints) > 1 and took_over(dealer):
                    self._register_again("its broker went and another handshake completed")
                    dealer = None
            if dealer is not None and dealer in events:
                if events[dealer] & zmq.POLLIN:
                    self._drain_dealer()
                if events[dealer] & zmq.POLLOUT and self._dealer is dealer:
                    self._flush()
            self._on_timers(time.monotonic())

    # ------------------------------------------------------------ connection

    def _open(self) -> None:
        w = self._worker
        if self.generation:
            w._bump("reconnects")
        self.generation += 1
        self._dealer = connected_socket(
            w._context, zmq.DEALER, w.endpoints, credentials=w.credentials
        )
        self._poller.register(self._dealer, zmq.POLLIN)
        self._monitor = monitor_of(self._dealer)
        if self._monitor is not None:
            self._poller.register(self._monitor, zmq.POLLIN)
        now = time.monotonic()
        self._expires_at = now + self._expiry_s
        self._heartbeat_at = now + self._interval_s
        self._reconnect_at = None
        self.credit = credit = self._free_credit()
        ready = ext.ready(w.service, credit, w.tags, batch=True)
        if not self._send(ready):
            # Several endpoints: no broker's handshake has completed yet (ZMQ_IMMEDIATE).
            # READY goes first once one has, to whichever broker is active.
            self._send_reliably(ready, "ready_waits", 1)
        logger.debug(
            "worker %r: READY (credit %d) sent to %s (connection %d)",
            w.service,
            credit,
            w.endpoint,
            self.generation,
        )

    def _register_again(self, why: str) -> None:
        """Connected to several brokers, the connection in use was lost and another
        handshake completed: another broker took over (or the same one came back),
        which knows nothing of this worker.
        Register with it now, on a new connection, instead of after `liveness`
        heartbeats of silence (the attempts held are the old broker's: dropped)."""
        logger.info("worker %r: %s: registering again", self._worker.service, why)
        self._close(disconnect=False)
        self._reopen(time.monotonic())

    def _free_credit(self) -> int:
        """Handlers free to take a task of a new connection. A handler still running
        an attempt of an old one (the broker took it back: its result will be dropped)
        holds its slot until it returns, so it is not offered again meanwhile."""
        w = self._worker
        return max(0, w.concurrency - w.running)

    def _reopen(self, now: float) -> None:
        """Register again once a handler is free: the credit of the new connection is
        what the handlers really have free (a READY must offer at least 1)."""
        w = self._worker
        if self._free_credit() < 1:
            if not self._waiting_logged:
                self._waiting_logged = True
                logger.info(
                    "worker %r: all %d handlers still run attempts the broker took back;"
                    " registering again when one returns",
                    w.service,
                    w.concurrency,
                )
            self._reconnect_at = now + w.reconnect_delay_s
            return
        self._waiting_logged = False
        self._open()

    def _close(
        self,
        *,
        disconnect: bool,
        reason: str = "",
        linger_ms: int = _GOODBYE_LINGER_MS,
        flush_s: float = 0.0,
    ) -> None:
        dealer = self._dealer
        if dealer is None:
            return
        self.connected = False
        if self._outbox and flush_s > 0:
            self._flush_within(flush_s)
        if disconnect:
            self._send(ext.disconnect(reason))  # best effort: the broker expires us anyway
        self._poller.unregister(dealer)
        if self._monitor is not None:
            self._poller.unregister(self._monitor)
            self._monitor = None
        self._watching_out = False
        close_socket(dealer, linger_ms if disconnect else 0)
        self._dealer = None
        self._drop_outbox()
        # The broker hands these attempts to someone else: tell their handlers.
        held = list(self._held.values())
        self._held.clear()
        for task in held:
            self._cancel(task)

    def _reconnect_after(self, delay_s: float) -> None:
        self._reconnect_at = time.monotonic() + delay_s

    def _next_backoff(self) -> float:
        delay_s = self._backoff_s
        self._backoff_s = min(2 * delay_s, self._worker.max_reconnect_delay_s)
        return delay_s

    def _send(self, frames: list[bytes]) -> bool:
        """Send a message that may be lost (READY on a fresh socket, HEARTBEAT,
        PROGRESS, DISCONNECT); False if the send queue is full."""
        assert self._dealer is not None
        try:
            _wire.send(self._dealer, frames, _wire.NOBLOCK)
        except zmq.Again:
            return False
        self._sent()
        return True

    def _sent(self) -> None:
        if self._worker.metrics is None:
            # Any message keeps the worker alive at the broker. With metrics, the
            # heartbeat timer is left alone so that they go out every interval.
            self._heartbeat_at = time.monotonic() + self._interval_s

    def _send_reliably(self, frames: list[bytes], stat: str, n: int) -> None:
        """Send a message the broker must get, after those still waiting; never dropped
        while this connection lasts."""
        self._outbox.append(_Pending(frames, stat, n))
        if len(self._outbox) == 1:  # else the socket is full: POLLOUT calls _flush
            self._flush()

    def _flush(self) -> None:
        """Send what waits in the outbox, in order, until the socket is full."""
        dealer = self._dealer
        assert dealer is not None
        outbox = self._outbox
        bump = self._worker._bump
        while outbox:
            item = outbox[0]
            # Counted just before it goes, so that whoever gets the result also sees
            # the count; taken back if the socket refuses it, so that nothing waiting
            # here is counted as sent.
            bump(item.stat, item.n)
            try:
                _wire.send(dealer, item.frames, _wire.NOBLOCK)
            except zmq.Again:
                bump(item.stat, -item.n)
                break
            outbox.popleft()
            self._sent()
        self._watch_writable(bool(outbox))

    def _watch_writable(self, on: bool) -> None:
        if on != self._watching_out and self._dealer is not None:
            self._watching_out = on
            self._poller.modify(self._dealer, zmq.POLLIN | zmq.POLLOUT if on else zmq.POLLIN)

    def _flush_within(self, timeout_s: float) -> None:
        """Stopping: give what waits in the outbox up to `timeout_s` to go out."""
        dealer = self._dealer
        assert dealer is not None
        deadline = time.monotonic() + timeout_s
        while self._outbox:
            remaining_ms = math.ceil((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not dealer.poll(remaining_ms, zmq.POLLOUT):
                return
            self._flush()

    def _drop_outbox(self) -> None:
        """The connection is gone: its attempts are the broker's again (fenced)."""
        outcomes = sum(item.n for item in self._outbox if item.stat in _OUTCOME_STATS)
        chunks = sum(item.n for item in self._outbox if item.stat == _CHUNK_STAT)
        self._outbox.clear()
        if chunks:
            self._worker._bump("stale_chunks_dropped", chunks)
        if outcomes:
            self._worker._bump("stale_results_dropped", outcomes)
            logger.info(
                "worker %r: dropped %d results the broker had not read before the"
                " connection closed",
                self._worker.service,
                outcomes,
            )

    # --------------------------------------------------------------- the loop

    def _poll_timeout_ms(self) -> int:
        if self._dealer is not None:
            due = min(self._heartbeat_at, self._expires_at)
        elif self._reconnect_at is not None:
            due = self._reconnect_at
        else:
            due = time.monotonic() + self._interval_s
        return max(0, math.ceil((due - time.monotonic()) * 1000))

    def _on_reports(self) -> bool:
        """Send what the handlers reported; False on the final _SHUTDOWN."""
        mailbox = self._mailbox
        mailbox.clear_wakeups()
        # Results read in one go leave together (in order with the rest), in as few
        # DONES as the broker's caps allow: each within MAX_BATCH entries, _MAX_FRAMES
        # frames and the worker's byte budget. A result over the caps alone never
        # gets here: the handler's thread turned it into a FAIL.
        done: list[tuple[str, int, Sequence[bytes]]] = []
        # Chunks read in one go leave together as well: one CHUNK per task (more when
        # the caps say so), and a task's always before its DONE or FAIL.
        chunks: dict[Task, list[bytes]] = {}
        budget = self._worker._results_budget
        frames = size = 0
        while True:
            try:
                report = mailbox.queue.get_nowait()
            except queue.Empty:
                self._send_all_chunks(chunks)
                self._send_dones(done)
                return True
            if isinstance(report, _Chunk):
                if self._holds(report.task):
                    chunks.setdefault(report.task, []).append(report.data)
                else:  # its attempt is over: fenced at the broker anyway
                    self._worker._bump("stale_chunks_dropped")
                continue
            if isinstance(report, _Outcome):
                task, result = report.task, report.result
                pending = chunks.pop(task, None)
                if pending:
                    # Before the result, whether it leaves now or later in a DONES.
                    self._send_chunks(task, pending)
                if result is not None and self._holds(task):
                    del self._held[task.id]
                    cost = _entry_bytes(task.id, sum(map(len, result)))
                    if done and (
                        len(done) >= ext.MAX_BATCH
                        or frames + len(result) > _MAX_FRAMES
                        or size + cost > budget
                    ):
                        self._send_dones(done)
                        frames = size = 0
                    done.append((task.id, task.attempt, result))
                    frames += len(result)
                    size += cost
                    continue
                self._send_dones(done)
                frames = size = 0
                self._send_outcome(report)
                continue
            self._send_dones(done)
            frames = size = 0
            if isinstance(report, _Progress):
                if self._holds(report.task):
                    self._send_progress(report)
            elif isinstance(report, _Tags):
                # Sent on this connection only: a new one's READY carries `Worker.tags`.
                self._send_reliably(ext.tags(report.tags), "tags_sent", 1)
            else:
                self._send_all_chunks(chunks)
                self._close(disconnect=True, reason="worker stopping", flush_s=_FLUSH_ON_STOP_S)
                return False

    def _send_all_chunks(self, chunks: dict[Task, list[bytes]]) -> None:
        for task, data in chunks.items():
            self._send_chunks(task, data)
        chunks.clear()

    def _send_chunks(self, task: Task, data: list[bytes]) -> None:
        """CHUNK messages for `task`'s attempt, in order, as few as the broker's caps
        allow (each chunk alone fits: `Task.emit` refused any larger)."""
        budget = self._worker._results_budget
        batch: list[bytes] = []
        size = _entry_bytes(task.id, 0)
        for chunk in data:
            if batch and (len(batch) >= _MAX_FRAMES or size + len(chunk) > budget):
                self._send_reliably(
                    ext.chunk(task.id, task.attempt, batch), _CHUNK_STAT, len(batch)
                )
                batch = []
                size = _entry_bytes(task.id, 0)
            batch.append(chunk)
            size += len(chunk)
        if batch:
            self._send_reliably(ext.chunk(task.id, task.attempt, batch), _CHUNK_STAT, len(batch))

    def _send_dones(self, done: list[tuple[str, int, Sequence[bytes]]]) -> None:
        if not done:
            return
        if len(done) == 1:
            task_id, attempt, result = done[0]
            self._send_reliably(ext.done(task_id, attempt, result), "handled", 1)
        else:
            self._send_reliably(ext.dones(done), "handled", len(done))
        done.clear()

    def _send_progress(self, report: _Progress) -> None:
        """PROGRESS is advisory: dropped (and counted) rather than queued when the
        broker is behind, so that it never holds back an outcome."""
        w = self._worker
        task, data = report.task, report.data
        if w._too_large(task, data) is not None:
            w._bump("progress_dropped")
            logger.warning(
                "worker %r: progress of task %s dropped: over the broker's message cap",
                w.service,
                task.id,
            )
            return
        if not self._outbox and self._send(ext.progress(task.id, task.attempt, data)):
            w._bump("progress_sent")
            return
        w._bump("progress_dropped")
        now = time.monotonic()
        last = self._progress_warned_at
        if last is None or now - last >= _PROGRESS_WARN_EVERY_S:
            self._progress_warned_at = now
            logger.warning(
                "worker %r: the broker is not keeping up: progress reports are dropped"
                " while it is behind (results wait and are sent in order; this warning"
                " is repeated at most every %gs, stats.progress_dropped counts them all)",
                w.service,
                _PROGRESS_WARN_EVERY_S,
            )

    def _holds(self, task: Task) -> bool:
        return (
            self._dealer is not None
            and task._generation == self.generation
            and self._held.get(task.id) is task
        )

    def _send_outcome(self, outcome: _Outcome) -> None:
        w = self._worker
        task = outcome.task
        if not self._holds(task):
            w._bump("stale_results_dropped")
            logger.info(
                "worker %r: dropped the result of task %s attempt %d: %s",
                w.service,
                task.id,
                task.attempt,
                "the broker took the attempt back" if task.cancelled else "connection replaced",
            )
            return
        del self._held[task.id]
        if outcome.result is not None:
            self._send_reliably(ext.done(task.id, task.attempt, outcome.result), "handled", 1)
        else:
            frames = ext.fail(
                task.id, task.attempt, outcome.reason, retry=outcome.retry, delay_s=outcome.delay_s
            )
            self._send_reliably(frames, "failed", 1)

    def _on_disconnect(self, message: ext.Disconnect, not_started: int) -> None:
        """The broker sent DISCONNECT: register again after a backoff, unless it
        refused this key the service (then the worker stops with Forbidden)."""
        w = self._worker
        if message.reason.startswith(FORBIDDEN_PREFIX):
            # The broker's auth file does not let this key serve the service:
            # registering again cannot help.
            raise Forbidden(zbc.E_FORBIDDEN, message.reason.removeprefix(FORBIDDEN_PREFIX).strip())
        logger.info(
            "worker %r: broker sent DISCONNECT (%s), re-registering",
            w.service,
            message.reason or "no reason given",
        )
        self._close(disconnect=False)
        self._reconnect_after(self._next_backoff())
        # Nothing to acknowledge on a connection that is gone, and nothing
        # it brought may start: those attempts are the broker's again.
        w._bump("not_started", not_started)

    def _drain_dealer(self) -> None:
        w = self._worker
        dealer = self._dealer
        assert dealer is not None
        acks: list[tuple[str, int]] = []
        to_run: list[Task] = []
        for _ in range(_MAX_DRAIN):
            try:
                frames = _wire.recv(dealer, _wire.NOBLOCK)
            except zmq.Again:
                break
            self._expires_at = time.monotonic() + self._expiry_s
            try:
                message = ext.decode_for_worker(frames)
            except ProtocolError as exc:
                w._bump("malformed")
                logger.warning("worker %r: dropped a malformed message: %s", w.service, exc)
                continue
            if isinstance(message, ext.Disconnect):
                self._on_disconnect(message, len(to_run))
                return
            if not self.connected:
                self.connected = True
                self._backoff_s = w.reconnect_delay_s
            if isinstance(message, ext.Task):
                acks.append((message.id, message.attempt))
                self._on_task(message, to_run)
            elif isinstance(message, ext.Tasks):
                for one in message.tasks:
                    acks.append((one.id, one.attempt))
                    self._on_task(one, to_run)
            elif isinstance(message, ext.Cancel):
                self._on_cancel(message)
            elif isinstance(message, ext.Stopping):
                self._on_stopping(message)
            else:
                # Answer at the broker's pace, so that a broker configured with a
                # shorter interval than this worker's never declares it dead.
                self._heartbeat()
        if to_run:
            runner = w._runner
            if runner is not None:
                runner.submit(to_run)
            else:  # stopped meanwhile: held until our DISCONNECT hands them back
                w._bump("not_started", len(to_run))
        if acks:
            self._send_reliably(ext.ack(acks), "acked", len(acks))

    def _on_task(self, message: ext.Task, to_run: list[Task]) -> None:
        """Hold the attempt; add it to `to_run` unless the worker is stopping."""
        w = self._worker
        w._bump("received")
        task = Task(
            message.id,
            message.attempt,
            message.service,
            message.payload,
            message.headers,
            message.timeout_s,
            message.deps,
        )
        object.__setattr__(task, "_generation", self.generation)
        object.__setattr__(task, "_mailbox", self._mailbox)
        object.__setattr__(task, "_worker", w)
        previous = self._held.get(task.id)
        if previous is not None:  # delivered again: the earlier attempt is over
            self._cancel(previous)
        self._held[task.id] = task
        runner = w._runner
        if w.stopping or runner is None:
            # Held (and acknowledged) until our DISCONNECT hands it back to the broker.
            w._bump("not_started")
            return
        to_run.append(task)

    def _on_stopping(self, message: ext.Stopping) -> None:
        """The broker is stopping: no task will come on this connection; the results of
        the attempts held still count if they arrive within its drain. Once it has
        gone, the usual silence detection reconnects (to the restarted broker)."""
        self._worker._bump("broker_stopping")
        logger.info(
            "worker %r: the broker is stopping; it takes results for %gs more (%d held)",
            self._worker.service,
            message.drain_s,
            len(self._held),
        )

    def _on_cancel(self, message: ext.Cancel) -> None:
        task = self._held.get(message.id)
        if task is None or task.attempt != message.attempt:
            return  # our result crossed the CANCEL on the wire: the broker refuses it
        del self._held[message.id]
        self._worker._bump("cancelled")
        logger.info(
            "worker %r: the broker took back task %s attempt %d%s",
            self._worker.service,
            task.id,
            task.attempt,
            f" ({message.reason})" if message.reason else "",
        )
        # Before the event is set: a handler woken by it sees the reason.
        object.__setattr__(task, "_cancel_reason", message.reason)
        self._cancel(task)

    def _cancel(self, task: Task) -> None:
        task._event().set()
        runner = self._worker._runner
        if runner is not None:
            runner.cancel(task)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        frames = None
        if self._worker.metrics is not None and now >= self._metrics_at:
            self._metrics_at = now + self._interval_s
            frames = self._heartbeat_with_metrics(self._worker.metrics)
        self._send(frames or ext.heartbeat())
        self._heartbeat_at = now + self._interval_s

    def _heartbeat_with_metrics(self, metrics: Metrics) -> list[bytes] | None:
        w = self._worker
        try:
            frames = ext.heartbeat(dict(metrics()))
            if len(frames) > 3:
                # Refuse here what the broker would refuse (non-string keys, say),
                # because a refused heartbeat would not keep this worker alive.
                if len(frames[3]) > _MAX_METRICS_BYTES:
                    raise ValueError(f"metrics exceed {_MAX_METRICS_BYTES} bytes packed")
                ext.unpack_meta(frames[3])
        except Exception:
            w._bump("metrics_errors")
            logger.warning(
                "worker %r: metrics callable failed; heartbeat sent without metrics",
                w.service,
                exc_info=True,
            )
            return None
        return frames

    def _on_timers(self, now: float) -> None:
        if self._dealer is None:
            if (
                self._reconnect_at is not None
                and now >= self._reconnect_at
                and not self._worker.stopping
            ):
                self._reopen(now)
            return
        if now >= self._expires_at:
            logger.warning(
                "worker %r: nothing heard from %s for %.1fs, reconnecting",
                self._worker.service,
                self._worker.endpoint,
                self._expiry_s,
            )
            # The broker is most likely gone: do not let a goodbye linger.
            self._close(disconnect=True, reason="broker silent", linger_ms=0)
            self._reconnect_after(self._next_backoff())
            return
        if now >= self._heartbeat_at:
            self._heartbeat()


# ------------------------------------------------------------ helpers


def _service_name(service: str | bytes) -> str:
    if isinstance(service, bytes):
        try:
            service = service.decode()
        except UnicodeDecodeError:
            raise ValueError("service name must be valid UTF-8") from None
    if not isinstance(service, str):
        raise TypeError("service name must be str or bytes")
    if not service:
        raise ValueError("service name must not be empty")
    if service.encode().startswith(mdp.MMI_PREFIX):
        raise ValueError("services starting with 'mmi.' are answered by the broker itself")
    return service


def _is_async(handler: Callable[..., object]) -> bool:
    """True for a handler that runs on the event loop: an `async def` function or async
    generator function, or an object whose `__call__` is one."""
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with `async def __call__`
    return any(
        inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (handler, call)
    )


class _Stopped(Exception):
    """Raised by the generator drivers: the attempt was cancelled, its generator closed."""


def _drive(task: Task, gen: Generator[Any, Any, Any]) -> object:
    """Run a generator handler: emit each value it yields; return what it returns.

    Once the attempt is cancelled the generator is not resumed: it is closed
    (GeneratorExit at its `yield`) and _Stopped is raised. It is closed on any
    way out, so its `finally` blocks run in this thread."""
    try:
        while True:
            if task.cancelled:
                raise _Stopped
            try:
                value = next(gen)
            except StopIteration as stop:
                return stop.value
            _emit_yielded(task, value)
    finally:
        gen.close()


async def _drive_async(task: Task, agen: AsyncGenerator[Any, Any]) -> None:
    """Run an async generator handler: emit each value it yields.

    A cancelled attempt normally ends it through asyncio (CancelledError at its
    current `await`); one that yields without ever awaiting is stopped here at its
    next `yield` instead (closed, then _Stopped)."""
    try:
        while True:
            if task.cancelled:
                raise _Stopped
            try:
                value = await agen.__anext__()
            except StopAsyncIteration:
                return
            _emit_yielded(task, value)
    finally:
        await agen.aclose()


def _emit_yielded(task: Task, value: Any) -> None:
    """A yielded value that cannot be a chunk fails the attempt for good: every
    attempt would yield it again."""
    try:
        task.emit(value)
    except (TypeError, ValueError) as exc:
        raise NonRetryableError(f"the handler yielded an unusable chunk: {exc}") from exc


def _chunk_bytes(chunk: object) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, str):
        return chunk.encode()
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    raise TypeError(f"a chunk is bytes or str, got {type(chunk).__name__}")


def _reason(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason[:_MAX_REASON_CHARS]


def _entry_bytes(task_id: str, size: int) -> int:
    """What a result of `size` bytes adds to a DONE or DONES, its meta entry included."""
    return size + len(task_id.encode()) + _ENTRY_OVERHEAD


def _result_frames(result: object) -> tuple[bytes, ...]:
    if isinstance(result, bytes):
        return (result,)
    if isinstance(result, str) or not isinstance(result, Sequence):
        raise TypeError(
            f"handler returned {type(result).__name__}, expected bytes or a sequence of bytes"
        )
    for frame in result:
        if not isinstance(frame, bytes):
            raise TypeError(f"handler returned a {type(frame).__name__} frame, expected bytes")
    return tuple(result)
