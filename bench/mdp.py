"""Workload "mdp": Majordomo request/reply through zbroker against a bare `zmq.proxy`
ROUTER/DEALER forwarder, measured in the same session.

Per run, fresh processes: the broker (or forwarder), N echo workers and one client,
each its own process. The client times a burst of requests with a fixed number in
flight (throughput), then one request at a time (round-trip latency), and reads
the broker's CPU time from /proc around the burst. Systems alternate run by run
so drift on the machine hits both alike.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mdp_peers
from harness import (
    BENCH_DIR,
    EN_DASH,
    Child,
    JSONDict,
    Options,
    ProcessGroup,
    Say,
    Workload,
    fmt_count,
    fmt_range,
    free_tcp_ports,
    python_argv,
    spread,
    start_py_spy,
    summarize_profiles,
    wait_for_listener,
)

PEERS = BENCH_DIR / "mdp_peers.py"
# zbroker twice: with one stock MDP worker socket per worker process (4 requests at
# the workers at most), and with 8 sockets per process (32), the way a service gets
# concurrency over plain MDP. Both are measured against the same forwarder.
ZBROKER_8 = "zbroker-8"
# And with workers speaking zbroker's extension protocol (ZBW01) with a credit: each
# worker holds up to ZBW_CREDIT tasks, as the forwarder's workers hold a pipeline.
ZBROKER_ZBW = "zbroker-zbw"
ZBW_CREDIT = 64
SOCKETS_PER_WORKER = {mdp_peers.ZBROKER: 1, ZBROKER_8: 8, ZBROKER_ZBW: 1}
SYSTEMS = (mdp_peers.ZBROKER, mdp_peers.FORWARDER, ZBROKER_8, ZBROKER_ZBW)
ZBROKER_SYSTEMS = (mdp_peers.ZBROKER, ZBROKER_8, ZBROKER_ZBW)
LABELS = {
    mdp_peers.ZBROKER: "zbroker, 1 MDP socket per worker",
    ZBROKER_8: "zbroker, 8 MDP sockets per worker",
    ZBROKER_ZBW: f"zbroker, ZBW01 workers, credit {ZBW_CREDIT}",
    mdp_peers.FORWARDER: "zmq.proxy forwarder",
}
RATIO_LABELS = {
    mdp_peers.ZBROKER: "ratio, 1 MDP socket",
    ZBROKER_8: "ratio, 8 MDP sockets",
    ZBROKER_ZBW: "ratio, ZBW01 credit",
}


@dataclass(frozen=True, slots=True)
class Settings:
    requests: int
    warmup: int
    in_flight: int
    workers: int
    latency_samples: int
    body_bytes: int

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(30_000, 5_000, 200, 4, 2_000, 64)
        return cls(200_000, 20_000, 200, 4, 10_000, 64)

    def client_timeout_s(self) -> float:
        # Generous: a floor for process start-up plus 500 req/s, far below anything sane.
        return 60.0 + (self.warmup + self.requests + self.latency_samples) / 500


# ------------------------------------------------------------------ one run


def _start_zbroker(procs: ProcessGroup) -> tuple[str, str, int]:
    """Start a broker; return (client endpoint, worker endpoint, pid)."""
    port, events_in, events_out = free_tcp_ports(3)
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = procs.start(
        "zbroker",
        [
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
            "--log-level",
            "warning",
        ],
    )
    wait_for_listener(port, broker)
    return endpoint, endpoint, broker.pid


def _start_forwarder(procs: ProcessGroup) -> tuple[str, str, int]:
    front, back = free_tcp_ports(2)
    frontend, backend = f"tcp://127.0.0.1:{front}", f"tcp://127.0.0.1:{back}"
    proxy = procs.start(
        "forwarder",
        python_argv(PEERS, "forwarder", "--frontend", frontend, "--backend", backend),
    )
    wait_for_listener(front, proxy)
    wait_for_listener(back, proxy)
    return frontend, backend, proxy.pid


def run_once(
    system: str, settings: Settings, procs: ProcessGroup, profile_to: Path | None = None
) -> JSONDict:
    """Start `system` with its workers and client, measure, and return the client's figures.

    With `profile_to`, py-spy samples the broker (or forwarder) process during the
    throughput phase and leaves collapsed stacks there."""
    start = _start_zbroker if system in ZBROKER_SYSTEMS else _start_forwarder
    client_endpoint, worker_endpoint, server_pid = start(procs)
    # The peers speak plain MDP for both zbroker variants.
    wire = mdp_peers.ZBROKER if system in ZBROKER_SYSTEMS else mdp_peers.FORWARDER
    worker_args: list[object] = ["worker", "--system", wire, "--connect", worker_endpoint]
    if system in ZBROKER_SYSTEMS:
        worker_args += ["--sockets", SOCKETS_PER_WORKER[system]]
    if system == ZBROKER_ZBW:
        worker_args += ["--zbw-credit", ZBW_CREDIT]
    workers = [
        procs.start(f"{system}-worker-{i}", python_argv(PEERS, *worker_args), stdout_pipe=True)
        for i in range(settings.workers)
    ]
    for worker in workers:
        _expect(worker, "ready", timeout_s=20)
    client = procs.start(
        f"{system}-client",
        python_argv(
            PEERS,
            "client",
            "--system",
            wire,
            "--connect",
            client_endpoint,
            "--requests",
            settings.requests,
            "--warmup",
            settings.warmup,
            "--in-flight",
            settings.in_flight,
            "--latency-samples",
            settings.latency_samples,
            "--body-bytes",
            settings.body_bytes,
            "--server-pid",
            server_pid,
        ),
        stdout_pipe=True,
    )
    timeout_s = settings.client_timeout_s()
    _expect(client, "throughput-start", timeout_s)
    profiler = None
    if profile_to is not None:
        profiler = start_py_spy(procs, f"{system}-py-spy", server_pid, profile_to)
    _expect(client, "throughput-end", timeout_s)
    if profiler is not None:
        procs.interrupt(profiler)
    try:
        result: JSONDict = json.loads(client.read_line(timeout_s))
    except json.JSONDecodeError as exc:
        raise client.failure(f"printed something other than JSON ({exc})") from None
    procs.check_alive(ignoring=(client, profiler))
    return result


def _expect(child: Child, line: str, timeout_s: float) -> None:
    if (got := child.read_line(timeout_s)) != line:
        raise child.failure(f"said {got!r} instead of {line!r}")


def _per_100k(cpu_s: float | None, requests: int) -> float | None:
    return None if cpu_s is None else cpu_s * 100_000 / requests


# ------------------------------------------------------------------ the workload


def run(options: Options, say: Say) -> JSONDict:
    settings = Settings.for_mode(options.quick)
    order = [system for _ in range(options.runs) for system in SYSTEMS]
    say(
        f"{options.runs} runs per system, alternating; {settings.workers} workers, "
        f"{fmt_count(settings.requests)} requests with {settings.in_flight} in flight, "
        f"{fmt_count(settings.latency_samples)} sequential round trips, "
        f"{settings.body_bytes}-byte bodies"
    )
    runs: list[JSONDict] = []
    for index, system in enumerate(order, start=1):
        tag = f"{index}/{len(order)}"
        profile_to = None
        if options.profile_dir is not None and system in ZBROKER_SYSTEMS:
            profile_to = options.profile_dir / f"mdp-{index:02d}-{system}.txt"
        with ProcessGroup(options.log_dir / f"mdp-{index:02d}-{system}") as procs:
            figures = run_once(system, settings, procs, profile_to)
        record = {
            "run": index,
            "system": system,
            "profiled": profile_to is not None,
            **figures,
            "server_cpu_s_per_100k": _per_100k(figures["server_cpu_s"], settings.requests),
            "client_cpu_s_per_100k": _per_100k(figures["client_cpu_s"], settings.requests),
        }
        runs.append(record)
        latency = figures["latency_us"]
        cpu = record["server_cpu_s_per_100k"]
        cpu_text = "n/a" if cpu is None else f"{cpu:.2f}"
        say(
            f"{tag} {system}: {fmt_count(figures['throughput_rps'])} req/s, "
            f"round trip p50 {latency['p50']:.0f} µs p99 {latency['p99']:.0f} µs, "
            f"broker CPU {cpu_text} s/100k req"
        )
    result: JSONDict = {
        "settings": asdict(settings),
        "runs_per_system": options.runs,
        "runs": runs,
        "summary": summarize(runs),
    }
    if options.profile_dir is not None:
        result["profile"] = _profile_summary(options.profile_dir, say)
    return result


def _profile_summary(profile_dir: Path, say: Say) -> JSONDict:
    return summarize_profiles(profile_dir, "mdp", ZBROKER_SYSTEMS, say)


METRICS: dict[str, str] = {
    "throughput_rps": "Throughput (req/s)",
    "latency_p50_us": "Round trip p50 (µs)",
    "latency_p99_us": "Round trip p99 (µs)",
    "server_cpu_s_per_100k": "Broker/forwarder process CPU (s per 100k req)",
    "client_cpu_s_per_100k": "Client process CPU (s per 100k req)",
}


def _metric(record: JSONDict, name: str) -> float | None:
    if name.startswith("latency_"):
        value: Any = record["latency_us"][name.split("_")[1]]
    else:
        value = record[name]
    return None if value is None else float(value)


def summarize(runs: list[JSONDict]) -> JSONDict:
    """Per system and metric: median, min, max; then zbroker/forwarder ratios of medians."""
    systems: JSONDict = {}
    for system in SYSTEMS:
        mine = [r for r in runs if r["system"] == system]
        metrics: JSONDict = {}
        for name in METRICS:
            values = [v for r in mine if (v := _metric(r, name)) is not None]
            if values:
                metrics[name] = spread(values)
        systems[system] = metrics
    fw = systems[mdp_peers.FORWARDER]
    ratios: JSONDict = {}
    for system in ZBROKER_SYSTEMS:
        zb = systems[system]
        ratios[system] = {
            name: zb[name]["median"] / fw[name]["median"]
            for name in METRICS
            if name in zb and name in fw and fw[name]["median"]
        }
    return {"systems": systems, "ratio_to_forwarder": ratios}


def markdown(result: JSONDict) -> str:
    settings = result["settings"]
    summary = result["summary"]
    systems = summary["systems"]
    ratios = summary["ratio_to_forwarder"]
    fw = systems[mdp_peers.FORWARDER]

    def fmt_value(name: str) -> Callable[[float], str]:
        if name.endswith("_per_100k"):
            return lambda v: f"{v:.2f}"
        return fmt_count

    columns = [mdp_peers.FORWARDER, *ZBROKER_SYSTEMS]
    lines = [
        f"MDP echo request/reply over loopback TCP: {settings['workers']} worker processes, "
        f"one DEALER client with {settings['in_flight']} requests in flight for "
        f"{fmt_count(settings['requests'])} requests (after {fmt_count(settings['warmup'])} "
        f"warm-up), then {fmt_count(settings['latency_samples'])} sequential round trips; "
        f"{settings['body_bytes']}-byte bodies. Median of {result['runs_per_system']} runs "
        f"per system (min{EN_DASH}max), systems alternated in one session; ratios are "
        "zbroker / forwarder.",
        "",
        "| Metric | "
        + " | ".join(LABELS[c] for c in columns)
        + " | "
        + " | ".join(RATIO_LABELS[z] for z in ZBROKER_SYSTEMS)
        + " |",
        "|---|" + "---:|" * (len(columns) + len(ZBROKER_SYSTEMS)),
    ]
    for name, label in METRICS.items():
        if name not in fw:
            continue
        fmt = fmt_value(name)
        cells = [fmt_range(systems[c][name], fmt) if name in systems[c] else "n/a" for c in columns]
        cells += [
            f"{ratios[z][name]:.2f}" if name in ratios.get(z, {}) else "n/a"
            for z in ZBROKER_SYSTEMS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


WORKLOAD = Workload(
    name="mdp",
    summary="MDP request/reply throughput and round-trip latency, zbroker vs a bare zmq.proxy",
    run=run,
    markdown=markdown,
)
