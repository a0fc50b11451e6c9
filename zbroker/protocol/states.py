"""Task states as the wire names them, and which of them are final, waiting, listable.

These strings travel in ZBC01 answers (RESULT, STATUS, CANCEL), in TASKS calls,
in QUEUES fields and in lifecycle events. The journal's stored states
(zbroker.journal.TaskState) take their names from here; the clients hand this
enum to callers as it is. Pure data: nothing to import, no I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class TaskState(StrEnum):
    """Where a durable task is in its life. A str: `TaskState.DONE == "done"`."""

    READY = "ready"  # queued, waiting for a worker
    DELAYED = "delayed"  # queued, not before its `not_before` time (a delay, or a retry backoff)
    INFLIGHT = "inflight"  # delivered to a worker, which is running it
    DONE = "done"  # finished with a result (final)
    DEAD = "dead"  # failed for good: a dead letter (final; REDRIVE can bring it back)
    CANCELLED = "cancelled"  # cancelled before it finished (final)
    EXPIRED = "expired"  # its time to live ran out before a worker started it (final)
    BLOCKED = "blocked"  # stored, waiting for the tasks it depends on to end
    UPSTREAM_FAILED = "upstream_failed"  # a task it depended on ended without `done` (final)

    @property
    def final(self) -> bool:
        """True for the states a task never leaves: done, dead, cancelled, expired,
        upstream_failed (a dead letter leaves only when an operator redrives it)."""
        return self in FINAL_STATES


# A task in one of these has ended: RESULT answers at once, CANCEL is a conflict.
FINAL_STATES: Final = frozenset(
    {
        TaskState.DONE,
        TaskState.DEAD,
        TaskState.CANCELLED,
        TaskState.EXPIRED,
        TaskState.UPSTREAM_FAILED,
    }
)
# Ended without a result: a client waiting for the result raises instead.
FAILED_STATES: Final = FINAL_STATES - {TaskState.DONE}
# Waiting in the queue (for a worker, a time, or the tasks it depends on): what
# PURGE cancels and what --max-tasks counts.
WAITING_STATES: Final = frozenset({TaskState.READY, TaskState.DELAYED, TaskState.BLOCKED})
# What TASKS may list: every state.
LISTABLE_STATES: Final = tuple(TaskState)
# The per-service counts QUEUES gives, each under the state's own name.
QUEUE_COUNTS: Final = (
    TaskState.READY,
    TaskState.DELAYED,
    TaskState.BLOCKED,
    TaskState.INFLIGHT,
    TaskState.DEAD,
    TaskState.DONE,
)
