"""The worker dialects, 7/MDP (MDPW01), 18/MDP (MDPW02) and zbroker's ZBW01: how
each is spoken to.

Everything that differs between them is here, as data and small methods, so the
routing decides once and frames through `worker.dialect`: what a heartbeat and a
DISCONNECT look like, whether the worker acknowledges (and so can be taken back
for not doing it), whether work can be withdrawn from it with a CANCEL, and how
a delivery is framed. It decides nothing.
"""

from __future__ import annotations

from zbroker.core.model import Held, TaskAttempt
from zbroker.protocol import ext, mdp

_EMPTY = mdp.EMPTY


class Dialect:
    """How the broker speaks to the workers of one protocol (one instance each)."""

    __slots__ = ("acknowledges", "header", "heartbeat", "value")

    def __init__(self, header: bytes, heartbeat: bytes, acknowledges: bool) -> None:
        self.header = header
        self.value = header.decode()  # the name operators see
        # Frames of a HEARTBEAT, without the routing id.
        self.heartbeat = [_EMPTY, header, heartbeat]
        # ZBW01 workers ACK each task (unacknowledged ones are taken back), hold up to
        # their credit, take TASKS and can be told to drop a task (CANCEL); MDP
        # workers do none of it, and are let go where a ZBW01 worker gets a CANCEL.
        self.acknowledges = acknowledges

    def disconnect(self, why: str) -> list[bytes]:
        """A DISCONNECT, without the routing id."""
        raise NotImplementedError

    def task(self, held: Held, service_name: str) -> list[bytes]:
        """One delivery, without the routing id."""
        raise NotImplementedError

    def cancel(self, held: Held, reason: str | None = None) -> list[bytes] | None:
        """A CANCEL of `held` (saying `reason`, if given), without the routing id; None
        where the dialect has none (the worker must then be let go to take the work)."""
        raise NotImplementedError


class MdpDialect(Dialect):
    """7/MDP workers (MDPW01): one request at a time, no ids, no acknowledgement."""

    __slots__ = ()

    def disconnect(self, why: str) -> list[bytes]:
        return [_EMPTY, mdp.MDPW01, mdp.DISCONNECT]  # 7/MDP carries no reason

    def task(self, held: Held, service_name: str) -> list[bytes]:
        return [_EMPTY, mdp.MDPW01, mdp.REQUEST, held.client, _EMPTY, *held.body]

    def cancel(self, held: Held, reason: str | None = None) -> None:
        return None  # 7/MDP cannot withdraw a request


class Mdp02Dialect(Dialect):
    """18/MDP workers (MDPW02): 7/MDP's rules, other frames. No empty frame first, a
    command byte of its own, and an answer may come in parts (PARTIAL, then FINAL)."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(mdp.MDPW02, mdp.W02_HEARTBEAT, acknowledges=False)
        self.heartbeat = mdp.worker02_heartbeat()

    def disconnect(self, why: str) -> list[bytes]:
        return mdp.worker02_disconnect()  # 18/MDP carries no reason either

    def task(self, held: Held, service_name: str) -> list[bytes]:
        return [mdp.MDPW02, mdp.W02_REQUEST, held.client, _EMPTY, *held.body]

    def cancel(self, held: Held, reason: str | None = None) -> None:
        return None  # 18/MDP cannot withdraw a request


class ZbwDialect(Dialect):
    """zbroker's ZBW01 workers: credit, task ids, attempts, ACK, DONE/FAIL, CANCEL."""

    __slots__ = ()

    def disconnect(self, why: str) -> list[bytes]:
        return ext.disconnect(why)

    def cancel(self, held: Held, reason: str | None = None) -> list[bytes]:
        return ext.cancel(held.tid, held.attempt, reason)

    def task(self, held: Held, service_name: str) -> list[bytes]:
        if type(held) is TaskAttempt:
            task = held.record
            meta = ext.task_meta(
                held.tid, held.attempt, task.service, task.headers, task.timeout_s, task.depends_on
            )
        else:
            meta = ext.task_meta(held.tid, held.attempt, service_name)
        return [_EMPTY, ext.ZBW01, ext.TASK, meta, *held.body]

    def tasks(self, chunk: list[Held], service_name: str) -> list[bytes]:
        """Several deliveries in one TASKS (at most ZBW_MAX_BATCH), without the routing id."""
        entries = []
        frames: list[bytes] = []
        for held in chunk:
            if type(held) is TaskAttempt:
                task = held.record
                entry = ext.task_entry(
                    held.tid,
                    held.attempt,
                    task.service,
                    len(held.body),
                    task.headers,
                    task.timeout_s,
                    task.depends_on,
                )
            else:
                entry = ext.task_entry(held.tid, held.attempt, service_name, len(held.body))
            entries.append(entry)
            frames.extend(held.body)
        return [*ext.tasks_header(entries), *frames]


MDP = MdpDialect(mdp.MDPW01, mdp.HEARTBEAT, acknowledges=False)
MDP02 = Mdp02Dialect()
ZBW = ZbwDialect(ext.ZBW01, ext.HEARTBEAT, acknowledges=True)

# The dialect of each worker header.
BY_HEADER: dict[bytes, Dialect] = {mdp.MDPW01: MDP, mdp.MDPW02: MDP02, ext.ZBW01: ZBW}
