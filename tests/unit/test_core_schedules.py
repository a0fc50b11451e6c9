"""Recurring tasks in the core (docs/protocol.md §17): SCHEDULE, SCHEDULES, UNSCHEDULE,
and the firings, with time moved by hand.

Every test runs against the in-memory journal and the LMDB store. A restart is a new
core on the same committed journal (reopened, for LMDB), `now` moved on by the downtime.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.builds import pure_only
from tests.unit.core_script import EPOCH, CoreScript
from zbroker.core import Broker, CoreSettings
from zbroker.core.schedules import firing_key
from zbroker.journal import Durability, Journal, LmdbJournal, MemoryJournal
from zbroker.protocol import ext, limits, zbc
from zbroker.protocol.access import Policy, Principal

SETTINGS = CoreSettings(heartbeat_interval_s=1.0, retention_s=1000.0, seed=3)


class Stores:
    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.opened: list[Journal] = []

    def open(self) -> Journal:
        journal: Journal = (
            MemoryJournal()
            if self.kind == "memory"
            else LmdbJournal(self.root / "journal", Durability.ASYNC)
        )
        self.opened.append(journal)
        return journal

    def reopen(self, journal: Journal) -> Journal:
        """The same store after the process died: what was committed, nothing else."""
        if self.kind == "memory":
            return journal  # everything written is as committed
        journal.close()  # discards what was not committed, as a crash would
        return self.open()


@pytest.fixture(params=["memory", "lmdb"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    made = Stores(request.param, tmp_path)
    yield made
    for journal in made.opened:
        journal.close()


class Script(CoreScript):
    def __init__(self, journal: Journal, settings: CoreSettings = SETTINGS) -> None:
        super().__init__(settings, journal)
        self.journal = journal
        self.rid = 0
        self.broker.set_subscriptions(frozenset({"schedule.", "task.enqueued."}))

    def restart_after(self, downtime_s: float, journal: Journal) -> None:
        self.now += downtime_s
        self.journal = journal
        self.restart(journal)
        self.broker.set_subscriptions(frozenset({"schedule.", "task.enqueued."}))

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        self.broker.receive([peer, *frames], self.now)
        self.journal.commit()

    def advance(self, seconds: float) -> None:
        if self.broker.next_tick_at <= self.now:
            # Timers that fell due while the broker was down: the runtime's first pass
            # ticks at its own now, not back in time.
            self.broker.tick(self.now)
        super().advance(seconds)
        self.journal.commit()

    def call(self, frames: list[bytes]) -> zbc.Answer:
        self.send(b"C", frames)
        mine = [f for f in self.broker.outbox if f[0] == b"C"]
        self.broker.outbox = [f for f in self.broker.outbox if f[0] != b"C"]
        assert len(mine) == 1, mine
        return zbc.decode_answer(mine[0][1:])

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def schedule(self, name: str, service: str = "svc", payload: bytes = b"tick", **kw: Any) -> Any:
        options = zbc.TaskOptions(**kw.pop("options", {}))
        answer = self.call(zbc.schedule(self.next_rid(), name, service, [payload], options, **kw))
        assert answer.ok, answer.meta
        return answer.meta

    def listing(self) -> list[dict[str, Any]]:
        answer = self.call(zbc.call(zbc.SCHEDULES, self.next_rid()))
        assert answer.ok, answer.meta
        views: list[dict[str, Any]] = answer.meta["schedules"]
        return views

    def keys(self, service: str = "svc") -> list[str]:
        """The keys of the service's ready tasks, in enqueue order."""
        records = sorted(self.journal.ready(service, 10_000), key=lambda r: r.seq)
        return [str(r.key) for r in records]

    def events(self) -> list[tuple[str, Any]]:
        out = [(topic, item) for topic, _, items in self.broker.events for item in items]
        self.broker.events = []
        return out


def stamp(offset_s: float) -> str:
    """The key suffix of the instant EPOCH + offset_s."""
    return datetime.fromtimestamp(EPOCH + offset_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def key(name: str, offset_s: float) -> str:
    return f"schedule:{name}:{stamp(offset_s)}"


# ------------------------------------------------------------------ firing


def test_an_interval_fires_at_each_instant_a_task_keyed_by_its_instant(stores: Stores) -> None:
    s = Script(stores.open())
    meta = s.schedule("beat", every_s=10)
    assert meta["was"] == "new"
    view = meta["schedule"]
    assert (view["name"], view["service"], view["every_s"], view["cron"]) == (
        "beat",
        "svc",
        10,
        None,
    )
    assert (view["next_at"], view["fired"], view["last_at"]) == (EPOCH + 10, 0, None)
    # Nothing before the first instant
    s.advance(9.9)
    assert s.keys() == []
    # One task per instant, keyed by the instant it was due
    s.advance(25.1)
    assert s.keys() == [key("beat", 10), key("beat", 20), key("beat", 30)]
    (listed,) = s.listing()
    assert (listed["fired"], listed["last_at"], listed["next_at"]) == (3, EPOCH + 30, EPOCH + 40)
    assert listed["last_id"] == s.journal.find_key("svc", key("beat", 30))
    assert s.broker.stats.schedules_fired == 3


def test_a_firing_is_an_ordinary_task_with_the_schedules_options(stores: Stores) -> None:
    s = Script(stores.open())
    options = {"priority": 5, "max_attempts": 7, "timeout_s": 30.0, "headers": {"job": "x"}}
    s.schedule("opts", payload=b"body", every_s=5, options=options)
    s.advance(5)
    (record,) = s.journal.ready("svc", 10)
    assert (record.priority, record.max_attempts, record.timeout_s) == (5, 7, 30.0)
    assert record.headers == {"job": "x"} and record.key == key("opts", 5)
    assert s.journal.payload(record.id) == [b"body"]
    # STATUS shows where it came from: its key
    status = s.call(zbc.call(zbc.STATUS, s.next_rid(), id=record.id))
    assert status.meta["task"]["key"] == key("opts", 5)
    # And a worker gets it like any task
    s.send(b"W", ext.ready("svc", 1))
    delivered = [f for f in s.broker.outbox if f[0] == b"W" and f[3] == ext.TASK]
    assert len(delivered) == 1 and delivered[0][-1] == b"body"


def test_a_cron_schedule_fires_at_its_minutes(stores: Stores) -> None:
    # EPOCH is 2023-11-14 22:13:20 UTC: */5 fires at 22:15, 22:20, 22:25 ...
    s = Script(stores.open())
    view = s.schedule("five", cron="*/5 * * * *")["schedule"]
    assert view["next_at"] == EPOCH + 100 and view["cron"] == "*/5 * * * *"
    s.advance(100 + 600)
    assert s.keys() == [
        "schedule:five:2023-11-14T22:15:00Z",
        "schedule:five:2023-11-14T22:20:00Z",
        "schedule:five:2023-11-14T22:25:00Z",
    ]


def test_a_cron_schedule_in_a_time_zone(stores: Stores) -> None:
    # 23:15 in Paris (UTC+1 in November) is 22:15 UTC
    s = Script(stores.open())
    view = s.schedule("paris", cron="15 23 * * *", tz="Europe/Paris")["schedule"]
    assert view["tz"] == "Europe/Paris" and view["next_at"] == EPOCH + 100


def test_the_lifecycle_events_announce_added_fired_removed(stores: Stores) -> None:
    s = Script(stores.open())
    s.schedule("ev", every_s=10)
    ((topic, added),) = s.events()
    assert topic == "schedule.added.ev"
    assert added == {"name": "ev", "service": "svc", "next_at": EPOCH + 10, "replaced": False}
    s.advance(10)
    events = s.events()
    fired = [item for topic, item in events if topic == "schedule.fired.ev"]
    task_id = s.journal.find_key("svc", key("ev", 10))
    assert fired == [
        {"name": "ev", "service": "svc", "id": task_id, "due_at": EPOCH + 10, "late_s": 0.0}
    ]
    assert [topic for topic, _ in events] == ["task.enqueued.svc", "schedule.fired.ev"]
    s.call(zbc.call(zbc.UNSCHEDULE, s.next_rid(), name="ev"))
    assert s.events() == [("schedule.removed.ev", {"name": "ev", "service": "svc", "fired": 1})]


# ----------------------------------------------------- replace, list, remove


def test_a_name_added_again_replaces_the_schedule_and_the_same_one_changes_nothing(
    stores: Stores,
) -> None:
    s = Script(stores.open())
    s.schedule("r", every_s=10)
    s.advance(15)
    # The same definition again: a resend, nothing changes
    again = s.schedule("r", every_s=10)
    assert again["was"] == "unchanged" and again["schedule"]["fired"] == 1
    assert again["schedule"]["next_at"] == EPOCH + 20
    # Another definition: replaced, counted from now
    other = s.schedule("r", every_s=60, payload=b"new")
    assert other["was"] == "replaced"
    assert (other["schedule"]["every_s"], other["schedule"]["fired"]) == (60, 0)
    assert other["schedule"]["next_at"] == EPOCH + 15 + 60
    assert len(s.listing()) == 1
    s.advance(60)
    assert s.keys() == [key("r", 10), key("r", 75)]


def test_schedules_are_listed_by_name(stores: Stores) -> None:
    s = Script(stores.open())
    for name in ("b", "a", "c"):
        s.schedule(name, every_s=100)
    assert [v["name"] for v in s.listing()] == ["a", "b", "c"]
    assert set(s.listing()[0]) == {
        "name",
        "service",
        "every_s",
        "cron",
        "tz",
        "priority",
        "ttl_s",
        "max_attempts",
        "timeout_s",
        "headers",
        "payload_bytes",
        "created_at",
        "next_at",
        "last_at",
        "last_id",
        "fired",
        "error",
    }


def test_a_removed_schedule_fires_no_more_and_its_tasks_stay(stores: Stores) -> None:
    s = Script(stores.open())
    s.schedule("gone", every_s=10)
    s.advance(10)
    answer = s.call(zbc.call(zbc.UNSCHEDULE, s.next_rid(), name="gone"))
    assert answer.ok and answer.meta == {"rid": answer.rid, "name": "gone", "removed": True}
    s.advance(100)
    assert s.keys() == [key("gone", 10)]
    assert s.listing() == [] and s.journal.schedules() == {}
    again = s.call(zbc.call(zbc.UNSCHEDULE, s.next_rid(), name="gone"))
    assert (again.ok, again.code) == (False, "not_found")


# ------------------------------------------------------------- refusals


def test_a_refused_firing_is_counted_and_tried_again_without_moving_on(stores: Stores) -> None:
    # Given a service that holds at most one waiting task, and holds one
    s = Script(stores.open(), replace(SETTINGS, max_tasks_per_service=1))
    blocker = s.call(zbc.enqueue(s.next_rid(), "svc", [[b"block"]]))
    assert blocker.ok
    s.schedule("full", every_s=10)
    # When its instant comes, the enqueue is refused: counted, next_at stays, error shown
    s.advance(10)
    assert s.broker.stats.schedule_firings_refused == 1
    (view,) = s.listing()
    assert view["next_at"] == EPOCH + 10 and view["fired"] == 0
    assert view["error"].startswith("queue_full")
    # It is tried again at every tick
    s.advance(5)
    assert s.broker.stats.schedule_firings_refused > 1
    assert s.keys() == ["None"]  # only the blocker (no key)
    # Once there is room (past two more instants), it fires once, for the latest
    s.advance(20)
    assert s.keys() == ["None"]
    s.call(zbc.call(zbc.CANCEL, s.next_rid(), id=blocker.meta["ids"][0]))
    s.advance(0.5)
    assert s.keys() == [key("full", 30)]
    (view,) = s.listing()
    assert (view["fired"], view["error"], view["next_at"]) == (1, None, EPOCH + 40)


@pytest.mark.parametrize(
    ("meta", "says"),
    [
        ({"service": "svc", "every_s": 10}, "'name'"),
        ({"name": "n", "every_s": 10}, "'service'"),
        ({"name": "n", "service": "svc"}, "exactly one of"),
        ({"name": "n", "service": "svc", "every_s": 10, "cron": "* * * * *"}, "exactly one of"),
        ({"name": "n", "service": "svc", "every_s": 0}, "every_s"),
        ({"name": "n", "service": "svc", "every_s": 1.5}, "every_s"),
        ({"name": "n", "service": "svc", "every_s": "10"}, "every_s"),
        ({"name": "n", "service": "svc", "cron": "* * *"}, "5 fields"),
        ({"name": "n", "service": "svc", "cron": 5}, "'cron' must be a string"),
        ({"name": "n", "service": "svc", "cron": "* * * * *", "tz": "Nowhere/City"}, "time zone"),
        ({"name": "n", "service": "svc", "every_s": 10, "tz": "UTC"}, "'tz' goes with 'cron'"),
        ({"name": "n", "service": "svc", "every_s": 10, "key": "k"}, "take no 'key'"),
        ({"name": "n", "service": "svc", "every_s": 10, "delay_s": 1}, "take no 'delay_s'"),
        ({"name": "n", "service": "svc", "every_s": 10, "priority": 999}, "priority"),
        ({"name": "x" * 200, "service": "svc", "every_s": 10}, "'name' must be"),
        ({"name": "a\nb", "service": "svc", "every_s": 10}, "'name' must be"),
        ({"name": "n", "service": "mmi.service", "every_s": 10}, "reserved"),
    ],
)
def test_a_malformed_schedule_is_refused_with_bad_request(
    stores: Stores, meta: dict[str, Any], says: str
) -> None:
    s = Script(stores.open())
    frames = [b"", zbc.ZBC01, zbc.SCHEDULE, ext.pack_meta({"rid": 7, **meta}), b"p"]
    answer = s.call(frames)
    assert (answer.ok, answer.code) == (False, "bad_request")
    assert says in answer.message
    assert s.broker.stats.calls_refused == 1
    assert s.journal.schedules() == {}


def test_a_payload_over_the_cap_is_refused(stores: Stores) -> None:
    s = Script(stores.open())
    big = b"x" * (limits.MAX_SCHEDULE_PAYLOAD_BYTES + 1)
    answer = s.call(zbc.schedule(1, "big", "svc", [big], every_s=10))
    assert (answer.ok, answer.code) == (False, "bad_request") and "payload" in answer.message


@pure_only
def test_the_number_of_schedules_is_capped(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_SCHEDULES", 2)
    s = Script(stores.open())
    s.schedule("a", every_s=10)
    s.schedule("b", every_s=10)
    answer = s.call(zbc.schedule(s.next_rid(), "c", "svc", [b""], every_s=10))
    assert (answer.ok, answer.code) == (False, "queue_full")
    assert s.schedule("a", every_s=20)["was"] == "replaced"  # replacing is no new one


def test_a_broker_without_a_journal_keeps_no_schedules() -> None:
    s = CoreScript(SETTINGS)
    s.broker.receive([b"C", *zbc.schedule(1, "n", "svc", [b""], every_s=10)], s.now)
    (answer,) = [zbc.decode_answer(f[1:]) for f in s.sent()]
    assert (answer.ok, answer.code) == (False, "unavailable")


# -------------------------------------------------------------- restarts


def test_a_schedule_survives_a_restart_and_goes_on_where_it_was(stores: Stores) -> None:
    s = Script(stores.open())
    s.schedule("keep", every_s=10, options={"priority": 3, "headers": {"h": 1}})
    s.advance(25)
    s.restart_after(0.0, stores.reopen(s.journal))
    (view,) = s.listing()
    assert (view["fired"], view["next_at"], view["priority"], view["headers"]) == (
        2,
        EPOCH + 30,
        3,
        {"h": 1},
    )
    s.advance(10)
    assert s.keys() == [key("keep", 10), key("keep", 20), key("keep", 30)]


def test_instants_missed_while_the_broker_was_down_fire_once_for_the_latest(
    stores: Stores,
) -> None:
    # Given a schedule that fired at 10 and 20
    s = Script(stores.open())
    s.schedule("gap", every_s=10)
    s.advance(25)
    # When the broker is down from 25 to 97 (instants 30..90 missed) and starts again
    s.restart_after(72.0, stores.reopen(s.journal))
    s.advance(0.5)
    # Then one firing, for 90, and the next at 100
    assert s.keys() == [key("gap", 10), key("gap", 20), key("gap", 90)]
    fired = [e for t, e in s.events() if t == "schedule.fired.gap"]
    assert len(fired) == 1 and fired[0]["due_at"] == EPOCH + 90 and fired[0]["late_s"] == 7.0
    (view,) = s.listing()
    assert (view["fired"], view["last_at"], view["next_at"]) == (3, EPOCH + 90, EPOCH + 100)
    s.advance(10)
    assert s.keys()[-1] == key("gap", 100)


def test_a_cron_schedule_missed_for_days_fires_once(stores: Stores) -> None:
    s = Script(stores.open())
    s.schedule("daily", cron="@daily")
    s.restart_after(3 * 86400 + 3600, stores.reopen(s.journal))
    s.advance(1)
    assert s.keys() == ["schedule:daily:2023-11-17T00:00:00Z"]


def test_a_firing_not_committed_is_neither_kept_nor_lost(tmp_path: Path) -> None:
    """Both or neither: the task and the schedule's next_at go in one commit."""
    stores = Stores("lmdb", tmp_path)
    try:
        s = Script(stores.open())
        s.schedule("atomic", every_s=10)
        # The firing is decided (task and next_at written) but the broker dies before
        # the pass's commit
        s.now = 10.0
        s.broker.tick(s.now)
        assert s.journal.find_key("svc", key("atomic", 10)) is not None
        s.restart_after(0.0, stores.reopen(s.journal))
        assert s.keys() == [] and s.listing()[0]["next_at"] == EPOCH + 10
        # Started again, it fires that instant: once
        s.advance(0.5)
        s.advance(9)
        assert s.keys() == [key("atomic", 10)]
    finally:
        for journal in stores.opened:
            journal.close()


def test_a_schedule_the_journal_cannot_read_is_left_out(stores: Stores) -> None:
    journal = stores.open()
    journal.put_schedule("broken", {"service": "svc"})  # no rule, no next_at
    journal.commit()
    s = Script(journal)
    assert s.listing() == []


def test_the_firing_key_names_the_schedule_and_its_instant() -> None:
    assert firing_key("a:b", EPOCH) == "schedule:a:b:2023-11-14T22:13:20Z"


def test_on_an_authenticated_broker_only_admins_keep_schedules() -> None:
    policy = Policy(
        (
            Principal("alice", "A" * 40, frozenset({"client"}), services=("*",)),
            Principal("ops", "O" * 40, frozenset({"observer"})),
            Principal("root", "R" * 40, frozenset({"admin"})),
        )
    )
    journal = MemoryJournal()
    broker = Broker(SETTINGS, 0.0, journal, EPOCH, policy=policy)

    def answer(sender: str, frames: list[bytes]) -> zbc.Answer:
        peer = b"\x00" + sender[:4].encode().ljust(4, b"_")  # a routing id the ROUTER gives
        broker.receive_many([[peer, *frames]], 0.0, [sender])
        journal.commit()
        (out,) = [f for f in broker.outbox if f[0] == peer]
        broker.outbox = []
        return zbc.decode_answer(out[1:])

    add = zbc.schedule(1, "s", "svc", [b""], every_s=10)
    for who in ("alice", "ops"):
        for frames in (add, zbc.call(zbc.SCHEDULES, 2), zbc.call(zbc.UNSCHEDULE, 3, name="s")):
            refused = answer(who, frames)
            assert (refused.ok, refused.code) == (False, "forbidden")
    assert answer("root", add).ok and journal.schedules().keys() == {"s"}
    # Its firings are the broker's: no owner, counted against no principal
    broker.tick(10.0)
    (record,) = journal.ready("svc", 10)
    assert record.owner is None and record.key == key("s", 10)
