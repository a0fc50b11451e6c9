"""`zbroker web --endpoint a,b`: the gateway follows the active broker of a group.

As in tests/integration/test_failover_clients.py, a failover without PostgreSQL is
two real broker processes on one LMDB data directory run one after the other on
their own ports: A serves, is killed with SIGKILL, then B starts on A's journal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import BrokerProcess
from tests.web.gateway import GatewayProcess, Http


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Callable[[object], GatewayProcess]]:
    started: list[GatewayProcess] = []

    def make(brokers: object) -> GatewayProcess:
        gw = GatewayProcess(brokers, tmp_path / "web.log")  # type: ignore[arg-type]
        started.append(gw)
        gw.start()
        return gw

    yield make
    for gw in started:
        gw.stop()


def test_the_gateway_follows_the_active_broker(
    broker_factory: Callable[..., BrokerProcess],
    web: Callable[[object], GatewayProcess],
    tmp_path: Path,
) -> None:
    # Given brokers A (active) and B (not started) on one journal, and a gateway given both
    shared = tmp_path / "shared"
    a = broker_factory("--durability", "sync", data_dir=shared)
    b = broker_factory("--durability", "sync", data_dir=shared, start=False)
    both = SimpleNamespace(
        endpoint=f"{a.endpoint},{b.endpoint}",
        events_in=f"{a.events_in},{b.events_in}",
        events_out=f"{a.events_out},{b.events_out}",
    )
    gateway = web(both)
    http: Http = gateway.http()
    try:
        before = http.post("/api/v1/tasks", {"service": "jobs", "text": "one", "key": "k1"})
        assert before.status == 200, before.body
        # When A is killed and B takes over its journal
        a.kill()
        b.start()
        # Then the gateway answers through B: the task confirmed by A is there, its
        # key still names it, and new tasks are taken
        again = http.post("/api/v1/tasks", {"service": "jobs", "text": "one", "key": "k1"})
        assert again.status == 200, again.body
        assert again.json["id"] == before.json["id"]
        record = http.get(f"/api/v1/tasks/{before.json['id']}")
        assert record.status == 200 and record.json["state"] == "ready"
        after = http.post("/api/v1/tasks", {"service": "jobs", "text": "two"})
        assert after.status == 200, after.body
        (jobs,) = [q for q in http.get("/api/v1/queues").json if q["service"] == "jobs"]
        assert jobs["ready"] == 2
    finally:
        http.close()
