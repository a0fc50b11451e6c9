"""The processes of the compare workload other than the servers: producers, workers
and a requester for each system zbroker is compared with, one process each, each
written with that system's ordinary Python client (redis-py, pika, nats-py; zbroker's
own `zbroker.client` for the crash runs, where reconnecting matters).

Run by bench/compare.py as `python bench/compare_peers.py ROLE --system S ...`. The
reporting follows bench/durable_peers.py, so durable.py's collector reads both:

- a producer prints `ready`, waits for SIGUSR1 (with --wait-for-signal), sends its
  tasks, and prints one JSON line: wall-clock `started` (first send) and `ended`
  (last confirm), its CPU time, and each call's confirm latency in microseconds;
- a worker prints `ready` once subscribed, then `{"count", "last_done"}` whenever it
  has been idle for WORKER_REPORT_IDLE_S after doing work;
- a requester times sequential round trips (enqueue one task, wait for its reply)
  and prints `{"latency_us": {...}}`;
- `sequential` times confirmed enqueues one at a time (no consumer) and prints
  `{"latency_us": [...], "started", "ended", ...}`.

A task's body is BODY_BYTES long: one byte saying whether a reply is wanted, the
task's sequence number (8 bytes, big-endian), then filler. With --record FILE, a
producer appends the sequence number of every task confirmed to it, and a worker
that of every task it handled (before acknowledging it), each flushed at once:
the crash workload compares the two files.

Clocks as in durable_peers: `time.time()` for what crosses processes,
`time.perf_counter()` inside one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any

from servers import GROUP, NATS_ACK_WAIT_S, QUEUE, STREAM

REDIS_LIST = "redis-list"
REDIS_STREAM = "redis-stream"
# The stream on a Redis with `appendfsync always` (bench/servers.py): the same peers.
REDIS_STREAM_ALWAYS = "redis-stream-always"
RABBITMQ_P1 = "rabbitmq-p1"
RABBITMQ_P100 = "rabbitmq-p100"
RABBITMQ_QUORUM = "rabbitmq-quorum"  # a quorum queue, prefetch 100
NATS = "nats"
ZBROKER = "zbroker"  # zbroker.client peers (crash runs, sequential enqueues)
CELERY = "celery"  # on Redis
DRAMATIQ = "dramatiq"  # on Redis
SYSTEMS = (
    REDIS_LIST,
    REDIS_STREAM,
    REDIS_STREAM_ALWAYS,
    RABBITMQ_P1,
    RABBITMQ_P100,
    RABBITMQ_QUORUM,
    NATS,
    ZBROKER,
    CELERY,
    DRAMATIQ,
)
# Systems whose peers are another system's: only the server differs.
SAME_PEERS = {REDIS_STREAM_ALWAYS: REDIS_STREAM}
# Task frameworks: their enqueue call is synchronous and their task arguments are JSON,
# so their producers send one task at a time and the body is text.
FRAMEWORKS = (CELERY, DRAMATIQ)
PREFETCH = {RABBITMQ_P1: 1, RABBITMQ_P100: 100, RABBITMQ_QUORUM: 100}


def queue_arguments(system: str) -> dict[str, str] | None:
    """The RabbitMQ queue's arguments: a quorum queue (Raft log fsynced before the
    confirm; durable, one replica on one node) or a classic queue."""
    return {"x-queue-type": "quorum"} if system == RABBITMQ_QUORUM else None


TASK = b"T"
REQUEST = b"R"  # a reply is wanted
RESULT = b"ok"
REPLIES = "bench.replies"  # the reply list / stream / subject of the requester
STREAM_KEY = "bench.stream"  # Redis stream key (STREAM is the NATS stream's name)
ZBROKER_SERVICE = "bench"

WORKER_REPORT_IDLE_S = 0.25
RECONNECT_DELAY_S = 0.1
ANSWER_TIMEOUT_S = 60.0


def body(kind: bytes, seq: int, size: int) -> bytes:
    head = kind + seq.to_bytes(8, "big")
    return head + b"x" * max(0, size - len(head))


def text_body(kind: bytes, seq: int, size: int) -> str:
    """The same as `body`, as text (JSON task arguments): the number in 16 digits."""
    head = f"{kind.decode()}{seq:016d}"
    return head + "x" * max(0, size - len(head))


def seq_of_text(payload: str) -> tuple[bool, int]:
    return payload[:1] == REQUEST.decode(), int(payload[1:17])


def seq_of(payload: bytes) -> tuple[bool, int]:
    """(reply wanted, sequence number) of a task body."""
    return payload[:1] == REQUEST, int.from_bytes(payload[1:9], "big")


class Recorder:
    """Sequence numbers appended to a file, 8 bytes each, flushed at once (the process
    may be killed at any moment: what is in the file is what happened)."""

    def __init__(self, path: str | None) -> None:
        self._file: IO[bytes] | None = open(path, "ab", buffering=0) if path else None  # noqa: SIM115

    def add(self, seqs: list[int]) -> None:
        if self._file is not None and seqs:
            self._file.write(b"".join(s.to_bytes(8, "big") for s in seqs))


# ------------------------------------------------------------------ setup


def setup(system: str, url: str) -> None:
    """Declare what the system needs before anyone uses it (queue, stream, group,
    consumer), as an operator would: durable, and configured for reliable work."""
    args = queue_arguments(system)
    system = SAME_PEERS.get(system, system)
    if system == REDIS_STREAM:
        import redis

        r = redis.Redis.from_url(url)
        try:
            r.xgroup_create(STREAM_KEY, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        finally:
            r.close()
    elif system in PREFETCH:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(url))
        connection.channel().queue_declare(QUEUE, durable=True, arguments=args)
        connection.close()
    elif system == NATS:

        async def declare() -> None:
            import nats
            from nats.js.api import AckPolicy, RetentionPolicy, StorageType

            nc = await nats.connect(url)
            js = nc.jetstream()
            await js.add_stream(
                name=STREAM,
                subjects=[QUEUE],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
            await js.add_consumer(
                STREAM,
                durable_name=GROUP,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=NATS_ACK_WAIT_S,
            )
            await nc.close()

        asyncio.run(declare())


def depth(system: str, url: str) -> int:
    """How many tasks wait in the queue (none delivered yet); raises until the
    server answers."""
    system = SAME_PEERS.get(system, system)
    if system in (REDIS_LIST, REDIS_STREAM):
        import redis

        r = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=10)
        try:
            return int(r.llen(QUEUE) if system == REDIS_LIST else r.xlen(STREAM_KEY))
        finally:
            r.close()
    if system in PREFETCH:
        import pika

        params = pika.URLParameters(url)
        params.socket_timeout = 1
        connection = pika.BlockingConnection(params)
        try:
            ok = connection.channel().queue_declare(QUEUE, durable=True, passive=True)
            return int(ok.method.message_count)
        finally:
            connection.close()

    async def stream_messages() -> int:
        import nats

        nc = await nats.connect(url, allow_reconnect=False, error_cb=_quiet)
        try:
            info = await nc.jetstream().stream_info(STREAM)
            return int(info.state.messages)
        finally:
            await nc.close()

    return asyncio.run(stream_messages())


async def _quiet(exc: Exception) -> None:
    """nats-py error callback: reconnects are expected in the crash runs."""


# ------------------------------------------------------------------ producers


class Calls:
    """The calls of one producer: `count` tasks from `first_seq`, `per_call` to a call."""

    def __init__(self, count: int, per_call: int, first_seq: int, size: int) -> None:
        self.count, self.per_call, self.first_seq, self.size = count, per_call, first_seq, size
        self.n = -(-count // per_call)

    def seqs(self, i: int) -> range:
        start = self.first_seq + i * self.per_call
        return range(start, min(start + self.per_call, self.first_seq + self.count))

    def bodies(self, i: int) -> list[bytes]:
        return [body(TASK, s, self.size) for s in self.seqs(i)]


def _report(
    started: float, ended: float, cpu_s: float, latencies_us: list[int], count: int
) -> None:
    latencies_us.sort()
    print(
        json.dumps(
            {
                "tasks": count,
                "calls": len(latencies_us),
                "started": started,
                "ended": ended,
                "cpu_s": cpu_s,
                "latencies_us": latencies_us,
            },
            separators=(",", ":"),
        ),
        flush=True,
    )


async def _drive(
    send: Callable[[list[bytes]], Awaitable[None]],
    calls: Calls,
    in_flight: int,
    recorder: Recorder,
    wait_for_signal: bool,
) -> None:
    """Keep `in_flight` calls outstanding (one coroutine each, each sending its next call
    once the last is confirmed) until every call is confirmed; then report."""
    print("ready", flush=True)
    if wait_for_signal:
        await asyncio.get_running_loop().run_in_executor(None, signal.sigwait, {signal.SIGUSR1})
    latencies: list[int] = []
    next_call = 0
    clock = time.perf_counter_ns

    async def lane() -> None:
        nonlocal next_call
        while next_call < calls.n:
            i = next_call
            next_call += 1
            payloads = calls.bodies(i)
            t0 = clock()
            await asyncio.wait_for(send(payloads), ANSWER_TIMEOUT_S)
            latencies.append((clock() - t0) // 1000)
            recorder.add(list(calls.seqs(i)))

    started = time.time()
    cpu = time.process_time()
    await asyncio.gather(*(lane() for _ in range(min(in_flight, calls.n))))
    _report(started, time.time(), time.process_time() - cpu, latencies, calls.count)


def producer(system: str, url: str, calls: Calls, in_flight: int, args: argparse.Namespace) -> None:
    recorder = Recorder(args.record)
    if args.wait_for_signal:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    system = SAME_PEERS.get(system, system)
    if system in PREFETCH:
        _rabbitmq_producer(
            url, calls, in_flight, recorder, args.wait_for_signal, queue_arguments(system)
        )
        return
    if system in FRAMEWORKS:
        if calls.per_call != 1 or in_flight != 1:
            sys.exit(f"{system}: one task per call, one call at a time")
        _framework_producer(system, url, calls, recorder, args.wait_for_signal)
        return
    batch = calls.per_call > 1
    asyncio.run(
        _async_producer(system, url, calls, in_flight, recorder, args.wait_for_signal, batch)
    )


async def _async_producer(
    system: str,
    url: str,
    calls: Calls,
    in_flight: int,
    recorder: Recorder,
    wait_for_signal: bool,
    batch: bool,
) -> None:
    if system in (REDIS_LIST, REDIS_STREAM):
        import redis.asyncio as aredis

        r = aredis.Redis.from_url(url, max_connections=in_flight + 1)

        async def send_list(payloads: list[bytes]) -> None:
            # LPUSH with several values is one command: Redis's batch.
            await r.lpush(QUEUE, *payloads)

        async def send_stream(payloads: list[bytes]) -> None:
            if len(payloads) == 1:
                await r.xadd(STREAM_KEY, {"b": payloads[0]})
                return
            # XADD takes one entry: a batch is a pipeline of them (one round trip).
            pipe = r.pipeline(transaction=False)
            for p in payloads:
                pipe.xadd(STREAM_KEY, {"b": p})
            await pipe.execute()

        # Open the pool's connections before the clock starts, as a long-lived
        # producer would have them.
        await asyncio.gather(*(r.ping() for _ in range(in_flight)))
        await _drive(
            send_list if system == REDIS_LIST else send_stream,
            calls,
            in_flight,
            recorder,
            wait_for_signal,
        )
        await r.aclose()
    elif system == NATS:
        import nats

        nc = await nats.connect(url, error_cb=_quiet)
        js = nc.jetstream()

        async def send_nats(payloads: list[bytes]) -> None:
            if len(payloads) == 1:
                await js.publish(QUEUE, payloads[0])
                return
            # No batch publish in JetStream 2.9: publish them all, then await every ack.
            futures = [await js.publish_async(QUEUE, p) for p in payloads]
            for ack in await asyncio.gather(*futures):
                if ack.stream != STREAM:
                    sys.exit(f"published into {ack.stream!r}")

        await _drive(send_nats, calls, in_flight, recorder, wait_for_signal)
        await nc.close()
    elif system == ZBROKER:
        from zbroker.client import AsyncClient

        client = AsyncClient(url, timeout_s=5.0, retries=100)

        async def send_zbroker(payloads: list[bytes]) -> None:
            if len(payloads) == 1:
                await client.enqueue(ZBROKER_SERVICE, payloads[0])
            else:
                await client.enqueue_many(ZBROKER_SERVICE, payloads)

        await _drive(send_zbroker, calls, in_flight, recorder, wait_for_signal)
        await client.aclose()
    else:
        sys.exit(f"no producer for {system}")


def _rabbitmq_producer(
    url: str,
    calls: Calls,
    in_flight: int,
    recorder: Recorder,
    wait_for_signal: bool,
    arguments: dict[str, str] | None,
) -> None:
    """Persistent messages with publisher confirms on pika's asynchronous connection,
    keeping `in_flight` calls unconfirmed (a call is one message, or `per_call`
    messages published back to back: AMQP 0-9-1 has no batch publish)."""
    import pika

    run = _RabbitmqConfirms(calls, in_flight, recorder, wait_for_signal, arguments)
    run.connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=run.on_open,
        on_open_error_callback=run.on_failed,
        on_close_callback=run.on_closed,
    )
    run.connection.ioloop.start()
    if run.error is not None:
        sys.exit(run.error)
    # No error: the connection was closed by on_confirm once every call was confirmed.
    assert run.started is not None and run.ended is not None and run.cpu_s is not None
    _report(run.started, run.ended, run.cpu_s, run.latencies, calls.count)


class _RabbitmqConfirms:
    """The callbacks of `_rabbitmq_producer`'s connection and what they share: pika calls
    on_open, on_channel, on_declared, on_confirm_mode, then on_confirm per confirm."""

    def __init__(
        self,
        calls: Calls,
        in_flight: int,
        recorder: Recorder,
        wait_for_signal: bool,
        arguments: dict[str, str] | None,
    ) -> None:
        import pika
        from pika.spec import Basic

        self.arguments = arguments
        self.calls, self.in_flight = calls, in_flight
        self.recorder, self.wait_for_signal = recorder, wait_for_signal
        self.properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        self.nack = Basic.Nack
        self.clock = time.perf_counter_ns
        self.next_call = 0
        self.tag = 0  # the last delivery tag published
        self.low = 1  # tags below it are confirmed
        self.done = 0  # calls confirmed
        self.error: str | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.cpu = 0.0
        self.cpu_s: float | None = None
        self.pending: dict[int, int] = {}  # delivery tag -> call
        self.remaining: dict[int, int] = {}  # call -> messages not yet confirmed
        self.sent_at: dict[int, int] = {}
        self.latencies: list[int] = []
        self.channel: Any = None
        self.connection: Any = None

    def publish_more(self) -> None:
        calls, remaining, pending = self.calls, self.remaining, self.pending
        while self.next_call < calls.n and len(remaining) < self.in_flight:
            i = self.next_call
            self.next_call += 1
            payloads = calls.bodies(i)
            remaining[i] = len(payloads)
            self.sent_at[i] = self.clock()
            for p in payloads:
                self.tag += 1
                pending[self.tag] = i
                self.channel.basic_publish("", QUEUE, p, self.properties)

    def confirmed(self, tag: int) -> None:
        i = self.pending.pop(tag)
        self.remaining[i] -= 1
        if self.remaining[i] == 0:
            del self.remaining[i]
            self.latencies.append((self.clock() - self.sent_at.pop(i)) // 1000)
            self.recorder.add(list(self.calls.seqs(i)))
            self.done += 1

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, self.nack):
            self.error = f"the broker refused (nack) delivery tag {method.delivery_tag}"
            self.connection.close()
            return
        if method.multiple:
            # Every tag up to this one; those below `low` were confirmed before.
            for tag in range(self.low, method.delivery_tag + 1):
                if tag in self.pending:
                    self.confirmed(tag)
            self.low = method.delivery_tag + 1
        else:
            self.confirmed(method.delivery_tag)
        if self.done == self.calls.n:
            self.ended = time.time()
            self.cpu_s = time.process_time() - self.cpu
            self.connection.close()
        else:
            self.publish_more()

    def on_confirm_mode(self, _frame: Any) -> None:
        print("ready", flush=True)
        if self.wait_for_signal:
            signal.sigwait({signal.SIGUSR1})
        self.started = time.time()
        self.cpu = time.process_time()
        self.publish_more()

    def on_declared(self, _frame: Any) -> None:
        self.channel.confirm_delivery(self.on_confirm, callback=self.on_confirm_mode)

    def on_channel(self, ch: Any) -> None:
        self.channel = ch
        ch.queue_declare(QUEUE, durable=True, arguments=self.arguments, callback=self.on_declared)

    def on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self.on_channel)

    def on_failed(self, _conn: Any, exc: BaseException) -> None:
        self.error = f"connection failed: {exc!r}"
        self.connection.ioloop.stop()

    def on_closed(self, _conn: Any, reason: BaseException) -> None:
        if self.ended is None and self.error is None:
            self.error = f"connection closed: {reason!r}"
        self.connection.ioloop.stop()


def _framework_producer(
    system: str, url: str, calls: Calls, recorder: Recorder, wait_for_signal: bool
) -> None:
    """Celery's `delay` or Dramatiq's `send`, one task at a time: both return once the
    message is written to Redis."""
    if system == CELERY:
        noop = _celery_app(url, tally=None).tasks["bench.noop"]

        def send(payload: str) -> None:
            noop.delay(payload)

        # Connect before the clock starts, as a long-lived producer would be.
        noop.app.connection_for_write().ensure_connection(max_retries=3)
    else:
        actors = _dramatiq_actors(url, tally=None)

        def send(payload: str) -> None:
            actors["noop"].send(payload)

    print("ready", flush=True)
    if wait_for_signal:
        signal.sigwait({signal.SIGUSR1})
    clock = time.perf_counter_ns
    latencies: list[int] = []
    started = time.time()
    cpu = time.process_time()
    for i in range(calls.n):
        seq = calls.first_seq + i
        t0 = clock()
        send(text_body(TASK, seq, calls.size))
        latencies.append((clock() - t0) // 1000)
        recorder.add([seq])
    _report(started, time.time(), time.process_time() - cpu, latencies, calls.count)


def _celery_app(url: str, tally: Tally | None) -> Any:
    """A Celery app on Redis set up as its documentation recommends for tasks that must
    not be lost: acknowledged after they ran (`task_acks_late`), given back if the
    worker process dies (`task_reject_on_worker_lost`), one reserved at a time
    (`worker_prefetch_multiplier` 1). Results only for the round trips."""
    from celery import Celery

    app = Celery("zbench", broker=url, backend=url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_redirect_stdouts=False,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.noop")
    def noop(payload: str) -> None:
        if tally is not None:
            tally.handled([seq_of_text(payload)[1]])

    @app.task(name="bench.echo", ignore_result=False)
    def echo(payload: str) -> str:
        if tally is not None:
            tally.handled([seq_of_text(payload)[1]])
        return RESULT.decode()

    return app


def _dramatiq_actors(url: str, tally: Tally | None) -> dict[str, Any]:
    """Dramatiq's Redis broker with its default middleware (a message is acknowledged
    after the actor ran; a dead worker's messages are requeued), and the Results
    middleware on the same Redis for the round trips."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends.redis import RedisBackend

    broker = RedisBroker(url=url)
    broker.add_middleware(Results(backend=RedisBackend(url=url)))
    dramatiq.set_broker(broker)

    @dramatiq.actor(actor_name="noop", broker=broker)
    def noop(payload: str) -> None:
        if tally is not None:
            tally.handled([seq_of_text(payload)[1]])

    @dramatiq.actor(actor_name="echo", broker=broker, store_results=True)
    def echo(payload: str) -> str:
        if tally is not None:
            tally.handled([seq_of_text(payload)[1]])
        return RESULT.decode()

    return {"noop": noop, "echo": echo, "broker": broker}


# ------------------------------------------------------------------ workers


class Tally:
    """A worker's count, reported once idle (the collector sums the latest reports)."""

    def __init__(self, recorder: Recorder) -> None:
        self.count = 0
        self.reported = 0
        self.last_done = 0.0
        self.recorder = recorder
        self._lock = threading.Lock()

    def handled(self, seqs: list[int]) -> None:
        with self._lock:  # Dramatiq's worker threads call this concurrently
            self.recorder.add(seqs)
            self.count += len(seqs)
            self.last_done = time.time()

    def idle(self) -> None:
        if self.count != self.reported:
            print(json.dumps({"count": self.count, "last_done": self.last_done}), flush=True)
            self.reported = self.count


def worker(system: str, url: str, credit: int, args: argparse.Namespace) -> None:
    tally = Tally(Recorder(args.record))
    arguments = queue_arguments(system)
    system = SAME_PEERS.get(system, system)
    if system == REDIS_LIST:
        _redis_list_worker(url, tally)
    elif system == REDIS_STREAM:
        _redis_stream_worker(url, credit, tally)
    elif system in PREFETCH:
        _rabbitmq_worker(url, PREFETCH[system], arguments, tally)
    elif system == NATS:
        asyncio.run(_nats_worker(url, credit, tally))
    elif system == ZBROKER:
        _zbroker_worker(url, credit, tally)
    elif system == CELERY:
        _celery_worker(url, tally)
    elif system == DRAMATIQ:
        _dramatiq_worker(url, tally)
    else:
        sys.exit(f"no worker for {system}")


def _report_when_idle(tally: Tally) -> None:
    """For workers whose loop belongs to the framework: report from a thread."""
    while True:
        before = tally.count
        time.sleep(WORKER_REPORT_IDLE_S)
        if tally.count == before:
            tally.idle()


def _keep_stdout_for_reports() -> None:
    """Frameworks print banners and logs to stdout; the collector reads JSON there.
    Keep the real stdout for our lines and send file descriptor 1 to stderr."""
    reports = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = reports


def _celery_worker(url: str, tally: Tally) -> None:
    """One `celery worker` process with the solo pool: tasks run in its main thread."""
    from celery.signals import worker_ready

    _keep_stdout_for_reports()
    app = _celery_app(url, tally)

    @worker_ready.connect
    def on_ready(**_: Any) -> None:
        print("ready", flush=True)
        threading.Thread(target=_report_when_idle, args=(tally,), daemon=True).start()

    app.worker_main(["worker", "--pool", "solo", "--loglevel", "WARNING"])


def _dramatiq_worker(url: str, tally: Tally) -> None:
    """dramatiq.Worker in this process with its default 8 worker threads."""
    import dramatiq

    _keep_stdout_for_reports()
    actors = _dramatiq_actors(url, tally)
    worker = dramatiq.Worker(actors["broker"], worker_threads=8)
    worker.start()
    print("ready", flush=True)
    _report_when_idle(tally)


def _redis_list_worker(url: str, tally: Tally) -> None:
    """The reliable queue: BLMOVE each task into this worker's own processing list,
    handle it, LREM it from there. Tasks left in the processing list (the worker or
    the server died in between) are handled again on (re)connect."""
    import redis

    r = redis.Redis.from_url(url)
    processing = f"{QUEUE}.processing.{os.getpid()}"
    recovering = True
    print("ready", flush=True)
    while True:
        try:
            if recovering:
                for value in r.lrange(processing, 0, -1):
                    _redis_handle(r, value, tally)
                    r.lrem(processing, 1, value)
                recovering = False
            value = r.blmove(QUEUE, processing, WORKER_REPORT_IDLE_S, "RIGHT", "LEFT")
            if value is None:
                tally.idle()
                continue
            _redis_handle(r, value, tally)
            r.lrem(processing, 1, value)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            recovering = True
            time.sleep(RECONNECT_DELAY_S)


def _redis_handle(r: Any, value: bytes, tally: Tally) -> None:
    reply, seq = seq_of(value)
    tally.handled([seq])
    if reply:
        r.lpush(REPLIES, RESULT)


def _redis_stream_worker(url: str, credit: int, tally: Tally) -> None:
    """A consumer of the group: XREADGROUP up to `credit` entries, handle them, XACK
    them in one command. On (re)connect it first reads its own pending entries
    (delivered before, never acknowledged)."""
    import redis

    r = redis.Redis.from_url(url)
    consumer = f"c{os.getpid()}"
    start_id = "0"  # own pending entries first
    print("ready", flush=True)
    block_ms = int(WORKER_REPORT_IDLE_S * 1000)
    while True:
        try:
            got = r.xreadgroup(
                GROUP,
                consumer,
                {STREAM_KEY: start_id},
                count=credit,
                block=None if start_id == "0" else block_ms,
            )
            entries = got[0][1] if got else []
            if not entries:
                if start_id == "0":
                    start_id = ">"
                else:
                    tally.idle()
                continue
            seqs = []
            replies = 0
            for _entry_id, fields in entries:
                if not fields:  # deleted since delivered
                    continue
                reply, seq = seq_of(fields[b"b"])
                seqs.append(seq)
                replies += reply
            tally.handled(seqs)
            for _ in range(replies):
                r.xadd(REPLIES, {"r": RESULT})
            r.xack(STREAM_KEY, GROUP, *(entry_id for entry_id, _ in entries))
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            start_id = "0"
            time.sleep(RECONNECT_DELAY_S)


def _rabbitmq_worker(
    url: str, prefetch: int, arguments: dict[str, str] | None, tally: Tally
) -> None:
    """basic.consume with manual acks and `prefetch` unacknowledged messages at most;
    each message is acknowledged once handled."""
    import pika
    import pika.exceptions

    first = True
    while True:
        try:
            connection = pika.BlockingConnection(pika.URLParameters(url))
            channel = connection.channel()
            channel.basic_qos(prefetch_count=prefetch)
            channel.queue_declare(QUEUE, durable=True, arguments=arguments)

            def on_message(ch: Any, method: Any, props: Any, payload: bytes) -> None:
                reply, seq = seq_of(payload)
                tally.handled([seq])
                if reply:
                    ch.basic_publish(
                        "",
                        props.reply_to,
                        RESULT,
                        pika.BasicProperties(correlation_id=props.correlation_id),
                    )
                ch.basic_ack(method.delivery_tag)

            channel.basic_consume(QUEUE, on_message, auto_ack=False)
            if first:
                print("ready", flush=True)
                first = False
            while True:
                before = tally.count
                connection.process_data_events(time_limit=WORKER_REPORT_IDLE_S)
                if tally.count == before:
                    tally.idle()
        except (pika.exceptions.AMQPError, OSError):
            time.sleep(RECONNECT_DELAY_S)


async def _nats_worker(url: str, credit: int, tally: Tally) -> None:
    """A pull subscriber of the shared durable consumer: fetch up to `credit`
    messages, handle each and acknowledge it."""
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    nc = await nats.connect(
        url,
        error_cb=_quiet,
        reconnect_time_wait=RECONNECT_DELAY_S,
        max_reconnect_attempts=-1,
    )
    js = nc.jetstream()
    psub = await js.pull_subscribe(QUEUE, durable=GROUP, stream=STREAM)
    print("ready", flush=True)
    while True:
        try:
            msgs = await psub.fetch(credit, timeout=WORKER_REPORT_IDLE_S)
        except (TimeoutError, NatsTimeout):
            tally.idle()
            continue
        except Exception:
            await asyncio.sleep(RECONNECT_DELAY_S)  # disconnected: the client reconnects
            continue
        seqs = []
        for msg in msgs:
            reply, seq = seq_of(msg.data)
            seqs.append(seq)
            if reply:
                await nc.publish(REPLIES, RESULT)
        tally.handled(seqs)
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.ack()


def _zbroker_worker(url: str, credit: int, tally: Tally) -> None:
    """zbroker's own Worker (reconnects and re-registers by itself), `credit` tasks at
    once as coroutines of an async handler."""
    from zbroker.client import Task, Worker

    async def handle(task: Task) -> bytes:
        tally.handled([seq_of(task.payload)[1]])
        return RESULT

    with Worker(
        url,
        ZBROKER_SERVICE,
        handle,
        concurrency=credit,
        heartbeat_interval_s=1.0,
        reconnect_delay_s=RECONNECT_DELAY_S,
        max_reconnect_delay_s=0.5,
    ):
        print("ready", flush=True)
        while True:
            before = tally.count
            time.sleep(WORKER_REPORT_IDLE_S)
            if tally.count == before:
                tally.idle()


# ------------------------------------------------------------------ requester


def requester(system: str, url: str, samples: int, warmup: int, size: int) -> None:
    """Sequential round trips: enqueue one task that wants a reply, wait for the reply."""
    arguments = queue_arguments(system)
    system = SAME_PEERS.get(system, system)
    if system in (REDIS_LIST, REDIS_STREAM):
        round_trip = _redis_round_trip(system, url)
    elif system in PREFETCH:
        round_trip = _rabbitmq_round_trip(url, arguments)
    elif system == NATS:
        _nats_requester(url, samples, warmup, size)
        return
    elif system == ZBROKER:
        round_trip = _zbroker_round_trip(url)
    elif system == CELERY:
        echo = _celery_app(url, tally=None).tasks["bench.echo"]

        def round_trip(payload: bytes) -> None:
            echo.delay(payload.decode()).get(timeout=ANSWER_TIMEOUT_S)

    elif system == DRAMATIQ:
        actor = _dramatiq_actors(url, tally=None)["echo"]

        def round_trip(payload: bytes) -> None:
            actor.send(payload.decode()).get_result(block=True, timeout=int(ANSWER_TIMEOUT_S * 1e3))

    else:
        sys.exit(f"no requester for {system}")
    print("ready", flush=True)
    clock = time.perf_counter_ns
    times: list[int] = []
    make = (lambda i: text_body(REQUEST, i, size).encode()) if system in FRAMEWORKS else None
    for i in range(warmup + samples):
        payload = make(i) if make else body(REQUEST, i, size)
        t0 = clock()
        round_trip(payload)
        if i >= warmup:
            times.append(clock() - t0)
    _print_latency(times)


def _print_latency(times_ns: list[int]) -> None:
    print(json.dumps({"latency_us": [t / 1000 for t in sorted(times_ns)]}), flush=True)


def _redis_round_trip(system: str, url: str) -> Callable[[bytes], None]:
    import redis

    r = redis.Redis.from_url(url, socket_timeout=ANSWER_TIMEOUT_S)
    r.delete(REPLIES)
    last = "$"

    def via_list(payload: bytes) -> None:
        r.lpush(QUEUE, payload)
        if r.brpop([REPLIES], timeout=ANSWER_TIMEOUT_S) is None:
            sys.exit("no reply")

    def via_stream(payload: bytes) -> None:
        nonlocal last
        if last == "$":
            last = r.xadd(REPLIES, {"r": b"mark"}).decode()
        r.xadd(STREAM_KEY, {"b": payload})
        got = r.xread({REPLIES: last}, count=1, block=int(ANSWER_TIMEOUT_S * 1000))
        if not got:
            sys.exit("no reply")
        last = got[0][1][0][0].decode()

    return via_list if system == REDIS_LIST else via_stream


def _rabbitmq_round_trip(url: str, arguments: dict[str, str] | None) -> Callable[[bytes], None]:
    """RPC as RabbitMQ documents it: a persistent message with `reply_to` set to the
    direct reply-to pseudo-queue, confirmed; the reply consumed from that queue."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(QUEUE, durable=True, arguments=arguments)
    channel.confirm_delivery()
    replies: list[bytes] = []
    channel.basic_consume(
        "amq.rabbitmq.reply-to", lambda ch, m, p, b: replies.append(b), auto_ack=True
    )
    counter = iter(range(1 << 62))

    def round_trip(payload: bytes) -> None:
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            reply_to="amq.rabbitmq.reply-to",
            correlation_id=str(next(counter)),
        )
        channel.basic_publish("", QUEUE, payload, properties)  # returns once confirmed
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while not replies:
            connection.process_data_events(time_limit=0.05)
            if time.monotonic() > deadline:
                sys.exit("no reply")
        replies.clear()

    return round_trip


def _nats_requester(url: str, samples: int, warmup: int, size: int) -> None:
    async def run() -> None:
        import nats

        nc = await nats.connect(url, error_cb=_quiet)
        js = nc.jetstream()
        sub = await nc.subscribe(REPLIES)
        await nc.flush()
        print("ready", flush=True)
        clock = time.perf_counter_ns
        times: list[int] = []
        for i in range(warmup + samples):
            payload = body(REQUEST, i, size)
            t0 = clock()
            await js.publish(QUEUE, payload)
            await sub.next_msg(timeout=ANSWER_TIMEOUT_S)
            if i >= warmup:
                times.append(clock() - t0)
        _print_latency(times)
        await nc.close()

    asyncio.run(run())


def _zbroker_round_trip(url: str) -> Callable[[bytes], None]:
    """ZBC01 REQUEST (enqueue, committed, then held until the task's result) on a
    DEALER, frames built with zbroker's pure codecs as bench/durable_peers.py does."""
    import zmq

    from zbroker.protocol import zbc

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = int(ANSWER_TIMEOUT_S * 1000)
    sock.connect(url)
    rids = iter(range(1, 1 << 62))

    def round_trip(payload: bytes) -> None:
        rid = next(rids)
        sock.send_multipart(zbc.request(rid, ZBROKER_SERVICE, [payload]))
        while True:
            answer = zbc.decode_answer(sock.recv_multipart())
            if not answer.ok:
                sys.exit(f"REQUEST refused: {answer.code}: {answer.message}")
            if answer.rid == rid and "state" in answer.meta:
                if answer.meta["state"] != "done":
                    sys.exit(f"task ended {answer.meta['state']}")
                return

    return round_trip


# ------------------------------------------------------------------ sequential


def sequential(system: str, url: str, samples: int, warmup: int, size: int) -> None:
    """One producer, one task in flight: each enqueue confirmed before the next is sent,
    through the system's ordinary blocking call (zbroker: `Client.enqueue`; Redis: XADD;
    RabbitMQ: `basic_publish` on a channel in confirm mode; NATS: `js.publish`, which
    waits for the stream's ack). No consumer: the queue grows by `warmup + samples`
    tasks. Prints `{"latency_us": [...], "started", "ended", "cpu_s", "count"}` with
    the timed enqueues only (after `warmup` untimed)."""
    arguments = queue_arguments(system)
    system = SAME_PEERS.get(system, system)
    closers: list[Callable[[], None]] = []
    if system == ZBROKER:
        from zbroker.client import Client

        client = Client(url, timeout_s=ANSWER_TIMEOUT_S)
        closers.append(client.close)

        def enqueue(payload: bytes) -> None:
            client.enqueue(ZBROKER_SERVICE, payload)

    elif system == REDIS_STREAM:
        import redis

        r = redis.Redis.from_url(url, socket_timeout=ANSWER_TIMEOUT_S)
        closers.append(r.close)

        def enqueue(payload: bytes) -> None:
            r.xadd(STREAM_KEY, {"b": payload})

    elif system in PREFETCH:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(url))
        closers.append(connection.close)
        channel = connection.channel()
        channel.queue_declare(QUEUE, durable=True, arguments=arguments)
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)

        def enqueue(payload: bytes) -> None:
            # Returns once the broker's basic.ack came (raises on a nack).
            channel.basic_publish("", QUEUE, payload, properties)

    elif system == NATS:
        _nats_sequential(url, samples, warmup, size)
        return
    else:
        sys.exit(f"no sequential producer for {system}")
    print("ready", flush=True)
    clock = time.perf_counter_ns
    for i in range(warmup):
        enqueue(body(TASK, i, size))
    payloads = [body(TASK, warmup + i, size) for i in range(samples)]
    times: list[int] = []
    started = time.time()
    cpu = time.process_time()
    for payload in payloads:
        t0 = clock()
        enqueue(payload)
        times.append(clock() - t0)
    _print_sequential(started, time.time(), time.process_time() - cpu, times)
    for close in closers:
        close()


def _print_sequential(started: float, ended: float, cpu_s: float, times_ns: list[int]) -> None:
    print(
        json.dumps(
            {
                "count": len(times_ns),
                "started": started,
                "ended": ended,
                "cpu_s": cpu_s,
                "latency_us": [t / 1000 for t in sorted(times_ns)],
            }
        ),
        flush=True,
    )


def _nats_sequential(url: str, samples: int, warmup: int, size: int) -> None:
    async def run() -> None:
        import nats

        nc = await nats.connect(url, error_cb=_quiet)
        js = nc.jetstream()
        print("ready", flush=True)
        for i in range(warmup):
            await js.publish(QUEUE, body(TASK, i, size))
        payloads = [body(TASK, warmup + i, size) for i in range(samples)]
        clock = time.perf_counter_ns
        times: list[int] = []
        started = time.time()
        cpu = time.process_time()
        for payload in payloads:
            t0 = clock()
            ack = await js.publish(QUEUE, payload, timeout=ANSWER_TIMEOUT_S)
            times.append(clock() - t0)
            if ack.stream != STREAM:
                sys.exit(f"published into {ack.stream!r}")
        _print_sequential(started, time.time(), time.process_time() - cpu, times)
        await nc.close()

    asyncio.run(run())


# ------------------------------------------------------------------ entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    p = roles.add_parser("producer", help="enqueue tasks; prints one JSON line")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first-seq", type=int, default=0)
    p.add_argument("--batch", type=int, default=0, help="tasks per call (0: single)")
    p.add_argument("--in-flight", type=int, required=True)
    p.add_argument("--wait-for-signal", action="store_true", help="start on SIGUSR1")
    w = roles.add_parser("worker", help="handle tasks; reports its count when idle")
    w.add_argument("--credit", type=int, default=64)
    q = roles.add_parser("requester", help="sequential round trips; prints JSON")
    q.add_argument("--samples", type=int, required=True)
    q.add_argument("--warmup", type=int, default=100)
    e = roles.add_parser("sequential", help="confirmed enqueues one at a time; prints JSON")
    e.add_argument("--samples", type=int, required=True)
    e.add_argument("--warmup", type=int, default=100)
    for sub in (p, w, q, e):
        sub.add_argument("--system", choices=SYSTEMS, required=True)
        sub.add_argument("--url", required=True)
        sub.add_argument("--body-bytes", type=int, default=100)
        sub.add_argument("--record", help="append sequence numbers to this file")
    args = parser.parse_args(argv)
    if args.role == "producer":
        calls = Calls(args.count, max(1, args.batch), args.first_seq, args.body_bytes)
        producer(args.system, args.url, calls, args.in_flight, args)
    elif args.role == "worker":
        worker(args.system, args.url, args.credit, args)
    elif args.role == "sequential":
        sequential(args.system, args.url, args.samples, args.warmup, args.body_bytes)
    else:
        requester(args.system, args.url, args.samples, args.warmup, args.body_bytes)


if __name__ == "__main__":
    main()
