"""What a flush to disk costs on this machine: the floor under every confirm that
survives a power cut (zbroker `sync`, Redis `appendfsync always`, RabbitMQ).

    .venv/bin/python bench/flush.py [--dir DIR] [--n 500]

Three patterns, each timed `--n` times (medians and p99, in ms), in a file of the
data directory's file system (DIR, default: a temporary directory under the
project, so on the same disk as the broker's journal):

- overwrite + fdatasync: a 4 KiB page written in place in a file allocated
  beforehand, then flushed: one LMDB commit with MDB_NOMETASYNC (the data pages);
- two of them in a row: an LMDB `sync` commit (the data pages, flushed, then the
  meta page, written through a descriptor opened with O_DSYNC: a second flush);
- append + fdatasync: 100 bytes appended, then flushed: Redis's AOF with
  `appendfsync always` (one flush per write; the file grows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
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
