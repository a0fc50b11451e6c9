"""A broker of an active/standby group: brokers started on one journal in PostgreSQL.

`serve_in_group(config)` is `zbroker start --journal postgresql://...`: it waits as a
standby (binding nothing, serving nothing) until it holds the group's lease
(zbroker/runtime/lease.py), then opens the journal and serves like any broker. If it
loses the lease (another broker took over after it froze or lost its database)
it steps down: its journal refuses the pass, its sockets close, and it is a
standby again; so it does after any other failure of the journal (its database
gone, say), since the database holds every commit. SIGINT/SIGTERM stop it in
either role (the active one drains first, then lets its lease go so that a
standby takes over at once).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from types import FrameType

from zbroker.config import BrokerConfig
from zbroker.journal import Fenced, JournalError, SchemaMismatch
from zbroker.runtime.lease import Lease
from zbroker.runtime.server import BrokerServer, journal_place

log = logging.getLogger("zbroker.group")


# After a failure other than a lost lease, a broker waits this long before it may
# take the lease again (the database may need the moment; a standby may go first).
RETRY_AFTER_FAILURE_S = 1.0


def _back_to_standby(lease: Lease, why: str, fenced: bool = False) -> None:
    lease.release()
    if not fenced:
        log.error("journal failure (%s): standby again", why)
        time.sleep(RETRY_AFTER_FAILURE_S)


def holder_name() -> str:
    """How this broker names itself in the lease row: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def serve_in_group(config: BrokerConfig) -> None:
    """Standby, active, and back, until a signal (module docstring). Raises what stops
    the broker for good: a schema it does not know, an endpoint it cannot bind."""
    assert config.journal is not None
    lease = Lease(config.journal, holder_name(), config.bind, config.lease_s)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        log.info("received %s while standby: stopping", signal.Signals(signum).name)
        stopping = True

    try:
        while not stopping:
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
            log.info("standby: waiting for the lease of the group on %s", journal_place(config))
            if not lease.acquire(lambda: stopping):
                return
            try:
                server = BrokerServer(config, lease=lease)
            except SchemaMismatch:
                raise  # no broker of this version can serve it
            except JournalError as exc:
                _back_to_standby(lease, f"the journal could not be opened: {exc}")
                continue
            server.install_signal_handlers()
            try:
                server.serve_forever()
            except JournalError as exc:
                # Lost the lease, or the database: nothing of the failed pass was
                # sent, and the database holds every commit. Standby again; the
                # journal is read anew when this broker next takes the lease.
                _back_to_standby(lease, str(exc), fenced=isinstance(exc, Fenced))
                continue
            lease.release()
            return  # stopped by a signal
    finally:
        lease.release()
