"""Shared fixtures: real broker processes on free loopback ports, tracked zmq sockets.

Every socket a test opens through `zmq_ctx` is closed with linger=0 and the
context is terminated at teardown, so a broken test fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from hypothesis import settings

from tests.builds import settings_free_env
from zbroker.client.keys import Credentials

ROOT = Path(__file__).resolve().parent.parent

# No time limit per example: speed is measured in bench/, never asserted here, and a
# loaded CI machine would turn hypothesis's default 200 ms deadline into failures.
settings.register_profile("zbroker", deadline=None)
settings.load_profile("zbroker")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports (the OS may hand the same free port out twice)."""
    ports: list[int] = []
    while len(ports) < count:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, step_s: float = 0.02
) -> None:
    """Poll `predicate` until it is true; fail the test with a clear message at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s}s: {predicate}")


@dataclass
class BrokerProcess:
    """A real `zbroker start` subprocess and where it listens."""

    endpoint: str
    events_in: str
    events_out: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    # A broker started with --auth: the keys its readiness check connects with.
    credentials: Credentials | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    def start(self, wait: bool = True) -> None:
        """Start it; `wait`: until it answers (a standby of a group never does)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zbroker", "start", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Ready means: an 8/MMI query over the real socket gets an answer."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if self.credentials is not None:
                self.credentials.apply(sock)
            try:
                sock.connect(self.endpoint)
                sock.send_multipart([b"", b"MDPC01", b"mmi.service", b"ping"])
                if sock.poll(200):
                    sock.recv_multipart()
                    return
            finally:
                sock.close(linger=0)
        raise AssertionError(f"broker not ready within {timeout_s}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind happens in the broker."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close_log()

    def stop(self) -> int:
        rc = 0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError("broker did not stop on SIGTERM within 10s") from None
        elif self.proc is not None:
            rc = self.proc.returncode
        self._close_log()
        return rc

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def new_broker(
    directory: Path,
    n: int,
    *extra: str,
    heartbeat_interval: float = 0.2,
    data_dir: Path | None = None,
    credentials: Credentials | None = None,
) -> BrokerProcess:
    """Broker number `n` under `directory` (not started): free loopback ports, its own
    journal directory (`data_dir`, default a fresh one) and log. `credentials`: the
    keys its readiness check connects with, for a broker given `--auth` in `extra`."""
    ports = free_ports(3)
    endpoint, events_in, events_out = (f"tcp://127.0.0.1:{p}" for p in ports)
    args = [
        "--bind",
        endpoint,
        "--events-in",
        events_in,
        "--events-out",
        events_out,
        "--heartbeat-interval",
        str(heartbeat_interval),
        "--log-level",
        "debug",
        "--data-dir",
        str(data_dir or directory / f"data{n}"),
        # SIGTERM drains for at most this long (teardown waits 10 s for the exit);
        # a test of the drain itself passes its own --drain-timeout in `extra`.
        "--drain-timeout",
        "2",
        *extra,
    ]
    env = settings_free_env(dict(os.environ, PYTHONUNBUFFERED="1"))
    log_path = directory / f"broker{n}.log"
    return BrokerProcess(endpoint, events_in, events_out, args, log_path, env, credentials)


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers with extra CLI args; all are stopped at teardown."""
    started: list[BrokerProcess] = []

    def make(
        *extra: str,
        heartbeat_interval: float = 0.2,
        start: bool = True,
        data_dir: Path | None = None,
        credentials: Credentials | None = None,
    ) -> BrokerProcess:
        """A broker on free ports with its own journal directory (`data_dir`, default
        a fresh one under tmp_path). `start()` again after `kill()` restarts it on the
        same ports and journal. `credentials`: see `new_broker`."""
        b = new_broker(
            tmp_path,
            len(started),
            *extra,
            heartbeat_interval=heartbeat_interval,
            data_dir=data_dir,
            credentials=credentials,
        )
        started.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """One running broker with a 0.2 s heartbeat interval."""
    return broker_factory()


@dataclass(frozen=True)
class AuthKeys:
    """An auth file for `zbroker start --auth` and the certificates beside it (the
    files `zbroker keys new` writes): DIR/keys/NAME.key and NAME.key_secret."""

    path: Path
    keys: Path

    @property
    def server_key(self) -> Path:
        return self.keys / "broker.key"

    def secret(self, name: str) -> Path:
        return self.keys / f"{name}.key_secret"

    def credentials(self, name: str) -> Credentials:
        """`name`'s certificate with the broker's public key."""
        return Credentials.load(self.server_key, self.secret(name))

    def cli_args(self, name: str) -> list[str]:
        """The root options that make `python -m zbroker` connect as `name`."""
        return ["--server-key", str(self.server_key), "--key", str(self.secret(name))]


def write_auth(
    directory: Path,
    principals: Mapping[str, Mapping[str, Sequence[str]]],
    strangers: Sequence[str] = (),
) -> AuthKeys:
    """Key pairs for the broker, each principal (name -> its roles, services and
    topics) and each of `strangers` (keys the file does not name), and the file."""
    keys = directory / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    lines = ['server_secret = "keys/broker.key_secret"']
    for name in ("broker", *principals, *strangers):
        zmq.auth.create_certificates(keys, name)
    for name, grants in principals.items():
        lines += ["", "[[principal]]", f"name = {json.dumps(name)}", f'key = "keys/{name}.key"']
        lines += [f"{field} = {json.dumps(list(values))}" for field, values in grants.items()]
    path = directory / "auth.toml"
    path.write_text("\n".join(lines) + "\n")
    return AuthKeys(path, keys)


class TrackingContext(zmq.Context[zmq.Socket[bytes]]):
    """Keeps every socket it makes alive until `close_all`, so none is left to the GC."""

    # Declared on the class so pyzmq's option-setting __setattr__ treats it as an attribute.
    opened: list[zmq.Socket[bytes]] = []

    def __init__(self) -> None:
        super().__init__()
        self.opened = []

    def socket(self, socket_type: int, **kwargs: object) -> zmq.Socket[bytes]:  # type: ignore[override]
        sock = super().socket(socket_type, **kwargs)  # type: ignore[arg-type]
        self.opened.append(sock)
        return sock

    def close_all(self) -> None:
        for sock in self.opened:
            sock.close(linger=0)
        self.opened.clear()
        self.term()


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A private context; every socket is closed with linger=0 at teardown."""
    ctx: TrackingContext = TrackingContext()
    yield ctx
    ctx.close_all()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Closes whatever a test enters into it (clients, workers, executors), in reverse."""
    with ExitStack() as resources:
        yield resources


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """The session's PostgreSQL server (tests/pg.py), started on first use."""
    from tests.pg import Server

    server = Server()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server: Any) -> str:
    """A URL of the session's PostgreSQL with a schema of this test's own."""
    return str(postgres_server.fresh_url())
