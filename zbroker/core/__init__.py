"""The broker core: a pure, deterministic state machine (no sockets, no disk, no clock).

Layering (checked by tests/unit/test_layering.py):
    cli -> runtime -> core -> protocol;  runtime -> journal;  client -> protocol.
The core imports only the journal's contract (zbroker.journal.base), never a store.
"""

from zbroker.core.broker import Broker
from zbroker.core.lifecycle import IllegalTransition, TaskEvent
from zbroker.core.model import Stats
from zbroker.core.settings import CoreSettings

__all__ = ["Broker", "CoreSettings", "IllegalTransition", "Stats", "TaskEvent"]
