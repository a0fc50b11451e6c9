"""One typed configuration for a broker process.

Values come from flags or `ZBROKER_*` environment variables (the CLI maps
both); every field has an embedded default, so `zbroker start` alone works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from zbroker.core.settings import CoreSettings
from zbroker.journal.base import Durability
from zbroker.protocol import DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where the broker listens and how it behaves. The state machine's own
    tunables (heartbeats, expiry, limits) live in `core`, with their defaults."""

    bind: str = DEFAULT_ENDPOINT
    events_in: str = DEFAULT_EVENTS_IN
    events_out: str = DEFAULT_EVENTS_OUT
    core: CoreSettings = field(default_factory=CoreSettings)
    # Explicit high-water marks (messages): the ROUTER's per-peer pipes and the event bus.
    router_hwm: int = 100_000
    events_hwm: int = 100_000
    log_level: str = "info"
    # Where durable tasks live, and what a confirmed enqueue survives.
    durability: Durability = Durability.SYNC
    data_dir: Path = Path("zbroker-data")
    # The journal's map grows (doubling) up to this size; past it the broker stops
    # with a clear error rather than confirm what it cannot store.
    journal_max_bytes: int = 1 << 40
    # Prometheus metrics and /health over HTTP on this port (None: off).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
