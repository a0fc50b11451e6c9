"""The Node Client pages through QUEUES on a real broker (issue 17)."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import zmq

from tests.conftest import BrokerProcess, wait_until
from tests.crosslang.nodeproc import NodeFactory
from tests.integration.running import open_client
from tests.integration.test_many_services import flood

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_the_node_client_pages_through_queues(
    broker: BrokerProcess,
    node: NodeFactory,
    stack: ExitStack,
    zmq_ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    # Given 1,500 services with a waiting request
    flood(zmq_ctx, broker.endpoint, 1500, "n-")
    client = open_client(stack, broker)
    wait_until(lambda: client.broker_stats()["services"] == 1500, timeout_s=30)
    node_client = node("client.mjs", broker.endpoint)
    # When the Node client reads one page after a name, then every page
    page = node_client.call("queuesPage", options={"limit": 10, "after": "n-000100"})
    rows = node_client.call("queues", options={"limit": 400}, timeout_s=60)
    # Then the page holds the next 10 names and a cursor, and the list every service once
    assert [r["service"] for r in page["queues"]] == [f"n-{i:06d}" for i in range(101, 111)]
    assert page["next"] == "n-000110"
    assert [r["service"] for r in rows] == [f"n-{i:06d}" for i in range(1500)]
    assert all(r["requests"] == 1 for r in rows)
    # And the last page says so
    last = node_client.call("queuesPage", options={"after": "n-001499"})
    assert last == {"queues": [], "next": None}
