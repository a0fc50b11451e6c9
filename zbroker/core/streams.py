"""Stream calls (STREAM, READ): who reads which task's chunks, and what each may be sent.

A task's stream lives in the journal (written by DurableTasks, which owns every
task); this part owns the calls that read streams (docs/protocol.md §13).

Rules it keeps:
  1. A call is sent its task's chunks in offset order, each at most once, read
     from the journal: only what the pass writes is ever sent, and the runtime
     sends the outbox after the pass's commit, so a chunk a reader saw survives
     a crash. With `current_only`, chunks of attempts older than the task's
     current one are skipped.
  2. Flow control: a call is sent at most `window` chunks, and at most
     STREAM_UNCREDITED_BYTES of chunk data (one chunk always goes), beyond what
     its MOREs credited. The rest waits in the journal, so a reader that does
     not read costs no memory here.
  3. A call ends exactly once: with the final REPLY once its task has ended and
     it was sent every chunk; with a REPLY of the task's state now when it was
     idle for `wait_s` (nothing sent, no MORE, and nothing waiting for its
     credit: a call behind its stream never ends early); with ERROR not_found when its
     task is gone; or silently, when it is closed or its connection goes (the
     caller then decides what `cancel_on_abandon` asks).
  4. Calls are capped like waiting calls (the same settings), counted apart:
     broker-wide, per connection and per principal.
It reads the journal (records, chunks, results), never writes it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from zbroker.core.lifecycle import FINAL
from zbroker.core.model import Stats
from zbroker.core.settings import CoreSettings
from zbroker.core.sink import Outputs
from zbroker.core.waiters import outcome
from zbroker.journal.base import Journal, TaskRecord
from zbroker.protocol import zbc
from zbroker.protocol.limits import STREAM_CHUNKS_PER_MESSAGE, STREAM_UNCREDITED_BYTES

# The record of a task by id (the live one while an attempt runs), or None.
RecordOf = Callable[[str], TaskRecord | None]
# Answers a call with an ERROR: (client, rid, code, message).
Refuse = Callable[[bytes, int, str, str], None]


class StreamCall:
    """One STREAM or READ call: where it is in its task's stream, and its credit."""

    __slots__ = (
        "cancel_on_abandon",
        "current_only",
        "deadline",
        "identity",
        "idle_s",
        "next",
        "principal",
        "rid",
        "sent",
        "sent_bytes",
        "task_id",
        "window",
    )

    def __init__(
        self,
        identity: bytes,
        rid: int,
        task_id: str,
        offset: int,
        follow: zbc.Follow,
        idle_s: float,
        principal: str | None,
        now: float,
    ) -> None:
        self.identity = identity
        self.rid = rid
        self.task_id = task_id
        self.next = offset  # the offset of the next chunk this call may be sent
        self.window = follow.window
        self.current_only = follow.current_only
        self.cancel_on_abandon = follow.cancel_on_abandon
        self.principal = principal
        self.idle_s = idle_s
        self.deadline = now + idle_s  # ends with the state now unless sent something by then
        # Sizes of the chunks sent and not credited yet, oldest first, and their sum.
        self.sent: deque[int] = deque()
        self.sent_bytes = 0


class TaskStreams:
    """Task id -> the stream calls reading it; (connection, rid) -> call."""

    __slots__ = (
        "_by_call",
        "_by_peer",
        "_by_principal",
        "_by_task",
        "_journal",
        "_next_deadline",
        "_out",
        "_record_of",
        "_settings",
        "_stats",
        "count",
    )

    def __init__(
        self,
        settings: CoreSettings,
        stats: Stats,
        out: Outputs,
        journal: Journal | None,
        record_of: RecordOf,
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._out = out
        self._journal = journal
        self._record_of = record_of
        self._by_task: dict[str, list[StreamCall]] = {}
        self._by_call: dict[tuple[bytes, int], StreamCall] = {}
        self._by_peer: dict[bytes, int] = {}
        self._by_principal: dict[str, int] = {}
        # No call's deadline is earlier than this (deadlines only move later).
        self._next_deadline = math.inf
        self.count = 0  # calls open, broker-wide

    # ------------------------------------------------------------ calls

    def full(self, identity: bytes, principal: str | None) -> str | None:
        """Why a stream call from `identity` (of `principal`) may not open now, or None."""
        settings = self._settings
        if self.count >= settings.max_waiters:
            return f"too many stream calls open ({settings.max_waiters}, broker-wide)"
        held = self._by_peer.get(identity, 0)
        cap = settings.max_waiters_per_peer
        if held >= cap:
            return f"too many stream calls open from this connection ({held}, cap {cap})"
        if principal is not None:
            mine = self._by_principal.get(principal, 0)
            cap = settings.max_waiters_per_principal
            if mine >= cap:
                return f"too many stream calls open from principal {principal} ({mine}, cap {cap})"
        return None

    def open(
        self,
        identity: bytes,
        rid: int,
        record: TaskRecord,
        offset: int,
        wait_s: float | None,
        follow: zbc.Follow,
        principal: str | None,
        now: float,
    ) -> None:
        """Start a call on `record`'s stream from `offset` (the caller checked `full`),
        and send it what there is. A call with the same rid on the same connection
        replaces the older one, which ends silently."""
        idle_s = self._settings.request_wait_s if wait_s is None else wait_s
        call = StreamCall(identity, rid, record.id, offset, follow, idle_s, principal, now)
        self.close(identity, rid)
        self._by_call[(identity, rid)] = call
        self._by_task.setdefault(record.id, []).append(call)
        self._by_peer[identity] = self._by_peer.get(identity, 0) + 1
        if principal is not None:
            self._by_principal[principal] = self._by_principal.get(principal, 0) + 1
        self.count += 1
        if call.deadline < self._next_deadline:
            self._next_deadline = call.deadline
        self._pump(call, record, now, None)

    def more(self, identity: bytes, msg: zbc.More, now: float) -> None:
        """MORE: the client consumed `credit` chunks; send it what that makes room for."""
        call = self._by_call.get((identity, msg.rid))
        if call is None:
            return  # the call ended meanwhile
        sent = call.sent
        for _ in range(min(msg.credit, len(sent))):
            call.sent_bytes -= sent.popleft()
        call.deadline = now + call.idle_s  # the reader is there
        record = self._record_of(call.task_id)
        if record is None:
            self._gone(call)
        else:
            self._pump(call, record, now, None)

    def close(self, identity: bytes, rid: int) -> StreamCall | None:
        """CLOSE: the call ends without another word; the call, or None if none was open."""
        call = self._by_call.get((identity, rid))
        if call is not None:
            self._remove(call)
        return call

    def forget_peer(self, identity: bytes) -> list[StreamCall]:
        """Every call of a connection that is gone ends without a word; those calls."""
        if identity not in self._by_peer:
            return []
        calls = [c for (peer, _), c in self._by_call.items() if peer == identity]
        for call in calls:
            self._remove(call)
        return calls

    # ------------------------------------------------- what the task does

    def appended(
        self,
        record: TaskRecord,
        offset: int,
        attempt: int,
        data: tuple[bytes, ...],
        now: float,
    ) -> None:
        """`record`'s stream grew by `data` (of `attempt`) at `offset`; record.stream_chunks
        is its new length. A call that had every chunk before and has room for these
        is sent them as they are (the common case of a reader keeping up: no read
        of the journal); any other call catches up from the journal."""
        calls = self._by_task.get(record.id)
        if not calls:
            return
        size = sum(map(len, data))
        n = len(data)
        for call in calls:
            if (
                call.next == offset
                and len(call.sent) + n <= call.window
                and call.sent_bytes + size <= STREAM_UNCREDITED_BYTES
                and n <= STREAM_CHUNKS_PER_MESSAGE
                and not (call.current_only and attempt < record.attempt)
            ):
                self._send(call, offset, attempt, list(data))
                call.next = offset + n
                call.deadline = now + call.idle_s
            else:
                self._pump(call, record, now, None)

    def ended(self, record: TaskRecord, result: tuple[bytes, ...] | None, now: float) -> None:
        """`record` reached a final state: calls that have every chunk get their end."""
        calls = self._by_task.get(record.id)
        if calls:
            for call in list(calls):
                self._pump(call, record, now, result)

    # ------------------------------------------------------------ timers

    def expire(self, now: float, refuse: Refuse) -> None:
        """Calls that were sent nothing for their idle time end with the state now."""
        if now < self._next_deadline:
            return
        due = [c for c in self._by_call.values() if c.deadline <= now]
        for call in due:
            record = self._record_of(call.task_id)
            if record is not None and call.next < record.stream_chunks:
                # Not idle: chunks wait for the reader's credit. The call lives on (a
                # connection that goes ends it), and the end never jumps ahead of them.
                call.deadline = now + call.idle_s
                continue
            self._remove(call)
            if record is None:
                refuse(call.identity, call.rid, zbc.E_NOT_FOUND, f"no task {call.task_id!r}")
            else:
                self._answer(call, record, None)
        self._next_deadline = min((c.deadline for c in self._by_call.values()), default=math.inf)

    # ------------------------------------------------------------ sending

    def _pump(
        self, call: StreamCall, record: TaskRecord, now: float, result: tuple[bytes, ...] | None
    ) -> None:
        """Send `call` what its credit allows of `record`'s stream; its end if it has all."""
        journal = self._journal
        assert journal is not None
        window = call.window
        current = record.attempt if call.current_only else 0
        length = record.stream_chunks
        while call.next < length:
            sent = call.sent
            room = window - len(sent)
            if room <= 0 or (sent and call.sent_bytes >= STREAM_UNCREDITED_BYTES):
                return  # the rest waits for a MORE
            entries = journal.chunks(
                call.task_id,
                call.next,
                min(room, STREAM_CHUNKS_PER_MESSAGE),
                max(1, STREAM_UNCREDITED_BYTES - call.sent_bytes),
            )
            if not entries:
                break  # shorter than the record says: the journal is the truth
            offset = call.next
            run_attempt = 0
            run: list[bytes] = []
            run_offset = offset
            for attempt, data in entries:
                if attempt < current:
                    if run:
                        self._send(call, run_offset, run_attempt, run)
                        run = []
                    offset += 1
                    continue
                if run and attempt != run_attempt:
                    self._send(call, run_offset, run_attempt, run)
                    run = []
                if not run:
                    run_offset, run_attempt = offset, attempt
                run.append(data)
                offset += 1
            if run:
                self._send(call, run_offset, run_attempt, run)
            call.next = offset
            call.deadline = now + call.idle_s
        if record.state in FINAL:
            self._remove(call)
            self._answer(call, record, result)

    def _send(self, call: StreamCall, offset: int, attempt: int, run: list[bytes]) -> None:
        message = zbc.chunks(call.rid, call.task_id, offset, attempt, run)
        self._out.outbox.append([call.identity, *message])
        sizes = [len(data) for data in run]
        call.sent.extend(sizes)
        call.sent_bytes += sum(sizes)
        self._stats.chunks_sent += len(run)

    def _answer(
        self, call: StreamCall, record: TaskRecord, result: tuple[bytes, ...] | None
    ) -> None:
        """The call's last answer: the task's state (its result, or its error) and `next`."""
        fields, frames = outcome(record, self._journal, result)
        fields["next"] = record.stream_chunks
        self._out.outbox.append([call.identity, *zbc.reply(call.rid, fields, frames)])

    def _gone(self, call: StreamCall) -> None:
        """The call's task no longer exists (its record lapsed): ERROR not_found."""
        self._remove(call)
        self._out.outbox.append(
            [call.identity, *zbc.error(call.rid, zbc.E_NOT_FOUND, f"no task {call.task_id!r}")]
        )
        self._stats.calls_refused += 1

    def _remove(self, call: StreamCall) -> None:
        del self._by_call[(call.identity, call.rid)]
        calls = self._by_task[call.task_id]
        calls.remove(call)
        if not calls:
            del self._by_task[call.task_id]
        left = self._by_peer[call.identity] - 1
        if left:
            self._by_peer[call.identity] = left
        else:
            del self._by_peer[call.identity]
        principal = call.principal
        if principal is not None:
            left = self._by_principal[principal] - 1
            if left:
                self._by_principal[principal] = left
            else:
                del self._by_principal[principal]
        self.count -= 1
