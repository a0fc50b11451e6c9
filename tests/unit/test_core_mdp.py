"""The broker core as scripted conversations: frames in, frames out, time by argument."""

from __future__ import annotations

import pytest

from tests.unit.core_script import CoreScript
from zbroker.core import CoreSettings
from zbroker.protocol import mdp

HB = 1.0
SETTINGS = CoreSettings(heartbeat_interval_s=HB, heartbeat_liveness=3, request_expiry_s=10.0)


class Script(CoreScript):
    """Drives a Broker with MDP messages from named peers and collects what it sends."""

    def __init__(self, settings: CoreSettings = SETTINGS) -> None:
        super().__init__(settings)

    def client(self, cid: bytes, service: bytes, *body: bytes) -> None:
        self.broker.receive([cid, *mdp.client_request(service, body)], self.now)

    def ready(self, wid: bytes, service: bytes) -> None:
        """Register a worker and consume the broker's greeting (see the greeting tests)."""
        self.broker.receive([wid, *mdp.worker_ready(service)], self.now)
        greeting = [wid, b"", mdp.MDPW01, mdp.HEARTBEAT]
        if self.broker.outbox and self.broker.outbox[-1] == greeting:
            self.broker.outbox.pop()

    def reply(self, wid: bytes, client: bytes, *body: bytes) -> None:
        self.broker.receive([wid, *mdp.worker_reply(client, body)], self.now)

    def heartbeat(self, wid: bytes) -> None:
        self.broker.receive([wid, b"", mdp.MDPW01, mdp.HEARTBEAT], self.now)

    def disconnect(self, wid: bytes) -> None:
        self.broker.receive([wid, b"", mdp.MDPW01, mdp.DISCONNECT], self.now)

    def sent_to(self, peer: bytes) -> list[list[bytes]]:
        return [m[1:] for m in self.sent() if m[0] == peer]


def request_to(wid: bytes, client: bytes, *body: bytes) -> list[bytes]:
    return [wid, *mdp.worker_request(client, body)]


def reply_to(cid: bytes, service: bytes, *body: bytes) -> list[bytes]:
    return [cid, *mdp.client_reply(service, body)]


DISCONNECT = [b"", mdp.MDPW01, mdp.DISCONNECT]


def test_request_is_pushed_to_a_ready_worker_and_the_reply_routed_back() -> None:
    s = Script()
    s.ready(b"W1", b"echo")
    s.client(b"C1", b"echo", b"hello", b"world")
    assert s.sent() == [request_to(b"W1", b"C1", b"hello", b"world")]
    s.reply(b"W1", b"C1", b"HELLO")
    assert s.sent() == [reply_to(b"C1", b"echo", b"HELLO")]
    assert s.broker.stats.replies == 1


def test_request_waits_for_a_worker_that_arrives_later() -> None:
    s = Script()
    s.client(b"C1", b"tts", b"say this")
    assert s.sent() == []
    s.advance(5.0)
    s.ready(b"W1", b"tts")
    assert s.sent() == [request_to(b"W1", b"C1", b"say this")]


def test_queued_request_expires_and_is_counted() -> None:
    s = Script()
    s.client(b"C1", b"nobody", b"x")
    s.advance(SETTINGS.request_expiry_s + 1.0)
    assert s.broker.stats.expired == 1
    s.ready(b"W1", b"nobody")
    assert s.sent() == []  # the expired request is gone for good
    assert b"nobody" in s.broker.services  # the service now has a worker


def test_one_request_per_worker_and_fair_rotation() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.ready(b"W2", b"svc")
    for i in range(3):
        s.client(b"C", b"svc", b"%d" % i)
    # Given two idle workers, the first two requests go one to each, the third waits.
    assert s.sent() == [request_to(b"W1", b"C", b"0"), request_to(b"W2", b"C", b"1")]
    s.reply(b"W2", b"C", b"r1")
    # The worker gets its next request before the reply is forwarded (its round trip
    # is the critical path).
    assert s.sent() == [request_to(b"W2", b"C", b"2"), reply_to(b"C", b"svc", b"r1")]
    s.reply(b"W1", b"C", b"r0")
    s.reply(b"W2", b"C", b"r2")
    s.sent()
    # Then W1 has waited longest, so it gets the next request.
    s.client(b"C", b"svc", b"3")
    assert s.sent() == [request_to(b"W1", b"C", b"3")]


def test_busy_worker_is_declared_dead_when_silent_and_its_request_goes_to_another() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.client(b"C", b"svc", b"job")
    s.ready(b"W2", b"svc")
    s.client(b"C", b"svc", b"job2")
    assert s.sent() == [request_to(b"W1", b"C", b"job"), request_to(b"W2", b"C", b"job2")]
    # W2 keeps heartbeating while busy; W1 goes silent.
    for _ in range(4):
        s.advance(HB)
        s.heartbeat(b"W2")
    assert b"W1" not in s.broker.workers
    assert s.broker.stats.workers_expired == 1
    s.reply(b"W2", b"C", b"done2")
    # The requeued request goes to the next worker free, W2.
    assert s.sent()[-2:] == [request_to(b"W2", b"C", b"job"), reply_to(b"C", b"svc", b"done2")]


def test_idle_worker_expires_too() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.advance(SETTINGS.worker_expiry_s + SETTINGS.tick_interval_s)
    assert s.broker.workers == {}


def test_heartbeats_keep_a_worker_alive_and_the_broker_heartbeats_back() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    for _ in range(10):
        s.advance(HB)
        s.heartbeat(b"W1")
    assert b"W1" in s.broker.workers
    heartbeats = [m for m in s.sent_to(b"W1") if m == [b"", mdp.MDPW01, mdp.HEARTBEAT]]
    assert 8 <= len(heartbeats) <= 11


def test_late_reply_from_dead_worker_is_dropped_and_the_worker_told_to_disconnect() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.client(b"C", b"svc", b"job")
    s.sent()
    s.advance(SETTINGS.worker_expiry_s + 1.0)  # W1 declared dead, request requeued
    s.sent()  # heartbeats sent to W1 while it was still presumed alive
    s.ready(b"W2", b"svc")
    assert s.sent() == [request_to(b"W2", b"C", b"job")]
    s.reply(b"W1", b"C", b"late")
    assert s.sent() == [[b"W1", *DISCONNECT]]
    s.reply(b"W2", b"C", b"right")
    assert s.sent() == [reply_to(b"C", b"svc", b"right")]
    assert s.broker.stats.replies == 1
    assert s.broker.stats.late_replies_dropped == 1


def test_worker_disconnect_requeues_its_request_at_the_front() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.client(b"C", b"svc", b"first")
    s.client(b"C", b"svc", b"second")
    s.sent()
    s.disconnect(b"W1")
    s.ready(b"W2", b"svc")
    assert s.sent() == [request_to(b"W2", b"C", b"first")]
    assert s.broker.stats.requeued == 1


def test_unreachable_worker_is_removed_and_its_request_redelivered() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.ready(b"W2", b"svc")
    s.client(b"C", b"svc", b"job")
    (failed,) = s.sent()
    assert failed[0] == b"W1"
    # When the socket refuses the send (peer gone), the core requeues and redelivers.
    s.broker.undeliverable(failed, s.now)
    assert s.sent() == [request_to(b"W2", b"C", b"job")]
    assert s.broker.stats.workers_unreachable == 1


def test_undeliverable_reply_is_counted_and_the_worker_kept() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.client(b"C", b"svc", b"job")
    s.sent()
    s.reply(b"W1", b"C", b"r")
    (reply,) = s.sent()
    s.broker.undeliverable(reply, s.now)
    assert s.broker.stats.replies_undeliverable == 1
    assert b"W1" in s.broker.services[b"svc"].ready


@pytest.mark.parametrize(
    "frames",
    [
        [b"", mdp.MDPW01, mdp.READY, b"svc"],  # a second READY
        [b"", mdp.MDPW01, mdp.REPLY, b"C", b"", b"unasked"],  # REPLY with no request
    ],
)
def test_unexpected_command_from_known_worker_gets_disconnect(frames: list[bytes]) -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.broker.receive([b"W1", *frames], s.now)
    assert s.sent() == [[b"W1", *DISCONNECT]]
    assert b"W1" not in s.broker.workers


def test_reply_for_another_client_is_a_violation_and_the_request_is_requeued() -> None:
    s = Script()
    s.ready(b"W1", b"svc")
    s.client(b"C", b"svc", b"job")
    s.sent()
    s.reply(b"W1", b"SOMEONE-ELSE", b"r")
    assert s.sent() == [[b"W1", *DISCONNECT]]
    assert list(r.body for r in s.broker.services[b"svc"].queue) == [(b"job",)]


def test_heartbeat_from_unknown_worker_gets_disconnect_so_it_re_registers() -> None:
    s = Script()  # e.g. the broker restarted and the worker does not know yet
    s.heartbeat(b"W9")
    assert s.sent() == [[b"W9", *DISCONNECT]]


def test_worker_may_not_register_an_mmi_service() -> None:
    s = Script()
    s.ready(b"W1", b"mmi.service")
    assert s.sent() == [[b"W1", *DISCONNECT]]
    assert s.broker.workers == {}


def test_mmi_service_reports_live_workers_only() -> None:
    s = Script()
    s.client(b"C", b"mmi.service", b"echo")
    assert s.sent() == [reply_to(b"C", b"mmi.service", b"404")]
    s.ready(b"W1", b"echo")
    s.client(b"C", b"mmi.service", b"echo")
    assert s.sent() == [reply_to(b"C", b"mmi.service", b"200")]
    # Past its expiry but before the next tick reaps it, the worker is not live.
    s.now += SETTINGS.worker_expiry_s + 0.01
    s.client(b"C", b"mmi.service", b"echo")
    assert s.sent()[-1] == reply_to(b"C", b"mmi.service", b"404")


def test_mmi_unknown_query_is_501_and_mmi_requests_are_never_queued() -> None:
    s = Script()
    s.client(b"C", b"mmi.nope", b"x")
    assert s.sent() == [reply_to(b"C", b"mmi.nope", b"501")]
    assert s.broker.services == {}


def test_queue_cap_refuses_and_counts() -> None:
    s = Script(CoreSettings(heartbeat_interval_s=HB, max_queued_per_service=2))
    for _ in range(5):
        s.client(b"C", b"svc", b"x")
    assert len(s.broker.services[b"svc"].queue) == 2
    assert s.broker.stats.refused_queue_full == 3


def test_the_bytes_of_queued_requests_are_capped_across_services() -> None:
    # Given a broker that holds at most 1 MiB of MDP requests in memory
    s = Script(CoreSettings(heartbeat_interval_s=HB, max_queued_bytes=1 << 20))
    big = b"x" * (400 << 10)
    # When requests of 400 KiB each come for services nobody serves
    for i in range(4):
        s.client(b"C", b"svc%d" % i, big)
    # Then two fit and the rest are refused and counted, whatever their service
    assert sum(len(sv.queue) for sv in s.broker.services.values()) == 2
    assert s.broker.stats.refused_queue_full == 2
    assert s.broker.requests.queued_bytes == 2 * len(big)
    # And a delivery makes room again; a request the worker gives back counts again
    s.ready(b"W1", b"svc0")
    assert s.broker.requests.queued_bytes == len(big)
    s.client(b"C", b"svc2", big)
    assert s.broker.stats.refused_queue_full == 2
    s.disconnect(b"W1")  # its request goes back to the front of svc0's queue
    assert s.broker.requests.queued_bytes == 3 * len(big)
    # And expiry frees its share
    s.advance(SETTINGS.request_expiry_s + 60.0)
    assert s.broker.requests.queued_bytes == 0


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"C"], "missing_frames"),
        ([b"C", b"", b"MDPC01"], "missing_frames"),
        ([b"C", b"", b"XXXX01", b"svc"], "bad_header"),
        ([b"C", b"x", b"MDPC01", b"svc"], "bad_delimiter"),
        ([b"W", b"", b"MDPW01", b"\x09"], "unknown_command"),
        ([b"W", b"", b"MDPW01", mdp.READY], "missing_frames"),
        ([b"W", b"", b"MDPW01", mdp.REPLY, b"C"], "missing_frames"),
        ([b"W", b"", b"MDPW01", mdp.HEARTBEAT, b"extra"], "extra_frames"),
        ([b"C", b"", b"MDPC01", b"svc", b"x" * 2000], "oversized"),
        ([b"C", b"", b"MDPC01", b"svc", *([b"x"] * 100)], "too_many_frames"),
    ],
)
def test_malformed_messages_are_dropped_and_counted_by_reason(
    frames: list[bytes], reason: str
) -> None:
    s = Script(CoreSettings(heartbeat_interval_s=HB, max_message_bytes=1024, max_frames=32))
    s.broker.receive(frames, s.now)
    assert s.sent() == []
    assert s.broker.stats.malformed == {reason: 1}


def test_forgotten_services_are_cleaned_up() -> None:
    s = Script()
    s.client(b"C", b"typo-service", b"x")
    s.advance(SETTINGS.request_expiry_s + 1.0)
    assert b"typo-service" not in s.broker.services


def test_new_worker_is_greeted_with_a_heartbeat_when_there_is_no_work() -> None:
    s = Script()
    s.broker.receive([b"W1", *mdp.worker_ready(b"svc")], s.now)
    assert s.sent() == [[b"W1", b"", mdp.MDPW01, mdp.HEARTBEAT]]


def test_new_worker_with_work_waiting_gets_the_work_instead_of_a_greeting() -> None:
    s = Script()
    s.client(b"C", b"svc", b"job")
    s.broker.receive([b"W1", *mdp.worker_ready(b"svc")], s.now)
    assert s.sent() == [request_to(b"W1", b"C", b"job")]


def test_a_huge_service_name_is_cut_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    s = Script()
    name = b"s" * 100_000
    with caplog.at_level("DEBUG", logger="zbroker.core"):
        s.ready(b"W", name)
        s.client(b"C", name, b"job")
        s.disconnect(b"W")
    assert caplog.records and all(len(r.getMessage()) < 1000 for r in caplog.records)
    assert any("(100000 bytes)" in r.getMessage() for r in caplog.records)
