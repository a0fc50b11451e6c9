"""Durable storage of tasks: the Journal contract and its stores.

`base` defines the contract; `memory` and `lmdb_store` implement it;
`open_journal` picks the store for a durability mode.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from zbroker.journal.base import (
    FINISHED_STATES,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SCHEMA_VERSION,
    Durability,
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


def open_journal(durability: Durability, data_dir: Path | None, **options: Any) -> Journal:
    """The journal for `durability`: a MemoryJournal for MEMORY (`data_dir` and the
    LMDB options are ignored), else an LmdbJournal in `data_dir`/journal.
    Options: map_size, max_map_size (bytes)."""
    unknown = set(options) - _LMDB_OPTIONS
    if unknown:
        raise TypeError(f"unknown journal options: {', '.join(sorted(unknown))}")
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
