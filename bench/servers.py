"""The servers the compare workload measures zbroker against: Redis, RabbitMQ and NATS
(JetStream), installed from the system's packages when missing, each started on
loopback only, on free ports, with its data in a directory the caller owns, and
waited for until it answers.

Every server runs as a child of a ProcessGroup, so it is stopped with the run
whatever happens; `kill` is the crash (SIGKILL to the server's whole process
group) and `start` on the same object restarts it on the same data and ports.
The configuration each one gets is the one its documentation recommends for
work that must not be lost; CONFIGURATION says it in words for the tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import BenchError, Child, ProcessGroup, Say, free_tcp_ports, load_pgserver

REDIS = "redis"
# The same redis-server with `appendfsync always`: each reply after the AOF's fsync.
REDIS_ALWAYS = "redis-always"
RABBITMQ = "rabbitmq"
NATS = "nats"
KINDS = (REDIS, RABBITMQ, NATS)  # what is installed (one package each)
# Every kind a Server runs, and the installed kind it runs the binary of.
PACKAGE_KIND = {REDIS: REDIS, REDIS_ALWAYS: REDIS, RABBITMQ: RABBITMQ, NATS: NATS}

# What each kind runs, and the Debian package that provides it.
BINARIES = {
    REDIS: Path("/usr/bin/redis-server"),
    RABBITMQ: Path("/usr/lib/rabbitmq/bin/rabbitmq-server"),
    NATS: Path("/usr/sbin/nats-server"),
}
PACKAGES = {REDIS: "redis-server", RABBITMQ: "rabbitmq-server", NATS: "nats-server"}
EPMD = "epmd"  # Erlang's port mapper, which RabbitMQ needs; comes with rabbitmq-server
# The Python clients (the `bench` extra of pyproject.toml) by import name.
CLIENT_MODULES = ("redis", "pika", "nats", "celery", "dramatiq")

# Names every peer agrees on (bench/compare_peers.py imports them).
QUEUE = "bench.tasks"  # Redis list, RabbitMQ queue, NATS subject
STREAM = "BENCH"  # NATS JetStream stream and Redis stream key
GROUP = "workers"  # Redis stream consumer group, NATS durable consumer

READY_TIMEOUT_S = 120.0
# NATS redelivers a message that was not acknowledged within this long (its default
# is 30 s; shorter so that the crash workload drains in bounded time).
NATS_ACK_WAIT_S = 10.0
_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ installing


def ensure_installed(kinds: tuple[str, ...], say: Say) -> None:
    """Install the Debian packages of `kinds` that are missing (as root, without
    prompts, and without letting the packages start their own system-wide
    services), and check the Python clients are importable."""
    missing = [k for k in kinds if not BINARIES[k].exists()]
    if missing:
        packages = [PACKAGES[k] for k in missing]
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BenchError(f"missing {', '.join(packages)}: install them (apt-get) and rerun")
        say(f"installing {', '.join(packages)} with apt-get")
        _apt_install(packages)
        still = [PACKAGES[k] for k in missing if not BINARIES[k].exists()]
        if still:
            raise BenchError(f"apt-get did not install {', '.join(still)}")
    absent = [m for m in CLIENT_MODULES if not _importable(m)]
    if absent:
        raise BenchError(
            f"missing Python clients {', '.join(absent)}: run through `python3 dev.py bench`, "
            "which installs the `bench` extra of pyproject.toml"
        )


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _apt_install(packages: list[str]) -> None:
    try:
        load_pgserver().apt_install(packages)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


def versions() -> dict[str, str | None]:
    """The version of each installed server and Python client, for the results."""
    out: dict[str, str | None] = {}
    for kind in KINDS:
        out[kind] = _package_version(PACKAGES[kind])
    for module in CLIENT_MODULES:
        try:
            from importlib.metadata import version

            out[f"python-{module}"] = version({"nats": "nats-py"}.get(module, module))
        except Exception:
            out[f"python-{module}"] = None
    return out


def _package_version(package: str) -> str | None:
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return None
    return done.stdout.strip() or None


# ------------------------------------------------------------------ memory


def group_memory_kib(pgid: int) -> dict[str, int]:
    """VmRSS and RssAnon summed over every process of group `pgid` (RabbitMQ is a shell
    script, the Erlang VM and its helpers; the others are one process)."""
    total = {"rss_kib": 0, "rss_anon_kib": 0}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
            if int(stat[stat.rindex(b")") + 2 :].split()[2]) != pgid:
                continue
            status = Path(entry.path, "status").read_text()
        except (OSError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total["rss_kib"] += int(line.split()[1])
            elif line.startswith("RssAnon:"):
                total["rss_anon_kib"] += int(line.split()[1])
    return total


def settled_memory_kib(pgid: int, timeout_s: float = 60.0) -> dict[str, int]:
    """group_memory_kib once RssAnon holds still: the last SETTLE_READINGS readings, one
    a second, within 1% (or 512 KiB) of each other. A garbage-collected server (the
    Erlang VM) gives memory back for tens of seconds after a fill, so a short window
    would catch it mid-way. `settled_s` says how long it took; `settled` is 0 if the
    timeout came first."""
    started = time.monotonic()
    readings = [group_memory_kib(pgid)]
    while True:
        time.sleep(1.0)
        readings.append(group_memory_kib(pgid))
        window = [r["rss_anon_kib"] for r in readings[-SETTLE_READINGS:]]
        steady = len(window) == SETTLE_READINGS and max(window) - min(window) <= max(
            512, max(window) // 100
        )
        elapsed = time.monotonic() - started
        if steady or elapsed > timeout_s:
            return {**readings[-1], "settled": int(steady), "settled_s": round(elapsed)}


SETTLE_READINGS = 5


# ------------------------------------------------------------------ servers


@dataclass
class Server:
    """One server of `kind` with its data in `data_dir`; `start` (again) after `kill`
    restarts it on the same data and ports."""

    kind: str
    data_dir: Path
    procs: ProcessGroup
    ports: list[int] = field(default_factory=list)
    child: Child | None = None
    _epmd: Child | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PACKAGE_KIND:
            raise ValueError(f"unknown server kind {self.kind!r}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Client port first; RabbitMQ also needs a distribution port and epmd's.
        self.ports = free_tcp_ports(3 if self.kind == RABBITMQ else 1)

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def url(self) -> str:
        scheme = {REDIS: "redis", RABBITMQ: "amqp", NATS: "nats"}[PACKAGE_KIND[self.kind]]
        auth = "guest:guest@" if self.kind == RABBITMQ else ""
        path = "/%2F" if self.kind == RABBITMQ else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}{path}"

    @property
    def pid(self) -> int:
        if self.child is None:
            raise BenchError(f"{self.kind} is not running")
        return self.child.pid

    def start(self, ready: Callable[[], bool] | None = None) -> float:
        """Start the server and wait until it answers; seconds from Popen to the first
        answer. `ready` (default: a plain command) is retried until it returns True."""
        self.starts += 1
        name = f"{self.kind}-{self.starts}"
        argv, env = self._command()
        if self.kind == RABBITMQ and self._epmd is None:
            epmd_port = self.ports[2]
            self._epmd = self.procs.start(
                "epmd", [EPMD, "-port", str(epmd_port), "-address", "127.0.0.1"]
            )
        started = time.perf_counter()
        self.child = self.procs.start(name, argv, env=env)
        probe = ready or (lambda: probe_ready(self.kind, self.url))
        deadline = started + READY_TIMEOUT_S
        while True:
            if self.child.proc.poll() is not None:
                raise self.child.failure("exited before answering")
            try:
                if _listening(self.port) and probe():
                    return time.perf_counter() - started
            except Exception:
                pass  # not up yet (refused, loading, booting)
            if time.perf_counter() > deadline:
                raise self.child.failure(f"did not answer within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL the server's whole process group: the crash."""
        if self.child is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.proc.wait(10)
        self.procs.stop(self.child)

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        d = self.data_dir
        if PACKAGE_KIND[self.kind] == REDIS:
            fsync = "always" if self.kind == REDIS_ALWAYS else "everysec"
            return [
                str(BINARIES[REDIS]),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(d),
                "--appendonly",
                "yes",
                "--appendfsync",
                fsync,
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ], None
        if self.kind == NATS:
            config = d / "nats.conf"
            config.write_text(
                f'listen: "127.0.0.1:{self.port}"\n'
                f'jetstream {{\n  store_dir: "{d / "jetstream"}"\n}}\n'
            )
            return [str(BINARIES[NATS]), "-c", str(config)], None
        dist_port, epmd_port = self.ports[1], self.ports[2]
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # The server refuses publishers below this much free disk; /tmp may be small.
            "disk_free_limit.absolute = 50MB\n"
        )
        env = dict(
            os.environ,
            HOME=str(d),  # the Erlang cookie goes here, not in root's home
            RABBITMQ_NODENAME=f"zbench{self.port}@localhost",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(dist_port),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_LOGS="-",
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(d / "rabbitmq.pid"),
            ERL_EPMD_PORT=str(epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"
            ),
        )
        return [str(BINARIES[RABBITMQ])], env


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every process of group `pgid` so far."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS_PER_S
    return total


def probe_ready(kind: str, url: str) -> bool:
    """One attempt at a plain command; True if the server answered it."""
    if PACKAGE_KIND[kind] == REDIS:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
        try:
            # LLEN, not PING: a Redis still loading its AOF refuses it with LOADING.
            client.llen(QUEUE)
        finally:
            client.close()
        return True
    if kind == RABBITMQ:
        import pika

        params = pika.URLParameters(url)
        params.socket_timeout = 1
        params.blocked_connection_timeout = 5
        connection = pika.BlockingConnection(params)
        connection.close()
        return True

    async def nats_probe() -> bool:
        import nats

        nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, error_cb=_quiet)
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()
        return True

    return asyncio.run(nats_probe())


async def _quiet(exc: Exception) -> None:
    """nats-py error callback: a refused connection while the server starts is expected."""


CONFIGURATION: dict[str, str] = {
    REDIS: (
        "redis-server with `appendonly yes`, `appendfsync everysec` (the documented "
        "recommendation: at most about one second of writes lost on a crash), RDB snapshots "
        'off (`save ""`: AOF is the persistence; a background save would fork mid-run)'
    ),
    REDIS_ALWAYS: (
        "a second redis-server, its own data directory, configured as the first but with "
        "`appendfsync always`: the AOF is written and fsynced before the replies of each "
        "event-loop pass are sent (one fsync per pass, shared by every command in it)"
    ),
    RABBITMQ: (
        "one rabbitmq-server node, no plugins, a classic durable queue (or a quorum queue, "
        "`x-queue-type: quorum`, one replica), persistent messages (delivery mode 2), "
        "publisher confirms, manual acknowledgements"
    ),
    NATS: (
        "nats-server with JetStream, file storage, a stream with work-queue retention, one "
        f"durable pull consumer with explicit acks (ack wait {NATS_ACK_WAIT_S:.0f} s); the "
        "file store writes through the page cache and fsyncs on a timer (`sync_interval`, 2 "
        "minutes by default), not before each ack"
    ),
}
