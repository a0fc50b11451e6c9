"""Guard: on an authenticated broker, every message is checked against its sender.

The runtime hands the core each message's sender, the principal name that the ZAP
handler admitted for its connection (libzmq's User-Id, which a peer cannot set).
`Broker.receive` asks the guard before any part sees the message; what the roles
allow is zbroker.protocol.access's rule, not this module's. A refusal is counted in
`forbidden` by the kind of message, and the sender hears it where its protocol
has a way: a ZBC01 call gets ERROR `forbidden`, a ZBW01 worker DISCONNECT with
the reason; Majordomo (7/MDP, 18/MDP) has no error reply, so an MDP request is
dropped and an MDP worker gets a bare DISCONNECT. MDPC02 requests are checked
as MDPC01 ones are, and an MDPW02 READY as an MDPW01 READY.

Without `--auth` the core has no guard and none of this runs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from zbroker.core.model import Stats
from zbroker.core.services import ServiceDirectory
from zbroker.journal.base import Journal
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.access import FORBIDDEN_PREFIX, Policy, Principal

# Who sends a message with no User-Id: only a connection from inside the broker's
# process can (inproc has no handshake; every TCP or IPC peer is authenticated).
INSIDE = Principal(name="zbroker", key="", roles=frozenset({"observer"}))

# ZBC01 calls that act on one task: only its owner (or an admin) may make them.
_ON_A_TASK = (zbc.Result, zbc.Status, zbc.Cancel, zbc.Read)
# Calls about the sender's own stream calls (found by its connection and rid).
_ON_OWN_CALLS = (zbc.More, zbc.Close)
# ZBC01 calls that read the broker's figures (observer), and those only admins make.
_FIGURES = (zbc.Queues, zbc.Workers, zbc.Stats)


def _foreign(
    who: Principal, refs: tuple[zbc.DependencyRef, ...], journal: Journal | None
) -> str | None:
    """The first task `refs` name that another principal enqueued (None: none does;
    a name that finds no task is the call's own not_found)."""
    if journal is None:
        return None
    for ref in refs:
        task_id = ref if isinstance(ref, str) else journal.find_key(ref[0], ref[1])
        record = None if task_id is None else journal.get(task_id)
        if record is not None and record.owner != who.name:
            return record.id
    return None


class Guard:
    """The policy, and what it refused. `sender` resolves a name to its principal."""

    def __init__(
        self, policy: Policy, stats: Stats, directory: ServiceDirectory, max_services: int
    ) -> None:
        self.policy = policy
        self._stats = stats
        self._directory = directory
        self._max_services = max_services
        self.forbidden: Counter[str] = Counter()  # by kind: call, mdp_request, worker

    def sender(self, name: str | None) -> Principal | None:
        """The principal a message came from. No User-Id: the broker's own process
        (an inproc connection, such as the metrics server's), which may observe."""
        return INSIDE if name is None else self.policy.by_name.get(name)

    def call(self, who: Principal | None, msg: Any, journal: Journal | None) -> str | None:
        """Why `who` may not make ZBC01 call `msg`, or None when it may."""
        if who is None:
            return self._no("call", "no authenticated principal")
        if who.admin:
            return None
        kind = type(msg)
        if kind is zbc.Enqueue:
            allowed = who.may_request(msg.service)
            why = f"{who.name} may not enqueue to {msg.service!r}"
            if allowed and msg.options.depends_on:
                # A dependency's result may become the task's input: its owner's only.
                foreign = _foreign(who, msg.options.depends_on, journal)
                allowed = foreign is None
                why = f"depends_on names task {foreign}, which belongs to another principal"
        elif kind in _ON_A_TASK:
            record = journal.get(msg.id) if journal is not None else None
            # No such task: the call itself answers not_found.
            allowed = record is None or record.owner == who.name
            why = f"task {msg.id} belongs to another principal"
        elif kind in _ON_OWN_CALLS:
            allowed = who.may("client")
            why = f"{who.name} is not a client"
        elif kind in _FIGURES:
            allowed = who.may_observe()
            why = f"{who.name} is not an observer"
        else:
            allowed = False
            why = f"{who.name} is not an admin"
        return None if allowed else self._no("call", why)

    def mdp_request(self, who: Principal | None, service: bytes) -> bool:
        """May `who` send this MDP request, MDPC01 or MDPC02 (8/MMI queries: any client)?"""
        if who is not None and who.admin:
            return True
        if who is None or not who.may("client"):
            self._no("mdp_request", "")
            return False
        if service.startswith(mdp.MMI_PREFIX):
            return True
        try:
            name = service.decode()
        except UnicodeDecodeError:
            name = ""
        if who.may_request(name):
            return True
        self._no("mdp_request", "")
        return False

    def worker_ready(self, who: Principal | None, service: str) -> str | None:
        """Why `who` may not register as a worker of `service`, or None."""
        if who is not None and who.may_serve(service):
            return None
        name = "nobody" if who is None else who.name
        return self._no("worker", f"{FORBIDDEN_PREFIX} {name} may not serve {service!r}")

    def creates_too_many(self, who: Principal | None, name: bytes) -> str | None:
        """Why a message of `who` may not make service `name` exist (it would be one
        service too many of its own), or None. Admins have no such cap."""
        if who is None or who.admin or name in self._directory.services:
            return None
        mine = self._directory.created_by.get(who.name, 0)
        if mine < self._max_services:
            return None
        self.refused("quota")
        return (
            f"{who.name} already has {mine} services (cap {self._max_services}):"
            f" no new service {name[:64]!r}"
        )

    def refused(self, kind: str) -> None:
        self.forbidden[kind] += 1
        self._stats.forbidden += 1

    def _no(self, kind: str, reason: str) -> str:
        self.refused(kind)
        return reason


def ready_service(header: bytes, msg: Any) -> str | None:
    """The service a worker's message registers for, when it is a READY (`header`:
    its protocol; MDPW01 and MDPW02 decode to the same WorkerReady)."""
    if header == ext.ZBW01:
        return msg.service if type(msg) is ext.Ready else None
    if type(msg) is mdp.WorkerReady:
        name: bytes = msg.service
        return name.decode("utf-8", "replace")
    return None
