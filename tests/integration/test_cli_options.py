"""`zbroker start` as a real process: options from every source reach the broker's
log, and a bound broken from any source stops it with one line (no usage box, no
traceback). tests/unit/test_options.py covers every option; this covers the process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.builds import settings_free_env
from tests.conftest import ROOT, BrokerProcess


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = settings_free_env()
    return subprocess.run(
        [sys.executable, "-m", "zbroker", "start", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize("source", ["flag", "environment", "file"])
def test_a_broken_bound_stops_start_with_one_line(source: str, tmp_path: Path) -> None:
    # Given --max-attempts 0 from one source (and a data dir it must never create)
    data_dir = tmp_path / "data"
    args = ["--data-dir", str(data_dir)]
    env: dict[str, str] = {}
    if source == "flag":
        args += ["--max-attempts", "0"]
        said = "flag"
    elif source == "environment":
        env["ZBROKER_MAX_ATTEMPTS"] = "0"
        said = "environment ZBROKER_MAX_ATTEMPTS"
    else:
        config = tmp_path / "zbroker.toml"
        config.write_text("max_attempts = 0\n")
        args += ["--config", str(config)]
        said = f"file {config}"
    # When the broker starts, then it refuses before opening anything, in one line
    result = start(*args, env=env)
    assert result.returncode == 2
    assert result.stderr == f"zbroker: max_attempts (0, {said}) must be at least 1\n"
    assert not data_dir.exists()


def test_start_logs_each_option_not_at_its_default_with_its_source(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    config = tmp_path / "zbroker.toml"
    config.write_text("retry_base = 500\n")
    broker = broker_factory("--config", str(config), start=False)
    broker.env["ZBROKER_MAX_TASKS"] = "77"
    broker.start()
    log = broker.log()
    assert f"option retry_base = 500.0 (file {config})" in log
    assert "option retry_max = 500.0 (default, raised to retry_base)" in log
    assert "option max_tasks = 77 (environment ZBROKER_MAX_TASKS)" in log
    assert "option log_level = debug (flag)" in log
    assert "option retention" not in log  # at its default: not logged
