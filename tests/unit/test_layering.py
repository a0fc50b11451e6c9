"""The layering DESIGN.md fixes: imports only point one way, in the source and when
loaded.

cli -> runtime -> core -> protocol;  runtime -> journal;  client -> protocol;
web -> client -> protocol.
The core may read the journal's *contract* (zbroker.journal.base: records and the
abstract Journal, no I/O) because it is handed a store; never a store itself.

The source check reads import statements; the loaded check imports each layer in a
fresh interpreter and looks at what is in sys.modules, which also catches an upper
layer pulled in indirectly (a package's __init__, a third package in between).
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from tests.unit.fresh_interpreter import modules_loaded_by, modules_under, within

PACKAGE = Path(__file__).resolve().parents[2] / "zbroker"

# For each layer, the modules it must never import (prefix match).
FORBIDDEN = {
    "protocol": [
        "zmq",
        "lmdb",
        "zbroker.core",
        "zbroker.runtime",
        "zbroker.journal",
        "zbroker.client",
        "zbroker.cli",
        "zbroker.config",
        "time",
        "socket",
    ],
    "core": [
        "zmq",
        "lmdb",
        "zbroker.runtime",
        "zbroker.journal",
        "zbroker.client",
        "zbroker.cli",
        "zbroker.config",
        "time",
        "socket",
        "threading",
        "asyncio",
    ],
    "journal": ["zmq", "zbroker.core", "zbroker.runtime", "zbroker.client", "zbroker.cli"],
    "client": [
        "zbroker.core",
        "zbroker.runtime",
        "zbroker.journal",
        "zbroker.cli",
        "zbroker.config",
    ],
    "runtime": ["zbroker.cli", "zbroker.client"],
    # zbroker web is an ordinary client of the broker: it reaches the broker's state
    # only through the protocol, never its code.
    "web": [
        "lmdb",
        "zbroker.core",
        "zbroker.runtime",
        "zbroker.journal",
        "zbroker.cli",
        "zbroker.config",
    ],
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def violations(layer: str) -> list[str]:
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in imports_of(path):
            if name in ALLOWED.get(layer, set()):
                continue
            for banned in FORBIDDEN[layer]:
                if name == banned or name.startswith(banned + "."):
                    bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return bad


# Modules a layer may import although a FORBIDDEN prefix covers them.
ALLOWED = {"core": {"zbroker.journal.base"}}

REQUIRED_LAYERS = {"protocol", "core", "runtime", "client"}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer: str) -> None:
    if layer not in REQUIRED_LAYERS and not (PACKAGE / layer).exists():
        pytest.skip(f"zbroker/{layer} does not exist yet")
    assert (PACKAGE / layer).is_dir()
    assert violations(layer) == []


def test_the_check_itself_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("import zmq\nfrom zbroker.runtime import server\n")
    assert imports_of(bad) == {"zmq", "zbroker.runtime"}


# What importing a layer (its package and every module in it) may load of the
# package: fnmatch patterns relative to the package root, which itself is always
# allowed. The core may load the journal's contract (its package, whose __init__
# loads the in-memory store, and base), never the LMDB store; the journal may load
# the protocol (the wire names of its states), never the core.
JOURNAL_CONTRACT = ["journal", "journal.base", "journal.memory", "journal._codec"]
LOADABLE = {
    "protocol": ["protocol", "protocol.*"],
    "core": ["core", "core.*", "protocol", "protocol.*", *JOURNAL_CONTRACT],
    "journal": ["journal", "journal.*", "protocol", "protocol.*"],
    "client": ["client", "client.*", "protocol", "protocol.*"],
    "runtime": [
        "runtime",
        "runtime.*",
        "core",
        "core.*",
        "protocol",
        "protocol.*",
        "journal",
        "journal.*",
        "config",
    ],
    "web": ["web", "web.*", "client", "client.*", "protocol", "protocol.*"],
}
# Part of the package root, loaded with it: the choice of build (zbroker/native.py)
# and the compiled build's shared library, which holds every compiled module's code
# (loading it runs none of them).
BUILD_MODULES = {"native", "_native__mypyc"}
# Third-party packages a layer must not load (prefix match).
NOT_LOADABLE = {
    "protocol": ["zmq", "lmdb"],
    "core": ["zmq", "lmdb"],
    "journal": ["zmq"],
    "client": ["lmdb"],
    "runtime": [],
    "web": ["lmdb"],
}


def loaded_violations(layer: str, root: str = "zbroker", path: Path = PACKAGE.parent) -> list[str]:
    """What importing every module of `root`.`layer` (found in `path`), in a fresh
    interpreter, loads that the layering does not allow."""
    loaded = modules_loaded_by(*modules_under(f"{root}.{layer}", path), path=path)
    bad = []
    for name in sorted(loaded):
        if name.startswith(root + "."):
            relative = name.removeprefix(root + ".")
            if relative in BUILD_MODULES:
                continue
            if not any(fnmatchcase(relative, pattern) for pattern in LOADABLE[layer]):
                bad.append(f"importing {root}.{layer} loads {name}")
        elif within(name, NOT_LOADABLE[layer]):
            bad.append(f"importing {root}.{layer} loads {name}")
    return bad


def test_every_layer_has_a_loaded_rule() -> None:
    assert set(LOADABLE) == set(NOT_LOADABLE) == set(FORBIDDEN)


@pytest.mark.parametrize("layer", sorted(LOADABLE))
def test_layer_loads_only_what_it_may(layer: str) -> None:
    if layer not in REQUIRED_LAYERS and not (PACKAGE / layer).exists():
        pytest.skip(f"zbroker/{layer} does not exist yet")
    assert (PACKAGE / layer).is_dir()
    assert loaded_violations(layer) == []


def test_the_loaded_check_itself_catches_a_violation(tmp_path: Path) -> None:
    """A throwaway package laid out like zbroker, and a stand-in zmq, in tmp_path."""

    def write(relative: str, text: str = "") -> None:
        file = tmp_path / relative
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)

    write("zmq/__init__.py")
    write("fake/__init__.py")
    write("fake/protocol/__init__.py")
    write("fake/runtime/__init__.py", "import zmq\nimport fake.core\n")
    write("fake/core/__init__.py", "import fake.protocol\n")
    # An import inside a function runs later, if ever: it loads nothing now.
    write("fake/core/rules.py", "def later():\n    import fake.runtime\n")
    assert loaded_violations("core", root="fake", path=tmp_path) == []

    # A core module importing the runtime at import time, and zmq through it.
    write("fake/core/rules.py", "import fake.runtime\n")
    assert loaded_violations("core", root="fake", path=tmp_path) == [
        "importing fake.core loads fake.runtime",
        "importing fake.core loads zmq",
    ]

    # The core clean again, but the package's __init__ importing the runtime, as
    # zbroker's __init__ once imported the client: the core loads it all the same.
    write("fake/core/rules.py")
    write("fake/__init__.py", "import fake.runtime\n")
    assert loaded_violations("core", root="fake", path=tmp_path) == [
        "importing fake.core loads fake.runtime",
        "importing fake.core loads zmq",
    ]
    assert loaded_violations("protocol", root="fake", path=tmp_path) == [
        "importing fake.protocol loads fake.core",
        "importing fake.protocol loads fake.runtime",
        "importing fake.protocol loads zmq",
    ]
