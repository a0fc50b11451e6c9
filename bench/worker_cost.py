"""What zbroker's own Python Worker costs per task, next to a bare ZBW01 worker.

    .venv/bin/python bench/worker_cost.py [--tasks 50000] [--runs 3]

For each run and each worker kind, in turn: a fresh broker (`zbroker start
--durability memory`), the queue filled with `--tasks` no-op tasks of 100 bytes by
the durable workload's producer (ENQUEUE batches of 100), then ONE worker process
started against the full queue. Timed from the worker's start to the moment the
broker reports the queue empty (ready and in flight both 0, asked with
`zbroker.client.Client.queues()` every 20 ms); the worker's CPU (all its threads,
from /proc) is read at that moment. Kinds:

- `bare`: the reference, `durable_peers.py worker`: a lean loop on raw ZBW01
  frames (one ACK and one DONES per read), credit 64;
- `async`: `zbroker.client.Worker` with an `async def` handler returning b"ok",
  concurrency 64;
- `thread`: the same Worker with a plain function (64 handler threads).

The figure to read is each kind's CPU per task over the bare worker's, run by
run (the machine is shared and noisy). Prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import durable
from harness import ROOT, BenchError, Child, ProcessGroup, process_cpu_s, python_argv

HERE = Path(__file__).resolve().parent
SERVICE = "bench"  # durable_peers' service name
KINDS = ("bare", "async", "thread")
CREDIT = 64


def _worker(kind: str, endpoint: str) -> None:
    """The worker process for `kind` (not `bare`): runs until killed."""
    from zbroker.client import Task, Worker

    if kind == "async":

        async def handle_async(task: Task) -> bytes:
            return b"ok"

        handler: object = handle_async
    else:

        def handle(task: Task) -> bytes:
            return b"ok"

        handler = handle
    with Worker(endpoint, SERVICE, handler, concurrency=CREDIT):  # type: ignore[arg-type]
        print("ready", flush=True)
        while True:
            time.sleep(3600)


def _queue_empty(endpoint: str) -> bool:
    from zbroker.client import Client

    with Client(endpoint, timeout_s=5.0) as client:
        for row in client.queues():
            if row["service"] == SERVICE:
                return bool(row["ready"] == 0 and row["inflight"] == 0)
    return False


def run_once(kind: str, tasks: int, log_dir: Path) -> dict[str, float]:
    with ProcessGroup(log_dir / kind) as procs, tempfile.TemporaryDirectory() as data:
        endpoint, _, _ = durable._start_broker(procs, "broker", "memory", Path(data))
        producer = procs.start(
            "producer",
            python_argv(
                HERE / "durable_peers.py",
                "producer",
                "--connect",
                endpoint,
                "--count",
                tasks,
                "--batch",
                100,
                "--in-flight",
                8,
                "--body-bytes",
                100,
            ),
            stdout_pipe=True,
        )
        producer.read_line(30.0)  # ready
        producer.read_line(120.0)  # its report: every task confirmed
        if kind == "bare":
            argv = python_argv(
                HERE / "durable_peers.py", "worker", "--connect", endpoint, "--credit", CREDIT
            )
        else:
            argv = python_argv(Path(__file__), "--worker", kind, "--connect", endpoint)
        started = time.monotonic()
        worker: Child = procs.start(kind, argv)
        while not _queue_empty(endpoint):
            procs.check_alive(ignoring=[producer])
            if time.monotonic() - started > 300:
                raise BenchError(f"{kind}: the queue did not drain in 300 s")
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        cpu = process_cpu_s(worker.pid)
        if cpu is None:
            raise BenchError("no /proc: cannot read the worker's CPU time")
    return {"tasks_per_s": tasks / elapsed, "cpu_us_per_task": cpu / tasks * 1e6}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", choices=("async", "thread"), help=argparse.SUPPRESS)
    parser.add_argument("--connect", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.connect)
        return
    results: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as logs:
        for run in range(1, args.runs + 1):
            for kind in KINDS:
                figures = run_once(kind, args.tasks, Path(logs) / f"run{run}")
                results[kind].append(figures)
                print(
                    f"[worker_cost] run {run} {kind}: {figures['tasks_per_s']:,.0f} tasks/s, "
                    f"worker CPU {figures['cpu_us_per_task']:.1f} us/task",
                    flush=True,
                )
    bare = [r["cpu_us_per_task"] for r in results["bare"]]
    print(
        f"\n{args.tasks:,} no-op tasks drained by one worker process, median of "
        f"{args.runs} runs (min-max); ratio = CPU per task over the bare ZBW01 "
        "worker's in the same run, median of the runs.\n"
    )
    print("| Worker | Tasks/s | Worker CPU (us/task) | CPU ratio to bare |")
    print("|---|---:|---:|---:|")
    for kind in KINDS:
        rate = [r["tasks_per_s"] for r in results[kind]]
        cpu = [r["cpu_us_per_task"] for r in results[kind]]
        ratio = statistics.median(c / b for c, b in zip(cpu, bare, strict=True))
        print(
            f"| {kind} | {statistics.median(rate):,.0f} ({min(rate):,.0f}-{max(rate):,.0f}) "
            f"| {statistics.median(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f}) | {ratio:.2f} |"
        )


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.path.insert(0, str(ROOT))
    main()
