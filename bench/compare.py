"""Workload "compare": zbroker side by side with the systems its users would pick
instead (Redis lists and streams, RabbitMQ, NATS JetStream), each through its
ordinary Python client and configured for reliable work, with the bare `zmq.proxy`
forwarder as the ceiling of one hop. The same parameters for every system:

1. `throughput`: durable tasks end to end, single-task messages from several
   producers, and batches (or pipelines, where the system has no batches);
2. `latency`: sequential round trips, enqueue one task and wait for its reply;
3. `crash`: SIGKILL the server with tasks confirmed, restart it on the same data,
   drain; count tasks lost (confirmed, never handled) and handled twice;
4. `memory`: server memory with 0, 100k and 1M tasks queued;
5. `restart`: restart to ready with the deepest queue;
6. `sequential`: one producer, one task in flight, each enqueue confirmed before the
   next: confirmed enqueues per second and the latency of each.

Every row also says which failure a confirmed task survives (SURVIVES: a process
crash, a power cut, or nothing), from each system's documentation and configuration.
`BENCH_COMPARE_SYSTEMS` and `BENCH_COMPARE_PHASES` (comma-separated) run a subset.

zbroker is measured by bench/durable.py's own functions (`run_tasks`, `run_queue`,
its peers), so its figures here mean what they mean there; the other systems'
peers are in bench/compare_peers.py, their servers in bench/servers.py. Within each
phase, systems alternate run by run. A run that fails or times out is recorded
with its error and the workload goes on.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import compare_peers as peers
import durable
import mdp
import mdp_peers
import servers
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
    python_argv,
    spread,
    wait_for_listener,
)

PEERS = BENCH_DIR / "compare_peers.py"
IMG_DIR = ROOT / "docs" / "img"

FORWARDER = mdp_peers.FORWARDER
ZB_SYNC, ZB_ASYNC, ZB_MEMORY = "zbroker-sync", "zbroker-async", "zbroker-memory"
ZBROKER_SYSTEMS = (ZB_SYNC, ZB_ASYNC, ZB_MEMORY)
OTHERS = (
    peers.REDIS_LIST,
    peers.REDIS_STREAM,
    peers.REDIS_STREAM_ALWAYS,
    peers.RABBITMQ_P1,
    peers.RABBITMQ_P100,
    peers.RABBITMQ_QUORUM,
    peers.NATS,
)
SERVER_KIND = {
    peers.REDIS_LIST: servers.REDIS,
    peers.REDIS_STREAM: servers.REDIS,
    peers.REDIS_STREAM_ALWAYS: servers.REDIS_ALWAYS,
    peers.RABBITMQ_P1: servers.RABBITMQ,
    peers.RABBITMQ_P100: servers.RABBITMQ,
    peers.RABBITMQ_QUORUM: servers.RABBITMQ,
    peers.NATS: servers.NATS,
    peers.CELERY: servers.REDIS,
    peers.DRAMATIQ: servers.REDIS,
}
# Celery and Dramatiq: single-task messages only, each producer one task at a time
# (their enqueue calls are synchronous, and neither has a batch enqueue).
FRAMEWORKS = peers.FRAMEWORKS
SINGLE, BATCH = "single", "batch"
LABELS = {
    FORWARDER: "zmq.proxy forwarder (MDP echo, not durable)",
    ZB_SYNC: "zbroker sync",
    ZB_ASYNC: "zbroker async",
    ZB_MEMORY: "zbroker memory",
    peers.REDIS_LIST: "Redis list (BLMOVE/LREM)",
    peers.REDIS_STREAM: "Redis stream (XREADGROUP/XACK)",
    peers.REDIS_STREAM_ALWAYS: "Redis stream, appendfsync always",
    peers.RABBITMQ_P1: "RabbitMQ, prefetch 1",
    peers.RABBITMQ_P100: "RabbitMQ, prefetch 100",
    peers.RABBITMQ_QUORUM: "RabbitMQ quorum queue, prefetch 100",
    peers.NATS: "NATS JetStream",
    peers.CELERY: "Celery on Redis",
    peers.DRAMATIQ: "Dramatiq on Redis",
}

# What "batch" is for each system (the `single` mode is the same for all).
BATCH_MEANS = {
    ZB_SYNC: "ENQUEUE batches",
    peers.REDIS_LIST: "LPUSH of many values (one command)",
    peers.REDIS_STREAM: "a pipeline of XADDs (one round trip, not a transaction)",
    peers.RABBITMQ_P1: "messages published back to back, the call done when all are confirmed",
    peers.NATS: "publish_async of every message, then await all their acks",
}

BATCH_NAMES = {
    ZB_SYNC: "zbroker",
    peers.REDIS_LIST: "Redis list",
    peers.REDIS_STREAM: "Redis stream",
    peers.RABBITMQ_P1: "RabbitMQ",
    peers.NATS: "NATS",
}

# The crash phase: memory durability keeps nothing by design, so it is left out.
CRASH_SYSTEMS = (ZB_SYNC, ZB_ASYNC, *OTHERS, *FRAMEWORKS)
# Memory and restart: zbroker's durability hardly matters there (durable.run_queue fills
# with `async`, as in the durable workload), and both RabbitMQ cases share one server.
QUEUE_SYSTEMS = (
    "zbroker",
    peers.REDIS_LIST,
    peers.REDIS_STREAM,
    peers.REDIS_STREAM_ALWAYS,
    peers.RABBITMQ_P1,
    peers.RABBITMQ_QUORUM,
    peers.NATS,
)
QUEUE_LABELS = {
    "zbroker": "zbroker (LMDB, filled with --durability async)",
    peers.REDIS_LIST: "Redis list",
    peers.REDIS_STREAM: "Redis stream",
    peers.REDIS_STREAM_ALWAYS: "Redis stream, appendfsync always",
    peers.RABBITMQ_P1: "RabbitMQ classic durable queue",
    peers.RABBITMQ_QUORUM: "RabbitMQ quorum queue",
    peers.NATS: "NATS JetStream file stream",
}
# Sequential enqueues: no consumer, so RabbitMQ's prefetch plays no part (the classic
# queue runs as `rabbitmq-p100`).
SEQUENTIAL_SYSTEMS = (
    *ZBROKER_SYSTEMS,
    peers.REDIS_STREAM,
    peers.REDIS_STREAM_ALWAYS,
    peers.RABBITMQ_P100,
    peers.RABBITMQ_QUORUM,
    peers.NATS,
)
SEQUENTIAL_LABELS = {
    **LABELS,
    peers.REDIS_STREAM: "Redis stream (XADD), appendfsync everysec",
    peers.REDIS_STREAM_ALWAYS: "Redis stream (XADD), appendfsync always",
    peers.RABBITMQ_P100: "RabbitMQ classic durable queue",
    peers.RABBITMQ_QUORUM: "RabbitMQ quorum queue",
}
PHASES = ("throughput", "latency", "crash", "queue", "sequential")

# What a confirmed task survives, per system: "power cut" (on disk, fsynced, before the
# confirm), "process crash" (handed to the kernel before the confirm, fsynced later:
# a kill of the server loses nothing, a power cut or kernel crash may lose the last
# writes), "nothing" (memory only). Each with the reason and where it is documented.
POWER_CUT, PROCESS_CRASH, NOTHING = "power cut", "process crash", "nothing"
REDIS_DOC = "https://redis.io/docs/latest/operate/oss_and_stack/management/persistence/"
RABBITMQ_CONFIRMS_DOC = "https://www.rabbitmq.com/docs/confirms"
RABBITMQ_QUORUM_DOC = "https://www.rabbitmq.com/docs/quorum-queues"
NATS_DOC = "https://docs.nats.io/nats-concepts/jetstream"  # "Syncing data to disk"
ZBROKER_DOC = "docs/architecture.md (What survives what), docs/protocol.md (Durability)"
_REDIS_EVERYSEC = (
    PROCESS_CRASH,
    "`appendfsync everysec`: the AOF is written before the reply and fsynced once a "
    "second, so a power cut may lose the last second",
    REDIS_DOC,
)
SURVIVES: dict[str, tuple[str, str, str]] = {
    FORWARDER: (NOTHING, "a forwarder, not a queue: nothing is stored", "bench/mdp.py"),
    ZB_SYNC: (
        POWER_CUT,
        "`--durability sync`: each group commit of the LMDB journal is fsynced (data and "
        "meta) before its confirms are sent",
        ZBROKER_DOC,
    ),
    ZB_ASYNC: (
        PROCESS_CRASH,
        "`--durability async`: committed to the LMDB map without fsync; the kernel holds it "
        "if the broker dies, a power cut may lose the last commits",
        ZBROKER_DOC,
    ),
    ZB_MEMORY: (NOTHING, "`--durability memory`: nothing is written", ZBROKER_DOC),
    "zbroker": (PROCESS_CRASH, "the queue phase fills with `--durability async`", ZBROKER_DOC),
    peers.REDIS_LIST: _REDIS_EVERYSEC,
    peers.REDIS_STREAM: _REDIS_EVERYSEC,
    peers.REDIS_STREAM_ALWAYS: (
        POWER_CUT,
        "`appendfsync always`: the commands of each event-loop pass are written and fsynced "
        "to the AOF before their replies are sent",
        REDIS_DOC,
    ),
    peers.RABBITMQ_P1: (
        POWER_CUT,
        "classic durable queue, persistent messages: the confirm (basic.ack) is sent once the "
        "message is persisted to disk; the store fsyncs in batches every few hundred ms or "
        "when the queue is idle, which is why confirms wait (documented for classic queues)",
        RABBITMQ_CONFIRMS_DOC,
    ),
    peers.RABBITMQ_QUORUM: (
        POWER_CUT,
        'quorum queue: the Raft log is written and fsynced before the confirm ("persist all '
        'data to disks before doing anything"); one node here, so a quorum of one',
        RABBITMQ_QUORUM_DOC,
    ),
    peers.NATS: (
        PROCESS_CRASH,
        "JetStream file store: written before the ack, fsynced on a timer (`sync_interval`, "
        "2 minutes by default); the docs warn an OS failure may lose acknowledged messages "
        "on a single server",
        NATS_DOC,
    ),
    peers.CELERY: (
        PROCESS_CRASH,
        "its messages are in the Redis above (`appendfsync everysec`)",
        REDIS_DOC,
    ),
    peers.DRAMATIQ: (
        PROCESS_CRASH,
        "its messages are in the Redis above (`appendfsync everysec`)",
        REDIS_DOC,
    ),
}
SURVIVES[peers.RABBITMQ_P100] = SURVIVES[peers.RABBITMQ_P1]

MILLION = 1_000_000
# Restart: how long after the first answer a depth query may take to find every task.
RECOVER_WAIT_S = 60.0
CRASH_QUIET_S = 3.0  # drained: every confirmed task handled, then nothing new for this long


@dataclass(frozen=True, slots=True)
class Settings:
    tasks: int  # per throughput run
    latency_samples: int
    latency_warmup: int
    crash_confirmed: int  # SIGKILL once the producer holds this many confirms
    crash_total: int  # what the producer would send without the crash
    queue_depths: tuple[int, ...]
    # After the restart, how long workers get to drain before what is missing counts as lost.
    crash_drain_s: float
    body_bytes: int = 100
    workers: int = 2
    credit: int = 64  # zbroker credit, Redis stream COUNT, NATS fetch batch
    single_producers: int = 4
    single_in_flight: int = 64
    batch_tasks: int = 100
    batch_in_flight: int = 8
    fill_batch: int = 1000
    fill_in_flight: int = 8
    sequential_samples: int = 5_000  # timed confirmed enqueues, one at a time
    sequential_warmup: int = 500

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                10_000,
                1_000,
                100,
                3_000,
                100_000,
                (0, 100_000),
                30.0,
                sequential_samples=1_000,
                sequential_warmup=100,
            )
        return cls(100_000, 5_000, 500, 20_000, 400_000, (0, 100_000, MILLION), 90.0)

    def durable_settings(self, quick: bool) -> durable.Settings:
        """The durable workload's settings with this workload's parameters."""
        return dataclasses.replace(
            durable.Settings.for_mode(quick),
            tasks=self.tasks,
            body_bytes=self.body_bytes,
            workers=self.workers,
            credit=self.credit,
            single_producers=self.single_producers,
            single_in_flight=self.single_in_flight,
            batch_tasks=self.batch_tasks,
            batch_in_flight=self.batch_in_flight,
            queue_depths=self.queue_depths,
            fill_batch=self.fill_batch,
            fill_in_flight=self.fill_in_flight,
        )

    def forwarder_settings(self) -> mdp.Settings:
        return mdp.Settings(
            requests=self.tasks,
            warmup=min(5_000, self.tasks),
            in_flight=200,
            workers=self.workers,
            latency_samples=self.latency_samples,
            body_bytes=self.body_bytes,
        )

    def run_timeout_s(self) -> float:
        return 60.0 + self.tasks / 200

    def fill_timeout_s(self, tasks: int) -> float:
        return 60.0 + tasks / 2_000


# ------------------------------------------------------------------ processes


def _peer(procs: ProcessGroup, name: str, role: str, system: str, url: str, *args: object) -> Child:
    return procs.start(
        name, python_argv(PEERS, role, "--system", system, "--url", url, *args), stdout_pipe=True
    )


def _start_workers(
    procs: ProcessGroup, system: str, url: str, settings: Settings, record: Path | None = None
) -> list[Child]:
    extra: list[object] = ["--credit", settings.credit]
    workers = []
    for i in range(settings.workers):
        rec = [] if record is None else ["--record", f"{record}.worker-{i}"]
        workers.append(_peer(procs, f"worker-{i}", "worker", system, url, *extra, *rec))
    for w in workers:
        durable._expect(w, "ready", timeout_s=60)
    return workers


def _start_server(system: str, procs: ProcessGroup, data_dir: Path) -> servers.Server:
    server = servers.Server(SERVER_KIND[system], data_dir, procs)
    server.start()
    peers.setup(system, server.url)
    return server


# ------------------------------------------------------------------ 1. throughput


def run_throughput(
    system: str, mode: str, settings: Settings, quick: bool, procs: ProcessGroup, tmp: Path
) -> JSONDict:
    if system == FORWARDER:
        figures = mdp.run_once(FORWARDER, settings.forwarder_settings(), procs)
        return {
            "throughput_tps": figures["throughput_rps"],
            "latency_us": figures["latency_us"],
            "broker_cpu_s_per_100k": _per_100k(figures["server_cpu_s"], settings.tasks),
        }
    if system in ZBROKER_SYSTEMS:
        durability = system.removeprefix("zbroker-")
        return durable.run_tasks(
            f"{durability}-{mode}",
            settings.durable_settings(quick),
            settings.batch_tasks,
            procs,
            tmp / "data",
        )
    server = _start_server(system, procs, tmp / "data")
    workers = _start_workers(procs, system, server.url, settings)
    if mode == SINGLE:
        shares = durable._split(settings.tasks, settings.single_producers)
        in_flight = 1 if system in FRAMEWORKS else settings.single_in_flight
        args = [["--in-flight", in_flight] for _ in shares]
    else:
        shares = [settings.tasks]
        args = [["--batch", settings.batch_tasks, "--in-flight", settings.batch_in_flight]]
    producers = []
    first = 0
    for i, (share, extra) in enumerate(zip(shares, args, strict=True)):
        producers.append(
            _peer(
                procs,
                f"producer-{i}",
                "producer",
                system,
                server.url,
                "--count",
                share,
                "--first-seq",
                first,
                "--body-bytes",
                settings.body_bytes,
                "--wait-for-signal",
                *extra,
            )
        )
        first += share
    for p in producers:
        durable._expect(p, "ready", timeout_s=60)
    cpu_before = servers.group_cpu_s(server.pid)
    for p in producers:
        os.kill(p.pid, signal.SIGUSR1)
    produced, done = durable._collect(
        procs, producers, workers, settings.tasks, settings.run_timeout_s()
    )
    cpu = servers.group_cpu_s(server.pid) - cpu_before
    procs.check_alive(ignoring=producers)
    started = min(r["started"] for r in produced)
    confirmed = max(r["ended"] for r in produced)
    last_done = max(r["last_done"] for r in done)
    latencies = sorted(v for r in produced for v in r["latencies_us"])
    done_count = sum(r["count"] for r in done)
    return {
        "tasks": settings.tasks,
        "tasks_per_call": 1 if mode == SINGLE else settings.batch_tasks,
        "done": done_count,
        "redelivered": done_count - settings.tasks,
        "elapsed_s": last_done - started,
        "throughput_tps": settings.tasks / (last_done - started),
        "confirm_rate_tps": settings.tasks / (confirmed - started),
        "confirm_latency_us": durable._latency_summary(latencies),
        "broker_cpu_s_per_100k": _per_100k(cpu, settings.tasks),
        "producers_cpu_s_per_100k": _per_100k(sum(r["cpu_s"] for r in produced), settings.tasks),
        "done_per_worker": [r["count"] for r in done],
    }


def _per_100k(cpu_s: float | None, tasks: int) -> float | None:
    return None if cpu_s is None else cpu_s * 100_000 / tasks


# ------------------------------------------------------------------ 2. latency


def run_latency(system: str, settings: Settings, procs: ProcessGroup, tmp: Path) -> JSONDict:
    """Sequential round trips; 2 workers as in the throughput runs."""
    if system in ZBROKER_SYSTEMS:
        durability = system.removeprefix("zbroker-")
        url, _broker, _events = durable._start_broker(procs, "zbroker", durability, tmp / "data")
        workers = [
            procs.start(
                f"worker-{i}",
                python_argv(durable.PEERS, "worker", "--connect", url, "--credit", settings.credit),
                stdout_pipe=True,
            )
            for i in range(settings.workers)
        ]
        for w in workers:
            durable._expect(w, "ready", timeout_s=60)
        peer_system = peers.ZBROKER
    else:
        server = _start_server(system, procs, tmp / "data")
        url = server.url
        _start_workers(procs, system, url, settings)
        peer_system = system
    client = _peer(
        procs,
        "requester",
        "requester",
        peer_system,
        url,
        "--samples",
        settings.latency_samples,
        "--warmup",
        settings.latency_warmup,
        "--body-bytes",
        settings.body_bytes,
    )
    durable._expect(client, "ready", timeout_s=60)
    report = durable._read_json(client, timeout_s=120 + settings.latency_samples * 0.1)
    procs.check_alive(ignoring=[client])
    return {"latency_us": durable._latency_summary(report["latency_us"])}


# ------------------------------------------------------------------ 3. crash


@dataclass
class _Crashable:
    """A server the crash run can kill and restart on the same data and ports."""

    url: str
    pid: Callable[[], int]
    kill: Callable[[], None]
    restart: Callable[[], float]


def _crashable(system: str, procs: ProcessGroup, data_dir: Path) -> _Crashable:
    if system in ZBROKER_SYSTEMS:
        durability = system.removeprefix("zbroker-")
        port, events_in, events_out = free_tcp_ports(3)
        url = f"tcp://127.0.0.1:{port}"
        argv = durable._broker_argv(url, events_in, events_out, durability, data_dir, "warning")
        holder: dict[str, Child] = {}

        def start() -> float:
            started = time.perf_counter()
            holder["broker"] = procs.start(f"zbroker-{len(holder) + 1}", argv)
            wait_for_listener(port, holder["broker"])
            return time.perf_counter() - started

        def kill() -> None:
            os.killpg(holder["broker"].pid, signal.SIGKILL)
            holder["broker"].proc.wait(10)
            procs.stop(holder["broker"])

        start()
        return _Crashable(url, lambda: holder["broker"].pid, kill, start)
    server = _start_server(system, procs, data_dir)
    return _Crashable(server.url, lambda: server.pid, server.kill, server.start)


def _records(path: Path) -> int:
    """How many sequence numbers a peer has appended to `path` so far."""
    try:
        return path.stat().st_size // 8
    except FileNotFoundError:
        return 0


def _read_seqs(path: Path) -> list[int]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    usable = len(raw) - len(raw) % 8
    return [int.from_bytes(raw[i : i + 8], "big") for i in range(0, usable, 8)]


def run_crash(system: str, settings: Settings, procs: ProcessGroup, tmp: Path) -> JSONDict:
    """Workers and one producer (single-task messages, 64 unconfirmed) run; once the
    producer holds `crash_confirmed` confirms, SIGKILL the server (its whole process
    group) and the producer; restart the server on the same data; the workers
    reconnect and drain. Lost: confirmed, never handled. Duplicated: handled twice."""
    server = _crashable(system, procs, tmp / "data")
    peer_system = peers.ZBROKER if system in ZBROKER_SYSTEMS else system
    record = tmp / "record"
    workers = _start_workers(procs, peer_system, server.url, settings, record)
    confirms = Path(f"{record}.producer")
    producer = _peer(
        procs,
        "producer",
        "producer",
        peer_system,
        server.url,
        "--count",
        settings.crash_total,
        "--in-flight",
        1 if system in FRAMEWORKS else settings.single_in_flight,
        "--body-bytes",
        settings.body_bytes,
        "--record",
        confirms,
    )
    durable._expect(producer, "ready", timeout_s=60)
    deadline = time.monotonic() + settings.run_timeout_s()
    while _records(confirms) < settings.crash_confirmed:
        if producer.proc.poll() is not None:
            raise producer.failure("ended before the crash")
        if time.monotonic() > deadline:
            raise BenchError(f"fewer than {settings.crash_confirmed} confirms before the deadline")
        time.sleep(0.005)
    server.kill()
    procs.stop(producer)
    handled_at_kill = sum(
        len(_read_seqs(Path(f"{record}.worker-{i}"))) for i in range(len(workers))
    )
    confirmed = set(_read_seqs(confirms))
    restart_s = server.restart()

    # Drain: until every confirmed task has been handled and nothing new came for a
    # while (a late duplicate would come in that while), or the timeout.
    quiet_s = CRASH_QUIET_S + (servers.NATS_ACK_WAIT_S if system == peers.NATS else 0.0)
    drain_deadline = time.monotonic() + settings.crash_drain_s
    last_total, last_change = -1, time.monotonic()
    while True:
        handled = [s for i in range(len(workers)) for s in _read_seqs(Path(f"{record}.worker-{i}"))]
        now = time.monotonic()
        if len(handled) != last_total:
            last_total, last_change = len(handled), now
        if confirmed <= set(handled) and now - last_change >= quiet_s:
            break
        if now > drain_deadline:
            break
        time.sleep(0.1)
    for w in workers:
        if w.proc.poll() is not None:
            raise w.failure("died during the run")
    counts = Counter(handled)
    lost = confirmed - counts.keys()
    return {
        "confirmed": len(confirmed),
        "handled_before_kill": handled_at_kill,
        "handled": len(handled),
        "handled_distinct": len(counts),
        "lost": len(lost),
        "lost_sample": sorted(lost)[:20],
        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
        "restart_s": restart_s,
        "drained_in_time": confirmed <= counts.keys(),
    }


# ------------------------------------------------------------------ 4-5. memory, restart


def run_queue(
    system: str, settings: Settings, quick: bool, procs: ProcessGroup, tmp: Path, say: Say
) -> JSONDict:
    """Fill to each depth with no workers, read the server's memory once settled; then
    SIGKILL and restart on the same data, timed from Popen to the first answer of a
    depth query, which must find every task confirmed before the kill."""
    if system == "zbroker":
        figures = durable.run_queue(
            settings.durable_settings(quick), settings.fill_batch, procs, tmp / "data", say
        )
        return {
            "rss_anon_kib": figures["rss_anon_kib"],
            "rss_kib": None,
            "restart_depth": figures["restart_depth"],
            "depth_after_restart": figures["restart_depth"],  # run_queue checks it
            "restart_s": figures["restart_s"],
            "start_empty_s": figures["start_empty_s"],
            "disk_bytes": figures["journal_disk_bytes"],
        }
    server = servers.Server(SERVER_KIND[system], tmp / "data", procs)
    start_empty_s = server.start()
    peers.setup(system, server.url)
    rss_anon: dict[str, int] = {}
    rss: dict[str, int] = {}
    settle: dict[str, int | None] = {}  # seconds until memory held still; None: it did not
    filled = 0
    for depth in settings.queue_depths:
        if depth > filled:
            fill = _peer(
                procs,
                f"fill-{depth}",
                "producer",
                system,
                server.url,
                "--count",
                depth - filled,
                "--first-seq",
                filled,
                "--batch",
                settings.fill_batch,
                "--in-flight",
                settings.fill_in_flight,
                "--body-bytes",
                settings.body_bytes,
            )
            durable._expect(fill, "ready", timeout_s=60)
            durable._read_json(fill, settings.fill_timeout_s(depth - filled))
            procs.stop(fill)
            filled = depth
        memory = servers.settled_memory_kib(server.pid)
        rss_anon[str(depth)], rss[str(depth)] = memory["rss_anon_kib"], memory["rss_kib"]
        settle[str(depth)] = memory["settled_s"] if memory["settled"] else None
        say(
            f"  {fmt_count(depth)} queued: RssAnon {memory['rss_anon_kib'] / 1024:.1f} MiB, "
            f"RSS {memory['rss_kib'] / 1024:.1f} MiB, "
            + (
                f"steady after {memory['settled_s']} s"
                if memory["settled"]
                else f"still moving after {memory['settled_s']} s"
            )
        )
    disk = sum(f.stat().st_blocks * 512 for f in (tmp / "data").rglob("*") if f.is_file())
    server.kill()
    found: list[int] = []
    first_answer: list[float] = []

    def answered() -> bool:
        # Ready once a depth query finds every task: a quorum queue answers (with 0)
        # before its Raft log is replayed. Past RECOVER_WAIT_S, what it finds is recorded.
        found.append(peers.depth(system, server.url))
        first_answer[:] = first_answer or [time.monotonic()]
        return found[-1] >= filled or time.monotonic() - first_answer[0] > RECOVER_WAIT_S

    restart_s = server.start(ready=answered)
    return {
        "rss_anon_kib": rss_anon,
        "rss_kib": rss,
        "memory_settled_s": settle,
        "restart_depth": filled,
        "depth_after_restart": found[-1],
        "restart_s": restart_s,
        "start_empty_s": start_empty_s,
        "disk_bytes": disk,
    }


# ------------------------------------------------------------------ 6. sequential


def run_sequential(system: str, settings: Settings, procs: ProcessGroup, tmp: Path) -> JSONDict:
    """One producer, one task in flight, each enqueue confirmed before the next; no
    consumer (the queue only grows by a few thousand tasks). Server CPU is over the
    producer's whole run, warm-up included."""
    if system in ZBROKER_SYSTEMS:
        durability = system.removeprefix("zbroker-")
        url, broker, _events = durable._start_broker(procs, "zbroker", durability, tmp / "data")
        pid, peer_system = broker.pid, peers.ZBROKER
    else:
        server = _start_server(system, procs, tmp / "data")
        url, pid, peer_system = server.url, server.pid, system
    n, warmup = settings.sequential_samples, settings.sequential_warmup
    cpu_before = servers.group_cpu_s(pid)
    producer = _peer(
        procs,
        "sequential",
        "sequential",
        peer_system,
        url,
        "--samples",
        n,
        "--warmup",
        warmup,
        "--body-bytes",
        settings.body_bytes,
    )
    durable._expect(producer, "ready", timeout_s=60)
    report = durable._read_json(producer, timeout_s=120 + (n + warmup) * 0.1)
    cpu = servers.group_cpu_s(pid) - cpu_before
    procs.check_alive(ignoring=[producer])
    elapsed = report["ended"] - report["started"]
    return {
        "enqueues": report["count"],
        "elapsed_s": elapsed,
        "rate_per_s": report["count"] / elapsed,
        "latency_us": durable._latency_summary(report["latency_us"]),
        "server_cpu_us_per_enqueue": cpu * 1e6 / (n + warmup),
        "producer_cpu_us_per_enqueue": report["cpu_s"] * 1e6 / report["count"],
    }


# ------------------------------------------------------------------ the workload


Case = tuple[str, str, str]  # phase, system, mode


def all_systems() -> tuple[str, ...]:
    return (FORWARDER, *ZBROKER_SYSTEMS, *OTHERS, *FRAMEWORKS)


def selection() -> tuple[set[str], tuple[str, ...]]:
    """The systems and phases to run: all, or those BENCH_COMPARE_SYSTEMS and
    BENCH_COMPARE_PHASES name (comma-separated). The queue phase's zbroker row runs
    when any zbroker system is named (or `zbroker`)."""
    known = set(all_systems()) | {"zbroker"}
    raw = os.environ.get("BENCH_COMPARE_SYSTEMS", "").strip()
    systems = {x.strip() for x in raw.split(",") if x.strip()} if raw else set(known)
    if unknown := systems - known:
        raise BenchError(
            f"BENCH_COMPARE_SYSTEMS: unknown {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(known))}"
        )
    if systems & set(ZBROKER_SYSTEMS):
        systems.add("zbroker")
    raw = os.environ.get("BENCH_COMPARE_PHASES", "").strip()
    phases = tuple(x.strip() for x in raw.split(",") if x.strip()) if raw else PHASES
    if unknown_phases := set(phases) - set(PHASES):
        raise BenchError(
            f"BENCH_COMPARE_PHASES: unknown {', '.join(sorted(unknown_phases))}; "
            f"known: {', '.join(PHASES)}"
        )
    return systems, tuple(p for p in PHASES if p in phases)


def cases(settings: Settings) -> list[list[Case]]:
    """The phases, each a list of cases run once per round (systems alternate); only
    the systems and phases `selection()` allows, empty phases left out."""
    throughput: list[Case] = [("throughput", FORWARDER, "echo")]
    for system in (*ZBROKER_SYSTEMS, *OTHERS):
        throughput += [("throughput", system, SINGLE), ("throughput", system, BATCH)]
    throughput += [("throughput", system, SINGLE) for system in FRAMEWORKS]
    latency: list[Case] = [("latency", s, "") for s in (*ZBROKER_SYSTEMS, *OTHERS, *FRAMEWORKS)]
    crash: list[Case] = [("crash", s, "") for s in CRASH_SYSTEMS]
    queue: list[Case] = [("queue", s, "") for s in QUEUE_SYSTEMS]
    sequential: list[Case] = [("sequential", s, "") for s in SEQUENTIAL_SYSTEMS]
    systems, phases = selection()
    chosen = []
    for phase in (throughput, latency, crash, queue, sequential):
        kept = [c for c in phase if c[0] in phases and c[1] in systems]
        if kept:
            chosen.append(kept)
    return chosen


def run(options: Options, say: Say) -> JSONDict:
    settings = Settings.for_mode(options.quick)
    servers.ensure_installed(servers.KINDS, say)
    phases = cases(settings)
    total = sum(len(p) for p in phases) * options.runs
    say(
        f"{options.runs} runs per case, systems alternating within each phase; "
        f"{fmt_count(settings.tasks)} tasks of {settings.body_bytes} bytes per throughput run, "
        f"{settings.workers} workers; single: {settings.single_producers} producers x "
        f"{settings.single_in_flight} unconfirmed; batch: {settings.batch_tasks} tasks per call x "
        f"{settings.batch_in_flight}; {fmt_count(settings.latency_samples)} round trips; crash "
        f"after {fmt_count(settings.crash_confirmed)} confirms; queue depths "
        f"{', '.join(fmt_count(d) for d in settings.queue_depths)}; "
        f"{fmt_count(settings.sequential_samples)} sequential enqueues; {total} runs"
    )
    if not phases:
        raise BenchError("BENCH_COMPARE_SYSTEMS and BENCH_COMPARE_PHASES leave no case to run")
    digest_before = durable._source_digest()
    runs: list[JSONDict] = []
    index = 0
    started = time.monotonic()
    for phase in phases:
        for _ in range(options.runs):
            for kind, system, mode in phase:
                index += 1
                runs.append(_one(index, total, kind, system, mode, settings, options, say))
    digest_after = durable._source_digest()
    if digest_after != digest_before:
        say("WARNING: zbroker's sources changed during the run: figures mix two builds")
    say(f"all runs done in {time.monotonic() - started:.0f} s")
    result: JSONDict = {
        "settings": asdict(settings),
        "forwarder_settings": asdict(settings.forwarder_settings()),
        "runs_per_system": options.runs,
        "quick": options.quick,
        "selection": {
            "systems": os.environ.get("BENCH_COMPARE_SYSTEMS") or "all",
            "phases": os.environ.get("BENCH_COMPARE_PHASES") or "all",
        },
        "zbroker_source_digest": {"before": digest_before, "after": digest_after},
        "versions": servers.versions(),
        "configuration": configuration(),
        "data_dir_filesystem": durable._filesystem(Path(tempfile.gettempdir())),
        "runs": runs,
        "summary": summarize(runs, settings),
    }
    result["plots"] = plot(result, IMG_DIR, say)
    return result


def _one(
    index: int,
    total: int,
    kind: str,
    system: str,
    mode: str,
    settings: Settings,
    options: Options,
    say: Say,
) -> JSONDict:
    name = f"{system}-{mode}" if mode else system
    tag = f"{index}/{total} {kind}"
    t0 = time.monotonic()
    record: JSONDict = {"run": index, "phase": kind, "system": system, "mode": mode}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="zbroker-compare-") as tmp,
            ProcessGroup(options.log_dir / f"compare-{index:03d}-{kind}-{name}") as procs,
        ):
            if kind == "throughput":
                figures = run_throughput(system, mode, settings, options.quick, procs, Path(tmp))
            elif kind == "latency":
                figures = run_latency(system, settings, procs, Path(tmp))
            elif kind == "crash":
                figures = run_crash(system, settings, procs, Path(tmp))
            elif kind == "sequential":
                figures = run_sequential(system, settings, procs, Path(tmp))
            else:
                say(f"{tag} {name}: filling")
                figures = run_queue(system, settings, options.quick, procs, Path(tmp), say)
        record.update(figures)
        record["ok"] = True
    except Exception as exc:  # a failed system is a result: record it, go on
        record["ok"] = False
        record["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    record["wall_s"] = round(time.monotonic() - t0, 2)
    record["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    if record["ok"]:
        say(f"{tag} {name}: {_describe(record)} ({record['wall_s']:.0f} s)")
    else:
        say(f"{tag} {name}: FAILED: {record['error'].splitlines()[0]}")
    return record


def _describe(r: JSONDict) -> str:
    if r["phase"] == "throughput":
        text = f"{fmt_count(r['throughput_tps'])} tasks/s end to end"
        if "confirm_rate_tps" in r:
            lat = r["confirm_latency_us"]
            text += (
                f", confirms {fmt_count(r['confirm_rate_tps'])}/s, confirm p50 "
                f"{lat['p50'] / 1000:.1f} ms"
            )
        if r.get("redelivered"):
            text += f", {r['redelivered']} handled twice"
        return text
    if r["phase"] == "latency":
        lat = r["latency_us"]
        return (
            f"round trip p50 {lat['p50']:.0f} µs, p99 {lat['p99']:.0f} µs, "
            f"p99.9 {lat['p99.9']:.0f} µs"
        )
    if r["phase"] == "sequential":
        lat = r["latency_us"]
        return (
            f"{fmt_count(r['rate_per_s'])} confirmed enqueues/s, p50 {lat['p50']:.0f} µs, "
            f"p99 {lat['p99']:.0f} µs"
        )
    if r["phase"] == "crash":
        return (
            f"{fmt_count(r['confirmed'])} confirmed, {r['lost']} lost, {r['duplicated']} "
            f"handled twice, restart {r['restart_s']:.2f} s"
        )
    return (
        f"restart with {fmt_count(r['restart_depth'])} queued {r['restart_s']:.2f} s "
        f"(found {fmt_count(r['depth_after_restart'])})"
    )


# ------------------------------------------------------------------ summary


def _ok(runs: list[JSONDict], phase: str, system: str, mode: str = "") -> list[JSONDict]:
    return [
        r
        for r in runs
        if r["phase"] == phase and r["system"] == system and r["mode"] == mode and r["ok"]
    ]


def _errors(runs: list[JSONDict], phase: str, system: str, mode: str = "") -> list[str]:
    return [
        r["error"]
        for r in runs
        if r["phase"] == phase and r["system"] == system and r["mode"] == mode and not r["ok"]
    ]


def _survives(system: str) -> JSONDict:
    what, why, source = SURVIVES[system]
    return {"survives": what, "why": why, "source": source}


def summarize(runs: list[JSONDict], settings: Settings) -> JSONDict:
    """Per phase, an entry for every case that was run (failed runs included)."""
    ran = dict.fromkeys((r["phase"], r["system"], r["mode"]) for r in runs)  # in run order
    throughput: JSONDict = {}
    for system, mode in [(s, m) for phase, s, m in ran if phase == "throughput"]:
        ok = _ok(runs, "throughput", system, mode)
        entry: JSONDict = {"errors": _errors(runs, "throughput", system, mode)}
        if ok:
            entry["throughput_tps"] = spread([r["throughput_tps"] for r in ok])
            if system != FORWARDER:
                entry["confirm_rate_tps"] = spread([r["confirm_rate_tps"] for r in ok])
                entry["confirm_p50_ms"] = spread([r["confirm_latency_us"]["p50"] / 1e3 for r in ok])
                entry["confirm_p99_ms"] = spread([r["confirm_latency_us"]["p99"] / 1e3 for r in ok])
            cpu = [v for r in ok if (v := r.get("broker_cpu_s_per_100k")) is not None]
            if cpu:
                entry["server_cpu_s_per_100k"] = spread(cpu)
        entry["survives"] = SURVIVES[system][0]
        throughput[f"{system}/{mode}"] = entry
    for key, entry in throughput.items():
        mode = key.split("/")[1]
        base = throughput.get(f"{ZB_SYNC}/{mode if mode != 'echo' else SINGLE}", {})
        if "throughput_tps" in entry and "throughput_tps" in base:
            entry["ratio_to_zbroker_sync"] = (
                entry["throughput_tps"]["median"] / base["throughput_tps"]["median"]
            )
    latency: JSONDict = {}
    for system in all_systems():
        phase, mode = ("throughput", "echo") if system == FORWARDER else ("latency", "")
        if (phase, system, mode) not in ran:
            continue
        ok = _ok(runs, phase, system, mode)
        entry = {"errors": _errors(runs, phase, system, mode)}
        if ok:
            for q in ("p50", "p99", "p99.9"):
                entry[f"{q}_us"] = spread([r["latency_us"][q] for r in ok])
        entry["survives"] = SURVIVES[system][0]
        latency[system] = entry
    crash: JSONDict = {}
    for system in CRASH_SYSTEMS:
        if ("crash", system, "") not in ran:
            continue
        ok = _ok(runs, "crash", system)
        crash[system] = {
            "survives": SURVIVES[system][0],
            "errors": _errors(runs, "crash", system),
            "runs": [
                {
                    k: r[k]
                    for k in ("confirmed", "lost", "duplicated", "restart_s", "drained_in_time")
                }
                for r in ok
            ],
            "lost_total": sum(r["lost"] for r in ok),
            "duplicated_total": sum(r["duplicated"] for r in ok),
            "confirmed_total": sum(r["confirmed"] for r in ok),
        }
    systems = {r["system"] for r in runs}
    return {
        "throughput": throughput,
        "latency": latency,
        "crash": crash,
        "queue": _summarize_queue(runs, ran, settings),
        "sequential": _summarize_sequential(runs, ran),
        "survives": {s: _survives(s) for s in SURVIVES if s in systems},
    }


def _summarize_queue(runs: list[JSONDict], ran: dict[Case, None], settings: Settings) -> JSONDict:
    queue: JSONDict = {}
    for system in QUEUE_SYSTEMS:
        if ("queue", system, "") not in ran:
            continue
        ok = _ok(runs, "queue", system)
        entry = {"errors": _errors(runs, "queue", system), "survives": SURVIVES[system][0]}
        if ok:
            depths = [str(d) for d in settings.queue_depths]
            entry["rss_anon_mib"] = {
                d: spread([r["rss_anon_kib"][d] / 1024 for r in ok]) for d in depths
            }
            if all(r["rss_kib"] for r in ok):
                entry["rss_mib"] = {d: spread([r["rss_kib"][d] / 1024 for r in ok]) for d in depths}
            entry["restart_s"] = spread([r["restart_s"] for r in ok])
            entry["start_empty_s"] = spread([r["start_empty_s"] for r in ok])
            entry["disk_mib"] = spread([r["disk_bytes"] / 2**20 for r in ok])
            entry["restart_depth"] = ok[0]["restart_depth"]
            entry["depth_after_restart"] = [r["depth_after_restart"] for r in ok]
        queue[system] = entry
    return queue


def _summarize_sequential(runs: list[JSONDict], ran: dict[Case, None]) -> JSONDict:
    sequential: JSONDict = {}
    for system in SEQUENTIAL_SYSTEMS:
        if ("sequential", system, "") not in ran:
            continue
        ok = _ok(runs, "sequential", system)
        entry = {"errors": _errors(runs, "sequential", system), "survives": SURVIVES[system][0]}
        if ok:
            entry["rate_per_s"] = spread([r["rate_per_s"] for r in ok])
            for q in ("p50", "p99", "p99.9"):
                entry[f"{q}_us"] = spread([r["latency_us"][q] for r in ok])
            entry["server_cpu_us_per_enqueue"] = spread(
                [r["server_cpu_us_per_enqueue"] for r in ok]
            )
        sequential[system] = entry
    base = sequential.get(ZB_SYNC, {}).get("rate_per_s")
    for entry in sequential.values():
        if base and "rate_per_s" in entry:
            entry["ratio_to_zbroker_sync"] = entry["rate_per_s"]["median"] / base["median"]
    return sequential


def configuration() -> JSONDict:
    zbroker = (
        "`python -m zbroker start --durability D --data-dir <tmp>` (LMDB journal; `sync` "
        "fsyncs each group commit, `async` does not, `memory` keeps nothing); ZBW01 workers "
        "with credit 64, one ACK per batch of TASKs read, then DONE"
    )
    return {
        "zbroker": zbroker,
        servers.REDIS: servers.CONFIGURATION[servers.REDIS],
        servers.REDIS_ALWAYS: servers.CONFIGURATION[servers.REDIS_ALWAYS],
        servers.RABBITMQ: servers.CONFIGURATION[servers.RABBITMQ],
        servers.NATS: servers.CONFIGURATION[servers.NATS],
        peers.CELERY: (
            "Celery on the Redis above (broker and result backend), `task_acks_late`, "
            "`task_reject_on_worker_lost`, `worker_prefetch_multiplier` 1; each worker is one "
            "`celery worker --pool solo` process; no-op tasks, results ignored except for the "
            "round trips"
        ),
        peers.DRAMATIQ: (
            "Dramatiq on the Redis above, default middleware (acknowledged after the actor "
            "ran, a dead worker's messages requeued), the Results middleware on Redis for the "
            "round trips; each worker is one process with Dramatiq's default 8 threads"
        ),
        FORWARDER: "`zmq.proxy(ROUTER, DEALER)` in one process, MDP echo workers (bench/mdp.py)",
    }


# ------------------------------------------------------------------ markdown


def _fmt(name: str) -> Callable[[float], str]:
    if name.endswith("_ms") or name.endswith("_per_100k"):
        return lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}"
    return fmt_count


def _cell(entry: JSONDict, name: str) -> str:
    if name in entry:
        return fmt_range(entry[name], _fmt(name))
    return "failed" if entry.get("errors") else EN_DASH


def _survives_cell(entry: JSONDict, system: str) -> str:
    """The entry's `survives` (results from before it existed: the current table's)."""
    return entry.get("survives") or SURVIVES.get(system, (EN_DASH,))[0]


def markdown(result: JSONDict) -> str:
    s = result["settings"]
    summary = result["summary"]
    fws = result["forwarder_settings"]
    quick = " (`--quick`: smoke figures, not claims)" if result.get("quick") else ""
    selection = result.get("selection", {})
    subset = (
        f" Subset: systems {selection['systems']}, phases {selection['phases']}."
        if selection and selection != {"systems": "all", "phases": "all"}
        else ""
    )
    lines = [
        f"Median of {result['runs_per_system']} runs (min{EN_DASH}max){quick}, systems "
        f"alternated run by run within each phase, all on loopback on one machine.{subset} "
        '"Survives" is the failure a confirmed task survives by the system\'s documentation '
        "and configuration (see the list at the end): a process crash (in the kernel's page "
        "cache, fsynced later) or a power cut (fsynced before the confirm).",
    ]
    if summary["throughput"]:
        lines += _throughput_md(summary, s, fws)
    if summary["latency"]:
        lines += _latency_md(summary, s)
    if summary["crash"]:
        lines += _crash_md(summary, s)
    if summary["queue"]:
        lines += _queue_md(summary, s)
    if summary.get("sequential"):
        lines += _sequential_md(summary, s)
    lines += ["", "**Configuration**:", ""]
    lines += [f"- {name}: {text}" for name, text in result["configuration"].items()]
    if summary.get("survives"):
        lines += ["", "**What a confirmed task survives**, system by system:", ""]
        lines += [
            f"- {LABELS.get(name, QUEUE_LABELS.get(name, name))}: **{v['survives']}**. "
            f"{v['why'][0].upper()}{v['why'][1:]}. Source: {v['source']}"
            for name, v in summary["survives"].items()
        ]
    failures = [r for r in result["runs"] if not r["ok"]]
    if failures:
        lines += ["", "**Failed runs**:", ""]
        lines += [
            f"- {r['phase']} {r['system']} {r['mode']}: {r['error'].splitlines()[0][:300]}"
            for r in failures
        ]
    lines[0:0] = mixed_builds_lines(result)
    if result.get("plots"):
        lines += ["", *(f"![{Path(p).stem}]({_rel(p)})" for p in result["plots"])]
    return "\n".join(lines)


def _throughput_md(summary: JSONDict, s: JSONDict, fws: JSONDict) -> list[str]:
    lines = [
        "",
        f"**Durable throughput**: {fmt_count(s['tasks'])} tasks of {s['body_bytes']} bytes per "
        f"run, {s['workers']} worker processes, timed from the first enqueue to the last "
        f"task handled. Single: {s['single_producers']} producer processes, one task per "
        f"message, up to {s['single_in_flight']} unconfirmed each. Batch: one producer, "
        f"{s['batch_tasks']} tasks per call, up to {s['batch_in_flight']} calls unconfirmed. "
        "The ratio is to zbroker sync in the same mode. The forwarder is the MDP echo "
        f"reference ({fws['workers']} workers, {fws['in_flight']} in flight), not durable.",
        "",
        "| System | mode | survives | end to end (tasks/s) | confirmed (tasks/s) | "
        "confirm p50 (ms) | confirm p99 (ms) | server CPU (s per 100k) | ratio to zbroker sync |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, entry in summary["throughput"].items():
        system, mode = key.split("/")
        cells = [
            _cell(entry, n)
            for n in (
                "throughput_tps",
                "confirm_rate_tps",
                "confirm_p50_ms",
                "confirm_p99_ms",
                "server_cpu_s_per_100k",
            )
        ]
        ratio = entry.get("ratio_to_zbroker_sync")
        lines.append(
            f"| {LABELS[system]} | {mode} | {_survives_cell(entry, system)} | "
            + " | ".join(cells)
            + f" | {EN_DASH if ratio is None else f'{ratio:.2f}'} |"
        )
    lines += [
        "",
        "Batch means: "
        + "; ".join(f"{BATCH_NAMES[k]}: {v}" for k, v in BATCH_MEANS.items())
        + ". Celery and Dramatiq have no batch enqueue and a synchronous one: their producers "
        "send one task at a time.",
    ]
    return lines


def _latency_md(summary: JSONDict, s: JSONDict) -> list[str]:
    lines = [
        "",
        f"**Request/reply latency**: {fmt_count(s['latency_samples'])} sequential round trips "
        f"(after {s['latency_warmup']} warm-up): the requester enqueues one durable task of "
        f"{s['body_bytes']} bytes and waits for its reply through the system (zbroker: a ZBC01 "
        "REQUEST answered after the worker's DONE; Redis: a reply list / stream; RabbitMQ: "
        "direct reply-to, the request published with a confirm; NATS: a JetStream publish "
        "acknowledged, the reply on a core subject; Celery and Dramatiq: their result "
        "backends on Redis). The forwarder's figures come from its throughput runs (MDP echo, "
        "not durable).",
        "",
        "| System | survives | p50 (µs) | p99 (µs) | p99.9 (µs) |",
        "|---|---|---:|---:|---:|",
    ]
    for system, entry in summary["latency"].items():
        cells = [_cell(entry, f"{q}_us") for q in ("p50", "p99", "p99.9")]
        lines.append(
            f"| {LABELS[system]} | {_survives_cell(entry, system)} | " + " | ".join(cells) + " |"
        )
    return lines


def _crash_md(summary: JSONDict, s: JSONDict) -> list[str]:
    lines = [
        "",
        f"**Crash**: 2 workers and one producer (single-task messages, {s['single_in_flight']} "
        "unconfirmed; Celery and Dramatiq one at a time) run; once "
        f"{fmt_count(s['crash_confirmed'])} tasks are confirmed the "
        "server's whole process group gets SIGKILL, and the producer is stopped; the server "
        "restarts on the same data, the workers reconnect and drain. Lost: confirmed to the "
        f"producer, not handled by a worker within {s['crash_drain_s']:.0f} s of the restart. "
        "Handled twice: at-least-once redeliveries. "
        "This is a process crash, not a power cut: data written but not fsynced survives it. "
        "Restart is Popen to the first answer (zbroker: to listening; its restart to ready "
        "is measured under memory and restart).",
        "",
        "| System | survives | confirmed | lost | handled twice | restart to ready (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for system, entry in summary["crash"].items():
        survives = _survives_cell(entry, system)
        if not entry["runs"]:
            lines.append(f"| {LABELS[system]} | {survives} | failed | | | |")
            continue
        per = entry["runs"]
        lines.append(
            f"| {LABELS[system]} | {survives} | "
            f"{', '.join(fmt_count(r['confirmed']) for r in per)} | "
            f"{', '.join(str(r['lost']) for r in per)} | "
            f"{', '.join(str(r['duplicated']) for r in per)} | "
            f"{', '.join(format(r['restart_s'], '.2f') for r in per)} |"
        )
    return lines


def _queue_md(summary: JSONDict, s: JSONDict) -> list[str]:
    depths = [str(d) for d in s["queue_depths"]]
    lines = [
        "",
        f"**Memory and restart**: the server filled with no workers, {s['fill_batch']} tasks "
        "per call; RssAnon (heap; for zbroker the LMDB map is file-backed and not in it) and "
        "RSS of the server's processes once they hold still (5 readings a second apart within "
        "1%, at most 60 s: the Erlang VM gives memory back for tens of seconds after a fill; "
        "zbroker: durable.py's own reading). Then SIGKILL and a restart on the same data, "
        "timed from Popen to the first answer to a depth query that finds every task "
        "(zbroker: a STATUS call, including Python's start-up; a RabbitMQ quorum queue "
        f"answers 0 while it replays its log), retried for up to {RECOVER_WAIT_S:.0f} s after "
        "the first answer (a count in bold never found them all).",
        "",
        "| System | "
        + " | ".join(f"RssAnon at {fmt_count(int(d))} (MiB)" for d in depths)
        + f" | RSS at {fmt_count(int(depths[-1]))} (MiB) | disk (MiB) | start, empty (s) | "
        f"restart, {fmt_count(int(depths[-1]))} queued (s) | found after restart |",
        "|---|" + "---:|" * (len(depths) + 5),
    ]
    mib = lambda v: f"{v:.1f}"  # noqa: E731
    secs = lambda v: f"{v:.2f}"  # noqa: E731
    for system, entry in summary["queue"].items():
        if "rss_anon_mib" not in entry:
            lines.append(f"| {QUEUE_LABELS[system]} | failed |" + " |" * (len(depths) + 4))
            continue
        cells = [fmt_range(entry["rss_anon_mib"][d], mib) for d in depths]
        rss = entry.get("rss_mib", {}).get(depths[-1])
        cells.append(fmt_range(rss, mib) if rss else "n/a")
        cells.append(fmt_range(entry["disk_mib"], mib))
        cells.append(fmt_range(entry["start_empty_s"], secs))
        cells.append(fmt_range(entry["restart_s"], secs))
        cells.append(
            ", ".join(
                fmt_count(n) if n == entry["restart_depth"] else f"**{fmt_count(n)}**"
                for n in entry["depth_after_restart"]
            )
        )
        lines.append(f"| {QUEUE_LABELS[system]} | " + " | ".join(cells) + " |")
    return lines


def _sequential_md(summary: JSONDict, s: JSONDict) -> list[str]:
    lines = [
        "",
        f"**Sequential enqueues**: one producer, one task in flight: "
        f"{fmt_count(s['sequential_samples'])} enqueues of {s['body_bytes']} bytes (after "
        f"{s['sequential_warmup']} untimed), each confirmed before the next is sent, no "
        "consumer. zbroker: `zbroker.client.Client.enqueue`; Redis: XADD (redis-py); "
        "RabbitMQ: `basic_publish` of a persistent message on a channel in confirm mode "
        "(pika's BlockingConnection returns once the basic.ack came); NATS: `js.publish`, "
        "which waits for the stream's ack. What one confirm costs when nothing is batched: "
        "with an fsync before each confirm, the disk's fsync latency. Server CPU per enqueue "
        "includes the warm-up.",
        "",
        "| System | survives | confirmed enqueues/s | p50 (µs) | p99 (µs) | p99.9 (µs) | "
        "server CPU (µs per enqueue) | ratio to zbroker sync |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system, entry in summary["sequential"].items():
        cells = [
            _cell(entry, n)
            for n in ("rate_per_s", "p50_us", "p99_us", "p99.9_us", "server_cpu_us_per_enqueue")
        ]
        ratio = entry.get("ratio_to_zbroker_sync")
        lines.append(
            f"| {SEQUENTIAL_LABELS[system]} | {_survives_cell(entry, system)} | "
            + " | ".join(cells)
            + f" | {EN_DASH if ratio is None else f'{ratio:.2f}'} |"
        )
    return lines


def _rel(path: str) -> str:
    """The plot's path as docs/performance.md links it."""
    return os.path.relpath(path, ROOT / "docs")


# ------------------------------------------------------------------ plots


def plot(result: JSONDict, out_dir: Path, say: Say) -> list[str]:
    """Throughput bars with their spread, latency percentiles, memory against depth."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no plots (python3 dev.py bench installs it)")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = result["summary"]
    from matplotlib.ticker import FuncFormatter

    thousands = FuncFormatter(lambda v, _pos: f"{v:,.0f}")
    note = (
        f"{'--quick smoke run, ' if result.get('quick') else ''}median of "
        f"{result['runs_per_system']} run(s)"
    )
    written = []

    if summary["throughput"]:
        written.append(_plot_throughput(summary, result, note, plt, thousands, out_dir))
    if summary["latency"]:
        written.append(_plot_latency(summary, note, plt, FuncFormatter, out_dir))
    if summary["queue"]:
        written.append(_plot_memory(summary, note, plt, thousands, FuncFormatter, out_dir))
    if summary.get("sequential"):
        written.append(_plot_sequential(summary, note, plt, thousands, out_dir))
    for path in written:
        say(f"wrote {path}")
    return written


def _plot_throughput(
    summary: JSONDict, result: JSONDict, note: str, plt: Any, thousands: Any, out_dir: Path
) -> str:
    fig, ax = plt.subplots(figsize=(12, 5.5))
    systems = [
        s
        for s in (*ZBROKER_SYSTEMS, *OTHERS, *FRAMEWORKS)
        if any(f"{s}/{m}" in summary["throughput"] for m in (SINGLE, BATCH))
    ]
    width = 0.38
    for offset, mode in ((-width / 2, SINGLE), (width / 2, BATCH)):
        med, lo, hi = _bars([summary["throughput"].get(f"{s}/{mode}", {}) for s in systems])
        xs = [i + offset for i in range(len(systems))]
        ax.bar(xs, med, width, label=mode, yerr=[lo, hi], capsize=3)
    fw = summary["throughput"].get(f"{FORWARDER}/echo", {}).get("throughput_tps")
    if fw:
        ax.axhline(fw["median"], color="grey", linestyle="--", label="zmq.proxy forwarder (echo)")
    ax.set_xticks(range(len(systems)), [LABELS[s] for s in systems], rotation=25, ha="right")
    ax.yaxis.set_major_formatter(thousands)
    ax.set_ylabel("tasks/s, first enqueue to last handled")
    ax.set_title(
        f"Durable throughput, {fmt_count(result['settings']['tasks'])} tasks "
        f"({note}, error bars min-max)"
    )
    ax.legend()
    return _save(fig, out_dir / "compare-throughput.png", plt)


def _plot_latency(summary: JSONDict, note: str, plt: Any, FuncFormatter: Any, out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(12, 5.5))
    systems = list(summary["latency"])
    width = 0.27
    for k, q in enumerate(("p50", "p99", "p99.9")):
        vals = [
            summary["latency"][s][f"{q}_us"]["median"] / 1000
            if f"{q}_us" in summary["latency"][s]
            else 0.0
            for s in systems
        ]
        ax.bar([i + (k - 1) * width for i in range(len(systems))], vals, width, label=q)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
    ax.set_xticks(range(len(systems)), [LABELS[s] for s in systems], rotation=25, ha="right")
    ax.set_ylabel("round trip (ms, log scale)")
    ax.set_title(f"Request/reply latency, sequential ({note})")
    ax.legend()
    return _save(fig, out_dir / "compare-latency.png", plt)


def _plot_memory(
    summary: JSONDict, note: str, plt: Any, thousands: Any, FuncFormatter: Any, out_dir: Path
) -> str:
    fig, ax = plt.subplots(figsize=(8, 5))
    for system, entry in summary["queue"].items():
        if "rss_anon_mib" not in entry:
            continue
        depths = list(entry["rss_anon_mib"])
        ax.plot(
            [int(d) for d in depths],
            [entry["rss_anon_mib"][d]["median"] for d in depths],
            marker="o",
            label=QUEUE_LABELS[system],
        )
    ax.xaxis.set_major_formatter(thousands)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xlabel("tasks queued (100 bytes each)")
    ax.set_ylabel("server RssAnon (MiB, log scale)")
    ax.set_title(f"Server memory against queue depth\n({note})")
    ax.set_ylim(bottom=0.5)  # room under the lines for the legend
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, out_dir / "compare-memory.png", plt)


def _plot_sequential(summary: JSONDict, note: str, plt: Any, thousands: Any, out_dir: Path) -> str:
    """Confirmed enqueues/s (left) and each enqueue's latency (right), one task in
    flight; bars coloured by what a confirm survives."""
    entries = {s: e for s, e in summary["sequential"].items() if "rate_per_s" in e}
    systems = list(entries)
    labels = [SEQUENTIAL_LABELS[s] for s in systems]
    colours = {POWER_CUT: "tab:green", PROCESS_CRASH: "tab:orange", NOTHING: "tab:grey"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    med, lo, hi = [], [], []
    for s in systems:
        r = entries[s]["rate_per_s"]
        med.append(r["median"])
        lo.append(r["median"] - r["min"])
        hi.append(r["max"] - r["median"])
    left.bar(
        range(len(systems)),
        med,
        yerr=[lo, hi],
        capsize=3,
        color=[colours.get(entries[s].get("survives", ""), "tab:blue") for s in systems],
    )
    left.set_xticks(range(len(systems)), labels, rotation=30, ha="right", fontsize="small")
    left.set_yscale("log")
    left.yaxis.set_major_formatter(thousands)
    left.set_ylabel("confirmed enqueues/s, one at a time (log scale)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    left.legend(handles, [f"survives: {k}" for k in colours], fontsize="small")
    width = 0.4
    for k, q in enumerate(("p50", "p99")):
        vals = [entries[s][f"{q}_us"]["median"] / 1000 for s in systems]
        right.bar([i + (k - 0.5) * width for i in range(len(systems))], vals, width, label=q)
    right.set_yscale("log")
    right.set_xticks(range(len(systems)), labels, rotation=30, ha="right", fontsize="small")
    right.set_ylabel("enqueue to confirm (ms, log scale)")
    right.legend()
    fig.suptitle(f"Sequential confirmed enqueues, one task in flight ({note})")
    return _save(fig, out_dir / "compare-sequential.png", plt)


def _bars(entries: Sequence[JSONDict]) -> tuple[list[float], list[float], list[float]]:
    med, lo, hi = [], [], []
    for e in entries:
        t = e.get("throughput_tps")
        med.append(t["median"] if t else 0.0)
        lo.append(t["median"] - t["min"] if t else 0.0)
        hi.append(t["max"] - t["median"] if t else 0.0)
    return med, lo, hi


def _save(fig: Any, path: Path, plt: Any) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


WORKLOAD = Workload(
    name="compare",
    summary="zbroker against Redis (lists, streams), RabbitMQ, NATS JetStream: throughput, "
    "latency, crash losses, memory, restart",
    run=run,
    markdown=markdown,
)
