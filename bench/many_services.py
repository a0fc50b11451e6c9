"""What many service names cost the broker's loop: a tick, a scrape's QUEUES and STATS.

    .venv/bin/python bench/many_services.py [--services 100000] [--durable 1000]

Drives the sans-IO core directly (no sockets, so the figures are the loop's own
work): `--services` MDP requests, each to its own service name, queued; then
`--durable` services that each completed one durable task (their figures are
kept after they go idle). It times:

  tick     Broker.tick with nothing due (median of 20)
  scrape   what a /metrics scrape asks of the loop: QUEUES (page after page, as
           runtime/metrics.py reads it) and STATS; the longest single call is
           what the loop is blocked for at once, the sum is its whole share
  expired  the tick that expires every request, then one tick after it

A broker without QUEUES paging ignores `limit`/`after` and answers everything
at once (one call), so the same script measures before and after.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from zbroker.core import Broker, CoreSettings
from zbroker.journal.memory import MemoryJournal
from zbroker.protocol import ext, limits, mdp, zbc

EPOCH = 1_700_000_000.0


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def answer_meta(broker: Broker) -> dict[str, Any]:
    (frames,) = broker.outbox
    broker.outbox = []
    return zbc.decode_answer(frames[1:]).meta


def scrape(broker: Broker, now: float) -> tuple[list[float], int]:
    """(seconds of each call the loop answers, rows read) for one scrape."""
    page = getattr(limits, "MAX_QUEUES_PAGE", 1000)
    seconds: list[float] = []
    rows = 0
    after: str | None = None
    rid = 0
    while True:
        rid += 1
        meta_fields = {"limit": page, "after": after}
        frames = [b"M", *zbc.call(zbc.QUEUES, rid, **meta_fields)]
        seconds.append(timed(lambda f=frames: broker.receive(f, now)))
        meta = answer_meta(broker)
        rows += len(meta["queues"])
        after = meta.get("next")
        if after is None:
            break
    seconds.append(timed(lambda: broker.receive([b"M", *zbc.call(zbc.STATS, rid + 1)], now)))
    broker.outbox = []
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=100_000)
    parser.add_argument("--durable", type=int, default=1000)
    args = parser.parse_args()
    settings = CoreSettings(request_expiry_s=60.0)
    journal = MemoryJournal()
    now = 0.0
    broker = Broker(settings, now, journal, epoch_offset=EPOCH)
    for i in range(args.durable):
        name = f"durable-{i:06d}"
        broker.receive([b"C", *zbc.enqueue(i + 1, name, [[b"x"]])], now)
        broker.receive([b"W", *ext.ready(name, 1)], now)
        (task,) = [m for m in broker.outbox if m[0] == b"W" and m[3] == ext.TASK]
        broker.outbox = []
        tid = ext.unpack_meta(task[4])["id"]
        broker.receive([b"W", *ext.done(tid, 1, [b"ok"])], now)
        broker.receive([b"W", *ext.disconnect()], now)
        journal.commit()
        broker.outbox = []
    for i in range(args.services):
        broker.receive([b"C", b"", mdp.MDPC01, b"svc-%06d" % i, b"x"], now)
    broker.outbox = []
    now += 1.0
    broker.tick(now)
    ticks = []
    for _ in range(20):
        now += settings.tick_interval_s
        ticks.append(timed(lambda t=now: broker.tick(t)))
    seconds, rows = scrape(broker, now)
    print(f"services {len(broker.services)}, durable services kept {args.durable}")
    print(f"tick, nothing due: {statistics.median(ticks) * 1e3:.2f} ms (median of 20)")
    ordered = sorted(seconds)
    print(
        f"scrape: {len(seconds)} calls, {rows} rows; per call median"
        f" {statistics.median(seconds) * 1e3:.1f} ms, p95"
        f" {ordered[int(0.95 * (len(ordered) - 1))] * 1e3:.1f} ms, longest"
        f" {ordered[-1] * 1e3:.1f} ms; sum {sum(seconds) * 1e3:.1f} ms"
    )
    now += settings.request_expiry_s
    expiry = timed(lambda: broker.tick(now))
    now += settings.tick_interval_s
    after = timed(lambda: broker.tick(now))
    print(
        f"tick expiring {args.services} requests: {expiry * 1e3:.1f} ms; the next tick"
        f" {after * 1e3:.2f} ms; services left {len(broker.services)}"
    )


if __name__ == "__main__":
    main()
