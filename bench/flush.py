"""What a flush to disk costs on this machine: the floor under every confirm that
survives a power cut (zbroker `sync`, Redis `appendfsync always`, RabbitMQ).

    .venv/bin/python bench/flush.py [--dir DIR] [--n 500]
    .venv/bin/python bench/flush.py --broker [--tasks 20000] [--clients 8]

Three patterns, each timed `--n` times (medians and p99, in ms), in a file of the
data directory's file system (DIR, default: a temporary directory under the
project, so on the same disk as the broker's journal):

- overwrite + fdatasync: a 4 KiB page written in place in a file allocated
  beforehand, then flushed: one LMDB commit with MDB_NOMETASYNC (the data pages);
- two of them in a row: an LMDB `sync` commit (the data pages, flushed, then the
  meta page, written through a descriptor opened with O_DSYNC: a second flush);
- append + fdatasync: 100 bytes appended, then flushed: Redis's AOF with
  `appendfsync always` (one flush per write; the file grows).

`--broker` starts a `zbroker start --durability sync` broker in a temporary
directory and counts what its journal flushed (STATS `journal.flushes` over
`journal.commits`) for `--tasks` confirmed ENQUEUEs sent by `--clients` clients
at once (each with one call in flight), then for 500 sent one at a time: one
flush per commit under load, two per commit alone (docs/performance.md, "Why
zbroker `sync` flushes once per commit under load, twice alone").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
PAGES = 1024


def timed(step: Callable[[int], None], n: int) -> tuple[float, float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        step(i)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(0.99 * (n - 1))] * 1e3


async def _enqueue(endpoint: str, clients: int, tasks: int) -> float:
    from zbroker.client import AsyncClient

    async def one_client(count: int) -> None:
        async with AsyncClient(endpoint) as client:
            for _ in range(count):
                await client.enqueue("flush-bench", b"x" * 100)

    started = time.perf_counter()
    await asyncio.gather(*(one_client(tasks // clients) for _ in range(clients)))
    return time.perf_counter() - started


async def _journal(endpoint: str) -> dict[str, int]:
    from zbroker.client import AsyncClient

    async with AsyncClient(endpoint) as client:
        stats = await client.broker_stats()
    journal: dict[str, int] = stats["journal"]
    return journal


def broker(tasks: int, clients: int) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from harness import free_tcp_ports

    port, ev_in, ev_out = free_tcp_ports(3)
    endpoint = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        argv = [sys.executable, "-m", "zbroker", "start", "--bind", endpoint]
        argv += ["--events-in", f"tcp://127.0.0.1:{ev_in}"]
        argv += ["--events-out", f"tcp://127.0.0.1:{ev_out}"]
        argv += ["--data-dir", tmp, "--durability", "sync"]
        proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            before = asyncio.run(_journal(endpoint))
            for label, n, c in (("load", tasks, clients), ("one at a time", 500, 1)):
                elapsed = asyncio.run(_enqueue(endpoint, c, n))
                after = asyncio.run(_journal(endpoint))
                commits = after["commits"] - before["commits"]
                flushes = after["flushes"] - before["flushes"]
                print(
                    f"[flush] broker, {label} ({c} client(s), {n} confirmed ENQUEUEs): "
                    f"{n / elapsed:,.0f}/s, {commits} commits, {flushes} flushes, "
                    f"{flushes / max(commits, 1):.2f} flushes per commit",
                    flush=True,
                )
                before = after
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--broker", action="store_true", help="count a sync broker's flushes")
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    if args.broker:
        broker(args.tasks, args.clients)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        pages = os.open(Path(tmp) / "pages", os.O_RDWR | os.O_CREAT)
        os.write(pages, b"\0" * PAGE * PAGES)
        os.fsync(pages)
        log = os.open(Path(tmp) / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        page = b"x" * PAGE

        def one(i: int) -> None:
            os.pwrite(pages, page, (1 + i % (PAGES - 1)) * PAGE)
            os.fdatasync(pages)

        def two(i: int) -> None:
            one(i)
            os.pwrite(pages, page, 0)  # the meta page
            os.fdatasync(pages)

        def append(i: int) -> None:
            os.write(log, b"y" * 100)
            os.fdatasync(log)

        for name, step in (
            ("overwrite + fdatasync (one flush)", one),
            ("two of them in a row (LMDB sync)", two),
            ("append + fdatasync (Redis always)", append),
        ):
            p50, p99 = timed(step, args.n)
            print(f"[flush] {name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms", flush=True)
        os.close(pages)
        os.close(log)


if __name__ == "__main__":
    main()
