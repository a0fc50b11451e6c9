"""Event bus details beyond the basic publish/subscribe flow (see test_client.py)."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from tests.conftest import BrokerProcess, wait_until
from zbroker.client import ClientClosed, Publisher, Subscriber

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def join(publisher: Publisher, subscriber: Subscriber, topic: str) -> None:
    """Publish `topic` until the subscriber gets one (its subscription has reached
    the bus), then drain what the joining left behind."""

    def subscribed() -> bool:
        publisher.publish(topic, None)
        return subscriber.recv(timeout_s=0.05) is not None

    wait_until(subscribed)
    while subscriber.recv(timeout_s=0.2) is not None:
        pass


def test_recv_with_zero_timeout_returns_an_event_that_is_already_waiting(
    broker: BrokerProcess,
) -> None:
    with ExitStack() as stack:
        publisher = stack.enter_context(Publisher(broker.events_in, source="t"))
        subscriber = stack.enter_context(Subscriber(broker.events_out, "ping."))

        # Given an event that has already reached the subscriber's socket
        join(publisher, subscriber, "ping.join")
        publisher.publish("ping.now", 42)
        wait_until(lambda: subscriber._open_socket().poll(0) != 0)
        # When recv is called with a zero timeout
        event = subscriber.recv(timeout_s=0)
        # Then the waiting event is returned, not None
        assert event is not None and event.type == "ping.now" and event.payload == 42
        # And with nothing waiting, a zero timeout returns None at once
        assert subscriber.recv(timeout_s=0) is None


def test_publisher_and_subscriber_refuse_use_after_close(broker: BrokerProcess) -> None:
    publisher = Publisher(broker.events_in)
    subscriber = Subscriber(broker.events_out)
    for owner in (publisher, subscriber):
        assert not owner.closed
        owner.close()
        owner.close()  # idempotent
        assert owner.closed
    with pytest.raises(ClientClosed, match="Publisher is closed"):
        publisher.publish("x.y")
    with pytest.raises(ClientClosed, match="Subscriber is closed"):
        subscriber.recv(timeout_s=0)


def test_publish_many_arrives_as_separate_events_in_order(broker: BrokerProcess) -> None:
    with ExitStack() as stack:
        publisher = stack.enter_context(Publisher(broker.events_in, source="watcher"))
        subscriber = stack.enter_context(Subscriber(broker.events_out, "fs."))
        join(publisher, subscriber, "fs.join")
        before = subscriber.received
        # Given one batch of three events published as one message
        sent = publisher.publish_many(
            "fs.change", [{"path": "/a"}, {"path": "/b"}, {"path": "/c"}], correlation_id="j-1"
        )
        assert [e.payload for e in sent] == [{"path": "/a"}, {"path": "/b"}, {"path": "/c"}]
        first = subscriber.recv(timeout_s=10)
        # Then the socket holds nothing more, yet the rest of the batch is handed out,
        # one event per call, even with a zero timeout
        assert subscriber._open_socket().poll(0) == 0
        rest = [subscriber.recv(timeout_s=0), subscriber.recv(timeout_s=0)]
        got = [first, *rest]
        assert [e.payload["path"] for e in got if e is not None] == ["/a", "/b", "/c"]
        assert {(e.type, e.source, e.correlation_id) for e in got if e is not None} == {
            ("fs.change", "watcher", "j-1")
        }
        assert subscriber.received - before == 3
        assert subscriber.recv(timeout_s=0) is None
        with pytest.raises(ValueError):
            publisher.publish_many("fs.change", [])
