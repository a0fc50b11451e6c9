"""Task graphs: tasks that wait for other tasks to end (docs/protocol.md §15).

Rules it keeps:
  1. A task with `depends_on` is stored BLOCKED, with `blocked_on` counting the
     dependencies that have not ended, and an edge (journal `add_dependent`) from
     each of them to it. Dependencies must be stored before it (ids, or idempotency
     keys of any service): a graph is acyclic by construction, and a name that
     finds no task is refused at enqueue, nothing stored.
  2. When a task ends (any final state), each task waiting for it is settled in
     the same pass: a dependency that ended without `done` ends it UPSTREAM_FAILED
     (unless it asked to `run_anyway`); the last dependency to end makes it READY
     (or DELAYED while its own delay runs), with its dependencies' results handed
     over as its input when it asked for them. Then the edges go.
  3. Settling is a worklist, not a recursion: a chain of any length fails or
     unblocks in one pass without deepening the stack.
  4. Nothing costs a task without dependencies anything but one integer test at
     its end (`edges`: how many edges the journal holds).
It moves tasks only through `DurableTasks.apply`; it never answers a peer.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from zbroker.core import lifecycle
from zbroker.core.lifecycle import BLOCKED, DONE, FINAL, STATE_NAMES, Transition
from zbroker.core.model import Service
from zbroker.core.services import ServiceDirectory
from zbroker.core.settings import CoreSettings
from zbroker.core.sink import EventSink
from zbroker.journal.base import Journal, TaskRecord
from zbroker.protocol import zbc

log = logging.getLogger("zbroker.core")

# Dependents read at once when a task ends: all of them (a task's fan-out is bounded
# by the queue caps, and each is settled in this pass).
_ALL = 1 << 62

# DurableTasks.apply(record, move, epoch, service, payload, result, detail, new_record)
Apply = Callable[..., None]


class Refusal(Exception):
    """An enqueue's dependencies cannot be accepted: (code, message) for its ERROR."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TaskGraph:
    """The edges between tasks, and what follows when a task with dependents ends."""

    def __init__(
        self,
        settings: CoreSettings,
        journal: Journal | None,
        directory: ServiceDirectory,
        sink: EventSink,
        record_of: Callable[[str], TaskRecord | None],
        apply: Apply,
        due_later: Callable[[float], None],
        unblocked: Callable[[Service, float], None],
    ) -> None:
        self._settings = settings
        self._journal = journal
        self._directory = directory
        self._sink = sink
        self._record_of = record_of
        self._apply = apply
        self._due_later = due_later  # a task became DELAYED, due at this epoch time
        self._unblocked = unblocked  # a task of this service became READY
        # Edges the journal holds: 0 means no task end needs a look at dependents.
        self.edges = journal.dependent_count() if journal is not None else 0
        # Ended tasks whose dependents are still to settle: (id, state, result, dependents).
        self._ended: deque[tuple[str, Any, tuple[bytes, ...] | None, list[str]]] = deque()
        self._settling = False

    # ------------------------------------------------------------ enqueue

    def resolve(self, refs: Sequence[zbc.DependencyRef]) -> list[TaskRecord]:
        """The records `refs` name, in order; Refusal when one names no task or a task
        twice. (Whose tasks a principal may name is the guard's rule: core/guard.py.)"""
        journal = self._journal
        assert journal is not None
        found: list[TaskRecord] = []
        seen: set[str] = set()
        for i, ref in enumerate(refs):
            if isinstance(ref, str):
                task_id: str | None = ref
                named = f"task {ref!r}"
            else:
                task_id = journal.find_key(ref[0], ref[1])
                named = f"the task of {ref[0]!r} with key {ref[1]!r}"
            record = None if task_id is None else self._record_of(task_id)
            if record is None:
                raise Refusal(
                    zbc.E_NOT_FOUND,
                    f"depends_on[{i}]: no {named} (a task may depend only on tasks stored "
                    "before it, which also rules out cycles; a finished task is known "
                    "for --retention after it ended)",
                )
            if record.id in seen:
                raise Refusal(zbc.E_BAD_REQUEST, f"depends_on names task {record.id} twice")
            seen.add(record.id)
            found.append(record)
        return found

    def attach(
        self,
        record: TaskRecord,
        deps: list[TaskRecord],
        options: zbc.TaskOptions,
        service: Service,
        payload: tuple[bytes, ...],
        epoch: float,
    ) -> None:
        """Store the new `record` BLOCKED on `deps` (from `resolve`) and settle it
        at once when none of them is still to end."""
        journal = self._journal
        assert journal is not None
        record.depends_on = tuple(d.id for d in deps)
        record.run_anyway = run_anyway = options.run_anyway
        record.input = options.input
        waiting = [d for d in deps if d.state not in FINAL]
        failed = None if run_anyway else next((d for d in deps if _failed(d)), None)
        record.blocked_on = 0 if failed is not None else len(waiting)
        self._apply(record, lifecycle.ENQUEUE_BLOCKED, epoch, service, payload, None, (), True)
        if failed is not None:
            self._upstream_failed(record, failed.id, failed.state, epoch, service)
        elif waiting:
            for dep in waiting:
                journal.add_dependent(dep.id, record.id)
            self.edges += len(waiting)
            if self._sink.prefixes:
                self._sink.emit(
                    "task.blocked." + record.service,
                    {"id": record.id, "depends_on": record.depends_on, "waiting": len(waiting)},
                )
        else:
            self._unblock(record, None, epoch, service)

    # ------------------------------------------------------------- ending

    def ended(self, record: TaskRecord, result: tuple[bytes, ...] | None, epoch: float) -> None:
        """`record` reached a final state (`result`: its frames, when done): settle
        the tasks waiting for it (called only while `edges` is not 0)."""
        journal = self._journal
        assert journal is not None
        dependents = journal.dependents(record.id, _ALL)
        if not dependents:
            return
        journal.drop_dependents(record.id)
        self.edges = max(0, self.edges - len(dependents))
        self._ended.append((record.id, record.state, result, dependents))
        if self._settling:
            return  # the loop below, further up the stack, takes it
        self._settling = True
        try:
            while self._ended:
                dep_id, state, frames, waiting = self._ended.popleft()
                for task_id in waiting:
                    self._settle(task_id, dep_id, state, frames, epoch)
        finally:
            self._settling = False

    def _settle(
        self,
        task_id: str,
        dep_id: str,
        state: Any,
        result: tuple[bytes, ...] | None,
        epoch: float,
    ) -> None:
        """Dependency `dep_id` of task `task_id` ended in `state`."""
        journal = self._journal
        assert journal is not None
        record = journal.get(task_id)
        if record is None or record.state is not BLOCKED:
            return  # cancelled, expired or failed meanwhile: nothing waits any more
        if state is not DONE and not record.run_anyway:
            self._upstream_failed(record, dep_id, state, epoch, None)
            return
        record.blocked_on = max(0, record.blocked_on - 1)
        if record.blocked_on:
            journal.put(record)
        else:
            self._unblock(record, (dep_id, result), epoch, None)

    def _upstream_failed(
        self, record: TaskRecord, dep_id: str, state: Any, epoch: float, service: Service | None
    ) -> None:
        """It will not run: `dep_id` ended in `state` (None: `record.error` says why)."""
        if state is not None:
            record.error = f"dependency {dep_id} ended {STATE_NAMES[state]}"
        record.blocked_on = 0
        self._apply(record, lifecycle.UPSTREAM_FAIL, epoch, service, None, None, (dep_id,))

    def _unblock(
        self,
        record: TaskRecord,
        last: tuple[str, tuple[bytes, ...] | None] | None,
        epoch: float,
        service: Service | None,
    ) -> None:
        """Every dependency has ended and the task runs: READY, or DELAYED while its
        own delay is not over; its input handed over first."""
        payload = None
        if record.input is not None:
            payload = self._input(record, last, epoch)
            if payload is None:
                return  # ended upstream_failed: the input could not be built
        move: Transition = lifecycle.UNBLOCK
        if record.not_before > epoch:
            move = lifecycle.UNBLOCK_DELAYED
        if service is None:
            service = self._directory.get(record.service.encode())
        self._apply(record, move, epoch, service, payload, None, ())
        if self._sink.prefixes:
            self._sink.emit(
                "task.unblocked." + record.service,
                {"id": record.id, "state": STATE_NAMES[record.state]},
            )
        if move is lifecycle.UNBLOCK_DELAYED:
            self._due_later(record.not_before)
        else:
            self._unblocked(service, epoch)

    def _input(
        self, record: TaskRecord, last: tuple[str, tuple[bytes, ...] | None] | None, epoch: float
    ) -> tuple[bytes, ...] | None:
        """The task's payload followed by its dependencies' results (option `input`);
        None (and the task ended upstream_failed) when one is no longer kept or the
        whole is over the broker's message size."""
        journal = self._journal
        assert journal is not None
        results: list[list[bytes] | None] = []
        for dep_id in record.depends_on:
            if last is not None and dep_id == last[0]:
                frames = None if last[1] is None else list(last[1])
            else:
                frames = journal.result(dep_id)
            if frames is None:
                dep = journal.get(dep_id)
                if dep is None or dep.state is DONE:
                    record.error = (
                        f"the result of dependency {dep_id} is no longer kept "
                        "(its --retention ran out, or is 0): nothing to hand over"
                    )
                    self._upstream_failed(record, dep_id, None, epoch, None)
                    return None
            results.append(frames)
        own = journal.payload(record.id) or []
        if record.input == zbc.INPUT_RESULT:
            extra = results[0] or []
        else:
            extra = [msgpack.packb(results, use_bin_type=True)]
        payload = (*own, *extra)
        size = sum(map(len, payload))
        if size > self._settings.max_message_bytes:
            record.error = (
                f"its input ({size} bytes with its dependencies' results) is over the "
                f"broker's message size ({self._settings.max_message_bytes} bytes)"
            )
            self._upstream_failed(record, record.depends_on[-1], None, epoch, None)
            return None
        return payload


def _failed(record: TaskRecord) -> bool:
    """Ended without a result."""
    return record.state is not DONE and record.state in FINAL
