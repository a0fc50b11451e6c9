"""Durable storage of tasks: the Journal contract and its stores.

`base` defines the contract; `memory` and `lmdb_store` implement it.
"""

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
    "SchemaMismatch",
    "TaskRecord",
    "TaskState",
]
