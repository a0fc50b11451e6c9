"""Where the time of one confirmed enqueue goes, one call at a time: the floors under
the `sequential` phase of `bench --only compare` on this machine.

    .venv/bin/python bench/round_trip.py [--n 3000] [--rounds 3]

Each round, one after the other on loopback TCP, `--n` timed round trips after 300
untimed:

- `tcp echo`: a Python client and a Python echo server on plain sockets
  (TCP_NODELAY): what Redis's clients pay per command before any work;
- `zmq echo`: a DEALER client and a ROUTER echo server, pyzmq, the frames of an
  ENQUEUE: the same with libzmq's I/O threads between each program and its socket;
- `enqueue, memory` / `async` / `sync`: `zbroker.client.Client.enqueue` of 100
  bytes against a fresh `zbroker start --durability ...` broker.

Reported per kind (medians over the rounds): the round trip's p50 in µs, the CPU of
the client's calling thread and of its whole process (libzmq's I/O thread
included) per round trip, and the server's CPU per round trip (all its threads,
from /proc). Prints a markdown table.

With `--profile DIR`, py-spy samples each broker (native frames: the compiled core
and libzmq by name) into DIR/round-trip-<durability>-<round>.txt, and the busiest
functions of each durability are printed at the end; the sampling pauses the
broker, so the figures of a profiled run are not the ones to quote.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq
from harness import loop_shares, py_spy_path, say_profile, top_functions

WARMUP = 300
BODY = b"x" * 100
# An ENQUEUE as the client sends it, to the byte counts that matter here.
ZMQ_FRAMES = [b"", b"ZBC01", b"\x01", b"m" * 40, BODY]
KINDS = ("tcp echo", "zmq echo", "enqueue, memory", "enqueue, async", "enqueue, sync")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve_tcp(port: int) -> None:
    with socket.create_server(("127.0.0.1", port)) as server:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            conn.sendall(data)


def _serve_zmq(port: int) -> None:
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    while True:
        router.send_multipart(router.recv_multipart())


def _timed(call: Callable[[], None], n: int, server_pid: int) -> dict[str, float]:
    for _ in range(WARMUP):
        call()
    samples = []
    server_before = _cpu_s(server_pid)
    thread_before, process_before = time.thread_time(), time.process_time()
    for _ in range(n):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    thread = time.thread_time() - thread_before
    process = time.process_time() - process_before
    server = _cpu_s(server_pid) - server_before
    return {
        "p50_us": statistics.median(samples) * 1e6,
        "client_thread_us": thread / n * 1e6,
        "client_process_us": process / n * 1e6,
        "server_us": server / n * 1e6,
    }


def _echo(kind: str, n: int) -> dict[str, float]:
    port = _free_port()
    serve = "_serve_tcp" if kind == "tcp echo" else "_serve_zmq"
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
    code += f"import round_trip; round_trip.{serve}({port})"
    server = subprocess.Popen([sys.executable, "-c", code])
    try:
        if kind == "tcp echo":
            deadline = time.monotonic() + 10
            while True:
                try:
                    conn = socket.create_connection(("127.0.0.1", port))
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            message = b"".join(ZMQ_FRAMES)

            def tcp_call() -> None:
                conn.sendall(message)
                conn.recv(65536)

            with conn:
                return _timed(tcp_call, n, server.pid)
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(f"tcp://127.0.0.1:{port}")

        def zmq_call() -> None:
            dealer.send_multipart(ZMQ_FRAMES)
            dealer.recv_multipart()

        try:
            return _timed(zmq_call, n, server.pid)
        finally:
            dealer.close()
    finally:
        server.kill()
        server.wait()


def _enqueue(durability: str, n: int, profile_to: Path | None) -> dict[str, float]:
    from zbroker.client import Client

    port, events_in, events_out = _free_port(), _free_port(), _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        argv = [sys.executable, "-m", "zbroker", "start", "--bind", endpoint]
        argv += ["--events-in", f"tcp://127.0.0.1:{events_in}"]
        argv += ["--events-out", f"tcp://127.0.0.1:{events_out}"]
        argv += ["--durability", durability, "--data-dir", data, "--log-level", "warning"]
        broker = subprocess.Popen(argv)
        spy = None
        try:
            with Client(endpoint, timeout_s=30) as client:

                def enqueue() -> None:
                    client.enqueue("round-trip", BODY)

                enqueue()  # the broker is up: what is sampled is the broker at work
                if profile_to is not None:
                    spy = _start_py_spy(broker.pid, profile_to)
                return _timed(enqueue, n, broker.pid)
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            broker.terminate()
            broker.wait()


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    argv = [str(py_spy_path()), "record", "--pid", str(pid), "--native", "--rate", "500"]
    argv += ["--format", "raw", "--output", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the timed calls
    return spy


def measure(kind: str, n: int, profile_to: Path | None = None) -> dict[str, float]:
    if kind.endswith("echo"):
        return _echo(kind, n)
    return _enqueue(kind.rpartition(" ")[2], n, profile_to)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="timed round trips per kind")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, metavar="DIR", help="sample the brokers")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    for round_no in range(1, args.rounds + 1):
        for kind in KINDS:
            profile_to = None
            if args.profile is not None and kind.startswith("enqueue"):
                durability = kind.rpartition(" ")[2]
                profile_to = args.profile / f"round-trip-{durability}-{round_no}.txt"
            figures = measure(kind, args.n, profile_to)
            runs[kind].append(figures)
            print(
                f"[round-trip] {round_no}/{args.rounds} {kind}: p50 {figures['p50_us']:.0f} µs,"
                f" client thread {figures['client_thread_us']:.0f} µs,"
                f" server {figures['server_us']:.0f} µs",
                flush=True,
            )
    print()
    print(
        "| kind | round trip p50 (µs) | client calling thread CPU (µs) |"
        " client process CPU (µs) | server CPU (µs) |"
    )
    print("|---|---:|---:|---:|---:|")
    for kind in KINDS:

        def median(name: str, kind: str = kind) -> float:
            return statistics.median(run[name] for run in runs[kind])

        print(
            f"| {kind} | {median('p50_us'):.0f} | {median('client_thread_us'):.0f} |"
            f" {median('client_process_us'):.0f} | {median('server_us'):.0f} |"
        )
    if args.profile is not None:
        _print_profiles(args.profile)


def _print_profiles(folder: Path) -> None:
    """The busiest functions of each durability's brokers, all rounds merged, and how
    their loop thread spends its time."""
    for kind in KINDS:
        if not kind.startswith("enqueue"):
            continue
        durability = kind.rpartition(" ")[2]
        merged = folder / f"round-trip-{durability}.txt"
        merged.write_text(
            "".join(p.read_text() for p in sorted(folder.glob(f"round-trip-{durability}-*.txt")))
        )
        print(f"\n{kind}: the broker")
        say_profile(top_functions(merged), loop_shares(merged), print)


if __name__ == "__main__":
    main()
