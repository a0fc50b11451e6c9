"""What importing modules loads, seen from a fresh interpreter (a subprocess).

The pytest process has long since loaded zmq, lmdb and every zbroker module, so
`sys.modules` there says nothing about what one import pulls in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

# The directory holding the zbroker package.
SOURCE_ROOT = Path(__file__).resolve().parents[2]

# Third-party libraries that do I/O, which the sans-IO layers must never load.
HEAVY = ("zmq", "lmdb")

_IMPORT_AND_LIST = """\
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
for name in sys.argv[2:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def modules_loaded_by(*modules: str, path: Path = SOURCE_ROOT) -> set[str]:
    """Every module in sys.modules after a fresh interpreter imports `modules`, in
    order, with `path` first on sys.path. -I: no PYTHON* variables, no user site,
    no current directory on the path."""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _IMPORT_AND_LIST, str(path), *modules],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path,
    )
    assert proc.returncode == 0, f"importing {modules} failed:\n{proc.stderr}"
    loaded = set(json.loads(proc.stdout.splitlines()[-1]))
    assert set(modules) <= loaded
    return loaded


def within(name: str, packages: Iterable[str]) -> bool:
    """Whether `name` is one of `packages` or a module below one of them."""
    return any(name == p or name.startswith(p + ".") for p in packages)


def heavy_modules(loaded: Iterable[str]) -> list[str]:
    return sorted(name for name in loaded if within(name, HEAVY))


def modules_under(package: str, path: Path = SOURCE_ROOT) -> list[str]:
    """Dotted names of `package` (found in `path`) and of every module below it,
    found on disk, so modules added later are covered without a list to update."""
    names = []
    for file in sorted((path / package.replace(".", "/")).rglob("*.py")):
        parts = file.relative_to(path).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names
