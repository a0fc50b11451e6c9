"""The Python client of zbroker: request/reply over 7/MDP, workers, and topic events.

- `Client`: blocking requests with Lazy Pirate retries, 8/MMI service lookup.
- `Worker`: serves a service; its socket lives in an I/O thread of its own,
  so heartbeats keep flowing while a handler works.
- `Publisher` / `Subscriber`: the broker's pub/sub event bus.

Depends on `zbroker.protocol` and pyzmq only, never on the broker itself.
None of these objects is thread-safe; a Worker's `stop()` is the exception.
"""

from zbroker.client.client import Client, ClientStats
from zbroker.client.errors import (
    ClientClosed,
    ClientError,
    EndpointError,
    ReplyError,
    RequestTimeout,
    WorkerError,
)
from zbroker.client.events import Publisher, Subscriber
from zbroker.client.worker import Handler, Reply, Request, Worker, WorkerStats
from zbroker.protocol import DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT
from zbroker.protocol.events import Event

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_EVENTS_IN",
    "DEFAULT_EVENTS_OUT",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientStats",
    "EndpointError",
    "Event",
    "Handler",
    "Publisher",
    "Reply",
    "ReplyError",
    "Request",
    "RequestTimeout",
    "Subscriber",
    "Worker",
    "WorkerError",
    "WorkerStats",
]
