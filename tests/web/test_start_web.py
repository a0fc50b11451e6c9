"""`zbroker start --web ADDR`: a gateway beside the broker, stopped with it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, free_port, wait_until
from tests.web.gateway import Http
from zbroker import cli
from zbroker.config import BrokerConfig

pytestmark = pytest.mark.integration


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def healthy(port: int) -> bool:
    if not listening(port):
        return False
    http = Http(port)
    try:
        return http.get("/api/v1/health").status == 200
    finally:
        http.close()


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_start_web_runs_a_gateway_that_ends_with_the_broker(
    broker_factory: Callable[..., BrokerProcess], stop: str
) -> None:
    # Given a broker started with --web
    port = free_port()
    broker = broker_factory("--web", f"127.0.0.1:{port}")
    # Then its gateway serves the broker's figures
    wait_until(lambda: healthy(port), timeout_s=20, step_s=0.1)
    http = Http(port)
    assert http.get("/api/v1/queues").status == 200
    http.close()
    # When the broker stops (even killed), the gateway is gone too
    if stop == "sigterm":
        broker.stop()
    else:
        broker.kill()
    wait_until(lambda: not listening(port), timeout_s=15, step_s=0.1)


@pytest.mark.parametrize("command", [["web"], ["start", "--web", "127.0.0.1:1"]])
def test_without_aiohttp_both_commands_say_what_to_install(command: list[str]) -> None:
    # Given an interpreter where aiohttp cannot be imported
    code = (
        f"import sys; sys.modules['aiohttp'] = None; from zbroker.cli import app; app({command!r})"
    )
    # When `zbroker web` or `zbroker start --web` runs
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    # Then it stops at once, naming the extra to install
    assert done.returncode == 2
    assert "pip install 'zbroker[web]'" in done.stderr


def test_the_child_gateway_gets_the_broker_endpoints_keys_and_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a broker bound on wildcards, started with root key options
    config = BrokerConfig(
        bind="tcp://*:7001",
        events_in="tcp://0.0.0.0:7002",
        events_out="tcp://[::]:7003",
        insecure=True,
        web="127.0.0.1:8080",
        web_tokens=Path("tokens.toml"),
    )
    monkeypatch.setattr(cli, "_credential_flags", ["--server-key", "b.key", "--key", "w.secret"])
    # When it composes its gateway's command line
    command = cli.gateway_command(config)
    # Then the gateway connects to loopback, with the same keys, tokens and parent
    root, web = command[3 : command.index("web")], command[command.index("web") :]
    assert root == ["--server-key", "b.key", "--key", "w.secret"]
    given = dict(zip(web[1::2], web[2::2], strict=True))
    assert given == {
        "--listen": "127.0.0.1:8080",
        "--endpoint": "tcp://127.0.0.1:7001",
        "--events-in": "tcp://127.0.0.1:7002",
        "--events-out": "tcp://[::1]:7003",
        "--parent": str(os.getpid()),
        "--tokens": "tokens.toml",
    }
