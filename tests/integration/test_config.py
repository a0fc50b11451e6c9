"""Configuration: a TOML file < ZBROKER_* environment < flags, shown by `zbroker config show`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.builds import settings_free_env
from tests.conftest import ROOT, BrokerProcess


def show(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = settings_free_env()
    return subprocess.run(
        [sys.executable, "-m", "zbroker", "config", "show", "--json", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **(env or {})},
        timeout=60,
    )


def test_file_then_environment_then_flag(tmp_path: Path) -> None:
    config = tmp_path / "zbroker.toml"
    config.write_text('request_expiry = 7\ndurability = "async"\nmax_attempts = 5\n')
    from_file = json.loads(show("--config", str(config)).stdout)
    assert from_file["request_expiry"] == {"value": "7.0", "source": f"file {config}"}
    assert from_file["durability"]["value"] == "async"
    assert from_file["bind"]["source"] == "default"
    env = {"ZBROKER_REQUEST_EXPIRY": "8"}
    from_env = json.loads(show("--config", str(config), env=env).stdout)
    assert from_env["request_expiry"] == {
        "value": "8.0",
        "source": "environment ZBROKER_REQUEST_EXPIRY",
    }
    assert from_env["max_attempts"]["value"] == "5"  # still from the file
    from_flag = json.loads(show("--config", str(config), "--request-expiry", "9", env=env).stdout)
    assert from_flag["request_expiry"] == {"value": "9.0", "source": "flag"}
    # The file itself may come from the environment.
    via_env = json.loads(show(env={"ZBROKER_CONFIG": str(config)}).stdout)
    assert via_env["durability"]["value"] == "async"


def test_bad_files_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("heartbeat = 2\n")
    result = show("--config", str(unknown))
    assert result.returncode == 2
    assert "unknown option(s) heartbeat" in result.stderr and "heartbeat_interval" in result.stderr
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('heartbeat_liveness = "often"\n')
    result = show("--config", str(wrong))
    assert result.returncode == 2 and "heartbeat_liveness" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("= nothing\n")
    result = show("--config", str(broken))
    assert result.returncode == 2 and "cannot read" in result.stderr
    # Values click would coerce silently (true -> 1, 2.5 -> 2) are refused too
    for text, why in [
        ("heartbeat_liveness = true", "a boolean"),
        ("heartbeat_liveness = 2.5", "not an integer"),
        ("retry_base = false", "a boolean"),
    ]:
        coerced = tmp_path / "coerced.toml"
        coerced.write_text(text + "\n")
        result = show("--config", str(coerced))
        assert result.returncode == 2 and why in result.stderr, (text, result.stderr)


def test_retry_max_below_retry_base_is_raised_when_defaulted_and_refused_when_given() -> None:
    raised = json.loads(show("--retry-base", "500").stdout)
    assert raised["retry_max"] == {"value": "500.0", "source": "default, raised to retry_base"}
    refused = show("--retry-base", "5", "--retry-max", "1")
    assert refused.returncode == 2
    assert "retry_max (1, flag) must be at least retry_base (5, flag)" in refused.stderr


def test_an_unusable_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    clean = settings_free_env()
    result = subprocess.run(
        [sys.executable, "-m", "zbroker", "start", "--data-dir", str(not_a_dir / "sub")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean,
        timeout=60,
    )
    assert result.returncode == 1
    assert "zbroker: cannot start: [Errno 20] Not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_start_runs_with_the_file(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    config = tmp_path / "zbroker.toml"
    config.write_text('durability = "memory"\nretention = 60\n')
    broker = broker_factory("--config", str(config))
    log = broker.log()
    assert f"option durability = memory (file {config})" in log
    assert "journal: in memory (memory)" in log
    assert "option heartbeat_interval = 0.2 (flag)" in log


def test_json_logs_are_one_object_per_line(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    broker = broker_factory("--log-format", "json")
    broker.stop()
    lines = broker.log().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["message"].startswith("broker listening on") for r in records)
    assert any(r["logger"] == "zbroker.runtime" and r["level"] == "info" for r in records)
