"""`zbroker start --metrics-port`: Prometheus figures equal `zbroker queues --json`."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from email.message import Message
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, BrokerProcess, free_port
from tests.integration.running import open_client


def get(url: str, token: str | None = None) -> tuple[int, str]:
    return get_with_headers(url, token)[:2]


def get_with_headers(url: str, token: str | None = None) -> tuple[int, str, Message]:
    """Status, body and headers of a GET, with `Authorization: Bearer <token>` if given."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_match_the_queues_command_and_health_answers(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    port = free_port()
    broker = broker_factory("--metrics-port", str(port))
    client = open_client(stack, broker)
    client.enqueue_many("tts", [b"a", b"b", b"c"])
    client.enqueue("tts", b"later", delay_s=60)
    client.enqueue("stt", b"x")
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    metrics = samples(text)
    queues = json.loads(
        subprocess.run(
            [sys.executable, "-m", "zbroker", "queues", "--json", "--endpoint", broker.endpoint],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        ).stdout
    )
    for row in queues:
        label = f'{{service="{row["service"]}"}}'
        assert metrics[f"zbroker_tasks_ready{label}"] == row["ready"]
        assert metrics[f"zbroker_tasks_delayed{label}"] == row["delayed"]
        assert metrics[f"zbroker_tasks_inflight{label}"] == row["inflight"]
        assert metrics[f"zbroker_dead_letters{label}"] == row["dead"]
        assert metrics[f"zbroker_workers{label}"] == row["workers"]
    assert metrics['zbroker_tasks_ready{service="tts"}'] == 3
    assert metrics["zbroker_tasks_enqueued_total"] == 5
    assert metrics["zbroker_up"] == 1 and metrics["zbroker_journal_commits_total"] >= 1
    assert metrics['zbroker_service_enqueued_total{service="tts"}'] == 4
    assert metrics['zbroker_task_wait_seconds_count{service="tts"}'] == 0
    assert metrics['zbroker_task_run_seconds_bucket{le="+Inf",service="tts"}'] == 0
    status, body = get(f"http://127.0.0.1:{port}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert get(f"http://127.0.0.1:{port}/nope")[0] == 404


def test_metrics_port_in_use_is_a_clear_start_error(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    first = broker_factory("--metrics-port", str(port := free_port()))
    second = broker_factory("--metrics-port", str(port), start=False)
    assert first.proc is not None
    result = subprocess.run(
        [sys.executable, "-m", "zbroker", "start", *second.args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1 and "cannot serve metrics" in result.stderr


def test_metric_families_are_unique_and_a_dropped_scrape_is_no_traceback(
    broker_factory: Callable[..., BrokerProcess], stack: ExitStack
) -> None:
    port = free_port()
    broker = broker_factory("--metrics-port", str(port))
    open_client(stack, broker).enqueue("tts", b"a")
    # Every family appears once (a gauge and a counter once shared a name)
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    names = [family.name for family in text_string_to_metric_families(text)]
    assert status == 200 and len(names) == len(set(names)), sorted(names)
    # Scrapers that reset their connection mid-answer leave no traceback behind
    for _ in range(5):
        conn = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    time.sleep(1.0)
    assert get(f"http://127.0.0.1:{port}/health")[0] == 200
    assert broker.stop() == 0
    assert "Traceback" not in broker.log()


def start_fails(broker: BrokerProcess) -> subprocess.CompletedProcess[str]:
    """`zbroker start` with a not-started broker's arguments, expected to stop at once."""
    return subprocess.run(
        [sys.executable, "-m", "zbroker", "start", *broker.args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=broker.env,
        timeout=60,
    )


TOKEN = "s3cret-token_0123456789"


def test_a_token_file_guards_metrics_but_not_health(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    # Given a broker whose token file has the token on a line of its own
    token_file = tmp_path / "metrics.token"
    token_file.write_text(f"  {TOKEN}\n")
    port = free_port()
    broker = broker_factory("--metrics-port", str(port), "--metrics-token-file", str(token_file))
    url = f"http://127.0.0.1:{port}"
    # When /metrics is asked without the token, or with a wrong one, then 401
    status, body, headers = get_with_headers(f"{url}/metrics")
    assert status == 401 and "zbroker_up" not in body
    assert headers["WWW-Authenticate"] == 'Bearer realm="zbroker"'
    for wrong in ("wrong", TOKEN[:-1] + "X", TOKEN + "X", ""):
        status, body, headers = get_with_headers(f"{url}/metrics", wrong)
        assert status == 401 and "zbroker_up" not in body, wrong
        assert headers["WWW-Authenticate"] == 'Bearer realm="zbroker"'
    # (another scheme with the right token is no bearer token)
    basic = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Basic {TOKEN}"})
    try:
        urllib.request.urlopen(basic, timeout=10)
        raise AssertionError("Basic accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 401
    # When asked with the right token (surrounding whitespace of the file stripped), then 200
    status, body = get(f"{url}/metrics", TOKEN)
    assert status == 200 and samples(body)["zbroker_up"] == 1
    # /health needs no token
    status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    # The log says a token is asked for, and never shows it
    assert broker.stop() == 0
    log = broker.log()
    assert "/metrics asks for a bearer token" in log
    assert TOKEN not in log


def test_without_a_token_file_metrics_ask_for_none(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    port = free_port()
    broker = broker_factory("--metrics-port", str(port))
    status, body, headers = get_with_headers(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "WWW-Authenticate" not in headers
    assert samples(body)["zbroker_up"] == 1
    # a token sent anyway changes nothing
    assert get(f"http://127.0.0.1:{port}/metrics", "anything")[0] == 200
    assert broker.stop() == 0
    assert "/metrics asks for no token" in broker.log()


def test_a_missing_or_empty_token_file_stops_the_start(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text(" \n\n")
    lines = tmp_path / "two-lines.token"
    lines.write_text("first\nsecond\n")
    for token_file in (tmp_path / "missing.token", empty, lines, tmp_path):
        broker = broker_factory(
            "--metrics-port", str(free_port()), "--metrics-token-file", str(token_file), start=False
        )
        result = start_fails(broker)
        # (the lines before it are the log's)
        message = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1, result.stderr
        assert message.startswith("zbroker: ") and "Traceback" not in result.stderr, message
        assert f"metrics token file {token_file}" in message, message


def test_metrics_on_a_public_address_need_a_token_file(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    # Without a token file: refused as a setting (exit 2), naming the option to give
    port = free_port()
    refused = broker_factory("--metrics-port", str(port), "--metrics-host", "0.0.0.0", start=False)
    result = start_fails(refused)
    assert result.returncode == 2, result.stderr
    assert "--metrics-token-file" in result.stderr and "0.0.0.0" in result.stderr
    # With one: the broker starts, and its /metrics asks for the token
    token_file = tmp_path / "metrics.token"
    token_file.write_text(TOKEN)
    broker_factory(
        "--metrics-port",
        str(port),
        "--metrics-host",
        "0.0.0.0",
        "--metrics-token-file",
        str(token_file),
    )
    assert get(f"http://127.0.0.1:{port}/metrics")[0] == 401
    assert get(f"http://127.0.0.1:{port}/metrics", TOKEN)[0] == 200
