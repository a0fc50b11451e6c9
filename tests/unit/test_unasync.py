"""The blocking Client is generated from AsyncClient: the committed file must be fresh.

`python3 dev.py test` runs the same check (`scripts/unasync.py --check`) right
after ruff and mypy; these tests also show that the check fails, and says how to
fix it, when the generated file was edited by hand or its source changed.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "unasync.py"
SOURCE = ROOT / "zbroker" / "client" / "aclient.py"
TARGET = ROOT / "zbroker" / "client" / "client.py"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_check(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, "--check", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_committed_client_is_what_the_generator_makes() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_the_generated_client_says_it_is_generated() -> None:
    head = TARGET.read_text().splitlines()[:2]
    assert head[0].startswith("# GENERATED FILE: do not edit by hand")
    assert "aclient.py" in head[0] and "dev.py unasync" in head[1]


def test_a_hand_edit_of_the_generated_file_fails_the_check(tmp_path: Path) -> None:
    # Given a copy of the source and of the generated file, then edited by hand
    source, target = tmp_path / "aclient.py", tmp_path / "client.py"
    shutil.copy(SOURCE, source)
    shutil.copy(TARGET, target)
    target.write_text(target.read_text().replace("def enqueue(", "def enqueue_v2(", 1))
    # When the check runs on them
    result = run_check("--source", source, "--target", target)
    # Then it fails, names the file, says how to fix it, and shows the difference
    assert result.returncode == 1
    assert f"{target} is stale" in result.stderr
    assert "must not be edited by hand" in result.stderr
    assert "python3 dev.py unasync" in result.stderr
    assert "-    def enqueue_v2(" in result.stderr and "+    def enqueue(" in result.stderr


def test_a_change_to_the_source_fails_the_check_until_regenerated(tmp_path: Path) -> None:
    # Given the source changed after the file was generated
    source, target = tmp_path / "aclient.py", tmp_path / "client.py"
    source.write_text(SOURCE.read_text().replace("Store one task for", "Store a task for"))
    shutil.copy(TARGET, target)
    assert run_check("--source", source, "--target", target).returncode == 1
    # When the generator runs, the check passes, with the change carried over
    subprocess.run(
        [sys.executable, SCRIPT, "--source", source, "--target", target],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert run_check("--source", source, "--target", target).returncode == 0
    assert "Store a task for" in target.read_text()


def test_substitutions_are_of_whole_tokens() -> None:
    unasync = load_generator().unasync
    source = (
        "class AsyncClient(AsyncClientBase):\n"
        "    ctx: AsyncClientContext\n"
        "    async def enqueue(self) -> int:\n"
        "        return await self._run(awaited, AsyncClients)\n"
        "    def stream(self) -> _base.AsyncTaskStream: ...\n"
    )
    lines = unasync(source).splitlines()[2:]
    assert lines == [
        "class Client(ClientBase):",
        "    ctx: ClientContext",
        "    def enqueue(self) -> int:",
        "        return self._run(awaited, AsyncClients)",
        "    def stream(self) -> _base.TaskStream: ...",
    ]


def test_a_substitution_that_matches_nothing_is_an_error() -> None:
    generator = load_generator()
    with pytest.raises(generator.StaleError, match="AsyncClientContext"):
        generator.unasync("class AsyncClient(AsyncClientBase):\n    async def f(self): await g()\n")
