"""Errors of the I/O shell, translated from zmq at the boundary where they enter."""

from __future__ import annotations


class RuntimeShellError(Exception):
    """Base class of errors raised by `zbroker.runtime`."""


class BindError(RuntimeShellError):
    """Raised when an endpoint cannot be bound (address in use, bad endpoint string)."""
