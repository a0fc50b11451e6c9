"""Who takes the CPU from the broker's loop: one `durable` run of a system with the
kernel's sched_switch tracepoint recorded by `perf` for a few seconds mid-run.

    .venv/bin/python bench/preemptions.py sync-batch+events [--tasks 100000] [--seconds 4]

Prints how often the loop's thread was switched out while still runnable (an
involuntary switch: something else was given its CPU) and by whom: the broker's
own other threads (libzmq's I/O thread, the event proxy) or another process of
the run (workers, producers, the subscriber). Needs `perf` and permission to
trace (root, or kernel.perf_event_paranoid <= -1).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import durable
from harness import ProcessGroup

_SWITCH = re.compile(
    r"\s*\S+\s+(\d+)/(\d+)\s+\[\d+\]\s+[\d.]+:\s+sched:sched_switch: "
    r"prev_comm=.*? prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> "
    r"next_comm=(.*?) next_pid=(\d+)"
)


def trace(procs: ProcessGroup, out: Path, seconds: float, pids: dict[str, int]) -> None:
    """Once the producers are running, record sched_switch for `seconds` into `out`;
    the pid of every child of the run goes into `pids` by name."""
    while not any(c.name.startswith("producer") for c in procs.children):
        time.sleep(0.1)
    time.sleep(2.0)  # producers report ready, then get their start signal
    for child in procs.children:
        pids[child.name] = child.pid
    record = ["perf", "record", "-q", "-a", "-e", "sched:sched_switch", "-o", str(out)]
    subprocess.run(
        [*record, "--", "sleep", str(seconds)],
        check=True,
        capture_output=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("system", help="a durable system (sync-batch, sync-batch+events, ...)")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf is needed: apt-get install linux-perf (or linux-tools)")
    if args.system not in (*durable.TASK_SYSTEMS, *durable.PAIR_ONLY_SYSTEMS):
        sys.exit(f"unknown system {args.system!r}")
    settings = replace(durable.Settings.for_mode(False), tasks=args.tasks)
    pids: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="zbroker-preemptions-") as tmp:
        data = Path(tmp) / "perf.data"
        with ProcessGroup(Path(tmp) / "logs") as procs:
            tracer = threading.Thread(target=trace, args=(procs, data, args.seconds, pids))
            tracer.start()
            report = durable.run_tasks(args.system, settings, 100, procs, Path(tmp) / "data")
            tracer.join()
        script = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "comm,pid,tid,cpu,time,event,trace"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    names = {pid: name for name, pid in pids.items()}
    broker = pids["zbroker"]
    thread_pid: dict[int, int] = {}
    switches = 0
    by: collections.Counter[str] = collections.Counter()
    lines = script.splitlines()
    for line in lines:  # which process each thread belongs to
        found = _SWITCH.match(line)
        if found:
            thread_pid[int(found.group(2))] = int(found.group(1))
    for line in lines:
        found = _SWITCH.match(line)
        if not found or int(found.group(3)) != broker:
            continue
        switches += 1
        if not found.group(4).startswith("R"):
            continue  # it slept (a poll, a commit): not a preemption
        comm, tid = found.group(5), int(found.group(6))
        owner = thread_pid.get(tid)
        if owner == broker:
            who = f"the broker's own thread {tid} ({comm})"
        elif owner in names:
            who = f"{names[owner]}'s thread {tid} ({comm})"
        else:
            who = f"{comm} ({tid})"
        by[who] += 1
    preempted = sum(by.values())
    print(
        f"[preemptions] {args.system}: {report['throughput_tps']:,.0f} tasks/s; over "
        f"{args.seconds:g} s the loop was switched out {switches:,} times, "
        f"{preempted:,} of them while runnable ({preempted / args.seconds:,.0f}/s)"
    )
    for who, count in by.most_common(8):
        print(f"[preemptions]   {count:6,} ({count / max(preempted, 1):4.0%}) by {who}")


if __name__ == "__main__":
    main()
