"""18/MDP (MDPC02, MDPW02) in the core: frames in, frames out, time by argument.

An MDPC02 client is answered with PARTIALs as they come and one FINAL, whatever
dialect its worker speaks; an MDPW02 worker serves MDP clients of both versions
and durable tasks, whose streams its PARTIALs feed (docs/protocol.md §14).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit import test_core_durable as durable
from tests.unit.core_script import CoreScript
from tests.unit.test_core_guard import Guarded, pid
from zbroker.core import CoreSettings
from zbroker.journal import Journal, TaskState
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.errors import ProtocolError

HB = 1.0
SETTINGS = CoreSettings(heartbeat_interval_s=HB, heartbeat_liveness=3, request_expiry_s=10.0)

C, W = b"C", b"W"
GREETING = [mdp.MDPW02, mdp.W02_HEARTBEAT]
DISCONNECT = [mdp.MDPW02, mdp.W02_DISCONNECT]


class Script(CoreScript):
    """Drives a Broker with MDP peers of both versions and ZBW01 workers."""

    def __init__(self, settings: CoreSettings = SETTINGS) -> None:
        super().__init__(settings)

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        self.broker.receive([peer, *frames], self.now)

    def ready(self, wid: bytes, service: bytes) -> None:
        """Register an MDPW02 worker and consume the greeting (a worker given a request
        at once is not greeted: the REQUEST says the same)."""
        self.send(wid, mdp.worker02_ready(service))
        if self.broker.outbox and self.broker.outbox[-1] == [wid, *GREETING]:
            self.broker.outbox.pop()

    def sent_to(self, peer: bytes) -> list[list[bytes]]:
        return [m[1:] for m in self.sent() if m[0] == peer]

    def request_at(self, wid: bytes) -> tuple[bytes, list[bytes]]:
        """The one REQUEST just sent to MDPW02 worker `wid`: (client address, body)."""
        (frames,) = self.sent_to(wid)
        assert frames[:2] == [mdp.MDPW02, mdp.W02_REQUEST] and frames[3] == b"", frames
        return frames[2], frames[4:]


def partial(service: bytes, *body: bytes) -> list[bytes]:
    return mdp.client_partial(service, body)


def final(service: bytes, *body: bytes) -> list[bytes]:
    return mdp.client_final(service, body)


# ------------------------------------------------------------------ codecs


def test_codecs_lay_out_the_frames_of_18_mdp() -> None:
    assert mdp.client02_request(b"echo", [b"a"]) == [b"MDPC02", b"\x01", b"echo", b"a"]
    assert mdp.client_partial(b"echo", [b"p"]) == [b"MDPC02", b"\x02", b"echo", b"p"]
    assert mdp.client_final(b"echo", [b"f"]) == [b"MDPC02", b"\x03", b"echo", b"f"]
    assert mdp.worker02_ready(b"echo") == [b"MDPW02", b"\x01", b"echo"]
    assert mdp.worker02_request(b"C", [b"a"]) == [b"MDPW02", b"\x02", b"C", b"", b"a"]
    assert mdp.worker02_partial(b"C", [b"p"]) == [b"MDPW02", b"\x03", b"C", b"", b"p"]
    assert mdp.worker02_final(b"C", [b"f"]) == [b"MDPW02", b"\x04", b"C", b"", b"f"]
    assert mdp.worker02_heartbeat() == [b"MDPW02", b"\x05"]
    assert mdp.worker02_disconnect() == [b"MDPW02", b"\x06"]
    request = mdp.decode_client02(mdp.client02_request(b"echo", [b"a", b""]))
    assert request == mdp.ClientRequest(b"echo", (b"a", b""))
    assert mdp.decode_worker02(mdp.worker02_ready(b"s")) == mdp.WorkerReady(b"s")
    assert mdp.decode_worker02(mdp.worker02_partial(b"C", [b"p", b"q"])) == mdp.WorkerPartial(
        b"C", (b"p", b"q")
    )
    assert mdp.decode_worker02(mdp.worker02_final(b"C", [])) == mdp.WorkerReply(b"C", ())
    assert mdp.decode_worker02(mdp.worker02_heartbeat()) == mdp.WorkerHeartbeat()
    assert mdp.decode_worker02(mdp.worker02_disconnect()) == mdp.WorkerDisconnect()


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"MDPC02", b"\x01"], "missing_frames"),
        ([b"MDPC02"], "missing_frames"),
        ([b"MDPC02", b"\x02", b"echo", b"x"], "unknown_command"),  # PARTIAL: broker -> client
        ([b"MDPC02", b"\x03", b"echo", b"x"], "unknown_command"),
        ([b"MDPC02", b"", b"echo"], "unknown_command"),
        ([b"MDPC02", b"\x01", b""], "bad_service"),
    ],
)
def test_malformed_client_messages_are_refused_by_reason(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        mdp.decode_client02(frames)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"MDPW02"], "missing_frames"),
        ([b"MDPW02", b"\x01"], "missing_frames"),
        ([b"MDPW02", b"\x01", b"svc", b"x"], "extra_frames"),
        ([b"MDPW02", b"\x02", b"C", b"", b"x"], "unknown_command"),  # REQUEST: broker -> worker
        ([b"MDPW02", b"\x03", b"C", b""], "missing_frames"),  # a PARTIAL with no body
        ([b"MDPW02", b"\x03", b"C"], "missing_frames"),
        ([b"MDPW02", b"\x03", b"C", b"x", b"p"], "bad_delimiter"),
        ([b"MDPW02", b"\x04", b"C"], "missing_frames"),
        ([b"MDPW02", b"\x04", b"C", b"x", b"f"], "bad_delimiter"),
        ([b"MDPW02", b"\x05", b"x"], "extra_frames"),
        ([b"MDPW02", b"\x06", b"x"], "extra_frames"),
        ([b"MDPW02", b"\x07"], "unknown_command"),
        ([b"MDPW02", b""], "unknown_command"),
    ],
)
def test_malformed_worker_messages_are_refused_by_reason(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        mdp.decode_worker02(frames)
    assert caught.value.reason == reason


def test_malformed_messages_reaching_the_broker_are_dropped_and_counted() -> None:
    s = Script()
    bad = [
        [b"MDPW02"],  # two frames with the routing id
        [b"MDPC02", b"\x01"],
        [b"MDPC02", b"\x02", b"echo", b"x"],
        [b"MDPW02", b"\x03", b"C", b""],
        [b"MDPW02", b"\x04", b"C", b"not empty"],
        [b"MDPW02", b"\x05", b"extra"],
        [b"MDPW02", b"\x09"],
        [b"", b"MDPC02", b"\x01", b"echo"],  # 18/MDP has no empty frame first
        [b"", b"MDPW02", b"\x01", b"echo"],
        [b"MDPC03", b"\x01", b"echo"],
    ]
    for frames in bad:
        s.send(b"X", frames)
    malformed = s.broker.stats.malformed
    assert malformed == {
        "missing_frames": 3,
        "unknown_command": 2,
        "bad_delimiter": 1,
        "extra_frames": 1,
        "bad_header": 3,
    }
    assert s.sent() == [] and s.broker.workers == {}
    # And the broker serves on, on the same connection
    s.ready(W, b"echo")
    s.send(b"X", mdp.client02_request(b"echo", [b"still?"]))
    assert s.request_at(W) == (b"X", [b"still?"])


# ---------------------------------------------------- MDPC02 clients, all workers


def test_mdpw02_partials_reach_an_mdpc02_client_in_order_then_the_final() -> None:
    s = Script()
    s.ready(W, b"llm")
    s.send(C, mdp.client02_request(b"llm", [b"hi", b"there"]))
    client, body = s.request_at(W)
    assert (client, body) == (C, [b"hi", b"there"])
    s.send(W, mdp.worker02_partial(client, [b"Hel"]))
    s.send(W, mdp.worker02_partial(client, [b"lo", b" you"]))  # one PARTIAL, two frames
    s.send(W, mdp.worker02_final(client, [b"Hello you"]))
    assert s.sent_to(C) == [
        partial(b"llm", b"Hel"),
        partial(b"llm", b"lo", b" you"),
        final(b"llm", b"Hello you"),
    ]
    stats = s.broker.stats
    assert (stats.replies, stats.chunks_received, stats.chunks_dropped) == (1, 3, 0)
    # The worker is ready again: the next request goes to it at once
    s.send(C, mdp.client02_request(b"llm", [b"again"]))
    assert s.request_at(W) == (C, [b"again"])


def test_a_zbw01_workers_chunks_are_partials_one_each_then_done_is_the_final() -> None:
    s = Script()
    s.send(W, ext.ready("llm", 1))
    s.sent()
    s.send(C, mdp.client02_request(b"llm", [b"prompt"]))
    (task,) = s.sent_to(W)
    meta = ext.unpack_meta(task[3])
    assert task[4:] == [b"prompt"]
    s.send(W, ext.chunk(meta["id"], meta["attempt"], [b"a", b"bc"]))
    assert s.sent_to(C) == [partial(b"llm", b"a"), partial(b"llm", b"bc")]  # at once
    s.send(W, ext.chunk(meta["id"], meta["attempt"], [b""]))
    s.send(W, ext.done(meta["id"], meta["attempt"], [b"abc", b"!"]))
    assert s.sent_to(C) == [partial(b"llm", b""), final(b"llm", b"abc", b"!")]
    assert s.broker.stats.chunks_received == 3
    # A stale chunk is fenced like any report about an attempt not held
    s.send(W, ext.chunk(meta["id"], meta["attempt"], [b"late"]))
    assert s.sent_to(C) == []


def test_a_7_mdp_workers_reply_is_a_stream_of_one_final() -> None:
    s = Script()
    s.send(W, mdp.worker_ready(b"echo"))
    s.sent()
    s.send(C, mdp.client02_request(b"echo", [b"x"]))
    (request,) = s.sent_to(W)
    assert request == [b"", mdp.MDPW01, mdp.REQUEST, C, b"", b"x"]
    s.send(W, mdp.worker_reply(C, [b"X"]))
    assert s.sent_to(C) == [final(b"echo", b"X")]


def test_mmi_is_answered_to_an_mdpc02_client_with_a_final() -> None:
    s = Script()
    s.send(C, mdp.client02_request(mdp.MMI_SERVICE, [b"echo"]))
    assert s.sent_to(C) == [final(mdp.MMI_SERVICE, mdp.MMI_NOT_FOUND)]
    s.ready(W, b"echo")
    s.send(C, mdp.client02_request(mdp.MMI_SERVICE, [b"echo"]))
    s.send(C, mdp.client02_request(b"mmi.nothing", []))
    assert s.sent_to(C) == [
        final(mdp.MMI_SERVICE, mdp.MMI_FOUND),
        final(b"mmi.nothing", mdp.MMI_NOT_IMPLEMENTED),
    ]


def test_mdpc02_requests_queue_and_expire_like_mdpc01_ones() -> None:
    s = Script()
    s.send(C, mdp.client02_request(b"late", [b"1"]))
    s.advance(5.0)
    s.ready(W, b"late")
    assert s.request_at(W) == (C, [b"1"])
    s.send(W, mdp.worker02_final(C, [b"one"]))
    assert s.sent_to(C) == [final(b"late", b"one")]
    s.send(C, mdp.client02_request(b"nobody", [b"2"]))
    s.advance(SETTINGS.request_expiry_s + 1.0)
    assert s.broker.stats.expired == 1


# ----------------------------------------------------- MDPW02 workers, all clients


def test_an_mdpc01_client_gets_the_final_as_its_reply_and_partials_are_dropped() -> None:
    s = Script()
    s.ready(W, b"llm")
    s.send(C, mdp.client_request(b"llm", [b"q"]))
    client, _ = s.request_at(W)
    s.send(W, mdp.worker02_partial(client, [b"p1", b"p2"]))
    s.send(W, mdp.worker02_partial(client, [b"p3"]))
    assert s.sent_to(C) == []
    s.send(W, mdp.worker02_final(client, [b"all"]))
    assert s.sent_to(C) == [[b"", mdp.MDPC01, b"llm", b"all"]]
    assert s.broker.stats.chunks_dropped == 3 and s.broker.stats.replies == 1


def test_a_zbw01_workers_chunks_for_an_mdpc01_client_are_still_dropped() -> None:
    s = Script()
    s.send(W, ext.ready("llm", 1))
    s.sent()
    s.send(C, mdp.client_request(b"llm", [b"q"]))
    meta = ext.unpack_meta(s.sent_to(W)[0][3])
    s.send(W, ext.chunk(meta["id"], meta["attempt"], [b"a", b"b"]))
    s.send(W, ext.done(meta["id"], meta["attempt"], [b"ab"]))
    assert s.sent_to(C) == [[b"", mdp.MDPC01, b"llm", b"ab"]]
    assert s.broker.stats.chunks_dropped == 2


def test_an_mdpw02_worker_registers_heartbeats_and_shows_its_dialect() -> None:
    s = Script()
    s.send(W, mdp.worker02_ready(b"svc"))
    assert s.sent() == [[W, *GREETING]]  # answered at once, as every worker is
    assert s.broker.views.workers(s.now)["workers"][0]["dialect"] == "MDPW02"
    for _ in range(10):
        s.advance(HB)
        s.send(W, mdp.worker02_heartbeat())
    assert W in s.broker.workers
    beats = [m for m in s.sent_to(W) if m == GREETING]
    assert 8 <= len(beats) <= 11
    # Silent for liveness intervals: dead
    s.advance(SETTINGS.worker_expiry_s + SETTINGS.tick_interval_s)
    assert W not in s.broker.workers


def test_disconnect_unregisters_and_the_request_goes_to_the_next_worker() -> None:
    s = Script()
    s.ready(W, b"svc")
    s.send(C, mdp.client02_request(b"svc", [b"job"]))
    client, _ = s.request_at(W)
    s.send(W, mdp.worker02_partial(client, [b"half"]))
    s.send(W, mdp.worker02_disconnect())
    assert W not in s.broker.workers
    assert s.sent_to(C) == [partial(b"svc", b"half")]
    # The request runs again from the start on another worker: the client may see the
    # first attempt's PARTIALs and the second's; the FINAL comes once
    s.ready(b"W2", b"svc")
    assert s.request_at(b"W2") == (C, [b"job"])
    s.send(b"W2", mdp.worker02_partial(C, [b"half"]))
    s.send(b"W2", mdp.worker02_final(C, [b"whole"]))
    assert s.sent_to(C) == [partial(b"svc", b"half"), final(b"svc", b"whole")]
    assert s.broker.stats.requeued == 1


def test_mdpw02_refuses_reserved_names_a_second_ready_and_strangers() -> None:
    s = Script()
    s.send(W, mdp.worker02_ready(b"mmi.service"))
    assert s.sent() == [[W, *DISCONNECT]]
    s.send(b"S", mdp.worker02_heartbeat())  # never registered
    assert s.sent() == [[b"S", *DISCONNECT]]
    s.send(b"S", mdp.worker02_disconnect())  # allowed at any time, even before READY
    assert s.sent() == []
    s.ready(W, b"svc")
    s.send(W, mdp.worker02_ready(b"svc"))
    assert s.sent() == [[W, *DISCONNECT]] and W not in s.broker.workers


def test_a_worker_keeps_to_its_dialect() -> None:
    s = Script()
    s.ready(W, b"svc")
    s.send(W, [b"", mdp.MDPW01, mdp.HEARTBEAT])
    assert s.sent() == [[W, *DISCONNECT]] and W not in s.broker.workers
    s.send(b"V1", mdp.worker_ready(b"svc"))
    s.sent()
    s.send(b"V1", mdp.worker02_heartbeat())
    assert s.sent() == [[b"V1", b"", mdp.MDPW01, mdp.DISCONNECT]]
    assert b"V1" not in s.broker.workers


def test_final_and_partial_are_fenced() -> None:
    s = Script()
    s.ready(W, b"svc")
    # A FINAL or PARTIAL from a worker holding nothing: DISCONNECT, counted
    s.send(W, mdp.worker02_final(C, [b"nothing asked"]))
    assert s.sent() == [[W, *DISCONNECT]] and W not in s.broker.workers
    assert s.broker.stats.workers_disconnected == 1
    s.ready(W, b"svc")
    s.send(W, mdp.worker02_partial(C, [b"nothing asked"]))
    assert s.sent() == [[W, *DISCONNECT]] and W not in s.broker.workers
    # A wrong client address: DISCONNECT, and the request goes back to the front
    s.ready(W, b"svc")
    s.send(C, mdp.client02_request(b"svc", [b"job"]))
    s.request_at(W)
    s.send(W, mdp.worker02_final(b"someone else", [b"x"]))
    assert s.sent() == [[W, *DISCONNECT]]
    assert [r.body for r in s.broker.services[b"svc"].queue] == [(b"job",)]
    # From a worker declared dead: DISCONNECT, counted, and nothing reaches the client
    s.ready(W, b"svc")
    client, _ = s.request_at(W)
    s.advance(SETTINGS.worker_expiry_s + SETTINGS.tick_interval_s)
    assert W not in s.broker.workers
    s.sent()
    s.send(W, mdp.worker02_partial(client, [b"late"]))
    s.send(W, mdp.worker02_final(client, [b"late"]))
    assert s.sent() == [[W, *DISCONNECT], [W, *DISCONNECT]]
    assert s.broker.stats.late_replies_dropped == 1 and s.broker.stats.stale_refused == 1


def test_an_mdpw02_worker_holds_one_request_at_a_time_for_clients_of_both_versions() -> None:
    """One request at a time: the second waits for the first's FINAL."""
    s = Script()
    s.ready(W, b"svc")
    s.send(b"C1", mdp.client02_request(b"svc", [b"1"]))
    s.send(b"C2", mdp.client_request(b"svc", [b"2"]))
    assert s.request_at(W) == (b"C1", [b"1"])
    s.send(W, mdp.worker02_final(b"C1", [b"one"]))
    out = s.sent()
    assert out == [[W, *mdp.worker02_request(b"C2", [b"2"])], [b"C1", *final(b"svc", b"one")]]


def test_messages_that_cannot_be_sent_end_the_worker_or_count_for_the_client() -> None:
    s = Script()
    s.ready(W, b"svc")
    s.send(C, mdp.client02_request(b"svc", [b"job"]))
    request = s.sent()[0]
    s.broker.undeliverable(request, s.now)
    assert W not in s.broker.workers
    assert s.broker.stats.workers_unreachable == 1
    s.broker.undeliverable([C, *final(b"svc", b"x")], s.now)
    s.broker.undeliverable([C, *partial(b"svc", b"x")], s.now)
    assert s.broker.stats.replies_undeliverable == 2


# ------------------------------------------------------ durable tasks, task streams


def test_mdpw02_partials_are_a_durable_tasks_stream_and_the_final_its_result(
    journal: Journal,
) -> None:
    s = durable.Script(journal)
    rid = s.next_rid()
    s.send(C, zbc.stream(rid, "llm", [b"prompt"]))
    (accepted,) = s.answers(C)
    task_id = accepted.meta["ids"][0]
    s.send(W, mdp.worker02_ready(b"llm"))
    (request,) = s.sent_to(W)
    assert request[1:3] == [mdp.MDPW02, mdp.W02_REQUEST] and request[4:] == [b"", b"prompt"]
    address = request[3]
    s.send(W, mdp.worker02_partial(address, [b"Hel", b"lo"]))  # two chunks
    s.send(W, mdp.worker02_partial(address, [b" there"]))
    chunks = [(a.meta["offset"], a.meta["attempt"], list(a.frames)) for a in s.answers(C)]
    assert chunks == [(0, 1, [b"Hel", b"lo"]), (2, 1, [b" there"])]
    s.send(W, mdp.worker02_final(address, [b"Hello there"]))
    (end,) = s.answers(C)
    assert not end.chunks and end.rid == rid
    assert end.meta["state"] == "done" and end.meta["next"] == 3
    assert end.frames == (b"Hello there",)
    record = journal.get(task_id)
    assert record is not None and (record.stream_chunks, record.stream_bytes) == (3, 11)
    assert s.broker.stats.chunks_received == 3
    # READ from offset 0 after the end: every chunk, then the result
    s.send(C, zbc.read(s.next_rid(), task_id, 0))
    answers = s.answers(C)
    assert [list(a.frames) for a in answers if a.chunks] == [[b"Hel", b"lo", b" there"]]
    assert answers[-1].meta["state"] == "done" and answers[-1].frames == (b"Hello there",)
    # The worker is free again, and a PARTIAL about the finished task is refused
    s.send(W, mdp.worker02_partial(address, [b"late"]))
    assert s.sent_to(W)[-1][1:] == DISCONNECT
    assert journal.get(task_id).stream_chunks == 3  # type: ignore[union-attr]


def test_an_mdpw02_worker_past_a_stream_cap_is_let_go_and_the_task_dead(
    journal: Journal,
) -> None:
    s = durable.Script(journal, replace(durable.SETTINGS, max_stream_chunks=2))
    task_id = s.enqueue("llm")
    s.send(W, mdp.worker02_ready(b"llm"))
    address = s.sent_to(W)[0][3]
    s.send(W, mdp.worker02_partial(address, [b"a", b"b", b"c"]))
    assert s.sent_to(W) == [[W, *DISCONNECT]]  # 18/MDP cannot cancel: the worker goes
    assert W not in s.broker.workers
    assert s.state(task_id) is TaskState.DEAD
    assert s.broker.stats.streams_capped == 1


def test_an_mdpw02_worker_that_dies_mid_stream_leaves_the_next_attempt_to_go_on(
    journal: Journal,
) -> None:
    s = durable.Script(journal)
    task_id = s.enqueue("llm", max_attempts=3)
    s.send(W, mdp.worker02_ready(b"llm"))
    address = s.sent_to(W)[0][3]
    s.send(W, mdp.worker02_partial(address, [b"x"]))
    s.send(W, mdp.worker02_disconnect())
    assert s.state(task_id) is TaskState.READY
    s.send(b"W2", mdp.worker02_ready(b"llm"))
    assert s.sent_to(b"W2")[0][3] == address  # the same task, attempt 2
    s.send(b"W2", mdp.worker02_partial(address, [b"y"]))
    s.send(b"W2", mdp.worker02_final(address, []))
    s.send(C, zbc.read(s.next_rid(), task_id, 0))
    answers = s.answers(C)
    runs = [(a.meta["offset"], a.meta["attempt"], list(a.frames)) for a in answers if a.chunks]
    assert runs == [(0, 1, [b"x"]), (1, 2, [b"y"])]
    assert answers[-1].meta["state"] == "done" and answers[-1].frames == ()


# ------------------------------------------------------------ authenticated


def test_mdpc02_requests_and_mdpw02_ready_are_guarded_like_their_7_mdp_twins() -> None:
    core = Guarded()
    # A client outside its globs: dropped and counted; within them: queued
    core.send(b"M1", "bob", mdp.client02_request(b"llm.small", [b"hi"]))
    assert core.broker.services.get(b"llm.small") is None
    assert core.broker.stats.forbidden == 1
    core.send(b"M1", "bob", mdp.client02_request(mdp.MMI_SERVICE, [b"tts"]))
    assert core.out(b"M1") == [[pid(b"M1"), *final(mdp.MMI_SERVICE, mdp.MMI_NOT_FOUND)]]
    core.send(b"M1", "bob", mdp.client02_request(b"tts", [b"hi"]))
    assert len(core.broker.services[b"tts"].queue) == 1
    # A worker READY for a service it may not serve: DISCONNECT, not registered
    core.send(b"W1", "gpu", mdp.worker02_ready(b"stt"))
    assert core.out(b"W1") == [[pid(b"W1"), *DISCONNECT]]
    assert pid(b"W1") not in core.broker.workers
    # For its own: registered, served, and only its principal speaks for it
    core.send(b"W2", "gpu", mdp.worker02_ready(b"tts"))
    (request,) = [f for f in core.out(b"W2") if f[2] == mdp.W02_REQUEST]
    assert request[1:3] == [mdp.MDPW02, mdp.W02_REQUEST] and request[5:] == [b"hi"]
    core.send(b"W2", "bob", mdp.worker02_final(request[3], [b"forged"]))
    assert core.out(b"M1") == []
    core.send(b"W2", "gpu", mdp.worker02_partial(request[3], [b"h"]))
    core.send(b"W2", "gpu", mdp.worker02_final(request[3], [b"hello"]))
    assert core.out(b"M1") == [
        [pid(b"M1"), *partial(b"tts", b"h")],
        [pid(b"M1"), *final(b"tts", b"hello")],
    ]
    # A worker on a routing id it chose is turned away in its own dialect
    core.send(b"chosen-id", "gpu", mdp.worker02_ready(b"tts"), raw=True)
    assert core.out(b"chosen-id", raw=True) == [[b"chosen-id", *DISCONNECT]]
    core.send(b"chosen-id", "gpu", mdp.worker02_heartbeat(), raw=True)
    assert core.out(b"chosen-id", raw=True) == [[b"chosen-id", *DISCONNECT]]
