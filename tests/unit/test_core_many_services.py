"""Many service names (issue 17): timers by deadline, departed figures bounded, QUEUES paged.

The work is asserted as counted work (services the timers look at, rows an answer
holds), never as wall time.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.core_script import CoreScript
from zbroker.core import CoreSettings
from zbroker.core.settings import SettingError
from zbroker.journal import MemoryJournal
from zbroker.protocol import ext, limits, mdp, zbc

SETTINGS = CoreSettings(heartbeat_interval_s=1.0, request_expiry_s=10.0)


class Script(CoreScript):
    def __init__(self, settings: CoreSettings = SETTINGS) -> None:
        self.journal = MemoryJournal()
        super().__init__(settings, self.journal)
        self._rid = 0

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        self.broker.receive([peer, *frames], self.now)

    def request(self, service: bytes) -> None:
        self.send(b"C", [b"", mdp.MDPC01, service, b"x"])

    def call(self, frames: list[bytes]) -> zbc.Answer:
        self.sent()
        self.broker.receive([b"A", *frames], self.now)
        self.journal.commit()
        (answer,) = [zbc.decode_answer(m[1:]) for m in self.sent() if m[0] == b"A"]
        return answer

    def rid(self) -> int:
        self._rid += 1
        return self._rid

    def queues(self, **fields: Any) -> zbc.Answer:
        return self.call(zbc.call(zbc.QUEUES, self.rid(), **fields))

    def one_task_done(self, service: str) -> None:
        """A durable task of `service` enqueued and done; then its worker leaves."""
        assert self.call(zbc.enqueue(self.rid(), service, [[b"x"]])).ok
        self.send(b"W", ext.ready(service, 1))
        (task,) = [m for m in self.sent() if m[0] == b"W" and m[3] == ext.TASK]
        self.send(b"W", ext.done(ext.unpack_meta(task[4])["id"], 1, [b"ok"]))
        self.send(b"W", ext.disconnect())
        self.journal.commit()

    def visits_per_tick(self, seconds: float) -> list[tuple[int, int]]:
        """(services looked at, requests expired) by each tick over `seconds`."""
        out = []
        end = self.now + seconds
        directory, stats = self.broker.directory, self.broker.stats
        while self.broker.next_tick_at <= end:
            visits, expired = directory.visits, stats.expired
            self.now = self.broker.next_tick_at
            self.broker.tick(self.now)
            out.append((directory.visits - visits, stats.expired - expired))
        self.now = end
        return out


def test_a_tick_looks_only_at_due_work_whatever_the_number_of_services() -> None:
    # Given 100,000 MDP requests, each to its own service name, in ten waves 0.5 s apart
    s = Script()
    for wave in range(10):
        for i in range(10_000):
            s.request(b"svc-%d-%d" % (wave, i))
        s.advance(0.5)
    assert len(s.broker.services) == 100_000
    # When time passes with nothing due
    idle = s.visits_per_tick(0.9)
    # Then the ticks look at no service
    assert idle and all(visits == 0 for visits, _ in idle)
    # When the waves expire, one every 0.5 s
    ticks = s.visits_per_tick(SETTINGS.request_expiry_s + 1.0)
    # Then each tick looks only at the services whose request expired then
    assert sum(expired for _, expired in ticks) == 100_000
    assert all(visits == expired for visits, expired in ticks)
    assert max(visits for visits, _ in ticks) == 10_000
    # And every service is let go, the timers' heap emptied
    assert len(s.broker.services) == 0
    assert s.broker.requests.expiry_timers == 0
    assert s.visits_per_tick(5.0) and s.broker.directory.visits == 200_000


def test_a_service_whose_last_worker_leaves_is_let_go_at_the_next_tick() -> None:
    # Given a worker of a service nobody uses, among 1,000 idle services' names in flight
    s = Script()
    for i in range(1000):
        s.request(b"other-%d" % i)
    s.send(b"W", [b"", mdp.MDPW01, mdp.READY, b"lonely"])
    s.advance(1.0)
    assert b"lonely" in s.broker.services
    # When it disconnects
    s.send(b"W", [b"", mdp.MDPW01, mdp.DISCONNECT])
    ticks = s.visits_per_tick(1.0)
    # Then the next tick lets the service go, looking at that one service only
    assert b"lonely" not in s.broker.services
    assert ticks[0][0] == 1 and all(visits == 0 for visits, _ in ticks[1:])


def test_requests_requeued_to_the_front_still_expire_on_time() -> None:
    # Given a request taken by a worker that then dies, and a newer one behind it
    s = Script()
    s.request(b"svc")
    s.send(b"W", [b"", mdp.MDPW01, mdp.READY, b"svc"])
    s.advance(4.0)
    s.request(b"svc")
    s.send(b"W", [b"", mdp.MDPW01, mdp.DISCONNECT])  # the first goes back to the front
    # When the first one's expiry passes (10 s after it arrived)
    s.advance(6.5)
    # Then it expired, and the newer one waits until its own time
    assert s.broker.stats.expired == 1 and len(s.broker.services[b"svc"].queue) == 1
    s.advance(4.0)
    assert s.broker.stats.expired == 2 and b"svc" not in s.broker.services


def test_the_figures_of_departed_services_are_bounded_longest_gone_dropped_first() -> None:
    # Given a broker that keeps the figures of at most 3 departed services
    s = Script(CoreSettings(heartbeat_interval_s=1.0, max_departed_services=3))
    # When 5 services each run a task, then go idle, one after the other
    for i in range(5):
        s.one_task_done(f"gone-{i}")
        s.advance(1.0)
    # Then only the 3 that left last keep their figures; the others' totals are gone
    assert list(s.broker.directory.kept_figures) == [b"gone-2", b"gone-3", b"gone-4"]
    rows = {r["service"]: r for r in s.queues().meta["queues"]}
    assert all(rows[f"gone-{i}"]["done_total"] == 1 for i in (2, 3, 4))
    # (their done tasks are still retained in the journal, so they still have rows)
    assert rows["gone-0"]["done_total"] == 0 and rows["gone-0"]["done"] == 1
    # And a kept service that returns carries on from its totals
    s.one_task_done("gone-3")
    s.advance(1.0)
    (row,) = [r for r in s.queues().meta["queues"] if r["service"] == "gone-3"]
    assert row["done_total"] == 2
    assert list(s.broker.directory.kept_figures) == [b"gone-2", b"gone-4", b"gone-3"]


def test_max_departed_services_is_checked() -> None:
    with pytest.raises(SettingError, match="max_departed_services"):
        CoreSettings(max_departed_services=-1)


def test_rates_come_from_lazy_samples_and_fall_to_zero_after_a_quiet_minute() -> None:
    # Given a service that finished a task, then nothing for a while
    s = Script()
    s.one_task_done("svc")
    s.advance(10.0)
    (row,) = s.queues().meta["queues"]
    assert row["done_rate"] == pytest.approx(1 / 10, abs=1e-3)
    # When more than a minute passes with nothing done
    s.advance(70.0)
    (row,) = s.queues().meta["queues"]
    # Then its rates are 0, though no timer sampled it meanwhile
    assert row["done_rate"] == 0 and row["enqueue_rate"] == 0 and row["done_total"] == 1


def test_queues_pages_through_every_service_in_name_order() -> None:
    # Given 2,500 services with a queued request, and one with a stored task only
    s = Script()
    names = [f"svc-{i:05d}" for i in range(2500)]
    for name in names:
        s.request(name.encode())
    assert s.call(zbc.enqueue(s.rid(), "stored", [[b"x"]], zbc.TaskOptions(delay_s=60))).ok
    # When a caller pages through QUEUES 1,000 services at a time
    rows: list[dict[str, Any]] = []
    after = None
    pages = 0
    while True:
        answer = s.queues(limit=1000, after=after)
        assert answer.ok and len(answer.meta["queues"]) <= 1000
        rows += answer.meta["queues"]
        pages += 1
        after = answer.meta["next"]
        if after is None:
            break
    # Then it reads every service once, in order, in 3 pages
    assert [r["service"] for r in rows] == sorted([*names, "stored"])
    assert pages == 3
    # And a caller that gives no limit (an older client) gets the first default page
    first = s.queues().meta
    assert len(first["queues"]) == limits.DEFAULT_QUEUES_PAGE
    assert first["next"] == first["queues"][-1]["service"]


def test_queues_pages_keep_names_that_are_not_utf8_apart() -> None:
    # Given MDP services whose names are not UTF-8, beside their escaped look-alike
    s = Script()
    for name in (b"a", b"\xff", b"\\xff", b"z"):
        s.request(name)
    # When read one row per page
    seen = []
    after = None
    while True:
        meta = s.queues(limit=1, after=after).meta
        seen += [(r["service"], r["requests"]) for r in meta["queues"]]
        after = meta["next"]
        if after is None:
            break
    # Then every service is seen exactly once (the two that show alike on one page)
    assert sorted(seen) == [("\\xff", 1), ("\\xff", 1), ("a", 1), ("z", 1)]


@pytest.mark.parametrize(
    "fields",
    [{"limit": 0}, {"limit": limits.MAX_QUEUES_PAGE + 1}, {"limit": "5"}, {"after": 3}],
)
def test_queues_refuses_a_bad_page(fields: dict[str, Any]) -> None:
    s = Script()
    answer = s.queues(**fields)
    assert not answer.ok and answer.meta["code"] == zbc.E_BAD_REQUEST
