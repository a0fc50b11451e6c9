"""The Python client of zbroker: durable tasks, request/reply over 7/MDP, workers, topic events.

- `Client`: blocking durable-task calls over ZBC01 (enqueue, request, result,
  status, cancel, dead letters, redrive), with retries that never duplicate a
  task and waits that resume by task id after a reconnect; plus 7/MDP
  requests with Lazy Pirate retries (`mdp_request`) and 8/MMI service lookup.
- `AsyncClient`: the same durable-task calls as coroutines, many at once on
  one socket, for asyncio programs. It is the source Client is generated from.
- `TaskOptions`: a task's options (priority, delay, TTL...) as one value, for
  either client's `options=`.
- `Worker`: serves a service over zbroker's ZBW01 worker protocol, running up
  to `concurrency` handlers at once (threads, or coroutines on one event
  loop); its socket lives in an I/O thread of its own, so heartbeats and
  acknowledgements keep flowing while handlers work.
- `Publisher` / `Subscriber`: the broker's pub/sub event bus.
- `Service`: workers, a subscriber and a publisher in one object: serves task
  queues, handles topic events, publishes results and heartbeats, and stops
  cleanly on SIGINT/SIGTERM.

Depends on `zbroker.protocol` and pyzmq only, never on the broker itself.
None of these objects is thread-safe, except a Worker's `stop()`, a
Task's `progress()`, and a Service's `stop()` and `publish()`.
"""

from zbroker.client._base import DEFAULT_RESULT_TIMEOUT_S, ClientStats
from zbroker.client._calls import unpack_results
from zbroker.client.aclient import AsyncClient
from zbroker.client.client import Client
from zbroker.client.durable import DeadLetter, PayloadPreview, TaskId, TaskState, TaskStatus
from zbroker.client.errors import (
    AuthenticationFailed,
    BadRequest,
    BrokerError,
    BrokerUnavailable,
    CallTimeout,
    ClientClosed,
    ClientError,
    EndpointError,
    Forbidden,
    MessageTooLarge,
    NonRetryableError,
    QueueFull,
    ReplyError,
    RequestTimeout,
    RetryLater,
    TaskCancelled,
    TaskConflict,
    TaskDead,
    TaskExpired,
    TaskFailed,
    TaskNotFound,
    TaskPending,
    TaskUpstreamFailed,
    TooManyWaiters,
    WorkerError,
)
from zbroker.client.events import Publisher, Subscriber
from zbroker.client.keys import Credentials
from zbroker.client.options import TaskOptions
from zbroker.client.schedules import ScheduleInfo
from zbroker.client.service import SERVICE_HEARTBEAT_PREFIX, Service, ServiceStats
from zbroker.client.worker import Handler, Metrics, Result, Task, Worker, WorkerStats
from zbroker.protocol import DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT
from zbroker.protocol.events import Event

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_EVENTS_IN",
    "DEFAULT_EVENTS_OUT",
    "DEFAULT_RESULT_TIMEOUT_S",
    "SERVICE_HEARTBEAT_PREFIX",
    "AsyncClient",
    "AuthenticationFailed",
    "BadRequest",
    "BrokerError",
    "BrokerUnavailable",
    "CallTimeout",
    "Client",
    "ClientClosed",
    "ClientError",
    "ClientStats",
    "Credentials",
    "DeadLetter",
    "EndpointError",
    "Event",
    "Forbidden",
    "Handler",
    "MessageTooLarge",
    "Metrics",
    "NonRetryableError",
    "PayloadPreview",
    "Publisher",
    "QueueFull",
    "ReplyError",
    "RequestTimeout",
    "Result",
    "RetryLater",
    "ScheduleInfo",
    "Service",
    "ServiceStats",
    "Subscriber",
    "Task",
    "TaskCancelled",
    "TaskConflict",
    "TaskDead",
    "TaskExpired",
    "TaskFailed",
    "TaskId",
    "TaskNotFound",
    "TaskOptions",
    "TaskPending",
    "TaskState",
    "TaskStatus",
    "TaskUpstreamFailed",
    "TooManyWaiters",
    "Worker",
    "WorkerError",
    "WorkerStats",
    "unpack_results",
]
