"""ZBW01 workers in the core: credit, acknowledgements, fencing, failures."""

from __future__ import annotations

from tests.unit.core_script import CoreScript
from zbroker.core import CoreSettings
from zbroker.protocol import ext, mdp

SETTINGS = CoreSettings(
    heartbeat_interval_s=1.0, heartbeat_liveness=3, ack_timeout_s=2.0, request_max_attempts=2
)


class Script(CoreScript):
    def __init__(self, settings: CoreSettings = SETTINGS) -> None:
        super().__init__(settings)

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        self.broker.receive([peer, *frames], self.now)

    def zready(self, wid: bytes, service: str, credit: int) -> None:
        """Register a ZBW01 worker and consume the broker's greeting heartbeat."""
        self.send(wid, ext.ready(service, credit))
        greeting = [wid, b"", ext.ZBW01, ext.HEARTBEAT]
        if self.broker.outbox and self.broker.outbox[-1] == greeting:
            self.broker.outbox.pop()

    def client(self, cid: bytes, service: bytes, *body: bytes) -> None:
        self.send(cid, mdp.client_request(service, body))

    def tasks_to(self, peer: bytes) -> list[tuple[str, int, bytes]]:
        """(id, attempt, payload) of every TASK sent to `peer` since the last call."""
        found = []
        for frames in self.sent():
            if frames[0] == peer and frames[2:4] == [ext.ZBW01, ext.TASK]:
                meta = ext.unpack_meta(frames[4])
                found.append((meta["id"], meta["attempt"], frames[5]))
        return found


def test_credit_bounds_what_a_worker_holds_and_work_rotates_between_workers() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 3)
    s.zready(b"Z2", "svc", 3)
    for i in range(8):
        s.client(b"C", b"svc", b"%d" % i)
    out = s.sent()
    to_z1 = [f[5] for f in out if f[0] == b"Z1"]
    to_z2 = [f[5] for f in out if f[0] == b"Z2"]
    # Given credit 3 each, six requests go out, alternating, and two wait.
    assert to_z1 == [b"0", b"2", b"4"] and to_z2 == [b"1", b"3", b"5"]
    assert len(s.broker.services[b"svc"].queue) == 2


def test_done_routes_the_result_to_the_mdp_client_and_frees_credit() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 1)
    s.client(b"C", b"svc", b"a")
    s.client(b"C", b"svc", b"b")
    ((tid, attempt, payload),) = s.tasks_to(b"Z1")
    assert (attempt, payload) == (1, b"a")
    s.send(b"Z1", ext.done(tid, attempt, [b"A", b"more"]))
    out = s.sent()
    # The freed credit immediately carries the next request, then the reply goes out.
    assert out[0][0] == b"Z1" and out[0][5] == b"b"
    assert out[1] == [b"C", b"", mdp.MDPC01, b"svc", b"A", b"more"]


def test_unacknowledged_task_is_taken_back_and_redelivered_with_a_new_attempt() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 1)
    s.client(b"C", b"svc", b"job")
    ((tid, _attempt, _),) = s.tasks_to(b"Z1")
    s.zready(b"Z2", "svc", 1)
    s.send(b"Z2", ext.heartbeat())
    # When Z1 never acknowledges within ack_timeout_s
    s.advance(SETTINGS.ack_timeout_s + SETTINGS.tick_interval_s)
    out = s.sent()
    cancel = [f for f in out if f[0] == b"Z1" and f[3] == ext.CANCEL]
    assert [ext.unpack_meta(f[4]) for f in cancel] == [{"id": tid, "attempt": 1}]
    redelivered = [ext.unpack_meta(f[4]) for f in out if f[0] == b"Z2" and f[3] == ext.TASK]
    assert redelivered == [{"id": tid, "attempt": 2, "service": "svc"}]
    assert s.broker.stats.ack_timeouts == 1
    # Then Z1's late DONE for attempt 1 is refused; only Z2's result reaches the client.
    s.send(b"Z1", ext.done(tid, 1, [b"stale"]))
    assert s.sent() == []
    s.send(b"Z2", ext.done(tid, 2, [b"fresh"]))
    assert s.sent() == [[b"C", b"", mdp.MDPC01, b"svc", b"fresh"]]
    assert s.broker.stats.stale_refused == 1


def test_a_request_never_acknowledged_is_given_up_after_max_attempts() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 1)
    s.client(b"C", b"svc", b"job")
    attempts = []
    # When the only worker heartbeats but never acknowledges anything
    for _ in range(10):
        attempts += [a for _, a, _ in s.tasks_to(b"Z1")]
        s.advance(SETTINGS.ack_timeout_s + SETTINGS.tick_interval_s)
        s.send(b"Z1", ext.heartbeat())
    # Then the request is taken back each time, and dropped after request_max_attempts
    assert attempts == [1, 2]
    assert s.broker.stats.ack_timeouts == 2 and s.broker.stats.failed_permanently == 1
    assert not s.broker.services[b"svc"].queue and not s.broker.workers[b"Z1"].tasks


def test_acknowledged_task_stays_with_its_live_worker() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 1)
    s.client(b"C", b"svc", b"long job")
    ((tid, attempt, _),) = s.tasks_to(b"Z1")
    s.send(b"Z1", ext.ack([(tid, attempt)]))
    for _ in range(30):  # 30 s of heartbeats, far past the ack timeout
        s.advance(1.0)
        s.send(b"Z1", ext.heartbeat({"cpu": 0.5}))
    assert s.broker.workers[b"Z1"].tasks[tid].attempt == 1
    assert s.broker.workers[b"Z1"].metrics == {"cpu": 0.5}
    s.sent()
    s.send(b"Z1", ext.done(tid, attempt, [b"ok"]))
    assert s.sent() == [[b"C", b"", mdp.MDPC01, b"svc", b"ok"]]


def test_retryable_failure_retries_then_gives_up_after_max_attempts() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 1)
    s.client(b"C", b"svc", b"poison")
    ((tid, attempt, _),) = s.tasks_to(b"Z1")
    s.send(b"Z1", ext.fail(tid, attempt, "boom"))
    ((tid2, attempt2, _),) = s.tasks_to(b"Z1")
    assert (tid2, attempt2) == (tid, 2)
    s.send(b"Z1", ext.fail(tid, 2, "boom again"))
    assert s.sent() == []
    assert s.broker.stats.failed_permanently == 1
    assert not s.broker.services[b"svc"].queue


def test_non_retryable_failure_is_final_at_once() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 1)
    s.client(b"C", b"svc", b"bad input")
    ((tid, attempt, _),) = s.tasks_to(b"Z1")
    s.send(b"Z1", ext.fail(tid, attempt, "cannot parse", retry=False))
    assert s.sent() == []
    assert s.broker.stats.failed_permanently == 1


def test_worker_disconnect_requeues_everything_it_held_in_order() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 3)
    for body in (b"1", b"2", b"3", b"4"):
        s.client(b"C", b"svc", body)
    s.sent()
    s.send(b"Z1", ext.disconnect())
    s.zready(b"Z2", "svc", 10)
    assert [p for _, _, p in s.tasks_to(b"Z2")] == [b"1", b"2", b"3", b"4"]


def test_unknown_zbw_worker_is_told_to_disconnect_with_a_reason() -> None:
    s = Script()
    s.send(b"Z9", ext.done("m1", 1, [b"x"]))
    ((frames),) = s.sent()
    assert frames[:4] == [b"Z9", b"", ext.ZBW01, ext.DISCONNECT]
    assert "READY" in ext.unpack_meta(frames[4])["reason"]


def test_dialects_cannot_be_mixed_on_one_registration() -> None:
    s = Script()
    s.send(b"W1", mdp.worker_ready(b"svc"))
    s.send(b"W1", ext.heartbeat())
    assert s.sent()[-1] == [b"W1", b"", mdp.MDPW01, mdp.DISCONNECT]
    assert s.broker.workers == {}


def test_reserved_service_names_are_refused() -> None:
    s = Script()
    s.send(b"Z1", ext.ready("mmi.service", 1))
    assert s.sent()[0][3] == ext.DISCONNECT
    assert s.broker.workers == {}


def test_mmi_sees_zbw_workers() -> None:
    s = Script()
    s.zready(b"Z1", "tts", 2)
    s.client(b"C", b"mmi.service", b"tts")
    assert s.sent() == [[b"C", b"", mdp.MDPC01, b"mmi.service", b"200"]]


def test_broker_heartbeats_zbw_workers_in_their_dialect() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 1)
    s.advance(1.0)
    s.send(b"Z1", ext.heartbeat())
    assert [b"Z1", b"", ext.ZBW01, ext.HEARTBEAT] in s.sent()


def test_new_zbw_worker_is_greeted_in_its_dialect() -> None:
    s = Script()
    s.send(b"Z1", ext.ready("svc", 4))
    assert s.sent() == [[b"Z1", b"", ext.ZBW01, ext.HEARTBEAT]]


def test_heartbeat_with_unreadable_metrics_still_keeps_the_worker_alive() -> None:
    s = Script()
    s.zready(b"Z1", "svc", 1)
    bad = [b"", ext.ZBW01, ext.HEARTBEAT, b"\xc1"]  # not msgpack
    non_string_keys = [b"", ext.ZBW01, ext.HEARTBEAT, ext.pack_meta({"metrics": {1: 2}})]
    # Given a worker whose heartbeats carry metrics the broker cannot read
    for _ in range(10):
        s.advance(1.0)
        s.send(b"Z1", bad if s.now % 2 else non_string_keys)
    # Then it is alive far past its expiry, and only the metrics were counted as lost
    assert b"Z1" in s.broker.workers
    assert s.broker.stats.bad_metrics == 10
    assert s.broker.stats.malformed_total == 0


def test_requests_of_one_pass_leave_together_and_still_rotate() -> None:
    s = Script()
    s.send(b"Z1", ext.ready("svc", 4, batch=True))
    s.send(b"Z2", ext.ready("svc", 4, batch=True))
    s.sent()
    requests = [[b"C", *mdp.client_request(b"svc", [b"%d" % i])] for i in range(10)]
    s.broker.receive_many(requests, s.now)
    out = s.sent()
    # One TASKS per worker, work alternating between them, the rest queued.
    assert sorted(f[0] for f in out) == [b"Z1", b"Z2"]
    got = {}
    for frames in out:
        message = ext.decode_for_worker(frames[1:])
        assert isinstance(message, ext.Tasks)
        got[frames[0]] = [t.payload[0] for t in message.tasks]
    assert got == {b"Z1": [b"0", b"2", b"4", b"6"], b"Z2": [b"1", b"3", b"5", b"7"]}
    assert [r.body for r in s.broker.services[b"svc"].queue] == [(b"8",), (b"9",)]


def test_a_full_queue_in_a_pass_delivers_before_it_refuses() -> None:
    s = Script(CoreSettings(heartbeat_interval_s=1.0, max_queued_per_service=2))
    s.send(b"Z1", ext.ready("svc", 3, batch=True))
    s.sent()
    requests = [[b"C", *mdp.client_request(b"svc", [b"%d" % i])] for i in range(6)]
    s.broker.receive_many(requests, s.now)
    # Three go to the worker, two wait in the queue (its cap), one is refused:
    # as if each had been received alone.
    delivered = [f for f in s.sent() if f[0] == b"Z1"]
    held = sum(
        len(m.tasks) if isinstance(m, ext.Tasks) else 1
        for m in (ext.decode_for_worker(f[1:]) for f in delivered)
    )
    assert held == 3
    assert len(s.broker.services[b"svc"].queue) == 2
    assert s.broker.stats.refused_queue_full == 1
