"""The options of `zbroker start`: one table (zbroker.config.OPTIONS) makes the flags,
the ZBROKER_* variables, the TOML keys and the settings; the settings check bounds.

Run in process through the real command line (typer's CliRunner on `config show`,
and `configure`, which `start` builds its settings with).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from tests.builds import settings_free_env
from zbroker import cli
from zbroker.config import OPTIONS, BrokerConfig, LogFormat, LogLevel, Option, OptionValue
from zbroker.core.settings import CoreSettings, SettingError
from zbroker.journal import Durability


@dataclasses.dataclass(frozen=True)
class Case:
    """A value for one option other than its default, in each form it can take."""

    text: str  # as a flag or an environment variable gives it
    toml: str  # as a TOML value
    shown: str  # as `config show` prints it
    fields: dict[str, Any]  # the settings it must reach: BrokerConfig fields, core.<field>


CASES = {
    "bind": Case("tcp://127.0.0.1:6001", '"tcp://127.0.0.1:6001"', "tcp://127.0.0.1:6001",
                 {"bind": "tcp://127.0.0.1:6001"}),
    "events_in": Case("tcp://127.0.0.1:6002", '"tcp://127.0.0.1:6002"', "tcp://127.0.0.1:6002",
                      {"events_in": "tcp://127.0.0.1:6002"}),
    "events_out": Case("ipc:///tmp/out", '"ipc:///tmp/out"', "ipc:///tmp/out",
                       {"events_out": "ipc:///tmp/out"}),
    "heartbeat_interval": Case("0.5", "0.5", "0.5", {"core.heartbeat_interval_s": 0.5}),
    "heartbeat_liveness": Case("5", "5", "5", {"core.heartbeat_liveness": 5}),
    "request_expiry": Case("7.5", "7.5", "7.5", {"core.request_expiry_s": 7.5}),
    "max_queued": Case("12", "12", "12", {"core.max_queued_per_service": 12}),
    "max_queued_mib": Case("5", "5", "5", {"core.max_queued_bytes": 5 << 20}),
    "max_message_bytes": Case("4096", "4096", "4096", {"core.max_message_bytes": 4096}),
    "ack_timeout": Case("3.5", "3.5", "3.5", {"core.ack_timeout_s": 3.5}),
    "durability": Case("ASYNC", '"async"', "async", {"durability": Durability.ASYNC}),
    "data_dir": Case("spool/zb", '"spool/zb"', "spool/zb", {"data_dir": Path("spool/zb")}),
    "journal_max_mib": Case("64", "64", "64", {"journal_max_bytes": 64 << 20}),
    "journal": Case("postgresql://zb@db:5432/zb", '"postgresql://zb@db:5432/zb"',
                    "postgresql://zb@db:5432/zb", {"journal": "postgresql://zb@db:5432/zb"}),
    "lease": Case("1.5", "1.5", "1.5", {"lease_s": 1.5}),
    "max_attempts": Case("7", "7", "7",
                         {"core.default_max_attempts": 7, "core.request_max_attempts": 7}),
    "retry_base": Case("0.25", "0.25", "0.25", {"core.retry_base_s": 0.25}),
    # A TOML integer is a fine float.
    "retry_max": Case("30", "30", "30.0", {"core.retry_max_s": 30.0}),
    "retention": Case("86400", "86400", "86400.0", {"core.retention_s": 86400.0}),
    "max_tasks": Case("99", "99", "99", {"core.max_tasks_per_service": 99}),
    "max_departed_services": Case("7", "7", "7", {"core.max_departed_services": 7}),
    "log_level": Case("Warning", '"warning"', "warning", {"log_level": LogLevel.WARNING}),
    "metrics_port": Case("9464", "9464", "9464", {"metrics_port": 9464}),
    "drain_timeout": Case("2.5", "2.5", "2.5", {"drain_timeout_s": 2.5}),
    "log_format": Case("json", '"json"', "json", {"log_format": LogFormat.JSON}),
    "metrics_host": Case("127.0.0.2", '"127.0.0.2"', "127.0.0.2", {"metrics_host": "127.0.0.2"}),
    "metrics_token_file": Case("tok", '"tok"', "tok", {"metrics_token_file": Path("tok")}),
    "auth": Case("auth.toml", '"auth.toml"', "auth.toml", {"auth_file": Path("auth.toml")}),
    "max_waiters_per_principal": Case("9", "9", "9", {"core.max_waiters_per_principal": 9}),
    "max_tasks_per_principal": Case("8", "8", "8", {"core.max_tasks_per_principal": 8}),
    "max_services_per_principal": Case("7", "7", "7", {"core.max_services_per_principal": 7}),
    "max_stream_chunks": Case("5", "5", "5", {"core.max_stream_chunks": 5}),
    "max_stream_mib": Case("3", "3", "3", {"core.max_stream_bytes": 3 << 20}),
    "insecure": Case("true", "true", "True", {"insecure": True}),
    "web": Case("127.0.0.1:8081", '"127.0.0.1:8081"', "127.0.0.1:8081", {"web": "127.0.0.1:8081"}),
    "web_tokens": Case("t.toml", '"t.toml"', "t.toml", {"web_tokens": Path("t.toml")}),
}  # fmt: skip

SOURCES = ["flag", "environment", "file"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in os.environ.keys() - settings_free_env().keys():
        monkeypatch.delenv(name)
    yield


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def envvar(name: str) -> str:
    return "ZBROKER_" + name.upper()


def given(
    name: str, source: str, text: str, toml: str, tmp_path: Path
) -> tuple[list[str], dict[str, str], str]:
    """(args, environment, how config show names the source) that set `name` from
    `source` (a TOML file written under tmp_path for "file")."""
    if source == "flag":
        if text == "true":  # a boolean option is a flag without a value
            return [flag(name)], {}, "flag"
        return [f"{flag(name)}={text}"], {}, "flag"
    if source == "environment":
        return [], {envvar(name): text}, f"environment {envvar(name)}"
    path = tmp_path / "zbroker.toml"
    path.write_text(f"{name} = {toml}\n")
    return ["--config", str(path)], {}, f"file {path}"


def show(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.app, ["config", "show", "--json", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def configured(
    args: list[str], monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> tuple[dict[str, OptionValue], BrokerConfig]:
    """What `start` would run with for `args` and `env` (the same parsing, no broker)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    start = typer.main.get_command(cli.app).commands["start"]  # type: ignore[attr-defined]
    with start.make_context("start", list(args)) as ctx:
        return cli.configure(ctx, ctx.params.get("config_file"))


def with_fields(config: BrokerConfig, fields: dict[str, Any]) -> BrokerConfig:
    core = {k.removeprefix("core."): v for k, v in fields.items() if k.startswith("core.")}
    top = {k: v for k, v in fields.items() if not k.startswith("core.")}
    return dataclasses.replace(config, core=dataclasses.replace(config.core, **core), **top)


# --- the table ------------------------------------------------------------------


def test_every_option_has_a_case_and_the_names_are_the_documented_ones() -> None:
    # Given the table, when its names are listed, then they are the ones users rely on
    # (README, existing files and scripts), in the order `--help` shows them.
    assert [o.name for o in OPTIONS] == list(CASES)
    assert [o.flag for o in OPTIONS] == [flag(n) for n in CASES]
    assert [o.envvar for o in OPTIONS] == [envvar(n) for n in CASES]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_each_option_is_well_formed(option: Option) -> None:
    default = option.default
    assert (default is None) if option.optional else isinstance(default, option.kind)
    # Every field it feeds exists, and holds the option's default (scaled: MiB to bytes).
    for path in option.feeds:
        value = getattr(BrokerConfig().core if path.startswith("core.") else BrokerConfig(),
                        path.removeprefix("core."))  # fmt: skip
        assert value == option.field_value(default)
    assert option.scale == 1 or option.unit == "MiB"
    if option.unit == "s":
        assert "second" in option.help.lower()
    elif option.unit:
        assert option.unit in option.help


def test_no_field_is_fed_by_two_options() -> None:
    fed = [path.rpartition(".")[2] for o in OPTIONS for path in o.feeds]
    assert len(fed) == len(set(fed))


def test_the_start_command_is_made_from_the_table() -> None:
    start = typer.main.get_command(cli.app).commands["start"]  # type: ignore[attr-defined]
    params = {p.name: p for p in start.params}
    assert list(params) == ["config_file", *CASES]
    for option in OPTIONS:
        param = params[option.name]
        assert param.opts == [flag(option.name)]
        assert param.envvar == envvar(option.name)
        assert param.help == option.help
        assert param.default == option.default


# --- every option from every source reaches the settings -------------------------


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", list(CASES))
def test_an_option_from_each_source_reaches_the_settings(
    name: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given one option set from one source, everything else at its default
    case = CASES[name]
    args, env, said = given(name, source, case.text, case.toml, tmp_path)
    # When config show reads it, then it shows the value and where it came from
    code, out, err = show(args, env)
    assert (code, err) == (0, "")
    rows = json.loads(out)
    assert rows[name] == {"value": case.shown, "source": said}
    assert all(row["source"] == "default" for n, row in rows.items() if n != name)
    # And the settings start would run with differ from the defaults in its fields only
    values, config = configured(args, monkeypatch, env)
    assert values[name].source == said
    assert config == with_fields(BrokerConfig(), case.fields)


def test_a_flag_wins_over_the_environment_which_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "zbroker.toml"
    path.write_text("max_tasks = 5\nmax_queued = 6\nretention = 7\n")
    env = {"ZBROKER_MAX_QUEUED": "16", "ZBROKER_RETENTION": "17"}
    values, config = configured(["--config", str(path), "--retention", "27"], monkeypatch, env)
    assert [values[n].source for n in ("max_tasks", "max_queued", "retention")] == [
        f"file {path}",
        "environment ZBROKER_MAX_QUEUED",
        "flag",
    ]
    core = config.core
    assert (core.max_tasks_per_service, core.max_queued_per_service, core.retention_s) == (
        5,
        16,
        27.0,
    )


@pytest.mark.parametrize("source", SOURCES)
def test_a_defaulted_retry_max_is_raised_to_a_larger_retry_base(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args, env, _ = given("retry_base", source, "500", "500", tmp_path)
    code, out, _ = show(args, env)
    assert code == 0
    assert json.loads(out)["retry_max"] == {
        "value": "500.0",
        "source": "default, raised to retry_base",
    }
    _, config = configured(args, monkeypatch, env)
    assert (config.core.retry_base_s, config.core.retry_max_s) == (500.0, 500.0)


# --- a bound broken from any source is one line naming the option and the source --

# (option, a value that breaks its bound, the message with {src} for its source)
BROKEN = [
    ("heartbeat_interval", "0", "heartbeat_interval (0, {src}) must be at least 0.01"),
    ("heartbeat_interval", "nan", "heartbeat_interval (nan, {src}) must be at least 0.01"),
    ("heartbeat_liveness", "0", "heartbeat_liveness (0, {src}) must be at least 1"),
    ("request_expiry", "0", "request_expiry (0, {src}) must be at least 0.001"),
    ("max_queued", "0", "max_queued (0, {src}) must be at least 1"),
    ("max_queued_mib", "0", "max_queued_mib (0, {src}) must be at least 1 MiB"),
    ("max_message_bytes", "63", "max_message_bytes (63, {src}) must be at least 64"),
    ("ack_timeout", "0", "ack_timeout (0, {src}) must be at least 0.001"),
    ("journal_max_mib", "0", "journal_max_mib (0, {src}) must be at least 1 MiB"),
    (
        "journal",
        "/var/lib/zb",
        "journal (/var/lib/zb, {src}) must be a PostgreSQL URL: postgresql://USER@HOST:PORT/DB",
    ),
    ("lease", "0.1", "lease (0.1, {src}) must be between 0.5 and 300 seconds"),
    ("max_attempts", "0", "max_attempts (0, {src}) must be at least 1"),
    ("retry_base", "-1", "retry_base (-1, {src}) must be at least 0"),
    ("retry_max", "0.5", "retry_max (0.5, {src}) must be at least retry_base (1, default)"),
    ("retention", "-1", "retention (-1, {src}) must be at least 0"),
    ("max_tasks", "0", "max_tasks (0, {src}) must be at least 1"),
    ("metrics_port", "65536", "metrics_port (65536, {src}) must be a port number, 0 to 65535"),
    ("metrics_port", "-1", "metrics_port (-1, {src}) must be a port number, 0 to 65535"),
    # Without --auth, only endpoints of this machine (issue 17; docs/security.md).
    (
        "bind",
        "tcp://0.0.0.0:5555",
        "bind (tcp://0.0.0.0:5555, {src}) is reachable from other"
        " machines: give --auth FILE (docs/security.md), or --insecure to serve it without"
        " authentication",
    ),
    (
        "events_out",
        "tcp://*:5557",
        "events_out (tcp://*:5557, {src}) is reachable from other"
        " machines: give --auth FILE (docs/security.md), or --insecure to serve it without"
        " authentication",
    ),
]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(("name", "bad", "message"), BROKEN, ids=[f"{b[0]}={b[1]}" for b in BROKEN])
def test_a_broken_bound_is_one_line_naming_the_option_and_its_source(
    name: str, bad: str, message: str, source: str, tmp_path: Path
) -> None:
    toml = bad if bad == "nan" or bad[0].isdigit() or bad[0] == "-" else f'"{bad}"'
    args, env, said = given(name, source, bad, toml, tmp_path)
    code, out, err = show(args, env)
    assert (code, out) == (2, "")
    assert err == f"zbroker: {message.format(src=said)}\n"


def test_bounds_of_two_options_name_both_sources(tmp_path: Path) -> None:
    path = tmp_path / "zbroker.toml"
    path.write_text("retry_base = 5\n")
    code, _, err = show(["--config", str(path)], {"ZBROKER_RETRY_MAX": "2"})
    assert code == 2
    assert err == (
        f"zbroker: retry_max (2, environment ZBROKER_RETRY_MAX) must be at least "
        f"retry_base (5, file {path})\n"
    )


def test_a_value_of_the_wrong_type_is_refused_before_any_bound(tmp_path: Path) -> None:
    code, _, err = show([], {"ZBROKER_HEARTBEAT_LIVENESS": "often"})
    assert code == 2 and "--heartbeat-liveness" in err and "ZBROKER_HEARTBEAT_LIVENESS" in err
    path = tmp_path / "zbroker.toml"
    path.write_text("max_queued = 0.5\n")  # not 0 (below the bound): not an integer at all
    code, _, err = show(["--config", str(path)], {})
    assert (code, err) == (2, f"zbroker: {path}: max_queued: 0.5 is not an integer\n")
    path.write_text('log_level = "verbose"\n')
    code, _, err = show(["--config", str(path)], {})
    assert code == 2 and err.startswith(f"zbroker: {path}: log_level: ") and "verbose" in err


# --- the settings records hold the bounds -----------------------------------------

# (field, the least value it may take, a value just below); for CoreSettings and
# BrokerConfig alike, each checked on its own record.
CORE_BOUNDS = [
    ("heartbeat_interval_s", 0.01, 0.009),
    ("heartbeat_liveness", 1, 0),
    ("request_expiry_s", 0.001, 0.0),
    ("max_queued_per_service", 1, 0),
    ("max_message_bytes", 64, 63),
    ("max_frames", 1, 0),
    ("ack_timeout_s", 0.001, 0.0),
    ("request_max_attempts", 1, 0),
    ("default_max_attempts", 1, 0),
    ("retry_base_s", 0.0, -0.5),
    ("retention_s", 0.0, -1.0),
    ("max_tasks_per_service", 1, 0),
    ("window_per_service", 1, 0),
    ("max_waiters", 0, -1),
    ("request_wait_s", 0.0, -1.0),
    ("max_stream_chunks", 1, 0),
    ("max_stream_bytes", 1, 0),
    ("history_limit", 1, 0),
]


@pytest.mark.parametrize(("name", "least", "below"), CORE_BOUNDS)
def test_core_settings_keep_each_bound(name: str, least: float, below: float) -> None:
    at_bound: dict[str, Any] = {name: least}
    assert getattr(CoreSettings(**at_bound), name) == least
    # nan only where the field is a float: an int field given a float is a type error
    # (refused by the compiled build's own checks before any bound is read).
    for bad in (below, math.nan) if isinstance(least, float) else (below,):
        beyond: dict[str, Any] = {name: bad}
        with pytest.raises(SettingError) as caught:
            CoreSettings(**beyond)
        [(field, value)] = caught.value.values.items()
        assert field == name
        assert value == bad or (math.isnan(bad) and math.isnan(value))  # nan != nan
        assert str(caught.value).startswith(f"{name} (")
        assert "must be at least" in str(caught.value)


def test_core_settings_refuse_retry_max_below_retry_base() -> None:
    assert CoreSettings(retry_base_s=5.0, retry_max_s=5.0).retry_max_s == 5.0
    with pytest.raises(SettingError) as caught:
        CoreSettings(retry_base_s=5.0, retry_max_s=1.5)
    assert str(caught.value) == "retry_max_s (1.5) must be at least retry_base_s (5)"


def test_broker_config_keeps_its_own_bounds() -> None:
    assert BrokerConfig(journal_max_bytes=1 << 20, metrics_port=0, router_hwm=0).router_hwm == 0
    assert BrokerConfig(metrics_port=65535).metrics_port == 65535
    broken: list[tuple[dict[str, Any], str]] = [
        (
            {"journal_max_bytes": (1 << 20) - 1},
            "journal_max_bytes (1048575) must be at least 1 MiB",
        ),
        ({"metrics_port": 65536}, "metrics_port (65536) must be a port number, 0 to 65535"),
        ({"router_hwm": -1}, "router_hwm (-1) must be at least 0"),
        ({"events_hwm": -1}, "events_hwm (-1) must be at least 0"),
    ]
    for fields, said in broken:
        with pytest.raises(SettingError) as caught:
            BrokerConfig(**fields)
        assert str(caught.value) == said


def test_insecure_or_auth_lets_a_broker_serve_other_machines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a bind reachable from other machines, with --insecure or with --auth
    for extra, unprotected in (
        (["--insecure"], ["tcp://0.0.0.0:5555"]),
        (["--auth", "auth.toml"], []),
    ):
        _, config = configured(["--bind", "tcp://0.0.0.0:5555", *extra], monkeypatch, {})
        # Then the settings are made, and say what is served without authentication
        assert config.unprotected() == unprotected


def test_metrics_on_another_address_needs_a_token_or_insecure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["--metrics-port", "9464", "--metrics-host", "0.0.0.0"]
    code, out, err = show(args, {})
    assert (code, out) == (2, "")
    assert "metrics_host (0.0.0.0, flag) is reachable from other machines" in err
    _, config = configured([*args, "--metrics-token-file", "tok"], monkeypatch, {})
    assert config.unprotected() == []
    _, config = configured([*args, "--insecure"], monkeypatch, {})
    assert config.unprotected() == ["http://0.0.0.0:9464/metrics"]
