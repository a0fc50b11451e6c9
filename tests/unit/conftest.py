"""Fixtures shared by the core's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from zbroker.journal import Durability, Journal, MemoryJournal, open_journal


@pytest.fixture(params=["memory", "lmdb", "postgres"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Journal]:
    """Each test once per store: the core must not depend on which one it is handed
    (PostgreSQL: the session's private server, tests/pg.py)."""
    j: Journal
    if request.param == "memory":
        j = MemoryJournal()
    elif request.param == "postgres":
        j = open_journal(Durability.ASYNC, None, url=request.getfixturevalue("pg_url"))
    else:
        j = open_journal(Durability.ASYNC, tmp_path / "data")
    yield j
    j.close()


@pytest.fixture
def opened() -> Iterator[list[Journal]]:
    """Journals a test opened; all closed at teardown (closing twice is fine)."""
    journals: list[Journal] = []
    yield journals
    for journal in journals:
        journal.close()
