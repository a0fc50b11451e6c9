"""What a `sync` broker flushes (docs/performance.md, "Why zbroker `sync` flushes
once per commit under load, twice alone"): a commit flushes its pages; its meta
page is flushed by the next commit or, when nothing follows, by a flush of its
own before the confirm goes out."""

from __future__ import annotations

from contextlib import ExitStack

from tests.conftest import BrokerProcess
from tests.integration.running import open_client

ENQUEUES = 20


def test_a_lone_confirm_waits_for_its_commit_and_its_meta_page_to_be_flushed(
    broker: BrokerProcess, stack: ExitStack
) -> None:
    # Given a sync broker and one client
    client = open_client(stack, broker)
    before = client.broker_stats()["journal"]
    assert before["durability"] == "sync"
    # When it enqueues one task at a time, each confirmed before the next is sent
    for n in range(ENQUEUES):
        client.enqueue("flush", b"%d" % n)
    after = client.broker_stats()["journal"]
    # Then every enqueue was a commit, and none was confirmed before two flushes:
    # its pages, then its meta page (nothing came after it to carry that page)
    commits = after["commits"] - before["commits"]
    flushes = after["flushes"] - before["flushes"]
    assert commits >= ENQUEUES
    assert flushes >= 2 * ENQUEUES
    assert flushes <= 2 * commits
