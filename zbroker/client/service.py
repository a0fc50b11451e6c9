"""A Service: one object that turns a set of functions into a zbroker service.

Built only from the client's own pieces, never from sockets of its own:

- one `Worker` per task queue (`@svc.task`), whose handler is the user's
  function wrapped so that its result becomes the task's result frame and,
  optionally, an event;
- one `Subscriber` for every topic prefix (`@svc.on`), read by a single event
  thread that calls the handlers one event at a time, in order of arrival;
- one `Publisher`, shared under a lock, for result events, heartbeats and
  `publish()`.

By default all of them live in a zmq context of the service's own, which is
terminated at the end of the shutdown: that is what guarantees that the last
results, events and the workers' DISCONNECTs have left the process by the time
`run()` returns. An exception in an event handler is logged and counted and
never stops the service; a task handler's failure is the Worker's business
(FAIL, retries, dead letters).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import queue
import secrets
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from types import FrameType, MappingProxyType, TracebackType
from typing import Any, TypeVar

import msgpack
import zmq

from zbroker.client._calls import check_message_bytes
from zbroker.client.endpoints import Endpoints, joined, parse_endpoints
from zbroker.client.errors import (
    AuthenticationFailed,
    ClientClosed,
    Forbidden,
    NonRetryableError,
    WorkerError,
)
from zbroker.client.events import Publisher, Subscriber
from zbroker.client.keys import Credentials
from zbroker.client.worker import (
    Task,
    Worker,
    _drive,
    _drive_async,
    _is_async,
    _service_name,
    _Stopped,
)
from zbroker.protocol import DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT, ext
from zbroker.protocol.events import Event
from zbroker.protocol.limits import DEFAULT_MAX_MESSAGE_BYTES, MAX_TOPIC_BYTES

logger = logging.getLogger(__name__)

# Topics of the client libraries' own events (a convention, not the broker's: see
# docs/protocol.md §6.2). Each is followed by the service's name.
SERVICE_HEARTBEAT_PREFIX = "service.heartbeat."
SERVICE_PROBE_PREFIX = "service.probe."

# How long the event thread waits for an event before it looks at its stop flag.
_EVENT_POLL_S = 0.05
# How often the subscription probe goes out until it comes back.
_PROBE_EVERY_S = 0.05
# How long the last events may take to leave when the publisher closes.
_PUBLISH_LINGER_S = 1.0
# What the shutdown waits beyond grace_s: workers' DISCONNECT, threads, the context.
_SHUTDOWN_SLACK_S = 5.0
# How long run()'s thread may block before it gives pending signal handlers a turn.
_SIGNAL_CHECK_S = 0.5
_READY_POLL_S = 0.02

TaskHandler = Callable[[Task], Any]
EventHandler = Callable[[Event], Any]
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(slots=True)
class ServiceStats:
    """What a Service has done since it started. Counters only ever grow."""

    tasks_done: int = 0  # task handler calls that returned a usable result
    tasks_failed: int = 0  # task handler calls that raised or returned something unusable
    events_handled: int = 0  # event handler calls that returned
    events_failed: int = 0  # event handler calls that raised (logged, never fatal)
    results_published: int = 0  # result events handed to the publisher
    publish_errors: int = 0  # result events and heartbeats that could not be published
    heartbeats: int = 0  # heartbeat events handed to the publisher


@dataclass(frozen=True, slots=True)
class _Queue:
    name: str
    handler: TaskHandler
    concurrency: int
    publish: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Topic:
    prefix: str
    handler: EventHandler


class Service:
    """Serves task queues, handles topic events, publishes results and heartbeats.

    Register functions with the `task` and `on` decorators, then call `run()`
    (blocks; SIGINT and SIGTERM stop it when it runs in the main thread) or
    `start()` (returns at once; `stop()` and `join()` end it). `stop()` is
    safe from any thread, from handlers and from signal handlers.

    A clean stop: no task or event is started any more, running handlers get
    up to `grace_s` seconds to finish (their results are sent and published),
    then every socket is closed and what was sent is flushed.

    `endpoint`, `events_in` and `events_out` each take one endpoint, or several
    brokers' (a list, or "a,b") of which one is active: every socket follows it
    (docs/python-client.md, "Several brokers: following the active one").
    """

    def __init__(
        self,
        name: str,
        *,
        endpoint: Endpoints = DEFAULT_ENDPOINT,
        events_in: Endpoints = DEFAULT_EVENTS_IN,
        events_out: Endpoints = DEFAULT_EVENTS_OUT,
        heartbeat_s: float | None = 5.0,
        grace_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError("a service name is a str")
        if not name:
            raise ValueError("a service name must not be empty")
        longest = SERVICE_HEARTBEAT_PREFIX + name + "." + "0" * 8  # or a probe topic, shorter
        if len(longest.encode()) > MAX_TOPIC_BYTES:
            raise ValueError(f"service name too long for an event topic ({MAX_TOPIC_BYTES} bytes)")
        if heartbeat_s is not None and not 0 <= heartbeat_s < math.inf:
            raise ValueError("heartbeat_s must be a finite number >= 0, or None")
        if not 0 <= grace_s < math.inf:
            raise ValueError("grace_s must be a finite number >= 0")
        check_message_bytes(max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self.name = name
        # Each a comma-separated string: one endpoint, or several brokers' (a list or
        # "a,b" given), of which the sockets follow the active one.
        self.endpoint = joined(parse_endpoints(endpoint))
        self.events_in = joined(parse_endpoints(events_in))
        self.events_out = joined(parse_endpoints(events_out))
        self.heartbeat_s = heartbeat_s or None  # 0 and None: no heartbeats
        self.grace_s = grace_s
        # CURVE keys for a broker started with --auth, used by every socket of the
        # service (its principal needs the worker, publisher and subscriber roles its
        # queues and topics use: docs/security.md).
        self.credentials = credentials
        self.stats = ServiceStats()
        self._context_arg = context
        self._own_context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._queues: dict[str, _Queue] = {}
        self._topics: list[_Topic] = []
        self._workers: dict[str, Worker] = {}
        self._stats_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._publisher: Publisher | None = None
        self._subscriber: Subscriber | None = None
        self._probe_topic: str | None = None
        self._probed = False
        self._threads: list[threading.Thread] = []
        # Signal-safe: stop() only sets a flag and puts into a reentrant queue.
        self._control: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._halt = threading.Event()  # set by the shutdown: event and heartbeat threads end
        self._finished = threading.Event()
        self._started = False
        self._stop_requested = False
        self._stopping = False
        self._started_at = 0.0
        self._crash: BaseException | None = None
        self._clean: bool | None = None

    # ------------------------------------------------------------ registration

    def task(
        self,
        queue: str,
        *,
        concurrency: int = 1,
        publish: str | None = None,
        tags: tuple[str, ...] | list[str] = (),
    ) -> Callable[[F], F]:
        """Decorator: serve task queue `queue` with the decorated function.

        The function gets a `Task` and works as a `Worker` handler (plain or
        `async def`, `task.progress()`, `task.emit()`, `NonRetryableError`,
        `RetryLater`). It may return any value msgpack can pack: `bytes` become
        the task's result as they are, anything else is packed into one
        msgpack frame. A generator (or async generator) function streams: each
        value it yields is emitted as a chunk (bytes, or str as UTF-8), and
        the value a generator returns is the result, as above; an async
        generator's result is None (packed: msgpack nil), as is that of a
        generator that returns nothing. Once the attempt is cancelled the
        generator is closed instead of resumed.
        With `publish`, each result is also published as an event of that
        topic (correlation_id = the task id, reply_to = the task's
        "reply_to" header when it is a str).
        """
        self._check_not_started()
        name = _service_name(queue)
        if name in self._queues:
            raise ValueError(f"queue {name!r} is already served by this service")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise TypeError("concurrency must be an int")
        if not 1 <= concurrency <= ext.MAX_CREDIT:
            raise ValueError(f"concurrency must be between 1 and {ext.MAX_CREDIT}")
        if publish is not None:
            _check_topic(publish, "publish")
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise TypeError("tags must be a sequence of str")

        def register(handler: F) -> F:
            if not callable(handler):
                raise TypeError("a task handler must be callable")
            self._check_not_started()
            if name in self._queues:
                raise ValueError(f"queue {name!r} is already served by this service")
            self._queues[name] = _Queue(name, handler, concurrency, publish, tuple(tags))
            return handler

        return register

    def on(self, prefix: str) -> Callable[[F], F]:
        """Decorator: call the decorated function with every event whose type starts with `prefix`.

        Plain or `async def`. Events are handled one at a time, in the order
        they arrive; an event that matches several prefixes goes to each
        matching handler, in registration order. `""` matches every event.
        """
        self._check_not_started()
        if not isinstance(prefix, str):
            raise TypeError("a topic prefix is a str")
        if len(prefix.encode()) > MAX_TOPIC_BYTES:
            raise ValueError(f"a topic prefix has at most {MAX_TOPIC_BYTES} bytes")

        def register(handler: F) -> F:
            if not callable(handler):
                raise TypeError("an event handler must be callable")
            self._check_not_started()
            self._topics.append(_Topic(prefix, handler))
            return handler

        return register

    # ------------------------------------------------------------ public

    @property
    def queues(self) -> tuple[str, ...]:
        """The task queues served, in registration order."""
        return tuple(self._queues)

    @property
    def topics(self) -> tuple[str, ...]:
        """The topic prefixes subscribed to, each once, in registration order."""
        return tuple(dict.fromkeys(t.prefix for t in self._topics))

    @property
    def workers(self) -> Mapping[str, Worker]:
        """The Worker of each queue, once started (their `stats` and `connected`)."""
        return MappingProxyType(self._workers)

    @property
    def ready(self) -> bool:
        """True while running with every worker registered and the subscriptions in place.

        The subscriptions are in place once the service has received an event
        it published itself (a probe on `service.probe.<name>.<nonce>`), so
        its subscriber and its publisher are both connected to the bus.
        """
        if not self._started or self._stopping or self._stop_requested:
            return False
        if self._probe_topic is not None and not self._probed:
            return False
        return all(w.connected for w in self._workers.values())

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called (or the service is ending)."""
        return self._stop_requested or self._stopping

    @property
    def stopped(self) -> bool:
        """True once the shutdown is complete: every socket is closed."""
        return self._finished.is_set()

    @property
    def error(self) -> BaseException | None:
        """What stopped the service when it failed (a queue's worker that stopped by
        itself, say); `run()` raises it. None while it runs and after a clean stop."""
        return self._crash

    @property
    def clean_stop(self) -> bool | None:
        """After the shutdown: True if every running handler finished within `grace_s`."""
        return self._clean

    def start(self) -> Service:
        """Start serving in background threads and return at once; see `wait_ready()`."""
        self._claim()
        try:
            self._open()
        except BaseException:
            self._shutdown()
            raise
        thread = threading.Thread(target=self._supervise, name=f"zbroker-service-{self.name}")
        thread.daemon = True
        thread.start()
        return self

    def run(self) -> None:
        """Serve until `stop()`, SIGINT or SIGTERM, then shut down cleanly and return.

        Signals are handled only when called from the main thread; a second
        signal during the shutdown gets the handling it had before `run()`
        (Ctrl-C twice raises KeyboardInterrupt). An exception that is not an
        `Exception` (SystemExit, say) raised by an event handler stops the
        service and is re-raised here.
        """
        self._claim()
        previous = self._install_signal_handlers()
        try:
            try:
                self._open()
            except BaseException:
                self._shutdown()
                raise
            self._supervise()
        finally:
            _restore_signal_handlers(previous)
        if self._crash is not None:
            raise self._crash

    def stop(self) -> None:
        """Ask the service to stop; returns at once. Safe from any thread, handler or signal."""
        self._stop_requested = True
        self._control.put(None)  # SimpleQueue.put is reentrant

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait up to `timeout_s` (None: forever) for the shutdown to complete; True if it did.

        Never call it from a handler: the shutdown waits for that handler.
        """
        if not self._started:
            return True
        return self._finished.wait(timeout_s)

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Wait up to `timeout_s` (None: forever) until `ready`; False if stopped first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.ready:
            if self._finished.is_set() or self.stopping:
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_READY_POLL_S)
        return True

    def publish(
        self,
        type: str,
        payload: Any = None,
        *,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> Event:
        """Publish an event with this service's name as its source. Thread-safe.

        Works from `start()` until the shutdown closes the publisher (after the
        last handlers have finished); raises `RuntimeError` before and
        `ClientClosed` after. Like `Publisher.publish`, raises `TypeError` for
        a payload msgpack cannot pack and `ValueError` for a bad topic.
        """
        with self._publish_lock:
            publisher = self._publisher
            if publisher is None:
                if self._started:
                    raise ClientClosed(f"service {self.name!r} has stopped")
                raise RuntimeError(f"service {self.name!r} has not started")
            return publisher.publish(
                type, payload, correlation_id=correlation_id, reply_to=reply_to
            )

    def heartbeat_payload(self) -> dict[str, Any]:
        """The payload of this service's next heartbeat event."""
        with self._stats_lock:
            counts = asdict(self.stats)
        return {
            "name": self.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "uptime_s": round(time.monotonic() - self._started_at, 3) if self._started else 0.0,
            "tasks_done": counts["tasks_done"],
            "tasks_failed": counts["tasks_failed"],
            "events_handled": counts["events_handled"],
            "events_failed": counts["events_failed"],
            "queues": list(self.queues),
            "topics": list(self.topics),
        }

    def __enter__(self) -> Service:
        """Start in background threads; leaving the block stops the service and waits."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.join()

    # ------------------------------------------------------------ lifecycle

    def _check_not_started(self) -> None:
        if self._started:
            raise RuntimeError("register tasks and topics before the service starts")

    def _claim(self) -> None:
        if self._started:
            raise RuntimeError("a Service runs only once; create a new one")
        if self._stop_requested:
            raise RuntimeError("this Service was stopped before it started; create a new one")
        self._started = True
        self._started_at = time.monotonic()

    def _open(self) -> None:
        """Create the sockets and start every thread. On failure, `_shutdown` undoes it."""
        context = self._context_arg
        if context is None:
            context = self._own_context = zmq.Context()
        with self._publish_lock:
            self._publisher = Publisher(
                self.events_in, source=self.name, context=context, credentials=self.credentials
            )
        if self._topics:
            self._probe_topic = f"{SERVICE_PROBE_PREFIX}{self.name}.{secrets.token_hex(4)}"
            self._subscriber = Subscriber(
                self.events_out,
                *self.topics,
                self._probe_topic,
                context=context,
                credentials=self.credentials,
            )
        for q in self._queues.values():
            self._workers[q.name] = Worker(
                self.endpoint,
                q.name,
                self._task_handler(q),
                concurrency=q.concurrency,
                tags=q.tags,
                max_message_bytes=self.max_message_bytes,
                context=context,
                credentials=self.credentials,
            )
        for worker in self._workers.values():
            worker.start()
        if self._subscriber is not None:
            self._spawn(self._handle_events, "events")
        if self.heartbeat_s is not None:
            self._spawn(self._send_heartbeats, "heartbeat")
        logger.info(
            "service %r started: queues %s, topics %s",
            self.name,
            list(self.queues),
            list(self.topics),
        )

    def _spawn(self, target: Callable[[], None], role: str) -> None:
        thread = threading.Thread(target=target, name=f"zbroker-service-{self.name}-{role}")
        thread.daemon = True
        self._threads.append(thread)
        thread.start()

    def _supervise(self) -> None:
        try:
            # Wait in slices: a signal that arrives just before this thread blocks
            # would not run its Python handler until the thread wakes.
            while True:
                try:
                    self._control.get(timeout=_SIGNAL_CHECK_S)
                    break
                except queue.Empty:
                    if self._lost_worker():
                        break
        finally:
            self._shutdown()

    def _lost_worker(self) -> bool:
        """True if a queue's worker ended by itself (it failed): the whole service then
        stops and `run()` raises, so that whatever supervises the process restarts it,
        rather than a service that looks alive but no longer serves that queue."""
        for queue_name, worker in self._workers.items():
            if worker.stopped:  # the service has not asked it to stop: that comes later
                why = worker.error
                if isinstance(why, AuthenticationFailed | Forbidden):
                    # The broker refused this service's key: say so as it is.
                    self._crash = why
                    logger.error("service %r: %s; stopping the service", self.name, why)
                    return True
                self._crash = WorkerError(
                    f"service {self.name!r}: the worker of queue {queue_name!r} stopped"
                    + (f": {why}" if why is not None else "")
                )
                if why is not None:
                    self._crash.__cause__ = why
                logger.error("%s; stopping the service", self._crash)
                return True
        return False

    def _shutdown(self) -> None:
        """Stop taking work, let running handlers finish within grace_s, close, flush."""
        self._stopping = True
        self._halt.set()
        logger.info("service %r stopping", self.name)
        deadline = time.monotonic() + self.grace_s
        clean: list[bool] = []
        stoppers = []
        for worker in self._workers.values():
            # In parallel: every worker stops taking tasks at once.
            stopper = threading.Thread(
                target=self._stop_worker,
                args=(worker, clean),
                name=f"zbroker-service-{self.name}-stop-{worker.service}",
            )
            stopper.daemon = True
            stopper.start()
            stoppers.append(stopper)
        event_thread_done = True
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()) + 0.5)
            event_thread_done = event_thread_done and not thread.is_alive()
        if not event_thread_done:
            logger.warning(
                "service %r: an event handler is still running after %gs; abandoning it",
                self.name,
                self.grace_s,
            )
        for stopper in stoppers:
            stopper.join(max(0.0, deadline - time.monotonic()) + _SHUTDOWN_SLACK_S)
        self._clean = event_thread_done and len(clean) == len(stoppers) and all(clean)
        with self._publish_lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close(linger_s=_PUBLISH_LINGER_S)
        if self._subscriber is not None and not any(t.is_alive() for t in self._threads):
            self._subscriber.close()  # the event thread closed it, unless it never started
        self._terminate_context(event_thread_done)
        logger.info("service %r stopped (%s)", self.name, "clean" if self._clean else "abandoned")
        self._finished.set()

    def _stop_worker(self, worker: Worker, clean: list[bool]) -> None:
        clean.append(worker.stop(self.grace_s))

    def _terminate_context(self, all_closed: bool) -> None:
        """Terminating our own context flushes what was sent; bounded, since a stuck
        event handler still holds the subscriber's socket."""
        context = self._own_context
        if context is None or not all_closed:
            return  # with an abandoned handler's socket open, term() would block: leave it
        terminator = threading.Thread(target=context.term, name=f"zbroker-service-{self.name}-term")
        terminator.daemon = True
        terminator.start()
        terminator.join(_PUBLISH_LINGER_S + _SHUTDOWN_SLACK_S)
        if terminator.is_alive():
            logger.warning("service %r: zmq context did not terminate in time", self.name)

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous: dict[int, Any] = {}

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop()
            # The next signal gets the old handling: Ctrl-C twice forces the way out.
            _restore_signal_handlers(previous)

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
        return previous

    # ------------------------------------------------------------ tasks

    def _task_handler(self, q: _Queue) -> Callable[[Task], Any]:
        """The Worker's handler: the function's result (or stream) made into bytes.
        Generators are driven here, by the Worker's own drivers, so that the value
        they return is packed like any result."""
        handler = q.handler
        if _is_async(handler):

            async def run_async(task: Task) -> bytes:
                try:
                    result = handler(task)
                    if inspect.isasyncgen(result):
                        await _drive_async(task, result)
                        result = None
                    elif inspect.isawaitable(result):
                        result = await result
                except _Stopped:
                    raise  # the attempt was cancelled: neither done nor failed
                except Exception:
                    self._bump("tasks_failed")
                    raise
                return self._finish_task(q, task, result)

            return run_async

        def run(task: Task) -> bytes:
            try:
                result = handler(task)
                if inspect.isgenerator(result):
                    result = _drive(task, result)
            except _Stopped:
                raise
            except Exception:
                self._bump("tasks_failed")
                raise
            return self._finish_task(q, task, result)

        return run

    def _finish_task(self, q: _Queue, task: Task, result: object) -> bytes:
        """The result frame (and its event): bytes as they are, anything else msgpack."""
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never awaited: close it rather than leak a warning
            self._bump("tasks_failed")
            raise NonRetryableError("handler returned an awaitable: declare it with `async def`")
        if inspect.isasyncgen(result) or inspect.isgenerator(result):
            if inspect.isgenerator(result):
                result.close()
            self._bump("tasks_failed")
            raise NonRetryableError(
                "handler returned a generator it cannot stream from here:"
                " make the handler itself a generator (or async generator) function"
            )
        if isinstance(result, bytes | bytearray | memoryview):
            frame = bytes(result)
            payload: object = frame
        else:
            try:
                frame = msgpack.packb(result, use_bin_type=True)
            except Exception as exc:  # TypeError, ValueError, OverflowError...
                self._bump("tasks_failed")
                raise NonRetryableError(
                    f"the result ({type(result).__name__}) cannot be packed with msgpack: {exc}"
                ) from exc
            payload = result
        self._bump("tasks_done")
        # An attempt the broker took back has its result dropped: so is its event.
        if q.publish is not None and not task.cancelled:
            self._publish_result(q.publish, task, payload)
        return frame

    def _publish_result(self, topic: str, task: Task, payload: object) -> None:
        reply_to = task.headers.get("reply_to")
        try:
            self.publish(
                topic,
                payload,
                correlation_id=task.id,
                reply_to=reply_to if isinstance(reply_to, str) else None,
            )
        except Exception:
            # The task succeeded and its result goes to the broker all the same.
            self._bump("publish_errors")
            logger.warning(
                "service %r: the result of task %s could not be published on %r",
                self.name,
                task.id,
                topic,
                exc_info=True,
            )
        else:
            self._bump("results_published")

    # ------------------------------------------------------------ events

    def _handle_events(self) -> None:
        subscriber = self._subscriber
        assert subscriber is not None
        loop: asyncio.AbstractEventLoop | None = None
        probe_at = 0.0
        try:
            while not self._halt.is_set():
                if not self._probed and time.monotonic() >= probe_at:
                    probe_at = time.monotonic() + _PROBE_EVERY_S
                    self._probe()
                event = subscriber.recv(timeout_s=_EVENT_POLL_S)
                if event is None or self._halt.is_set():
                    continue
                if event.type == self._probe_topic:
                    if not self._probed:
                        self._probed = True
                        subscriber.unsubscribe(event.type)
                        logger.debug("service %r: subscriptions in place", self.name)
                    continue
                for topic in self._topics:
                    if event.type.startswith(topic.prefix):
                        loop = self._call_event_handler(topic, event, loop)
        except (AuthenticationFailed, Forbidden) as exc:
            logger.error("service %r: %s; stopping the service", self.name, exc)
            self._crash = exc
            self.stop()
        except BaseException as exc:
            logger.exception("service %r: the event thread failed", self.name)
            self._crash = exc
            self.stop()
        finally:
            subscriber.close()
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

    def _probe(self) -> None:
        assert self._probe_topic is not None
        # Dropped by our own PUB socket until our subscription has reached it.
        with contextlib.suppress(ClientClosed):
            self.publish(self._probe_topic, {"pid": os.getpid()})

    def _call_event_handler(
        self, topic: _Topic, event: Event, loop: asyncio.AbstractEventLoop | None
    ) -> asyncio.AbstractEventLoop | None:
        try:
            result = topic.handler(event)
            if inspect.isawaitable(result):
                # `async def` handlers run on this thread's own event loop.
                if loop is None:
                    loop = asyncio.new_event_loop()
                loop.run_until_complete(_awaited(result))
        except Exception:
            self._bump("events_failed")
            logger.exception(
                "service %r: handler for %r failed on event %r",
                self.name,
                topic.prefix,
                event.type,
            )
        else:
            self._bump("events_handled")
        return loop

    # ------------------------------------------------------------ heartbeats

    def _send_heartbeats(self) -> None:
        assert self.heartbeat_s is not None
        topic = SERVICE_HEARTBEAT_PREFIX + self.name
        while not self._halt.is_set():
            try:
                self.publish(topic, self.heartbeat_payload())
            except Exception:
                self._bump("publish_errors")
                logger.warning("service %r: heartbeat not published", self.name, exc_info=True)
            else:
                self._bump("heartbeats")
            if self._halt.wait(self.heartbeat_s):
                return

    def _bump(self, counter: str) -> None:
        with self._stats_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)


# ------------------------------------------------------------ helpers


def _check_topic(topic: object, what: str) -> None:
    if not isinstance(topic, str):
        raise TypeError(f"{what} must be a str topic")
    if not 1 <= len(topic.encode()) <= MAX_TOPIC_BYTES:
        raise ValueError(f"{what} must be 1..{MAX_TOPIC_BYTES} bytes of UTF-8")


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        with contextlib.suppress(ValueError, TypeError):  # not the main thread; a C handler
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
