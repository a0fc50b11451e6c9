#!/usr/bin/env python3
"""Generate the blocking Client (zbroker/client/client.py) from AsyncClient (aclient.py).

    python3 scripts/unasync.py           write client.py from aclient.py
    python3 scripts/unasync.py --check   exit 1, saying so, when client.py is stale

(`python3 dev.py unasync` runs the first; `python3 dev.py test` the second.)

The generator only substitutes tokens, line by line: the names of the asyncio
client become those of the blocking one, `async def` becomes `def`, and
`await ` goes. Whatever differs between the two clients beyond that lives in
zbroker/client/_base.py, under names these substitutions map onto each other
(AsyncClientBase -> ClientBase). So aclient.py must keep to a few rules: it
writes no `async with`/`async for`, and its prose names the flavours as "the
asyncio client" and "the blocking client" where it contrasts them (the token
AsyncClient always becomes Client). Every substitution must be used at least
once, so a rule that no longer matches anything is noticed.

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "zbroker" / "client" / "aclient.py"
TARGET = ROOT / "zbroker" / "client" / "client.py"

# (pattern, replacement), applied in order to every line; patterns match whole words.
SUBS: list[tuple[str, str]] = [
    ("AsyncClientBase", "ClientBase"),
    ("AsyncTaskStream", "TaskStream"),
    ("AsyncClientContext", "ClientContext"),
    ("AsyncClient", "Client"),
    ("async def", "def"),
    ("await ", ""),
]
_COMPILED = [
    (re.compile(rf"\b{re.escape(old)}" + (r"\b" if old[-1].isalnum() else "")), new)
    for old, new in SUBS
]

HEADER = (
    "# GENERATED FILE: do not edit by hand. It is made from zbroker/client/aclient.py\n"
    "# by scripts/unasync.py: edit aclient.py, then run `python3 dev.py unasync`.\n"
)


class StaleError(Exception):
    """The generated file is not what the generator would write now, or cannot be made."""


def unasync(source: str) -> str:
    """The blocking client's module text, generated from the asyncio client's `source`."""
    used = [False] * len(_COMPILED)
    lines = []
    for line in source.splitlines(keepends=True):
        for i, (pattern, new) in enumerate(_COMPILED):
            line, n = pattern.subn(new, line)
            used[i] = used[i] or n > 0
        lines.append(line)
    unused = [SUBS[i][0] for i, was in enumerate(used) if not was]
    if unused:
        raise StaleError(f"substitutions that matched nothing: {', '.join(unused)}")
    return HEADER + "".join(lines)


def check(source: Path, target: Path) -> None:
    """Raise StaleError, with a diff, unless `target` is what `source` generates."""
    expected = unasync(source.read_text())
    actual = target.read_text() if target.exists() else ""
    if actual == expected:
        return
    diff = difflib.unified_diff(
        actual.splitlines(keepends=True),
        expected.splitlines(keepends=True),
        f"{target} (as it is)",
        f"{target} (as {source.name} generates it)",
        n=1,
    )
    shown = "".join(list(diff)[:40])
    raise StaleError(
        f"{target} is stale: it is generated from {source} and must not be edited by hand.\n"
        f"Edit {source.name} and run `python3 dev.py unasync` (or scripts/unasync.py).\n"
        f"{shown}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="only check that TARGET is fresh")
    parser.add_argument("--source", type=Path, default=SOURCE, help="the asyncio client")
    parser.add_argument("--target", type=Path, default=TARGET, help="the generated file")
    args = parser.parse_args(argv)
    try:
        if args.check:
            check(args.source, args.target)
            print(f"{args.target} is up to date with {args.source}")
            return 0
        text = unasync(args.source.read_text())
    except StaleError as e:
        print(e, file=sys.stderr)
        return 1
    if not args.target.exists() or args.target.read_text() != text:
        args.target.write_text(text)
        print(f"wrote {args.target} from {args.source}")
    else:
        print(f"{args.target} was up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
