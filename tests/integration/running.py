"""Running Python-client peers against a test broker, cleaned up by an ExitStack."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from tests.conftest import BrokerProcess, wait_until
from zbroker.client import Client, Handler, Worker

# The `broker` fixture heartbeats every 0.2 s; workers use the same interval (workers
# answer the broker's heartbeats anyway, see the default-interval test).
HEARTBEAT_S = 0.2


def start_worker(
    stack: ExitStack, broker: BrokerProcess, service: str, handler: Handler, **kw: Any
) -> Worker:
    """A background worker, registered with the broker by the time this returns."""
    worker = Worker(broker.endpoint, service, handler, heartbeat_interval_s=HEARTBEAT_S, **kw)
    stack.enter_context(worker)
    wait_until(lambda: worker.connected, timeout_s=10)
    return worker


def open_client(stack: ExitStack, broker: BrokerProcess, **kw: Any) -> Client:
    return stack.enter_context(Client(broker.endpoint, **kw))
