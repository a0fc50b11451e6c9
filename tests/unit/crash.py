"""A crash of a durable journal inside a test process, as `kill -9` leaves it.

`crash` drops an open LmdbJournal (or PostgresJournal) without anything a stop
would do: no held record is written, no clean-stop marker, the open pass is
lost. Then the store is opened again, as the restarted broker opens it. (The
recovery tests kill real broker processes; this is the same loss, cheap enough
for the core's unit tests.)
"""

from __future__ import annotations

import os

from zbroker.journal import Journal, LmdbJournal
from zbroker.journal.postgres import PostgresJournal


def crash(journal: Journal) -> Journal:
    """Drop `journal` (LMDB or PostgreSQL) as a crash would, and open its store again."""
    if isinstance(journal, PostgresJournal):
        journal._conn.close()  # the open pass and the held records die with it
        journal._failed = "crashed (a test's crash)"  # its close() writes nothing now
        journal.close()
        return PostgresJournal(journal.url, journal.durability)
    assert isinstance(journal, LmdbJournal)
    env = journal._env
    assert env is not None
    journal._env = None  # its close() is now a no-op: nothing of it is ever written
    env.close()  # aborts the open write transaction, if any
    os.close(journal._lock_fd)
    return LmdbJournal(journal.path, journal.durability)
