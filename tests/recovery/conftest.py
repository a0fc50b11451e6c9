"""The recovery tests run on each durable journal: LMDB in a data directory, and
PostgreSQL (the session's private server, tests/pg.py) through `--journal`.

`broker_factory` here wraps the suite's own: on PostgreSQL each broker gets a
schema of its own, except that brokers given the same `data_dir` share one (a test
that restarts "the same journal" gets the same database).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerProcess


@pytest.fixture(params=["lmdb", "postgres"])
def journal_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker_factory(
    broker_factory: Callable[..., BrokerProcess],
    journal_kind: str,
    request: pytest.FixtureRequest,
) -> Callable[..., BrokerProcess]:
    if journal_kind == "lmdb":
        return broker_factory
    server: Any = request.getfixturevalue("postgres_server")
    urls: dict[Path | None, str] = {}

    def make(*extra: str, data_dir: Path | None = None, **kw: Any) -> BrokerProcess:
        url = urls.get(data_dir) if data_dir is not None else None
        if url is None:
            url = urls[data_dir] = server.fresh_url()
        return broker_factory(*extra, "--journal", url, data_dir=data_dir, **kw)

    return make
