"""Which build of the broker's hot modules runs: compiled (mypyc) or pure Python.

The broker's core, its wire codecs and its journal are plain, fully typed Python.
`python3 dev.py build` (and `dev.py test`, `dev.py start`, `dev.py bench`, when a
C compiler is present) compiles them with mypyc into extension modules beside the
sources, as black and mypy ship theirs; Python prefers an extension module to a
source file of the same name, so once built, the compiled modules load.

The pure-Python sources stay the fallback and the reference: they run

  - where no compiled build exists (no compiler, or never built);
  - where the compiled build is stale: it was built from other sources than the
    ones on disk (the build writes a digest of its sources; an edit after the
    build makes the sources run, never old code);
  - where ZBROKER_PURE=1 is set (how the test suite runs both builds).

This module is the one home of that rule. It must not import anything of
zbroker's own: zbroker/__init__.py calls `choose()` before any other module loads.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The modules compiled: every module of these packages, and single modules.
COMPILED_PACKAGES = ("zbroker.core", "zbroker.protocol")
COMPILED_MODULES = (
    "zbroker.journal.base",
    "zbroker.journal.memory",
    "zbroker.journal._codec",
    "zbroker.journal.lmdb_store",
    "zbroker.journal.postgres",
)
# Left interpreted inside those packages: exception classes that interpreted code
# (the client's errors) subclasses, which a compiled class would refuse.
INTERPRETED = ("zbroker.protocol.errors",)
# mypyc's shared library (every compiled module's code), inside the package.
GROUP = "zbroker._native"
# Written by the build: the digest of the sources it compiled.
STAMP = "_native.stamp"
PURE_ENV = "ZBROKER_PURE"

_PACKAGE_DIR = Path(__file__).resolve().parent
_ROOT = _PACKAGE_DIR.parent


def source_files() -> list[Path]:
    """The sources of every compiled module, in a stable order."""
    files: list[Path] = []
    for package in COMPILED_PACKAGES:
        folder = _ROOT.joinpath(*package.split("."))
        # Package __init__ modules stay interpreted (a compiled one gets a wrong __path__).
        files.extend(
            sorted(
                p
                for p in folder.glob("*.py")
                if p.name != "__init__.py" and f"{package}.{p.stem}" not in INTERPRETED
            )
        )
    files.extend(_ROOT.joinpath(*m.split(".")).with_suffix(".py") for m in COMPILED_MODULES)
    return files


def digest(files: Sequence[Path] | None = None) -> str:
    """What the compiled build must have been built from: the sources, the Python."""
    h = hashlib.sha256(sys.version.encode())
    for path in source_files() if files is None else files:
        h.update(path.relative_to(_ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _is_compiled(name: str) -> bool:
    if name in COMPILED_MODULES:
        return True
    if name in INTERPRETED:
        return False
    return any(name.startswith(p + ".") for p in COMPILED_PACKAGES)


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads the compiled modules from their .py sources, skipping extension modules."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not _is_compiled(fullname):
            return None
        source = _ROOT.joinpath(*fullname.split(".")).with_suffix(".py")
        return (
            importlib.util.spec_from_file_location(fullname, source) if source.is_file() else None
        )


def up_to_date() -> bool:
    """Whether a compiled build exists and was built from the sources on disk."""
    return _built() and _stamp_matches()


def _built() -> bool:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return any((_PACKAGE_DIR / f"_native__mypyc{s}").is_file() for s in suffixes)


# Why the build that runs was chosen: set once by choose().
_why = "not chosen yet"
_compiled = False


def choose() -> None:
    """Pick the build (once, before the compiled modules are imported)."""
    global _why, _compiled
    if any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        return
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        _why = f"pure Python ({PURE_ENV} is set)"
    elif not _built():
        _why = "pure Python (no compiled build: python3 dev.py build makes one)"
    elif not up_to_date():
        _why = "pure Python (the compiled build is older than the sources: python3 dev.py build)"
    else:
        _compiled = True
        _why = "compiled (mypyc)"
        return
    sys.meta_path.insert(0, _SourceFinder())


def _stamp_matches() -> bool:
    stamp = _PACKAGE_DIR / STAMP
    try:
        return stamp.read_text().strip() == digest()
    except OSError:
        return False


def compiled() -> bool:
    """Whether the compiled core runs in this process (checked on a loaded module)."""
    import zbroker.core.tasks as probe

    return not (probe.__file__ or "").endswith(".py")


def describe() -> str:
    """One line for `zbroker --version` and `zbroker status`."""
    loaded = compiled()
    if loaded != _compiled:  # cannot happen unless someone imported around choose()
        return f"{'compiled (mypyc)' if loaded else 'pure Python'} (unexpected: {_why})"
    return _why


__all__ = [
    "COMPILED_MODULES",
    "COMPILED_PACKAGES",
    "GROUP",
    "INTERPRETED",
    "PURE_ENV",
    "STAMP",
    "choose",
    "compiled",
    "describe",
    "digest",
    "source_files",
    "up_to_date",
]
