"""PostgreSQL for the tests: one private server per test session (scripts/pgserver.py
installs and starts it), unless ZBROKER_TEST_POSTGRES names a server to use; each
test gets a schema of its own in it, named in its URL, so journals never meet.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
URL_ENV = "ZBROKER_TEST_POSTGRES"
_schemas = itertools.count(1)
_module: Any = None


def _pgserver() -> Any:
    """scripts/pgserver.py (loaded once)."""
    global _module
    if _module is not None:
        return _module
    spec = importlib.util.spec_from_file_location("pgserver", ROOT / "scripts" / "pgserver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _module = module
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
        return str(_pgserver().with_schema(self.url, name))

    def stop(self) -> None:
        if self.private is not None:
            self.private.stop()
