"""What the Python parts of the voice pipeline share: where the broker and the folders
are (from the environment, so that `run.py` can point every part at its own broker),
and how a part says that it is ready.

Every setting has a default that works next to a plain `zbroker start`.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from zbroker.client import DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT, Service

# The keyword arguments of every Service of the pipeline.
BROKER: dict[str, Any] = {
    "endpoint": os.environ.get("ZBROKER_ENDPOINT", DEFAULT_ENDPOINT),
    "events_in": os.environ.get("ZBROKER_EVENTS_IN", DEFAULT_EVENTS_IN),
    "events_out": os.environ.get("ZBROKER_EVENTS_OUT", DEFAULT_EVENTS_OUT),
}
INBOX = Path(os.environ.get("VOICE_INBOX", "inbox")).resolve()
OUTBOX = Path(os.environ.get("VOICE_OUTBOX", "outbox")).resolve()
# How long the fake models "think" about each file: long enough to see tasks pile up.
WORK_S = float(os.environ.get("VOICE_WORK_S", "0.3"))


_say_lock = threading.Lock()


def say(line: str) -> None:
    """Print one whole line, even when several threads speak at once."""
    with _say_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def announce_when_ready(svc: Service, what: str) -> None:
    """Print `ready: what` once the service is registered and subscribed (run.py waits for it)."""

    def wait() -> None:
        if svc.wait_ready(timeout_s=60):
            say(f"ready: {what}")

    threading.Thread(target=wait, name="ready", daemon=True).start()
