"""Each service's window: the best READY tasks kept in memory, in delivery order.

Rules it keeps:
  1. A service's window is always exactly the best len(window) READY tasks of
     the journal (by priority, then enqueue order), at most window_per_service
     of them; the rest stay on disk, so queue depth is bounded by disk, not
     memory. The property tests check this after every step.
  2. A new READY task enters only if every READY task is in the window, or if it
     beats the window's worst. An empty window is refilled with one range read
     of the journal's ready index, after its worst entry (nothing read twice).
It reads the journal, never writes it; `DurableTasks.apply` calls it as tasks
enter and leave READY.
"""

from __future__ import annotations

import bisect
import logging

from zbroker.core.lifecycle import READY
from zbroker.core.model import Service
from zbroker.journal.base import Journal, TaskRecord

log = logging.getLogger("zbroker.core")


class ReadyWindows:
    """The windows of every service (each kept on its Service record)."""

    __slots__ = ("_journal", "_size")

    def __init__(self, journal: Journal | None, size: int) -> None:
        self._journal = journal
        self._size = size  # window_per_service

    def insert(self, service: Service, record: TaskRecord) -> None:
        """`record` just became READY (service.ready_count already counts it)."""
        window = service.window
        entry = (record.priority, -record.seq, record.id)
        if len(window) + 1 == service.ready_count or (window and entry > window[0]):
            bisect.insort(window, entry)
            service.records[record.id] = record
            if record.require or record.prefer or record.affinity or record.concurrency_key:
                service.placing += 1  # ruled(record), inline: this runs for every task
            if len(window) > self._size:
                evicted = service.records.pop(window[0][2])
                if ruled(evicted):
                    service.placing -= 1
                del window[0]

    def remove(self, service: Service, task_id: str) -> TaskRecord | None:
        """The task left READY (a no-op when `take` already took it out); its record
        as the window held it, if it was there."""
        record = service.records.pop(task_id, None)
        if record is None:
            return None  # not in the window
        if ruled(record):
            service.placing -= 1
        window = service.window
        for i in range(len(window) - 1, -1, -1):
            if window[i][2] == task_id:
                del window[i]
                break
        return record

    def take(self, service: Service) -> TaskRecord | None:
        """Take the best READY task of `service` out of its window (refilled from
        the journal when empty); None when the service has none."""
        window = service.window
        while service.ready_count > 0:
            if not window:
                self._refill(service)
                if not window:
                    log.error("%s: ready count out of step with the journal", service.name)
                    service.ready_count = 0
                    return None
            task_id = window.pop()[2]
            record = service.records.pop(task_id, None)
            if record is None:
                assert self._journal is not None
                record = self._journal.get(task_id)
            elif record.require or record.prefer or record.affinity or record.concurrency_key:
                service.placing -= 1  # ruled(record), inline: this runs for every task
            if record is None or record.state is not READY:
                log.error("task %s in the ready window is not ready: skipped", task_id)
                continue
            return record
        return None

    def _refill(self, service: Service) -> None:
        window = service.window
        limit = self._size - len(window)
        after = None if not window else (window[0][0], -window[0][1])
        assert self._journal is not None
        records = self._journal.ready(service.name.decode(), limit, after)
        window[0:0] = [(r.priority, -r.seq, r.id) for r in reversed(records)]
        service.records.update((r.id, r) for r in records)
        service.placing += sum(map(ruled, records))

    def fill(self, service: Service) -> None:
        """Refill an empty window from the journal (as `take` does)."""
        if not service.window and service.ready_count > 0:
            self._refill(service)

    def beyond(self, service: Service, limit: int) -> list[TaskRecord]:
        """Up to `limit` READY tasks that come after the window, best first (read from
        the journal; they stay out of the window)."""
        window = service.window
        if not window or service.ready_count <= len(window):
            return []
        assert self._journal is not None
        worst = window[0]
        return self._journal.ready(service.name.decode(), limit, (worst[0], -worst[1]))

    def record(self, service: Service, task_id: str) -> TaskRecord | None:
        """A task of the window, as it holds it (read from the journal if need be)."""
        record = service.records.get(task_id)
        if record is None:
            assert self._journal is not None
            record = self._journal.get(task_id)
        return record


def ruled(record: TaskRecord) -> bool:
    """Whether a task has placement or flow-control rules (core/placement.py). The
    hot paths of this module test the same four fields inline."""
    return bool(record.require or record.prefer or record.affinity or record.concurrency_key)
