"""The processes of the mdp workload other than the broker: echo workers, the load
client, and the bare `zmq.proxy` forwarder that is the ceiling for one hop.

Run by bench/mdp.py as `python bench/mdp_peers.py ROLE ...`, one process each.
Both systems get the same lean loop (recv_multipart, build reply, send_multipart)
and only the standard library and pyzmq, so the difference between the two
measurements is the hop in the middle. Frames are spelled out here instead of
imported from zbroker: the benchmark talks to the broker as any peer would.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import msgpack
import zmq
from harness import connect_handshaken, percentile, process_cpu_s, zmq_socket

ZBROKER = "zbroker"
FORWARDER = "forwarder"
SYSTEMS = (ZBROKER, FORWARDER)

EMPTY = b""
MDPC01 = b"MDPC01"
MDPW01 = b"MDPW01"
READY = b"\x01"
REQUEST = b"\x02"
REPLY = b"\x03"
HEARTBEAT = b"\x04"
DISCONNECT = b"\x05"
SERVICE = b"echo"
# zbroker's extension worker protocol (docs/protocol.md): one msgpack metadata frame.
ZBW01 = b"ZBW01"
ZBW_READY = b"\x01"
ZBW_TASK = b"\x02"
ZBW_DONE = b"\x05"
ZBW_HEARTBEAT = b"\x07"
ZBW_DISCONNECT = b"\x08"
ZBW_TASKS = b"\x0a"
ZBW_DONES = b"\x0b"

# An idle worker heartbeats after this long without traffic; the broker's default
# interval is 2.5 s with a liveness of 3, so this keeps well clear of expiry.
WORKER_IDLE_HEARTBEAT_MS = 1000
# A reply slower than this means the system under test is stuck: fail the run.
CLIENT_REPLY_TIMEOUT_MS = 15_000
# Sequential round trips timed only after these, so connections and caches are warm.
LATENCY_WARMUP = 500


# ------------------------------------------------------------------ workers


def zbroker_worker(endpoint: str, sockets: int = 1) -> None:
    """An MDP worker for SERVICE that echoes every request body.

    With `sockets` > 1 the process registers that many stock MDP workers and polls
    them together: a worker process serving several requests at once, each socket
    still holding one request at a time as MDP requires."""
    if sockets > 1:
        _zbroker_multi_worker(endpoint, sockets)
        return
    ctx = zmq.Context()
    sock = zmq_socket(ctx, zmq.DEALER)
    sock.rcvtimeo = WORKER_IDLE_HEARTBEAT_MS
    connect_handshaken(sock, endpoint)
    sock.send_multipart([EMPTY, MDPW01, READY, SERVICE])
    print("ready", flush=True)
    recv = sock.recv_multipart
    send = sock.send_multipart
    heartbeat = [EMPTY, MDPW01, HEARTBEAT]
    while True:
        try:
            frames = recv()
        except zmq.Again:
            send(heartbeat)
            continue
        # [empty, MDPW01, REQUEST, client, empty, body...] -> same, as REPLY.
        command = frames[2]
        if command == REQUEST:
            send([EMPTY, MDPW01, REPLY, frames[3], EMPTY, *frames[5:]])
        elif command == DISCONNECT:
            # Never expected here; dying makes the run fail loudly instead of skewing it.
            sys.exit("broker sent DISCONNECT")
        # HEARTBEAT needs no answer: replies and idle heartbeats keep this worker alive.


def _zbroker_multi_worker(endpoint: str, sockets: int) -> None:
    ctx = zmq.Context()
    socks = []
    for _ in range(sockets):
        sock = zmq_socket(ctx, zmq.DEALER)
        connect_handshaken(sock, endpoint)
        sock.send_multipart([EMPTY, MDPW01, READY, SERVICE])
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    print("ready", flush=True)
    heartbeat = [EMPTY, MDPW01, HEARTBEAT]
    idle_s = WORKER_IDLE_HEARTBEAT_MS / 1000
    heartbeat_at = time.monotonic() + idle_s
    while True:
        for sock, _ in poller.poll(WORKER_IDLE_HEARTBEAT_MS):
            frames = sock.recv_multipart()
            command = frames[2]
            if command == REQUEST:
                sock.send_multipart([EMPTY, MDPW01, REPLY, frames[3], EMPTY, *frames[5:]])
            elif command == DISCONNECT:
                sys.exit("broker sent DISCONNECT")
        if time.monotonic() >= heartbeat_at:
            # Cheap insurance for idle sockets; a busy socket's replies already count.
            for sock in socks:
                sock.send_multipart(heartbeat)
            heartbeat_at = time.monotonic() + idle_s


def zbw_worker(endpoint: str, credit: int) -> None:
    """A ZBW01 worker (zbroker's extension protocol) holding up to `credit` tasks,
    batching as zbroker's own Worker does: READY says `batch`, so tasks may come
    several to a TASKS message; everything already waiting on the socket is
    answered with one DONES carrying each payload back (DONE also acknowledges)."""
    ctx = zmq.Context()
    sock = zmq_socket(ctx, zmq.DEALER)
    sock.rcvtimeo = WORKER_IDLE_HEARTBEAT_MS
    connect_handshaken(sock, endpoint)
    packb = msgpack.Packer(use_bin_type=True).pack
    unpackb = msgpack.unpackb
    ready_meta = packb({"service": "echo", "credit": credit, "batch": True})
    sock.send_multipart([EMPTY, ZBW01, ZBW_READY, ready_meta])
    print("ready", flush=True)
    recv = sock.recv_multipart
    send = sock.send_multipart
    heartbeat = [EMPTY, ZBW01, ZBW_HEARTBEAT]
    while True:
        try:
            frames = recv()
        except zmq.Again:
            send(heartbeat)
            continue
        entries: list[list[object]] = []
        results: list[bytes] = []
        while True:
            command = frames[2]
            if command == ZBW_TASK:
                meta = unpackb(frames[3])
                body = frames[4:]
                entries.append([meta["id"], meta["attempt"], len(body)])
                results.extend(body)
            elif command == ZBW_TASKS:
                at = 4
                for task in unpackb(frames[3])["tasks"]:
                    n = task["n"]
                    entries.append([task["id"], task["attempt"], n])
                    results.extend(frames[at : at + n])
                    at += n
            elif command == ZBW_DISCONNECT:
                sys.exit("broker sent DISCONNECT")
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        if len(entries) == 1:
            task_id, attempt, _ = entries[0]
            send([EMPTY, ZBW01, ZBW_DONE, packb({"id": task_id, "attempt": attempt}), *results])
        elif entries:
            send([EMPTY, ZBW01, ZBW_DONES, packb({"tasks": entries}), *results])


def forwarder_worker(endpoint: str) -> None:
    """A worker behind the bare forwarder: echoes [client id, empty, body...] back."""
    ctx = zmq.Context()
    sock = zmq_socket(ctx, zmq.DEALER)
    sock.rcvtimeo = WORKER_IDLE_HEARTBEAT_MS
    connect_handshaken(sock, endpoint)
    print("ready", flush=True)
    recv = sock.recv_multipart
    send = sock.send_multipart
    while True:
        try:
            frames = recv()
        except zmq.Again:
            continue  # same loop shape as the MDP worker; nothing to keep alive
        send([frames[0], EMPTY, *frames[2:]])


def forwarder(frontend: str, backend: str) -> None:
    """ROUTER frontend for clients, DEALER backend for workers, libzmq's proxy between."""
    ctx = zmq.Context()
    front = zmq_socket(ctx, zmq.ROUTER)
    back = zmq_socket(ctx, zmq.DEALER)
    front.bind(frontend)
    back.bind(backend)
    zmq.proxy(front, back)


# ------------------------------------------------------------------ client


def request_and_reply(system: str, body: bytes) -> tuple[list[bytes], list[bytes]]:
    """The frames a DEALER client sends and expects back for one echo request."""
    if system == ZBROKER:
        return [EMPTY, MDPC01, SERVICE, body], [EMPTY, MDPC01, SERVICE, body]
    return [EMPTY, body], [EMPTY, body]


def pump(
    sock: zmq.Socket[bytes],
    request: list[bytes],
    total: int,
    in_flight: int,
    check: Callable[[list[bytes]], None] | None = None,
) -> None:
    """Send `total` requests keeping `in_flight` outstanding; return after the last reply."""
    send = sock.send_multipart
    recv = sock.recv_multipart
    sent = min(in_flight, total)
    for _ in range(sent):
        send(request)
    received = 0
    while received < total:
        frames = recv()
        received += 1
        if check is not None:
            check(frames)
        if sent < total:
            send(request)
            sent += 1


def client(
    system: str,
    endpoint: str,
    requests: int,
    warmup: int,
    in_flight: int,
    latency_samples: int,
    body_bytes: int,
    server_pid: int,
) -> None:
    """Warm up, time a throughput burst, then time sequential round trips; print JSON."""
    ctx = zmq.Context()
    sock = zmq_socket(ctx, zmq.DEALER)
    sock.rcvtimeo = CLIENT_REPLY_TIMEOUT_MS
    connect_handshaken(sock, endpoint)
    body = bytes(i % 251 for i in range(body_bytes))
    request, expected = request_and_reply(system, body)

    def check(frames: list[bytes]) -> None:
        if frames != expected:
            sys.exit(f"unexpected reply {frames[:4]!r}")

    try:
        # Warm-up is checked frame by frame; it also absorbs workers still registering.
        pump(sock, request, warmup, in_flight, check)

        # Markers let the orchestrator attach a profiler to exactly this phase.
        print("throughput-start", flush=True)
        server_cpu_before = process_cpu_s(server_pid)
        client_cpu_before = time.process_time()
        started = time.perf_counter()
        pump(sock, request, requests, in_flight)
        elapsed_s = time.perf_counter() - started
        client_cpu_s = time.process_time() - client_cpu_before
        server_cpu_after = process_cpu_s(server_pid)
        print("throughput-end", flush=True)

        send = sock.send_multipart
        recv = sock.recv_multipart
        clock = time.perf_counter_ns
        samples_ns: list[int] = []
        for i in range(LATENCY_WARMUP + latency_samples):
            t0 = clock()
            send(request)
            frames = recv()
            t1 = clock()
            check(frames)
            if i >= LATENCY_WARMUP:
                samples_ns.append(t1 - t0)
    except zmq.Again:
        sys.exit(f"no reply within {CLIENT_REPLY_TIMEOUT_MS} ms")

    samples_us = sorted(ns / 1000 for ns in samples_ns)
    server_cpu_s = (
        None
        if server_cpu_before is None or server_cpu_after is None
        else server_cpu_after - server_cpu_before
    )
    result = {
        "requests": requests,
        "elapsed_s": elapsed_s,
        "throughput_rps": requests / elapsed_s,
        "server_cpu_s": server_cpu_s,
        "client_cpu_s": client_cpu_s,
        "latency_us": {
            "samples": len(samples_us),
            "mean": sum(samples_us) / len(samples_us),
            **{f"p{q:g}": percentile(samples_us, q) for q in (50, 90, 99, 99.9)},
            "max": samples_us[-1],
        },
    }
    print(json.dumps(result), flush=True)
    sock.close(linger=0)
    ctx.term()


# ------------------------------------------------------------------ entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    w = roles.add_parser("worker", help="echo worker")
    w.add_argument("--system", choices=SYSTEMS, required=True)
    w.add_argument("--connect", required=True)
    w.add_argument("--sockets", type=int, default=1, help="MDP worker sockets (zbroker only)")
    w.add_argument("--zbw-credit", type=int, default=0, help="speak ZBW01 with this credit")
    f = roles.add_parser("forwarder", help="bare zmq.proxy ROUTER/DEALER forwarder")
    f.add_argument("--frontend", required=True)
    f.add_argument("--backend", required=True)
    c = roles.add_parser("client", help="load client; prints one JSON line")
    c.add_argument("--system", choices=SYSTEMS, required=True)
    c.add_argument("--connect", required=True)
    c.add_argument("--requests", type=int, required=True)
    c.add_argument("--warmup", type=int, required=True)
    c.add_argument("--in-flight", type=int, required=True)
    c.add_argument("--latency-samples", type=int, required=True)
    c.add_argument("--body-bytes", type=int, required=True)
    c.add_argument("--server-pid", type=int, required=True)
    args = parser.parse_args(argv)

    if args.role == "worker":
        if args.system == ZBROKER and args.zbw_credit:
            zbw_worker(args.connect, args.zbw_credit)
        elif args.system == ZBROKER:
            zbroker_worker(args.connect, args.sockets)
        else:
            forwarder_worker(args.connect)
    elif args.role == "forwarder":
        forwarder(args.frontend, args.backend)
    else:
        client(
            args.system,
            args.connect,
            args.requests,
            args.warmup,
            args.in_flight,
            args.latency_samples,
            args.body_bytes,
            args.server_pid,
        )


if __name__ == "__main__":
    main()
