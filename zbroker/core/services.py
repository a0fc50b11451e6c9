"""The services the broker knows: made on first use, let go when idle.

`ServiceDirectory` owns the name -> Service map and the figures of services
whose idle object was let go (their totals carry on when the name returns, so
counters never fall). Every part finds a service here; none keeps its own map.
"""

from __future__ import annotations

from zbroker.core.model import Service, ServiceFigures


class ServiceDirectory:
    """Services by name (bytes: MDP allows any name)."""

    __slots__ = ("kept_figures", "services")

    def __init__(self) -> None:
        self.services: dict[bytes, Service] = {}
        self.kept_figures: dict[bytes, ServiceFigures] = {}

    def get(self, name: bytes) -> Service:
        """The service called `name`, made if it does not exist."""
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(name)
            kept = self.kept_figures.pop(name, None)
            if kept is not None:
                service.figures = kept
        return service

    def figures(self, name: bytes) -> ServiceFigures:
        """A service's figures: its own, or kept from its last Service object."""
        service = self.services.get(name)
        if service is not None:
            return service.figures
        kept = self.kept_figures.get(name)
        return kept if kept is not None else ServiceFigures()

    def let_go_if_idle(self, service: Service) -> None:
        """Forget `service` if nothing about it needs remembering: no requests, no
        workers, no waiting tasks, no operator settings (its figures are kept)."""
        if (
            not service.queue
            and not service.workers
            and not service.waiting_count
            and not service.paused
            and service.limit is None
        ):
            del self.services[service.name]
            if service.figures.counted:
                self.kept_figures[service.name] = service.figures

    def snapshot(self, now: float) -> None:
        """Sample every service's totals for its rates."""
        for service in self.services.values():
            service.figures.snapshot(now)
        for figures in self.kept_figures.values():
            figures.snapshot(now)
