"""Workload "postgres": the journal in PostgreSQL next to LMDB, in the same run, and
how long a standby takes to serve after the active broker is killed.

The run starts a private PostgreSQL server (scripts/pgserver.py: loopback, its own
directory, fsync on) and gives each broker on it a schema of its own. Per round,
systems alternate so drift on the machine hits all alike:

- `<store>-<durability>-<mode>`, store lmdb or postgres, durability sync or async,
  mode single or batch: the durable workload's end-to-end run (bench/durable.py
  `run_tasks`: producers, 2 ZBW01 workers, a fresh broker) on `--data-dir`
  (LMDB) or `--journal` (PostgreSQL);
- `<store>-sync-round-trip`: one `Client.enqueue` at a time against a fresh broker,
  the latency of each confirmed enqueue;
- `failover` (and `failover-frozen`, SIGSTOP instead of SIGKILL; `failover-deep`,
  with 100,000 tasks waiting for a service nobody serves, 10,000 with --quick):
  two brokers on one PostgreSQL (default lease), a Client and a Worker
  given both endpoints; after some tasks through the active broker it is killed
  (SIGKILL), and two times are taken from the kill: until the standby's endpoint
  accepts connections (it took the lease, loaded the journal, bound), and until a
  task enqueued after the kill has been run by the worker and its result read
  (the client and the worker followed it).

Reported as medians over the rounds, with PostgreSQL / LMDB ratios per durability
and mode, measured in the same session. BENCH_POSTGRES_SYSTEMS=a,b runs only those
systems (e.g. `failover`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import durable
from harness import (
    EN_DASH,
    BenchError,
    Child,
    JSONDict,
    Options,
    ProcessGroup,
    Say,
    Workload,
    fmt_count,
    free_tcp_ports,
    load_pgserver,
    wait_for_listener,
)

STORES = ("lmdb", "postgres")
TASK_KINDS = ("sync-single", "sync-batch", "async-single")
ROUND_TRIP = "sync-round-trip"
FAILOVER = "failover"
# The same with the active broker frozen (SIGSTOP) instead of killed: the standby
# waits out the lease (the default 3 s), then takes over.
FAILOVER_FROZEN = "failover-frozen"
# The same SIGKILL with a deep queue (Settings.deep_queue tasks waiting, no worker for
# them): the standby reads the whole journal before it serves.
FAILOVER_DEEP = "failover-deep"
FAILOVERS = (FAILOVER, FAILOVER_FROZEN, FAILOVER_DEEP)
DEEP_BATCH = 100
SYSTEMS = (
    *(f"{store}-{kind}" for kind in TASK_KINDS for store in STORES),
    *(f"{store}-{ROUND_TRIP}" for store in STORES),
    *FAILOVERS,
)
FAILOVER_WARM_TASKS = 50


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    tasks: durable.Settings  # the throughput runs
    round_trips: int
    deep_queue: int  # tasks waiting when the active broker is killed (failover-deep)

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        base = durable.Settings.for_mode(quick)
        tasks = dataclasses.replace(base, tasks=5_000 if quick else 20_000)
        return cls(
            tasks=tasks,
            round_trips=500 if quick else 2_000,
            deep_queue=10_000 if quick else 100_000,
        )


def _broker(
    procs: ProcessGroup, name: str, durability: str, data_dir: Path, url: str | None
) -> tuple[str, Child, int]:
    port, events_in, events_out = free_tcp_ports(3)
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = durable._broker_argv(endpoint, events_in, events_out, durability, data_dir, "info")
    if url is not None:
        argv += ["--journal", url]
    return endpoint, procs.start(name, argv), port


def run_round_trip(
    store: str, settings: Settings, procs: ProcessGroup, url: str | None
) -> JSONDict:
    from zbroker.client import Client

    with tempfile.TemporaryDirectory(prefix="zbroker-pg-rt-") as tmp:
        endpoint, broker, port = _broker(procs, "zbroker", "sync", Path(tmp), url)
        wait_for_listener(port, broker)
        body = b"x" * settings.tasks.body_bytes
        latencies: list[float] = []
        with Client(endpoint, timeout_s=10) as client:
            for _ in range(50):
                client.enqueue("rt", body)
            for _ in range(settings.round_trips):
                started = time.perf_counter()
                client.enqueue("rt", body)
                latencies.append((time.perf_counter() - started) * 1e6)
        latencies.sort()
        return {
            "round_trips": len(latencies),
            "p50_us": latencies[len(latencies) // 2],
            "p99_us": latencies[int(len(latencies) * 0.99)],
            "enqueues_per_s": len(latencies) / (sum(latencies) / 1e6),
        }


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def run_failover(
    procs: ProcessGroup, url: str, how: signal.Signals, deep_queue: int = 0
) -> JSONDict:
    """One kill (or freeze) of the active broker of a pair; the times from it. With
    `deep_queue`, that many tasks wait (for a service nobody serves) at the kill."""
    from zbroker.client import Client, Task, Worker

    with tempfile.TemporaryDirectory(prefix="zbroker-pg-fo-") as tmp:
        endpoint_a, a, port_a = _broker(procs, "active", "sync", Path(tmp) / "a", url)
        wait_for_listener(port_a, a)
        endpoint_b, b, port_b = _broker(procs, "standby", "sync", Path(tmp) / "b", url)
        _wait_for_standby(b)
        endpoints = [endpoint_a, endpoint_b]
        ran = threading.Event()

        def handler(task: Task) -> bytes:
            ran.set()
            return task.payload

        with (
            Worker(endpoints, "jobs", handler, concurrency=2) as worker,
            Client(endpoints, timeout_s=0.25, retries=400) as client,
        ):
            for i in range(FAILOVER_WARM_TASKS):
                client.result(client.enqueue("jobs", b"warm%d" % i), timeout_s=30)
            body = b"x" * 100
            for _ in range(deep_queue // DEEP_BATCH):
                client.enqueue_many("waiting", [body] * DEEP_BATCH)
            reconnects = worker.stats.reconnects
            killed = time.monotonic()
            os.kill(a.pid, how)
            listening_s = None
            while listening_s is None:
                if _listening(port_b):
                    listening_s = time.monotonic() - killed
                elif time.monotonic() - killed > 60:
                    raise b.failure("did not take over within 60 s")
                else:
                    time.sleep(0.005)
            task_id = client.enqueue("jobs", b"after")
            client.result(task_id, timeout_s=60)
            first_task_s = time.monotonic() - killed
            if how is signal.SIGSTOP:
                os.kill(a.pid, signal.SIGCONT)  # it steps down; the group stops it
            return {
                "queued": deep_queue,
                "listening_s": listening_s,
                "first_task_s": first_task_s,
                "worker_reconnects": worker.stats.reconnects - reconnects,
            }


def _wait_for_standby(b: Child, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "holds the lease; waiting" not in b.log_tail(50):
        if b.proc.poll() is not None:
            raise b.failure("exited as a standby")
        if time.monotonic() > deadline:
            raise b.failure("did not say it was a standby")
        time.sleep(0.05)


def run(options: Options, say: Say) -> JSONDict:
    settings = Settings.for_mode(options.quick)
    pgserver = load_pgserver()
    say("starting a private PostgreSQL server (fsync on)")
    server = pgserver.PrivateServer(fsync=True)
    server.start()
    chosen = [s for s in os.environ.get("BENCH_POSTGRES_SYSTEMS", "").split(",") if s]
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        raise BenchError(f"unknown systems {unknown}: choose among {', '.join(SYSTEMS)}")
    order = [system for _ in range(options.runs) for system in chosen or SYSTEMS]
    batch = settings.tasks.batch_tasks
    say(
        f"{options.runs} runs per system, alternating; {fmt_count(settings.tasks.tasks)} tasks"
        f" per throughput run; {settings.round_trips} round trips; PostgreSQL at {server.url}"
    )
    runs: list[JSONDict] = []
    try:
        for index, system in enumerate(order, start=1):
            tag = f"{index}/{len(order)}"
            with (
                tempfile.TemporaryDirectory(prefix="zbroker-pg-") as tmp,
                ProcessGroup(options.log_dir / f"postgres-{index:02d}-{system}") as procs,
            ):
                store, _, kind = system.partition("-")
                url = server.fresh_url() if store == "postgres" else None
                if system in FAILOVERS:
                    how = signal.SIGSTOP if system == FAILOVER_FROZEN else signal.SIGKILL
                    deep = settings.deep_queue if system == FAILOVER_DEEP else 0
                    figures = run_failover(procs, server.fresh_url(), how, deep)
                elif kind == ROUND_TRIP:
                    figures = run_round_trip(store, settings, procs, url)
                else:
                    args = () if url is None else ("--journal", url)
                    figures = durable.run_tasks(
                        kind, settings.tasks, batch, procs, Path(tmp) / "data", broker_args=args
                    )
            record = {"run": index, "system": system, **figures}
            record["load_average_1m_after"] = round(os.getloadavg()[0], 2)
            runs.append(record)
            say(f"{tag} {system}: {_describe(record)}")
    finally:
        server.stop()
    return {
        "settings": {
            "tasks": dataclasses.asdict(settings.tasks),
            "round_trips": settings.round_trips,
            "deep_queue": settings.deep_queue,
        },
        "postgresql": _server_version(pgserver),
        "runs_per_system": options.runs,
        "runs": runs,
        "summary": summarize(runs),
    }


def _server_version(pgserver: Any) -> str | None:
    found = pgserver.bin_dir()
    return None if found is None else found.parent.name


def _describe(record: JSONDict) -> str:
    if record["system"] in FAILOVERS:
        return (
            f"standby listening {record['listening_s']:.2f} s, first task served"
            f" {record['first_task_s']:.2f} s after the kill"
        )
    if "p50_us" in record:
        return f"p50 {record['p50_us']:.0f} µs, p99 {record['p99_us']:.0f} µs"
    return (
        f"{record['throughput_tps']:,.0f} tasks/s, broker CPU"
        f" {record['broker_cpu_s_per_100k']:.2f} s/100k"
    )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[JSONDict]) -> JSONDict:
    def of(system: str, metric: str) -> list[float]:
        return [r[metric] for r in runs if r["system"] == system and r.get(metric) is not None]

    out: JSONDict = {}
    for kind in TASK_KINDS:
        row: JSONDict = {}
        for store in STORES:
            system = f"{store}-{kind}"
            row[store] = {
                "throughput_tps": _median(of(system, "throughput_tps")),
                "throughput_all": of(system, "throughput_tps"),
                "broker_cpu_s_per_100k": _median(of(system, "broker_cpu_s_per_100k")),
            }
        lmdb, pg = row["lmdb"]["throughput_tps"], row["postgres"]["throughput_tps"]
        row["ratio_postgres_to_lmdb"] = None if not lmdb or pg is None else pg / lmdb
        out[kind] = row
    trip: JSONDict = {}
    for store in STORES:
        system = f"{store}-{ROUND_TRIP}"
        trip[store] = {
            "p50_us": _median(of(system, "p50_us")),
            "p99_us": _median(of(system, "p99_us")),
        }
    out[ROUND_TRIP] = trip
    for system in FAILOVERS:
        out[system] = {
            "listening_s": _median(of(system, "listening_s")),
            "first_task_s": _median(of(system, "first_task_s")),
            "listening_all": of(system, "listening_s"),
            "first_task_all": of(system, "first_task_s"),
        }
    return out


def markdown(result: JSONDict) -> str:
    s = result["summary"]
    lines = [
        "| workload | LMDB | PostgreSQL | PostgreSQL / LMDB |",
        "|---|---:|---:|---:|",
    ]
    for kind in TASK_KINDS:
        row = s[kind]
        lmdb, pg = row["lmdb"]["throughput_tps"], row["postgres"]["throughput_tps"]
        ratio = row["ratio_postgres_to_lmdb"]
        lines.append(
            f"| {kind}, tasks/s | {_fmt(lmdb)} | {_fmt(pg)} | "
            f"{EN_DASH if ratio is None else f'{ratio:.2f}'} |"
        )
    trip = s[ROUND_TRIP]
    lines.append(
        f"| one enqueue at a time (sync), p50 µs | {_fmt(trip['lmdb']['p50_us'])} | "
        f"{_fmt(trip['postgres']['p50_us'])} | "
        f"{_ratio(trip['postgres']['p50_us'], trip['lmdb']['p50_us'])} |"
    )
    lines += [
        "",
        "| failover, median (every run) | standby listening, s | task enqueued after it done, s |",
        "|---|---:|---:|",
    ]
    deep = result["settings"].get("deep_queue") or 0
    for system, what in (
        (FAILOVER, "SIGKILL of the active broker"),
        (FAILOVER_FROZEN, "SIGSTOP of the active broker"),
        (FAILOVER_DEEP, f"SIGKILL of the active broker, {fmt_count(deep)} tasks queued"),
    ):
        fo = s[system]
        if not fo["listening_all"]:
            continue
        lines.append(
            f"| {what} | {_secs(fo['listening_s'])} "
            f"({_all(fo['listening_all'])}) | {_secs(fo['first_task_s'])} "
            f"({_all(fo['first_task_all'])}) |"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return EN_DASH if value is None else f"{value:,.0f}"


def _secs(value: float | None) -> str:
    return EN_DASH if value is None else f"{value:.2f}"


def _all(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) or EN_DASH


def _ratio(a: float | None, b: float | None) -> str:
    return EN_DASH if a is None or not b else f"{a / b:.2f}"


WORKLOAD = Workload(
    "postgres",
    "the journal in PostgreSQL vs LMDB (throughput, round trip), failover time",
    run,
    markdown,
)
