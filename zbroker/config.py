"""One typed configuration for a broker process, and the one table of its options.

`BrokerConfig` (with its `CoreSettings`) is what a broker runs with. `OPTIONS` lists
every option of `zbroker start`; its flags, `ZBROKER_*` variables, TOML keys,
`zbroker config show` and the start-up log all come from it (zbroker.cli), and
`build_config` makes the settings records from it. Bounds are not kept here: each
record checks its own when it is made (`CoreSettings`, `BrokerConfig.__post_init__`).
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zbroker.core.settings import CoreSettings, SettingError, at_least, shown
from zbroker.journal.base import Durability
from zbroker.protocol import DEFAULT_ENDPOINT, DEFAULT_EVENTS_IN, DEFAULT_EVENTS_OUT
from zbroker.protocol.access import is_local_endpoint, is_local_host

# What a --journal URL starts with (libpq's two schemes), and the lease's bounds.
JOURNAL_URL_SCHEMES = ("postgresql://", "postgres://")
LEASE_MIN_S, LEASE_MAX_S = 0.5, 300.0
DEFAULT_LEASE_S = 3.0
# LMDB's map may grow to this (address space: the file grows only as pages are used).
# A journal in PostgreSQL left at it holds at most a quarter of the machine's memory.
DEFAULT_JOURNAL_MAX_BYTES = 1 << 40


class LogLevel(enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Where the broker listens and how it behaves. The state machine's own
    tunables (heartbeats, expiry, limits) live in `core`, with their defaults."""

    bind: str = DEFAULT_ENDPOINT
    events_in: str = DEFAULT_EVENTS_IN
    events_out: str = DEFAULT_EVENTS_OUT
    core: CoreSettings = field(default_factory=CoreSettings)
    # Explicit high-water marks (messages): the ROUTER's per-peer pipes and the event bus.
    router_hwm: int = 100_000
    events_hwm: int = 100_000
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = LogFormat.TEXT
    # Where durable tasks live, and what a confirmed enqueue survives.
    durability: Durability = Durability.SYNC
    data_dir: Path = Path("zbroker-data")
    # The journal's map grows (doubling) up to this size; past it the broker stops
    # with a clear error rather than confirm what it cannot store.
    journal_max_bytes: int = DEFAULT_JOURNAL_MAX_BYTES
    # The journal in PostgreSQL (postgresql://USER@HOST:PORT/DB) instead of LMDB in
    # data_dir; brokers given the same one form an active/standby group (docs/operations.md),
    # in which the active one holds a lease renewed within `lease_s`.
    journal: str | None = None
    lease_s: float = DEFAULT_LEASE_S
    # Prometheus metrics and /health over HTTP on this port (None: off).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # A file holding the bearer token /metrics asks for (None: no token asked).
    metrics_token_file: Path | None = None
    # The principals, their keys and roles (zbroker.runtime.auth reads it); None: no
    # authentication, and then only endpoints of this machine are served...
    auth_file: Path | None = None
    # ...unless this says to serve endpoints reachable from other machines without it.
    insecure: bool = False
    # `zbroker start --web`: HOST:PORT of a `zbroker web` the command line runs beside
    # the broker (a child process stopped with it; None: none), and its token file.
    web: str | None = None
    web_tokens: Path | None = None
    # On SIGTERM/SIGINT: how long deliveries stay stopped while the results of the
    # attempts in flight come in, before the broker stops (0: stop at once).
    drain_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        at_least("router_hwm", self.router_hwm, 0)  # 0: no limit (libzmq's meaning)
        at_least("events_hwm", self.events_hwm, 0)
        if not self.journal_max_bytes >= 1 << 20:
            # Said in MiB: the option that sets it (journal_max_mib) counts in MiB.
            raise SettingError(
                "{journal_max_bytes} must be at least 1 MiB",
                journal_max_bytes=self.journal_max_bytes,
            )
        if self.journal is not None:
            if not self.journal.startswith(JOURNAL_URL_SCHEMES):
                raise SettingError(
                    "{journal} must be a PostgreSQL URL: postgresql://USER@HOST:PORT/DB",
                    journal=self.journal,
                )
            if self.durability is Durability.MEMORY:
                raise SettingError(
                    "{durability} memory keeps nothing: a --journal in PostgreSQL needs"
                    " sync or async",
                    durability=self.durability.value,
                )
        if not LEASE_MIN_S <= self.lease_s <= LEASE_MAX_S:  # also refuses NaN
            raise SettingError(
                f"{{lease_s}} must be between {LEASE_MIN_S:g} and {LEASE_MAX_S:g} seconds",
                lease_s=self.lease_s,
            )
        if not 0 <= self.drain_timeout_s <= 86400:  # also refuses NaN
            raise SettingError(
                "{drain_timeout_s} must be between 0 and 86400 seconds",
                drain_timeout_s=self.drain_timeout_s,
            )
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SettingError(
                "{metrics_port} must be a port number, 0 to 65535", metrics_port=self.metrics_port
            )
        if self.auth_file is None and not self.insecure:
            for name in ("bind", "events_in", "events_out"):
                endpoint = getattr(self, name)
                if not is_local_endpoint(endpoint):
                    raise SettingError(
                        f"{{{name}}} is reachable from other machines: give --auth FILE"
                        " (docs/security.md), or --insecure to serve it without authentication",
                        **{name: endpoint},
                    )
        if (
            self.metrics_port is not None
            and self.metrics_token_file is None
            and not self.insecure
            and not is_local_host(self.metrics_host)
        ):
            raise SettingError(
                "{metrics_host} is reachable from other machines: give --metrics-token-file,"
                " or --insecure to serve metrics without a token",
                metrics_host=self.metrics_host,
            )

    def unprotected(self) -> list[str]:
        """What other machines can reach without authentication (--insecure let it):
        endpoints when there is no --auth, /metrics when it asks for no token."""
        out = []
        if self.auth_file is None:
            endpoints = (self.bind, self.events_in, self.events_out)
            out += [e for e in endpoints if not is_local_endpoint(e)]
        if (
            self.metrics_port is not None
            and self.metrics_token_file is None
            and not is_local_host(self.metrics_host)
        ):
            out.append(f"http://{self.metrics_host}:{self.metrics_port}/metrics")
        return out


@dataclass(frozen=True, slots=True)
class Option:
    """One option of `zbroker start`: the flag `--name-with-dashes`, the variable
    `ZBROKER_NAME` and the TOML key `name`, all set to a value of `kind`, which
    feeds one or more fields of `BrokerConfig` (`core.<field>`: of its CoreSettings).
    Its default is that of the (first) field it feeds."""

    name: str
    # What a flag, variable or TOML value is parsed as: int, float, str, Path or an Enum.
    kind: type[Any]
    help: str
    feeds: tuple[str, ...]
    # The unit of the option's value, as its help names it ("" for counts and names).
    unit: str = ""
    # A field holds the option's value times this (an option in MiB feeding bytes).
    scale: int = 1
    # May be left unset (None): what it enables stays off.
    optional: bool = False
    # A Path that names a directory.
    directory: bool = False
    # When defaulted and below this other option's value, raised to it (say so, not
    # refuse: the user never chose it); when given, the settings' check refuses it.
    default_at_least: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return "ZBROKER_" + self.name.upper()

    @property
    def default(self) -> Any:
        value = _field(_DEFAULTS, self.feeds[0])
        return value if value is None or self.scale == 1 else value // self.scale

    def field_value(self, value: Any) -> Any:
        """What the fields it feeds are set to for `value`."""
        return value if value is None or self.scale == 1 else value * self.scale


_DEFAULTS = BrokerConfig()


def _field(config: BrokerConfig, path: str) -> Any:
    return operator.attrgetter(path)(config)


OPTIONS: tuple[Option, ...] = (
    Option("bind", str, "ROUTER endpoint for MDP clients and workers.", ("bind",)),
    Option("events_in", str, "XSUB endpoint publishers connect to.", ("events_in",)),
    Option("events_out", str, "XPUB endpoint subscribers connect to.", ("events_out",)),
    Option(
        "heartbeat_interval",
        float,
        "Seconds between heartbeats to workers.",
        ("core.heartbeat_interval_s",),
        unit="s",
    ),
    Option(
        "heartbeat_liveness",
        int,
        "Missed heartbeat intervals after which a worker (idle or busy) is dead.",
        ("core.heartbeat_liveness",),
    ),
    Option(
        "request_expiry",
        float,
        "Seconds a request may wait in a queue before it is dropped (and counted).",
        ("core.request_expiry_s",),
        unit="s",
    ),
    Option(
        "max_queued",
        int,
        "Per-service cap on queued requests; beyond it requests are refused.",
        ("core.max_queued_per_service",),
    ),
    Option(
        "max_queued_mib",
        int,
        "Cap on the bytes of MDP requests queued in memory, all services together, "
        "in MiB; beyond it requests are refused.",
        ("core.max_queued_bytes",),
        unit="MiB",
        scale=1 << 20,
    ),
    Option(
        "max_message_bytes",
        int,
        "Largest accepted message, in bytes.",
        ("core.max_message_bytes",),
        unit="bytes",
    ),
    Option(
        "ack_timeout",
        float,
        "Seconds a ZBW01 worker has to acknowledge a task before it is taken back.",
        ("core.ack_timeout_s",),
        unit="s",
    ),
    Option(
        "durability",
        Durability,
        "What a confirmed enqueue survives: sync (fsync per commit: a power cut), "
        "async (a crash of the broker), memory (nothing; tests and benchmarks only).",
        ("durability",),
    ),
    Option(
        "data_dir",
        Path,
        "Directory of the task journal (created if missing).",
        ("data_dir",),
        directory=True,
    ),
    Option(
        "journal_max_mib",
        int,
        "Largest size the journal may grow to, in MiB; past it the broker stops "
        "with an error instead of confirming what it cannot store. With --journal:"
        " the most its copy in memory may hold (default: a quarter of the machine's memory).",
        ("journal_max_bytes",),
        unit="MiB",
        scale=1 << 20,
    ),
    Option(
        "journal",
        str,
        "Keep the journal in PostgreSQL (postgresql://USER@HOST:PORT/DB; needs"
        " zbroker[postgres]) instead of LMDB in --data-dir. Brokers given the same one"
        " are a group: one active, the others standbys that take over (docs/operations.md).",
        ("journal",),
        optional=True,
    ),
    Option(
        "lease",
        float,
        "With --journal: the active broker's lease term, in seconds; a standby takes"
        " over once it lapses (at once when the active one's database session ends).",
        ("lease_s",),
        unit="s",
    ),
    Option(
        "max_attempts",
        int,
        "Attempts of a durable task unless its enqueue says otherwise "
        "(also of an MDP request failed by ZBW01 workers).",
        ("core.default_max_attempts", "core.request_max_attempts"),
    ),
    Option(
        "retry_base",
        float,
        "Backoff before the 2nd attempt, in seconds; doubles per attempt, with jitter.",
        ("core.retry_base_s",),
        unit="s",
    ),
    Option(
        "retry_max",
        float,
        "Longest retry backoff, seconds.",
        ("core.retry_max_s",),
        unit="s",
        default_at_least="retry_base",
    ),
    Option(
        "retention",
        float,
        "Seconds finished tasks (results, idempotency keys) are kept.",
        ("core.retention_s",),
        unit="s",
    ),
    Option(
        "max_tasks",
        int,
        "Per-service cap on waiting durable tasks; beyond it enqueues are refused.",
        ("core.max_tasks_per_service",),
    ),
    Option(
        "max_departed_services",
        int,
        "Services gone idle whose totals, rates and times are kept for when they "
        "return; beyond it the longest gone are forgotten.",
        ("core.max_departed_services",),
    ),
    Option("log_level", LogLevel, "debug, info, warning or error.", ("log_level",)),
    Option(
        "metrics_port",
        int,
        "Serve Prometheus /metrics and /health on this port (see --metrics-host).",
        ("metrics_port",),
        optional=True,
    ),
    Option(
        "drain_timeout",
        float,
        "On SIGTERM, seconds to wait for the results in flight (no new deliveries)"
        " before stopping; 0 stops at once. A second signal stops at once.",
        ("drain_timeout_s",),
        unit="s",
    ),
    Option(
        "log_format",
        LogFormat,
        "text, or json: one JSON object per line (time, level, logger, message).",
        ("log_format",),
    ),
    Option(
        "metrics_host",
        str,
        "The address /metrics listens on; other than loopback it needs"
        " --metrics-token-file (or --insecure).",
        ("metrics_host",),
    ),
    Option(
        "metrics_token_file",
        Path,
        "A file holding a bearer token that /metrics (not /health) then asks for.",
        ("metrics_token_file",),
        optional=True,
    ),
    Option(
        "auth",
        Path,
        "A TOML file of principals, keys and roles: CURVE authentication on every"
        " endpoint (docs/security.md).",
        ("auth_file",),
        optional=True,
    ),
    Option(
        "max_waiters_per_principal",
        int,
        "With --auth: calls one principal may have waiting for results, over all its connections.",
        ("core.max_waiters_per_principal",),
    ),
    Option(
        "max_tasks_per_principal",
        int,
        "With --auth: tasks one principal may have enqueued and not yet finished"
        " (waiting or running); beyond it its enqueues are refused (queue_full).",
        ("core.max_tasks_per_principal",),
    ),
    Option(
        "max_services_per_principal",
        int,
        "With --auth: services one principal's messages may make exist at once (admins: no cap).",
        ("core.max_services_per_principal",),
    ),
    Option(
        "max_stream_chunks",
        int,
        "Chunks one task's stream may hold, over all its attempts; a worker going"
        " past it ends the task in the dead letters.",
        ("core.max_stream_chunks",),
    ),
    Option(
        "max_stream_mib",
        int,
        "MiB one task's stream may hold, over all its attempts (as --max-stream-chunks).",
        ("core.max_stream_bytes",),
        unit="MiB",
        scale=1 << 20,
    ),
    Option(
        "insecure",
        bool,
        "Serve endpoints reachable from other machines without --auth (warned at every start).",
        ("insecure",),
    ),
    Option(
        "web",
        str,
        "Also run `zbroker web` (docs/web.md) on HOST:PORT beside the broker: a child"
        " process stopped with it, connecting with the root --server-key/--key.",
        ("web",),
        optional=True,
    ),
    Option(
        "web_tokens",
        Path,
        "With --web: its file of bearer tokens and their principals (docs/web.md).",
        ("web_tokens",),
        optional=True,
    ),
)

OPTION_NAMES = frozenset(option.name for option in OPTIONS)
# The option that sets each field, by the field's own name (as a SettingError names it).
_FEEDING = {path.rpartition(".")[2]: option for option in OPTIONS for path in option.feeds}


class Origin(enum.Enum):
    """Where an option's value came from; the later ones win."""

    DEFAULT = "default"
    FILE = "file"
    ENVIRONMENT = "environment"
    FLAG = "flag"


@dataclass(frozen=True, slots=True)
class OptionValue:
    """One option's value and where it came from."""

    value: Any
    origin: Origin
    # The file's path, the variable's name, or why a default was changed.
    detail: str = ""

    @property
    def source(self) -> str:
        """As `config show` and the start-up log print it: `default`, `flag`,
        `file zbroker.toml`, `environment ZBROKER_BIND`, `default, raised to retry_base`."""
        if not self.detail:
            return self.origin.value
        joint = ", " if self.origin is Origin.DEFAULT else " "
        return f"{self.origin.value}{joint}{self.detail}"


class OptionError(ValueError):
    """The options cannot make a configuration: a file that cannot be read, an
    unknown key, a value of the wrong type, or a bound of the settings broken. The
    message is one line naming the option(s) and where each value came from."""


def defaults() -> dict[str, OptionValue]:
    """Every option at its default."""
    return {option.name: OptionValue(option.default, Origin.DEFAULT) for option in OPTIONS}


def settle(values: Mapping[str, OptionValue]) -> dict[str, OptionValue]:
    """`values` with each defaulted option that must be at least another one raised to
    it (a defaulted retry_max follows a larger retry_base). A given value is kept as
    it is, for the settings' own check to refuse."""
    out = dict(values)
    for option in OPTIONS:
        floor = option.default_at_least
        mine = out[option.name]
        if floor is not None and mine.origin is Origin.DEFAULT and mine.value < out[floor].value:
            out[option.name] = OptionValue(out[floor].value, Origin.DEFAULT, f"raised to {floor}")
    return out


def build_config(values: Mapping[str, OptionValue]) -> BrokerConfig:
    """The settings records made from one value per option. A bound broken raises
    OptionError naming the options involved and their sources."""
    top: dict[str, Any] = {}
    core: dict[str, Any] = {}
    for option in OPTIONS:
        for path in option.feeds:
            record, _, name = path.rpartition(".")
            (core if record == "core" else top)[name] = option.field_value(
                values[option.name].value
            )
    try:
        return BrokerConfig(core=CoreSettings(**core), **top)
    except SettingError as exc:
        raise OptionError(exc.render(lambda name, value: _described(values, name, value))) from None


def _described(values: Mapping[str, OptionValue], name: str, value: object) -> str:
    """A field in an error message, by the option that set it: `retry_max (1, flag)`."""
    option = _FEEDING.get(name)
    if option is None:  # no option sets it: only its default can be at fault
        return f"{name} ({shown(value)})"
    given = values[option.name]
    return f"{option.name} ({shown(given.value)}, {given.source})"
