"""Durable storage of tasks: the Journal contract and its stores.

`base` defines the contract; `memory`, `lmdb_store` and `postgres` implement it;
`open_journal` picks the store for a durability mode and a journal URL.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from zbroker.journal.base import (
    FINISHED_STATES,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SCHEMA_VERSION,
    Durability,
    Fenced,
    Journal,
    JournalError,
    JournalFull,
    JournalStats,
    SchemaMismatch,
    TaskRecord,
    TaskState,
)
from zbroker.journal.memory import MemoryJournal

if TYPE_CHECKING:
    from zbroker.journal.lmdb_store import LmdbJournal


def __getattr__(name: str) -> Any:
    # The LMDB store (and the lmdb binding) load on first use only, so modules that
    # need just the contract (the broker core imports `base`) never pull in lmdb.
    if name == "LmdbJournal":
        from zbroker.journal.lmdb_store import LmdbJournal

        return LmdbJournal
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The options LmdbJournal takes besides its path and durability.
_LMDB_OPTIONS = frozenset({"map_size", "max_map_size"})


def open_journal(
    durability: Durability,
    data_dir: Path | None,
    *,
    url: str | None = None,
    lease: Any = None,
    **options: Any,
) -> Journal:
    """The journal for `durability`: a MemoryJournal for MEMORY (`data_dir` and the
    LMDB options are ignored); with a `url` (postgresql://...), a PostgresJournal
    there, fenced by `lease` (zbroker.journal.lease), holding at most max_map_size
    bytes in memory; else an LmdbJournal in `data_dir`/journal.
    Options: map_size, max_map_size (bytes)."""
    unknown = set(options) - _LMDB_OPTIONS
    if unknown:
        raise TypeError(f"unknown journal options: {', '.join(sorted(unknown))}")
    if url is not None:
        if durability is Durability.MEMORY:
            raise ValueError("a journal in PostgreSQL is durable: sync or async, not memory")
        try:
            from zbroker.journal.postgres import PostgresJournal
        except ImportError as exc:
            raise JournalError(
                f"a journal in PostgreSQL needs psycopg: pip install 'zbroker[postgres]' ({exc})"
            ) from exc
        return PostgresJournal(
            url, durability, lease=lease, max_bytes=int(options.get("max_map_size", 0))
        )
    if durability is Durability.MEMORY:
        return MemoryJournal()
    if data_dir is None:
        raise ValueError(f"durability {durability.value!r} needs a data directory")
    from zbroker.journal.lmdb_store import LmdbJournal

    return LmdbJournal(Path(data_dir) / "journal", durability, **options)


__all__ = [
    "FINISHED_STATES",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "SCHEMA_VERSION",
    "Durability",
    "Fenced",
    "Journal",
    "JournalError",
    "JournalFull",
    "JournalStats",
    "LmdbJournal",
    "MemoryJournal",
    "SchemaMismatch",
    "TaskRecord",
    "TaskState",
    "open_journal",
]
