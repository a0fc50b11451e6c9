"""The core on an authenticated broker: every message checked against its sender.

Sans-IO: messages go in with the principal name the runtime read from the ZAP
User-Id; time is moved by hand; the journal is the in-memory one. What the roles
allow is zbroker.protocol.access's rule; these tests check that the core asks it
for every kind of message, keeps task ownership, and holds each principal to its
quotas however many connections it uses.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.unit.core_script import EPOCH
from zbroker.core import Broker, CoreSettings
from zbroker.journal import MemoryJournal, TaskState
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.access import Policy, Principal

SETTINGS = CoreSettings(
    heartbeat_interval_s=1.0,
    max_waiters_per_principal=3,
    max_tasks_per_principal=4,
    max_services_per_principal=2,
    seed=3,
)

POLICY = Policy(
    (
        Principal("alice", "A" * 40, frozenset({"client"}), services=("tts", "llm.*")),
        Principal("bob", "B" * 40, frozenset({"client"}), services=("tts",)),
        Principal("gpu", "G" * 40, frozenset({"worker"}), services=("tts",)),
        Principal("ops", "O" * 40, frozenset({"observer"})),
        Principal("root", "R" * 40, frozenset({"admin"})),
    )
)


def pid(peer: bytes) -> bytes:
    """The routing id the ROUTER would give connection `peer` (five bytes, a zero
    byte first): an authenticated broker serves no other (access.broker_given)."""
    return b"\x00" + peer.ljust(4, b"_")


class Guarded:
    """A core with a policy, fed messages as named principals. Peers are named by
    short bytes (b"A1"), which `pid` turns into routing ids."""

    def __init__(self, journal: MemoryJournal | None = None) -> None:
        self.journal = journal or MemoryJournal()
        self.now = 1000.0
        self.broker = Broker(SETTINGS, self.now, self.journal, EPOCH, policy=POLICY)
        self.rid = 0

    def send(self, peer: bytes, sender: str | None, frames: list[bytes], raw: bool = False) -> None:
        identity = peer if raw else pid(peer)
        self.broker.receive_many([[identity, *frames]], self.now, [sender])
        self.journal.commit()

    def out(self, peer: bytes, raw: bool = False) -> list[list[bytes]]:
        identity = peer if raw else pid(peer)
        mine = [f for f in self.broker.outbox if f[0] == identity]
        self.broker.outbox = [f for f in self.broker.outbox if f[0] != identity]
        return mine

    def call(self, peer: bytes, sender: str | None, command: bytes, **fields: Any) -> zbc.Answer:
        self.rid += 1
        self.send(peer, sender, zbc.call(command, self.rid, **fields))
        answers = [zbc.decode_answer(f[1:]) for f in self.out(peer)]
        assert len(answers) == 1, answers
        return answers[0]

    def enqueue(self, peer: bytes, sender: str, service: str, **kw: Any) -> zbc.Answer:
        self.rid += 1
        frames = zbc.enqueue(self.rid, service, [[b"x"]], zbc.TaskOptions(), **kw)
        self.send(peer, sender, frames)
        answers = [zbc.decode_answer(f[1:]) for f in self.out(peer)]
        assert answers, "no answer"
        return answers[0]

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.broker.tick(self.now)
        self.journal.commit()


def refused(answer: zbc.Answer, code: str) -> str:
    assert not answer.ok, answer.meta
    assert answer.meta["code"] == code, answer.meta
    message: str = answer.meta["message"]
    return message


def test_a_client_enqueues_only_to_its_services_and_owns_its_tasks() -> None:
    core = Guarded()
    # When alice enqueues to a service her globs name, and to one they do not
    ok = core.enqueue(b"A1", "alice", "llm.small")
    no = core.enqueue(b"A1", "alice", "stt")
    # Then the first is stored as hers, with an id nobody can guess from another
    assert ok.ok
    task_id = ok.meta["ids"][0]
    record = core.journal.get(task_id)
    assert record is not None and record.owner == "alice"
    assert re.fullmatch(r"t[0-9a-f]+-[0-9a-f]{16}", task_id)
    assert core.enqueue(b"A1", "alice", "llm.small").meta["ids"][0][-16:] != task_id[-16:]
    # And the second is refused with a reason its sender can read, and counted
    assert "alice may not enqueue to 'stt'" in refused(no, zbc.E_FORBIDDEN)
    assert core.broker.stats.forbidden == 1


@pytest.mark.parametrize("command", [zbc.STATUS, zbc.RESULT, zbc.CANCEL])
def test_another_principals_task_is_refused_unless_admin(command: bytes) -> None:
    core = Guarded()
    task_id = core.enqueue(b"A1", "alice", "tts").meta["ids"][0]
    # When bob (a client of the same service) asks about alice's task, then no
    assert "belongs to another principal" in refused(
        core.call(b"B1", "bob", command, id=task_id), zbc.E_FORBIDDEN
    )
    # And alice, from any connection, and an admin may
    assert core.call(b"A2", "alice", zbc.STATUS, id=task_id).ok
    assert core.call(b"R1", "root", command, id=task_id).ok


def test_a_payload_preview_is_for_the_tasks_owner_and_admins_only() -> None:
    # Given alice's task
    core = Guarded()
    task_id = core.enqueue(b"A1", "alice", "tts").meta["ids"][0]
    # When bob asks for its payload's first bytes, then no: STATUS's own rule
    assert "belongs to another principal" in refused(
        core.call(b"B1", "bob", zbc.STATUS, id=task_id, preview=16), zbc.E_FORBIDDEN
    )
    # And alice and an admin see them
    for peer, sender in ((b"A2", "alice"), (b"R1", "root")):
        answer = core.call(peer, sender, zbc.STATUS, id=task_id, preview=16)
        assert answer.ok and answer.meta["payload"]["frames"] == 1


def test_a_task_may_depend_only_on_tasks_of_its_own_principal() -> None:
    core = Guarded()

    def enqueue(peer: bytes, sender: str, **options: Any) -> zbc.Answer:
        core.rid += 1
        core.send(peer, sender, zbc.enqueue(core.rid, "tts", [[b"x"]], zbc.TaskOptions(**options)))
        (answer,) = [zbc.decode_answer(f[1:]) for f in core.out(peer)]
        return answer

    alices = enqueue(b"A1", "alice").meta["ids"][0]
    bobs = enqueue(b"B1", "bob", key="k").meta["ids"][0]
    # When bob names alice's task by its id, then no: its result could become his input
    answer = enqueue(b"B1", "bob", depends_on=(alices,))
    assert f"depends_on names task {alices}" in refused(answer, zbc.E_FORBIDDEN)
    # And alice may not name bob's by its key either
    answer = enqueue(b"A1", "alice", depends_on=(("tts", "k"),))
    assert f"depends_on names task {bobs}" in refused(answer, zbc.E_FORBIDDEN)
    # But alice may name her own, and an admin anyone's
    assert enqueue(b"A1", "alice", depends_on=(alices,)).ok
    assert enqueue(b"R1", "root", depends_on=(bobs,)).ok


def test_figures_need_an_observer_and_controls_an_admin() -> None:
    core = Guarded()
    core.enqueue(b"A1", "alice", "tts")
    # An observer reads the figures but may not purge; a client may do neither
    assert core.call(b"O1", "ops", zbc.QUEUES).ok
    assert core.call(b"O1", "ops", zbc.STATS).ok
    assert "not an admin" in refused(core.call(b"O1", "ops", zbc.PURGE, service="tts"), "forbidden")
    assert "not an observer" in refused(core.call(b"A1", "alice", zbc.QUEUES), "forbidden")
    assert core.call(b"R1", "root", zbc.PURGE, service="tts").ok
    # A connection without a User-Id is inside the broker's process: an observer
    assert core.call(b"I1", None, zbc.STATS).ok
    refused(core.call(b"I1", None, zbc.PURGE, service="tts"), zbc.E_FORBIDDEN)


def test_a_worker_serves_only_its_services_and_only_its_principal_speaks_for_it() -> None:
    core = Guarded()
    # When gpu registers for a service it may not serve, it is told why and not kept
    core.send(b"W1", "gpu", ext.ready("stt", 1))
    (bye,) = core.out(b"W1")
    assert bye[2:4] == [ext.ZBW01, ext.DISCONNECT]
    assert ext.unpack_meta(bye[4])["reason"].startswith("forbidden: gpu may not serve 'stt'")
    assert pid(b"W1") not in core.broker.workers
    # When it registers for its own service, it gets alice's task
    task_id = core.enqueue(b"A1", "alice", "tts").meta["ids"][0]
    core.send(b"W2", "gpu", ext.ready("tts", 1))
    (task,) = [f for f in core.out(b"W2") if f[3] == ext.TASK]
    assert ext.unpack_meta(task[4])["id"] == task_id
    # Then a DONE for it from another principal on the worker's routing id is dropped
    core.send(b"W2", "bob", ext.done(task_id, 1, [b"forged"]))
    assert core.journal.get(task_id).state is TaskState.INFLIGHT  # type: ignore[union-attr]
    # And the worker's own DONE ends the task
    core.send(b"W2", "gpu", ext.done(task_id, 1, [b"real"]))
    assert core.journal.result(task_id) == [b"real"]


def test_mdp_requests_outside_the_globs_are_dropped_and_mmi_is_answered() -> None:
    core = Guarded()
    core.send(b"M1", "bob", mdp.client_request(b"llm.small", [b"hi"]))
    assert core.broker.services.get(b"llm.small") is None
    assert core.broker.stats.forbidden == 1
    core.send(b"M1", "bob", mdp.client_request(mdp.MMI_SERVICE, [b"tts"]))
    assert core.out(b"M1")  # answered
    core.send(b"M1", "bob", mdp.client_request(b"tts", [b"hi"]))
    assert len(core.broker.services[b"tts"].queue) == 1


def test_tasks_not_yet_finished_are_capped_per_principal_and_counted_after_restart() -> None:
    core = Guarded()
    # Given alice at her cap of 4 tasks not yet finished, over two connections
    ids = [core.enqueue(peer, "alice", "tts").meta["ids"][0] for peer in (b"A1", b"A2") * 2]
    # Then a fifth is refused whatever the connection; bob is not held back by her
    assert "alice has 4 tasks not yet finished (cap 4)" in refused(
        core.enqueue(b"A3", "alice", "tts"), zbc.E_QUEUE_FULL
    )
    assert core.enqueue(b"B1", "bob", "tts").ok
    # When one of hers ends, she may enqueue one more
    assert core.call(b"A1", "alice", zbc.CANCEL, id=ids[0]).ok
    assert core.enqueue(b"A1", "alice", "tts").ok
    # And a broker started again on the same journal counts them from it
    again = Guarded(core.journal)
    assert again.broker.tasks.live_by_owner == {"alice": 4, "bob": 1}
    refused(again.enqueue(b"A1", "alice", "tts"), zbc.E_QUEUE_FULL)


def test_waiting_calls_are_capped_per_principal_over_its_connections() -> None:
    core = Guarded()
    task_id = core.enqueue(b"A1", "alice", "tts").meta["ids"][0]
    # Given three of alice's connections each waiting for her task
    for peer in (b"A1", b"A2", b"A3"):
        core.rid += 1
        core.send(peer, "alice", zbc.call(zbc.RESULT, core.rid, id=task_id, wait_s=60.0))
        assert not core.out(peer)  # waiting
    # Then a fourth connection of hers may not wait, with the reason
    answer = core.call(b"A4", "alice", zbc.RESULT, id=task_id, wait_s=60.0)
    assert "principal alice" in refused(answer, zbc.E_TOO_MANY_WAITERS)
    # And when one of her connections is gone, its place is free again
    core.broker.undeliverable([pid(b"A1"), b"", zbc.ZBC01, b"x"], core.now)
    core.rid += 1
    core.send(b"A4", "alice", zbc.call(zbc.RESULT, core.rid, id=task_id, wait_s=60.0))
    assert not core.out(b"A4")


def test_services_a_principal_makes_exist_are_capped_until_let_go() -> None:
    core = Guarded()
    # Given alice has made two services exist (her cap)
    assert core.enqueue(b"A1", "alice", "llm.a").ok
    assert core.enqueue(b"A1", "alice", "llm.b").ok
    # Then a third is refused, and a worker of the same principal kind is told so too
    assert "alice already has 2 services (cap 2)" in refused(
        core.enqueue(b"A1", "alice", "llm.c"), zbc.E_QUEUE_FULL
    )
    # And enqueueing to one that exists is no new service
    assert core.enqueue(b"A1", "alice", "llm.a").ok
    # When her services are empty and let go, she may make others
    for peer, name in ((b"R1", "llm.a"), (b"R1", "llm.b")):
        assert core.call(peer, "root", zbc.PURGE, service=name).ok
    core.tick(2.0)
    assert core.broker.directory.created_by == {}
    assert core.enqueue(b"A1", "alice", "llm.c").ok


def test_a_connection_that_chose_its_routing_id_is_not_served() -> None:
    core = Guarded()
    chosen = b"gpu-worker-1"
    # A worker that set ZMQ_ROUTING_ID is told why and not registered
    core.send(chosen, "gpu", ext.ready("tts", 1), raw=True)
    (bye,) = core.out(chosen, raw=True)
    assert ext.unpack_meta(bye[4])["reason"].startswith("forbidden: this connection chose")
    assert chosen not in core.broker.workers
    # A client that did gets forbidden; an MDP request from one is dropped
    core.rid += 1
    core.send(chosen, "alice", zbc.call(zbc.STATS, core.rid), raw=True)
    (answer,) = core.out(chosen, raw=True)
    assert "routing id" in refused(zbc.decode_answer(answer[1:]), zbc.E_FORBIDDEN)
    core.send(chosen, "bob", mdp.client_request(b"tts", [b"hi"]), raw=True)
    assert b"tts" not in core.broker.services
    assert core.broker.guard is not None
    assert core.broker.guard.forbidden["routing_id"] == 3


def test_debounce_never_replaces_another_principals_payload() -> None:
    core = Guarded()

    def enqueue(peer: bytes, sender: str, payload: bytes) -> zbc.Answer:
        core.rid += 1
        options = zbc.TaskOptions(key="file:a", debounce_s=5.0)
        core.send(peer, sender, zbc.enqueue(core.rid, "tts", [[payload]], options))
        (answer,) = [zbc.decode_answer(f[1:]) for f in core.out(peer)]
        return answer

    task_id = enqueue(b"A1", "alice", b"mine").meta["ids"][0]
    answer = enqueue(b"B1", "bob", b"theirs")
    assert "held by another principal's task" in refused(answer, zbc.E_FORBIDDEN)
    assert core.journal.payload(task_id) == [b"mine"]
    # Alice herself replaces it
    assert enqueue(b"A2", "alice", b"mine too").meta["replaced"] == [0]
    assert core.journal.payload(task_id) == [b"mine too"]
