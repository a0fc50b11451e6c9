"""How the core writes peers' ids and service names into its log lines."""

from __future__ import annotations

# A peer's service name may be megabytes long, and every log line would carry it.
_NAME_SHOWN = 200


def hex_id(identity: bytes) -> str:
    """A routing id as operators see it (WORKERS, events, logs)."""
    return identity.hex()


def shown(service: bytes) -> str:
    """A service name for the log and events: whole when short, else cut."""
    if len(service) > _NAME_SHOWN:
        return f"{service[:_NAME_SHOWN].decode(errors='replace')}... ({len(service)} bytes)"
    return service.decode(errors="replace")
