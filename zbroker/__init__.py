"""zbroker: a ZeroMQ task broker for local services.

Majordomo (7/MDP) request/reply with pushed work and heartbeats, zbroker's own
ZBW01 workers with credit, and a topic event bus. See docs/ for the protocol
and the design.
"""

__version__ = "0.1.0"

from zbroker.client import (
    Client,
    Event,
    NonRetryableError,
    Publisher,
    RequestTimeout,
    RetryLater,
    Subscriber,
    Task,
    Worker,
)

__all__ = [
    "Client",
    "Event",
    "NonRetryableError",
    "Publisher",
    "RequestTimeout",
    "RetryLater",
    "Subscriber",
    "Task",
    "Worker",
    "__version__",
]
