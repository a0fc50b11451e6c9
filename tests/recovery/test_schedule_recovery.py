"""A schedule fires the right number of times across a restart (issue 19's bar).

A real `zbroker start` process, SIGKILLed while a schedule fires every second, started
again after a gap. The firings are counted by their keys (`schedule:<name>:<instant>`):
each instant while the broker was up fired exactly once, and the whole downtime gap
fired once, for its latest instant.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from tests.conftest import BrokerProcess, wait_until
from zbroker.client import Client

pytestmark = pytest.mark.timeout(90)


def instants(client: Client, service: str, name: str) -> list[tuple[int, float]]:
    """(instant, enqueued at) of every firing of schedule `name`, by instant."""
    rows, _ = client.tasks(service, "ready", limit=1000)
    prefix = f"schedule:{name}:"
    found = []
    for row in rows:
        assert row["key"].startswith(prefix), row["key"]
        stamp = datetime.strptime(row["key"][len(prefix) :], "%Y-%m-%dT%H:%M:%SZ")
        found.append((int(stamp.replace(tzinfo=UTC).timestamp()), row["created_at"]))
    return sorted(found)


def consecutive(seconds: list[int]) -> bool:
    return seconds == list(range(seconds[0], seconds[0] + len(seconds)))


def test_kill_9_neither_skips_nor_doubles_a_firing_and_the_gap_fires_once(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    # Given a schedule firing every second (no worker: its tasks stay, to be counted)
    broker = broker_factory()
    with Client(broker.endpoint) as client:
        client.schedule("pulse", "beats", b"x", every_s=1)
        wait_until(lambda: len(instants(client, "beats", "pulse")) >= 4, timeout_s=15)
    # When the broker is SIGKILLed, and started again after a gap of seconds
    killed_at = time.time()
    broker.kill()
    time.sleep(3.5)
    restarting_at = time.time()
    broker.start()
    ready_at = time.time()
    with Client(broker.endpoint) as client:
        wait_until(
            lambda: sum(i > ready_at for i, _ in instants(client, "beats", "pulse")) >= 3,
            timeout_s=15,
        )
        fired = instants(client, "beats", "pulse")
        (schedule,) = client.schedules()
    seconds = [i for i, _ in fired]
    before = [i for i in seconds if i <= killed_at]
    after = [i for i in seconds if i > killed_at]
    # Then every instant while it was up fired once, in order, none missing, none twice
    assert len(set(seconds)) == len(seconds)
    assert len(before) >= 4 and consecutive(before)
    assert len(after) >= 3 and consecutive(after)
    # And the instants of the downtime fired once, for the latest before it came back
    catch_up = after[0]
    assert catch_up - before[-1] >= 3  # seconds whose instants were missed: skipped
    assert restarting_at - 1 <= catch_up <= ready_at
    # And no firing came before its instant; the broker's count agrees with the keys
    assert all(enqueued >= instant for instant, enqueued in fired)
    assert schedule.fired >= len(seconds)  # (it may have fired once more since)
    assert schedule.last_at is not None and schedule.last_at >= seconds[-1]


def test_a_schedule_added_just_before_a_kill_is_kept(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    # Given a schedule whose answer the client received
    broker = broker_factory()
    with Client(broker.endpoint) as client:
        info = client.schedule("kept", "later", b"", cron="0 0 1 1 *", tz="Europe/Paris")
    # When the broker is killed at once and started again
    broker.kill()
    broker.start()
    # Then it is still there, unchanged
    with Client(broker.endpoint) as client:
        assert client.schedules() == [info]
