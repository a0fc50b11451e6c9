"""PostgreSQL for the tests: one private server per test session (scripts/pgserver.py
installs and starts it), unless ZBROKER_TEST_POSTGRES names a server to use; each
test gets a schema of its own in it, named in its URL, so journals never meet.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import urllib.parse
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
URL_ENV = "ZBROKER_TEST_POSTGRES"
_schemas = itertools.count(1)


def _pgserver() -> Any:
    spec = importlib.util.spec_from_file_location("pgserver", ROOT / "scripts" / "pgserver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Server:
    """The session's PostgreSQL: a private one, or the one ZBROKER_TEST_POSTGRES names."""

    def __init__(self) -> None:
        given = os.environ.get(URL_ENV)
        self.private = None
        if given:
            self.url = given
        else:
            self.private = _pgserver().PrivateServer(fsync=False)
            self.url = self.private.start()

    def fresh_url(self) -> str:
        """The server's URL with a new, empty schema first in its search_path."""
        import psycopg

        name = f"zbt_{os.getpid()}_{next(_schemas)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return with_schema(self.url, name)

    def stop(self) -> None:
        if self.private is not None:
            self.private.stop()


def with_schema(url: str, schema: str) -> str:
    """`url` with libpq's `options` setting search_path to `schema`."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    query.append(("options", f"-csearch_path={schema}"))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
