"""Workload "streams": task streams (docs/protocol.md §13) through a real `zbroker
start` process, next to the same chunks through a bare `zmq.proxy` forwarder measured
in the same rounds.

Per run, fresh processes, all on loopback TCP: the server (a broker of one durability
with its journal in a temporary directory, or the forwarder), one worker process with
WORKER_SOCKETS DEALER sockets and one reader process with one DEALER socket. Both peers
use raw pyzmq sockets and zbroker's pure codecs (`zbroker.protocol.ext`, `.zbc`), never
zbroker's client library, so what is measured is the hop in the middle.

- Worker, broker side (ZBW01): READY with a credit on each socket; on TASK: ACK, then
  the task's chunks (its payload says how many, how big, how many per CHUNK message and
  how far apart), then DONE. Every chunk starts with the worker's
  `time.perf_counter_ns()` at send (CLOCK_MONOTONIC: one clock for every process of the
  machine).
- Worker, forwarder side: the same loop, but the STREAM arrives through the forwarder
  and the worker answers the reader itself, with the frames the broker would send
  (CHUNKS `{rid, id, offset, attempt}` and a final REPLY), so the reader is the same
  code for both systems.
- Reader (ZBC01): STREAM calls with a window, MORE when half of it is consumed (broker
  only: the forwarder has no flow control to credit), each chunk's latency = receive
  time minus the stamp in it; time to first chunk = STREAM sent to first chunk
  received. Phases, one after another in the same processes:
  `latency` (sequential streams of paced chunks), `one` (one stream, chunks as fast
  as the worker sends them), `many` (STREAMS_MANY concurrent streams served by
  WORKER_SOCKETS x CREDIT), `many-k` (the same with CHUNKS_PER_MESSAGE chunks per
  CHUNK message). The reader reads the CPU time of the server and of the worker (all
  threads, /proc/PID/task/*/schedstat, in nanoseconds) before and after each phase.

Systems alternate run by run, each round starting with the next one, so drift on the
machine hits them alike. Before the runs, a 4 KiB write + fdatasync is timed where the
journals go: what a sync commit waits for. The broker runs from this working tree, or
from the directory BENCH_ZBROKER_TREE names (a `git archive` of a commit, to measure
it while others have uncommitted changes in zbroker/). The peers are this file:
`python bench/streams.py worker|reader|forwarder ...`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
from harness import (
    CONNECT_TIMEOUT_MS,
    EN_DASH,
    ROOT,
    BenchError,
    Child,
    JSONDict,
    Options,
    ProcessGroup,
    Say,
    Workload,
    connect_handshaken,
    fmt_count,
    fmt_range,
    free_tcp_ports,
    mixed_builds_lines,
    percentile,
    process_cpu_s,
    python_argv,
    spread,
    wait_for_listener,
    zmq_socket,
)

from zbroker.protocol import ext, zbc

SCRIPT = Path(__file__).resolve()
SERVICE = "bench-stream"
FORWARDER = "forwarder"
DURABILITIES = ("sync", "async", "memory")
SYSTEMS = (FORWARDER, *DURABILITIES)
BROKER_SYSTEMS = DURABILITIES
LATENCY, ONE, MANY, MANY_K = "latency", "one", "many", "many-k"
PHASES = (LATENCY, ONE, MANY, MANY_K)
WORKER_SOCKETS = 4
CREDIT = 25  # per worker socket: WORKER_SOCKETS x CREDIT streams run at once
STREAMS_MANY = WORKER_SOCKETS * CREDIT
CHUNKS_PER_MESSAGE = 10
WINDOW = 256
# The bar to compare with: a chunk's p50 from the worker's send to the reader, sync.
BAR_P50_MS = 2.0

WORKER_HEARTBEAT_S = 1.0  # the broker's default interval is 2.5 s, liveness 3
ANSWER_TIMEOUT_MS = 60_000
# Unpaced chunk messages a worker sends for one task before it looks at its sockets
# again (and moves to the next task).
BURST = 8
STAMP_BYTES = 8
RESULT = b"ok"
# A directory holding a `zbroker` package to run the broker from, instead of this
# working tree: e.g. `git archive HEAD zbroker | tar -x -C DIR`, to measure a commit
# while others have uncommitted changes in zbroker/. Peers always use this tree's
# codecs (zbroker.protocol.ext, .zbc).
BROKER_TREE_VARIABLE = "BENCH_ZBROKER_TREE"


@dataclass(frozen=True, slots=True)
class Settings:
    chunk_bytes: int
    window: int
    worker_sockets: int
    credit: int
    warmup_streams: int
    warmup_chunks: int
    latency_streams: int
    latency_chunks: int  # per stream
    latency_interval_us: int  # between two chunks of a stream
    one_chunks: int
    many_streams: int
    many_chunks: int  # per stream
    many_k: int

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        common: dict[str, Any] = {
            "chunk_bytes": 100,
            "window": WINDOW,
            "worker_sockets": WORKER_SOCKETS,
            "credit": CREDIT,
            "warmup_streams": 3,
            "warmup_chunks": 50,
            "latency_interval_us": 2_000,
            "many_streams": STREAMS_MANY,
            "many_k": CHUNKS_PER_MESSAGE,
        }
        if quick:
            return cls(
                latency_streams=5, latency_chunks=40, one_chunks=4_000, many_chunks=40, **common
            )
        return cls(
            latency_streams=20, latency_chunks=50, one_chunks=20_000, many_chunks=200, **common
        )

    def phases(self) -> list[JSONDict]:
        """What the reader runs, in order (`warmup` is not reported)."""
        return [
            _phase("warmup", self.warmup_streams, self.warmup_chunks, 1, 0, concurrent=False),
            _phase(
                LATENCY,
                self.latency_streams,
                self.latency_chunks,
                1,
                self.latency_interval_us,
                concurrent=False,
            ),
            _phase(ONE, 1, self.one_chunks, 1, 0, concurrent=False),
            _phase(MANY, self.many_streams, self.many_chunks, 1, 0, concurrent=True),
            _phase(MANY_K, self.many_streams, self.many_chunks, self.many_k, 0, concurrent=True),
        ]


def _phase(
    name: str, streams: int, chunks: int, k: int, interval_us: int, *, concurrent: bool
) -> JSONDict:
    return {
        "name": name,
        "streams": streams,
        "chunks": chunks,
        "k": k,
        "interval_us": interval_us,
        "concurrent": concurrent,
    }


# ------------------------------------------------------------------ peers (own processes)


def cpu_ns(pid: int) -> int | None:
    """Nanoseconds on a CPU so far of every live thread of `pid` (schedstat), or the
    tick-resolution /proc/PID/stat figure when schedstat is missing."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    try:
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        cpu = process_cpu_s(pid)
        return None if cpu is None else int(cpu * 1e9)
    return total


def forwarder(frontend: str, backend: str) -> None:
    """ROUTER frontend for readers, DEALER backend for workers, libzmq's proxy between.
    ROUTER_MANDATORY makes a full pipe to the reader block the proxy (backpressure)
    instead of dropping chunks, as a plain ROUTER would."""
    ctx = zmq.Context()
    front = zmq_socket(ctx, zmq.ROUTER)
    front.setsockopt(zmq.ROUTER_MANDATORY, 1)
    back = zmq_socket(ctx, zmq.DEALER)
    front.bind(frontend)
    back.bind(backend)
    zmq.proxy(front, back)


class Job:
    """One stream the worker is producing."""

    __slots__ = (
        "due_ns",
        "head",
        "interval_ns",
        "k",
        "left",
        "meta",
        "offset",
        "pad",
        "sock",
        "tail",
    )

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        head: list[bytes],
        tail: list[bytes],
        spec: list[int],
        now_ns: int,
    ) -> None:
        chunks, k, size, interval_us = spec
        self.sock = sock
        self.head = head  # frames before the chunks (broker: up to the meta)
        self.tail = tail  # the message that ends the stream
        self.meta: dict[str, Any] | None = None  # forwarder: CHUNKS meta, packed per message
        self.left = chunks
        self.k = k
        self.pad = bytes(max(0, size - STAMP_BYTES))
        self.interval_ns = interval_us * 1000
        self.due_ns = now_ns
        self.offset = 0


def worker(endpoint: str, system: str, sockets: int, credit: int) -> None:
    """Serve stream tasks on `sockets` DEALER sockets (see the module's docstring)."""
    ctx = zmq.Context()
    socks = [zmq_socket(ctx, zmq.DEALER) for _ in range(sockets)]
    broker = system != FORWARDER
    for sock in socks:
        connect_handshaken(sock, endpoint)
        if broker:
            sock.send_multipart(ext.ready(SERVICE, credit))
    if broker:
        # The broker answers READY at once (a HEARTBEAT greeting): registered.
        for sock in socks:
            if not sock.poll(CONNECT_TIMEOUT_MS):
                sys.exit("no greeting after READY")
            msg = ext.decode_for_worker(sock.recv_multipart())
            if type(msg) is not ext.Heartbeat:
                sys.exit(f"expected a greeting, got {msg!r}")
    print("ready", flush=True)
    StreamWorker(socks, broker).run()


class StreamWorker:
    """Paced jobs send one chunk message when due; unpaced ones send up to BURST messages
    each time round the loop, jobs taking turns. A send blocks when libzmq's pipe is
    full: that is the backpressure §13.1 describes."""

    def __init__(self, socks: list[zmq.Socket[bytes]], broker: bool) -> None:
        self.socks = socks
        self.broker = broker
        self.poller = zmq.Poller()
        for sock in socks:
            self.poller.register(sock, zmq.POLLIN)
        self.jobs: list[Job] = []
        self.packb = msgpack.Packer(use_bin_type=True).pack

    def run(self) -> None:
        clock = time.perf_counter_ns
        heartbeat = ext.heartbeat()
        last_heartbeat = time.monotonic()
        while True:
            for sock, _ in self.poller.poll(self._timeout_ms(clock())):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    job = self._task(sock, frames) if self.broker else self._stream(sock, frames)
                    if job is not None:
                        self.jobs.append(job)
            if self.jobs:
                self._send_due(clock())
            # Every socket, busy or not: one busy socket says nothing for the idle ones.
            if self.broker and time.monotonic() - last_heartbeat >= WORKER_HEARTBEAT_S:
                for sock in self.socks:
                    sock.send_multipart(heartbeat)
                last_heartbeat = time.monotonic()

    def _timeout_ms(self, now_ns: int) -> int:
        if not self.jobs:
            return int(WORKER_HEARTBEAT_S * 1000)
        soonest = min(j.due_ns for j in self.jobs)
        # Rounded up: a chunk sent a little late costs nothing (its stamp is taken when
        # it is sent), a busy wait would take a CPU from the other processes.
        return 0 if soonest <= now_ns else math.ceil((soonest - now_ns) / 1e6)

    def _task(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> Job | None:
        """A ZBW01 message from the broker: a TASK becomes a job, acknowledged at once."""
        msg = ext.decode_for_worker(frames)
        if type(msg) is ext.Task:
            sock.send_multipart(ext.ack([(msg.id, msg.attempt)]))
            ref = self.packb({"id": msg.id, "attempt": msg.attempt})
            return Job(
                sock,
                [b"", ext.ZBW01, ext.CHUNK, ref],
                [b"", ext.ZBW01, ext.DONE, ref, RESULT],
                msgpack.unpackb(msg.payload[0]),
                time.perf_counter_ns(),
            )
        if type(msg) is ext.Cancel:
            sys.exit(f"broker took back {msg.id} attempt {msg.attempt}: {msg.reason}")
        if type(msg) is ext.Disconnect:
            sys.exit(f"broker sent DISCONNECT: {msg.reason}")
        return None  # HEARTBEAT needs no answer; STOPPING does not come during a run

    def _stream(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> Job | None:
        """[reader id, "", "ZBC01", STREAM, meta, payload] through the forwarder: the job
        answers the reader with the frames the broker would send it."""
        if frames[3] != zbc.STREAM:
            return None
        rid = msgpack.unpackb(frames[4])["rid"]
        reader_id, empty, zbc01 = frames[0], b"", zbc.ZBC01
        job = Job(sock, [reader_id, empty, zbc01, zbc.CHUNKS], [], msgpack.unpackb(frames[5]), 0)
        job.due_ns = time.perf_counter_ns()
        # The broker's CHUNKS meta, whose offset changes message by message.
        job.meta = {"rid": rid, "id": f"f{rid}", "offset": 0, "attempt": 1}
        final = self.packb({"rid": rid, "id": f"f{rid}", "state": "done", "next": job.left})
        job.tail = [reader_id, empty, zbc01, zbc.REPLY, final, RESULT]
        return job

    def _send_due(self, now_ns: int) -> None:
        clock = time.perf_counter_ns
        packb = self.packb
        finished = False
        for job in self.jobs:
            if job.due_ns > now_ns:
                continue
            sends = 1 if job.interval_ns else BURST
            while sends and job.left:
                n = min(job.k, job.left)
                chunk = clock().to_bytes(STAMP_BYTES, "little") + job.pad
                if job.meta is None:
                    job.sock.send_multipart([*job.head, *([chunk] * n)])
                else:
                    job.meta["offset"] = job.offset
                    job.sock.send_multipart([*job.head, packb(job.meta), *([chunk] * n)])
                job.offset += n
                job.left -= n
                sends -= 1
            if job.left == 0:
                job.sock.send_multipart(job.tail)
                finished = True
            elif job.interval_ns:
                job.due_ns += job.interval_ns
        if finished:
            self.jobs = [j for j in self.jobs if j.left]


class Call:
    __slots__ = ("ended", "expected", "first_ns", "messages", "received", "sent_ns", "unacked")

    def __init__(self, expected: int) -> None:
        self.sent_ns = 0
        self.first_ns = 0
        self.received = 0
        self.messages = 0  # CHUNKS messages the chunks came in
        self.unacked = 0  # consumed since the last MORE
        self.expected = expected
        self.ended = False


def reader(
    endpoint: str,
    system: str,
    phases: list[JSONDict],
    chunk_bytes: int,
    window: int,
    server_pid: int,
    worker_pid: int,
) -> None:
    """Run each phase and print one JSON line of figures for it (see the module's
    docstring). Latencies are kept in microseconds."""
    ctx = zmq.Context()
    sock = zmq_socket(ctx, zmq.DEALER)
    connect_handshaken(sock, endpoint)
    broker = system != FORWARDER
    rid = 0
    for phase in phases:
        spec = packb_default([phase["chunks"], phase["k"], chunk_bytes, phase["interval_us"]])
        streams = phase["streams"]
        calls: dict[int, Call] = {}
        messages = []
        for _ in range(streams):
            rid += 1
            calls[rid] = Call(phase["chunks"])
            messages.append((rid, zbc.stream(rid, SERVICE, [spec], window=window)))
        latencies: list[int] = []
        first_chunk: list[int] = []
        server_before = cpu_ns(server_pid)
        worker_before = cpu_ns(worker_pid)
        own_before = time.process_time()
        started = time.perf_counter_ns()
        if phase["concurrent"]:
            for call_rid, message in messages:
                calls[call_rid].sent_ns = time.perf_counter_ns()
                sock.send_multipart(message)
            _receive(sock, calls, latencies, first_chunk, broker, window, len(calls))
        else:
            for call_rid, message in messages:
                calls[call_rid].sent_ns = time.perf_counter_ns()
                sock.send_multipart(message)
                _receive(sock, calls, latencies, first_chunk, broker, window, 1)
        ended = time.perf_counter_ns()
        own_cpu = time.process_time() - own_before
        server_after = cpu_ns(server_pid)
        worker_after = cpu_ns(worker_pid)
        chunks = sum(c.received for c in calls.values())
        latencies.sort()
        first_chunk.sort()
        result: JSONDict = {
            "phase": phase["name"],
            "streams": streams,
            "chunks": chunks,
            "messages": sum(c.messages for c in calls.values()),
            "elapsed_s": (ended - started) / 1e9,
            "chunks_per_s": chunks / ((ended - started) / 1e9),
            "server_cpu_s": None
            if server_before is None or server_after is None
            else (server_after - server_before) / 1e9,
            "worker_cpu_s": None
            if worker_before is None or worker_after is None
            else (worker_after - worker_before) / 1e9,
            "reader_cpu_s": own_cpu,
            "latency_us": _summary(latencies),
            "first_chunk_us": _summary(first_chunk),
        }
        print(json.dumps(result, separators=(",", ":")), flush=True)
    sock.close(linger=0)
    ctx.term()


def packb_default(value: object) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _receive(
    sock: zmq.Socket[bytes],
    calls: dict[int, Call],
    latencies: list[int],
    first_chunk: list[int],
    broker: bool,
    window: int,
    ends: int,
) -> None:
    """Read answers until `ends` calls have ended (their final REPLY)."""
    clock = time.perf_counter_ns
    recv = sock.recv_multipart
    half = max(1, window // 2)
    append = latencies.append
    ended = 0
    while ended < ends:
        if not sock.poll(ANSWER_TIMEOUT_MS):
            got = {r: c.received for r, c in calls.items() if not c.ended}
            sys.exit(f"no answer within {ANSWER_TIMEOUT_MS} ms; chunks so far: {got}")
        frames = recv()
        now = clock()
        answer = zbc.decode_answer(frames)
        call = calls.get(answer.rid)
        if call is None:
            sys.exit(f"answer to an unknown call {answer.rid}")
        if not answer.ok:
            sys.exit(f"call {answer.rid} refused: {answer.code}: {answer.message}")
        if answer.chunks:
            if answer.meta["offset"] != call.received:
                sys.exit(
                    f"call {answer.rid}: chunks from offset {answer.meta['offset']}, "
                    f"expected {call.received}"
                )
            n = len(answer.frames)
            if call.received == 0:
                first_chunk.append((now - call.sent_ns) // 1000)
            for chunk in answer.frames:
                append((now - int.from_bytes(chunk[:STAMP_BYTES], "little")) // 1000)
            call.received += n
            call.messages += 1
            if broker:
                call.unacked += n
                if call.unacked >= half:
                    sock.send_multipart(zbc.call(zbc.MORE, answer.rid, credit=call.unacked))
                    call.unacked = 0
        elif "state" in answer.meta:
            if answer.meta["state"] != "done" or call.received != call.expected:
                sys.exit(
                    f"call {answer.rid} ended {answer.meta['state']} after {call.received} "
                    f"of {call.expected} chunks"
                )
            call.ended = True
            ended += 1
        # else: STREAM's acceptance ({ids}), before any chunk.


def _summary(sorted_us: Sequence[int]) -> JSONDict:
    if not sorted_us:
        return {"samples": 0}
    return {
        "samples": len(sorted_us),
        **{f"p{q:g}": percentile(sorted_us, q) for q in (50, 90, 99)},
        "max": sorted_us[-1],
    }


# ------------------------------------------------------------------ one run


def _start_forwarder(procs: ProcessGroup) -> tuple[str, str, Child]:
    front, back = free_tcp_ports(2)
    frontend, backend = f"tcp://127.0.0.1:{front}", f"tcp://127.0.0.1:{back}"
    proxy = procs.start(
        "forwarder",
        python_argv(SCRIPT, "forwarder", "--frontend", frontend, "--backend", backend),
        env=_peer_env(),
    )
    wait_for_listener(front, proxy)
    wait_for_listener(back, proxy)
    return frontend, backend, proxy


def broker_tree() -> Path:
    """Where the broker's `zbroker` package comes from: BROKER_TREE_VARIABLE, else this
    working tree."""
    tree = os.environ.get(BROKER_TREE_VARIABLE)
    return Path(tree).resolve() if tree else ROOT


def _peer_env() -> dict[str, str] | None:
    """The peers' environment: with BROKER_TREE_VARIABLE set, its codecs come first too."""
    tree = broker_tree()
    if tree == ROOT:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    return env


def _start_broker(procs: ProcessGroup, durability: str, data_dir: Path) -> tuple[str, Child]:
    """`python -m zbroker start` run from broker_tree() (its first sys.path entry)."""
    import durable  # the broker's command line, as the durable workload builds it

    port, events_in, events_out = free_tcp_ports(3)
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = durable._broker_argv(endpoint, events_in, events_out, durability, data_dir, "warning")
    broker = procs.start("zbroker", argv, cwd=broker_tree())
    wait_for_listener(port, broker)
    return endpoint, broker


def fdatasync_probe(directory: Path, samples: int = 200) -> JSONDict:
    """What one durable write costs on `directory`'s filesystem: a 4 KiB page
    overwritten in a 1 MiB file, then fdatasync, timed `samples` times (µs). A sync
    LMDB commit does two (its data pages, then its meta page)."""
    path = directory / "fdatasync-probe"
    page = os.urandom(4096)
    times: list[int] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(1 << 20), 0)
        os.fsync(fd)
        for i in range(samples):
            started = time.perf_counter_ns()
            os.pwrite(fd, page, (i * 7919 % 256) * 4096)
            os.fdatasync(fd)
            times.append((time.perf_counter_ns() - started) // 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return _summary(times)


def _tree_digest(tree: Path) -> str:
    """A digest of the broker's sources: the working tree is shared and may change."""
    digest = hashlib.sha256()
    for path in sorted((tree / "zbroker").rglob("*.py")):
        digest.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_once(
    system: str, settings: Settings, procs: ProcessGroup, data_dir: Path, say: Say, tag: str
) -> JSONDict:
    """Fresh server, worker and reader; every phase; the reader's figures per phase."""
    if system == FORWARDER:
        reader_endpoint, worker_endpoint, server = _start_forwarder(procs)
    else:
        reader_endpoint, server = _start_broker(procs, system, data_dir)
        worker_endpoint = reader_endpoint
    worker_proc = procs.start(
        "worker",
        python_argv(
            SCRIPT,
            "worker",
            "--connect",
            worker_endpoint,
            "--system",
            system,
            "--sockets",
            settings.worker_sockets,
            "--credit",
            settings.credit,
        ),
        stdout_pipe=True,
        env=_peer_env(),
    )
    line = worker_proc.read_line(30)
    if line != "ready":
        raise worker_proc.failure(f"said {line!r} instead of 'ready'")
    reader_proc = procs.start(
        "reader",
        python_argv(
            SCRIPT,
            "reader",
            "--connect",
            reader_endpoint,
            "--system",
            system,
            "--phases",
            json.dumps(settings.phases()),
            "--chunk-bytes",
            settings.chunk_bytes,
            "--window",
            settings.window,
            "--server-pid",
            server.pid,
            "--worker-pid",
            worker_proc.pid,
        ),
        stdout_pipe=True,
        env=_peer_env(),
    )
    phases: JSONDict = {}
    for _ in settings.phases():
        line = reader_proc.read_line(120)
        try:
            figures: JSONDict = json.loads(line)
        except json.JSONDecodeError:
            raise reader_proc.failure(f"printed {line[:200]!r}") from None
        name = figures.pop("phase")
        if name == "warmup":
            continue
        _add_per_chunk(figures)
        phases[name] = figures
        say(f"{tag} {system} {name}: {_describe_phase(name, figures)}")
    procs.check_alive(ignoring=(reader_proc,))
    return phases


def _add_per_chunk(figures: JSONDict) -> None:
    chunks = figures["chunks"]
    for who in ("server", "worker", "reader"):
        cpu = figures[f"{who}_cpu_s"]
        figures[f"{who}_cpu_us_per_chunk"] = None if cpu is None else cpu * 1e6 / chunks


def _opt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _describe_phase(name: str, f: JSONDict) -> str:
    lat = f["latency_us"]
    cpu = f["server_cpu_us_per_chunk"]
    text = (
        f"{fmt_count(f['chunks_per_s'])} chunks/s, chunk latency p50 {lat['p50'] / 1000:.2f} ms "
        f"p99 {lat['p99'] / 1000:.2f} ms, server CPU "
        f"{'n/a' if cpu is None else f'{cpu:.1f}'} us/chunk (worker "
        f"{_opt(f['worker_cpu_us_per_chunk'])}, reader {_opt(f['reader_cpu_us_per_chunk'])}), "
        f"{f['chunks'] / f['messages']:.1f} chunks per message read"
    )
    if name == LATENCY:
        text += f", first chunk p50 {f['first_chunk_us']['p50'] / 1000:.2f} ms"
    return text


# ------------------------------------------------------------------ the workload


def run(options: Options, say: Say) -> JSONDict:
    import durable  # its filesystem helper

    settings = Settings.for_mode(options.quick)
    tree = broker_tree()
    if not (tree / "zbroker" / "__main__.py").is_file():
        raise BenchError(f"{BROKER_TREE_VARIABLE}={tree}: no zbroker package there")
    digest_before = _tree_digest(tree)
    order = [
        SYSTEMS[(r + i) % len(SYSTEMS)] for r in range(options.runs) for i in range(len(SYSTEMS))
    ]
    if tree != ROOT:
        say(f"the broker runs from {tree} ({BROKER_TREE_VARIABLE})")
    say(
        f"{options.runs} rounds of {', '.join(SYSTEMS)} (each round starting with the next); "
        f"chunks of {settings.chunk_bytes} bytes; latency: {settings.latency_streams} streams "
        f"of {settings.latency_chunks} chunks {settings.latency_interval_us} us apart; one: "
        f"{fmt_count(settings.one_chunks)} chunks; many: {settings.many_streams} streams x "
        f"{settings.many_chunks} chunks ({settings.worker_sockets} worker sockets, credit "
        f"{settings.credit}); many-k: the same, {settings.many_k} chunks per message"
    )
    with tempfile.TemporaryDirectory(prefix="zbroker-streams-") as tmp:
        fdatasync = fdatasync_probe(Path(tmp))
    say(
        f"4 KiB write + fdatasync where the journals go: p50 {fdatasync['p50'] / 1000:.2f} ms, "
        f"p99 {fdatasync['p99'] / 1000:.2f} ms"
    )
    runs: list[JSONDict] = []
    for index, system in enumerate(order, start=1):
        tag = f"{index}/{len(order)}"
        with (
            tempfile.TemporaryDirectory(prefix="zbroker-streams-") as tmp,
            ProcessGroup(options.log_dir / f"streams-{index:02d}-{system}") as procs,
        ):
            phases = run_once(system, settings, procs, Path(tmp) / "data", say, tag)
        runs.append(
            {
                "run": index,
                "round": (index - 1) // len(SYSTEMS) + 1,
                "system": system,
                "load_average_1m_after": round(os.getloadavg()[0], 2),
                "phases": phases,
            }
        )
    digest_after = _tree_digest(tree)
    if digest_after != digest_before:
        say("WARNING: zbroker's sources changed during the run: figures mix two builds")
    return {
        "settings": asdict(settings),
        # where the broker ran from (this working tree unless BROKER_TREE_VARIABLE said)
        "broker_tree": str(tree),
        "zbroker_source_digest": {"before": digest_before, "after": digest_after},
        "runs_per_system": options.runs,
        "data_dir_filesystem": durable._filesystem(Path(tempfile.gettempdir())),
        "fdatasync_4k_us": fdatasync,
        "runs": runs,
        "summary": summarize(runs),
    }


# ------------------------------------------------------------------ summary and table

METRICS: dict[str, Callable[[JSONDict], float | None]] = {
    "chunks_per_s": lambda f: f["chunks_per_s"],
    "p50_ms": lambda f: f["latency_us"]["p50"] / 1000,
    "p90_ms": lambda f: f["latency_us"]["p90"] / 1000,
    "p99_ms": lambda f: f["latency_us"]["p99"] / 1000,
    "first_chunk_p50_ms": lambda f: (
        f["first_chunk_us"]["p50"] / 1000 if f["first_chunk_us"]["samples"] else None
    ),
    "chunks_per_message": lambda f: f["chunks"] / f["messages"],
    "server_cpu_us_per_chunk": lambda f: f["server_cpu_us_per_chunk"],
    "worker_cpu_us_per_chunk": lambda f: f["worker_cpu_us_per_chunk"],
    "reader_cpu_us_per_chunk": lambda f: f["reader_cpu_us_per_chunk"],
}
RATIO_METRICS = ("p50_ms", "server_cpu_us_per_chunk", "chunks_per_s")


def summarize(runs: list[JSONDict]) -> JSONDict:
    table: JSONDict = {}
    for system in SYSTEMS:
        of = [r for r in runs if r["system"] == system]
        table[system] = {}
        for phase in PHASES:
            metrics: JSONDict = {}
            for name, get in METRICS.items():
                values = [v for r in of if (v := get(r["phases"][phase])) is not None]
                if values:
                    metrics[name] = spread(values)
            table[system][phase] = metrics
    ratios: JSONDict = {}
    by_round: JSONDict = {}
    for system in BROKER_SYSTEMS:
        ratios[system] = {}
        by_round[system] = {}
        for phase in PHASES:
            ratios[system][phase] = {}
            by_round[system][phase] = {}
            for name in RATIO_METRICS:
                mine = table[system][phase].get(name)
                ref = table[FORWARDER][phase].get(name)
                if mine and ref and ref["median"]:
                    ratios[system][phase][name] = mine["median"] / ref["median"]
                # Paired within a round: the forwarder's run of the same round.
                pairs = []
                for r in runs:
                    if r["system"] != system:
                        continue
                    fw = next(
                        (x for x in runs if x["system"] == FORWARDER and x["round"] == r["round"]),
                        None,
                    )
                    if fw is None:
                        continue
                    a, b = METRICS[name](r["phases"][phase]), METRICS[name](fw["phases"][phase])
                    if a is not None and b:
                        pairs.append(a / b)
                if pairs:
                    by_round[system][phase][name] = spread(pairs)
    sync_p50 = table["sync"][LATENCY]["p50_ms"]["median"]
    return {
        "systems": table,
        "ratio_to_forwarder": ratios,
        "ratio_by_round": by_round,
        "bar_p50_ms": {"bar": BAR_P50_MS, "value": sync_p50, "met": sync_p50 <= BAR_P50_MS},
    }


def _fmt(value: float) -> str:
    if value >= 100:
        return fmt_count(value)
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(result: JSONDict) -> str:
    s = result["settings"]
    summary = result["summary"]
    systems = summary["systems"]
    ratios = summary["ratio_to_forwarder"]
    label = {FORWARDER: "forwarder (`zmq.proxy`)", **{d: f"zbroker, {d}" for d in DURABILITIES}}
    lines = [
        f"Task streams over loopback TCP: one worker process ({s['worker_sockets']} ZBW01 "
        f"sockets, credit {s['credit']} each), one reader process (one ZBC01 socket, STREAM "
        f"with window {s['window']}, MORE at half of it), chunks of {s['chunk_bytes']} bytes "
        "stamped with the worker's send time; the reference is the same worker and reader "
        "through a bare `zmq.proxy(ROUTER, DEALER)`, the worker answering the reader itself. "
        f"Median of {result['runs_per_system']} runs (min{EN_DASH}max); data directories on "
        f"{result['data_dir_filesystem']}.",
        "",
        f"Latency: {s['latency_streams']} streams one after another, each "
        f"{s['latency_chunks']} chunks sent {s['latency_interval_us'] / 1000:g} ms apart "
        "(one chunk per CHUNK message); latency per chunk is worker send to reader receive, "
        "first chunk is STREAM sent to first chunk received.",
        "",
        "| System | chunk p50 (ms) | p90 (ms) | p99 (ms) | first chunk p50 (ms) | "
        "p50 / forwarder | server CPU (µs/chunk) | CPU / forwarder |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system in SYSTEMS:
        m = systems[system][LATENCY]
        r = ratios.get(system, {}).get(LATENCY, {})
        lines.append(
            f"| {label[system]} | {fmt_range(m['p50_ms'], _fmt)} | "
            f"{fmt_range(m['p90_ms'], _fmt)} | {fmt_range(m['p99_ms'], _fmt)} | "
            f"{fmt_range(m['first_chunk_p50_ms'], _fmt)} | {_ratio(r.get('p50_ms'))} | "
            f"{fmt_range(m['server_cpu_us_per_chunk'], _fmt)} | "
            f"{_ratio(r.get('server_cpu_us_per_chunk'))} |"
        )
    lines += [
        "",
        f"Throughput: chunks as fast as the worker sends them; `one`: 1 stream of "
        f"{fmt_count(s['one_chunks'])} chunks; `many`: {s['many_streams']} concurrent "
        f"streams of {s['many_chunks']} chunks; `many-k`: the same with {s['many_k']} chunks "
        "per CHUNK message. Chunks/s from the first STREAM sent to the last final REPLY; "
        "server CPU is the broker's (or forwarder's) CPU time over that span, all threads, "
        "per chunk.",
        "",
        "| Phase | System | chunks/s | chunks/s / forwarder | server CPU (µs/chunk) | "
        "CPU / forwarder | chunks per message read | worker, reader CPU (µs/chunk) | "
        "chunk p50 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in (ONE, MANY, MANY_K):
        for system in SYSTEMS:
            m = systems[system][phase]
            r = ratios.get(system, {}).get(phase, {})
            peers = ", ".join(
                _fmt(m[name]["median"]) if name in m else "n/a"
                for name in ("worker_cpu_us_per_chunk", "reader_cpu_us_per_chunk")
            )
            lines.append(
                f"| {phase} | {label[system]} | {fmt_range(m['chunks_per_s'], fmt_count)} | "
                f"{_ratio(r.get('chunks_per_s'))} | "
                f"{fmt_range(m['server_cpu_us_per_chunk'], _fmt)} | "
                f"{_ratio(r.get('server_cpu_us_per_chunk'))} | "
                f"{_fmt(m['chunks_per_message']['median'])} | {peers} | "
                f"{_fmt(m['p50_ms']['median'])} |"
            )
    paired = summary["ratio_by_round"]["sync"]
    cpu_pairs = ", ".join(
        f"{phase} {fmt_range(paired[phase]['server_cpu_us_per_chunk'], _fmt)}"
        for phase in PHASES
        if "server_cpu_us_per_chunk" in paired[phase]
    )
    fsync = result["fdatasync_4k_us"]
    bar = summary["bar_p50_ms"]
    lines += [
        "",
        "Ratios paired round by round (sync over the forwarder of the same round, median "
        f"and range): chunk p50 {fmt_range(paired[LATENCY]['p50_ms'], _fmt)}; server CPU "
        f"per chunk: {cpu_pairs}.",
        "",
        f"A 4 KiB overwrite + `fdatasync` on that filesystem took {fsync['p50'] / 1000:.2f} ms "
        f"at p50, {fsync['p99'] / 1000:.2f} ms at p99 (a sync LMDB commit does two).",
        "",
        f"Bar: chunk latency p50 with `sync` within {bar['bar']:g} ms: "
        f"{'met' if bar['met'] else 'NOT met'} ({bar['value']:.2f} ms).",
    ]
    lines[:0] = mixed_builds_lines(result)
    return "\n".join(lines)


WORKLOAD = Workload(
    name="streams",
    summary="task streams: chunk latency, throughput and broker CPU per chunk (sync/async/"
    "memory); against a bare zmq.proxy",
    run=run,
    markdown=markdown,
)


# ------------------------------------------------------------------ command line (peers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="peers of the streams workload")
    sub = parser.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--connect", required=True)
    w.add_argument("--system", required=True, choices=SYSTEMS)
    w.add_argument("--sockets", type=int, default=WORKER_SOCKETS)
    w.add_argument("--credit", type=int, default=CREDIT)
    r = sub.add_parser("reader")
    r.add_argument("--connect", required=True)
    r.add_argument("--system", required=True, choices=SYSTEMS)
    r.add_argument("--phases", required=True, help="JSON list of phases")
    r.add_argument("--chunk-bytes", type=int, required=True)
    r.add_argument("--window", type=int, default=WINDOW)
    r.add_argument("--server-pid", type=int, required=True)
    r.add_argument("--worker-pid", type=int, required=True)
    f = sub.add_parser("forwarder")
    f.add_argument("--frontend", required=True)
    f.add_argument("--backend", required=True)
    args = parser.parse_args(argv)
    if args.role == "worker":
        worker(args.connect, args.system, args.sockets, args.credit)
    elif args.role == "reader":
        reader(
            args.connect,
            args.system,
            json.loads(args.phases),
            args.chunk_bytes,
            args.window,
            args.server_pid,
            args.worker_pid,
        )
    else:
        forwarder(args.frontend, args.backend)


if __name__ == "__main__":
    main()
