"""Task graphs from the Python client and the CLI against a real broker
(docs/protocol.md §15): idempotent chains and fan-ins, what STATUS, TASKS and
QUEUES show, `zbroker enqueue --depends-on`."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BrokerProcess
from tests.integration.test_cli_admin import zbroker
from zbroker import Client, TaskNotFound, TaskUpstreamFailed

pytestmark = pytest.mark.timeout(60)


def test_a_keyed_chain_and_fan_in_enqueued_again_store_nothing_new(
    broker: BrokerProcess,
) -> None:
    with Client(broker.endpoint) as client:
        chain = client.chain([("stt", b"audio"), ("llm", None), ("tts", None)], key="flow-1")
        again = client.chain([("stt", b"audio"), ("llm", None), ("tts", None)], key="flow-1")
        assert again == chain and all(t.existing for t in again)
        graph = client.fan_in([("embed", b"a"), ("embed", b"b")], ("index", None), key="f")
        assert client.fan_in([("embed", b"a"), ("embed", b"b")], ("index", None), key="f") == graph
        # What operators see: blocked tasks, their dependencies and the options
        status = client.status(chain[1])
        assert status.state == "blocked" and status.depends_on == (chain[0],)
        assert (status.blocked_on, status.input) == (1, "result")
        assert client.status(graph[-1]).depends_on == tuple(graph[:2])
        blocked, _ = client.tasks("llm", "blocked")
        assert [t["id"] for t in blocked] == [chain[1]]
        (llm,) = [q for q in client.queues() if q["service"] == "llm"]
        assert llm["blocked"] == 1
        # Cancelling the first step fails the rest, each with the reason
        client.cancel(chain[0])
        with pytest.raises(TaskUpstreamFailed, match=f"dependency {chain[1]} ended"):
            client.result(chain[2], timeout_s=5)
        with pytest.raises(TaskNotFound, match="depends_on"):
            client.enqueue("x", b"", depends_on=["t999-0123"])


def test_the_cli_enqueues_with_dependencies_by_id_and_by_key(broker: BrokerProcess) -> None:
    first = zbroker(broker, "enqueue", "stt", "--data", "a", "--key", "rec-1")
    assert first.returncode == 0, first.stderr
    stt = first.stdout.strip()
    second = zbroker(
        broker, "enqueue", "llm", "--data", "", "--depends-on", "stt/rec-1", "--input", "result"
    )
    assert second.returncode == 0, second.stderr
    llm = second.stdout.strip()
    status = zbroker(broker, "task", llm, "--json")
    assert status.returncode == 0, status.stderr
    task = json.loads(status.stdout)
    assert task["state"] == "blocked" and task["depends_on"] == [stt]
    listed = zbroker(broker, "tasks", "--service", "llm", "--state", "blocked", "--json")
    assert listed.returncode == 0 and [t["id"] for t in json.loads(listed.stdout)] == [llm]
    # An unknown dependency is refused with the broker's reason, and a bad option before
    refused = zbroker(broker, "enqueue", "llm", "--data", "x", "--depends-on", "nope")
    assert refused.returncode == 1 and "depends_on[0]: no task 'nope'" in refused.stderr
    bad = zbroker(broker, "enqueue", "llm", "--data", "x", "--input", "result")
    assert bad.returncode == 2 and "need depends_on" in bad.stderr
