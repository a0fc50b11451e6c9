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

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, BrokerProcess, free_port
from tests.integration.running import open_client


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


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
