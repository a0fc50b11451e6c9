"""`zbroker start --metrics-port`: Prometheus figures equal `zbroker queues --json`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack

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
        assert metrics[f"zbroker_tasks_dead{label}"] == row["dead"]
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
