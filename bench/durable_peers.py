"""The processes of the durable workload other than the broker: task producers
(ZBC01 clients), workers (ZBW01), an events subscriber and a requester (sequential
ZBC01 REQUESTs), one process each.

Run by bench/durable.py as `python bench/durable_peers.py ROLE ...`. Frames are
built and read with zbroker's own codecs (`zbroker.protocol.zbc` and `.ext`), which
are pure functions with no sockets and no broker state: the peers still talk to the
broker over TCP as any other process would.

Clocks: the figures of one run are put together from several processes on one
machine, so every timestamp that crosses a process boundary is wall-clock
`time.time()`; durations measured inside one process use `time.perf_counter()`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from zbroker.protocol import events, ext, zbc

SERVICE = "bench"
# A worker with nothing to do heartbeats this often; the broker's default interval is
# 2.5 s with a liveness of 3, so this keeps well clear of expiry.
WORKER_HEARTBEAT_S = 1.0
# A worker reports its count once it has been idle this long (and only then, so a busy
# worker spends nothing on reporting).
WORKER_REPORT_IDLE_MS = 250
# An answer slower than this means the broker is stuck: fail the run.
PRODUCER_ANSWER_TIMEOUT_MS = 60_000
CONNECT_TIMEOUT_MS = 10_000
RESULT = b"ok"
# The broker's public key (its .key file) and this peer's NAME.key_secret, for a
# broker started with --auth (bench/auth.py). The benchmark's own names, not the
# ZBROKER_SERVER_KEY and ZBROKER_KEY that zbroker's CLI and clients read: keys a user
# set for those never reach the peers of the other workloads.
CURVE_SERVER_KEY = "BENCH_CURVE_SERVER_KEY"
CURVE_KEY = "BENCH_CURVE_KEY"


def _socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.linger = 0
    _curve(sock)
    return sock


def _curve(sock: zmq.Socket[bytes]) -> None:
    """Make `sock` a CURVE client of a broker started with --auth when CURVE_SERVER_KEY
    and CURVE_KEY name key files (bench/auth.py sets them); without them, nothing
    changes and zbroker's client is never imported."""
    server_key, certificate = os.environ.get(CURVE_SERVER_KEY), os.environ.get(CURVE_KEY)
    if not server_key and not certificate:
        return
    if not server_key or not certificate:
        sys.exit(f"set both {CURVE_SERVER_KEY} and {CURVE_KEY}, or neither")
    from zbroker.client.keys import Credentials

    Credentials.load(server_key, certificate).apply(sock)


def _connect(sock: zmq.Socket[bytes], endpoint: str) -> None:
    """Connect and wait for the ZMTP handshake, so a peer reports ready only when it is."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        if not monitor.poll(CONNECT_TIMEOUT_MS):
            sys.exit(f"no ZMTP handshake with {endpoint} within {CONNECT_TIMEOUT_MS} ms")
        recv_monitor_message(monitor)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


# ------------------------------------------------------------------ worker


def worker(endpoint: str, credit: int) -> None:
    """A ZBW01 worker holding up to `credit` tasks, batching like zbroker's own
    Worker: READY says `batch`, so the broker may send several tasks in one TASKS
    message; it reads everything already waiting on its socket, acknowledges all
    of it with one ACK, then answers all of it with one DONES (tiny results). Once
    idle for WORKER_REPORT_IDLE_MS after doing work, it prints `{"count": tasks
    done so far, "last_done": time.time() after its last DONE}`; the orchestrator
    sums the counts until every task is done."""
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    _connect(sock, endpoint)
    send = sock.send_multipart
    recv = sock.recv_multipart
    send(ext.ready(SERVICE, credit, batch=True))
    print("ready", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    heartbeat = ext.heartbeat()
    decode = ext.decode_for_worker
    Task = ext.Task
    wall = time.time
    monotonic = time.monotonic
    count = reported = 0
    last_done = 0.0
    last_sent = monotonic()
    while True:
        if not poller.poll(WORKER_REPORT_IDLE_MS):
            if count != reported:
                print(json.dumps({"count": count, "last_done": last_done}), flush=True)
                reported = count
            if monotonic() - last_sent >= WORKER_HEARTBEAT_S:
                send(heartbeat)
                last_sent = monotonic()
            continue
        tasks: list[ext.Task] = []
        while True:
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = decode(frames)
            if type(msg) is ext.Tasks:
                tasks.extend(msg.tasks)
            elif type(msg) is Task:
                tasks.append(msg)
            elif type(msg) is ext.Disconnect:
                # Never expected here; dying makes the run fail loudly instead of skewing it.
                sys.exit(f"broker sent DISCONNECT: {msg.reason}")
            elif type(msg) is ext.Cancel:
                sys.exit(f"broker took back {msg.id} attempt {msg.attempt}")
            # HEARTBEAT needs no answer: our own traffic and heartbeats keep us alive.
        if tasks:
            send(ext.ack([(t.id, t.attempt) for t in tasks]))
            for start in range(0, len(tasks), ext.MAX_BATCH):
                chunk = tasks[start : start + ext.MAX_BATCH]
                send(ext.dones([(t.id, t.attempt, (RESULT,)) for t in chunk]))
            count += len(tasks)
            last_done = wall()
            last_sent = monotonic()
        elif monotonic() - last_sent >= WORKER_HEARTBEAT_S:
            send(heartbeat)
            last_sent = monotonic()


# ------------------------------------------------------------------ producer


def producer(
    endpoint: str,
    count: int,
    batch: int,
    in_flight: int,
    body_bytes: int,
    wait_for_signal: bool,
) -> None:
    """Enqueue `count` tasks of `body_bytes` each: single-task ENQUEUEs (`batch` 0)
    or ENQUEUE batches of `batch` tasks, keeping up to `in_flight` calls unanswered.
    No idempotency keys: plain enqueues. Every answer is checked (an id per task).

    Prints `ready` once connected; with `wait_for_signal`, it then waits for SIGUSR1
    before the first send, so several producers start together. At the end it
    prints one JSON line: wall-clock start (first send) and end (last answer), its
    CPU time in between, and each call's confirm latency (send to answer) in
    microseconds, sorted. Messages are encoded before the clock starts."""
    if wait_for_signal:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    sock.rcvtimeo = PRODUCER_ANSWER_TIMEOUT_MS
    _connect(sock, endpoint)
    body = bytes(i % 251 for i in range(body_bytes))
    options = zbc.TaskOptions()
    per_call = batch or 1
    calls = -(-count // per_call)
    sizes = [per_call] * (count // per_call) + ([count % per_call] if count % per_call else [])
    if batch:
        messages = [
            zbc.enqueue(rid, SERVICE, [[body]] * n, options, batch=True)
            for rid, n in enumerate(sizes)
        ]
    else:
        messages = [zbc.enqueue(rid, SERVICE, [[body]], options) for rid in range(calls)]
    print("ready", flush=True)
    if wait_for_signal:
        signal.sigwait({signal.SIGUSR1})

    send = sock.send_multipart
    recv = sock.recv_multipart
    decode = zbc.decode_answer
    clock = time.perf_counter_ns
    sent_at = [0] * calls
    latencies_us: list[int] = []
    sent = answered = 0
    started = time.time()
    cpu_started = time.process_time()
    try:
        for _ in range(min(in_flight, calls)):
            sent_at[sent] = clock()
            send(messages[sent])
            sent += 1
        while answered < calls:
            answer = decode(recv())
            now = clock()
            if not answer.ok:
                sys.exit(f"call {answer.rid} refused: {answer.code}: {answer.message}")
            if len(answer.meta["ids"]) != sizes[answer.rid]:
                sys.exit(
                    f"call {answer.rid}: {len(answer.meta['ids'])} ids, not {sizes[answer.rid]}"
                )
            latencies_us.append((now - sent_at[answer.rid]) // 1000)
            answered += 1
            if sent < calls:
                sent_at[sent] = clock()
                send(messages[sent])
                sent += 1
    except zmq.Again:
        sys.exit(f"no answer within {PRODUCER_ANSWER_TIMEOUT_MS} ms ({answered} of {calls})")
    ended = time.time()
    cpu_s = time.process_time() - cpu_started
    latencies_us.sort()
    result = {
        "tasks": count,
        "calls": calls,
        "started": started,
        "ended": ended,
        "cpu_s": cpu_s,
        "latencies_us": latencies_us,
    }
    print(json.dumps(result, separators=(",", ":")), flush=True)
    sock.close(linger=0)
    ctx.term()


# ------------------------------------------------------------------ requester


def requester(endpoint: str, samples: int, warmup: int, body_bytes: int) -> None:
    """Sequential ZBC01 REQUESTs (enqueue one task, committed, then the call is held
    until the worker's result comes back), one at a time: `warmup` untimed, then
    `samples` timed from send to the final answer (state `done`). Prints `ready` once
    connected, then `{"latency_us": [...]}` sorted. Messages are encoded before the
    clock starts."""
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.DEALER)
    sock.rcvtimeo = PRODUCER_ANSWER_TIMEOUT_MS
    _connect(sock, endpoint)
    body = bytes(i % 251 for i in range(body_bytes))
    print("ready", flush=True)
    send = sock.send_multipart
    recv = sock.recv_multipart
    decode = zbc.decode_answer
    clock = time.perf_counter_ns
    latencies_us: list[int] = []
    try:
        for rid in range(warmup + samples):
            message = zbc.request(rid, SERVICE, [body])
            started = clock()
            send(message)
            while True:  # first the acceptance (ids), then the final answer (state)
                answer = decode(recv())
                if not answer.ok:
                    sys.exit(f"REQUEST {rid} refused: {answer.code}: {answer.message}")
                if answer.rid == rid and "state" in answer.meta:
                    break
            ended = clock()
            if answer.meta["state"] != "done":
                sys.exit(f"REQUEST {rid}: task ended {answer.meta['state']}")
            if rid >= warmup:
                latencies_us.append((ended - started) // 1000)
    except zmq.Again:
        sys.exit(f"no answer within {PRODUCER_ANSWER_TIMEOUT_MS} ms")
    latencies_us.sort()
    print(json.dumps({"latency_us": latencies_us}, separators=(",", ":")), flush=True)
    sock.close(linger=0)
    ctx.term()


# ------------------------------------------------------------------ entry


def subscriber(endpoint: str, prefix: str, decode: bool) -> None:
    """A SUB socket on the bus counting events under `prefix`: each message's events
    counted with msgpack alone (the broker's side of publishing is what is measured),
    or, with `decode`, turned into zbroker Events one by one as the Python Subscriber
    hands them out. Once idle for WORKER_REPORT_IDLE_MS after events, it prints
    `{"events": count so far, "messages": bus messages they came in}`."""
    ctx = zmq.Context()
    sock = _socket(ctx, zmq.SUB)
    sock.subscribe(prefix.encode())
    _connect(sock, endpoint)
    print("ready", flush=True)
    count = reported = messages = 0
    while True:
        if not sock.poll(WORKER_REPORT_IDLE_MS):
            if count != reported:
                print(json.dumps({"events": count, "messages": messages}), flush=True)
                reported = count
            continue
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            count += len(events.decode_events(frames)) if decode else _events_in(frames)
            messages += 1


def _events_in(frames: list[bytes]) -> int:
    """How many events one bus message holds (docs/protocol.md §6), or 0 if malformed."""
    try:
        envelope = msgpack.unpackb(frames[1])
    except Exception:
        return 0
    if not isinstance(envelope, dict):
        return 0
    batch = envelope.get("rows", envelope.get("payloads"))  # a batch in rows, or payloads
    return len(batch) if isinstance(batch, list) else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    w = roles.add_parser("worker", help="ZBW01 worker: ACK, then DONE")
    w.add_argument("--connect", required=True)
    w.add_argument("--credit", type=int, required=True)
    p = roles.add_parser("producer", help="ZBC01 producer; prints one JSON line")
    p.add_argument("--connect", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--batch", type=int, default=0, help="tasks per ENQUEUE (0: single)")
    p.add_argument("--in-flight", type=int, required=True)
    p.add_argument("--body-bytes", type=int, required=True)
    p.add_argument("--wait-for-signal", action="store_true", help="start on SIGUSR1")
    e = roles.add_parser("subscriber", help="SUB on the bus; counts events")
    e.add_argument("--connect", required=True)
    e.add_argument("--prefix", default="")
    e.add_argument("--decode", action="store_true", help="make an Event of every event")
    r = roles.add_parser("requester", help="sequential REQUESTs; prints their latencies")
    r.add_argument("--connect", required=True)
    r.add_argument("--samples", type=int, required=True)
    r.add_argument("--warmup", type=int, default=0)
    r.add_argument("--body-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    if args.role == "worker":
        worker(args.connect, args.credit)
    elif args.role == "subscriber":
        subscriber(args.connect, args.prefix, args.decode)
    elif args.role == "requester":
        requester(args.connect, args.samples, args.warmup, args.body_bytes)
    else:
        producer(
            args.connect,
            args.count,
            args.batch,
            args.in_flight,
            args.body_bytes,
            args.wait_for_signal,
        )


if __name__ == "__main__":
    main()
