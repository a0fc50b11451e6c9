"""The two builds the suite runs on (zbroker/native.py): compiled and pure Python.

`pure_only` marks a test that replaces a function or constant of the core, the
protocol or the journal to observe or break it (a spy on journal reads, a fault
injected into a write, a cap lowered): compiled code calls those natively, past
the replacement, so the test runs on the pure-Python build only, which has the
same sources. `signature_only` marks a test that reads a function's signature,
which a compiled function does not show. `python3 dev.py test` runs the whole
suite on both builds.
"""

from __future__ import annotations

import os

import pytest

from zbroker import native

pure_only = pytest.mark.skipif(
    native.compiled(),
    reason="replaces a function the compiled build calls natively; runs on the pure build",
)
# A test that reads a function's signature, which a compiled function does not show.
signature_only = pytest.mark.skipif(
    native.compiled(),
    reason="reads a signature, which a compiled function does not show; runs on the pure build",
)

# What refusing a record with a field of the wrong type raises: the store's own
# ValueError, or, on the compiled build, the record's TypeError when it is built
# (a compiled dataclass checks each field's type as it is set).
ILL_TYPED: tuple[type[Exception], ...] = (
    (ValueError, TypeError) if native.compiled() else (ValueError,)
)


def settings_free_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) without the broker's ZBROKER_* settings, for a
    broker or CLI the test configures itself; ZBROKER_PURE stays: a process started
    by the test runs the build the test runs on."""
    source = os.environ if env is None else env
    return {
        name: value
        for name, value in source.items()
        if not name.startswith("ZBROKER_") or name == native.PURE_ENV
    }
