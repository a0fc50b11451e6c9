"""Micro-measurements behind the analysis in bench/results/HISTORY.md (not a workload).

    .venv/bin/python bench/micro.py

1. The broker core alone: one MDP request and its answer, per request, driven in a
   loop with no sockets (stock MDP worker, and ZBW01 worker with DONE).
2. The broker core with its journal, per durable task: ENQUEUE batches of 100
   tasks of 100 bytes, two batching ZBW01 workers (credit 64) answering ACK and
   DONES, a commit after every message, as the runtime's passes would; for the
   memory journal and LMDB in `async` and `sync` mode. CPU time per task. Then
   the same with one ENQUEUE per task (LMDB `async`): 100 ENQUEUEs per pass.
3. pyzmq call patterns for a 5-frame message over inproc: `send_multipart` against
   the backend's `send` per frame with int flags (what the broker's loop uses), and
   `recv_multipart` against `recv(copy=False)` with `.more`.
4. Lifecycle events, per event: what the core spends building them (2. with a
   subscription to every topic, against none, memory journal), what the runtime's
   loop spends publishing them (`BrokerServer._publish`, the loop's thread), and
   what the event bus's proxy and I/O threads spend moving them to a subscriber
   in another process (the broker process's CPU minus the loop's thread); for
   passes of 500 events of one topic (one batch message) and of two alternating
   topics (no batching: one message per event).
5. What a Python subscriber spends in `decode_events` per event, for one-event
   messages and for batches of 64, as `payloads` and in rows (a batch's events
   skip `Event.__init__`).
Each figure is the median of 5 repetitions (3 for 2. and 4.), in microseconds.
"""

from __future__ import annotations

import gc
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.backend
from harness import free_tcp_ports

from zbroker.config import BrokerConfig
from zbroker.core import Broker, CoreSettings
from zbroker.journal import Durability, Journal, open_journal
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.events import (
    DONE_FIELDS,
    Event,
    decode_events,
    encode_event,
    encode_events,
    encode_rows,
)
from zbroker.runtime.server import BrokerServer

N = 50_000
REPEATS = 5
BODY = b"x" * 64


def median_us(run: Callable[[], None]) -> float:
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) / N * 1e6)
    return statistics.median(samples)


def core_mdp() -> float:
    broker = Broker(CoreSettings(), 0.0)
    broker.receive([b"W", *mdp.worker_ready(b"echo")], 0.0)
    broker.outbox.clear()
    request = [b"C", b"", mdp.MDPC01, b"echo", BODY]
    reply = [b"W", b"", mdp.MDPW01, mdp.REPLY, b"C", b"", BODY]

    def run() -> None:
        for _ in range(N):
            broker.receive(request, 1.0)
            broker.receive(reply, 1.0)
            broker.outbox = []

    return median_us(run)


def core_zbw() -> float:
    broker = Broker(CoreSettings(), 0.0)
    broker.receive([b"Z", *ext.ready("echo", 64)], 0.0)
    broker.outbox.clear()
    request = [b"C", b"", mdp.MDPC01, b"echo", BODY]
    pack = msgpack.Packer(use_bin_type=True).pack

    def run() -> None:
        for _ in range(N):
            broker.receive(request, 1.0)
            broker.outbox = []
            # Packing DONE here costs what it costs a worker (about 1 us).
            # The id the core gave this request: ids are "m" + a hex counter.
            tid = f"m{broker.requests.issued:x}"
            done = [b"Z", b"", ext.ZBW01, ext.DONE, pack({"id": tid, "attempt": 1}), BODY]
            broker.receive(done, 1.0)
            broker.outbox = []

    return median_us(run)


def core_durable(durability: Durability, tasks: int = 20_000) -> float:
    """CPU microseconds per durable task through the core and journal (median of 3)."""
    samples = []
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="zbroker-micro-") as tmp:
            journal = open_journal(durability, Path(tmp) / "data")
            try:
                samples.append(durable_run(journal, tasks))
            finally:
                journal.close()
    return statistics.median(samples)


def core_single_enqueues(tasks: int = 20_000) -> float:
    """As core_durable (async LMDB), but every task comes in its own ENQUEUE."""
    samples = []
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="zbroker-micro-") as tmp:
            journal = open_journal(Durability.ASYNC, Path(tmp) / "data")
            try:
                samples.append(durable_run(journal, tasks, per_call=1))
            finally:
                journal.close()
    return statistics.median(samples)


def core_keyed_enqueue(tasks: int = 20_000) -> float:
    """CPU microseconds per single-task ENQUEUE with an idempotency key (as the Python
    client sends every call), core and LMDB `async` journal, no workers, a commit
    every 64 calls (median of 3)."""
    samples = []
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="zbroker-micro-") as tmp:
            journal = open_journal(Durability.ASYNC, Path(tmp) / "data")
            try:
                broker = Broker(CoreSettings(), 0.0, journal, epoch_offset=time.time())
                calls = [
                    [b"C", *zbc.enqueue(i, "echo", [[b"x" * 100]], zbc.TaskOptions(key=f"k{i}"))]
                    for i in range(tasks)
                ]
                started = time.process_time()
                for i, call in enumerate(calls):
                    broker.receive(call, 0.0)
                    if i % 64 == 63:
                        journal.commit()
                        broker.outbox = []
                journal.commit()
                samples.append((time.process_time() - started) / tasks * 1e6)
            finally:
                journal.close()
    return statistics.median(samples)


def answer_tasks(broker: Broker, journal: Journal, workers: tuple[bytes, ...], now: float) -> int:
    """Play batching workers for what the broker has sent so far: every TASK or TASKS to
    `workers` gets one ACK, then one DONES, each committed as a runtime pass would.
    Returns how many tasks were done."""
    done = 0
    out, broker.outbox = broker.outbox, []
    for frames in out:
        if frames[0] not in workers or frames[3] not in (ext.TASK, ext.TASKS):
            continue
        if frames[3] == ext.TASK:
            entries = [ext.unpack_meta(frames[4])]
        else:
            entries = ext.unpack_meta(frames[4])["tasks"]
        held = [(e["id"], e["attempt"]) for e in entries]
        broker.receive([frames[0], *ext.ack(held)], now)
        journal.commit()
        broker.receive([frames[0], *ext.dones([(t, a, [b"ok"]) for t, a in held])], now)
        journal.commit()
        done += len(held)
    return done


def durable_run(
    journal: Journal,
    tasks: int,
    subscriptions: frozenset[str] = frozenset(),
    events_built: list[int] | None = None,
    per_call: int = 100,
    publish: Callable[[list[tuple[str, tuple[str, ...] | None, list[Any]]]], object] | None = None,
) -> float:
    """CPU microseconds per task; with `subscriptions`, the core also builds the
    lifecycle events under those prefixes (their count is appended to `events_built`),
    and `publish`, if given, gets them after every pass as the runtime's would."""
    now = 0.0
    broker = Broker(CoreSettings(), now, journal, epoch_offset=time.time())
    broker.set_subscriptions(subscriptions)
    events = 0
    workers = (b"W1", b"W2")
    for w in workers:
        broker.receive([w, *ext.ready("echo", 64, batch=True)], now)
    journal.commit()
    broker.outbox = []
    batch = zbc.enqueue(0, "echo", [[b"x" * 100]] * per_call, batch=per_call > 1)
    meta = ext.unpack_meta(batch[3])
    sent = done = 0
    started = time.process_time()
    while done < tasks:
        if sent < tasks:
            # 100 tasks per pass, in one ENQUEUE or in 100 (per_call 1), read in one
            # pass and committed once, as the runtime does under load.
            calls = []
            for _ in range(100 // per_call):
                meta["rid"] = sent
                calls.append([b"C", *batch[:3], ext.pack_meta(meta), *batch[4:]])
                sent += per_call
            broker.receive_many(calls, now)
            journal.commit()
        while broker.outbox:
            done += answer_tasks(broker, journal, workers, now)
        now += 0.001
        if now >= broker.next_tick_at:
            broker.tick(now)
        events += sum(len(group) for _, _, group in broker.events)
        if publish is not None:
            publish(broker.events)
        broker.events.clear()  # as the runtime's publish does after every pass
    if events_built is not None:
        events_built.append(events)
    return (time.process_time() - started) / done * 1e6


def socket_patterns() -> dict[str, float]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://micro")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"C")
    dealer.connect("inproc://micro")
    for s in (router, dealer):
        s.sndhwm = 0
        s.rcvhwm = 0
    dealer.send(b"hi")
    router.recv_multipart()
    msg = [b"C", b"", mdp.MDPC01, b"echo", BODY]
    send = zmq.backend.Socket.send
    recv = zmq.backend.Socket.recv
    more, last = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)

    def send_multipart() -> None:
        for _ in range(N):
            router.send_multipart(msg, zmq.NOBLOCK)

    def send_backend() -> None:
        for _ in range(N):
            for frame in msg[:-1]:
                send(router, frame, more)
            send(router, msg[-1], last)

    def recv_multipart() -> None:
        for _ in range(N):
            dealer.recv_multipart(zmq.NOBLOCK)

    def recv_backend() -> None:
        for _ in range(N):
            frame = recv(dealer, last, False)
            parts = [frame.bytes]
            while frame.more:
                frame = recv(dealer, last, False)
                parts.append(frame.bytes)

    results = {}
    for name, sender, receiver in (
        ("send_multipart", send_multipart, recv_multipart),
        ("backend send, int flags", send_backend, recv_backend),
    ):
        samples_send, samples_recv = [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            sender()
            samples_send.append((time.perf_counter() - start) / N * 1e6)
            start = time.perf_counter()
            receiver()
            samples_recv.append((time.perf_counter() - start) / N * 1e6)
        results[f"send 5 frames: {name}"] = statistics.median(samples_send)
        recv_name = "recv_multipart" if receiver is recv_multipart else "backend recv copy=False"
        results[f"recv 5 frames: {recv_name}"] = statistics.median(samples_recv)
    router.close(linger=0)
    dealer.close(linger=0)
    ctx.term()
    return results


def core_event_cost(tasks: int = 20_000) -> float:
    """Extra core CPU per lifecycle event with a subscriber to every topic."""
    plain, with_events, per_task = [], [], []
    for _ in range(3):
        plain.append(durable_run(open_journal(Durability.MEMORY, None), tasks))
        built: list[int] = []
        journal = open_journal(Durability.MEMORY, None)
        with_events.append(durable_run(journal, tasks, frozenset({""}), built))
        per_task.append(built[0] / tasks)
    extra = statistics.median(with_events) - statistics.median(plain)
    return extra / statistics.median(per_task)


def gc_collections(tasks: int = 20_000) -> dict[str, list[int]]:
    """Garbage collections (generations 0, 1, 2) the core's durable loop set off over
    `tasks` tasks, without a subscriber and with one to every lifecycle event."""
    out: dict[str, list[int]] = {}
    for name, subscriptions in (("plain", frozenset()), ("events", frozenset({""}))):
        counts = [0, 0, 0]

        def count(phase: str, info: dict[str, int], counts: list[int] = counts) -> None:
            if phase == "start":
                counts[info["generation"]] += 1

        gc.collect()
        gc.callbacks.append(count)
        try:
            durable_run(open_journal(Durability.MEMORY, None), tasks, subscriptions)
        finally:
            gc.callbacks.remove(count)
        out[name] = counts
    return out


_SUBSCRIBER = """
import sys, zmq
from zbroker.protocol.events import decode_events
ctx = zmq.Context(); sub = ctx.socket(zmq.SUB); sub.rcvhwm = 0
sub.setsockopt(zmq.SUBSCRIBE, b""); sub.connect(sys.argv[1]); sub.rcvtimeo = 1000
n = 0
try:
    while True:
        n += len(decode_events(sub.recv_multipart()))
except zmq.Again:
    print(n, flush=True)
"""


def publish_event_cost(
    events: int = 20_000, chunk: int = 500, topics: int = 1
) -> tuple[float, float]:
    """(loop thread, bus threads) CPU microseconds per lifecycle event published by a
    real BrokerServer to a subscriber process (median of 3). The events of a pass
    cycle through `topics` topics: with 1, a pass is one batch message; with 2, no
    two neighbours share a topic and every event is a message of its own."""
    loop_us, bus_us = [], []
    payload = {"id": "t1a2b3c", "attempt": 1, "headers": {}}
    pass_topics = [f"task.done.echo{i % topics or ''}" for i in range(chunk)]
    for _ in range(3):
        ports = free_tcp_ports(3)
        config = BrokerConfig(
            bind=f"tcp://127.0.0.1:{ports[0]}",
            events_in=f"tcp://127.0.0.1:{ports[1]}",
            events_out=f"tcp://127.0.0.1:{ports[2]}",
            durability=Durability.MEMORY,
        )
        server = BrokerServer(config)
        try:
            server.events.start()
            sub = subprocess.Popen(
                [sys.executable, "-c", _SUBSCRIBER, config.events_out],
                stdout=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 10.0
            while not server._subscriptions and time.monotonic() < deadline:
                server.lifecycle.poll(100)  # the subscription reaches the loop's XPUB
                server._read_subscriptions()
            if not server._subscriptions:
                raise RuntimeError("the subscriber's subscription never arrived")
            usage = resource.getrusage(resource.RUSAGE_SELF)
            process_before = usage.ru_utime + usage.ru_stime
            loop = emitting = 0.0
            for _ in range(events // chunk):
                core = server.core
                core.set_subscriptions(frozenset({""}))
                started = time.thread_time()
                for topic in pass_topics:  # grouped by the core's own _emit
                    core.sink.emit(topic, payload)
                emitted = time.thread_time()
                server._publish()
                loop += time.thread_time() - emitted
                emitting += emitted - started
                time.sleep(0.005)  # keep under the bus's high-water marks: count, not drop
            received = int(sub.communicate(timeout=30)[0])
            usage = resource.getrusage(resource.RUSAGE_SELF)
            process = usage.ru_utime + usage.ru_stime - process_before
            if received != events or server.events_dropped:
                raise RuntimeError(f"{received} of {events} events arrived")
            loop_us.append(loop / events * 1e6)
            bus_us.append((process - loop - emitting) / events * 1e6)
        finally:
            server._close()
    return statistics.median(loop_us), statistics.median(bus_us)


def decode_cost(batch: int = 64) -> tuple[float, float, float]:
    """Microseconds per event a Python subscriber spends in `decode_events`: for
    one-event messages, for `payloads` batches of `batch` events and for batches in
    rows of as many, as the broker sends its task events (median of 5)."""
    payload = {"id": "t1a2b3c", "attempt": 1, "headers": {}}
    single = encode_event(Event("task.done.echo", "zbroker", payload, 1.0))
    many = encode_events("task.done.echo", "zbroker", [payload] * batch, 1.0)
    rows = encode_rows("task.done.echo", "zbroker", DONE_FIELDS, [("t1a2b3c", 1, {})] * batch, 1.0)
    assert decode_events(rows) == decode_events(many)
    one_each = median_us(lambda: [decode_events(single) for _ in range(N)])
    batched = median_us(lambda: [decode_events(many) for _ in range(N // batch)])
    in_rows = median_us(lambda: [decode_events(rows) for _ in range(N // batch)])
    return one_each, batched, in_rows


def main() -> None:
    print(f"[micro] core, MDP request + stock MDP worker reply: {core_mdp():.2f} us/request")
    print(f"[micro] core, MDP request + ZBW01 worker DONE:     {core_zbw():.2f} us/request")
    print(f"[micro] core + async journal, keyed single ENQUEUE: {core_keyed_enqueue():.2f} us CPU")
    for durability in (Durability.MEMORY, Durability.ASYNC, Durability.SYNC):
        figure = core_durable(durability)
        print(f"[micro] core + {durability.value} journal, durable task: {figure:.2f} us CPU/task")
    single = core_single_enqueues()
    print(f"[micro] core + async journal, one ENQUEUE per task: {single:.2f} us CPU/task")
    for name, value in socket_patterns().items():
        print(f"[micro] {name}: {value:.2f} us/message")
    print(f"[micro] lifecycle event, built by the core: {core_event_cost():.2f} us/event")
    collections = gc_collections()
    print(
        "[micro] garbage collections (generations 0/1/2) per 20,000 tasks: "
        + ", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in collections.items())
    )
    one_each, batched, in_rows = decode_cost()
    print(f"[micro] subscriber decode_events, one event per message: {one_each:.2f} us/event")
    print(f"[micro] subscriber decode_events, batches of 64: {batched:.2f} us/event")
    print(f"[micro] subscriber decode_events, batches of 64 in rows: {in_rows:.2f} us/event")
    for topics, shape in ((1, "one topic per pass (batched)"), (2, "topics alternating")):
        loop, bus = publish_event_cost(topics=topics)
        print(f"[micro] lifecycle event, {shape}, published by the loop: {loop:.2f} us/event")
        print(f"[micro] lifecycle event, {shape}, bus threads to a subscriber: {bus:.2f} us/event")


if __name__ == "__main__":
    main()
