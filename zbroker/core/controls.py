"""Operator controls: PURGE, REDRIVE, DROP, PAUSE, LIMIT, RATE and DRAIN.

Each control acts through the part that owns what it changes (tasks move only
through `DurableTasks.apply`, workers drain through `Routing.drain`); what an
operator sets on a service (paused, its limit) is written to the journal in the
same pass, so a restart keeps it.
"""

from __future__ import annotations

import logging
from typing import Any

from zbroker.core import lifecycle
from zbroker.core.model import Service
from zbroker.core.routing import Routing
from zbroker.core.services import ServiceDirectory
from zbroker.core.sink import Outputs
from zbroker.core.tasks import DurableTasks
from zbroker.protocol import zbc

log = logging.getLogger("zbroker.core")


class OperatorControls:
    """The admin calls that change state; each answers its caller before any delivery
    it allows goes out."""

    def __init__(
        self,
        out: Outputs,
        directory: ServiceDirectory,
        routing: Routing,
        tasks: DurableTasks,
    ) -> None:
        self._out = out
        self._directory = directory
        self._routing = routing
        self._tasks = tasks

    def purge(self, identity: bytes, msg: zbc.Purge, now: float) -> None:
        """Cancel up to MAX_BATCH waiting (blocked, ready or delayed) tasks of the service."""
        tasks = self._tasks
        records = tasks.waiting_to_purge(msg.service, now)
        epoch = tasks.epoch(now)
        purged = 0
        for listed in records:
            # Read again: purging a task may have ended the tasks waiting for it.
            record = tasks.record_of(listed.id)
            if record is None or record.state not in lifecycle.WAITING:
                continue
            record.error = "purged by an operator"
            tasks.apply(record, lifecycle.PURGE, epoch)
            purged += 1
        service = self._directory.services.get(msg.service.encode())
        more = service is not None and service.waiting_count > 0
        if purged:
            log.warning("%d waiting task(s) of %s purged", purged, msg.service)
        self._reply(identity, msg.rid, {"purged": purged, "more": more})

    def drop(self, identity: bytes, msg: zbc.Drop, now: float) -> None:
        """Delete dead letters of the service (the listed ones, or up to MAX_BATCH)."""
        tasks = self._tasks
        records = tasks.dead_letters(msg.service, msg.ids)
        epoch = tasks.epoch(now)
        for record in records:
            tasks.apply(record, lifecycle.FORGET, epoch)
        if records:
            log.warning("%d dead letter(s) of %s dropped", len(records), msg.service)
        journal = tasks.journal
        assert journal is not None
        more = msg.ids is None and bool(journal.dead(msg.service, 1))
        self._reply(identity, msg.rid, {"dropped": len(records), "more": more})

    def redrive(self, identity: bytes, msg: zbc.Redrive, now: float) -> None:
        """Dead letters of the service back to its queue, their attempts reset."""
        tasks = self._tasks
        records = tasks.dead_letters(msg.service, msg.ids)
        service = self._directory.get(msg.service.encode())
        for record in records:
            tasks.redrive(record, service, now)
        if records:
            log.info("%d dead letter(s) of %s redriven", len(records), msg.service)
        self._reply(identity, msg.rid, {"ids": [r.id for r in records]})
        if service.ready:
            self._routing.dispatch(service, now)

    def limit(self, identity: bytes, msg: zbc.Limit, now: float) -> None:
        """At most `limit` tasks and requests of the service at its workers at once, or
        (`per_key`) at most `limit` tasks of each concurrency key (core/placement.py)."""
        service = self._directory.get(msg.service.encode())
        if msg.per_key:
            service.key_limit = msg.limit
        else:
            service.limit = msg.limit
        self._keep_options(service)
        log.info(
            "service %s concurrency limit%s: %s",
            msg.service,
            " per key" if msg.per_key else "",
            msg.limit or "none",
        )
        answer = {"service": msg.service, "limit": msg.limit, "per_key": msg.per_key}
        self._reply(identity, msg.rid, answer)
        if service.ready:
            self._routing.dispatch(service, now)

    def rate(self, identity: bytes, msg: zbc.Rate, now: float) -> None:
        """At most `rate` tasks per second of the service handed out (a token bucket of
        `burst`), or (`per_key`) of each of its concurrency keys (core/placement.py)."""
        service = self._directory.get(msg.service.encode())
        service.set_rate(msg.rate, msg.burst, msg.per_key, now)
        self._keep_options(service)
        log.info(
            "service %s rate%s: %s",
            msg.service,
            " per key" if msg.per_key else "",
            f"{msg.rate:g}/s, burst {msg.burst}" if msg.rate is not None else "none",
        )
        answer = {
            "service": msg.service,
            "rate": msg.rate,
            "burst": msg.burst,
            "per_key": msg.per_key,
        }
        self._reply(identity, msg.rid, answer)
        if service.ready:
            self._routing.dispatch(service, now)

    def pause(self, identity: bytes, msg: zbc.Pause, now: float) -> None:
        """No deliveries for the service while paused (what workers hold, they finish)."""
        service = self._directory.get(msg.service.encode())
        if service.paused != msg.paused:
            service.paused = msg.paused
            self._keep_options(service)
            log.info("service %s %s", msg.service, "paused" if msg.paused else "resumed")
        self._reply(identity, msg.rid, {"service": msg.service, "paused": msg.paused})
        if not msg.paused and service.ready:
            self._routing.dispatch(service, now)

    def drain(self, identity: bytes, msg: zbc.Drain) -> None:
        """No new work for the worker (None: no such worker)."""
        worker = self._routing.find(msg.worker)
        if worker is None:
            self._tasks.refuse(identity, msg.rid, zbc.E_NOT_FOUND, f"no worker {msg.worker}")
            return
        if not worker.draining:
            self._routing.drain(worker)
            log.info(
                "worker %s (%s) draining: no new tasks, %d to finish",
                msg.worker,
                worker.service.name.decode(errors="replace"),
                len(worker.tasks),
            )
        self._reply(identity, msg.rid, {"worker": msg.worker, "tasks": len(worker.tasks)})

    def _reply(self, identity: bytes, rid: int, fields: dict[str, Any]) -> None:
        self._out.outbox.append([identity, *zbc.reply(rid, fields)])

    def _keep_options(self, service: Service) -> None:
        """Write the operator's settings of `service` to the journal (in this pass's
        commit, before the reply goes out), so a restart keeps them."""
        journal = self._tasks.journal
        if journal is None:
            return
        options: dict[str, Any] = {}
        if service.paused:
            options["paused"] = True
        if service.limit:
            options["limit"] = service.limit
        if service.key_limit:
            options["key_limit"] = service.key_limit
        if service.rate is not None:
            options["rate"] = [service.rate.rate, service.rate.burst]
        if service.key_rate is not None:
            options["key_rate"] = list(service.key_rate)
        journal.put_service_options(service.name.decode(), options)
