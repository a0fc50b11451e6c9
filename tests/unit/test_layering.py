"""The layering DESIGN.md fixes, checked on the source: imports only point one way.

cli -> runtime -> core -> protocol;  runtime -> journal;  client -> protocol.
The core may read the journal's *contract* (zbroker.journal.base: records and the
abstract Journal, no I/O) because it is handed a store; never a store itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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
    "journal": ["zmq", "zbroker.runtime", "zbroker.client", "zbroker.cli"],
    "client": [
        "zbroker.core",
        "zbroker.runtime",
        "zbroker.journal",
        "zbroker.cli",
        "zbroker.config",
    ],
    "runtime": ["zbroker.cli", "zbroker.client"],
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
