"""Protocol errors: what a peer sent could not be understood.

These are the peer's fault (a remote protocol error): the broker drops the
message, counts it under `reason`, and carries on.  They are never raised for
the caller's own mistakes.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Raised by a decoder when frames do not form a valid message.

    `reason` is a short stable identifier (``bad_header``, ``missing_frames``,
    ``unknown_command``, ``oversized``...) used as a counter label.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
