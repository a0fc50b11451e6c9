"""Topic events across languages: Node Publisher -> Python Subscriber and Python
Publisher -> Node Subscriber, through a real broker's XSUB/XPUB proxy.

Pub/sub drops what is published before a subscription has reached the broker (the
"slow joiner"), so each test first publishes probes until one arrives, then the
events it checks, in one run from one publisher (ZeroMQ keeps their order).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import msgpack
import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.crosslang.nodeproc import NodeFactory, NodeProcess, b64, unb64
from zbroker.client import Client, Event, Publisher, Subscriber

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]

PAYLOAD: dict[str, Any] = {
    "path": "/tmp/a.wav",
    "size": 12345,
    "neg": -7,
    "big": 2**40,
    "ratio": 0.5,
    "raw": b"\x80\xc3\x28\x00\xff",
    "tags": ["a", "ü"],
    "none": None,
    "ok": True,
    "nested": {"k": [1, 2.5, b"\x00"]},
}

# What each test publishes after the probes: (type, payload, correlation_id, reply_to).
SEQUENCE: list[tuple[str, Any, str | None, str | None]] = [
    ("transcript.final", {"text": "not subscribed"}, None, None),
    ("fs.change", PAYLOAD, "flow-42", "fs.ack"),
    ("fsx.other", "the prefix is fs. with the dot", None, None),
    ("fs.delete", None, None, None),
]
SUBSCRIBED = ["fs.change", "fs.delete"]


def pack(value: Any) -> str:
    return b64(msgpack.packb(value, use_bin_type=True))


def unpack(text: str) -> Any:
    return msgpack.unpackb(unb64(text), raw=False)


@pytest.fixture
def node_events(broker: BrokerProcess, node: NodeFactory) -> NodeProcess:
    return node("events.mjs", broker.events_in, broker.events_out, "node-watcher")


def node_publish(
    proc: NodeProcess, type_: str, payload: Any, correlation_id: str | None, reply_to: str | None
) -> dict[str, Any]:
    sent: dict[str, Any] = proc.call(
        "publish",
        type=type_,
        payload=pack(payload),
        correlationId=correlation_id,
        replyTo=reply_to,
    )
    return sent


def node_subscribed(
    stack: ExitStack, broker: BrokerProcess, proc: NodeProcess, topics: list[str], source: str
) -> Publisher:
    """Subscribe the Node process to `topics` (one of them "sync.") and return a Python
    Publisher whose "sync.probe" events it has begun to receive."""
    proc.call("subscribe", topics=topics)
    pub = stack.enter_context(Publisher(broker.events_in, source=source))

    def probe_arrived() -> bool:
        pub.publish("sync.probe")
        return bool(proc.seen(lambda m: m.get("type") == "sync.probe"))

    wait_until(probe_arrived)
    return pub


def test_node_publisher_to_python_subscriber(
    broker: BrokerProcess, node_events: NodeProcess, stack: ExitStack
) -> None:
    # Given a Python subscriber of the prefixes "fs." and "sync."
    sub = stack.enter_context(Subscriber(broker.events_out, "fs.", "sync."))

    def probe_arrived() -> bool:
        node_publish(node_events, "sync.probe", None, None, None)
        event = sub.recv(timeout_s=0.05)
        return event is not None and event.type == "sync.probe"

    wait_until(probe_arrived)
    # When the Node publisher publishes events on four topics, then an end marker
    sent = {t: node_publish(node_events, t, p, c, r) for t, p, c, r in SEQUENCE}
    node_publish(node_events, "sync.end", None, None, None)
    received: list[Event] = []
    while True:
        event = sub.recv(timeout_s=10)
        assert event is not None, "sync.end never arrived"
        if event.type == "sync.end":
            break
        if event.type != "sync.probe":
            received.append(event)
    # Then only the topics under "fs." arrived, in order
    assert [e.type for e in received] == SUBSCRIBED
    # And every envelope field is what the Node side reports it sent
    for event in received:
        node_sent = sent[event.type]
        assert event.type == node_sent["type"]
        assert event.source == node_sent["source"] == "node-watcher"
        assert event.payload == unpack(node_sent["payload"])
        assert event.timestamp == node_sent["timestamp"]
        assert event.correlation_id == node_sent["correlationId"]
        assert event.reply_to == node_sent["replyTo"]
    change, delete = received
    assert change.payload == PAYLOAD
    assert (change.correlation_id, change.reply_to) == ("flow-42", "fs.ack")
    assert delete.payload is None
    assert (delete.correlation_id, delete.reply_to) == (None, None)


def test_python_publisher_to_node_subscriber(
    broker: BrokerProcess, node_events: NodeProcess, stack: ExitStack
) -> None:
    # Given a Node subscriber of the prefixes "fs." and "sync."
    pub = node_subscribed(stack, broker, node_events, ["fs.", "sync."], "py-watcher")
    # When the Python publisher publishes events on four topics, then an end marker
    sent = {t: pub.publish(t, p, correlation_id=c, reply_to=r) for t, p, c, r in SEQUENCE}
    pub.publish("sync.end")
    node_events.wait_for(lambda m: m.get("type") == "sync.end", what="sync.end")
    received = node_events.seen(
        lambda m: m.get("event") == "event" and not m["type"].startswith("sync.")
    )
    # Then only the topics under "fs." arrived, in order
    assert [m["type"] for m in received] == SUBSCRIBED
    # And every envelope field the Node subscriber decoded equals what Python sent
    for message in received:
        event = sent[message["type"]]
        assert message["topic"] == message["type"] == event.type
        assert message["source"] == event.source == "py-watcher"
        assert unpack(message["payload"]) == event.payload
        assert message["timestamp"] == event.timestamp
        assert message["correlationId"] == event.correlation_id
        assert message["replyTo"] == event.reply_to


def test_node_envelope_on_the_wire_matches_the_protocol(
    broker: BrokerProcess, node_events: NodeProcess, zmq_ctx: Ctx
) -> None:
    """docs/protocol.md §6: exactly two frames; an envelope map with the required keys,
    the optional ones only when set; strings as str, bytes as bin."""
    sub = zmq_ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(broker.events_out)
    sub.subscribe(b"fs.")

    def arrived() -> bool:
        node_publish(node_events, "fs.probe", None, None, None)
        return bool(sub.poll(50))

    wait_until(arrived)
    while sub.poll(100):
        sub.recv_multipart()
    node_publish(node_events, "fs.change", PAYLOAD, "flow-42", "fs.ack")
    node_publish(node_events, "fs.delete", None, None, None)
    frames = [sub.recv_multipart() for _ in range(2)]
    assert [len(f) for f in frames] == [2, 2]
    (topic1, env1), (topic2, env2) = frames
    change = msgpack.unpackb(env1, raw=False)
    delete = msgpack.unpackb(env2, raw=False)
    assert topic1 == b"fs.change" and topic2 == b"fs.delete"
    assert set(change) == {"type", "source", "payload", "timestamp", "correlation_id", "reply_to"}
    assert set(delete) == {"type", "source", "payload", "timestamp"}
    assert change["type"] == "fs.change" and change["source"] == "node-watcher"
    assert change["payload"] == PAYLOAD  # bytes came back as bytes: packed as msgpack bin
    assert delete["payload"] is None
    assert isinstance(change["timestamp"], int | float)


def test_node_timestamp_is_a_msgpack_float_even_on_a_whole_second(
    broker: BrokerProcess, node: NodeFactory, zmq_ctx: Ctx
) -> None:
    proc = node("events.mjs", broker.events_in, broker.events_out, "clock")
    sub = zmq_ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(broker.events_out)
    sub.subscribe(b"clock.")

    def arrived() -> bool:
        proc.call("publish", type="clock.probe", payload=pack(None))
        return bool(sub.poll(50))

    wait_until(arrived)
    while sub.poll(100):
        sub.recv_multipart()
    # When the Node publisher's clock reads a whole second (1700000000.000)
    proc.call("publish", type="clock.tick", payload=pack(None), fakeNowMs=1_700_000_000_000)
    _, envelope = sub.recv_multipart()
    # Then the timestamp is still a msgpack float (0xcb float 64 or 0xca float 32)
    timestamp_marker = envelope[envelope.index(b"timestamp") + len(b"timestamp")]
    assert timestamp_marker in (0xCA, 0xCB), hex(timestamp_marker)


def test_batches_reach_the_node_subscriber_as_separate_events_in_order(
    broker: BrokerProcess, node_events: NodeProcess, stack: ExitStack
) -> None:
    # Given a Node subscriber of the broker's task.enqueued.* events and of "sync."
    pub = node_subscribed(stack, broker, node_events, ["task.enqueued.", "sync."], "py-batcher")
    # When the broker stores 30 tasks in one pass (one batch message on the wire)
    # and a Python publisher sends a batch of its own
    with Client(broker.endpoint) as client:
        ids = client.enqueue_many("xl", [b"%d" % i for i in range(30)])
    pub.publish_many("sync.batch", [1, 2, 3], correlation_id="b-1")
    pub.publish("sync.end")
    node_events.wait_for(lambda m: m.get("type") == "sync.end", what="sync.end")
    # Then the Node subscriber handed out every event on its own, in order
    enqueued = node_events.seen(lambda m: m.get("type") == "task.enqueued.xl")
    assert [unpack(m["payload"])["id"] for m in enqueued] == ids
    assert {m["source"] for m in enqueued} == {"zbroker"}
    batch = node_events.seen(lambda m: m.get("type") == "sync.batch")
    assert [unpack(m["payload"]) for m in batch] == [1, 2, 3]
    assert {m["correlationId"] for m in batch} == {"b-1"}
