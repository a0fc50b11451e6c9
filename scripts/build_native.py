"""Compile the broker's hot modules with mypyc, in place (see zbroker/native.py).

    python scripts/build_native.py           build unless the build is up to date
    python scripts/build_native.py --force   build anyway
    python scripts/build_native.py --clean   remove the compiled build (pure Python runs)

Run by `python3 dev.py build` (and by dev.py's test, start and bench commands);
it needs a C compiler and Python's headers, and exits 3 when they are missing,
leaving the pure-Python modules to run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import io
import os
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zbroker import native  # noqa: E402  (needs ROOT on the path)

BUILD_DIR = ROOT / "build" / "mypyc"
NO_COMPILER = 3


def say(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def compiled_files() -> list[Path]:
    """Extension modules of a build in the package tree."""
    found: list[Path] = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        found.extend((ROOT / "zbroker").rglob(f"*{suffix}"))
    return sorted(set(found))


def clean() -> None:
    (ROOT / "zbroker" / native.STAMP).unlink(missing_ok=True)
    for path in compiled_files():
        path.unlink()
    shutil.rmtree(BUILD_DIR, ignore_errors=True)


def compiler_missing() -> str | None:
    """Why no build can be made here, or None."""
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.is_file():
        return f"Python's headers are missing ({include})"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    return None


def build() -> None:
    from mypyc.build import mypycify
    from setuptools import Distribution

    files = native.source_files()
    wanted = native.digest(files)
    clean()  # a failed build leaves the pure-Python modules, never a stale mix
    started = time.monotonic()
    say(f"compiling {len(files)} modules with mypyc (about two minutes on two cores)")
    os.chdir(ROOT)
    # mypyc's notes on code it compiles less well ("warning: Treating generator
    # comprehension as list") are for whoever tunes the hot path, not for every
    # start: kept in build/mypyc/notes.txt, printed only if the compile fails.
    notes = io.StringIO()
    try:
        with contextlib.redirect_stdout(notes):
            extensions = mypycify(
                [str(f.relative_to(ROOT)) for f in files],
                opt_level="3",
                group_name=native.GROUP,
                target_dir=str(BUILD_DIR),
            )
    except BaseException:
        print(notes.getvalue(), end="")
        raise
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    (BUILD_DIR / "notes.txt").write_text(notes.getvalue())
    # Built from the arguments alone: setuptools reads no pyproject.toml here.
    dist = Distribution({"name": "zbroker-native", "ext_modules": extensions})
    command = dist.get_command_obj("build_ext")
    command.inplace = True
    command.build_temp = str(BUILD_DIR / "temp")
    done = threading.Event()

    def tick() -> None:  # the C compiler is silent for a minute or two: show it works
        while not done.wait(20.0):
            say(f"still compiling ({time.monotonic() - started:.0f} s)")

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        dist.run_command("build_ext")
    finally:
        done.set()
        ticker.join()
    (ROOT / "zbroker" / native.STAMP).write_text(wanted + "\n")
    say(f"compiled build ready in {time.monotonic() - started:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build even when up to date")
    parser.add_argument("--clean", action="store_true", help="remove the compiled build")
    args = parser.parse_args()
    if args.clean:
        clean()
        say("compiled build removed: the pure-Python modules run")
        return 0
    if not args.force and native.up_to_date():
        say("compiled build is up to date")
        return 0
    why = compiler_missing()
    if why is not None:
        say(f"no compiled build: {why}; the pure-Python modules run")
        return NO_COMPILER
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
