"""Exceptions of the client library, and the boundary where zmq errors become them.

Callers catch `ClientError` for everything this package raises on purpose;
`zmq.ZMQError` never escapes a public method.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import zmq

from zbroker.protocol import zbc
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.states import TaskState

# Socket-level flow control is set explicitly on every socket we open, so a
# slow peer costs bounded memory instead of whatever the library default is.
DEFAULT_HWM = 10_000


class ClientError(Exception):
    """Base class of every exception the client library raises on purpose."""


class RequestTimeout(ClientError):
    """No answer in time: the base of every timeout a client call raises.

    Raised as such by `Client.mdp_request` when no MDP reply arrived within the
    timeout, after every retry; `CallTimeout` and `TaskPending` derive from it.
    """

    def __init__(self, service: bytes, timeout_s: float, attempts: int) -> None:
        name = service.decode(errors="replace")
        super().__init__(
            f"no reply from service {name!r} within {timeout_s:g}s per attempt "
            f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        )
        self.service = service
        self.timeout_s = timeout_s
        self.attempts = attempts

    # The endpoints the call tried, when the client filled them in (see `tried`).
    endpoints: tuple[str, ...] = ()

    def tried(self, endpoints: tuple[str, ...]) -> None:
        """Say which endpoints went unanswered: with several, that none of them did."""
        self.endpoints = endpoints
        if len(endpoints) > 1 and self.args:
            self.args = (
                f"no broker of the {len(endpoints)} endpoints ({', '.join(endpoints)})"
                f" answered: {self.args[0]}",
            )


class ReplyError(ClientError, ProtocolError):
    """Raised when a well-formed reply does not have the shape the call expects."""


class ClientClosed(ClientError):
    """Raised when a Client, Publisher or Subscriber is used after `close()`."""


class EndpointError(ClientError, ValueError):
    """Raised when an endpoint cannot be connected to (malformed address, unknown transport)."""


class WorkerError(ClientError):
    """Raised by `Worker.run` when its I/O thread failed and it cannot serve any more."""


# Raised by handlers, never by the library: they tell a Worker how to report a failure.


class NonRetryableError(Exception):
    """Raised by a Worker's handler when no further attempt can succeed: FAIL without retry."""


class RetryLater(Exception):
    """Raised by a Worker's handler to fail this attempt and ask for a retry after `delay_s`."""

    def __init__(self, delay_s: float, reason: str = "") -> None:
        if (
            isinstance(delay_s, bool)
            or not isinstance(delay_s, int | float)
            or not 0 <= delay_s < math.inf
        ):
            raise ValueError("RetryLater needs a finite delay_s of zero or more seconds")
        super().__init__(reason)
        self.delay_s = float(delay_s)
        self.reason = reason


# ------------------------------------------------------------ durable tasks (ZBC01)


class CallTimeout(RequestTimeout):
    """The broker answered none of the attempts of a durable call (it is down or unreachable).

    `command` names the call (ENQUEUE, REQUEST, RESULT...). When the call had
    already learnt its task's id (`request()` waiting for the result), `task_id`
    holds it: the task is durable, fetch its result later with `result(task_id)`.
    When an enqueue went unanswered, `key` holds the idempotency key it was
    sent with: enqueueing again with that key stores the task at most once.
    """

    def __init__(
        self,
        command: str,
        timeout_s: float,
        attempts: int,
        *,
        task_id: str | None = None,
        key: str | None = None,
        service: bytes = b"",
    ) -> None:
        message = (
            f"no answer from the broker to {command} within {timeout_s:g}s per attempt "
            f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        )
        if task_id is not None:
            message += f"; task {task_id!r} is stored: fetch its result later with result()"
        elif key is not None:
            message += (
                f"; the task may or may not be stored: enqueue it again with key={key!r} "
                "to find out without creating a duplicate"
            )
        ClientError.__init__(self, message)
        self.command = command
        self.service = service
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.task_id = task_id
        self.key = key


class TaskPending(RequestTimeout):
    """The task did not finish within the call's `timeout_s`; it still exists and may finish later.

    `state` is the state the broker reported last (ready, delayed, inflight),
    or None when the call never learnt it. Fetch the result later with
    `result(task_id)`.
    """

    def __init__(self, task_id: str, state: str | None, timeout_s: float) -> None:
        where = f"still {state}" if state else "not finished"
        ClientError.__init__(
            self,
            f"task {task_id!r} is {where} after {timeout_s:g}s; "
            "fetch its result later with result()",
        )
        self.task_id = task_id
        self.state = state
        self.service = b""
        self.timeout_s = timeout_s
        self.attempts = 1


class TaskFailed(ClientError):
    """The task ended without a result: base of TaskDead, TaskCancelled, TaskExpired and
    TaskUpstreamFailed.

    `state` is its final state, `error` the reason the broker recorded (the
    worker's last FAIL reason for a dead task), or None.
    """

    state: str = "failed"

    def __init__(self, task_id: str, error: str | None = None) -> None:
        message = f"task {task_id!r} is {self.state}"
        if error:
            message += f": {error}"
        super().__init__(message)
        self.task_id = task_id
        self.error = error


class TaskDead(TaskFailed):
    """The task failed for good (no attempt left, or a non-retryable failure): a dead letter.

    It can be listed with `dead_letters()` and put back with `redrive()`.
    """

    state = TaskState.DEAD


class TaskCancelled(TaskFailed):
    """The task was cancelled before it finished."""

    state = TaskState.CANCELLED


class TaskExpired(TaskFailed):
    """The task's time to live ran out before any worker started it."""

    state = TaskState.EXPIRED


class TaskUpstreamFailed(TaskFailed):
    """A task it depended on (`depends_on`) ended without a result, and it did not
    ask to run anyway: it never ran. `error` names that dependency."""

    state = TaskState.UPSTREAM_FAILED


class BrokerError(ClientError):
    """The broker refused the call with an ERROR answer. `code` and `message` are the broker's.

    Subclasses name the codes a caller may want to handle; an unknown code
    raises BrokerError itself.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"broker refused the call ({code}): {message}" if message else code)
        self.code = code
        self.message = message


class BadRequest(BrokerError, ValueError):
    """`bad_request`: the call is malformed or an option is out of range; nothing was done."""


class MessageTooLarge(BrokerError, ValueError):
    """`too_large`: the message is over the broker's size or frame cap; nothing was done."""


class TaskNotFound(BrokerError, LookupError):
    """`not_found`: no task has this id (it never existed, or its record has lapsed)."""


class QueueFull(BrokerError):
    """`queue_full`: the service's queue is at its cap; nothing of this call was enqueued."""


class TaskConflict(BrokerError):
    """`conflict`: the task is not in a state the call applies to (cancelling an ended task)."""


class BrokerUnavailable(BrokerError):
    """`unavailable` (this broker keeps no tasks: it runs without a journal) or
    `shutting_down` (it is stopping: call again once it is back)."""


class TooManyWaiters(BrokerError):
    """`too_many_waiters`: too many calls are waiting for results at the broker; retry later."""


class Forbidden(BrokerError, PermissionError):
    """`forbidden`: this client's principal may not make the call (the broker's --auth
    file grants it no such role, service or task); nothing was done."""


class AuthenticationFailed(ClientError, PermissionError):
    """The broker refused this peer's CURVE handshake, or the two sides do not speak
    the same security mechanism: nothing can be sent until the keys are right.
    `reason` says which, as far as the peer can tell."""

    def __init__(self, endpoint: str, reason: str) -> None:
        super().__init__(f"authentication with {endpoint} failed: {reason}")
        self.endpoint = endpoint
        self.reason = reason


_ERRORS_BY_CODE: dict[str, type[BrokerError]] = {
    zbc.E_BAD_REQUEST: BadRequest,
    zbc.E_TOO_LARGE: MessageTooLarge,
    zbc.E_NOT_FOUND: TaskNotFound,
    zbc.E_QUEUE_FULL: QueueFull,
    zbc.E_CONFLICT: TaskConflict,
    zbc.E_SHUTTING_DOWN: BrokerUnavailable,
    zbc.E_UNAVAILABLE: BrokerUnavailable,
    zbc.E_TOO_MANY_WAITERS: TooManyWaiters,
    zbc.E_FORBIDDEN: Forbidden,
}

# One class per failed state (zbroker.protocol.states.FAILED_STATES).
_FAILURES_BY_STATE: dict[str, type[TaskFailed]] = {
    failure.state: failure for failure in (TaskDead, TaskCancelled, TaskExpired, TaskUpstreamFailed)
}


def broker_error(code: str, message: str) -> BrokerError:
    """The exception for an ERROR answer with `code` (BrokerError for a code not known here)."""
    return _ERRORS_BY_CODE.get(code, BrokerError)(code, message)


def task_failure(state: str, task_id: str, error: str | None) -> TaskFailed:
    """The exception for a task that ended in `state` (dead, cancelled or expired)."""
    return _FAILURES_BY_STATE[state](task_id, error)


@contextmanager
def zmq_boundary(what: str) -> Iterator[None]:
    """Translate zmq errors raised inside the block into this package's exceptions."""
    try:
        yield
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.ETERM, zmq.ENOTSOCK):
            raise ClientClosed(f"{what}: socket or context already closed") from exc
        raise ClientError(f"{what}: {exc}") from exc
