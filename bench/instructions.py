"""Instructions per durable task through the broker core and the LMDB journal, counted
by valgrind (callgrind): a figure that does not move with the machine's load, for
comparing two versions of the core or the journal.

    .venv/bin/python bench/instructions.py            # every shape, ~4 minutes
    .venv/bin/python bench/instructions.py --shape deep

Each shape is driven twice under `valgrind --tool=callgrind`, for SMALL and for
LARGE tasks; (instructions(LARGE) - instructions(SMALL)) / (LARGE - SMALL) is the
cost of one task with start-up, imports and the journal's creation cancelled out.

- short: bench/micro.py's durable loop (ENQUEUE batches of 100 while two batching
  workers with credit 64 answer ACK and DONES; the queue stays short, so tasks
  reach workers from the core's window without a journal read);
- deep: every task is enqueued first, then the workers drain the queue, so tasks
  come out of the journal in window refills, as under a backlog;
- single: as short, but every task comes in its own ENQUEUE (100 of them read in
  one pass), so the count includes decoding and answering one call per task;
- events: as short, with a subscriber to every lifecycle event: the core builds
  them and `zbroker.protocol.events.encode_runs` packs each pass's into messages
  as the runtime does (what publishing adds on the broker's loop, short of the
  socket sends: one per batch message, not per event).

    .venv/bin/python bench/instructions.py --floor

counts the least any CPython code could spend on one lifecycle event, as a
yardstick for the `events` shape's extra: a loop over task records that appends
a tuple of three of a record's attributes to a list and packs the list with one
msgpack call every 90 events (a message's worth), against the same loop doing
nothing else; the difference, per event. No map, no topic, no check: what is
left of an event once everything that can be taken away is.

The journal is LMDB with `async` durability (an fsync is not an instruction of the
process, and `sync` differs from `async` only by it).

    .venv/bin/python bench/instructions.py --broker sync-batch --broker sync-batch+events

counts instead a real `zbroker start` process end to end, sockets, libzmq's I/O
thread and the event proxy included: the `durable` workload's run
(bench/durable.py `run_tasks`: 2 workers, producers, a subscriber for `+events`)
with the broker under callgrind, for SMALL and LARGE tasks. The broker runs about
a hundred times slower there, so its passes hold more messages than in a timed
run: compare two systems or two versions with it, not with a timed figure.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack

SMALL = 1_000
LARGE = 6_000
SHAPES = ("short", "deep", "single", "events")
# The least a CPython broker could do per lifecycle event (--floor): the base loop
# alone, then the same loop recording one event per turn.
FLOOR_SHAPES = ("floor-base", "floor")
ROWS_PER_MESSAGE = 90  # events per bus message in a `durable` run (bench/pair.py)
# Tasks per end-to-end broker run (--broker): the broker runs ~100x slower under valgrind.
SMALL_BROKER = 2_000
LARGE_BROKER = 6_000
# --broker mdp-zbw: the request/reply workload's systems, by the name they take here.
MDP_SYSTEMS = {"mdp": "zbroker", "mdp-8": "zbroker-8", "mdp-zbw": "zbroker-zbw"}


def drive(shape: str, tasks: int) -> None:
    """The measured loop (runs under valgrind)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import micro

    from zbroker.core import Broker, CoreSettings
    from zbroker.journal import Durability, open_journal
    from zbroker.protocol import ext, zbc
    from zbroker.protocol.events import encode_runs

    if shape in FLOOR_SHAPES:
        drive_floor(shape == "floor", tasks)
        return
    with tempfile.TemporaryDirectory(prefix="zbroker-instructions-") as tmp:
        journal = open_journal(Durability.ASYNC, Path(tmp) / "data")
        try:
            if shape in ("short", "single"):
                micro.durable_run(journal, tasks, per_call=100 if shape == "short" else 1)
                return
            if shape == "events":
                pack = msgpack.Packer(use_bin_type=True).pack  # one per loop, as the runtime's

                def publish(events: list[tuple[str, tuple[str, ...] | None, list[Any]]]) -> None:
                    encode_runs(events, "zbroker", time.time(), pack)

                micro.durable_run(journal, tasks, frozenset({""}), publish=publish)
                return
            broker = Broker(CoreSettings(), 0.0, journal, epoch_offset=time.time())
            batch = zbc.enqueue(0, "echo", [[b"x" * 100]] * 100, batch=True)
            for _ in range(tasks // 100):
                broker.receive([b"C", *batch], 0.0)
                journal.commit()
            broker.outbox = []
            workers = (b"W1", b"W2")
            for w in workers:
                broker.receive([w, *ext.ready("echo", 64, batch=True)], 0.0)
            journal.commit()
            done = 0
            while done < tasks:
                done += micro.answer_tasks(broker, journal, workers, 0.0)
        finally:
            journal.close()


class _Record:
    __slots__ = ("attempt", "id", "service")

    def __init__(self, n: int) -> None:
        self.id, self.attempt, self.service = f"t{n:x}", 1, "echo"


def drive_floor(record_events: bool, events: int) -> None:
    """`events` turns of a loop over 1,024 task records, each recording one event
    (`record_events`) or nothing: see --floor."""
    pool = [_Record(n) for n in range(1024)]
    worker = "00d1ce5e0000002a"
    pack = msgpack.Packer(use_bin_type=True).pack
    rows: list[tuple[str, int, str]] = []
    append = rows.append
    if not record_events:
        for i in range(events):
            record = pool[i & 1023]
        return
    for i in range(events):
        record = pool[i & 1023]
        append((record.id, record.attempt, worker))
        if len(rows) == ROWS_PER_MESSAGE:
            pack(rows)
            rows = []
            append = rows.append


def count(shape: str, tasks: int) -> int:
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--drive",
            shape,
            str(tasks),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        sys.exit(f"valgrind failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def count_broker(system: str, tasks: int) -> int:
    """Instructions of a broker process through one `durable` run of `system`."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import durable
    from harness import ProcessGroup

    plain_argv, plain_wait = durable._broker_argv, durable.wait_for_listener
    durable._broker_argv = lambda *a: [  # type: ignore[assignment]
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        *plain_argv(*a),
    ]
    # Python's start-up under valgrind takes far longer than the usual 20 s allowance.
    durable.wait_for_listener = lambda port, owner: plain_wait(port, owner, timeout_s=300.0)  # type: ignore[assignment]
    try:
        settings = replace(durable.Settings.for_mode(True), tasks=tasks)
        with tempfile.TemporaryDirectory(prefix="zbroker-instructions-") as tmp:
            logs = Path(tmp) / "logs"
            with ProcessGroup(logs) as procs:  # stopping the broker makes valgrind report
                durable.run_tasks(system, settings, 100, procs, Path(tmp) / "data")
            log = (logs / "zbroker.log").read_text(errors="replace")
    finally:
        durable._broker_argv, durable.wait_for_listener = plain_argv, plain_wait
    found = re.search(r"Collected : (\d+)", log)
    if found is None:
        sys.exit(f"valgrind gave no count; the broker's log ends with:\n{log[-2000:]}")
    return int(found.group(1))


def count_mdp_broker(system: str, requests: int) -> int:
    """Instructions of a broker process through one `mdp` request/reply run of `system`
    (bench/mdp.py), warm-up and sequential round trips as few as they go."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mdp
    from harness import Child, ProcessGroup

    class UnderValgrind(ProcessGroup):
        def start(self, name: str, argv: Sequence[str], **kwargs: Any) -> Child:
            if name == "zbroker":
                argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv]
            return super().start(name, argv, **kwargs)

    plain_wait = mdp.wait_for_listener
    mdp.wait_for_listener = lambda port, owner: plain_wait(port, owner, timeout_s=300.0)  # type: ignore[assignment]
    try:
        settings = replace(
            mdp.Settings.for_mode(True), requests=requests, warmup=500, latency_samples=100
        )
        with tempfile.TemporaryDirectory(prefix="zbroker-instructions-") as tmp:
            logs = Path(tmp) / "logs"
            with UnderValgrind(logs) as procs:  # stopping the broker makes valgrind report
                mdp.run_once(MDP_SYSTEMS[system], settings, procs)
            log = (logs / "zbroker.log").read_text(errors="replace")
    finally:
        mdp.wait_for_listener = plain_wait
    found = re.search(r"Collected : (\d+)", log)
    if found is None:
        sys.exit(f"valgrind gave no count; the broker's log ends with:\n{log[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, action="append")
    parser.add_argument(
        "--broker",
        action="append",
        metavar="SYSTEM",
        help="count a real broker process through the durable workload's SYSTEM "
        "(sync-batch, sync-batch+events, async-single, ...), or request/reply "
        "(mdp-zbw, mdp, mdp-8)",
    )
    parser.add_argument(
        "--floor", action="store_true", help="the least CPython can spend per event"
    )
    parser.add_argument("--drive", nargs=2, metavar=("SHAPE", "TASKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        drive(args.drive[0], int(args.drive[1]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed: apt-get install valgrind")
    for system in args.broker or ():
        counter, unit = (
            (count_mdp_broker, "request") if system in MDP_SYSTEMS else (count_broker, "task")
        )
        print(f"[instructions] broker, {system}: {SMALL_BROKER} and {LARGE_BROKER} {unit}s...")
        per_one = (counter(system, LARGE_BROKER) - counter(system, SMALL_BROKER)) / (
            LARGE_BROKER - SMALL_BROKER
        )
        print(
            f"[instructions] broker, {system}: {per_one:,.0f} instructions per {unit}", flush=True
        )
    if args.floor:
        large, small = LARGE * 10, SMALL * 10
        base, floor = (
            (count(shape, large) - count(shape, small)) / (large - small) for shape in FLOOR_SHAPES
        )
        print(
            f"[instructions] floor: {floor - base:,.0f} instructions per event "
            f"(the loop alone {base:,.0f}, recording an event {floor:,.0f} per turn)",
            flush=True,
        )
    if (args.broker or args.floor) and not args.shape:
        return
    for shape in args.shape or SHAPES:
        print(f"[instructions] {shape}: counting {SMALL} and {LARGE} tasks...", flush=True)
        per_task = (count(shape, LARGE) - count(shape, SMALL)) / (LARGE - SMALL)
        print(f"[instructions] {shape} queue: {per_task:,.0f} instructions per task", flush=True)


if __name__ == "__main__":
    main()
