"""Placement and flow control: which ready task goes to which ready worker when
tasks carry rules (docs/protocol.md §16).

Rules it keeps:
  1. A task that `require`s tags goes only to a worker that has every one of them;
     it waits (READY, counted as unplaceable) while no live worker has them.
  2. Among the workers with spare credit that may take it, the best fit wins: more
     of its `prefer`red tags first, then more spare credit, then the one that has
     waited longest (the fair rotation).
  3. A task with an `affinity` key goes to the worker that last ran a task of that
     key, for as long as that worker lives and may take it: it waits for that
     worker's credit rather than go elsewhere. When the worker is gone, any worker
     that fits takes it, and becomes the key's worker.
  4. Between tasks of equal priority, the concurrency key served longest ago goes
     first (tasks without a key share one): keys are served round robin, so one
     key's backlog cannot hold back another's. With the service's per-key limit
     set, a key whose tasks at workers reach it waits.
  5. Priority still comes first: a task is never chosen over a placeable task of
     higher priority.
  6. Rates: a service's rate (tasks per second, a token bucket with a burst)
     bounds how fast its work is handed out; a per-key rate bounds each
     concurrency key the same way. A throttled service is dispatched again when
     its next token is due (`Routing.wake_at`).
It only decides; DurableTasks takes the task and starts the attempt. It looks at
the service's window (core/window.py), the best window_per_service READY tasks,
and when none of those may go to a ready worker, at up to BEYOND_WINDOW more read
from the journal (at most once per BEYOND_EVERY_S, for every choice of that pass):
tasks that wait for a worker that is not there do not hold back those behind them
that could run (within that reach).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TypeVar

from zbroker.core.model import Service, TaskAttempt, TokenBucket, Worker
from zbroker.core.window import ReadyWindows
from zbroker.journal.base import TaskRecord

# Keys remembered per service for round robin and affinity: past this many, the
# longest unused is forgotten (its next task is served as a new key's).
MAX_REMEMBERED_KEYS = 10_000
# READY tasks read past the window when nothing in it may run now, and how long a
# service waits after such a read before the next one (each costs a few
# milliseconds of the loop: at most about 3% of it, for a service stuck so; the
# tasks of a read serve every choice of its pass).
BEYOND_WINDOW = 2048
BEYOND_EVERY_S = 0.2


def fits(worker: Worker, record: TaskRecord) -> bool:
    """The worker has every tag the task requires."""
    require = record.require
    if not require:
        return True
    tags = worker.tags
    return all(tag in tags for tag in require)


class Placement:
    """Chooses the next (task, worker) of a service whose window holds ruled tasks."""

    __slots__ = ("_windows", "throttled_until")

    def __init__(self, windows: ReadyWindows) -> None:
        self._windows = windows
        self.throttled_until = math.inf

    def choose(
        self, service: Service, now: float, beyond: list[TaskRecord] | None = None
    ) -> tuple[TaskRecord, Worker] | None:
        """The best placeable task of the window (and of `beyond`: READY tasks read past
        it) with its worker, neither taken yet; None when no ready worker may take any
        of them now. `throttled_until` then says when a key held back by its rate may
        go (inf: none was)."""
        self.throttled_until = math.inf
        best: tuple[tuple[int, int, int], TaskRecord, Worker] | None = None
        running = _running_by_key(service) if service.key_limit is not None else None
        buckets = service.key_buckets if service.key_rate is not None else None
        turns = service.key_turns
        tried: dict[tuple[tuple[str, ...], tuple[str, ...], str | None], Worker | None] = {}
        for record in self._candidates(service, beyond):
            priority = record.priority
            key = record.concurrency_key
            rank = (priority, -turns.get(key, -1), -record.seq)
            if best is not None:
                if priority < best[0][0]:
                    break  # lower priorities never beat a placeable task above them
                if rank <= best[0]:
                    continue  # cannot beat the best so far: no worker to look for
                if best[0][1] == 1:
                    break  # the best's key was never served: nothing after it beats it
            if running is not None and key is not None:
                assert service.key_limit is not None
                if running.get(key, 0) >= service.key_limit:
                    continue
            if buckets is not None and key is not None:
                bucket = buckets.get(key)
                if bucket is not None and not bucket.available(now):
                    self.throttled_until = min(self.throttled_until, bucket.due_at(now))
                    continue
            shape = (record.require, record.prefer, record.affinity)
            if shape in tried:
                worker = tried[shape]
            else:
                worker = tried[shape] = self._worker_for(service, record)
            if worker is None:
                continue
            best = (rank, record, worker)
        return None if best is None else (best[1], best[2])

    def _candidates(
        self, service: Service, beyond: list[TaskRecord] | None
    ) -> Iterator[TaskRecord]:
        """The window's records best first, then `beyond`'s (which come after them)."""
        window = service.window
        for i in range(len(window) - 1, -1, -1):
            record = self._windows.record(service, window[i][2])
            if record is not None:
                yield record
        if beyond:
            yield from beyond

    def _worker_for(self, service: Service, record: TaskRecord) -> Worker | None:
        """The ready worker that should take `record` now (rules 1 to 3), or None."""
        if record.affinity is not None:
            identity = service.affinity.get(record.affinity)
            if identity is not None:
                held = service.workers.get(identity)
                if held is not None and not held.draining and fits(held, record):
                    return service.ready.get(identity)  # its worker, or wait for it
        best: Worker | None = None
        best_score = (-1, -1)
        prefer = record.prefer
        for worker in service.ready.values():
            if not fits(worker, record):
                continue
            tags = worker.tags
            score = (
                sum(1 for tag in prefer if tag in tags),
                worker.credit - len(worker.tasks),
            )
            if score > best_score:
                best, best_score = worker, score
        return best

    @staticmethod
    def started(service: Service, record: TaskRecord, worker: Worker, now: float) -> None:
        """`record` was handed to `worker`: its key's turn and token, its affinity's worker."""
        service.turn += 1
        key = record.concurrency_key
        _remember(service.key_turns, key, service.turn)
        if record.affinity is not None:
            _remember(service.affinity, record.affinity, worker.identity)
        if service.key_rate is not None and key is not None:
            bucket = service.key_buckets.get(key)
            if bucket is None:
                rate, burst = service.key_rate
                bucket = TokenBucket(rate, burst, now)
            _remember(service.key_buckets, key, bucket)
            bucket.available(now)
            bucket.spend(1)

    def unplaceable(self, service: Service) -> int:
        """Tasks of the window that no registered worker of the service may take (their
        required tags are on none of them)."""
        workers = [w for w in service.workers.values() if not w.draining]
        count = 0
        for _, _, task_id in service.window:
            record = self._windows.record(service, task_id)
            if record is not None and record.require and not any(fits(w, record) for w in workers):
                count += 1
        return count


K = TypeVar("K", str, str | None)
V = TypeVar("V")


def _remember(memory: dict[K, V], key: K, value: V) -> None:
    """Set `key` as the most recent entry, forgetting the oldest past the bound."""
    memory.pop(key, None)
    memory[key] = value
    if len(memory) > MAX_REMEMBERED_KEYS:
        del memory[next(iter(memory))]


def _running_by_key(service: Service) -> dict[str, int]:
    """How many tasks of each concurrency key the service's workers hold now."""
    running: dict[str, int] = {}
    for worker in service.workers.values():
        for held in worker.tasks.values():
            if type(held) is TaskAttempt:
                key = held.record.concurrency_key
                if key is not None:
                    running[key] = running.get(key, 0) + 1
    return running
