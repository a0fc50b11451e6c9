"""Calls waiting for a durable task to end: REQUEST, and RESULT with wait_s.

Rules it keeps:
  1. Every waiting call is answered exactly once: when its task reaches a final
     state (dead included), or with the task's state when its wait runs out.
  2. At most max_waiters calls wait broker-wide, at most max_waiters_per_peer
     from one connection and, on an authenticated broker, at most
     max_waiters_per_principal from one principal however many connections it
     opens (so no peer can take every place); the caller refuses the rest, with
     the reason `full` gives.
  3. A connection the broker could not answer (gone, or not reading) loses
     every call it has waiting: they would hold places for nobody. A client
     that is still there asks again when its call goes unanswered.
It reads the journal (a result, a record), never writes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zbroker.core.lifecycle import DONE, STATE_NAMES
from zbroker.core.sink import Outputs
from zbroker.journal.base import Journal, TaskRecord
from zbroker.protocol import zbc

# Answers a call with an ERROR: (client, rid, code, message).
Refuse = Callable[[bytes, int, str, str], None]


def outcome(
    record: TaskRecord, journal: Journal | None, frames: tuple[bytes, ...] | None = None
) -> tuple[dict[str, Any], tuple[bytes, ...]]:
    """What a call learns of a task: `{id, state, error?}`, and its result frames when
    done (`frames`, or read from the journal)."""
    fields: dict[str, Any] = {"id": record.id, "state": STATE_NAMES[record.state]}
    if record.error is not None and record.state is not DONE:
        fields["error"] = record.error
    if record.state is DONE and frames is None:
        assert journal is not None
        frames = tuple(journal.result(record.id) or ())
    return fields, frames or ()


class Waiters:
    """Task id -> the calls waiting for it to end: (client, rid, deadline)."""

    __slots__ = (
        "_by_peer",
        "_by_principal",
        "_by_task",
        "_journal",
        "_max",
        "_max_per_peer",
        "_max_per_principal",
        "_out",
        "_principal_of",
        "_tasks_of",
        "count",
    )

    def __init__(
        self,
        out: Outputs,
        journal: Journal | None,
        max_waiters: int,
        max_per_peer: int,
        max_per_principal: int = 0,
    ) -> None:
        self._out = out
        self._journal = journal
        self._max = max_waiters
        self._max_per_peer = max_per_peer
        self._max_per_principal = max_per_principal
        # Authenticated brokers: calls waiting per principal, and whose each
        # connection with calls waiting is.
        self._by_principal: dict[str, int] = {}
        self._principal_of: dict[bytes, str] = {}
        self._by_task: dict[str, list[tuple[bytes, int, float]]] = {}
        self._by_peer: dict[bytes, int] = {}  # calls waiting per connection
        # Connection -> the tasks it waits for (perhaps a few it no longer does).
        self._tasks_of: dict[bytes, set[str]] = {}
        self.count = 0  # calls waiting, broker-wide

    def full(self, identity: bytes, principal: str | None = None) -> str | None:
        """Why a call from `identity` (of `principal`) may not wait now, or None."""
        if self.count >= self._max:
            return f"too many calls waiting ({self._max}, broker-wide)"
        held = self._by_peer.get(identity, 0)
        if held >= self._max_per_peer:
            return f"too many calls waiting from this connection ({held}, cap {self._max_per_peer})"
        if principal is not None:
            mine = self._by_principal.get(principal, 0)
            if mine >= self._max_per_principal:
                return (
                    f"too many calls waiting from principal {principal} ({mine},"
                    f" cap {self._max_per_principal})"
                )
        return None

    def add(
        self, identity: bytes, rid: int, task_id: str, deadline: float, principal: str | None
    ) -> None:
        self._by_task.setdefault(task_id, []).append((identity, rid, deadline))
        self._by_peer[identity] = self._by_peer.get(identity, 0) + 1
        self._tasks_of.setdefault(identity, set()).add(task_id)
        self.count += 1
        if principal is not None:
            self._principal_of[identity] = principal
            self._by_principal[principal] = self._by_principal.get(principal, 0) + 1

    def _principal_done(self, identity: bytes, calls: int, last: bool) -> None:
        """`calls` calls of `identity` no longer wait (`last`: it has none left)."""
        principal = (
            self._principal_of.pop(identity, None) if last else self._principal_of.get(identity)
        )
        if principal is not None:
            left = self._by_principal[principal] - calls
            if left:
                self._by_principal[principal] = left
            else:
                del self._by_principal[principal]

    def _done(self, identity: bytes, task_id: str, waits_on: bool) -> None:
        """One call of `identity` for `task_id` no longer waits (`waits_on`: another
        of its calls still waits for that task)."""
        left = self._by_peer[identity] - 1
        if left:
            self._by_peer[identity] = left
            if not waits_on:
                self._tasks_of[identity].discard(task_id)
        else:
            del self._by_peer[identity]
            del self._tasks_of[identity]
        if self._principal_of:
            self._principal_done(identity, 1, not left)

    def forget_peer(self, identity: bytes) -> int:
        """Drop every call `identity` has waiting (it cannot be answered); how many."""
        tasks = self._tasks_of.pop(identity, None)
        if tasks is None:
            return 0
        dropped = self._by_peer.pop(identity)
        if self._principal_of:
            self._principal_done(identity, dropped, True)
        by_task = self._by_task
        for task_id in tasks:
            waiting = by_task.get(task_id)
            if waiting is None:
                continue
            keep = [w for w in waiting if w[0] != identity]
            if keep:
                by_task[task_id] = keep
            else:
                del by_task[task_id]
        self.count -= dropped
        return dropped

    def answer(
        self, identity: bytes, rid: int, record: TaskRecord, frames: tuple[bytes, ...] | None = None
    ) -> None:
        """The task's state (and its result, or its error) to one call."""
        fields, frames = outcome(record, self._journal, frames)
        self._out.outbox.append([identity, *zbc.reply(rid, fields, frames)])

    def notify(self, record: TaskRecord, frames: tuple[bytes, ...] | None = None) -> None:
        """The task ended: answer every call waiting for it."""
        waiting = self._by_task.pop(record.id, None)
        if waiting:
            self.count -= len(waiting)
            for identity, rid, _ in waiting:
                self._done(identity, record.id, False)
                self.answer(identity, rid, record, frames)

    def expire(self, now: float, refuse: Refuse) -> None:
        """Answer the calls whose wait ran out with their task's state now."""
        by_task = self._by_task
        for task_id in [t for t, ws in by_task.items() if any(w[2] <= now for w in ws)]:
            waiting = by_task[task_id]
            due = [w for w in waiting if w[2] <= now]
            keep = [w for w in waiting if w[2] > now]
            if keep:
                by_task[task_id] = keep
            else:
                del by_task[task_id]
            self.count -= len(due)
            assert self._journal is not None
            record = self._journal.get(task_id)
            still = {w[0] for w in keep}
            for identity, rid, _ in due:
                self._done(identity, task_id, identity in still)
                if record is None:
                    refuse(identity, rid, zbc.E_NOT_FOUND, f"no task {task_id!r}")
                else:
                    self.answer(identity, rid, record)
