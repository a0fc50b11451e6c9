"""A driver for the sans-IO core in tests: a clock moved by hand, the outbox read back."""

from __future__ import annotations

from zbroker.core import Broker, CoreSettings
from zbroker.journal.base import Journal

# Wall-clock time at monotonic 0 in scripts: keeps epoch times in records realistic.
EPOCH = 1_700_000_000.0


class CoreScript:
    """Owns a Broker and its notion of now; subclasses add peer-speaking helpers."""

    def __init__(self, settings: CoreSettings, journal: Journal | None = None) -> None:
        self.now = 0.0
        self.broker = Broker(settings, self.now, journal, epoch_offset=EPOCH)

    def restart(self, journal: Journal) -> None:
        """A new core on the same (committed) journal, as after a broker restart."""
        self.broker = Broker(self.broker.settings, self.now, journal, epoch_offset=EPOCH)

    def advance(self, seconds: float) -> None:
        """Move time forward, running the timers at every tick like the runtime does."""
        end = self.now + seconds
        while self.broker.next_tick_at <= end:
            self.now = self.broker.next_tick_at
            self.broker.tick(self.now)
        self.now = end

    def sent(self) -> list[list[bytes]]:
        """Everything the broker queued to send since the last call."""
        out = self.broker.outbox
        self.broker.outbox = []
        return out
