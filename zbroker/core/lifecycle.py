"""The task lifecycle as data: which event moves a durable task from which state to which.

Rules it keeps:
  1. A task is in exactly one state at a time; only the transitions in
     TRANSITIONS exist. Asking for any other one is a bug of the core, not of a
     peer: `next_state` raises IllegalTransition (a local error) and tests catch it.
  2. The table is the only place that says where an event leads.
     `DurableTasks.apply` (core/tasks.py) is the only function that moves a task:
     it looks the move up here and keeps everything that follows from it in step.
  3. docs/architecture.md draws this table with `mermaid()`; a test fails when
     the drawing and the table differ.
It holds no state and never does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from zbroker.journal.base import TaskState

READY = TaskState.READY
DELAYED = TaskState.DELAYED
INFLIGHT = TaskState.INFLIGHT
DONE = TaskState.DONE
DEAD = TaskState.DEAD
CANCELLED = TaskState.CANCELLED
EXPIRED = TaskState.EXPIRED
BLOCKED = TaskState.BLOCKED
UPSTREAM_FAILED = TaskState.UPSTREAM_FAILED

# Kept for `retention_s`, then forgotten (dead letters: until redriven or dropped).
FINAL = frozenset({DONE, DEAD, CANCELLED, EXPIRED, UPSTREAM_FAILED})
# Waiting (for a worker, a time, or dependencies): what a service's queue cap counts.
WAITING = frozenset({READY, DELAYED, BLOCKED})
# Not yet finished: what a principal's task quota counts (--max-tasks-per-principal).
LIVE = frozenset({READY, DELAYED, BLOCKED, INFLIGHT})

# Each state as the wire names it (zbroker.protocol.states).
STATE_NAMES = {state: str(state.wire) for state in TaskState}


class TaskEvent(enum.Enum):
    """What happens to a task. The value is the word its history entry starts with."""

    ENQUEUE = "enqueued"  # a client's ENQUEUE stored it, due now
    ENQUEUE_DELAYED = "enqueued later"  # stored with a delay or a not_before
    ENQUEUE_BLOCKED = "enqueued blocked"  # stored with dependencies (depends_on)
    UNBLOCK = "unblocked"  # every dependency ended (done, or run_anyway): due now
    UNBLOCK_DELAYED = "unblocked later"  # likewise, but its delay is not over
    UPSTREAM_FAIL = "upstream failed"  # a dependency ended without done
    START = "attempt"  # handed to a worker: an attempt begins
    PROGRESS = "progress"  # the worker reported progress on the attempt
    COMPLETE = "done"  # the worker's DONE (or MDP REPLY)
    REQUEUE = "requeued"  # the attempt ended without DONE; runs again at once
    RETRY_LATER = "retry"  # the attempt ended without DONE; runs again after a backoff
    DEAD_LETTER = "dead"  # the attempt ended without DONE and no attempt is left
    RECOVER = "recovered"  # found in flight when the broker started: runs again, uncharged
    DUE = "due"  # its delay is over
    EXPIRE = "expired"  # its ttl_s passed before it started
    CANCEL = "cancelled"  # a client cancelled it
    PURGE = "purged"  # an operator purged its queue
    REDRIVE = "redriven"  # an operator sent a dead letter back to its queue
    FORGET = "forgotten"  # its retention ended, or an operator dropped the dead letter


@dataclass(frozen=True, slots=True)
class Transition:
    """`event` moves a task in any of `sources` (None: not stored yet) to `target`
    (None: deleted from the journal), counted in the Stats field `counter`.
    The core passes these objects, not events, to `DurableTasks.apply`: checking
    one is a tuple scan by identity, cheaper than a table lookup per task."""

    event: TaskEvent
    sources: tuple[TaskState | None, ...]
    target: TaskState | None
    counter: str | None = None
    # Whether the move is only held by the journal (Journal.hold: kept in memory, lost
    # by a crash) instead of written: a START, fenced across crashes by the journal's
    # `crashes` (core/tasks.py `fence`), not by a write.
    held: bool = False
    # The word the task's history entry starts with (a delayed or blocked enqueue is
    # still "enqueued": one word for one moment).
    history: str = field(init=False)
    # Whether the task ends here: a result kept, waiters answered.
    final: bool = field(init=False)

    def __post_init__(self) -> None:
        word = {
            TaskEvent.ENQUEUE_DELAYED: "enqueued",
            TaskEvent.ENQUEUE_BLOCKED: "enqueued",
            TaskEvent.UNBLOCK_DELAYED: "unblocked",
        }.get(self.event, self.event.value)
        object.__setattr__(self, "history", word)
        object.__setattr__(self, "final", self.target in FINAL)


E = TaskEvent
ENQUEUE = Transition(E.ENQUEUE, (None,), READY)
ENQUEUE_DELAYED = Transition(E.ENQUEUE_DELAYED, (None,), DELAYED)
ENQUEUE_BLOCKED = Transition(E.ENQUEUE_BLOCKED, (None,), BLOCKED)
UNBLOCK = Transition(E.UNBLOCK, (BLOCKED,), READY)
UNBLOCK_DELAYED = Transition(E.UNBLOCK_DELAYED, (BLOCKED,), DELAYED)
UPSTREAM_FAIL = Transition(E.UPSTREAM_FAIL, (BLOCKED,), UPSTREAM_FAILED, "tasks_upstream_failed")
DUE = Transition(E.DUE, (DELAYED,), READY)
START = Transition(E.START, (READY,), INFLIGHT, held=True)
PROGRESS = Transition(E.PROGRESS, (INFLIGHT,), INFLIGHT)
RECOVER = Transition(E.RECOVER, (INFLIGHT,), READY, "tasks_recovered")
COMPLETE = Transition(E.COMPLETE, (INFLIGHT,), DONE, "tasks_done")
REQUEUE = Transition(E.REQUEUE, (INFLIGHT,), READY, "tasks_retried")
RETRY_LATER = Transition(E.RETRY_LATER, (INFLIGHT,), DELAYED, "tasks_retried")
DEAD_LETTER = Transition(E.DEAD_LETTER, (INFLIGHT,), DEAD, "tasks_dead")
EXPIRE = Transition(E.EXPIRE, (READY, DELAYED, BLOCKED), EXPIRED, "tasks_expired")
CANCEL = Transition(E.CANCEL, (READY, DELAYED, BLOCKED, INFLIGHT), CANCELLED, "tasks_cancelled")
PURGE = Transition(E.PURGE, (READY, DELAYED, BLOCKED), CANCELLED, "tasks_cancelled")
REDRIVE = Transition(E.REDRIVE, (DEAD,), READY, "tasks_redriven")
FORGET = Transition(E.FORGET, (DONE, CANCELLED, EXPIRED, UPSTREAM_FAILED, DEAD), None)
del E

# The lifecycle: every transition there is, one per event.
TRANSITIONS: tuple[Transition, ...] = (
    ENQUEUE,
    ENQUEUE_DELAYED,
    ENQUEUE_BLOCKED,
    UNBLOCK,
    UNBLOCK_DELAYED,
    UPSTREAM_FAIL,
    DUE,
    START,
    PROGRESS,
    RECOVER,
    COMPLETE,
    REQUEUE,
    RETRY_LATER,
    DEAD_LETTER,
    EXPIRE,
    CANCEL,
    PURGE,
    REDRIVE,
    FORGET,
)

# (state, event) -> the transition: the table as `next_state` reads it.
TABLE: dict[tuple[TaskState | None, TaskEvent], Transition] = {
    (source, t.event): t for t in TRANSITIONS for source in t.sources
}


class IllegalTransition(Exception):
    """Raised when the core asks to move a task by an event its state does not allow:
    a bug in the core (a local error), never something a peer can cause."""

    def __init__(self, state: TaskState | None, event: TaskEvent) -> None:
        name = "new" if state is None else STATE_NAMES[state]
        super().__init__(f"a {name} task cannot be {event.name}")
        self.state = state
        self.event = event


def next_state(state: TaskState | None, event: TaskEvent) -> Transition:
    """The transition `event` makes from `state`; IllegalTransition if there is none."""
    transition = TABLE.get((state, event))
    if transition is None:
        raise IllegalTransition(state, event)
    return transition


def mermaid() -> str:
    """The table as a Mermaid state diagram."""
    lines = ["stateDiagram-v2"]
    for t in TRANSITIONS:
        for source in t.sources:
            a = "[*]" if source is None else STATE_NAMES[source]
            b = "[*]" if t.target is None else STATE_NAMES[t.target]
            lines.append(f"    {a} --> {b}: {t.event.name}")
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """The table as docs/architecture.md shows it: the diagram, then one row per
    transition (tests/unit/test_lifecycle.py fails when the page differs)."""
    rows = [
        "| event | from | to | history entry | counter |",
        "|---|---|---|---|---|",
    ]
    for t in TRANSITIONS:
        sources = ", ".join("(new)" if s is None else STATE_NAMES[s] for s in t.sources)
        target = "(deleted)" if t.target is None else STATE_NAMES[t.target]
        counter = f"`{t.counter}`" if t.counter else ""
        rows.append(f"| {t.event.name} | {sources} | {target} | `{t.history}` | {counter} |")
    return "```mermaid\n" + mermaid() + "```\n\n" + "\n".join(rows) + "\n"
