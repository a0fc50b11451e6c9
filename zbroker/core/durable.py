"""Durable tasks: ZBC01 calls and every state change of a task, kept in the journal.

Rules it keeps (DESIGN.md, "Delivery semantics"):
  1. The journal holds the tasks themselves. Memory holds only a bounded window
     of each service's best READY tasks (by priority, then enqueue order) and
     the attempts workers hold right now. Every state change is written to the
     journal in the same pass that decides it; the runtime commits once per
     pass and sends the outbox only after the commit, so nothing is confirmed
     (ids, results, TASKs) that a crash could take back.
  2. Every delivery is an attempt and counts. An attempt that ends without
     DONE (FAIL, timeout, the worker died or did not acknowledge, the broker
     stopped) is retried while attempts remain: after a FAIL or a timeout with
     exponential backoff and jitter (a FAIL's own delay_s wins), otherwise at
     once. The last allowed attempt ending without DONE dead-letters the task.
  3. Final states (done, cancelled, expired) are kept for `retention_s`, with
     the result, so a requester can fetch it by id later; dead letters stay
     until redriven.
  4. Anything that waits on a task (REQUEST, RESULT with wait_s) is answered
     exactly once: when the task reaches a final state (dead included), or
     with its current state when the wait runs out.
A journal failure raises out of the core: the runtime stops the broker without
sending anything from that pass, and a restart recovers from the last commit.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import random
from collections.abc import Sequence
from itertools import chain
from typing import Any

from zbroker.core.model import (
    Request,
    Service,
    ServiceFigures,
    Stats,
    Worker,
    WorkerDialect,
)
from zbroker.core.settings import CoreSettings
from zbroker.journal.base import Journal, TaskRecord, TaskState
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.events import (
    DONE_FIELDS,
    ENQUEUED_FIELDS,
    MAX_BATCH_EVENTS,
    STARTED_FIELDS,
)

log = logging.getLogger("zbroker.core")

READY = TaskState.READY
DELAYED = TaskState.DELAYED
INFLIGHT = TaskState.INFLIGHT
DONE = TaskState.DONE
DEAD = TaskState.DEAD
CANCELLED = TaskState.CANCELLED
EXPIRED = TaskState.EXPIRED
FINAL = frozenset({DONE, DEAD, CANCELLED, EXPIRED})
WAITING = frozenset({READY, DELAYED})
# Payloads up to this size stay in memory with their record while it waits in the
# window (at most window_per_service of them per service), so delivering it needs
# no read of the store.
_MEMO_PAYLOAD_BYTES = 4096

STATE_NAMES = {state: state.name.lower() for state in TaskState}

# Journal reads per timer pass (due delays, lapsed TTLs and retentions).
TIMER_BATCH = 1000
# Share of a size-limited journal that enqueues may not take (see _journal_refuses).
JOURNAL_RESERVE = 0.1
_FAR_FUTURE_S = 100 * 365 * 86400.0
# Records one TASKS call reads at most.
LIST_SCAN = 100_000


def record_view(record: TaskRecord) -> dict[str, Any]:
    """A task's record as STATUS shows it."""
    return {
        "id": record.id,
        "service": record.service,
        "state": STATE_NAMES[record.state],
        "attempt": record.attempt,
        "max_attempts": record.max_attempts,
        "priority": record.priority,
        "created_at": record.created_at,
        "not_before": record.not_before,
        "expires_at": record.expires_at,
        "timeout_s": record.timeout_s,
        "key": record.key,
        "headers": record.headers,
        "error": record.error,
        "finished_at": record.finished_at,
        "keep_until": record.keep_until,
        "history": record.history,
    }


def backoff_s(settings: CoreSettings, attempt: int, rng: random.Random) -> float:
    """Delay before the attempt after `attempt` (1-based): exponential, capped, equal jitter."""
    full = min(settings.retry_max_s, settings.retry_base_s * 2.0 ** min(attempt - 1, 60))
    return full / 2.0 + rng.uniform(0.0, full / 2.0)


class DurableTasks:
    """The durable half of the broker core (mixed into `Broker`)."""

    settings: CoreSettings
    services: dict[bytes, Service]
    kept_figures: dict[bytes, ServiceFigures]
    workers: dict[bytes, Worker]
    outbox: list[list[bytes]]
    stats: Stats
    journal: Journal | None
    next_tick_at: float
    # Lifecycle events for the bus, in the order they happened: (topic, fields, items)
    # with consecutive events of one topic in one entry (at most MAX_BATCH_EVENTS),
    # published by the runtime after the pass's commit, an entry per message. Only
    # topics some subscriber asked for are produced. task.enqueued/started/done items
    # are rows, a tuple per event in the order of `fields` (no map built per event;
    # they go out as a `rows` batch, docs/protocol.md §6); other topics' items are
    # payload maps and `fields` is None.
    events: list[tuple[str, tuple[str, ...] | None, list[Any]]]
    event_prefixes: frozenset[str]

    def _init_durable(self, journal: Journal | None, now: float, epoch_offset: float) -> None:
        self.events = []
        self.event_prefixes = frozenset()
        self._wanted: dict[str, bool] = {}
        self._admitted = 0  # bytes of enqueues admitted since the journal's last commit
        self._admitted_at = -1  # the journal's commit count when that was reset
        # Service -> its task.started / task.done topic if wanted, else None.
        self._started_topics: dict[str, str | None] = {}
        self._done_topics: dict[str, str | None] = {}
        self.journal = journal
        self._started_at = now
        self._epoch_offset = epoch_offset
        self._rng = random.Random(self.settings.seed)
        # Durable task id -> the worker holding its current attempt.
        self._holders: dict[str, Worker] = {}
        # Task id -> calls waiting for it to end: (client, rid, deadline).
        self._waiters: dict[str, list[tuple[bytes, int, float]]] = {}
        self._waiter_count = 0
        self._next_due_at = math.inf  # monotonic time of the earliest delayed task
        if journal is not None:
            self._recover(now)

    # ------------------------------------------------------------ events

    def set_subscriptions(self, prefixes: frozenset[str]) -> None:
        """The topic prefixes subscribers of the bus hold now (the runtime tracks them)."""
        self.event_prefixes = prefixes
        self._wanted = {}
        self._started_topics = {}
        self._done_topics = {}

    def _wants(self, topic: str) -> bool:
        """Whether a subscriber holds a prefix of `topic` (the answer cached per topic).
        Asked before an event's payload is made: a subscriber to `task.done.tts` costs
        nothing for the other topics."""
        wanted = self._wanted.get(topic)
        if wanted is None:
            if len(self._wanted) >= 10_000:
                self._wanted = {}
            wanted = self._wanted[topic] = any(topic.startswith(p) for p in self.event_prefixes)
        return wanted

    def _task_topic(self, topics: dict[str, str | None], kind: str, service: str) -> str | None:
        """`kind` + `service` if a subscriber wants it, else None, kept in `topics` (the
        task.started and task.done sites look there first: the topic's string is made
        and hashed once per service, not per event)."""
        topic = kind + service
        wanted = topic if self._wants(topic) else None
        if len(topics) >= 10_000:
            topics.clear()
        topics[service] = wanted
        return wanted

    def _emit(self, topic: str, payload: dict[str, Any]) -> None:
        if self._wants(topic):
            self._add_events(topic, None, [payload])

    def _add_events(self, topic: str, fields: tuple[str, ...] | None, items: list[Any]) -> None:
        """Add events of one wanted topic in a row (the caller asked `_wants`): rows of
        `fields`, or payloads when `fields` is None. Consecutive events with one topic
        share an entry, at most MAX_BATCH_EVENTS: the runtime publishes each entry as
        one batch message (docs/protocol.md §6), in this order."""
        if not items:
            return  # an entry is never empty: a batch holds at least one event
        events = self.events
        if events and events[-1][0] == topic:
            group = events[-1][2]
        else:
            group = []
            events.append((topic, fields, group))
        done, count = 0, len(items)
        while done < count:
            room = MAX_BATCH_EVENTS - len(group)
            if room <= 0:
                group = []
                events.append((topic, fields, group))
                room = MAX_BATCH_EVENTS
            group.extend(items[done : done + room])
            done += room

    # Provided by Broker.
    def _dispatch(self, service: Service, now: float) -> None:
        raise NotImplementedError

    def _service(self, name: bytes) -> Service:
        raise NotImplementedError

    def _release(self, worker: Worker, request: Request) -> None:
        raise NotImplementedError

    def _kick(self, worker: Worker, now: float, why: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ start

    def _recover(self, now: float) -> None:
        """Rebuild the counters from the journal; attempts in flight at the last stop
        go back to their queues (their attempt counted)."""
        journal = self.journal
        assert journal is not None
        epoch = now + self._epoch_offset
        for name, per_state in journal.counts().items():
            service = self._service(name.encode())
            service.ready_count = per_state.get(READY, 0)
            service.waiting_count = service.ready_count + per_state.get(DELAYED, 0)
        for name, options in journal.service_options().items():
            service = self._service(name.encode())
            service.paused = options.get("paused") is True
            limit = options.get("limit")
            service.limit = limit if type(limit) is int and limit > 0 else None
            log.info(
                "service %s: %s, concurrency limit %s (kept from the last run)",
                name,
                "paused" if service.paused else "not paused",
                service.limit or "none",
            )
        recovered = journal.inflight()
        for record in recovered:
            self.stats.tasks_recovered += 1
            self._history(record, "recovered", epoch)
            self._end_attempt(record, "the broker stopped during the attempt", epoch, now, 0.0)
        if recovered:
            log.info("%d task(s) in flight at the last stop requeued", len(recovered))
        self._schedule_due(now)

    # --------------------------------------------------------- clients

    def _on_zbc(self, identity: bytes, msg: zbc.ClientMessage, now: float) -> None:
        if type(msg) is zbc.Queues:
            self.outbox.append([identity, *zbc.reply(msg.rid, {"queues": self._queues(now)})])
            return
        if type(msg) is zbc.Workers:
            self.outbox.append([identity, *zbc.reply(msg.rid, {"workers": self._workers(now)})])
            return
        if type(msg) is zbc.Stats:
            self.outbox.append([identity, *zbc.reply(msg.rid, self._stats_view(now))])
            return
        if type(msg) is zbc.ListTasks:
            assert isinstance(msg, zbc.ListTasks)
            self._on_list(identity, msg, now)
            return
        if type(msg) is zbc.Purge:
            assert isinstance(msg, zbc.Purge)
            self._on_purge(identity, msg, now)
            return
        if type(msg) is zbc.Drop:
            assert isinstance(msg, zbc.Drop)
            self._on_drop(identity, msg)
            return
        if type(msg) is zbc.Limit:
            assert isinstance(msg, zbc.Limit)
            service = self._service(msg.service.encode())
            service.limit = msg.limit
            self._keep_options(service)
            log.info("service %s concurrency limit: %s", msg.service, msg.limit or "none")
            fields = {"service": msg.service, "limit": msg.limit}
            self.outbox.append([identity, *zbc.reply(msg.rid, fields)])
            if service.ready:
                self._dispatch(service, now)
            return
        if type(msg) is zbc.Drain:
            assert isinstance(msg, zbc.Drain)
            self._on_drain(identity, msg)
            return
        if type(msg) is zbc.Pause:
            assert isinstance(msg, zbc.Pause)
            self._on_pause(identity, msg, now)
            return
        if self.journal is None:
            self._refuse(identity, msg.rid, zbc.E_UNAVAILABLE, "this broker keeps no tasks")
            return
        kind = type(msg)
        if kind is zbc.Enqueue:
            assert isinstance(msg, zbc.Enqueue)
            self._on_enqueue(identity, msg, now)
        elif kind is zbc.Result:
            assert isinstance(msg, zbc.Result)
            self._on_result(identity, msg, now)
        elif kind is zbc.Status:
            assert isinstance(msg, zbc.Status)
            record = self.journal.get(msg.id)
            if record is None:
                self._refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no task {msg.id!r}")
            else:
                self.outbox.append([identity, *zbc.reply(msg.rid, {"task": record_view(record)})])
        elif kind is zbc.Cancel:
            assert isinstance(msg, zbc.Cancel)
            self._on_cancel(identity, msg, now)
        elif kind is zbc.Dead:
            assert isinstance(msg, zbc.Dead)
            page = self.journal.dead(msg.service, msg.limit + 1, msg.after)
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
            nxt = page[-1].seq if more else None
            self.outbox.append([identity, *zbc.reply(msg.rid, {"tasks": tasks, "next": nxt})])
        else:
            assert isinstance(msg, zbc.Redrive)
            self._on_redrive(identity, msg, now)

    def _queues(self, now: float) -> list[dict[str, Any]]:
        """Every service's figures, exact: counters from the journal, workers from memory."""
        counts = self.journal.counts() if self.journal is not None else {}
        # By the bytes of the name: MDP allows any, and two names that are not UTF-8
        # must not share a row (nor miss their service). They show backslash-escaped.
        raw_names = set(self.services) | {name.encode() for name in counts}
        epoch = now + self._epoch_offset
        out = []
        for raw in sorted(raw_names):
            name = raw.decode(errors="backslashreplace")
            per_state = counts.get(name, {})
            service = self.services.get(raw)
            workers = list(service.workers.values()) if service is not None else []
            oldest = 0.0
            if per_state.get(READY) and self.journal is not None:
                record = self.journal.oldest_ready(name)
                if record is not None:
                    oldest = max(0.0, epoch - record.created_at)
            if service is not None and service.queue:
                oldest = max(oldest, now - min(r.enqueued_at for r in service.queue))
            out.append(
                {
                    "service": name,
                    "ready": per_state.get(READY, 0),
                    "delayed": per_state.get(DELAYED, 0),
                    "inflight": per_state.get(INFLIGHT, 0),
                    "dead": per_state.get(DEAD, 0),
                    "done": per_state.get(DONE, 0),
                    "requests": len(service.queue) if service is not None else 0,
                    "workers": len(workers),
                    "credit": sum(w.credit for w in workers),
                    "credit_in_use": sum(len(w.tasks) for w in workers),
                    "oldest_age_s": round(oldest, 3),
                    "paused": service is not None and service.paused,
                    "limit": service.limit if service is not None else None,
                    **self._figures(raw, service).view(now),
                }
            )
        return out

    def _workers(self, now: float) -> list[dict[str, Any]]:
        expiry = self.settings.worker_expiry_s
        return [
            {
                "worker": service_worker.identity.hex(),
                "service": service_worker.service.name.decode(errors="backslashreplace"),
                "dialect": service_worker.dialect.value,
                "credit": service_worker.credit,
                "tasks": list(service_worker.tasks),
                "tags": list(service_worker.tags),
                "metrics": service_worker.metrics,
                # Any message renews expires_at = last message + expiry.
                "last_seen_s": round(max(0.0, now - (service_worker.expires_at - expiry)), 3),
                "state": "draining"
                if service_worker.draining
                else ("busy" if len(service_worker.tasks) >= service_worker.credit else "ready"),
            }
            for service in self.services.values()
            for service_worker in service.workers.values()
        ]

    def _stats_view(self, now: float) -> dict[str, Any]:
        stats = self.stats
        counters = {
            f.name: getattr(stats, f.name)
            for f in dataclasses.fields(stats)
            if f.name != "malformed"
        }
        view: dict[str, Any] = {
            "stats": counters,
            "malformed": dict(stats.malformed or {}),
            "uptime_s": round(now - self._started_at, 3),
            "services": len(self.services),
            "workers": sum(len(s.workers) for s in self.services.values()),
            "waiting_calls": self._waiter_count,
        }
        if self.journal is not None:
            js = self.journal.stats
            view["journal"] = {
                "durability": self.journal.durability.value,
                "commits": js.commits,
                "commit_seconds_total": round(js.commit_seconds_total, 6),
                "last_commit_seconds": round(js.last_commit_seconds, 6),
                "bytes_used": js.bytes_used,
                "map_size": js.map_size,
            }
        return view

    def _figures(self, name: bytes, service: Service | None) -> ServiceFigures:
        """A service's figures: its own, or kept from its last Service object."""
        if service is not None:
            return service.figures
        kept = self.kept_figures.get(name)
        return kept if kept is not None else ServiceFigures()

    def _on_list(self, identity: bytes, msg: zbc.ListTasks, now: float) -> None:
        """A page of a service's tasks in one state, oldest first where the journal
        keeps that order (ready: delivery order). Ready and dead tasks are read from
        their per-service index; the others by scanning their index across services,
        at most LIST_SCAN records per call."""
        journal = self.journal
        assert journal is not None
        epoch = now + self._epoch_offset
        want = msg.after + msg.limit + 1
        state = TaskState[msg.state.upper()]
        if state is READY:
            found = journal.ready(msg.service, min(want, LIST_SCAN))
        elif state is DEAD:
            found = journal.dead(msg.service, min(want, LIST_SCAN))
        elif state is INFLIGHT:
            found = [r for r in journal.inflight() if r.service == msg.service]
        elif state is DELAYED:
            found = journal.due(epoch + _FAR_FUTURE_S, LIST_SCAN)
        else:
            found = journal.lapsed(epoch + _FAR_FUTURE_S, LIST_SCAN)
        matching = [
            r
            for r in found
            if r.service == msg.service
            and r.state is state
            and epoch - r.created_at >= msg.older_than_s
        ]
        page = matching[msg.after : msg.after + msg.limit]
        more = len(matching) > msg.after + msg.limit
        fields = {
            "tasks": [record_view(r) | {"history": None} for r in page],
            "next": msg.after + len(page) if more else None,
        }
        self.outbox.append([identity, *zbc.reply(msg.rid, fields)])

    def _on_purge(self, identity: bytes, msg: zbc.Purge, now: float) -> None:
        """Cancel up to MAX_BATCH waiting (ready or delayed) tasks of the service."""
        journal = self.journal
        assert journal is not None
        epoch = now + self._epoch_offset
        records = journal.ready(msg.service, zbc.MAX_BATCH)
        service = self.services.get(msg.service.encode())
        need = zbc.MAX_BATCH - len(records)
        if need > 0 and service is not None and service.waiting_count > len(records):
            # Delayed tasks are indexed by time across services: read them in a wider
            # and wider window until it holds enough of ours or the whole index, so a
            # service's delayed tasks are reached however many other services have.
            scan = 10 * zbc.MAX_BATCH
            while True:
                later = journal.due(epoch + _FAR_FUTURE_S, scan)
                ours = [r for r in later if r.service == msg.service]
                if len(ours) >= need or len(later) < scan:
                    break
                scan *= 4
            records += ours[:need]
        for record in records:
            self.stats.tasks_cancelled += 1
            self._history(record, "purged", epoch)
            self._finish(record, CANCELLED, epoch, "purged by an operator")
        more = service is not None and service.waiting_count > 0
        if records:
            log.warning("%d waiting task(s) of %s purged", len(records), msg.service)
        fields = {"purged": len(records), "more": more}
        self.outbox.append([identity, *zbc.reply(msg.rid, fields)])

    def _dead_letters(self, service: str, ids: Sequence[str] | None) -> list[TaskRecord]:
        """The dead letters of `service` named by `ids` (others are skipped), or with ids
        None the oldest MAX_BATCH of them: what DROP and REDRIVE act on."""
        journal = self.journal
        assert journal is not None
        if ids is None:
            return journal.dead(service, zbc.MAX_BATCH)
        # An id listed twice is one task: acting on it twice would count it twice.
        found = (journal.get(task_id) for task_id in dict.fromkeys(ids))
        return [r for r in found if r is not None and r.state is DEAD and r.service == service]

    def _on_drop(self, identity: bytes, msg: zbc.Drop) -> None:
        """Delete dead letters of the service (the listed ones, or up to MAX_BATCH)."""
        journal = self.journal
        assert journal is not None
        records = self._dead_letters(msg.service, msg.ids)
        for record in records:
            journal.delete(record.id)
        if records:
            log.warning("%d dead letter(s) of %s dropped", len(records), msg.service)
        more = msg.ids is None and bool(journal.dead(msg.service, 1))
        fields = {"dropped": len(records), "more": more}
        self.outbox.append([identity, *zbc.reply(msg.rid, fields)])

    def _on_drain(self, identity: bytes, msg: zbc.Drain) -> None:
        try:
            worker = self.workers.get(bytes.fromhex(msg.worker))
        except ValueError:
            worker = None
        if worker is None:
            self._refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no worker {msg.worker}")
            return
        if not worker.draining:
            worker.draining = True
            worker.service.ready.pop(worker.identity, None)
            log.info(
                "worker %s (%s) draining: no new tasks, %d to finish",
                msg.worker,
                worker.service.name.decode(errors="replace"),
                len(worker.tasks),
            )
        fields = {"worker": msg.worker, "tasks": len(worker.tasks)}
        self.outbox.append([identity, *zbc.reply(msg.rid, fields)])

    def _on_pause(self, identity: bytes, msg: zbc.Pause, now: float) -> None:
        name = msg.service.encode()
        service = self._service(name)
        if service.paused != msg.paused:
            service.paused = msg.paused
            self._keep_options(service)
            log.info("service %s %s", msg.service, "paused" if msg.paused else "resumed")
        self.outbox.append(
            [identity, *zbc.reply(msg.rid, {"service": msg.service, "paused": msg.paused})]
        )
        if not msg.paused and service.ready:
            self._dispatch(service, now)

    def _keep_options(self, service: Service) -> None:
        """Write the operator's settings of `service` to the journal (in this pass's
        commit, before the reply goes out), so a restart keeps them."""
        if self.journal is None:
            return
        options: dict[str, Any] = {}
        if service.paused:
            options["paused"] = True
        if service.limit:
            options["limit"] = service.limit
        self.journal.put_service_options(service.name.decode(), options)

    def _refuse(self, identity: bytes, rid: int, code: str, message: str) -> None:
        self.stats.calls_refused += 1
        if code != zbc.E_NOT_FOUND:
            log.info("call %d from %s refused (%s): %s", rid, identity.hex(), code, message)
        self.outbox.append([identity, *zbc.error(rid, code, message)])

    def _journal_refuses(self, identity: bytes, msg: zbc.Enqueue, new: int) -> bool:
        """Refuse (queue_full) an ENQUEUE that would bring a size-limited journal near
        its limit: JOURNAL_RESERVE of it stays for what finishing, retrying and
        requeueing tasks write, so the broker never has to stop for a full journal
        because of what clients sent. Counts what this pass admitted already, since
        the journal's figures move only at commits."""
        assert self.journal is not None
        js = self.journal.stats
        if not js.bytes_max:
            return False
        if js.commits != self._admitted_at:
            self._admitted_at, self._admitted = js.commits, 0
        # A record, its index entries and B-tree slack, besides its payload.
        incoming = 2 * (sum(map(len, chain.from_iterable(msg.payloads))) + 512 * new)
        allowed = js.bytes_max * (1.0 - JOURNAL_RESERVE)
        if js.bytes_live + self._admitted + incoming <= allowed:
            self._admitted += incoming
            return False
        self._refuse(
            identity,
            msg.rid,
            zbc.E_QUEUE_FULL,
            f"the journal is nearly full ({js.bytes_live >> 20} of {js.bytes_max >> 20} MiB "
            f"in use; {JOURNAL_RESERVE:.0%} is kept for finishing tasks): nothing was stored; "
            "raise --journal-max-mib, or let tasks finish",
        )
        return True

    def _on_enqueue(self, identity: bytes, msg: zbc.Enqueue, now: float) -> None:
        journal = self.journal
        assert journal is not None
        name = msg.service.encode()
        if name.startswith(mdp.MMI_PREFIX):
            self._refuse(identity, msg.rid, zbc.E_BAD_REQUEST, "mmi.* names are reserved")
            return
        service = self._service(name)
        count = len(msg.payloads)
        options = msg.options
        keys = options.keys or (options.key,) * count
        # Tasks already stored under their idempotency key are answered with their id
        # and never count against the cap: a resend must not be refused.
        held: dict[int, str] = {}
        new = count
        fresh: set[str] = set()  # keys new to the journal: a repeat within the call is one task
        for i, key in enumerate(keys):
            if key is not None:
                if (task_id := journal.find_key(msg.service, key)) is not None:
                    held[i] = task_id
                    new -= 1
                elif key in fresh:
                    new -= 1
                else:
                    fresh.add(key)
        cap = self.settings.max_tasks_per_service
        if new and service.waiting_count + new > cap:
            self._refuse(
                identity,
                msg.rid,
                zbc.E_QUEUE_FULL,
                f"{msg.service} holds {service.waiting_count} waiting tasks (cap {cap})",
            )
            return
        if new and self._journal_refuses(identity, msg, new):
            return
        if msg.wait and self._waiter_count >= self.settings.max_waiters:
            self._refuse(identity, msg.rid, zbc.E_TOO_MANY_WAITERS, "too many calls waiting")
            return
        epoch = now + self._epoch_offset
        not_before = options.not_before or 0.0
        if options.delay_s:
            not_before = epoch + options.delay_s
        expires_at = None if options.ttl_s is None else epoch + options.ttl_s
        max_attempts = options.max_attempts or self.settings.default_max_attempts
        ids: list[str] = []
        existing: list[int] = []
        stored_keys: dict[str, str] = {}  # keys of the tasks this call stores -> their ids
        topic = "task.enqueued." + msg.service
        enqueued: list[Any] | None = [] if self.event_prefixes and self._wants(topic) else None
        priority, event_not_before, headers = options.priority, not_before or None, options.headers
        for i, payload in enumerate(msg.payloads):
            key = keys[i]
            if key is not None:
                # Stored before this call (looked up above), or by an earlier task of it.
                task_id = held.get(i) or stored_keys.get(key)
                if task_id is not None:
                    ids.append(task_id)
                    existing.append(i)
                    continue
            seq = journal.next_seq()
            record = TaskRecord(
                id=f"t{seq:x}",
                service=msg.service,
                state=DELAYED if not_before > epoch else READY,
                seq=seq,
                created_at=epoch,
                priority=options.priority,
                not_before=not_before,
                expires_at=expires_at,
                max_attempts=max_attempts,
                timeout_s=options.timeout_s,
                key=key,
                headers=options.headers,
                history=[["enqueued", epoch]],
            )
            self._store(record, None, service, payload)
            ids.append(record.id)
            if key is not None:
                stored_keys[key] = record.id
            if enqueued is not None:
                enqueued.append((record.id, priority, event_not_before, headers))
        if enqueued:
            self._add_events(topic, ENQUEUED_FIELDS, enqueued)
        self.stats.tasks_enqueued += count - len(existing)
        service.figures.enqueued += count - len(existing)
        self.stats.tasks_deduplicated += len(existing)
        fields: dict[str, Any] = {"ids": ids}
        if existing:
            fields["existing"] = existing
        self.outbox.append([identity, *zbc.reply(msg.rid, fields)])
        if not_before > epoch:
            self._schedule_due(now)
        if msg.wait:
            stored = journal.get(ids[0]) if existing else None
            if stored is not None and stored.state in FINAL:
                self._answer(identity, msg.rid, stored)  # a resent REQUEST of a finished task
            else:
                wait_s = self.settings.request_wait_s if msg.wait_s is None else msg.wait_s
                self._wait(identity, msg.rid, ids[0], now + wait_s)
        if service.ready:
            self._dispatch(service, now)

    def _on_result(self, identity: bytes, msg: zbc.Result, now: float) -> None:
        assert self.journal is not None
        record = self.journal.get(msg.id)
        if record is None:
            self._refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no task {msg.id!r}")
        elif record.state in FINAL or msg.wait_s <= 0:
            self._answer(identity, msg.rid, record)
        elif self._waiter_count >= self.settings.max_waiters:
            self._refuse(identity, msg.rid, zbc.E_TOO_MANY_WAITERS, "too many calls waiting")
        else:
            self._wait(identity, msg.rid, msg.id, now + msg.wait_s)

    def _on_cancel(self, identity: bytes, msg: zbc.Cancel, now: float) -> None:
        assert self.journal is not None
        record = self.journal.get(msg.id)
        if record is None:
            self._refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no task {msg.id!r}")
            return
        was = record.state
        if was in FINAL:
            self._refuse(
                identity, msg.rid, zbc.E_CONFLICT, f"task {msg.id} already {STATE_NAMES[was]}"
            )
            return
        epoch = now + self._epoch_offset
        worker = self._holders.get(msg.id)
        if worker is not None:
            request = worker.tasks[msg.id]
            assert request.task is not None
            record = request.task
            self._release(worker, request)
            if worker.dialect is WorkerDialect.ZBW:
                self.outbox.append([worker.identity, *ext.cancel(msg.id, request.attempt)])
                self._dispatch(worker.service, now)
            else:
                # 7/MDP cannot cancel a request: the worker is let go (it reconnects).
                self._kick(worker, now, f"task {msg.id} was cancelled")
        self.stats.tasks_cancelled += 1
        self._history(record, "cancelled", epoch)
        self._finish(record, CANCELLED, epoch, None)
        self.outbox.append(
            [
                identity,
                *zbc.reply(msg.rid, {"id": msg.id, "state": "cancelled", "was": STATE_NAMES[was]}),
            ]
        )

    def _on_redrive(self, identity: bytes, msg: zbc.Redrive, now: float) -> None:
        journal = self.journal
        assert journal is not None
        records = self._dead_letters(msg.service, msg.ids)
        epoch = now + self._epoch_offset
        service = self._service(msg.service.encode())
        for record in records:
            record.attempt = 0
            record.finished_at = None
            record.expires_at = None  # it had started: its ttl no longer applies
            record.state = READY
            self._history(record, "redriven", epoch)
            self._store(record, DEAD, service)
        self.stats.tasks_redriven += len(records)
        if records:
            log.info("%d dead letter(s) of %s redriven", len(records), msg.service)
        self.outbox.append([identity, *zbc.reply(msg.rid, {"ids": [r.id for r in records]})])
        if service.ready:
            self._dispatch(service, now)

    # ---------------------------------------------------------- waiting

    def _wait(self, identity: bytes, rid: int, task_id: str, deadline: float) -> None:
        self._waiters.setdefault(task_id, []).append((identity, rid, deadline))
        self._waiter_count += 1
        if deadline < self.next_tick_at:
            self.next_tick_at = deadline

    def _answer(
        self, identity: bytes, rid: int, record: TaskRecord, frames: tuple[bytes, ...] | None = None
    ) -> None:
        fields: dict[str, Any] = {"id": record.id, "state": STATE_NAMES[record.state]}
        if record.error is not None and record.state is not DONE:
            fields["error"] = record.error
        if record.state is DONE and frames is None:
            assert self.journal is not None
            frames = tuple(self.journal.result(record.id) or ())
        self.outbox.append([identity, *zbc.reply(rid, fields, frames or ())])

    def _notify(self, record: TaskRecord, frames: tuple[bytes, ...] | None = None) -> None:
        waiters = self._waiters.pop(record.id, None)
        if waiters:
            self._waiter_count -= len(waiters)
            for identity, rid, _ in waiters:
                self._answer(identity, rid, record, frames)

    def _expire_waits(self, now: float) -> None:
        journal = self.journal
        assert journal is not None
        for task_id in [t for t, ws in self._waiters.items() if any(w[2] <= now for w in ws)]:
            waiters = self._waiters[task_id]
            due = [w for w in waiters if w[2] <= now]
            keep = [w for w in waiters if w[2] > now]
            if keep:
                self._waiters[task_id] = keep
            else:
                del self._waiters[task_id]
            self._waiter_count -= len(due)
            record = journal.get(task_id)
            for identity, rid, _ in due:
                if record is None:
                    self._refuse(identity, rid, zbc.E_NOT_FOUND, f"no task {task_id!r}")
                else:
                    self._answer(identity, rid, record)

    # ------------------------------------------------- state transitions

    def _history(self, record: TaskRecord, *entry: Any) -> None:
        history = record.history
        history.append(list(entry))
        if len(history) > self.settings.history_limit:
            del history[0]

    def _store(
        self,
        record: TaskRecord,
        old: TaskState | None,
        service: Service | None = None,
        payload: tuple[bytes, ...] | None = None,
    ) -> None:
        """Write `record` (now in its new state) and keep the service's counters and
        window in step. A READY task leaving READY must already be out of the window."""
        assert self.journal is not None
        new = record.state
        if service is None:
            service = self._service(record.service.encode())
        if old is READY:
            service.ready_count -= 1
        if old in WAITING:
            service.waiting_count -= 1
        self.journal.put(record, payload)
        if new in WAITING:
            service.waiting_count += 1
            if new is READY:
                service.ready_count += 1
                if payload is not None and sum(map(len, payload)) <= _MEMO_PAYLOAD_BYTES:
                    # Goes with the record if the window keeps it: delivered from memory.
                    record.frames_memo = payload
                self._window_insert(service, record)

    def _window_insert(self, service: Service, record: TaskRecord) -> None:
        window = service.window
        entry = (record.priority, -record.seq, record.id)
        # The window must stay the top len(window) READY tasks: take a task in if
        # every READY task is in the window, or if it beats the window's worst.
        if len(window) + 1 == service.ready_count or (window and entry > window[0]):
            bisect.insort(window, entry)
            service.records[record.id] = record
            if len(window) > self.settings.window_per_service:
                del service.records[window[0][2]]
                del window[0]

    def _unwindow(self, service: Service, task_id: str) -> None:
        if service.records.pop(task_id, None) is None:
            return  # not in the window
        window = service.window
        for i in range(len(window) - 1, -1, -1):
            if window[i][2] == task_id:
                del window[i]
                return

    def _refill(self, service: Service) -> None:
        assert self.journal is not None
        window = service.window
        limit = self.settings.window_per_service - len(window)
        after = None if not window else (window[0][0], -window[0][1])
        records = self.journal.ready(service.name.decode(), limit, after)
        window[0:0] = [(r.priority, -r.seq, r.id) for r in reversed(records)]
        service.records.update((r.id, r) for r in records)

    def _next_task(self, service: Service, now: float) -> TaskRecord | None:
        """Take the best READY task of `service` out of its queue (the caller delivers it)."""
        journal = self.journal
        assert journal is not None
        window = service.window
        while service.ready_count > 0:
            if not window:
                self._refill(service)
                if not window:
                    log.error("%s: ready count out of step with the journal", service.name)
                    service.ready_count = 0
                    return None
            task_id = window.pop()[2]
            record = service.records.pop(task_id, None) or journal.get(task_id)
            if record is None or record.state is not READY:
                log.error("task %s in the ready window is not ready: skipped", task_id)
                continue
            epoch = now + self._epoch_offset
            if record.expires_at is not None and record.expires_at <= epoch:
                self.stats.tasks_expired += 1
                self._history(record, "expired", epoch)
                self._finish(record, EXPIRED, epoch, "its ttl passed before it started")
                continue
            return record
        return None

    def _start_attempt(self, record: TaskRecord, worker: Worker, now: float) -> Request:
        """Write `record` as delivered to `worker`; the attempt to hand over."""
        epoch = now + self._epoch_offset
        figures = worker.service.figures
        if record.attempt == 0:
            figures.observe_wait(max(0.0, epoch - max(record.created_at, record.not_before)))
            # ttl_s bounds the wait for a first start: once started, a task no longer
            # expires (a retry, or a take-back from a dead worker, runs).
            record.expires_at = None
        else:
            figures.redeliveries += 1
        record.attempt += 1
        record.state = INFLIGHT
        worker_hex = worker.identity.hex()
        self._history(record, "attempt", epoch, record.attempt, worker_hex)
        self._store(record, READY, worker.service)
        assert self.journal is not None
        request = Request(0, b"\0" + record.id.encode(), worker.service.name, (), now)
        request.tid = record.id
        request.task = record
        request.attempt = record.attempt
        body = record.frames_memo
        if body is None:
            body = tuple(self.journal.payload(record.id) or ())
        else:
            record.frames_memo = None  # the request holds it from here
        request.body = body
        if record.timeout_s is not None:
            request.deadline = now + record.timeout_s
            if request.deadline < self.next_tick_at:
                self.next_tick_at = request.deadline
        self._holders[record.id] = worker
        if self.event_prefixes:
            # `_add_events` inline (as in _task_done): calling it per event cost about
            # 2,400 instructions more (bench/instructions.py --shape events: 264,352
            # against 259,425 per task)
            topic = self._started_topics.get(record.service, "")
            if topic == "":
                topic = self._task_topic(self._started_topics, "task.started.", record.service)
            if topic is not None:
                row = (record.id, record.attempt, worker_hex)
                events = self.events
                if events and events[-1][0] is topic and len(events[-1][2]) < MAX_BATCH_EVENTS:
                    events[-1][2].append(row)
                else:
                    events.append((topic, STARTED_FIELDS, [row]))
        return request

    def _record_progress(self, request: Request, data: tuple[bytes, ...], now: float) -> None:
        """PROGRESS goes into the task's history (with up to 200 bytes of its first frame)."""
        record = request.task
        assert record is not None
        note = data[0][:200].decode(errors="replace") if data else ""
        self._history(record, "progress", now + self._epoch_offset, request.attempt, note)
        self._store(record, INFLIGHT)

    def _task_done(self, request: Request, body: tuple[bytes, ...], now: float) -> None:
        record = request.task
        assert record is not None and self.journal is not None
        epoch = now + self._epoch_offset
        self.stats.tasks_done += 1
        figures = self._service(request.service).figures
        figures.done += 1
        figures.observe_run(max(0.0, now - request.enqueued_at))
        self._history(record, "done", epoch, request.attempt)
        record.error = None
        if self.event_prefixes:
            topic = self._done_topics.get(record.service, "")
            if topic == "":
                topic = self._task_topic(self._done_topics, "task.done.", record.service)
            if topic is not None:
                row = (record.id, request.attempt, record.headers)
                events = self.events
                if events and events[-1][0] is topic and len(events[-1][2]) < MAX_BATCH_EVENTS:
                    events[-1][2].append(row)
                else:
                    events.append((topic, DONE_FIELDS, [row]))
        self._finish(record, DONE, epoch, None, body)

    def _finish(
        self,
        record: TaskRecord,
        state: TaskState,
        epoch: float,
        error: str | None,
        result: tuple[bytes, ...] | None = None,
    ) -> None:
        """A final state other than DEAD: kept (with its result) for retention_s."""
        assert self.journal is not None
        old = record.state
        if old is READY:
            self._unwindow(self._service(record.service.encode()), record.id)
        record.state = state
        if error is not None:
            record.error = error
        record.finished_at = epoch
        record.keep_until = epoch + self.settings.retention_s
        if state is not DONE and self.event_prefixes:
            kind = "cancelled" if state is CANCELLED else "expired"
            self._emit(f"task.{kind}.{record.service}", {"id": record.id, "was": STATE_NAMES[old]})
        if self.settings.retention_s > 0:
            self._store(record, old)
            if result is not None:
                self.journal.put_result(record.id, result)
        else:
            self._store(record, old)  # keep the counters right, then forget it
            self.journal.delete(record.id)
        self._notify(record, result)

    def _end_attempt(
        self,
        record: TaskRecord,
        reason: str,
        epoch: float,
        now: float,
        delay_s: float | None,
        final: bool = False,
    ) -> None:
        """An attempt ended without DONE: retry (after `delay_s`; None: backoff) or
        dead-letter (no attempts left, or `final`: the worker said no retry can succeed)."""
        old = record.state
        record.error = reason
        dead = final or record.attempt >= record.max_attempts
        figures = self._service(record.service.encode()).figures
        figures.failed += 1
        figures.dead += dead
        if self.event_prefixes:
            self._emit(
                "task.failed." + record.service,
                {"id": record.id, "attempt": record.attempt, "reason": reason, "retry": not dead},
            )
        if dead:
            self.stats.tasks_dead += 1
            log.warning(
                "task %s of %s dead after %d attempt(s): %s",
                record.id,
                record.service,
                record.attempt,
                reason,
            )
            record.state = DEAD
            record.finished_at = epoch
            record.keep_until = None
            self._history(record, "dead", epoch, reason)
            self._store(record, old)
            self._notify(record)
            if self.event_prefixes:
                self._emit(
                    "task.dead." + record.service,
                    {"id": record.id, "attempt": record.attempt, "reason": reason},
                )
            return
        self.stats.tasks_retried += 1
        if delay_s is None:
            delay_s = backoff_s(self.settings, record.attempt, self._rng)
        if delay_s > 0:
            record.state = DELAYED
            record.not_before = epoch + delay_s
            self._history(record, "retry", epoch, reason, round(delay_s, 3))
            self._store(record, old)
            self._schedule_at(now + delay_s)
        else:
            record.state = READY
            self._history(record, "requeued", epoch, reason)
            self._store(record, old)

    def _take_back(
        self,
        request: Request,
        reason: str,
        now: float,
        delay_s: float | None,
        final: bool = False,
    ) -> None:
        """The broker no longer lets a worker hold this durable attempt (already released)."""
        assert request.task is not None
        self._end_attempt(request.task, reason, now + self._epoch_offset, now, delay_s, final)

    # ------------------------------------------------------------ timers

    def _schedule_at(self, when: float) -> None:
        if when < self._next_due_at:
            self._next_due_at = when
        if when < self.next_tick_at:
            self.next_tick_at = when

    def _schedule_due(self, now: float) -> None:
        assert self.journal is not None
        due = self.journal.next_due_at()
        self._next_due_at = math.inf
        if due is not None:
            self._schedule_at(now + max(0.0, due - (now + self._epoch_offset)))

    def _durable_tick(self, now: float) -> None:
        journal = self.journal
        if journal is None:
            return
        epoch = now + self._epoch_offset
        touched: set[bytes] = set()
        if self._next_due_at <= now:
            records = journal.due(epoch, TIMER_BATCH)
            for record in records:
                record.state = READY
                self._history(record, "due", epoch)
                service = self._service(record.service.encode())
                self._store(record, DELAYED, service)
                touched.add(service.name)
            self._schedule_due(now)
            if len(records) == TIMER_BATCH:
                self._schedule_at(now)  # more are due: next pass
        lapsed = journal.lapsed(epoch, TIMER_BATCH)
        for record in lapsed:
            if record.state in FINAL:
                journal.delete(record.id)
            else:
                self.stats.tasks_expired += 1
                self._history(record, "expired", epoch)
                self._finish(record, EXPIRED, epoch, "its ttl passed before it started")
        if len(lapsed) == TIMER_BATCH and now < self.next_tick_at:
            # More have lapsed: the next pass ticks again, so retention keeps up with
            # any rate of finished tasks (a batch per tick interval would cap it).
            self.next_tick_at = now
        if self._waiter_count:
            self._expire_waits(now)
        for service in self.services.values():
            service.figures.snapshot(now)
        for figures in self.kept_figures.values():
            figures.snapshot(now)
        for name in touched:
            woken = self.services.get(name)
            if woken is not None and woken.ready:
                self._dispatch(woken, now)

    def _check_deadlines(self, worker: Worker, now: float) -> None:
        """Attempts of `worker` past their task's timeout_s fail (and retry or die)."""
        late = [r for r in worker.tasks.values() if r.deadline and r.deadline <= now]
        for request in late:
            assert request.task is not None
            self.stats.tasks_timed_out += 1
            timeout = request.task.timeout_s or 0.0
            reason = f"attempt {request.attempt} timed out after {timeout:g}s"
            self._release(worker, request)
            if worker.dialect is WorkerDialect.ZBW:
                self.outbox.append([worker.identity, *ext.cancel(request.tid, request.attempt)])
                self._take_back(request, reason, now, None)
            else:
                self._take_back(request, reason, now, None)
                self._kick(worker, now, f"task {request.tid} timed out")
                return
        if late:
            self._dispatch(worker.service, now)
