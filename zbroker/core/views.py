"""Admin views: what QUEUES, WORKERS, STATS, STATUS, TASKS and DEAD show.

Read-only: it reads the journal, the service directory, the workers and the
counters, and changes none of them, so the CLI, the console, Prometheus and any
client see the same exact figures.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from typing import Any

from zbroker.core.lifecycle import BLOCKED, DEAD, DELAYED, INFLIGHT, READY
from zbroker.core.model import Service, Stats, Worker
from zbroker.core.services import ServiceDirectory
from zbroker.core.settings import CoreSettings
from zbroker.core.tasks import FAR_FUTURE_S, DurableTasks, record_view
from zbroker.journal.base import TaskState
from zbroker.protocol import zbc
from zbroker.protocol.states import QUEUE_COUNTS

# Records one TASKS call reads at most.
LIST_SCAN = 100_000


def _rates(service: Service | None) -> dict[str, Any]:
    """A service's rates as QUEUES shows them: tasks per second and burst, or nil."""
    bucket = service.rate if service is not None else None
    key_rate = service.key_rate if service is not None else None
    return {
        "rate": None if bucket is None else {"per_s": bucket.rate, "burst": bucket.burst},
        "key_rate": None if key_rate is None else {"per_s": key_rate[0], "burst": key_rate[1]},
    }


class AdminViews:
    """Answers to the inspection calls, built from the other parts' state."""

    def __init__(
        self,
        settings: CoreSettings,
        stats: Stats,
        directory: ServiceDirectory,
        workers: dict[bytes, Worker],
        tasks: DurableTasks,
        started_at: float,
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._directory = directory
        self._workers = workers
        self._tasks = tasks
        self._started_at = started_at

    def queues(self, msg: zbc.Queues, now: float) -> dict[str, Any]:
        """A page of services' figures, exact (counters from the journal, workers from
        memory), in name order after `msg.after`. The work is O(page + services with
        stored tasks), never a view of every service the broker knows."""
        journal = self._tasks.journal
        counts = journal.counts() if journal is not None else {}
        page, more = self._queues_page(counts, msg.after, msg.limit)
        services = self._directory.services
        epoch = self._tasks.epoch(now)
        out = []
        for _key, raw in page:
            name = raw.decode(errors="backslashreplace")
            per_state = counts.get(name, {})
            service = services.get(raw)
            by_state: dict[str, int] = {
                str(wire): per_state.get(TaskState.from_wire(wire), 0) for wire in QUEUE_COUNTS
            }
            workers = list(service.workers.values()) if service is not None else []
            oldest = 0.0
            if per_state.get(READY) and journal is not None:
                record = journal.oldest_ready(name)
                if record is not None:
                    oldest = max(0.0, epoch - record.created_at)
            if service is not None and service.queue:
                # The front is the oldest: requeued requests go back to the front.
                oldest = max(oldest, now - service.queue[0].enqueued_at)
            out.append(
                {
                    "service": name,
                    **by_state,
                    "requests": len(service.queue) if service is not None else 0,
                    "workers": len(workers),
                    "credit": sum(w.credit for w in workers),
                    "credit_in_use": sum(len(w.tasks) for w in workers),
                    "oldest_age_s": round(oldest, 3),
                    "paused": service is not None and service.paused,
                    "limit": service.limit if service is not None else None,
                    "key_limit": service.key_limit if service is not None else None,
                    **_rates(service),
                    "unplaceable": self._unplaceable(service),
                    **self._directory.figures(raw).view(now),
                }
            )
        last = page[-1][0].decode() if more and page else None
        return {"queues": out, "next": last}

    def _unplaceable(self, service: Service | None) -> int:
        """READY tasks of the service's window that no registered worker may take."""
        if service is None or not service.placing:
            return 0
        return self._tasks.placement.unplaceable(service)

    def _queues_page(
        self, counts: dict[str, Any], after: str | None, limit: int
    ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """(order key, name) of the services of one QUEUES page, and whether more follow.
        The names: services in the directory (and those whose figures it keeps), and
        services with stored tasks in the journal. By the bytes of the name: MDP
        allows any, and two names that are not UTF-8 must not share a row (nor miss
        their service). They show backslash-escaped, and sort so."""
        after_key = after.encode() if after is not None else None
        entries: set[tuple[bytes, bytes]] = set()
        for entry in self._directory.names.after(after_key):
            entries.add(entry)
            if len(entries) > limit:
                break
        for stored in counts:
            key = stored.encode()
            if after_key is None or key > after_key:
                entries.add((key, key))
        chosen = heapq.nsmallest(limit + 1, entries)
        more = len(chosen) > limit
        page = chosen[:limit]
        if more and page[-1][0] == chosen[limit][0]:
            # Names showing the same (escaped) text share a cursor: keep them together,
            # before this page's end or, when they fill it, on a page of their own.
            tied = page[-1][0]
            kept = [entry for entry in page if entry[0] != tied]
            if kept:
                return kept, True
            found = self._directory.names.after(after_key)
            page = list(itertools.takewhile(lambda entry: entry[0] == tied, found))
            if tied.decode() in counts:
                page = sorted({*page, (tied, tied)})
            beyond = next(self._directory.names.after(tied), None)
            more = beyond is not None or any(name.encode() > tied for name in counts)
        return page, more

    def workers(self, now: float) -> dict[str, Any]:
        expiry = self._settings.worker_expiry_s
        rows = [
            {
                "worker": worker.alias,
                "service": worker.service.name.decode(errors="backslashreplace"),
                "dialect": worker.dialect.value,
                "credit": worker.credit,
                "tasks": list(worker.tasks),
                "tags": list(worker.tags),
                "metrics": worker.metrics,
                # Any message renews expires_at = last message + expiry.
                "last_seen_s": round(max(0.0, now - (worker.expires_at - expiry)), 3),
                "state": "draining"
                if worker.draining
                else ("busy" if len(worker.tasks) >= worker.credit else "ready"),
            }
            for service in self._directory.services.values()
            for worker in service.workers.values()
        ]
        return {"workers": rows}

    def stats(self, now: float) -> dict[str, Any]:
        stats = self._stats
        counters = {
            f.name: getattr(stats, f.name)
            for f in dataclasses.fields(stats)
            if f.name != "malformed"
        }
        services = self._directory.services
        view: dict[str, Any] = {
            "stats": counters,
            "malformed": dict(stats.malformed or {}),
            "uptime_s": round(now - self._started_at, 3),
            "services": len(services),
            "workers": len(self._workers),
            "waiting_calls": self._tasks.waiter_count,
        }
        journal = self._tasks.journal
        if journal is not None:
            js = journal.stats
            view["journal"] = {
                "store": journal.kind,
                "durability": journal.durability.value,
                "commits": js.commits,
                "commit_seconds_total": round(js.commit_seconds_total, 6),
                "last_commit_seconds": round(js.last_commit_seconds, 6),
                "bytes_used": js.bytes_used,
                "map_size": js.map_size,
                "record_writes": js.record_writes,
                "flushes": js.flushes,
                "life": journal.life,
                "crashes": journal.crashes,
            }
        return view

    def status(self, msg: zbc.Status) -> dict[str, Any] | None:
        """A task's record and history (None: no such task), and with `preview` the
        start of its payload."""
        # The live record while an attempt runs: its stream grows without a write.
        record = self._tasks.record_of(msg.id)
        if record is None:
            return None
        answer: dict[str, Any] = {"task": record_view(record)}
        if msg.preview > 0:
            answer["payload"] = self._payload_preview(msg.id, msg.preview)
        return answer

    def _payload_preview(self, task_id: str, preview: int) -> dict[str, Any] | None:
        """The payload's frame and byte counts and its first frame's first `preview`
        bytes; None when the journal no longer holds it."""
        journal = self._tasks.journal
        frames = None if journal is None else journal.payload(task_id)
        if frames is None:
            return None
        return {
            "frames": len(frames),
            "bytes": sum(len(frame) for frame in frames),
            "preview": frames[0][:preview] if frames else b"",
        }

    def dead(self, msg: zbc.Dead) -> dict[str, Any]:
        """A page of a service's dead letters, oldest first."""
        journal = self._tasks.journal
        assert journal is not None
        page = journal.dead(msg.service, msg.limit + 1, msg.after)
        more = len(page) > msg.limit
        page = page[: msg.limit]
        tasks = [
            {
                "id": r.id,
                "seq": r.seq,
                "attempt": r.attempt,
                "error": r.error,
                "created_at": r.created_at,
                "finished_at": r.finished_at,
            }
            for r in page
        ]
        return {"tasks": tasks, "next": page[-1].seq if more else None}

    def list_tasks(self, msg: zbc.ListTasks, now: float) -> dict[str, Any]:
        """A page of a service's tasks in one state, oldest first where the journal
        keeps that order (ready: delivery order). Ready, blocked and dead tasks are read from
        their per-service index; the others by scanning their index across services,
        at most LIST_SCAN records per call."""
        journal = self._tasks.journal
        assert journal is not None
        epoch = self._tasks.epoch(now)
        want = msg.after + msg.limit + 1
        state = TaskState.from_wire(msg.state)
        if state is READY:
            found = journal.ready(msg.service, min(want, LIST_SCAN))
        elif state is DEAD:
            found = journal.dead(msg.service, min(want, LIST_SCAN))
        elif state is BLOCKED:
            found = journal.blocked(msg.service, min(want, LIST_SCAN))
        elif state is INFLIGHT:
            found = [r for r in journal.inflight() if r.service == msg.service]
        elif state is DELAYED:
            found = journal.due(epoch + FAR_FUTURE_S, LIST_SCAN)
        else:
            found = journal.lapsed(epoch + FAR_FUTURE_S, LIST_SCAN)
        matching = [
            r
            for r in found
            if r.service == msg.service
            and r.state is state
            and epoch - r.created_at >= msg.older_than_s
        ]
        page = matching[msg.after : msg.after + msg.limit]
        more = len(matching) > msg.after + msg.limit
        return {
            "tasks": [record_view(r) | {"history": None} for r in page],
            "next": msg.after + len(page) if more else None,
        }
