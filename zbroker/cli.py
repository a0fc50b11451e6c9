"""The `zbroker` command line: `zbroker start` runs a broker with embedded defaults.

`start`'s options come from the one table in zbroker.config (OPTIONS): each is a
flag, a `ZBROKER_*` environment variable and a TOML key; a flag wins over the
environment, which wins over the file. Here they are only parsed; the settings
records check their bounds.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.util
import inspect
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main

from zbroker import __version__, native
from zbroker.client import Client, Subscriber
from zbroker.client.documents import (
    data_document,
    dead_letters_document,
    event_document,
    jsonable,
    queues_document,
    stats_document,
    task_document,
    tasks_document,
    workers_document,
)
from zbroker.client.endpoints import joined, parse_endpoints
from zbroker.client.errors import ClientError
from zbroker.client.keys import Credentials
from zbroker.config import (
    OPTION_NAMES,
    OPTIONS,
    BrokerConfig,
    LogFormat,
    Option,
    OptionError,
    OptionValue,
    Origin,
    build_config,
    settle,
)
from zbroker.journal import JournalError
from zbroker.protocol import DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT
from zbroker.protocol.cron import parse_duration
from zbroker.protocol.states import LISTABLE_STATES, QUEUE_COUNTS
from zbroker.runtime import BindError, BrokerServer
from zbroker.runtime.auth import AuthFileError

app = typer.Typer(
    name="zbroker",
    help="A ZeroMQ task broker: Majordomo request/reply, durable queues, a topic event bus.",
    no_args_is_help=True,
    add_completion=False,
)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: time (seconds since the epoch), level, logger,
    message, and the exception text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zbroker {__version__}, core: {native.describe()}")
        raise typer.Exit()


# The CURVE keys the commands that talk to a broker use (--server-key, --key on the
# root command, or ZBROKER_SERVER_KEY and ZBROKER_KEY): None when not given.
_credentials: Credentials | None = None
# The same two options as given, for a child `zbroker web` (`start --web`).
_credential_flags: list[str] = []


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    server_key: Annotated[
        str | None,
        typer.Option(
            envvar="ZBROKER_SERVER_KEY",
            help="A broker started with --auth: its public key (its .key file, or the"
            " Z85 text its log prints).",
        ),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(
            envvar="ZBROKER_KEY",
            dir_okay=False,
            help="A broker started with --auth: this user's certificate (NAME.key_secret).",
        ),
    ] = None,
) -> None:
    """zbroker command line."""
    global _credentials
    if server_key is None and key is None:
        return
    if server_key is None or key is None:
        typer.echo("zbroker: give both --server-key and --key, or neither", err=True)
        raise typer.Exit(2)
    _credential_flags[:] = ["--server-key", server_key, "--key", str(key)]
    try:
        _credentials = Credentials.load(server_key, key)
    except ClientError as exc:
        typer.echo(f"zbroker: {exc}", err=True)
        raise typer.Exit(2) from None


def _parameter(option: Option) -> inspect.Parameter:
    """`option` as a keyword parameter, from which typer makes its flag (and reads
    its variable). Only types are parsed here; bounds are the settings' to check."""
    kind: Any = option.kind
    info = typer.Option(
        option.default,
        option.flag,
        envvar=option.envvar,
        help=option.help,
        case_sensitive=False,
        file_okay=not option.directory,
    )
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=info,
        annotation=kind | None if option.optional else kind,
    )


def _with_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command` (taking `**options`) with one parameter per entry of OPTIONS in
    its signature, which is what typer builds a command's options from."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    parameters = [*own, *map(_parameter, OPTIONS)]
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return command


@app.command()
@_with_options
def start(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="ZBROKER_CONFIG",
            dir_okay=False,
            help="A TOML file of options (the names below, with underscores); "
            "the environment and flags override it.",
        ),
    ] = None,
    **options: Any,  # one per entry of OPTIONS, read back with their sources from ctx
) -> None:
    """Run a broker in the foreground until SIGINT or SIGTERM."""
    values, config = configure(ctx, config_file)
    if config.web is not None:
        _listen_address(config.web)
        if importlib.util.find_spec("aiohttp") is None:
            typer.echo("zbroker: --web needs aiohttp: pip install 'zbroker[web]'", err=True)
            raise typer.Exit(2)
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format is LogFormat.JSON:
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log_level.value.upper(), handlers=[handler])
    log = logging.getLogger("zbroker.config")
    for name, given in values.items():
        if given.source != "default":
            log.info("option %s = %s (%s)", name, _shown(given.value), given.source)
    if config.journal is not None:
        _start_in_group(config)
        return
    try:
        server = BrokerServer(config)
    except (BindError, JournalError, AuthFileError) as exc:
        typer.echo(f"zbroker: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # the data directory cannot be made or opened, say
        typer.echo(f"zbroker: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    server.install_signal_handlers()
    gateway = _start_gateway(config) if config.web else None
    try:
        server.serve_forever()
    except JournalError as exc:
        typer.echo(f"zbroker: stopped: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        if gateway is not None:
            _stop_gateway(gateway)


def _start_in_group(config: BrokerConfig) -> None:
    """`start --journal postgresql://...`: a broker of an active/standby group."""
    if importlib.util.find_spec("psycopg") is None:
        typer.echo("zbroker: --journal needs psycopg: pip install 'zbroker[postgres]'", err=True)
        raise typer.Exit(2)
    from zbroker.runtime.group import serve_in_group

    gateway = _start_gateway(config) if config.web else None
    try:
        serve_in_group(config)
    except (BindError, JournalError, AuthFileError) as exc:
        typer.echo(f"zbroker: stopped: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"zbroker: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if gateway is not None:
            _stop_gateway(gateway)


def _reachable(endpoint: str) -> str:
    """A bound endpoint as a local peer connects to it (a wildcard host is loopback)."""
    for wildcard, local in (("*", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("[::]", "[::1]")):
        prefix = f"tcp://{wildcard}:"
        if endpoint.startswith(prefix):
            return f"tcp://{local}:" + endpoint.removeprefix(prefix)
    return endpoint


def _start_gateway(config: BrokerConfig) -> subprocess.Popen[bytes]:
    """`zbroker web` as a child of this broker, which it stops with itself."""
    logging.getLogger("zbroker.config").info("starting zbroker web on %s", config.web)
    return subprocess.Popen(gateway_command(config))


def gateway_command(config: BrokerConfig) -> list[str]:
    """The command line of `start --web`'s gateway: this broker's endpoints, the root
    key options, its tokens, and this process as the parent whose end stops it."""
    assert config.web is not None
    command = [sys.executable, "-m", "zbroker", *_credential_flags, "web", "--listen", config.web]
    command += ["--endpoint", _reachable(config.bind)]
    command += ["--events-in", _reachable(config.events_in)]
    command += ["--events-out", _reachable(config.events_out)]
    command += ["--parent", str(os.getpid())]
    if config.web_tokens is not None:
        command += ["--tokens", str(config.web_tokens)]
    return command


def _stop_gateway(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)


def _shown(value: Any) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def configure(
    ctx: typer.Context, config_file: Path | None
) -> tuple[dict[str, OptionValue], BrokerConfig]:
    """The options of `ctx` (a `start` context) with their sources, and the settings
    they make. A file or value refused ends the command with one line on stderr
    (exit 2), naming the option and where its value came from."""
    try:
        values = settle(resolve_options(ctx, config_file))
        return values, build_config(values)
    except OptionError as exc:
        typer.echo(f"zbroker: {exc}", err=True)
        raise typer.Exit(2) from None


# Where a value came from, by the name of the parameter source typer reports.
_ORIGINS = {"COMMANDLINE": Origin.FLAG, "ENVIRONMENT": Origin.ENVIRONMENT}


def resolve_options(ctx: typer.Context, config_file: Path | None) -> dict[str, OptionValue]:
    """Every option of OPTIONS from `ctx` (a `start` context) with its source: a flag
    or the environment wins over the TOML file, which wins over the default."""
    from_file = _read_toml(config_file)
    unknown = sorted(set(from_file) - OPTION_NAMES)
    if unknown:
        raise OptionError(
            f"{config_file}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(OPTION_NAMES))}"
        )
    params = {p.name: p for p in ctx.command.params}
    out: dict[str, OptionValue] = {}
    for option in OPTIONS:
        reported = ctx.get_parameter_source(option.name)
        origin = _ORIGINS.get(getattr(reported, "name", ""), Origin.DEFAULT)
        if origin is Origin.ENVIRONMENT:
            out[option.name] = OptionValue(ctx.params[option.name], origin, option.envvar)
        elif origin is Origin.DEFAULT and option.name in from_file:
            where = f"{config_file}: {option.name}"
            value = _parse_toml(ctx, params[option.name], option, from_file[option.name], where)
            out[option.name] = OptionValue(value, Origin.FILE, str(config_file))
        else:
            out[option.name] = OptionValue(ctx.params[option.name], origin)
    return out


def _read_toml(config_file: Path | None) -> dict[str, Any]:
    if config_file is None:
        return {}
    try:
        with config_file.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise OptionError(f"cannot read {config_file}: {exc}") from None


def _parse_toml(ctx: typer.Context, param: Any, option: Option, raw: Any, where: str) -> Any:
    """A TOML value parsed as `option`'s kind by its flag's `param`; values that
    parser would coerce (true -> 1, 2.5 -> 2) are refused."""
    if option.kind in (int, float) and isinstance(raw, bool):
        raise OptionError(f"{where}: {raw!r} is a boolean, not a number")
    if option.kind is int and isinstance(raw, float):
        raise OptionError(f"{where}: {raw!r} is not an integer")
    try:
        return param.process_value(ctx, raw)
    except typer.BadParameter as exc:
        raise OptionError(f"{where}: {exc.message}") from None


config_app = typer.Typer(help="The broker's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command(
    "show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def config_show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The configuration `zbroker start` would run with, and where each value comes
    from. Takes the same options as `start` (--config, flags; the environment too)."""
    start_command = typer.main.get_command(app).commands["start"]  # type: ignore[attr-defined]
    try:
        with start_command.make_context("start", list(ctx.args)) as start_ctx:
            values, _ = configure(start_ctx, start_ctx.params.get("config_file"))
    except typer.TyperException as exc:  # a flag or variable that does not parse
        typer.echo(f"zbroker: {exc.format_message()}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        rows = {n: {"value": _shown(v.value), "source": v.source} for n, v in values.items()}
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(map(len, values))
    for name, given in values.items():
        typer.echo(f"{name:<{width}}  {_shown(given.value):<28} {given.source}")


def _clock(timestamp: float) -> str:
    """An event's time as HH:MM:SS.mmm, or its raw number when no clock can show it."""
    try:
        return datetime.datetime.fromtimestamp(timestamp).strftime("%H:%M:%S.%f")[:-3]
    except (OverflowError, ValueError, OSError):
        return f"{timestamp:.3f}"


def _endpoints(value: str) -> str:
    """An endpoint option checked as every client checks it: one, or several as a,b."""
    try:
        return joined(parse_endpoints(value))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


_SEVERAL = " Several brokers (active/standby): a,b; the active one is followed."
_Endpoint = Annotated[
    str,
    typer.Option(
        envvar="ZBROKER_ENDPOINT",
        callback=_endpoints,
        help="The broker's ROUTER endpoint." + _SEVERAL,
    ),
]
_EventsOut = Annotated[
    str,
    typer.Option(
        envvar="ZBROKER_EVENTS_OUT", callback=_endpoints, help="The bus's XPUB endpoint." + _SEVERAL
    ),
]
_EventsIn = Annotated[
    str,
    typer.Option(
        envvar="ZBROKER_EVENTS_IN", callback=_endpoints, help="The bus's XSUB endpoint." + _SEVERAL
    ),
]


def _print_stream(stream: Any, as_json: bool) -> None:
    """Each chunk of `stream` as it comes: as is (text), or one JSON object per line."""
    out = sys.stdout.buffer
    for chunk in stream:
        if as_json:
            row = {"offset": stream.offset - 1, "attempt": stream.attempt, **data_document(chunk)}
            out.write(json.dumps(row, separators=(",", ":")).encode() + b"\n")
        else:
            out.write(chunk)
        out.flush()


def _follow_stream(endpoint: str, task_id: str, offset: int, as_json: bool) -> None:
    """`tail --task`: the task's chunks until it ends; its error, if it failed, exit 1."""
    try:
        with Client(endpoint, retries=1, credentials=_credentials) as client:
            _print_stream(client.read_stream(task_id, offset), as_json)
    except KeyboardInterrupt:
        return
    except ClientError as exc:
        typer.echo(f"zbroker: stream of {task_id}: {exc}", err=True)
        raise typer.Exit(1) from None
    if sys.stdout.isatty() and not as_json:
        sys.stdout.write("\n")


@app.command()
def tail(
    prefixes: Annotated[
        list[str] | None,
        typer.Argument(help="Topic prefixes to follow (task., worker.ready, fs.); none: all."),
    ] = None,
    events: _EventsOut = DEFAULT_EVENTS_OUT,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per event and line.")
    ] = False,
    count: Annotated[int, typer.Option(min=0, help="Stop after this many events (0: never).")] = 0,
    task: Annotated[
        str | None,
        typer.Option(help="Follow this task's stream instead: its chunks, until it ends."),
    ] = None,
    offset: Annotated[int, typer.Option(min=0, help="With --task: the first chunk.")] = 0,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
) -> None:
    """Print events from the bus as they come (the broker's lifecycle events included),
    or with --task one task's stream: each chunk as it comes, until the task ends."""
    if task is not None:
        if prefixes:
            raise typer.BadParameter("give topic prefixes or --task, not both")
        _follow_stream(endpoint, task, offset, as_json)
        return
    seen = 0
    try:
        with Subscriber(events, *(prefixes or []), credentials=_credentials) as sub:
            for event in sub:
                record = event_document(event)
                if as_json:
                    line = json.dumps(record, separators=(",", ":"))
                else:
                    payload = json.dumps(record["payload"], separators=(",", ":"))
                    line = (
                        f"{_clock(event.timestamp)}  {event.type:<28} {event.source:<12} {payload}"
                    )
                typer.echo(line)
                seen += 1
                if count and seen >= count:
                    return
    except KeyboardInterrupt:
        return
    except ClientError as exc:
        typer.echo(f"zbroker: {exc}", err=True)
        raise typer.Exit(1) from None


_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_Timeout = Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the broker's answer.")]


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":")) if value else "-"
    return str(value)


@app.command()
def queues(
    endpoint: _Endpoint = DEFAULT_ENDPOINT, as_json: _Json = False, timeout: _Timeout = 5.0
) -> None:
    """Every service's queue: tasks ready, delayed, in flight, dead; workers; oldest age."""
    rows = _client_call(endpoint, timeout, f"queues from {endpoint}", lambda c: c.queues())
    if as_json:
        typer.echo(json.dumps(queues_document(rows), indent=2))
    elif not rows:
        typer.echo("no services")
    else:
        columns = ["service", *QUEUE_COUNTS, "requests"]
        columns += ["workers", "credit_in_use", "credit", "oldest_age_s", "done_rate", "wait_s_p95"]
        _table(rows, columns)


@app.command()
def group(
    journal: Annotated[
        str,
        typer.Option(
            envvar="ZBROKER_JOURNAL",
            help="The group's journal: postgresql://USER@HOST:PORT/DB (as given to start).",
        ),
    ],
    as_json: _Json = False,
) -> None:
    """Who is active in the group of brokers on JOURNAL, and its queues by state, read
    from the database itself (it answers while every broker is down, or standby)."""
    if importlib.util.find_spec("psycopg") is None:
        typer.echo("zbroker: group needs psycopg: pip install 'zbroker[postgres]'", err=True)
        raise typer.Exit(2)
    from zbroker.runtime.lease import group_state

    try:
        state = group_state(journal)
    except JournalError as exc:
        typer.echo(f"zbroker: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    lease = state["lease"]
    if lease is None:
        typer.echo("no broker has held this group's lease yet")
    else:
        held = f"{lease['holder']} serving {lease['endpoint']}, lease epoch {lease['epoch']}"
        if lease["expired"] or not lease["session_alive"]:
            why = "its lease expired" if lease["expired"] else "its database session is gone"
            typer.echo(f"none active ({why}): last held by {held}")
        else:
            typer.echo(f"active: {held}, renewed, expires in {lease['expires_in_s']:.1f}s")
    meta = state["meta"]
    if meta:
        typer.echo(
            f"journal: schema {meta.get('schema')}, life {meta.get('life')},"
            f" {meta.get('crashes', 0)} ended without a clean stop"
        )
    rows = [{"service": name, **counts} for name, counts in state["queues"].items()]
    if rows:
        states = sorted({k for counts in state["queues"].values() for k in counts})
        _table(rows, ["service", *states])


@app.command()
def workers(
    endpoint: _Endpoint = DEFAULT_ENDPOINT, as_json: _Json = False, timeout: _Timeout = 5.0
) -> None:
    """Every registered worker: service, protocol, credit, tasks held, metrics."""
    rows = _client_call(endpoint, timeout, f"workers from {endpoint}", lambda c: c.workers())
    if as_json:
        typer.echo(json.dumps(workers_document(rows), indent=2))
    elif not rows:
        typer.echo("no workers")
    else:
        for row in rows:
            row["held"] = len(row["tasks"])
        columns = ["worker", "service", "dialect", "credit", "held", "tags", "last_seen_s"]
        _table(rows, [*columns, "metrics"])


def _client_call(endpoint: str, timeout_s: float, what: str, call: Any) -> Any:
    """Run `call(client)`; a client error ends the command with its message, exit 1;
    options the client refuses before sending anything, exit 2."""
    try:
        with Client(endpoint, timeout_s=timeout_s, retries=1, credentials=_credentials) as client:
            return call(client)
    except ClientError as exc:
        typer.echo(f"zbroker: {what}: {exc}", err=True)
        raise typer.Exit(1) from None
    except (ValueError, TypeError) as exc:
        typer.echo(f"zbroker: {what}: {exc}", err=True)
        raise typer.Exit(2) from None


def _payload(data: str | None, file: Path | None) -> bytes:
    if (data is None) == (file is None):
        raise typer.BadParameter("give exactly one of --data and --file")
    if file is not None:
        try:
            return file.read_bytes()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {file}: {exc}") from None
    assert data is not None
    return data.encode()


_Data = Annotated[str | None, typer.Option(help="The payload, as UTF-8 text.")]
_File = Annotated[Path | None, typer.Option(help="Read the payload from this file.")]
_Priority = Annotated[int, typer.Option(min=-128, max=127, help="Higher runs first.")]
_Key = Annotated[str | None, typer.Option(help="Idempotency key.")]


# Task fields shown by `zbroker task` only when set.
_FLAGS = frozenset({"run_anyway"})


@app.command()
def task(
    task_id: Annotated[str, typer.Argument(help="The task id (from enqueue).")],
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    as_json: _Json = False,
    timeout: _Timeout = 5.0,
) -> None:
    """One task's full record and history."""
    status = _client_call(endpoint, timeout, f"task {task_id}", lambda c: c.status(task_id))
    record = task_document(status)
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    history = record.pop("history")
    for name, value in record.items():
        if value not in (None, {}, "", [], ()) and not (name in _FLAGS and value is False):
            typer.echo(f"{name:<13} {_cell(value)}")
    typer.echo("history")
    for entry in history:
        when = datetime.datetime.fromtimestamp(entry[1]).strftime("%H:%M:%S.%f")[:-3]
        typer.echo(f"  {when}  {entry[0]:<10} {' '.join(map(str, entry[2:]))}".rstrip())


@app.command()
def top(
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option(help="Print one frame and exit.")] = False,
) -> None:
    """A live dashboard: queue depths over time, rates, wait and run times, workers."""
    from zbroker import top as dashboard

    try:
        dashboard.run(endpoint, interval, once, _credentials)
    except KeyboardInterrupt:
        return
    except ClientError as exc:
        typer.echo(f"zbroker: top: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def tasks(
    service: Annotated[str, typer.Option(help="The service whose tasks to list.")],
    state: Annotated[str, typer.Option(help=f"One of {', '.join(LISTABLE_STATES)}.")] = "ready",
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 50,
    older_than: Annotated[
        float, typer.Option(min=0.0, help="Only tasks enqueued at least this many seconds ago.")
    ] = 0.0,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    as_json: _Json = False,
    timeout: _Timeout = 5.0,
) -> None:
    """List a service's tasks in one state (ready ones in delivery order)."""
    rows: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None and len(rows) < limit:
        size = min(1000, limit - len(rows))
        page, after = _client_call(
            endpoint,
            timeout,
            f"tasks of {service}",
            lambda c, a=after, n=size: c.tasks(
                service, state, limit=n, after=a, older_than_s=older_than
            ),
        )
        rows += page
    if as_json:
        typer.echo(json.dumps(tasks_document(rows), indent=2))
    elif not rows:
        typer.echo(f"no {state} tasks in {service}")
    else:
        now = time.time()
        for row in rows:
            row["age_s"] = now - row["created_at"]
        _table(rows, ["id", "state", "priority", "attempt", "age_s", "error"])


@app.command()
def enqueue(
    service: Annotated[str, typer.Argument(help="The service (queue) to enqueue to.")],
    data: _Data = None,
    file: _File = None,
    priority: _Priority = 0,
    delay: Annotated[float | None, typer.Option(min=0.0, help="Seconds before it may run.")] = None,
    ttl: Annotated[
        float | None, typer.Option(min=0.0, help="Expire unless started by then.")
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1, max=1000)] = None,
    task_timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Run-time limit of one attempt, seconds.")
    ] = None,
    key: _Key = None,
    depends_on: Annotated[
        list[str] | None,
        typer.Option(
            "--depends-on",
            help="A task it waits for: a task id, or SERVICE/KEY for the task holding "
            "that idempotency key. Repeat for several.",
        ),
    ] = None,
    run_anyway: Annotated[
        bool, typer.Option("--run-anyway", help="Run even when a dependency fails.")
    ] = False,
    input_: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="Append the dependencies' results to the payload: 'result' (one "
            "dependency) or 'results' (a msgpack list of all).",
        ),
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option("--require", help="A tag its worker must have. Repeat for several."),
    ] = None,
    prefer: Annotated[
        list[str] | None,
        typer.Option("--prefer", help="A tag that makes a worker a better fit. Repeatable."),
    ] = None,
    affinity: Annotated[
        str | None,
        typer.Option(help="Send it to the worker that last ran this key, while it lives."),
    ] = None,
    concurrency_key: Annotated[
        str | None,
        typer.Option(help="The key its service's per-key round robin and limit count it under."),
    ] = None,
    debounce: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="With --key: wait this long; enqueues of the key meanwhile replace its payload.",
        ),
    ] = None,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Enqueue one durable task; prints its id once the broker has stored it.

    With --key, a key that matches a stored task of the service stores nothing:
    the stored task's id is printed, and a note on stderr says so. With
    --depends-on, it waits (blocked) until those tasks have ended.
    """
    payload = _payload(data, file)
    refs = [_dependency(ref) for ref in depends_on or ()]
    task_id = _client_call(
        endpoint,
        timeout,
        f"enqueue to {service}",
        lambda c: c.enqueue(
            service,
            payload,
            priority=priority,
            delay_s=delay,
            ttl_s=ttl,
            max_attempts=max_attempts,
            timeout_s=task_timeout,
            key=key,
            depends_on=refs,
            run_anyway=run_anyway,
            input=input_,
            require=require or (),
            prefer=prefer or (),
            affinity=affinity,
            concurrency_key=concurrency_key,
            debounce_s=debounce,
        ),
    )
    typer.echo(task_id)
    if task_id.existing:
        typer.echo(f"key {key!r} matched task {task_id}: nothing new stored", err=True)


def _dependency(ref: str) -> str | tuple[str, str]:
    """A --depends-on value: a task id, or SERVICE/KEY (a key may hold more slashes)."""
    service, slash, key = ref.partition("/")
    return (service, key) if slash and service and key else ref


def _request_stream(
    endpoint: str,
    timeout: float,
    service: str,
    payload: bytes,
    wait: float,
    priority: int,
    as_json: bool,
) -> None:
    """`request --stream`: the chunks as they come; Ctrl-C abandons (cancels) the task."""
    try:
        with (
            Client(endpoint, timeout_s=timeout, retries=1, credentials=_credentials) as client,
            client.stream(service, payload, timeout_s=wait, priority=priority) as chunks,
        ):
            _print_stream(chunks, as_json)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except ClientError as exc:
        typer.echo(f"zbroker: request to {service}: {exc}", err=True)
        raise typer.Exit(1) from None
    if sys.stdout.isatty() and not as_json:
        sys.stdout.write("\n")


@app.command()
def request(
    service: Annotated[str, typer.Argument(help="The service to ask.")],
    data: _Data = None,
    file: _File = None,
    priority: _Priority = 0,
    wait: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the result.")] = 60.0,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Print the task's stream as it comes instead of its result;"
            " Ctrl-C cancels the task.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --stream: one JSON object per chunk.")
    ] = False,
) -> None:
    """Enqueue a task and wait for its result, written to standard output as is (with
    --stream: its chunks as they come)."""
    payload = _payload(data, file)
    if stream:
        _request_stream(endpoint, timeout, service, payload, wait, priority, as_json)
        return
    result = _client_call(
        endpoint,
        timeout,
        f"request to {service}",
        lambda c: c.request(service, payload, timeout_s=wait, priority=priority),
    )
    sys.stdout.buffer.write(result)
    if sys.stdout.isatty():
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()


@app.command()
def status(
    endpoint: _Endpoint = DEFAULT_ENDPOINT, as_json: _Json = False, timeout: _Timeout = 5.0
) -> None:
    """The broker at a glance: uptime, services, workers, counters, journal."""
    view = _client_call(endpoint, timeout, "status", lambda c: c.broker_stats())
    view.pop("rid", None)
    if as_json:
        typer.echo(json.dumps(stats_document(view), indent=2))
        return
    typer.echo(f"broker at {endpoint}, up {view['uptime_s']:.0f}s")
    build = view.get("build") or {}
    if build:
        typer.echo(f"zbroker {build.get('version')}, core: {build.get('core')}")
    typer.echo(
        f"services {view['services']}  workers {view['workers']}  "
        f"waiting calls {view['waiting_calls']}"
    )
    journal = view.get("journal")
    if journal and journal.get("store") == "postgresql":
        typer.echo(
            f"journal in PostgreSQL, {journal['durability']}, {journal['commits']} commits, "
            f"{journal['bytes_used'] / 1048576:.1f} MiB held in memory"
        )
    elif journal:
        typer.echo(
            f"journal {journal['durability']}, {journal['commits']} commits, "
            f"{journal['bytes_used'] / 1048576:.1f} MiB used of a "
            f"{journal['map_size'] / 1048576:.0f} MiB map"
        )
    group = view.get("group")
    if group:
        typer.echo(
            f"group: {group['role']} ({group['holder']}), lease epoch {group['epoch']}"
            f" renewed every {group['lease_s'] / 3:g}s, journal {group['journal']}"
        )
    for name, value in view["stats"].items():
        if value:
            typer.echo(f"  {name:<24} {value}")
    for reason, n in view["malformed"].items():
        typer.echo(f"  malformed {reason:<14} {n}")


@app.command()
def drain(
    worker: Annotated[str, typer.Argument(help="The worker id, as `zbroker workers` shows it.")],
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Give a worker no new tasks; the ones it holds finish."""
    held = _client_call(endpoint, timeout, f"drain {worker}", lambda c: c.drain(worker))
    typer.echo(f"worker {worker} draining, {held} task(s) to finish")


@app.command()
def purge(
    service: Annotated[str, typer.Argument(help="The service whose waiting tasks to cancel.")],
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Cancel every waiting (ready or delayed) task of a service; running ones finish."""
    purged = _client_call(endpoint, timeout, f"purge {service}", lambda c: c.purge(service))
    typer.echo(f"{purged} task(s) of {service} purged")


@app.command()
def limit(
    service: Annotated[str, typer.Argument(help="The service to limit.")],
    tasks: Annotated[int, typer.Argument(min=0, help="At most this many at once; 0: no limit.")],
    per_key: Annotated[
        bool,
        typer.Option("--per-key", help="A cap for each concurrency key, not the service."),
    ] = False,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Cap how many of a service's tasks run at once across all its workers (e.g. tts 2),
    or, with --per-key, how many of each concurrency key (e.g. one per user)."""
    cap = tasks or None
    _client_call(
        endpoint, timeout, f"limit {service}", lambda c: c.limit(service, cap, per_key=per_key)
    )
    each = " of each key" if per_key else ""
    typer.echo(f"{service}: at most {tasks}{each} at once" if cap else f"{service}: no limit{each}")


@app.command()
def rate(
    service: Annotated[str, typer.Argument(help="The service to rate-limit.")],
    per_s: Annotated[
        float, typer.Argument(min=0.0, help="Tasks handed out per second; 0: no rate.")
    ],
    burst: Annotated[
        int | None,
        typer.Option(min=1, help="Tasks handed out at once at most (default: the rate)."),
    ] = None,
    per_key: Annotated[
        bool,
        typer.Option("--per-key", help="A rate for each concurrency key, not the service."),
    ] = False,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Hand out at most so many of a service's tasks per second (a token bucket), or,
    with --per-key, of each concurrency key (e.g. 1 per second per user)."""
    rate_s = per_s or None
    _client_call(
        endpoint,
        timeout,
        f"rate {service}",
        lambda c: c.rate(service, rate_s, burst=burst, per_key=per_key),
    )
    each = " for each key" if per_key else ""
    typer.echo(f"{service}: at most {per_s:g}/s{each}" if rate_s else f"{service}: no rate{each}")


@app.command()
def pause(
    service: Annotated[str, typer.Argument(help="The service to pause.")],
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Stop deliveries of a service until `zbroker resume` (enqueues still work)."""
    _client_call(endpoint, timeout, f"pause {service}", lambda c: c.pause(service))
    typer.echo(f"{service} paused")


@app.command()
def resume(
    service: Annotated[str, typer.Argument(help="The service to resume.")],
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Deliver a paused service's work again."""
    _client_call(endpoint, timeout, f"resume {service}", lambda c: c.resume(service))
    typer.echo(f"{service} resumed")


dlq_app = typer.Typer(help="Dead-letter queues: list, redrive, drop.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    service: Annotated[str, typer.Argument(help="The service whose dead letters to list.")],
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 100,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    as_json: _Json = False,
    timeout: _Timeout = 5.0,
) -> None:
    """A service's dead letters, oldest first, with why each died."""
    letters = _client_call(
        endpoint, timeout, f"dlq list {service}", lambda c: c.dead_letters(service, limit=limit)
    )
    rows = dead_letters_document(letters)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo(f"no dead letters in {service}")
    else:
        _table(rows, ["id", "attempt", "error"])


@dlq_app.command("drop")
def dlq_drop(
    service: Annotated[str, typer.Argument(help="The service whose dead letters to delete.")],
    ids: Annotated[list[str] | None, typer.Argument(help="Only these task ids.")] = None,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Delete dead letters for good (all of the service's, or those listed)."""
    dropped = _client_call(
        endpoint, timeout, f"dlq drop {service}", lambda c: c.drop_dead_letters(service, ids)
    )
    typer.echo(f"{dropped} dead letter(s) dropped")


@dlq_app.command("redrive")
def dlq_redrive(
    service: Annotated[str, typer.Argument(help="The service whose dead letters to redrive.")],
    ids: Annotated[list[str] | None, typer.Argument(help="Only these task ids.")] = None,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Put dead letters back in their queue (attempts reset); prints their ids."""
    moved = _client_call(
        endpoint, timeout, f"dlq redrive {service}", lambda c: c.redrive(service, ids or None)
    )
    for task_id in moved:
        typer.echo(task_id)
    typer.echo(f"{len(moved)} task(s) redriven", err=True)


schedule_app = typer.Typer(
    help="Recurring tasks: a task enqueued every interval or at cron times.",
    no_args_is_help=True,
)
app.add_typer(schedule_app, name="schedule")


def _when(timestamp: float | None) -> str:
    """A time as local YYYY-MM-DD HH:MM:SS, "-" for none."""
    if timestamp is None:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, ValueError, OSError):
        return f"{timestamp:.0f}"


@schedule_app.command("add")
def schedule_add(
    name: Annotated[str, typer.Argument(help="The schedule's name (adding it again replaces it).")],
    service: Annotated[str, typer.Argument(help="The service each firing's task goes to.")],
    every: Annotated[
        str | None, typer.Option(help="Fire every interval: 30s, 5m, 1h30m, 2d.")
    ] = None,
    cron: Annotated[
        str | None,
        typer.Option(help='Fire at the times of a cron expression: "*/5 * * * *".'),
    ] = None,
    tz: Annotated[
        str | None, typer.Option(help="With --cron: its time zone (Europe/Paris); default UTC.")
    ] = None,
    data: _Data = None,
    data_file: Annotated[Path | None, typer.Option(help="Read the payload from this file.")] = None,
    priority: _Priority = 0,
    ttl: Annotated[
        float | None, typer.Option(min=0.0, help="Each firing expires unless started by then.")
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(min=1, max=1000)] = None,
    task_timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Run-time limit of one attempt, seconds.")
    ] = None,
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Enqueue a task to SERVICE every --every interval or at --cron times, for good
    (kept in the broker's journal) until `zbroker schedule remove NAME`."""
    if (every is None) == (cron is None):
        typer.echo("zbroker: schedule add: give exactly one of --every and --cron", err=True)
        raise typer.Exit(2)
    every_s = None
    if every is not None:
        try:
            every_s = parse_duration(every)
        except ValueError as exc:
            typer.echo(f"zbroker: schedule add: --every: {exc}", err=True)
            raise typer.Exit(2) from None
    if data is not None and data_file is not None:
        typer.echo("zbroker: schedule add: give --data or --data-file, not both", err=True)
        raise typer.Exit(2)
    payload = b"" if data is None and data_file is None else _payload(data, data_file)

    def add(client: Client) -> Any:
        return client.schedule(
            name,
            service,
            payload,
            every_s=every_s,
            cron=cron,
            tz=tz,
            priority=priority,
            ttl_s=ttl,
            max_attempts=max_attempts,
            timeout_s=task_timeout,
        )

    try:
        info = _client_call(endpoint, timeout, f"schedule add {name}", add)
    except ValueError as exc:
        typer.echo(f"zbroker: schedule add {name}: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{info.name}: {info.rule} to {info.service}, next at {_when(info.next_at)}")


@schedule_app.command("list")
def schedule_list(
    endpoint: _Endpoint = DEFAULT_ENDPOINT, as_json: _Json = False, timeout: _Timeout = 5.0
) -> None:
    """Every schedule: its rule, its next and last firing, how many times it fired."""
    found = _client_call(endpoint, timeout, "schedule list", lambda c: c.schedules())
    if as_json:
        typer.echo(json.dumps([jsonable(dataclasses.asdict(i)) for i in found], indent=2))
        return
    if not found:
        typer.echo("no schedules")
        return
    rows = [
        {
            "name": info.name,
            "service": info.service,
            "rule": info.rule,
            "next": _when(info.next_at),
            "last": _when(info.last_at),
            "fired": info.fired,
            "last_task": info.last_id,
            "error": info.error,
        }
        for info in found
    ]
    _table(rows, ["name", "service", "rule", "next", "last", "fired", "last_task", "error"])


@schedule_app.command("remove")
def schedule_remove(
    name: Annotated[str, typer.Argument(help="The schedule to remove.")],
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    timeout: _Timeout = 5.0,
) -> None:
    """Remove a schedule; the tasks it already enqueued stay."""
    what = f"schedule remove {name}"
    removed = _client_call(endpoint, timeout, what, lambda c: c.unschedule(name))
    if not removed:
        typer.echo(f"zbroker: schedule remove: no schedule {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"schedule {name} removed")


def _listen_address(value: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) for --listen and --web."""
    host, colon, port = value.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"{value!r} is not HOST:PORT")
    return host, int(port)


@app.command()
def web(
    listen: Annotated[
        str, typer.Option(envvar="ZBROKER_WEB_LISTEN", help="HOST:PORT to serve HTTP on.")
    ] = "127.0.0.1:8080",
    endpoint: _Endpoint = DEFAULT_ENDPOINT,
    events_in: _EventsIn = DEFAULT_EVENTS_IN,
    events_out: _EventsOut = DEFAULT_EVENTS_OUT,
    tokens: Annotated[
        Path | None,
        typer.Option(
            envvar="ZBROKER_WEB_TOKENS",
            dir_okay=False,
            help="A TOML file of bearer tokens and their principals (docs/web.md); without"
            " it every caller is an administrator and only loopback is served.",
        ),
    ] = None,
    max_body_mib: Annotated[
        float, typer.Option(min=0.001, max=1024, help="Largest request body, MiB.")
    ] = 16.0,
    timeout: _Timeout = 5.0,
    parent: Annotated[
        int | None, typer.Option(hidden=True, help="Stop when this process (a broker) ends.")
    ] = None,
) -> None:
    """Serve the broker over HTTP, Server-Sent Events and WebSocket (docs/web.md): a
    separate process, an ordinary client of the broker with this command's keys."""
    host, port = _listen_address(listen)
    try:
        from zbroker.web import server
        from zbroker.web.tokens import TokenFileError, load_tokens
    except ModuleNotFoundError as exc:
        typer.echo(
            f"zbroker: web needs {exc.name}: pip install 'zbroker[web]' (or aiohttp)", err=True
        )
        raise typer.Exit(2) from None
    try:
        known = load_tokens(tokens) if tokens is not None else None
    except TokenFileError as exc:
        typer.echo(f"zbroker: {exc}", err=True)
        raise typer.Exit(2) from None
    settings = server.WebSettings(
        host=host,
        port=port,
        endpoint=endpoint,
        events_in=events_in,
        events_out=events_out,
        credentials=_credentials,
        tokens=known,
        max_body_bytes=int(max_body_mib * 1024 * 1024),
        call_timeout_s=timeout,
        parent_pid=parent,
    )
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        server.run(settings)
    except server.ListenRefused as exc:
        typer.echo(f"zbroker: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"zbroker: web: cannot listen on {listen}: {exc}", err=True)
        raise typer.Exit(1) from None


keys_app = typer.Typer(help="CURVE keys for --auth (docs/security.md).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Argument(help="Whose key: the broker, or a principal's name.")],
    directory: Annotated[
        Path, typer.Option("--dir", file_okay=False, help="Where to write the two files.")
    ] = Path("keys"),
) -> None:
    """Write DIR/NAME.key (the public key, to share) and DIR/NAME.key_secret (to keep)."""
    import zmq.auth

    if not name or "/" in name or name.startswith("."):
        typer.echo(f"zbroker: {name!r} cannot name a key file", err=True)
        raise typer.Exit(2)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            typer.echo(f"zbroker: {path} exists; not overwritten (move it away first)", err=True)
            raise typer.Exit(1)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        zmq.auth.create_certificates(directory, name)
        secret.chmod(0o600)
    except OSError as exc:
        typer.echo(f"zbroker: cannot write keys in {directory}: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{public}  (public: give it to the broker's auth file, or to peers)")
    typer.echo(f"{secret}  (secret: keep it on this machine only)")


def main() -> None:
    app()
