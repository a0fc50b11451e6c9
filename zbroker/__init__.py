"""zbroker: a ZeroMQ task broker for local services.

Durable task queues with a client protocol of their own (ZBC01), Majordomo
(7/MDP) request/reply with pushed work and heartbeats, zbroker's own ZBW01
workers with credit, and a topic event bus. See docs/ for the protocol and
the design.

The client names below load on first use (PEP 562), so importing a subpackage
(`zbroker.core`, `zbroker.protocol`, `zbroker.journal`) does not import the
client and with it pyzmq.
"""

from typing import TYPE_CHECKING

from zbroker import native as _native

__version__ = "0.1.0"

# Compiled or pure-Python core: decided before any of its modules loads.
_native.choose()

if TYPE_CHECKING:
    from zbroker.client import (
        AsyncClient,
        AuthenticationFailed,
        BrokerError,
        Client,
        ClientError,
        Credentials,
        Event,
        Forbidden,
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
        TaskOptions,
        TaskPending,
        TaskState,
        TaskStatus,
        TaskUpstreamFailed,
        Worker,
        unpack_results,
    )

__all__ = [
    "AsyncClient",
    "AuthenticationFailed",
    "BrokerError",
    "Client",
    "ClientError",
    "Credentials",
    "Event",
    "Forbidden",
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
    "TaskOptions",
    "TaskPending",
    "TaskState",
    "TaskStatus",
    "TaskUpstreamFailed",
    "Worker",
    "__version__",
    "unpack_results",
]

# Every public name but __version__ comes from zbroker.client (the TYPE_CHECKING
# import above, kept equal to __all__ by tests/unit/test_sans_io.py).
_CLIENT_NAMES = frozenset(__all__) - {"__version__"}


def _load_client_name(name: str) -> object:
    if name in _CLIENT_NAMES:
        from zbroker import client

        value = getattr(client, name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# Hidden from type checkers, which see the names through the TYPE_CHECKING import:
# so a misspelt `zbroker.Clinet` stays an error instead of typing as `object`.
if not TYPE_CHECKING:
    __getattr__ = _load_client_name
