"""The gateway's errors: one table from the broker's error codes (and the gateway's
own) to HTTP statuses, and the translation of client exceptions at the boundary.

Every failure an HTTP or WebSocket caller sees is `{"error": {"code", "message"}}`;
the code is the broker's (docs/protocol.md, ERROR) when the broker refused the call.
"""

from __future__ import annotations

from typing import Final

from zbroker.client import errors as client_errors
from zbroker.protocol import zbc

# Codes of the gateway's own (the broker never sends these).
E_UNAUTHORIZED: Final = "unauthorized"  # no bearer token, or one the token file does not hold
E_METHOD: Final = "method_not_allowed"
E_TIMEOUT: Final = "timeout"  # the broker did not answer in time (down, or too busy)
E_BROKER_DOWN: Final = "broker_unreachable"  # the broker cannot be talked to (health, keys)
E_TASK_FAILED: Final = "task_failed"  # the task ended without a result (its state says how)
E_INTERNAL: Final = "internal"

# The one table: an error code -> the HTTP status it answers with.
HTTP_STATUS: Final[dict[str, int]] = {
    zbc.E_BAD_REQUEST: 400,
    E_UNAUTHORIZED: 401,
    zbc.E_FORBIDDEN: 403,
    zbc.E_NOT_FOUND: 404,
    E_METHOD: 405,
    zbc.E_CONFLICT: 409,
    E_TASK_FAILED: 409,
    zbc.E_TOO_LARGE: 413,
    zbc.E_QUEUE_FULL: 429,
    zbc.E_TOO_MANY_WAITERS: 429,
    E_INTERNAL: 500,
    zbc.E_SHUTTING_DOWN: 503,
    zbc.E_UNAVAILABLE: 503,
    E_BROKER_DOWN: 503,
    E_TIMEOUT: 504,
}


class ApiError(Exception):
    """A call the gateway answers with an error document; `status` from HTTP_STATUS."""

    def __init__(self, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    @property
    def status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def document(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def bad_request(message: str) -> ApiError:
    return ApiError(zbc.E_BAD_REQUEST, message)


def from_client_error(exc: client_errors.ClientError) -> ApiError:
    """The ApiError for what the client library raised (the broker's code kept)."""
    if isinstance(exc, client_errors.BrokerError):
        return ApiError(exc.code, exc.message or str(exc))
    if isinstance(exc, client_errors.TaskFailed):
        return ApiError(E_TASK_FAILED, str(exc), state=str(exc.state), task_id=exc.task_id)
    if isinstance(exc, client_errors.TaskPending):
        return ApiError(E_TIMEOUT, str(exc), state=exc.state, task_id=exc.task_id)
    if isinstance(exc, client_errors.CallTimeout):
        return ApiError(E_TIMEOUT, str(exc))
    if isinstance(exc, client_errors.AuthenticationFailed):
        return ApiError(E_BROKER_DOWN, f"the gateway's own key was refused: {exc.reason}")
    return ApiError(E_BROKER_DOWN, str(exc))
