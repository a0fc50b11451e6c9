"""The services the broker knows: made on first use, let go when idle.

`ServiceDirectory` owns the name -> Service map, the figures of services whose
idle object was let go (their totals carry on when the name returns, so counters
never fall while they are kept; at most `max_departed_services` of them, the
longest gone dropped first), and the order of names that QUEUES pages through.
Every part finds a service here; none keeps its own map.

Rule it keeps: no timer of its own scans every service. A service is looked at
for idleness only when something may have made it idle (it was used through
`get`, its last worker left, its request queue emptied): `let_go_idle` costs the
number of such services since the last tick, not the number of services.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator

from zbroker.core.model import Service, ServiceFigures

# Names per chunk of the sorted name index: inserting or removing a name moves at
# most twice this many references, however many services there are.
_CHUNK = 512


def order_key(name: bytes) -> bytes:
    """Where `name` sorts in QUEUES: by the bytes of the name as QUEUES shows it (the
    name itself when it is UTF-8; backslash-escaped otherwise), then by the name."""
    try:
        name.decode()
    except UnicodeDecodeError:
        return name.decode(errors="backslashreplace").encode()
    return name


class SortedNames:
    """Names in QUEUES order, in chunks, so that adding or removing one costs
    O(log n + _CHUNK), and a page after a cursor O(log n + page)."""

    __slots__ = ("_chunks", "_maxes")

    def __init__(self) -> None:
        self._chunks: list[list[tuple[bytes, bytes]]] = []
        self._maxes: list[tuple[bytes, bytes]] = []

    def __len__(self) -> int:
        return sum(map(len, self._chunks))

    def add(self, name: bytes) -> None:
        entry = (order_key(name), name)
        chunks, maxes = self._chunks, self._maxes
        if not chunks:
            chunks.append([entry])
            maxes.append(entry)
            return
        i = min(bisect.bisect_left(maxes, entry), len(chunks) - 1)
        chunk = chunks[i]
        j = bisect.bisect_left(chunk, entry)
        if j < len(chunk) and chunk[j] == entry:
            return
        chunk.insert(j, entry)
        maxes[i] = chunk[-1]
        if len(chunk) > 2 * _CHUNK:
            chunks.insert(i + 1, chunk[_CHUNK:])
            del chunk[_CHUNK:]
            maxes[i] = chunk[-1]
            maxes.insert(i + 1, chunks[i + 1][-1])

    def discard(self, name: bytes) -> None:
        entry = (order_key(name), name)
        chunks, maxes = self._chunks, self._maxes
        i = bisect.bisect_left(maxes, entry)
        if i == len(chunks):
            return
        chunk = chunks[i]
        j = bisect.bisect_left(chunk, entry)
        if j == len(chunk) or chunk[j] != entry:
            return
        del chunk[j]
        if chunk:
            maxes[i] = chunk[-1]
        else:
            del chunks[i], maxes[i]

    def after(self, key: bytes | None) -> Iterator[tuple[bytes, bytes]]:
        """(order key, name) of every name whose key is above `key` (None: all), in order."""
        chunks = self._chunks
        if key is None:
            i, j = 0, 0
        else:
            probe = (key, b"\xff" * (len(key) + 1))  # above every name with this key
            i = bisect.bisect_right(self._maxes, probe)
            j = bisect.bisect_right(chunks[i], probe) if i < len(chunks) else 0
        while i < len(chunks):
            chunk = chunks[i]
            while j < len(chunk):
                yield chunk[j]
                j += 1
            i += 1
            j = 0


class ServiceDirectory:
    """Services by name (bytes: MDP allows any name)."""

    __slots__ = (
        "_maybe_idle",
        "created_by",
        "kept_figures",
        "max_departed",
        "names",
        "now",
        "services",
        "visits",
    )

    def __init__(self, max_departed: int = 10_000) -> None:
        self.services: dict[bytes, Service] = {}
        # Figures of services let go, the longest gone first.
        self.kept_figures: OrderedDict[bytes, ServiceFigures] = OrderedDict()
        self.max_departed = max_departed
        # Every name in `services` or `kept_figures`, in QUEUES order.
        self.names = SortedNames()
        # Names of services that may have become idle since the last tick.
        self._maybe_idle: dict[bytes, None] = {}
        # The time of the call the core is in (the Broker sets it): `get` samples a
        # service's totals for its rates when they are about to move.
        self.now = 0.0
        # Services looked at by `let_go_idle` since the broker started (tests read it).
        self.visits = 0
        # Authenticated brokers: services that exist because of each principal.
        self.created_by: dict[str, int] = {}

    def credit(self, name: bytes, principal: str) -> None:
        """Service `name`, just made by a message of `principal`, counts against it."""
        service = self.services.get(name)
        if service is not None and service.creator is None:
            service.creator = principal
            self.created_by[principal] = self.created_by.get(principal, 0) + 1

    def get(self, name: bytes) -> Service:
        """The service called `name`, made if it does not exist. Every change to a
        service's work or figures goes through here or leaves it without workers."""
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = Service(name)
            kept = self.kept_figures.pop(name, None)
            if kept is not None:
                service.figures = kept
            else:
                self.names.add(name)
        figures = service.figures
        if self.now >= figures.snapshot_at:
            figures.snapshot(self.now)
        self._maybe_idle[name] = None
        return service

    def figures(self, name: bytes) -> ServiceFigures:
        """A service's figures: its own, or kept from its last Service object."""
        service = self.services.get(name)
        if service is not None:
            return service.figures
        kept = self.kept_figures.get(name)
        return kept if kept is not None else ServiceFigures()

    def maybe_idle(self, service: Service) -> None:
        """Something may have made `service` idle: look at it at the next tick."""
        self._maybe_idle[service.name] = None

    def let_go_idle(self) -> None:
        """Forget every service that may have become idle since the last call and is:
        no requests, no workers, no waiting tasks, no operator settings. Its figures
        are kept if they counted anything (up to max_departed services)."""
        maybe_idle = self._maybe_idle
        if not maybe_idle:
            return
        names = list(maybe_idle)
        maybe_idle.clear()
        services = self.services
        for name in names:
            self.visits += 1
            service = services.get(name)
            if (
                service is not None
                and not service.queue
                and not service.workers
                and not service.waiting_count
                and not service.configured
            ):
                del services[name]
                if service.creator is not None:
                    left = self.created_by[service.creator] - 1
                    if left:
                        self.created_by[service.creator] = left
                    else:
                        del self.created_by[service.creator]
                if service.figures.counted:
                    self._keep(name, service.figures)
                else:
                    self.names.discard(name)

    def _keep(self, name: bytes, figures: ServiceFigures) -> None:
        kept = self.kept_figures
        kept[name] = figures
        while len(kept) > self.max_departed:
            dropped, _ = kept.popitem(last=False)
            self.names.discard(dropped)
