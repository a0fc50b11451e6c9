"""zbroker: a ZeroMQ task broker for local services.

Durable task queues with a client protocol of their own (ZBC01), Majordomo
(7/MDP) request/reply with pushed work and heartbeats, zbroker's own ZBW01
workers with credit, and a topic event bus. See docs/ for the protocol and
the design.
"""

__version__ = "0.1.0"

from zbroker.client import (
    AsyncClient,
    BrokerError,
    Client,
    ClientError,
    Event,
    NonRetryableError,
    Publisher,
    QueueFull,
    RequestTimeout,
    RetryLater,
    Service,
    Subscriber,
    Task,
    TaskCancelled,
    TaskDead,
    TaskExpired,
    TaskFailed,
    TaskId,
    TaskNotFound,
    TaskPending,
    TaskState,
    TaskStatus,
    Worker,
)

__all__ = [
    "AsyncClient",
    "BrokerError",
    "Client",
    "ClientError",
    "Event",
    "NonRetryableError",
    "Publisher",
    "QueueFull",
    "RequestTimeout",
    "RetryLater",
    "Service",
    "Subscriber",
    "Task",
    "TaskCancelled",
    "TaskDead",
    "TaskExpired",
    "TaskFailed",
    "TaskId",
    "TaskNotFound",
    "TaskPending",
    "TaskState",
    "TaskStatus",
    "Worker",
    "__version__",
]
