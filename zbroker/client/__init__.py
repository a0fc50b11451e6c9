"""The Python client of zbroker: request/reply over 7/MDP, ZBW01 workers, and topic events.

- `Client`: blocking requests with Lazy Pirate retries, 8/MMI service lookup.
- `Worker`: serves a service over zbroker's ZBW01 worker protocol, running up
  to `concurrency` handlers at once (threads, or coroutines on one event
  loop); its socket lives in an I/O thread of its own, so heartbeats and
  acknowledgements keep flowing while handlers work.
- `Publisher` / `Subscriber`: the broker's pub/sub event bus.

Depends on `zbroker.protocol` and pyzmq only, never on the broker itself.
None of these objects is thread-safe, except a Worker's `stop()` and a
Task's `progress()`.
"""

from zbroker.client.client import Client, ClientStats
from zbroker.client.errors import (
    ClientClosed,
    ClientError,
    EndpointError,
    NonRetryableError,
    ReplyError,
    RequestTimeout,
    RetryLater,
    WorkerError,
)
from zbroker.client.events import Publisher, Subscriber
from zbroker.client.worker import Handler, Metrics, Result, Task, Worker, WorkerStats
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
    "Metrics",
    "NonRetryableError",
    "Publisher",
    "ReplyError",
    "RequestTimeout",
    "Result",
    "RetryLater",
    "Subscriber",
    "Task",
    "Worker",
    "WorkerError",
    "WorkerStats",
]
