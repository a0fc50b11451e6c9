"""Which broker of several on one PostgreSQL journal is active: a lease row.

Brokers started with the same `--journal` share the row `zb_lease` (one per
database). The holder is the active broker; the others are standbys: they wait,
bind nothing and serve nothing. The row says who holds the lease, under which
**epoch** (a number that grows at every takeover), until when (`expires_at`, the
database's clock) and which database session renews it (`backend_pid`,
`backend_start`).

- The active broker renews the row every `term_s / 3` from a thread of its own,
  on a connection of its own.
- A standby looks at the row every `POLL_S` and takes it over (the epoch + 1, in
  one compare-and-set on the epoch it saw) when it has expired, or when the session
  that renews it is gone from the server: a broker killed with SIGKILL loses its
  connections at once, so the standby need not wait out the term.
- Fencing: every commit of the journal first checks, with the row locked, that
  the epoch is still its own (zbroker/journal/postgres.py, `zb_fence`), so a broker
  that lost the lease can never commit again, whatever its clock or its threads
  did meanwhile.
- `fresh()` is how the active broker knows, without asking the database, that it
  still holds the lease: true until `term_s * FRESH_SHARE` after the last renewal
  was *sent* (monotonic clock), which is before the database's `expires_at`.
  A broker frozen (SIGSTOP) or cut off past that stops at its next pass, before it
  sends anything; losing the lease (a renewal finds another epoch) wakes it too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.errors

from zbroker.config import DEFAULT_LEASE_S, LEASE_MAX_S, LEASE_MIN_S
from zbroker.journal.base import JournalError, SchemaMismatch
from zbroker.journal.postgres import connect, ensure_schema

log = logging.getLogger("zbroker.lease")

# How often a standby looks at the lease.
POLL_S = 0.2
# The share of the term after a renewal was sent during which the holder counts
# itself active: the rest is the margin for the renewal's trip and clock rates.
FRESH_SHARE = 0.75
# How long a takeover or a renewal waits for the lease row's lock.
LOCK_TIMEOUT_MS = 500
# A standby says whom it waits for at most this often.
STANDBY_LOG_EVERY_S = 30.0

_ME = "SELECT pg_backend_pid(), backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
# The lease as a standby (and `zbroker group`) reads it: the first five columns make
# a Holder; the rest is for people.
_LOOK = """SELECT epoch, holder, endpoint, expires_at < clock_timestamp(),
    NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                WHERE a.pid = l.backend_pid AND a.backend_start = l.backend_start),
    acquired_at, renewed_at, extract(epoch FROM expires_at - clock_timestamp())
    FROM zb_lease l WHERE id = 1"""
_FIRST = """INSERT INTO zb_lease VALUES (1, 1, %(holder)s, %(endpoint)s, %(pid)s,
    %(start)s, clock_timestamp(), clock_timestamp(),
    clock_timestamp() + make_interval(secs => %(term)s))
    ON CONFLICT (id) DO NOTHING RETURNING epoch"""
_TAKE = """UPDATE zb_lease SET epoch = epoch + 1, holder = %(holder)s, endpoint = %(endpoint)s,
    backend_pid = %(pid)s, backend_start = %(start)s, acquired_at = clock_timestamp(),
    renewed_at = clock_timestamp(), expires_at = clock_timestamp() + make_interval(secs => %(term)s)
    WHERE id = 1 AND epoch = %(seen)s RETURNING epoch"""
_RENEW = """UPDATE zb_lease SET renewed_at = clock_timestamp(),
    expires_at = clock_timestamp() + make_interval(secs => %(term)s),
    backend_pid = %(pid)s, backend_start = %(start)s
    WHERE id = 1 AND epoch = %(epoch)s RETURNING epoch"""
_RELEASE = "UPDATE zb_lease SET expires_at = clock_timestamp() WHERE id = 1 AND epoch = %s"


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds the lease, as the row says."""

    epoch: int
    holder: str
    endpoint: str
    expired: bool
    session_gone: bool


class Lease:
    """This broker's claim to be the active one (module docstring).

    `acquire()` waits (a standby) until it holds the lease, then renews it in a
    thread until `release()`; `fresh()` says whether it may still serve, and
    `on_lost` (set before `acquire`) is called, from the renewing thread, when it
    finds the lease gone."""

    def __init__(
        self, url: str, holder: str, endpoint: str, term_s: float = DEFAULT_LEASE_S
    ) -> None:
        if not LEASE_MIN_S <= term_s <= LEASE_MAX_S:
            raise ValueError(f"the lease term must be {LEASE_MIN_S:g} to {LEASE_MAX_S:g} s")
        self.url = url
        self.holder = holder
        self.endpoint = endpoint
        self.term_s = term_s
        self.epoch = 0
        self.lost: str | None = None  # why it is no longer held
        self.on_lost: Callable[[str], None] | None = None
        self._fresh_until = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._me: tuple[int, Any] = (0, None)
        self.renewals = 0

    # ------------------------------------------------------------- standby

    def _connect(self) -> psycopg.Connection[Any]:
        conn = connect(self.url, "lease")
        # A takeover or a renewal waits for the lease row's lock (a commit holds it
        # shared) no longer than this: a frozen holder must not block a standby.
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        row = conn.execute(_ME).fetchone()
        assert row is not None
        self._me = (int(row[0]), row[1])
        return conn

    def look(self) -> Holder | None:
        """The lease as the row says now (None: never held)."""
        conn = self._conn
        assert conn is not None
        row = conn.execute(_LOOK).fetchone()
        if row is None:
            return None
        return Holder(int(row[0]), str(row[1]), str(row[2]), bool(row[3]), bool(row[4]))

    def acquire(self, stopping: Callable[[], bool] = lambda: False) -> bool:
        """Wait until this broker holds the lease (True), or `stopping()` (False).
        A database that cannot be reached is retried: a standby outlives it."""
        said_at = -STANDBY_LOG_EVERY_S
        waited_for: tuple[int, str] | None = None
        while not stopping():
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                    ensure_schema(self._conn)
                epoch = self._try_take()
                if epoch is not None:
                    self._begin(epoch)
                    return True
                seen = self.look()
                if seen is not None:
                    now = time.monotonic()
                    news = (seen.epoch, seen.holder) != waited_for
                    if news or now - said_at > STANDBY_LOG_EVERY_S:
                        log.info(
                            "standby: %s (epoch %d, serving %s) holds the lease; waiting",
                            seen.holder,
                            seen.epoch,
                            seen.endpoint,
                        )
                        waited_for, said_at = (seen.epoch, seen.holder), now
            except SchemaMismatch:
                raise  # waiting would not change it
            except (psycopg.Error, JournalError) as exc:
                log.warning("standby: the journal's database cannot be reached: %s", exc)
                self._close_conn()
                if self._stop.wait(1.0):
                    return False
                continue
            time.sleep(POLL_S)
        return False

    def _params(self, **more: Any) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "endpoint": self.endpoint,
            "pid": self._me[0],
            "start": self._me[1],
            "term": self.term_s,
            **more,
        }

    def _try_take(self) -> int | None:
        """Take the lease if it is free, lapsed or its holder's session is gone."""
        conn = self._conn
        assert conn is not None
        sent = time.monotonic()
        seen = self.look()
        if seen is None:
            row = conn.execute(_FIRST, self._params()).fetchone()
        elif seen.expired or seen.session_gone:
            try:
                row = conn.execute(_TAKE, self._params(seen=seen.epoch)).fetchone()
            except psycopg.errors.LockNotAvailable:
                return None  # a commit of the holder is under way: look again
            if row is not None:
                why = "its lease expired" if seen.expired else "its database session ended"
                log.warning(
                    "taking over from %s (epoch %d, serving %s): %s",
                    seen.holder,
                    seen.epoch,
                    seen.endpoint,
                    why,
                )
        else:
            return None
        if row is None:
            return None  # another standby was quicker
        self._fresh_until = sent + self.term_s * FRESH_SHARE
        return int(row[0])

    # -------------------------------------------------------------- active

    def _begin(self, epoch: int) -> None:
        self.epoch = epoch
        self.lost = None
        self._stop.clear()
        log.info("active: holding the lease (epoch %d)", epoch)
        self._thread = threading.Thread(target=self._renew_loop, name="zbroker-lease", daemon=True)
        self._thread.start()

    def fresh(self) -> bool:
        """Whether this broker still holds the lease, as far as it can tell alone."""
        return self.lost is None and time.monotonic() < self._fresh_until

    def _renew_loop(self) -> None:
        interval = self.term_s / 3
        while not self._stop.wait(interval):
            sent = time.monotonic()
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                row = self._conn.execute(_RENEW, self._params(epoch=self.epoch)).fetchone()
            except psycopg.Error as exc:
                log.warning("lease: renewal failed (retrying): %s", exc)
                self._close_conn()
                continue
            if row is None:
                seen = None
                with contextlib.suppress(psycopg.Error):
                    seen = self.look()
                who = "" if seen is None else f" by {seen.holder} (epoch {seen.epoch})"
                self._lose(f"the lease (epoch {self.epoch}) was taken over{who}")
                return
            self._fresh_until = sent + self.term_s * FRESH_SHARE
            self.renewals += 1

    def _lose(self, why: str) -> None:
        self.lost = why
        log.error("lease lost: %s; stepping down", why)
        callback = self.on_lost
        if callback is not None:
            callback(why)

    def release(self) -> None:
        """Stop renewing; when still held, let it expire now so a standby takes over
        at its next look instead of at the end of the term."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.term_s + 5)
        if self.epoch and self.lost is None:
            with contextlib.suppress(psycopg.Error):
                if self._conn is not None and not self._conn.closed:
                    self._conn.execute(_RELEASE, (self.epoch,))
                    log.info("lease released (epoch %d)", self.epoch)
        self.lost = self.lost or "released"
        self._close_conn()

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


def group_state(url: str) -> dict[str, Any]:
    """What the database says of the group on `url`, whatever its brokers are doing
    (`zbroker group`): the lease (who is active, under which epoch, for how long yet,
    whether its renewing session is alive), the journal's lives, and every
    service's task counts by state as of the last commit."""
    conn = connect(url, "group")
    try:
        row = conn.execute(
            "SELECT to_regclass('zb_lease') IS NOT NULL, to_regclass('zb_meta') IS NOT NULL"
        ).fetchone()
        if row is None or not (row[0] and row[1]):
            return {"lease": None, "meta": {}, "queues": {}}
        lease = conn.execute(_LOOK).fetchone()
        meta = {str(k): int(v) for k, v in conn.execute("SELECT key, value FROM zb_meta")}
        queues: dict[str, dict[str, int]] = {}
        for service, state, n in conn.execute(
            "SELECT service, state, count(*) FROM zb_tasks GROUP BY 1, 2 ORDER BY 1, 2"
        ):
            queues.setdefault(str(service), {})[str(state)] = int(n)
    finally:
        conn.close()
    held = None
    if lease is not None:
        held = {
            "epoch": int(lease[0]),
            "holder": lease[1],
            "endpoint": lease[2],
            "expired": bool(lease[3]),
            "session_alive": not lease[4],
            "acquired_at": lease[5].isoformat(),
            "renewed_at": lease[6].isoformat(),
            "expires_in_s": round(float(lease[7]), 3),
        }
    return {"lease": held, "meta": meta, "queues": queues}
