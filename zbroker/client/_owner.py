"""What Client, Publisher and Subscriber share: one socket, closed once, context-managed."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import zmq

from zbroker.client.errors import ClientClosed
from zbroker.client.keys import close_socket


class SocketOwner:
    """Owns `_socket` until `close()`; using it afterwards raises ClientClosed."""

    _socket: zmq.Socket[bytes] | None

    def close(self) -> None:
        """Close the socket. Idempotent; anything not yet sent or read is discarded."""
        if self._socket is not None:
            close_socket(self._socket)
            self._socket = None

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        return self._socket is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open_socket(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            raise ClientClosed(f"this {type(self).__name__} is closed")
        return self._socket
