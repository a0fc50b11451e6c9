"""Workload "durable": durable tasks (ZBC01 enqueue, ZBW01 workers) end to end through
a real `zbroker start` process with an LMDB journal, next to the bare `zmq.proxy`
forwarder of the mdp workload measured in the same session; then the broker's memory
with a deep queue, and its restart to ready after a SIGKILL.

Per round, systems alternate so drift on the machine hits all alike:

- `forwarder`: the mdp workload's reference run (bench/mdp.py `run_once`), for the
  ratio zbroker / forwarder;
- `<durability>-<mode>` for durability sync, async, memory and producer mode
  `single` (4 producer processes, single-task ENQUEUEs, up to 64 calls unanswered
  each) or `batch` (1 producer, ENQUEUE batches, up to 8 unanswered): fresh broker,
  2 ZBW01 workers (credit 64, one ACK per batch of TASKs read, then DONE each),
  timed from the first enqueue sent to the last DONE sent;
- `queue`: a broker filled (no workers) to each queue depth, its RssAnon read once
  settled; then SIGKILL and a new broker on the same data directory, timed from
  Popen to its first answer.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import selectors
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mdp
import mdp_peers
import zmq
from harness import (
    BENCH_DIR,
    EN_DASH,
    ROOT,
    BenchError,
    Child,
    JSONDict,
    Options,
    ProcessGroup,
    Say,
    Workload,
    fmt_count,
    fmt_range,
    free_tcp_ports,
    mixed_builds_lines,
    percentile,
    process_cpu_s,
    python_argv,
    spread,
    start_py_spy,
    summarize_profiles,
    wait_for_listener,
)

from zbroker.protocol import zbc

PEERS = BENCH_DIR / "durable_peers.py"
FORWARDER = mdp_peers.FORWARDER
QUEUE = "queue"
DURABILITIES = ("sync", "async", "memory")
MODES = ("single", "batch")
# The same as sync-batch with a subscriber taking every task.* lifecycle event: the
# broker's cost of publishing them (the subscriber counts each message's events with
# msgpack alone). "+objects": the subscriber makes a Python Event of every event as
# zbroker's Subscriber does (its own CPU shares the cores; bench/pair.py only).
# "+done": a subscriber to task.done.* alone, as a coordinator waiting for results
# would hold (bench/pair.py only). "+stopped", a control: the +events subscriber
# is stopped (SIGSTOP) once subscribed, so the broker publishes every event (the
# bus drops what its queue cannot hold) but no subscriber process shares the CPU.
EVENTS_SYSTEM = "sync-batch+events"
OBJECTS_SYSTEM = "sync-batch+objects"
DONE_SYSTEM = "sync-batch+done"
STOPPED_SYSTEM = "sync-batch+stopped"
PAIR_ONLY_SYSTEMS = (OBJECTS_SYSTEM, DONE_SYSTEM, STOPPED_SYSTEM)
TASK_SYSTEMS = (*(f"{d}-{m}" for d in DURABILITIES for m in MODES), EVENTS_SYSTEM)
SYSTEMS = (FORWARDER, *TASK_SYSTEMS, QUEUE)
LABELS = {
    **{f"{d}-single": f"{d}, single-task ENQUEUEs" for d in DURABILITIES},
    **{f"{d}-batch": f"{d}, ENQUEUE batches" for d in DURABILITIES},
    EVENTS_SYSTEM: "sync, ENQUEUE batches, a subscriber to every task.* event",
    OBJECTS_SYSTEM: "sync, ENQUEUE batches, a subscriber decoding every task.* event",
    DONE_SYSTEM: "sync, ENQUEUE batches, a subscriber to task.done.* events",
    STOPPED_SYSTEM: "sync, ENQUEUE batches, every task.* event to a stopped subscriber",
}

# The bars (issue 3).
BAR_SYNC_SINGLE_TPS = 8_000
BAR_SYNC_BATCH_TPS = 40_000
BAR_RSS_AT_1M_MB = 200
BAR_RESTART_AT_1M_S = 2.0
MILLION = 1_000_000

# The broker logs this at INFO once its journal is open (zbroker/runtime/server.py).
RECOVERED_RE = re.compile(r"(\d+) tasks waiting, recovered in ([0-9.]+)s")


@dataclass(frozen=True, slots=True)
class Settings:
    tasks: int  # per throughput run
    body_bytes: int
    workers: int
    credit: int
    single_producers: int
    single_in_flight: int  # per producer
    batch_tasks: int  # wanted; the broker may accept fewer per message (see _largest_batch)
    batch_in_flight: int
    queue_depths: tuple[int, ...]  # RssAnon measured at each; restart at the last
    fill_batch: int  # wanted, as batch_tasks
    fill_in_flight: int
    fill_durability: str

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        common: dict[str, Any] = {
            "body_bytes": 100,
            "workers": 2,
            "credit": 64,
            "single_producers": 4,
            "single_in_flight": 64,
            "batch_tasks": 100,
            "batch_in_flight": 8,
            "fill_batch": 1000,
            "fill_in_flight": 8,
            "fill_durability": "async",
        }
        if quick:
            return cls(tasks=20_000, queue_depths=(0, 100_000), **common)
        return cls(tasks=100_000, queue_depths=(0, 100_000, MILLION), **common)

    def run_timeout_s(self) -> float:
        # Generous: a floor for process start-up plus 500 tasks/s, far below anything sane.
        return 60.0 + self.tasks / 500

    def fill_timeout_s(self, tasks: int) -> float:
        return 60.0 + tasks / 2_000


# ------------------------------------------------------------------ processes


def _start_broker(
    procs: ProcessGroup,
    name: str,
    durability: str,
    data_dir: Path,
    log_level: str = "warning",
    extra_args: Sequence[str] = (),
) -> tuple[str, Child, str]:
    """A broker (`extra_args` added to its command line, e.g. `--auth FILE`); returns
    (ROUTER endpoint, its process, the bus's XPUB endpoint)."""
    port, events_in, events_out = free_tcp_ports(3)
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = _broker_argv(endpoint, events_in, events_out, durability, data_dir, log_level)
    broker = procs.start(name, [*argv, *extra_args])
    wait_for_listener(port, broker)
    return endpoint, broker, f"tcp://127.0.0.1:{events_out}"


def _broker_argv(
    endpoint: str, events_in: int, events_out: int, durability: str, data_dir: Path, log_level: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "zbroker",
        "start",
        "--bind",
        endpoint,
        "--events-in",
        f"tcp://127.0.0.1:{events_in}",
        "--events-out",
        f"tcp://127.0.0.1:{events_out}",
        "--durability",
        durability,
        "--data-dir",
        str(data_dir),
        "--log-level",
        log_level,
    ]


def _expect(child: Child, line: str, timeout_s: float) -> None:
    if (got := child.read_line(timeout_s)) != line:
        raise child.failure(f"said {got!r} instead of {line!r}")


def _read_json(child: Child, timeout_s: float) -> JSONDict:
    line = child.read_line(timeout_s)
    try:
        result: JSONDict = json.loads(line)
    except json.JSONDecodeError as exc:
        raise child.failure(f"printed something other than JSON ({exc}): {line[:200]!r}") from None
    return result


def _lines(child: Child, timeout_s: float) -> list[str]:
    """Every complete line the child has written so far (at least one; waits for it)."""
    lines = [child.read_line(timeout_s)]
    # read_line buffers whatever it read past the first newline: take those lines too,
    # since the pipe will not be readable again for them.
    while b"\n" in child._pending:
        lines.append(child.read_line(timeout_s))
    return lines


def _largest_batch(endpoint: str, wanted: int, body: bytes) -> tuple[int, str | None]:
    """The largest ENQUEUE batch of one-frame tasks, at most `wanted`, that the broker at
    `endpoint` accepts (it caps the frames of one message), and the refusal seen."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 10_000
    sock.connect(endpoint)
    refusal = None

    def accepted(n: int) -> bool:
        nonlocal refusal
        sock.send_multipart(zbc.enqueue(n, "probe", [[body]] * n, batch=True))
        try:
            answer = zbc.decode_answer(sock.recv_multipart())
        except zmq.Again:
            raise BenchError(f"no answer to a probe ENQUEUE of {n} tasks") from None
        if not answer.ok and answer.code != zbc.E_TOO_LARGE:
            raise BenchError(f"probe ENQUEUE of {n} tasks refused: {answer.code}")
        if not answer.ok:
            refusal = f"{answer.code}: {answer.message}"
        return answer.ok

    try:
        if accepted(wanted):
            return wanted, None
        lo, hi = 1, wanted  # lo accepted (a single task must be), hi refused
        if not accepted(lo):
            raise BenchError("the broker refuses even a batch of one task")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if accepted(mid):
                lo = mid
            else:
                hi = mid
        return lo, refusal
    finally:
        sock.close(linger=0)
        ctx.term()


# ------------------------------------------------------------------ throughput


def run_tasks(
    system: str,
    settings: Settings,
    batch: int,
    procs: ProcessGroup,
    data_dir: Path,
    profile_to: Path | None = None,
    broker_args: Sequence[str] = (),
    peer_env: Mapping[str, str] | None = None,
) -> JSONDict:
    """One end-to-end run: fresh broker, workers, producers; returns the figures.

    `broker_args` go to the broker's command line and `peer_env` is the environment
    of every peer process (bench/auth.py: `--auth FILE`, and the CURVE keys
    durable_peers.py reads); by default, none and the benchmark's own."""
    durability, mode = system.split("-")
    mode, _, events_kind = mode.partition("+")
    endpoint, broker, events_out = _start_broker(
        procs, "zbroker", durability, data_dir, extra_args=broker_args
    )
    subscriber = (
        _start_subscriber(procs, events_out, events_kind, peer_env) if events_kind else None
    )
    workers = [
        procs.start(
            f"worker-{i}",
            python_argv(PEERS, "worker", "--connect", endpoint, "--credit", settings.credit),
            stdout_pipe=True,
            env=peer_env,
        )
        for i in range(settings.workers)
    ]
    for w in workers:
        _expect(w, "ready", timeout_s=20)
    if mode == "single":
        shares = _split(settings.tasks, settings.single_producers)
        producer_args = [["--in-flight", settings.single_in_flight] for _ in shares]
    else:
        shares = [settings.tasks]
        producer_args = [["--batch", batch, "--in-flight", settings.batch_in_flight]]
    producers = [
        procs.start(
            f"producer-{i}",
            python_argv(
                PEERS,
                "producer",
                "--connect",
                endpoint,
                "--count",
                share,
                "--body-bytes",
                settings.body_bytes,
                "--wait-for-signal",
                *args,
            ),
            stdout_pipe=True,
            env=peer_env,
        )
        for i, (share, args) in enumerate(zip(shares, producer_args, strict=True))
    ]
    for p in producers:
        _expect(p, "ready", timeout_s=60)

    cpu_before = process_cpu_s(broker.pid)
    workers_cpu_before = [process_cpu_s(w.pid) for w in workers]
    subscriber_cpu_before = None if subscriber is None else process_cpu_s(subscriber.pid)
    profiler = None
    if profile_to is not None:
        profiler = start_py_spy(procs, "py-spy", broker.pid, profile_to)
    for p in producers:
        os.kill(p.pid, signal.SIGUSR1)
    produced, done = _collect(procs, producers, workers, settings.tasks, settings.run_timeout_s())
    cpu_after = process_cpu_s(broker.pid)
    workers_cpu_after = [process_cpu_s(w.pid) for w in workers]
    subscriber_cpu_after = None if subscriber is None else process_cpu_s(subscriber.pid)
    if profiler is not None:
        procs.interrupt(profiler)
    procs.check_alive(ignoring=(*producers, profiler))
    events = event_messages = None
    if subscriber is not None:
        events, event_messages = _subscriber_counts(subscriber, events_kind, settings)

    started = min(r["started"] for r in produced)
    confirmed = max(r["ended"] for r in produced)
    last_done = max(r["last_done"] for r in done)
    latencies = list(heapq.merge(*(r["latencies_us"] for r in produced)))
    done_count = sum(r["count"] for r in done)
    elapsed = last_done - started
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    worker_cpu = _cpu_delta(workers_cpu_before, workers_cpu_after)
    producer_cpu = sum(r["cpu_s"] for r in produced)
    subscriber_cpu = (
        None
        if subscriber_cpu_before is None or subscriber_cpu_after is None
        else subscriber_cpu_after - subscriber_cpu_before
    )
    per_100k = 100_000 / settings.tasks
    return {
        "tasks": settings.tasks,
        "tasks_per_call": 1 if mode == "single" else batch,
        "calls": len(latencies),
        "done": done_count,
        "redelivered": done_count - settings.tasks,
        "elapsed_s": elapsed,
        "throughput_tps": settings.tasks / elapsed,
        "confirm_rate_tps": settings.tasks / (confirmed - started),
        "confirm_latency_us": _latency_summary(latencies),
        "broker_cpu_s": cpu,
        "broker_cpu_s_per_100k": None if cpu is None else cpu * per_100k,
        "workers_cpu_s_per_100k": None if worker_cpu is None else worker_cpu * per_100k,
        "producers_cpu_s_per_100k": producer_cpu * per_100k,
        # the subscriber's CPU while the tasks ran (it may finish reading later); None
        # without one
        "subscriber_cpu_s_per_100k": None if subscriber_cpu is None else subscriber_cpu * per_100k,
        "done_per_worker": [r["count"] for r in done],
        "events_received": events,
        # bus messages they came in (the broker batches consecutive events of a topic)
        "event_messages": event_messages,
    }


def _start_subscriber(
    procs: ProcessGroup,
    events_out: str,
    events_kind: str,
    env: Mapping[str, str] | None = None,
) -> Child:
    """The events subscriber of a `+<events_kind>` run, subscribed (and SIGSTOPped for
    "stopped")."""
    prefix = "task.done." if events_kind == "done" else "task."
    argv = ["subscriber", "--connect", events_out, "--prefix", prefix]
    if events_kind == "objects":
        argv.append("--decode")
    subscriber = procs.start("subscriber", python_argv(PEERS, *argv), stdout_pipe=True, env=env)
    _expect(subscriber, "ready", timeout_s=20)
    time.sleep(0.5)  # let the subscription travel to the broker (pub/sub joins late)
    if events_kind == "stopped":
        os.kill(subscriber.pid, signal.SIGSTOP)
    return subscriber


def _subscriber_counts(
    subscriber: Child, events_kind: str, settings: Settings
) -> tuple[int | None, int | None]:
    """(events, bus messages) the subscriber received once it has them all; (None, None)
    for a stopped one, which is let go on instead (its count means nothing: not read)."""
    if events_kind == "stopped":
        os.kill(subscriber.pid, signal.SIGCONT)
        return None, None
    # At least enqueued, started and done per task (done alone for "+done");
    # read its last report.
    least = settings.tasks if events_kind == "done" else 3 * settings.tasks
    while True:
        report = _read_json(subscriber, settings.run_timeout_s())
        events, event_messages = report["events"], report["messages"]
        if events >= least:
            return events, event_messages


def _cpu_delta(before: list[float | None], after: list[float | None]) -> float | None:
    if any(v is None for v in (*before, *after)):
        return None
    return sum(a - b for a, b in zip(after, before, strict=True))  # type: ignore[operator]


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _latency_summary(sorted_us: Sequence[float]) -> JSONDict:
    return {
        "samples": len(sorted_us),
        "mean": sum(sorted_us) / len(sorted_us),
        **{f"p{q:g}": percentile(sorted_us, q) for q in (50, 90, 99, 99.9)},
        "max": sorted_us[-1],
    }


def _collect(
    procs: ProcessGroup,
    producers: list[Child],
    workers: list[Child],
    tasks: int,
    timeout_s: float,
) -> tuple[list[JSONDict], list[JSONDict]]:
    """Wait for every producer's JSON and for the workers' counts to add up to `tasks`.

    Workers report only once idle, so a report may come mid-run (a producer stalled);
    the latest report of each worker counts."""
    produced: list[JSONDict] = []
    latest: dict[int, JSONDict] = {w.pid: {"count": 0, "last_done": 0.0} for w in workers}
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        for child in (*producers, *workers):
            assert child.proc.stdout is not None
            sel.register(child.proc.stdout.fileno(), selectors.EVENT_READ, child)
        while len(produced) < len(producers) or sum(r["count"] for r in latest.values()) < tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                done = sum(r["count"] for r in latest.values())
                raise BenchError(
                    f"after {timeout_s:.0f}s: {len(produced)} of {len(producers)} producers "
                    f"finished, {done} of {tasks} tasks done"
                )
            for key, _ in sel.select(min(remaining, 1.0)):
                child: Child = key.data
                for line in _lines(child, timeout_s=10):
                    try:
                        report = json.loads(line)
                    except json.JSONDecodeError:
                        raise child.failure(f"printed {line[:200]!r}") from None
                    if child in producers:
                        produced.append(report)
                        sel.unregister(key.fileobj)  # it exits now: EOF is no news
                    else:
                        latest[child.pid] = report
            # A producer exits right after its report; one that dies without reporting
            # shows up as end of file on its pipe, which read_line turns into a failure.
            procs.check_alive(ignoring=producers)
    return produced, list(latest.values())


# ------------------------------------------------------------------ queue depth and restart


def rss_anon_kib(pid: int) -> int:
    """The process's anonymous resident memory (heap, stacks; not the LMDB map), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise BenchError(f"no RssAnon in /proc/{pid}/status")


def _settled_rss_kib(pid: int, timeout_s: float = 15.0) -> int:
    """RssAnon once two readings 0.5 s apart differ by at most 1% (or 256 KiB)."""
    deadline = time.monotonic() + timeout_s
    previous = rss_anon_kib(pid)
    while True:
        time.sleep(0.5)
        current = rss_anon_kib(pid)
        if abs(current - previous) <= max(256, current // 100) or time.monotonic() > deadline:
            return current
        previous = current


def _disk_bytes(path: Path) -> int:
    """Bytes the files under `path` occupy on disk (LMDB's file is sparse)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def _start_until_ready(
    procs: ProcessGroup, name: str, durability: str, data_dir: Path
) -> tuple[Child, str, float]:
    """Start a broker and time Popen -> its first answer to a ZBC01 STATUS call (a
    `not_found` ERROR counts). The client connects before Popen and retries every
    10 ms, so the figure includes interpreter start-up, imports, journal recovery
    and binding: what a restart costs whoever waits for the broker."""
    port, events_in, events_out = free_tcp_ports(3)
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.reconnect_ivl = 10
    sock.connect(endpoint)
    try:
        started = time.perf_counter()
        broker = procs.start(
            name, _broker_argv(endpoint, events_in, events_out, durability, data_dir, "info")
        )
        # Queued on the connecting pipe; delivered once the broker listens.
        sock.send_multipart(zbc.call(zbc.STATUS, 1, id="bench-no-such-task"))
        deadline = started + 120.0
        while not sock.poll(100):
            if broker.proc.poll() is not None:
                raise broker.failure("exited before answering")
            if time.perf_counter() > deadline:
                raise broker.failure("did not answer within 120 s")
        elapsed = time.perf_counter() - started
        answer = zbc.decode_answer(sock.recv_multipart())
        if answer.ok or answer.code != zbc.E_NOT_FOUND:
            raise broker.failure(f"answered STATUS of an unknown task with {answer}")
    finally:
        sock.close(linger=0)
        ctx.term()
    return broker, endpoint, elapsed


def _recovery_log(broker: Child) -> tuple[int, float]:
    """(tasks waiting, recovery time) from the broker's INFO line about its journal."""
    deadline = time.monotonic() + 5.0
    while True:
        match = RECOVERED_RE.search(broker.log_path.read_text(errors="replace"))
        if match:
            return int(match.group(1)), float(match.group(2))
        if time.monotonic() > deadline:
            raise broker.failure("logged no 'recovered in' line")
        time.sleep(0.05)


def run_queue(
    settings: Settings, batch: int, procs: ProcessGroup, data_dir: Path, say: Say
) -> JSONDict:
    """Fill a broker (no workers) to each depth, read RssAnon; SIGKILL; time the restart."""
    durability = settings.fill_durability
    broker, endpoint, first_start_s = _start_until_ready(
        procs, "zbroker-fill", durability, data_dir
    )
    rss: dict[str, int] = {}
    fill_rates: dict[str, float] = {}
    filled = 0
    for depth in settings.queue_depths:
        if depth > filled:
            producer = procs.start(
                f"fill-{depth}",
                python_argv(
                    PEERS,
                    "producer",
                    "--connect",
                    endpoint,
                    "--count",
                    depth - filled,
                    "--body-bytes",
                    settings.body_bytes,
                    "--batch",
                    batch,
                    "--in-flight",
                    settings.fill_in_flight,
                ),
                stdout_pipe=True,
            )
            _expect(producer, "ready", timeout_s=60)
            result = _read_json(producer, settings.fill_timeout_s(depth - filled))
            procs.stop(producer)
            fill_rates[str(depth)] = (depth - filled) / (result["ended"] - result["started"])
            filled = depth
        rss[str(depth)] = _settled_rss_kib(broker.pid)
        say(f"  {fmt_count(depth)} queued: RssAnon {rss[str(depth)] / 1024:.1f} MiB")
    disk = _disk_bytes(data_dir)

    # Crash, then a new process on the same journal.
    os.kill(broker.pid, signal.SIGKILL)
    broker.proc.wait(10)
    procs.stop(broker)
    restarted, _, restart_s = _start_until_ready(procs, "zbroker-restart", durability, data_dir)
    waiting, recovered_s = _recovery_log(restarted)
    if waiting != filled:
        raise restarted.failure(f"recovered {waiting} waiting tasks, not the {filled} confirmed")
    rss_after = _settled_rss_kib(restarted.pid)
    procs.check_alive(ignoring=[c for c in procs.children if c is not restarted])
    return {
        "durability": durability,
        "tasks_per_call": batch,
        "rss_anon_kib": rss,
        "fill_rate_tps": fill_rates,
        "journal_disk_bytes": disk,
        "restart_depth": filled,
        "start_empty_s": first_start_s,
        "restart_s": restart_s,
        "recovered_s": recovered_s,
        "rss_anon_after_restart_kib": rss_after,
    }


# ------------------------------------------------------------------ the workload


def _source_digest() -> str:
    """A digest of zbroker's sources: the tree is shared and may change under a run."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "zbroker").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run(options: Options, say: Say) -> JSONDict:
    settings = Settings.for_mode(options.quick)
    digest_before = _source_digest()
    mdp_settings = mdp.Settings.for_mode(options.quick)
    body = bytes(i % 251 for i in range(settings.body_bytes))
    with (
        tempfile.TemporaryDirectory(prefix="zbroker-durable-probe-") as tmp,
        ProcessGroup(options.log_dir / "durable-probe") as procs,
    ):
        endpoint, _, _ = _start_broker(procs, "zbroker", "memory", Path(tmp))
        batch, batch_refusal = _largest_batch(endpoint, settings.batch_tasks, body)
        fill_batch, fill_refusal = _largest_batch(endpoint, settings.fill_batch, body)
    for wanted, got, refusal in (
        (settings.batch_tasks, batch, batch_refusal),
        (settings.fill_batch, fill_batch, fill_refusal),
    ):
        if got != wanted:
            say(f"the broker refuses ENQUEUEs of {wanted} tasks ({refusal}): using {got}")
    order = [system for _ in range(options.runs) for system in SYSTEMS]
    say(
        f"{options.runs} runs per system, alternating; {fmt_count(settings.tasks)} tasks of "
        f"{settings.body_bytes} bytes per run, {settings.workers} ZBW01 workers with credit "
        f"{settings.credit}; single: {settings.single_producers} producers x "
        f"{settings.single_in_flight} in flight; batch: {batch} tasks per ENQUEUE x "
        f"{settings.batch_in_flight} in flight; queue depths "
        f"{', '.join(fmt_count(d) for d in settings.queue_depths)} ({settings.fill_durability})"
    )
    runs: list[JSONDict] = []
    for index, system in enumerate(order, start=1):
        tag = f"{index}/{len(order)}"
        profile_to = None
        if options.profile_dir is not None and system in TASK_SYSTEMS:
            profile_to = options.profile_dir / f"durable-{index:02d}-{system}.txt"
        with (
            tempfile.TemporaryDirectory(prefix="zbroker-durable-") as tmp,
            ProcessGroup(options.log_dir / f"durable-{index:02d}-{system}") as procs,
        ):
            data_dir = Path(tmp) / "data"
            if system == FORWARDER:
                figures = mdp.run_once(FORWARDER, mdp_settings, procs)
            elif system == QUEUE:
                say(f"{tag} queue: filling ({settings.fill_durability}, {fill_batch} per ENQUEUE)")
                figures = run_queue(settings, fill_batch, procs, data_dir, say)
            else:
                figures = run_tasks(system, settings, batch, procs, data_dir, profile_to)
        record = {
            "run": index,
            "system": system,
            "profiled": profile_to is not None,
            # The machine is shared: other work skews a run; this says how much there was.
            "load_average_1m_after": round(os.getloadavg()[0], 2),
            **figures,
        }
        runs.append(record)
        say(f"{tag} {system}: {_describe(record)}; load {record['load_average_1m_after']}")
    digest_after = _source_digest()
    if digest_after != digest_before:
        say("WARNING: zbroker's sources changed during the run: figures mix two builds")
    result: JSONDict = {
        "settings": asdict(settings),
        "zbroker_source_digest": {"before": digest_before, "after": digest_after},
        "batch_tasks_used": batch,
        "batch_refusal": batch_refusal,
        "fill_batch_used": fill_batch,
        "fill_refusal": fill_refusal,
        "forwarder_settings": asdict(mdp_settings),
        "runs_per_system": options.runs,
        "data_dir_filesystem": _filesystem(Path(tempfile.gettempdir())),
        "runs": runs,
        "summary": summarize(runs, settings),
    }
    if options.profile_dir is not None:
        result["profile"] = _profile_summary(options.profile_dir, say)
    return result


def _describe(record: JSONDict) -> str:
    system = record["system"]
    if system == FORWARDER:
        return f"{fmt_count(record['throughput_rps'])} req/s (MDP echo reference)"
    if system == QUEUE:
        rss = ", ".join(
            f"{fmt_count(int(d))}: {kib / 1024:.1f}" for d, kib in record["rss_anon_kib"].items()
        )
        return (
            f"RssAnon MiB {rss}; restart with {fmt_count(record['restart_depth'])} queued "
            f"{record['restart_s']:.2f} s to ready (recovery {record['recovered_s']:.3f} s, "
            f"empty start {record['start_empty_s']:.2f} s)"
        )
    latency = record["confirm_latency_us"]
    cpu = record["broker_cpu_s_per_100k"]
    return (
        f"{fmt_count(record['throughput_tps'])} tasks/s end to end, confirms at "
        f"{fmt_count(record['confirm_rate_tps'])}/s, confirm p50 {latency['p50'] / 1000:.1f} ms "
        f"p99 {latency['p99'] / 1000:.1f} ms, broker CPU "
        f"{'n/a' if cpu is None else f'{cpu:.2f}'} s/100k tasks (workers "
        f"{_fmt_opt(record['workers_cpu_s_per_100k'])}, producers "
        f"{_fmt_opt(record['producers_cpu_s_per_100k'])})"
        + (f", {record['redelivered']} redelivered" if record["redelivered"] else "")
    )


def _fmt_opt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _filesystem(path: Path) -> str | None:
    """'fstype (device)' of the mount holding `path`, from /proc/mounts."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    best: list[str] | None = None
    resolved = str(path.resolve())
    for m in mounts:
        mount = m[1]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and (
            best is None or len(mount) > len(best[1])
        ):
            best = m
    return None if best is None else f"{best[2]} ({best[0]})"


def _profile_summary(profile_dir: Path, say: Say) -> JSONDict:
    return summarize_profiles(profile_dir, "durable", TASK_SYSTEMS, say)


# ------------------------------------------------------------------ summary and table

TASK_METRICS: dict[str, str] = {
    "throughput_tps": "End to end (tasks/s)",
    "confirm_rate_tps": "Confirmed (tasks/s)",
    "confirm_p50_ms": "Confirm p50 (ms)",
    "confirm_p99_ms": "Confirm p99 (ms)",
    "broker_cpu_s_per_100k": "Broker CPU (s per 100k tasks)",
    "workers_cpu_s_per_100k": "Workers' CPU (s per 100k tasks)",
    "producers_cpu_s_per_100k": "Producers' CPU (s per 100k tasks)",
}


def _task_metric(record: JSONDict, name: str) -> float | None:
    if name.startswith("confirm_p"):
        return float(record["confirm_latency_us"][name.split("_")[1]]) / 1000
    value = record[name]
    return None if value is None else float(value)


def summarize(runs: list[JSONDict], settings: Settings) -> JSONDict:
    def of(system: str) -> list[JSONDict]:
        return [r for r in runs if r["system"] == system]

    forwarder = spread([r["throughput_rps"] for r in of(FORWARDER)])
    systems: JSONDict = {}
    ratios: JSONDict = {}
    for system in TASK_SYSTEMS:
        metrics: JSONDict = {}
        for name in TASK_METRICS:
            values = [v for r in of(system) if (v := _task_metric(r, name)) is not None]
            if values:
                metrics[name] = spread(values)
        systems[system] = metrics
        ratios[system] = metrics["throughput_tps"]["median"] / forwarder["median"]
    queue_runs = of(QUEUE)
    depths = [str(d) for d in settings.queue_depths]
    queue = {
        "rss_anon_mib": {
            d: spread([r["rss_anon_kib"][d] / 1024 for r in queue_runs]) for d in depths
        },
        "fill_rate_tps": {
            d: spread([r["fill_rate_tps"][d] for r in queue_runs])
            for d in depths
            if all(d in r["fill_rate_tps"] for r in queue_runs)
        },
        "journal_disk_mib": spread([r["journal_disk_bytes"] / 2**20 for r in queue_runs]),
        "restart_depth": settings.queue_depths[-1],
        "restart_s": spread([r["restart_s"] for r in queue_runs]),
        "recovered_s": spread([r["recovered_s"] for r in queue_runs]),
        "start_empty_s": spread([r["start_empty_s"] for r in queue_runs]),
        "rss_anon_after_restart_mib": spread(
            [r["rss_anon_after_restart_kib"] / 1024 for r in queue_runs]
        ),
    }
    million = str(MILLION)
    bars = {
        "sync_single_tps": _bar(
            systems["sync-single"]["throughput_tps"]["median"], BAR_SYNC_SINGLE_TPS, at_least=True
        ),
        "sync_batch_tps": _bar(
            systems["sync-batch"]["throughput_tps"]["median"], BAR_SYNC_BATCH_TPS, at_least=True
        ),
        "rss_anon_at_1m_mib": _bar(
            queue["rss_anon_mib"][million]["median"] if million in queue["rss_anon_mib"] else None,
            BAR_RSS_AT_1M_MB,
            at_least=False,
        ),
        "restart_at_1m_s": _bar(
            queue["restart_s"]["median"] if settings.queue_depths[-1] == MILLION else None,
            BAR_RESTART_AT_1M_S,
            at_least=False,
        ),
    }
    # Runs of one round are minutes apart, rounds can be far apart on a shared machine:
    # the cost of events is read round by round (the k-th run of each, same round).
    events_by_round = [
        e["throughput_tps"] / p["throughput_tps"]
        for p, e in zip(of("sync-batch"), of(EVENTS_SYSTEM), strict=False)
    ]
    return {
        "forwarder_rps": forwarder,
        "systems": systems,
        "ratio_to_forwarder": ratios,
        "events_ratio_by_round": events_by_round,
        "queue": queue,
        "bars": bars,
    }


def _bar(value: float | None, bar: float, *, at_least: bool) -> JSONDict:
    met = None if value is None else (value >= bar if at_least else value < bar)
    return {"value": value, "bar": bar, "at_least": at_least, "met": met}


def _bar_text(bar: JSONDict, fmt: Callable[[float], str], unit: str) -> str:
    target = f"{'≥' if bar['at_least'] else '<'} {fmt(bar['bar'])} {unit}"
    if bar["met"] is None:
        return f"{target}: not measured in this run (`--quick` fills to 100,000 only)"
    return f"{target}: {'met' if bar['met'] else 'NOT met'} ({fmt(bar['value'])} {unit})"


def markdown(result: JSONDict) -> str:
    settings = result["settings"]
    summary = result["summary"]
    systems = summary["systems"]
    ratios = summary["ratio_to_forwarder"]
    fw = summary["forwarder_rps"]
    fws = result["forwarder_settings"]
    batch = result["batch_tasks_used"]
    fill_batch = result["fill_batch_used"]

    def fmt_value(name: str) -> Callable[[float], str]:
        if name.endswith("_per_100k") or name.startswith("confirm_p"):
            return lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}"
        return fmt_count

    batch_text = f"ENQUEUE batches of {batch} tasks"
    if result["batch_refusal"]:
        batch_text += (
            f" (the {settings['batch_tasks']} wanted are refused by the broker, "
            f"`{result['batch_refusal']}`: {batch} is the most it accepts)"
        )
    lines = [
        f"Durable tasks end to end over loopback TCP, broker a `zbroker start` process: "
        f"{fmt_count(settings['tasks'])} tasks of {settings['body_bytes']} bytes per run, "
        f"{settings['workers']} ZBW01 worker processes with credit {settings['credit']} "
        "(one ACK per batch of TASKs read, then a DONE with a 2-byte result for each); "
        f"timed from the first ENQUEUE sent to the last DONE sent. Producers: `single` is "
        f"{settings['single_producers']} processes sending single-task ENQUEUEs with up to "
        f"{settings['single_in_flight']} unanswered each; `batch` is one process sending "
        f"{batch_text}, up to {settings['batch_in_flight']} unanswered. No idempotency keys. "
        "Confirm latency is per call, ENQUEUE sent to id received, under that load. "
        f"Median of {result['runs_per_system']} runs (min{EN_DASH}max), systems alternated "
        "in one session; the ratio is zbroker tasks/s over the forwarder's MDP echo req/s "
        f"(bench/mdp.py reference: {fws['workers']} workers, {fmt_count(fws['requests'])} "
        f"requests, {fws['in_flight']} in flight, {fws['body_bytes']}-byte bodies), "
        f"measured in the same rounds: {fmt_range(fw, fmt_count)} req/s.",
        "",
        "| Durability, producer | " + " | ".join(TASK_METRICS.values()) + " | ratio to forwarder |",
        "|---|" + "---:|" * (len(TASK_METRICS) + 1),
    ]
    for system in TASK_SYSTEMS:
        metrics = systems[system]
        cells = [
            fmt_range(metrics[name], fmt_value(name)) if name in metrics else "n/a"
            for name in TASK_METRICS
        ]
        lines.append(f"| {LABELS[system]} | " + " | ".join(cells) + f" | {ratios[system]:.2f} |")
    plain = systems["sync-batch"]["throughput_tps"]["median"]
    with_events = systems[EVENTS_SYSTEM]["throughput_tps"]["median"]
    by_round = summary.get("events_ratio_by_round") or []
    rounds = ", ".join(f"{r:.2f}" for r in by_round)
    lines += [
        "",
        f"Lifecycle events: with a subscriber taking every `task.*` event (at least three "
        f"per task), sync batches ran at {statistics.median(by_round):.2f} of the rate "
        f"without one, median of the rounds ({rounds}); the medians of the table give "
        f"{with_events / plain:.2f} ({fmt_count(with_events)} against {fmt_count(plain)} "
        "tasks/s)."
        if by_round
        else "Lifecycle events: no run with a subscriber.",
    ]
    queue = summary["queue"]
    depth = queue["restart_depth"]
    mib = lambda v: f"{v:.1f}"  # noqa: E731
    secs = lambda v: f"{v:.2f}"  # noqa: E731
    msecs = lambda v: f"{v:.3f}"  # noqa: E731
    lines += [
        "",
        f"Queue depth, no workers: the broker (`--durability {settings['fill_durability']}`) "
        f"filled with ENQUEUE batches of {fill_batch} tasks of {settings['body_bytes']} bytes"
        + (
            f" ({settings['fill_batch']} refused, `{result['fill_refusal']}`)"
            if result["fill_refusal"]
            else ""
        )
        + f", up to {settings['fill_in_flight']} unanswered; `RssAnon` from /proc/PID/status "
        "once it settles (the LMDB map is file-backed and not in it). Then SIGKILL and a new "
        f"broker process on the same data directory with {fmt_count(depth)} tasks queued: "
        "restart to ready is Popen to the first answer to a ZBC01 STATUS call from a client "
        "connected beforehand; recovery is the broker's own log line.",
        "",
        "| Queued tasks | RssAnon (MiB) | Fill rate (tasks/s) |",
        "|---:|---:|---:|",
    ]
    for d, s in queue["rss_anon_mib"].items():
        rate = queue["fill_rate_tps"].get(d)
        lines.append(
            f"| {fmt_count(int(d))} | {fmt_range(s, mib)} | "
            f"{fmt_range(rate, fmt_count) if rate else EN_DASH} |"
        )
    lines += [
        "",
        "| Restart | seconds |",
        "|---|---:|",
        f"| Popen to first answer, empty journal | {fmt_range(queue['start_empty_s'], secs)} |",
        f"| Popen to first answer, {fmt_count(depth)} queued (after SIGKILL) | "
        f"{fmt_range(queue['restart_s'], secs)} |",
        f"| of which journal recovery (broker log) | {fmt_range(queue['recovered_s'], msecs)} |",
        "",
        f"RssAnon after the restart with {fmt_count(depth)} queued: "
        f"{fmt_range(queue['rss_anon_after_restart_mib'], mib)} MiB; journal on disk "
        f"{fmt_range(queue['journal_disk_mib'], mib)} MiB.",
        "",
        "Bars (issue 3):",
        "",
    ]
    lines[2:2] = mixed_builds_lines(result)
    profiled = sum(1 for r in result["runs"] if r["profiled"])
    if profiled:
        lines[2:2] = [
            f"**{profiled} of these runs were profiled with py-spy, which competes for CPU: "
            "do not quote these figures.**",
            "",
        ]
    bars = summary["bars"]
    lines += [
        "- sync, single-task ENQUEUEs, end to end "
        + _bar_text(bars["sync_single_tps"], fmt_count, "tasks/s"),
        "- sync, ENQUEUE batches, end to end "
        + _bar_text(bars["sync_batch_tps"], fmt_count, "tasks/s")
        + (
            f" (batches of {batch}, not {settings['batch_tasks']})"
            if batch != settings["batch_tasks"]
            else ""
        ),
        f"- RssAnon with 1,000,000 queued {_bar_text(bars['rss_anon_at_1m_mib'], mib, 'MiB')}",
        f"- restart to ready with 1,000,000 queued {_bar_text(bars['restart_at_1m_s'], secs, 's')}",
    ]
    return "\n".join(lines)


WORKLOAD = Workload(
    name="durable",
    summary="durable tasks end to end (sync/async/memory), memory at queue depth, restart to "
    "ready; against a bare zmq.proxy",
    run=run,
    markdown=markdown,
)
