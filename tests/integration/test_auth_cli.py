"""`zbroker start --auth`, `--insecure` and `zbroker keys new` as real processes.

A bad auth file, or an endpoint other machines reach without `--auth`, stops the
start with one line and a non-zero exit, never a traceback; `keys new` writes
certificates the broker and the clients load; the metrics server still answers
on a broker with `--auth` (it asks the broker over inproc).
"""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import zmq.auth

from tests.builds import settings_free_env
from tests.conftest import (
    ROOT,
    AuthKeys,
    BrokerProcess,
    free_port,
    free_ports,
    write_auth,
)
from tests.integration.running import open_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PRINCIPALS: dict[str, dict[str, list[str]]] = {
    "alice": {"roles": ["client"], "services": ["echo.*"]},
    "observer": {"roles": ["observer"]},
    "admin": {"roles": ["admin"]},
}


@pytest.fixture
def auth(tmp_path: Path) -> AuthKeys:
    return write_auth(tmp_path / "auth", PRINCIPALS)


def clean_env() -> dict[str, str]:
    return settings_free_env()


def zbroker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m zbroker ARGS`; a start that should fail but serves instead times out."""
    return subprocess.run(
        [sys.executable, "-m", "zbroker", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env if env is not None else clean_env(),
        timeout=30,
    )


def start_args(tmp_path: Path, *extra: str) -> list[str]:
    """`start` on free loopback ports with a journal under tmp_path, then `extra`."""
    ports = free_ports(3)
    return [
        "start",
        "--bind",
        f"tcp://127.0.0.1:{ports[0]}",
        "--events-in",
        f"tcp://127.0.0.1:{ports[1]}",
        "--events-out",
        f"tcp://127.0.0.1:{ports[2]}",
        "--data-dir",
        str(tmp_path / "data"),
        *extra,
    ]


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The one `zbroker: ...` line a failed start printed (and nothing like a traceback)."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("zbroker: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ----------------------------------------------------------- bad auth files

PRINCIPAL_A = '[[principal]]\nname = "a"\nkey = "keys/alice.key"\nroles = ["admin"]\n'
SERVER = 'server_secret = "keys/broker.key_secret"\n'

BAD_FILES: dict[str, tuple[str, str]] = {
    "no server_secret": (PRINCIPAL_A, "`server_secret`"),
    "server_secret without its secret": (
        'server_secret = "keys/broker.key"\n' + PRINCIPAL_A,
        "holds no secret key",
    ),
    "unknown role": (
        SERVER + '[[principal]]\nname = "a"\nkey = "keys/alice.key"\nroles = ["root"]\n',
        "unknown role(s) ['root']",
    ),
    "no roles": (
        SERVER + '[[principal]]\nname = "a"\nkey = "keys/alice.key"\nroles = []\n',
        "no roles",
    ),
    "duplicate key": (
        SERVER + PRINCIPAL_A + PRINCIPAL_A.replace('"a"', '"b"'),
        "principals 'a' and 'b' have the same key",
    ),
    "duplicate name": (
        SERVER + PRINCIPAL_A + PRINCIPAL_A.replace("alice", "observer"),
        "'a' is declared twice",
    ),
    "the broker's own key": (
        SERVER + PRINCIPAL_A.replace("alice", "broker"),
        "the broker's own key",
    ),
    "client without services": (
        SERVER + '[[principal]]\nname = "a"\nkey = "keys/alice.key"\nroles = ["client"]\n',
        "need `services`",
    ),
    "subscriber without topics": (
        SERVER + '[[principal]]\nname = "a"\nkey = "keys/alice.key"\nroles = ["subscriber"]\n',
        "need `topics`",
    ),
    "missing certificate": (
        SERVER + PRINCIPAL_A.replace("keys/alice.key", "keys/nobody.key"),
        "cannot read certificate",
    ),
    "certificate path is a directory": (
        SERVER + PRINCIPAL_A.replace("keys/alice.key", "keys"),
        "cannot read certificate",
    ),
    "unknown field": (SERVER + PRINCIPAL_A + 'servics = ["x"]\n', "unknown field(s)"),
    "no principals": (SERVER, "no [[principal]]"),
    "malformed TOML": (SERVER + '[[principal]]\nname = "a\n', "cannot read auth file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_auth_file_stops_the_start_with_one_line(
    tmp_path: Path, auth: AuthKeys, case: str
) -> None:
    # Given an auth file with one thing wrong (beside real certificates)
    text, expected = BAD_FILES[case]
    auth.path.write_text(text)
    # When the broker starts with it
    result = zbroker(*start_args(tmp_path, "--auth", str(auth.path)))
    # Then it exits non-zero with one line naming the file and the fault,
    assert result.returncode == 1, result.stderr
    line = one_line_error(result)
    assert str(auth.path) in line and expected in line
    # before it opened anything
    assert not (tmp_path / "data").exists()


def test_a_missing_auth_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    result = zbroker(*start_args(tmp_path, "--auth", str(missing)))
    assert result.returncode != 0
    line = one_line_error(result)
    assert str(missing) in line


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.mark.parametrize("with_auth", [False, True], ids=["without auth", "with auth"])
@pytest.mark.parametrize("option", ["--bind", "--events-in", "--metrics-port"])
def test_a_busy_port_stops_the_start_with_one_line(
    tmp_path: Path, auth: AuthKeys, busy_port: int, option: str, with_auth: bool
) -> None:
    # Given an endpoint (or the metrics port) another process already listens on
    value = str(busy_port) if option == "--metrics-port" else f"tcp://127.0.0.1:{busy_port}"
    keys = ["--auth", str(auth.path)] if with_auth else []
    # When the broker starts there (with --auth its handshake handler exists by then)
    result = zbroker(*start_args(tmp_path, *keys, option, value))
    # Then it exits 1 with one line that names the address, not a traceback
    assert result.returncode == 1, result.stderr
    assert str(busy_port) in one_line_error(result)


# ---------------------------------------------------- endpoints other machines reach


@pytest.mark.parametrize(
    ("option", "address"),
    [
        ("--bind", "tcp://0.0.0.0:{port}"),
        ("--bind", "tcp://*:{port}"),
        ("--events-in", "tcp://0.0.0.0:{port}"),
        ("--events-out", "tcp://0.0.0.0:{port}"),
    ],
)
def test_an_endpoint_other_machines_reach_needs_auth(
    tmp_path: Path, option: str, address: str
) -> None:
    # Given an endpoint on every interface, and no --auth
    endpoint = address.format(port=free_port())
    # When the broker starts
    result = zbroker(*start_args(tmp_path, option, endpoint))
    # Then it refuses, naming the option and what to give
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert option.removeprefix("--").replace("-", "_") in line and endpoint in line
    assert "--auth" in line and "--insecure" in line


@pytest.fixture
def stopped() -> Iterator[list[BrokerProcess]]:
    brokers: list[BrokerProcess] = []
    yield brokers
    for broker in brokers:
        broker.stop()


def wide_broker(
    tmp_path: Path,
    stopped: list[BrokerProcess],
    *extra: str,
    auth: AuthKeys | None = None,
) -> BrokerProcess:
    """A broker whose ROUTER listens on every interface (reached on loopback)."""
    port = free_port()
    args = [*start_args(tmp_path, *extra)[1:], "--bind", f"tcp://0.0.0.0:{port}"]
    broker = BrokerProcess(
        f"tcp://127.0.0.1:{port}",
        args[args.index("--events-in") + 1],
        args[args.index("--events-out") + 1],
        args,
        tmp_path / "broker.log",
        dict(clean_env(), PYTHONUNBUFFERED="1"),
        None if auth is None else auth.credentials("admin"),
    )
    stopped.append(broker)
    broker.start()
    return broker


def test_insecure_serves_other_machines_and_says_so(
    tmp_path: Path, stopped: list[BrokerProcess], stack: ExitStack
) -> None:
    # When a broker starts on every interface with --insecure
    broker = wide_broker(tmp_path, stopped, "--insecure")
    # Then it serves, and its log warns that it is INSECURE, naming the endpoint
    open_client(stack, broker).enqueue("echo.open", b"x")
    warnings = [line for line in broker.log().splitlines() if "INSECURE" in line]
    assert warnings and "tcp://0.0.0.0:" in warnings[0]


def test_auth_serves_other_machines(
    tmp_path: Path, auth: AuthKeys, stopped: list[BrokerProcess], stack: ExitStack
) -> None:
    # When a broker starts on every interface with --auth
    broker = wide_broker(tmp_path, stopped, "--auth", str(auth.path), auth=auth)
    # Then it serves peers with keys, prints its public key, and warns of nothing
    client = open_client(stack, broker, credentials=auth.credentials("alice"))
    client.enqueue("echo.wide", b"x")
    public = zmq.auth.load_certificate(auth.server_key)[0].decode()
    log = broker.log()
    assert f"broker public key {public}" in log and "INSECURE" not in log


# ------------------------------------------------------------------ keys new


def test_keys_new_writes_a_certificate_pair(tmp_path: Path) -> None:
    directory = tmp_path / "made" / "keys"
    # When keys are made for a principal in a directory that does not exist yet
    result = zbroker("keys", "new", "tts-worker", "--dir", str(directory))
    # Then the public and the secret file are there, the secret one readable by its owner only
    assert result.returncode == 0, result.stderr
    public, secret = directory / "tts-worker.key", directory / "tts-worker.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert str(public) in result.stdout and str(secret) in result.stdout
    # And zmq.auth loads them: one key pair, the secret half only in the secret file
    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public, secret_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and secret_key is not None
    assert public_key == same_public and len(public_key) == len(secret_key) == 40


def test_keys_new_does_not_overwrite(tmp_path: Path) -> None:
    # Given keys already made
    assert zbroker("keys", "new", "ops", "--dir", str(tmp_path)).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # When they are made again under the same name
    result = zbroker("keys", "new", "ops", "--dir", str(tmp_path))
    # Then the command refuses and both files are unchanged
    assert result.returncode == 1
    assert "exists" in one_line_error(result)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("name", ["../escape", ".hidden", ""])
def test_keys_new_refuses_a_name_that_is_not_a_file_name(tmp_path: Path, name: str) -> None:
    result = zbroker("keys", "new", name, "--dir", str(tmp_path / "keys"))
    assert result.returncode == 2
    one_line_error(result)
    assert not (tmp_path / "escape.key").exists()


def test_keys_from_keys_new_serve_a_broker_and_its_cli(
    tmp_path: Path, broker_factory: Callable[..., BrokerProcess]
) -> None:
    # Given keys made with `zbroker keys new` and an auth file naming them
    keys = tmp_path / "keys"
    for name in ("broker", "ops"):
        assert zbroker("keys", "new", name, "--dir", str(keys)).returncode == 0
    auth = AuthKeys(tmp_path / "auth.toml", keys)
    auth.path.write_text(SERVER + PRINCIPAL_A.replace("alice", "ops"))
    # When a broker starts with it
    broker = broker_factory("--auth", str(auth.path), credentials=auth.credentials("ops"))
    # Then the CLI with the ops key (given in the environment) reads its queues
    env = clean_env()
    env.update(ZBROKER_SERVER_KEY=str(auth.server_key), ZBROKER_KEY=str(auth.secret("ops")))
    result = zbroker("queues", "--json", "--endpoint", broker.endpoint, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_cli_needs_both_keys(tmp_path: Path, auth: AuthKeys) -> None:
    # When the CLI is given the broker's key but not its own
    result = zbroker("--server-key", str(auth.server_key), "queues")
    # Then it says to give both
    assert result.returncode == 2
    assert "--server-key and --key" in one_line_error(result)
    # And a key file that is not a certificate is named
    result = zbroker(*auth.cli_args("alice")[:2], "--key", str(auth.path), "queues")
    assert result.returncode == 2
    assert str(auth.path) in one_line_error(result)


# ------------------------------------------------------------------- metrics


def test_metrics_answer_on_a_broker_with_auth(
    broker_factory: Callable[..., BrokerProcess], auth: AuthKeys, stack: ExitStack
) -> None:
    # Given a broker with --auth serving metrics, and a task alice enqueued
    port = free_port()
    broker = broker_factory(
        "--auth", str(auth.path), "--metrics-port", str(port), credentials=auth.credentials("admin")
    )
    open_client(stack, broker, credentials=auth.credentials("alice")).enqueue("echo.seen", b"x")
    # When /metrics is scraped (the metrics server asks the broker over inproc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        status, text = response.status, response.read().decode()
    # Then it answers with the broker's figures
    assert status == 200
    assert "zbroker_up 1" in text
    assert 'zbroker_tasks_ready{service="echo.seen"} 1' in text
