"""Recurring tasks against a real broker: the client calls, the CLI, the events, a worker
running the firings."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest

from tests.conftest import ROOT, BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from tests.integration.test_lifecycle_events import collect, subscribe
from zbroker import Task
from zbroker.client import BadRequest, ScheduleInfo

pytestmark = pytest.mark.timeout(60)


def zbroker(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zbroker", *args, "--endpoint", broker.endpoint],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_a_schedule_fires_every_second_to_a_worker(broker: BrokerProcess, stack: ExitStack) -> None:
    # Given a worker and a schedule firing every second
    runs: list[tuple[str, bytes, dict[str, object]]] = []

    def handler(task: Task) -> bytes:
        runs.append((task.id, task.payload, dict(task.headers)))
        return b"ok"

    start_worker(stack, broker, "beat", handler)
    client = open_client(stack, broker)
    info = client.schedule("pulse", "beat", b"tick", every_s=1, headers={"from": "test"})
    assert isinstance(info, ScheduleInfo)
    assert (info.name, info.service, info.every_s, info.fired, info.rule) == (
        "pulse",
        "beat",
        1,
        0,
        "every 1s",
    )
    assert info.next_at > time.time() - 1
    # Then the worker runs its firings, one per second
    wait_until(lambda: len(runs) >= 3, timeout_s=10)
    assert all(payload == b"tick" and headers == {"from": "test"} for _, payload, headers in runs)
    # And each is a task whose key names the schedule and its instant
    status = client.status(runs[0][0])
    assert status.key is not None and status.key.startswith("schedule:pulse:")
    (listed,) = client.schedules()
    assert listed.fired >= 3 and listed.last_id is not None and listed.last_at is not None
    assert listed.next_at == listed.last_at + 1
    # When it is removed, it fires no more
    assert client.unschedule("pulse") is True
    settled = len(runs)
    time.sleep(1.5)  # a firing would have come by now
    assert len(runs) <= settled + 1  # one may have been on its way to the worker
    assert client.schedules() == []
    assert client.unschedule("pulse") is False


def test_bad_rules_are_refused_before_and_by_the_broker(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    with pytest.raises(ValueError, match="5 fields"):
        client.schedule("c", "svc", cron="* * *")
    with pytest.raises(ValueError, match="exactly one"):
        client.schedule("c", "svc")
    with pytest.raises(ValueError, match="time zone"):
        client.schedule("c", "svc", cron="0 * * * *", tz="Atlantis/Capital")
    # The broker's own check, for a client that did not look (mmi.* is reserved)
    with pytest.raises(BadRequest, match="reserved"):
        client.schedule("c", "mmi.service", every_s=5)
    assert client.schedules() == []


def test_a_cron_schedule_with_a_time_zone_is_listed(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    info = client.schedule("report", "reports", b"{}", cron="0 6 * * mon-fri", tz="Europe/Paris")
    assert (info.cron, info.tz, info.every_s) == ("0 6 * * mon-fri", "Europe/Paris", None)
    assert info.rule == "cron 0 6 * * mon-fri (Europe/Paris)"
    # 06:00 in Paris is 04:00 or 05:00 UTC, on a weekday
    assert time.gmtime(info.next_at).tm_hour in (4, 5) and time.gmtime(info.next_at).tm_wday < 5
    # The same again changes nothing; another definition replaces it
    assert (
        client.schedule("report", "reports", b"{}", cron="0 6 * * mon-fri", tz="Europe/Paris")
        == info
    )
    replaced = client.schedule("report", "reports", b"{}", cron="0 7 * * *")
    assert (replaced.cron, replaced.tz) == ("0 7 * * *", None)


def test_lifecycle_events_announce_a_schedule(broker: BrokerProcess, stack: ExitStack) -> None:
    sub = subscribe(stack, broker, "schedule.")
    client = open_client(stack, broker)
    client.schedule("ev", "quiet", every_s=1)
    added = collect(sub, "schedule.added.ev")[-1]
    assert added.source == "zbroker" and added.payload["service"] == "quiet"
    fired = collect(sub, "schedule.fired.ev")[-1]
    assert fired.payload["due_at"] == added.payload["next_at"]
    assert client.status(fired.payload["id"]).key is not None
    client.unschedule("ev")
    removed = collect(sub, "schedule.removed.ev")[-1]
    assert removed.payload["name"] == "ev" and removed.payload["fired"] >= 1


def test_the_cli_adds_lists_and_removes_schedules(broker: BrokerProcess) -> None:
    added = zbroker(
        broker, "schedule", "add", "nightly", "backup", "--cron", "0 3 * * *", "--data", "full",
        "--priority", "3",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("nightly: cron 0 3 * * * to backup, next at ")
    every = zbroker(broker, "schedule", "add", "often", "poll", "--every", "1h30m")
    assert every.returncode == 0, every.stderr
    assert "every 1h30m to poll" in every.stdout
    # The table
    table = zbroker(broker, "schedule", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:6] == ["name", "service", "rule", "next", "last", "fired"]
    assert lines[1].startswith("nightly") and "cron 0 3 * * *" in lines[1]
    assert lines[2].startswith("often") and "every 1h30m" in lines[2]
    # JSON, for scripts
    listed = json.loads(zbroker(broker, "schedule", "list", "--json").stdout)
    assert [(s["name"], s["every_s"], s["cron"], s["priority"]) for s in listed] == [
        ("nightly", None, "0 3 * * *", 3),
        ("often", 5400, None, 0),
    ]
    assert listed[0]["payload_bytes"] == 4
    # Removed, then gone
    removed = zbroker(broker, "schedule", "remove", "often")
    assert removed.returncode == 0 and "often removed" in removed.stdout
    again = zbroker(broker, "schedule", "remove", "often")
    assert again.returncode == 1 and "no schedule 'often'" in again.stderr
    left = json.loads(zbroker(broker, "schedule", "list", "--json").stdout)
    assert [s["name"] for s in left] == ["nightly"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--every", "soon"], "not a duration"),
        (["--every", "0s"], "every_s"),
        (["--cron", "61 * * * *"], "out of 0..59"),
        (["--cron", "0 * * * *", "--tz", "Moon/Base"], "time zone"),
        ([], "exactly one of --every and --cron"),
        (["--every", "5m", "--cron", "* * * * *"], "exactly one of --every and --cron"),
        (["--every", "5m", "--tz", "Europe/Paris"], "tz goes with cron"),
    ],
)
def test_the_cli_refuses_a_bad_rule_clearly(
    broker: BrokerProcess, args: list[str], says: str
) -> None:
    done = zbroker(broker, "schedule", "add", "bad", "svc", *args)
    assert done.returncode == 2, done.stdout
    assert says in done.stderr and "Traceback" not in done.stderr


def test_status_and_top_show_the_schedules(broker: BrokerProcess, stack: ExitStack) -> None:
    client = open_client(stack, broker)
    assert client.broker_stats()["schedules"] == {"count": 0, "next_at": None}
    info = client.schedule("later", "svc", every_s=3600)
    client.schedule("sooner", "svc", every_s=600)
    figures = client.broker_stats()
    assert figures["schedules"]["count"] == 2
    assert figures["schedules"]["next_at"] == pytest.approx(info.created_at + 600, abs=2)
    assert figures["stats"]["schedules_fired"] == 0
    frame = zbroker(broker, "top", "--once")
    assert frame.returncode == 0, frame.stderr
    assert "schedules 2: next firing at" in frame.stdout and "0 fired" in frame.stdout
