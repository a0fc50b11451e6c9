"""Sans-IO when loaded, not only in the source: importing the core, the protocol
codecs or the journal's contract loads neither pyzmq nor lmdb, and importing the
zbroker package loads none of its subpackages (the client names load on first use).
Each import runs in a fresh interpreter (see fresh_interpreter.py)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

import zbroker
from tests.unit.fresh_interpreter import (
    SOURCE_ROOT,
    heavy_modules,
    modules_loaded_by,
    modules_under,
)

# Every module of the core and the protocol (found on disk), and the journal's
# contract: its package, the abstract Journal and records, the in-memory store.
SANS_IO = [
    *modules_under("zbroker.core"),
    *modules_under("zbroker.protocol"),
    "zbroker.journal",
    "zbroker.journal.base",
    "zbroker.journal.memory",
]


@pytest.mark.parametrize("module", SANS_IO)
def test_importing_loads_neither_zmq_nor_lmdb(module: str) -> None:
    loaded = modules_loaded_by(module)
    assert heavy_modules(loaded) == []
    assert "zbroker.journal.lmdb_store" not in loaded


def test_the_check_sees_zmq_and_lmdb_when_they_are_loaded() -> None:
    assert "zmq" in heavy_modules(modules_loaded_by("zbroker.client"))
    assert "lmdb" in heavy_modules(modules_loaded_by("zbroker.journal.lmdb_store"))
    # and only what matches: a module merely named alike is not zmq
    assert heavy_modules({"zmqx", "lmdbtools", "zbroker.zmq_glue", "zmq.sugar"}) == ["zmq.sugar"]


def test_importing_the_package_loads_no_subpackage() -> None:
    loaded = modules_loaded_by("zbroker")
    # zbroker.native (which build runs) is a module of the package root, not a subpackage.
    assert sorted(name for name in loaded if name.startswith("zbroker.")) == ["zbroker.native"]
    assert heavy_modules(loaded) == []


FIRST_USE = """\
import sys
sys.path.insert(0, sys.argv[1])
import zbroker
assert "zbroker.client" not in sys.modules, "import zbroker loaded the client"
from zbroker import Client
import zbroker.client
assert Client is zbroker.client.Client
assert "zmq" in sys.modules
print("ok")
"""


def test_a_public_name_loads_the_client_on_first_use() -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", FIRST_USE, str(SOURCE_ROOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr


def test_every_public_name_is_the_clients() -> None:
    import zbroker.client

    names = [name for name in zbroker.__all__ if name != "__version__"]
    assert names
    for name in names:
        assert getattr(zbroker, name) is getattr(zbroker.client, name), name
    star: dict[str, object] = {}
    exec("from zbroker import *", star)
    assert set(star) - {"__builtins__"} == set(zbroker.__all__)
    assert set(zbroker.__all__) <= set(dir(zbroker))
    assert isinstance(zbroker.__version__, str)
    with pytest.raises(AttributeError, match="no attribute 'Clinet'"):
        zbroker.Clinet  # type: ignore[attr-defined]  # noqa: B018


def test_type_checkers_see_the_same_names_as_all() -> None:
    """The `if TYPE_CHECKING:` import in zbroker/__init__.py (what mypy sees) names
    exactly __all__ (what the lazy __getattr__ serves), so neither can drift."""
    tree = ast.parse((SOURCE_ROOT / "zbroker" / "__init__.py").read_text())
    seen: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom), ast.unparse(statement)
                assert statement.module == "zbroker.client"
                seen.update(alias.asname or alias.name for alias in statement.names)
    assert seen == set(zbroker.__all__) - {"__version__"}
