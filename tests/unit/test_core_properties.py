"""Property tests: random event sequences against the core.

Whatever peers send and however time moves, the core never raises, every
request is in exactly one place (a queue, one worker, or finished), no client
ever receives two replies for one request, and none is lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from zbroker.core import Broker, CoreSettings
from zbroker.protocol import ext, mdp
from zbroker.protocol.errors import ProtocolError

CFG = CoreSettings(
    heartbeat_interval_s=1.0, heartbeat_liveness=3, request_expiry_s=20.0, ack_timeout_s=2.5
)
WORKERS = [b"W1", b"W2", b"W3"]  # stock MDP workers
ZWORKERS = [b"Z1", b"Z2"]  # ZBW01 workers with credit
CLIENTS = [b"C1", b"C2"]
SERVICES = [b"a", b"b"]

frames_st = st.lists(st.binary(max_size=12), max_size=7)

_request = st.tuples(st.just("request"), st.sampled_from(CLIENTS), st.sampled_from(SERVICES))
_ready = st.tuples(st.just("ready"), st.sampled_from(WORKERS), st.sampled_from(SERVICES))
_zready = st.tuples(
    st.just("zready"),
    st.sampled_from(ZWORKERS),
    st.sampled_from(SERVICES),
    st.integers(min_value=1, max_value=4),
    st.booleans(),  # takes TASKS batches
)
_reply = st.tuples(st.just("reply"), st.sampled_from(WORKERS), st.booleans())
# (worker, which held task, whether to use the right attempt number)
_done = st.tuples(st.just("done"), st.sampled_from(ZWORKERS), st.integers(0, 3), st.booleans())
_fail = st.tuples(st.just("fail"), st.sampled_from(ZWORKERS), st.integers(0, 3), st.booleans())
_ack = st.tuples(st.just("ack"), st.sampled_from(ZWORKERS), st.integers(0, 3))
# Repeated branches weight the mix toward the conversations that move requests around.
event_st = st.one_of(
    _request,
    _request,
    _request,
    _ready,
    _zready,
    _reply,
    _reply,
    _done,
    _done,
    _fail,
    _ack,
    st.tuples(st.just("heartbeat"), st.sampled_from(WORKERS + ZWORKERS)),
    st.tuples(st.just("disconnect"), st.sampled_from(WORKERS + ZWORKERS)),
    st.tuples(st.just("unreachable"), st.sampled_from(WORKERS + ZWORKERS)),
    st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=8.0)),
    st.tuples(st.just("garbage"), st.sampled_from(WORKERS + CLIENTS), frames_st),
    st.tuples(st.just("mmi"), st.sampled_from(CLIENTS), st.binary(max_size=4)),
)

# What a ZBW01 worker sends for ("done" | "fail" | "ack", task id, attempt, tag).
_REPORTS: dict[str, Callable[[str, int, bytes], list[bytes]]] = {
    "done": lambda task_id, attempt, tag: ext.done(task_id, attempt, [tag]),
    "fail": lambda task_id, attempt, tag: ext.fail(task_id, attempt, "boom", retry=True),
    "ack": lambda task_id, attempt, tag: ext.ack([(task_id, attempt)]),
}


def _is_client_request(frames: list[bytes]) -> bool:
    return frames[:2] == [b"", mdp.MDPC01] and len(frames) > 2 and bool(frames[2])


class Model:
    """Drives the core like peers would, tracking what each peer was given."""

    def __init__(self, grouped: bool = False) -> None:
        self.now = 0.0
        self.broker = Broker(CFG, self.now)
        # Grouped: messages wait for end_pass() and go in with one receive_many, as
        # the runtime feeds a pass; otherwise each goes in at once with receive.
        self.pending: list[list[bytes]] | None = [] if grouped else None
        self.created = 0
        self.replies: Counter[bytes] = Counter()
        # MDP worker -> (client, tag) of its last REQUEST.
        self.assigned: dict[bytes, tuple[bytes, bytes]] = {}
        # ZBW01 worker -> {task id: (attempt, tag)} as it was told (TASK adds, CANCEL removes).
        self.held: dict[bytes, dict[str, tuple[int, bytes]]] = {}
        # Event kind -> the step that plays it.
        self._steps: dict[str, Callable[[tuple[Any, ...]], None]] = {
            "request": self._request,
            "ready": self._ready,
            "zready": self._zready,
            "reply": self._reply,
            "done": self._report,
            "fail": self._report,
            "ack": self._report,
            "heartbeat": self._heartbeat,
            "disconnect": self._disconnect,
            "unreachable": self._unreachable,
            "advance": self._advance,
            "garbage": self._garbage,
            "mmi": self._mmi,
        }

    def drain(self) -> None:
        for frames in self.broker.outbox:
            peer = frames[0]
            if frames[2] == mdp.MDPW01 and frames[3] == mdp.REQUEST:
                self.assigned[peer] = (frames[4], frames[6])
            elif frames[2] == ext.ZBW01 and frames[3] in (ext.TASK, ext.TASKS):
                message = ext.decode_for_worker(frames[1:])
                tasks = message.tasks if isinstance(message, ext.Tasks) else (message,)
                for task in tasks:
                    assert isinstance(task, ext.Task)
                    self.held.setdefault(peer, {})[task.id] = (task.attempt, task.payload[0])
            elif frames[2] == ext.ZBW01 and frames[3] == ext.CANCEL:
                meta = ext.unpack_meta(frames[4])
                self.held.get(peer, {}).pop(meta["id"], None)
            elif frames[2] == mdp.MDPC01 and not frames[3].startswith(b"mmi."):
                self.replies[frames[4]] += 1
        self.broker.outbox = []

    def send(self, frames: list[bytes]) -> None:
        if self.pending is None:
            self.broker.receive(frames, self.now)
        else:
            self.pending.append(frames)

    def end_pass(self) -> None:
        if self.pending:
            messages, self.pending = self.pending, []
            self.broker.receive_many(messages, self.now)
        self.drain()

    def _pick(self, wid: bytes, index: int) -> tuple[str, int, bytes] | None:
        tasks = list(self.held.get(wid, {}).items())
        if not tasks:
            return None
        task_id, (attempt, tag) = tasks[index % len(tasks)]
        return task_id, attempt, tag

    def apply(self, event: tuple[Any, ...]) -> None:
        if event[0] == "garbage" and _is_client_request(event[2]):
            return  # a well-formed client request, not garbage: "request" covers those
        self._steps[event[0]](event)
        self.drain()

    def _request(self, event: tuple[Any, ...]) -> None:
        self.created += 1
        tag = b"req-%d" % self.created
        self.send([event[1], *mdp.client_request(event[2], [tag])])

    def _ready(self, event: tuple[Any, ...]) -> None:
        self.send([event[1], *mdp.worker_ready(event[2])])

    def _zready(self, event: tuple[Any, ...]) -> None:
        self.held[event[1]] = {}
        self.send([event[1], *ext.ready(event[2].decode(), event[3], batch=event[4])])

    def _reply(self, event: tuple[Any, ...]) -> None:
        wid = event[1]
        client, tag = self.assigned.get(wid, (b"C1", b"bogus"))
        if not event[2]:
            client = b"wrong-client"
        self.send([wid, *mdp.worker_reply(client, [tag])])

    def _report(self, event: tuple[Any, ...]) -> None:
        """DONE, FAIL or ACK of a task the worker holds (a bogus one if it holds none)."""
        kind, wid = event[0], event[1]
        b = self.broker
        picked = self._pick(wid, event[2])
        if picked is None:
            task_id, attempt, tag = "m999", 1, b"bogus"
        else:
            task_id, attempt, tag = picked
        stale = kind != "ack" and not event[3]
        if stale:
            attempt += 1  # a stale or future attempt: must be refused
            self.end_pass()  # measure this message alone
        before = (sum(self.replies.values()), b.stats.failures, b.stats.replies)
        self.send([wid, *_REPORTS[kind](task_id, attempt, tag)])
        if kind != "ack" and picked is not None and event[3]:
            self.held[wid].pop(task_id, None)
        if stale:
            self.end_pass()
            after = (sum(self.replies.values()), b.stats.failures, b.stats.replies)
            assert after == before, "a report about the wrong attempt was accepted"

    def _heartbeat(self, event: tuple[Any, ...]) -> None:
        if event[1] in ZWORKERS:
            self.send([event[1], *ext.heartbeat()])
        else:
            self.send([event[1], b"", mdp.MDPW01, mdp.HEARTBEAT])

    def _disconnect(self, event: tuple[Any, ...]) -> None:
        if event[1] in ZWORKERS:
            self.send([event[1], *ext.disconnect()])
        else:
            self.send([event[1], b"", mdp.MDPW01, mdp.DISCONNECT])

    def _unreachable(self, event: tuple[Any, ...]) -> None:
        self.end_pass()
        header = ext.ZBW01 if event[1] in ZWORKERS else mdp.MDPW01
        self.broker.undeliverable([event[1], b"", header, b"\x07"], self.now)

    def _advance(self, event: tuple[Any, ...]) -> None:
        self.end_pass()
        b = self.broker
        end = self.now + event[1]
        while b.next_tick_at <= end:
            self.now = b.next_tick_at
            b.tick(self.now)
            self.drain()
        self.now = end

    def _garbage(self, event: tuple[Any, ...]) -> None:
        self.send([event[1], *event[2]])

    def _mmi(self, event: tuple[Any, ...]) -> None:
        self.send([event[1], *mdp.client_request(b"mmi.service", [event[2]])])

    def check(self) -> None:
        b = self.broker
        places: Counter[int] = Counter()
        for service in b.services.values():
            for request in service.queue:
                places[request.id] += 1
            for wid, worker in service.workers.items():
                assert b.workers[wid] is worker
                assert worker.service is service
            # Never a ready worker while requests wait.
            assert not (service.queue and service.ready), "work waits beside a ready worker"
            for worker in service.ready.values():
                assert len(worker.tasks) < worker.credit, "a full worker is listed as ready"
        for worker in b.workers.values():
            assert len(worker.tasks) <= worker.credit, "a worker holds more than its credit"
            for tid, request in worker.tasks.items():
                assert request.tid == tid
                places[request.id] += 1
        assert all(n == 1 for n in places.values()), "a request is in two places"
        # No client got two replies for one request.
        assert all(n == 1 for n in self.replies.values()), self.replies
        # Conservation: every created request is held, replied, expired, failed or refused.
        s = b.stats
        assert s.requests + s.refused_queue_full == self.created
        assert len(places) + s.replies + s.expired + s.failed_permanently == s.requests


@settings(max_examples=500, deadline=None)
@given(st.lists(event_st, max_size=80))
def test_random_sequences_never_raise_lose_or_duplicate(events: list[tuple[Any, ...]]) -> None:
    model = Model()
    for event in events:
        model.apply(event)
        model.check()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(event_st, st.booleans()), max_size=80))
def test_passes_of_many_messages_never_lose_or_duplicate(
    events: list[tuple[tuple[Any, ...], bool]],
) -> None:
    """As above, with messages fed a pass at a time (receive_many), passes ending
    where the drawn boolean says: deferring deliveries to the end of a pass keeps
    every invariant."""
    model = Model(grouped=True)
    for event, pass_ends in events:
        model.apply(event)
        if pass_ends:
            model.end_pass()
            model.check()
    model.end_pass()
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
