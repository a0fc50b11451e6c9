"""Fixtures of the gateway's tests: a real broker and a real `zbroker web` beside it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, new_broker
from tests.web.gateway import GatewayProcess, Http


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways (`zbroker web` with extra args) beside a broker; all stopped at teardown."""
    started: list[GatewayProcess] = []

    def make(
        broker: BrokerProcess, *extra: str, root_args: tuple[str, ...] = (), start: bool = True
    ) -> GatewayProcess:
        gw = GatewayProcess(
            broker, tmp_path / f"web{len(started)}.log", list(extra), list(root_args)
        )
        started.append(gw)
        if start:
            gw.start()
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(
    broker: BrokerProcess, gateway_factory: Callable[..., GatewayProcess]
) -> GatewayProcess:
    """A gateway without tokens beside the `broker` fixture."""
    return gateway_factory(broker)


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[Http]:
    client = gateway.http()
    yield client
    client.close()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One broker and gateway for a whole module of tests that leave no trace."""
    directory = tmp_path_factory.mktemp("shared")
    broker = new_broker(directory, 0)
    broker.start()
    gateway = GatewayProcess(broker, directory / "web.log")
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()
        broker.stop()


@pytest.fixture
def shared_http(shared_gateway: GatewayProcess) -> Iterator[Http]:
    client = shared_gateway.http()
    yield client
    client.close()
