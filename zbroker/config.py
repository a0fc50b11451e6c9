"""One typed configuration for a broker process.

Values come from flags or `ZBROKER_*` environment variables (the CLI maps
both); every field has an embedded default, so `zbroker start` alone works.
"""

from __future__ import annotations

from dataclasses import dataclass

from zbroker.core.model import CoreSettings
from zbroker.protocol import DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where the broker listens and how it behaves. Times in seconds."""

    bind: str = DEFAULT_ENDPOINT
    events_in: str = DEFAULT_EVENTS_IN
    events_out: str = DEFAULT_EVENTS_OUT
    heartbeat_interval_s: float = 2.5
    heartbeat_liveness: int = 3
    request_expiry_s: float = 60.0
    max_queued_per_service: int = 100_000
    max_message_bytes: int = 16 * 1024 * 1024
    ack_timeout_s: float = 10.0
    # Explicit high-water marks (messages): the ROUTER's per-peer pipes and the event bus.
    router_hwm: int = 100_000
    events_hwm: int = 100_000
    log_level: str = "info"

    def core_settings(self) -> CoreSettings:
        return CoreSettings(
            heartbeat_interval_s=self.heartbeat_interval_s,
            heartbeat_liveness=self.heartbeat_liveness,
            request_expiry_s=self.request_expiry_s,
            max_queued_per_service=self.max_queued_per_service,
            max_message_bytes=self.max_message_bytes,
            ack_timeout_s=self.ack_timeout_s,
        )
