"""Property tests: random event sequences against the core.

Whatever peers send and however time moves, the core never raises, every
request is in exactly one place (a queue, one worker, or finished), no client
ever receives two replies for one request, and none is lost.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from zbroker.core import Broker, CoreSettings
from zbroker.protocol import mdp
from zbroker.protocol.errors import ProtocolError

CFG = CoreSettings(heartbeat_interval_s=1.0, heartbeat_liveness=3, request_expiry_s=20.0)
WORKERS = [b"W1", b"W2", b"W3"]
CLIENTS = [b"C1", b"C2"]
SERVICES = [b"a", b"b"]

frames_st = st.lists(st.binary(max_size=12), max_size=7)

_request = st.tuples(st.just("request"), st.sampled_from(CLIENTS), st.sampled_from(SERVICES))
_ready = st.tuples(st.just("ready"), st.sampled_from(WORKERS), st.sampled_from(SERVICES))
_reply = st.tuples(st.just("reply"), st.sampled_from(WORKERS), st.booleans())
# Repeated branches weight the mix toward the conversations that move requests around.
event_st = st.one_of(
    _request,
    _request,
    _request,
    _ready,
    _ready,
    _reply,
    _reply,
    _reply,
    st.tuples(st.just("heartbeat"), st.sampled_from(WORKERS)),
    st.tuples(st.just("disconnect"), st.sampled_from(WORKERS)),
    st.tuples(st.just("unreachable"), st.sampled_from(WORKERS)),
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=8.0)),
    st.tuples(st.just("garbage"), st.sampled_from(WORKERS + CLIENTS), frames_st),
    st.tuples(st.just("mmi"), st.sampled_from(CLIENTS), st.binary(max_size=4)),
)


class Model:
    """Tracks request ids the test created through their body, and what clients got."""

    def __init__(self) -> None:
        self.now = 0.0
        self.broker = Broker(CFG, self.now)
        self.created = 0
        self.replies: Counter[bytes] = Counter()
        # Each worker's last REQUEST as it saw it: (client, request tag).
        self.assigned: dict[bytes, tuple[bytes, bytes]] = {}

    def drain(self) -> None:
        for frames in self.broker.outbox:
            peer = frames[0]
            if frames[2] == mdp.MDPW01 and frames[3] == mdp.REQUEST:
                self.assigned[peer] = (frames[4], frames[6])
            elif frames[2] == mdp.MDPC01 and not frames[3].startswith(b"mmi."):
                self.replies[frames[4]] += 1
        self.broker.outbox = []

    def apply(self, event: tuple[object, ...]) -> None:
        kind = event[0]
        b = self.broker
        if kind == "request":
            self.created += 1
            tag = b"req-%d" % self.created
            b.receive([event[1], *mdp.client_request(event[2], [tag])], self.now)  # type: ignore[list-item]
        elif kind == "ready":
            b.receive([event[1], *mdp.worker_ready(event[2])], self.now)  # type: ignore[list-item,arg-type]
        elif kind == "reply":
            wid = event[1]
            client, tag = self.assigned.get(wid, (b"C1", b"bogus"))  # type: ignore[arg-type]
            if not event[2]:
                client = b"wrong-client"
            b.receive([wid, *mdp.worker_reply(client, [tag])], self.now)  # type: ignore[list-item]
        elif kind == "heartbeat":
            b.receive([event[1], b"", mdp.MDPW01, mdp.HEARTBEAT], self.now)  # type: ignore[list-item]
        elif kind == "disconnect":
            b.receive([event[1], b"", mdp.MDPW01, mdp.DISCONNECT], self.now)  # type: ignore[list-item]
        elif kind == "unreachable":
            b.undeliverable([event[1], b"", mdp.MDPW01, mdp.HEARTBEAT], self.now)  # type: ignore[list-item]
        elif kind == "advance":
            end = self.now + event[1]  # type: ignore[operator]
            while b.next_tick_at <= end:
                self.now = b.next_tick_at
                b.tick(self.now)
                self.drain()
            self.now = end
        elif kind == "garbage":
            b.receive([event[1], *event[2]], self.now)  # type: ignore[list-item,misc]
        elif kind == "mmi":
            b.receive([event[1], *mdp.client_request(b"mmi.service", [event[2]])], self.now)  # type: ignore[list-item]
        self.drain()

    def check(self) -> None:
        b = self.broker
        places: Counter[int] = Counter()
        for service in b.services.values():
            for request in service.queue:
                places[request.id] += 1
            for wid, worker in service.workers.items():
                assert b.workers[wid] is worker
                assert worker.service is service
        for worker in b.workers.values():
            if worker.request is not None:
                places[worker.request.id] += 1
                assert worker.identity not in worker.service.idle, "busy worker listed as idle"
        assert all(n == 1 for n in places.values()), "a request is in two places"
        # No client got two replies for one request.
        assert all(n == 1 for n in self.replies.values()), self.replies
        # Conservation: every created request is held, replied, expired or refused.
        held = len(places)
        s = b.stats
        assert s.requests + s.refused_queue_full == self.created
        assert held + s.replies + s.expired == s.requests


@settings(max_examples=400, deadline=None)
@given(st.lists(event_st, max_size=80))
def test_random_sequences_never_raise_lose_or_duplicate(events: list[tuple[object, ...]]) -> None:
    model = Model()
    for event in events:
        model.apply(event)
        model.check()


header_st = st.sampled_from([mdp.MDPC01, mdp.MDPW01, b"MDPC02", b""])
command_st = st.sampled_from([b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b""])
message_st = st.one_of(
    st.lists(st.binary(max_size=20), max_size=10),
    st.builds(
        lambda ident, empty, header, command, rest: [ident, empty, header, command, *rest],
        st.binary(max_size=5),
        st.sampled_from([b"", b"x"]),
        header_st,
        command_st,
        st.lists(st.binary(max_size=8), max_size=5),
    ),
)


def _expected_malformed(frames: list[bytes]) -> bool:
    if len(frames) < 4 or frames[2] not in (mdp.MDPC01, mdp.MDPW01):
        return True
    decode = mdp.decode_client if frames[2] == mdp.MDPC01 else mdp.decode_worker
    try:
        decode(frames[1:])
    except ProtocolError:
        return True
    return False


@settings(max_examples=500, deadline=None)
@given(st.lists(message_st, max_size=40))
def test_arbitrary_frames_never_raise_and_bad_ones_are_counted(messages: list[list[bytes]]) -> None:
    b = Broker(CFG, 0.0)
    expected = 0
    for frames in messages:
        expected += _expected_malformed(frames)
        b.receive(frames, 0.0)
        b.outbox.clear()
    assert b.stats.malformed_total == expected
