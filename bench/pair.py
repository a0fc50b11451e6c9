"""Systems of the `durable` workload, alternated round by round: paired ratios
and the broker's CPU per thread (a noisy machine needs many paired rounds).

    .venv/bin/python bench/pair.py sync-batch sync-batch+events --rounds 7
    .venv/bin/python bench/pair.py sync-single async-single --rounds 5 --tasks 50000
    .venv/bin/python bench/pair.py sync-batch sync-batch+events --pin
    .venv/bin/python bench/pair.py sync-batch sync-batch@0 sync-batch+events@0
    .venv/bin/python bench/pair.py sync-batch sync-batch sync-batch+events --rounds 9

Each run is `durable.run_tasks` (fresh broker, 2 workers, producers; see
bench/README.md, "durable"). Per run it prints tasks/s end to end, the broker's
CPU per task split by thread (the loop's thread, libzmq's I/O thread, the event
proxy's thread, from /proc/PID/task/*/stat), the loop's context switches per 100
tasks (voluntary: polls that slept; involuntary: preemptions), and the workers',
producers' and any subscriber's CPU;
at the end, per system, the median rate and broker CPU per task, and the ratios
of both to the first system round by round with their medians. Naming one system
twice (an A/A pair) shows how far two runs of the same code differ on this machine:
the spread an A/B ratio must leave before it means anything. Each round starts
with the next system in turn, so that none always runs first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import durable
from harness import ProcessGroup

_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of `pid`, keyed "name:tid" ({} once it is gone)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        fields = stat[stat.rindex(b")") + 2 :].split()
        out[f"{name}:{tid}"] = (int(fields[11]) + int(fields[12])) / _TICKS
    return out


def loop_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches so far of the process's main thread,
    the broker's loop: a voluntary one is a poll that found nothing to do and slept,
    an involuntary one a preemption by another thread or process."""
    try:
        with open(f"/proc/{pid}/task/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return (0, 0)
    return (
        int(status.get("voluntary_ctxt_switches", 0)),
        int(status.get("nonvoluntary_ctxt_switches", 0)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "systems",
        nargs="+",
        metavar="SYSTEM[@CPU]",
        help="a durable system (sync-batch, sync-batch+events, ...); @CPU runs its "
        "broker on that CPU alone (taskset), so pinned and unpinned can be paired",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run the broker on CPU 0 and every other process on CPU 1 (taskset)",
    )
    args = parser.parse_args()
    if len(args.systems) < 2:
        parser.error("name two systems or more (the same one twice for an A/A run)")
    known = (*durable.TASK_SYSTEMS, *durable.PAIR_ONLY_SYSTEMS)
    for system in args.systems:
        name, _, cpu = system.partition("@")
        if name not in known or (cpu and not cpu.isdigit()):
            parser.error(f"{system!r}: a system is one of {', '.join(known)}, then @CPU or not")
    broker_argv, peer_argv = durable._broker_argv, durable.python_argv
    if args.pin:
        durable.python_argv = lambda *a: ["taskset", "-c", "1", *peer_argv(*a)]
    settings = replace(durable.Settings.for_mode(False), tasks=args.tasks)
    # run_tasks reads the broker's CPU from /proc before and after the timed phase:
    # snapshot its threads at the same two moments.
    snapshots: dict[int, list[dict[str, float]]] = {}
    process_cpu_s = durable.process_cpu_s

    switches: dict[int, list[tuple[int, int]]] = {}

    def with_threads(pid: int) -> float | None:
        snapshots.setdefault(pid, []).append(thread_cpu_s(pid))
        switches.setdefault(pid, []).append(loop_switches(pid))
        return process_cpu_s(pid)

    durable.process_cpu_s = with_threads
    rates: list[list[float]] = [[] for _ in args.systems]
    broker_us: list[list[float]] = [[] for _ in args.systems]  # the broker's CPU per task
    count = len(args.systems)
    for round_no in range(1, args.rounds + 1):
        # Each round starts one system later, so that no system always runs first.
        for position in [(round_no - 1 + k) % count for k in range(count)]:
            system, _, cpu = args.systems[position].partition("@")
            if args.pin:
                cpu = cpu or "0"
            durable._broker_argv = (
                (lambda *a, c=cpu: ["taskset", "-c", c, *broker_argv(*a)]) if cpu else broker_argv
            )
            snapshots.clear()
            switches.clear()
            with (
                tempfile.TemporaryDirectory(prefix="zbroker-pair-") as tmp,
                ProcessGroup(Path(tmp) / "logs") as procs,
            ):
                figures = durable.run_tasks(system, settings, 100, procs, Path(tmp) / "data")
            broker = next(iter(snapshots))  # run_tasks reads the broker's CPU first
            before, after = snapshots[broker][0], snapshots[broker][-1]
            per_task_us = 1e6 / figures["done"]
            threads = ", ".join(
                f"{name.split(':')[0]} {(after[name] - before.get(name, 0.0)) * per_task_us:.1f}"
                for name in sorted(after, key=lambda n: int(n.rsplit(":", 1)[1]))
                if after[name] - before.get(name, 0.0) > 0
            )
            (vol0, invol0), (vol1, invol1) = switches[broker][0], switches[broker][-1]
            per_100 = 100 / figures["done"]
            threads += (
                f" (loop's context switches per 100 tasks: {(vol1 - vol0) * per_100:.1f} "
                f"voluntary, {(invol1 - invol0) * per_100:.1f} involuntary)"
            )
            rates[position].append(figures["throughput_tps"])
            broker_cpu = figures["broker_cpu_s_per_100k"]  # s per 100k tasks = 10 µs/task
            broker_us[position].append(float("nan") if broker_cpu is None else broker_cpu * 10)
            print(
                f"round {round_no} {system} (#{position + 1}): "
                f"{figures['throughput_tps']:,.0f} tasks/s; "
                f"broker µs/task by thread: {threads}; workers "
                f"{figures['workers_cpu_s_per_100k']:.2f}, producers "
                f"{figures['producers_cpu_s_per_100k']:.2f}"
                + (
                    f", subscriber {figures['subscriber_cpu_s_per_100k']:.2f} s/100k; "
                    f"{figures['events_received'] / figures['event_messages']:.1f} "
                    "events per bus message"
                    if figures["events_received"] is not None
                    else " s/100k"
                ),
                flush=True,
            )
    for position, system in enumerate(args.systems):
        rate_ratios = [a / b for a, b in zip(rates[position], rates[0], strict=True)]
        cpu_ratios = [a / b for a, b in zip(broker_us[position], broker_us[0], strict=True)]
        print(
            f"{system} (#{position + 1}): median {statistics.median(rates[position]):,.0f} "
            f"tasks/s, broker {statistics.median(broker_us[position]):.1f} µs/task; "
            f"to #1 by round: rate {', '.join(f'{r:.2f}' for r in rate_ratios)} "
            f"(median {statistics.median(rate_ratios):.2f}), broker CPU "
            f"{', '.join(f'{r:.2f}' for r in cpu_ratios)} "
            f"(median {statistics.median(cpu_ratios):.2f})"
        )


if __name__ == "__main__":
    sys.exit(main())
