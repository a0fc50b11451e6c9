"""Fixtures of the cross-language tests: `node` child processes next to real brokers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crosslang.nodeproc import NodeFactory, node_binary


@pytest.fixture(scope="session")
def node_path() -> str:
    """Fails (never skips) every test that needs Node when Node is missing."""
    try:
        return node_binary()
    except AssertionError as exc:
        problem = str(exc)
    pytest.fail(problem, pytrace=False)


@pytest.fixture
def node(node_path: str, tmp_path: Path) -> Iterator[NodeFactory]:
    """`node("worker.mjs", arg...)`: a started script; every one is ended at teardown."""
    factory = NodeFactory(node_path, tmp_path)
    try:
        yield factory
    finally:
        factory.close_all()
