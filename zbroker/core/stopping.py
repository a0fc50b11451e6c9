"""A broker that is stopping: its drain, from the first SIGTERM to the exit.

Rules it keeps:
  1. From the start of the drain no durable task is delivered (an MDP client's
     request, which lives only in memory and is lost at exit, still may be);
     calls are still answered: an ENQUEUE is stored and confirmed, and runs
     after the restart.
  2. Every ZBW01 worker is told once (STOPPING, with the seconds left), also one
     that registers during the drain; 7/MDP has no word for it, so MDP workers
     are told nothing.
  3. The drain is over when no worker holds anything, or at its deadline.
     What is still in flight then stays so in the journal (a start only held
     is written by the journal's clean close): the next start puts it back in
     its queue, the attempt not charged (DurableTasks.recover).
It never reads the clock and never sends: what it says goes to the outbox.
"""

from __future__ import annotations

import logging

from zbroker.core.broker import Broker
from zbroker.core.dialects import ZBW
from zbroker.protocol import ext

log = logging.getLogger("zbroker.core")


def halt_deliveries(broker: Broker) -> None:
    """No durable task is delivered from now on. Only sets a flag: safe to call from
    a signal handler, between any two steps of a pass, so that nothing read after
    the signal is handed out."""
    broker.tasks.stopping = True


class Drain:
    """The drain of `broker`, begun at `now`, for at most `drain_s` seconds."""

    def __init__(self, broker: Broker, now: float, drain_s: float) -> None:
        self._broker = broker
        self.deadline = now + drain_s
        self._told: set[bytes] = set()
        halt_deliveries(broker)
        self.tell(now)
        log.info(
            "stopping: no new deliveries; waiting up to %gs for %d attempt(s) in flight",
            drain_s,
            self.in_flight,
        )

    @property
    def in_flight(self) -> int:
        """Requests and task attempts the workers hold now."""
        return sum(len(worker.tasks) for worker in self._broker.workers.values())

    def tell(self, now: float) -> None:
        """STOPPING to every ZBW01 worker not told yet (workers register meanwhile)."""
        workers = self._broker.workers
        left_s = max(0.0, self.deadline - now)
        outbox = self._broker.outbox
        for identity, worker in workers.items():
            if identity not in self._told:
                self._told.add(identity)
                if worker.dialect is ZBW:
                    outbox.append([identity, *ext.stopping(left_s)])

    def over(self, now: float) -> bool:
        """Whether the broker may stop now: nothing in flight, or the deadline passed."""
        held = self.in_flight
        if held and now < self.deadline:
            return False
        if held:
            log.warning(
                "stopping: %d attempt(s) still in flight after the drain; they run again "
                "after the restart (not charged against their max_attempts)",
                held,
            )
        else:
            log.info("stopping: every attempt in flight has ended")
        return True
