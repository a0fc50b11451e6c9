"""The console at `/`, in headless Chromium, against a real broker and `zbroker web`.

Every figure is checked against the command line (`zbroker queues --json`), every
action by its effect on the broker, and no request may leave loopback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import ROOT, BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from tests.web.browser import (
    Console,
    always_fails,
    cells,
    cli_json,
    gated_stream,
    open_console,
    publish_until_shown,
    queue_row,
)
from tests.web.gateway import GatewayProcess
from zbroker.client import Publisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

STATIC = ROOT / "zbroker" / "web" / "static"

COUNTS = ["ready", "delayed", "blocked", "inflight", "dead", "done", "requests", "workers"]


@pytest.fixture
def console(gateway: GatewayProcess, tmp_path: Path) -> Iterator[Console]:
    with open_console(gateway, tmp_path / "chromium-profile") as page:
        yield page


def test_queue_view_shows_the_depth_the_cli_shows(
    broker: BrokerProcess, console: Console, stack: ExitStack
) -> None:
    # Given seven tasks waiting in a queue nobody serves
    client = open_client(stack, broker)
    for i in range(7):
        client.enqueue("depth", f"task {i}".encode())

    # When the console shows the queues
    console.open("queues")
    console.wait_text('tr[data-service="depth"] td[data-field=ready]', "7")

    # Then every count it shows is the one `zbroker queues --json` prints
    shown = cells(console, "depth", COUNTS)
    row = queue_row(broker, "depth")
    assert shown == {field: str(row[field]) for field in COUNTS}
    assert row["ready"] == 7


def test_a_click_on_pause_pauses_the_queue(
    broker: BrokerProcess, console: Console, stack: ExitStack
) -> None:
    # Given a queue with a task in it
    open_client(stack, broker).enqueue("pausable", b"x")
    console.open("queues")
    row = 'tr[data-service="pausable"]'
    console.page.wait_for_selector(f"{row} button[data-action=pause]")
    assert queue_row(broker, "pausable")["paused"] is False

    # When the operator clicks Pause
    console.page.click(f"{row} button[data-action=pause]")

    # Then the broker has paused it (as the command line says) and the console shows it
    wait_until(lambda: queue_row(broker, "pausable")["paused"] is True, timeout_s=15)
    console.page.wait_for_selector(f"{row} [data-field=paused]")

    # And Resume undoes it
    console.page.click(f"{row} button[data-action=resume]")
    wait_until(lambda: queue_row(broker, "pausable")["paused"] is False, timeout_s=15)


def test_a_tasks_stream_appears_while_it_runs(
    broker: BrokerProcess, console: Console, stack: ExitStack
) -> None:
    # Given a worker that sends one chunk, then waits for the test before the next
    task_id, may_finish = gated_stream(stack, broker, b"first words ", b"last words")

    # When the task's page is open while it runs
    console.open(f"task?id={task_id}")
    stream = "[data-field=stream]"

    # Then the first chunk shows before the second is even sent
    console.wait_text(stream, "first words")
    assert queue_row(broker, "talk")["inflight"] == 1
    # And the record shows the task's payload as text, with its size
    console.wait_text("[data-field=payload][data-kind=text] pre", "go")
    assert console.text("[data-field=payload] .note") == "1 frame(s), 2 bytes"

    # And the second arrives live, then the result
    may_finish.set()
    console.wait_text(stream, "first words last words")
    console.wait_text("[data-field=result]", "done")
    console.wait_text(".taskhead [data-field=state]", "done")


def test_the_event_tail_shows_a_published_event(
    broker: BrokerProcess, console: Console, stack: ExitStack
) -> None:
    # Given the event tail following the topic prefix "demo."
    console.open("events?topic=demo.")
    console.page.wait_for_selector("[data-field=tail-state][data-state=open]")
    publisher = stack.enter_context(Publisher(broker.events_in, source="test"))

    # When an event of that topic is published
    seen = publish_until_shown(console, publisher, "demo.hello", {"greeting": "hi there"})

    # Then the tail shows it with its source and payload
    assert '"greeting":"hi there"' in seen.first.inner_text()
    assert seen.first.locator(".source").inner_text() == "test"

    # And an event of another topic, published before a last one of "demo.", is not shown
    publisher.publish("other.topic", {"n": 0})
    publisher.publish("demo.last", {"n": 1})
    console.page.wait_for_selector('li.event[data-topic="demo.last"]')
    assert console.page.locator('li.event[data-topic="other.topic"]').count() == 0

    # When the page's own form publishes one (POST /api/v1/events), the tail shows it too
    console.page.fill("form.publish input.topic", "demo.form")
    console.page.fill("form.publish input.payload", '{"from": "the page"}')
    mine = console.page.locator('li.event[data-topic="demo.form"]')
    console.page.click("form.publish button")
    # Once is enough: the gateway's publish waits for the bus's subscription to it
    mine.first.wait_for()
    assert '"from":"the page"' in mine.first.inner_text()
    assert console.text("[data-field=published]").startswith("published demo.form at")


def test_dead_letters_are_redriven_and_dropped_over_a_selection(
    broker: BrokerProcess, console: Console, stack: ExitStack
) -> None:
    # Given three dead letters (a worker that fails every task, then stops)
    with ExitStack() as failing:
        start_worker(failing, broker, "fragile", always_fails)
        client = open_client(stack, broker)
        ids = [client.enqueue("fragile", b"x", max_attempts=1) for _ in range(3)]
        wait_until(lambda: queue_row(broker, "fragile")["dead"] == 3, timeout_s=15)
    console.open("dead?service=fragile")
    for task_id in ids:
        console.page.wait_for_selector(f'tr[data-task="{task_id}"]')

    # When two are selected and redriven
    for task_id in ids[:2]:
        console.page.check(f'input[data-id="{task_id}"]')
    console.wait_text(".selection .count", "2 selected")
    console.page.click("button[data-action=redrive]")

    # Then those two are queued again and one dead letter is left (says the CLI)
    wait_until(lambda: queue_row(broker, "fragile")["dead"] == 1, timeout_s=15)
    assert queue_row(broker, "fragile")["ready"] == 2
    dead = cli_json(broker, "dlq", "list", "fragile")
    assert [letter["id"] for letter in dead] == [ids[2]]

    # When the last one is selected and dropped (after the confirmation)
    console.page.wait_for_selector(f'tr[data-task="{ids[0]}"]', state="detached")
    console.page.check(f'input[data-id="{ids[2]}"]')
    console.page.click("button[data-action=drop]")

    # Then no dead letter is left
    wait_until(lambda: queue_row(broker, "fragile")["dead"] == 0, timeout_s=15)
    assert console.dialogs and "Drop 1 dead letter" in console.dialogs[-1]
    console.page.wait_for_selector(f'tr[data-task="{ids[2]}"]', state="detached")


def test_errors_are_shown_readably(
    broker: BrokerProcess, console: Console, stack: ExitStack
) -> None:
    # When the console asks for a task the broker does not have
    console.open("task?id=t1-0000000000000000")

    # Then the API's error shows: what was being done, its code, status and message
    error = console.page.locator(".error[data-code=not_found]")
    error.wait_for(timeout=15_000)
    text = error.inner_text()
    assert "Reading the task" in text and "not_found" in text and "HTTP 404" in text
    assert error.locator(".message").inner_text().strip()

    # When a limit the API refuses is set on a queue
    open_client(stack, broker).enqueue("limited", b"x")
    console.open("queues")
    row = 'tr[data-service="limited"]'
    console.page.fill(f"{row} input.limit", "0")
    console.page.click(f"{row} button[data-action=limit]")

    # Then the refusal says why, and the queue keeps no limit
    refused = console.page.locator(".error[data-code=bad_request]")
    refused.wait_for(timeout=15_000)
    assert "Setting the limit of limited" in refused.inner_text()
    assert "positive integer" in refused.locator(".message").inner_text()
    assert queue_row(broker, "limited")["limit"] is None


def test_no_request_leaves_loopback(
    broker: BrokerProcess, console: Console, stack: ExitStack
) -> None:
    # Given a queue, so that every view has something to draw
    open_client(stack, broker).enqueue("visited", b"x")

    # When every view is opened in turn
    for view in ["queues", "workers", "tasks?service=visited", "dead?service=visited"]:
        console.open(view)
        console.page.wait_for_selector("main table tbody tr")
    for view in ["events", "graph?service=visited"]:
        console.open(view)

    # Then the page fetched only from the gateway (checked again at teardown)
    assert console.requests and console.foreign_requests() == []


OPERATOR = "operator-token-0123456789"
WATCHER = "watcher-token-0123456789"


def test_with_tokens_the_console_asks_for_one_and_keeps_it_for_the_tab(
    broker: BrokerProcess,
    gateway_factory: Callable[..., GatewayProcess],
    tmp_path: Path,
    stack: ExitStack,
) -> None:
    # Given a gateway that wants bearer tokens: an administrator's and an observer's
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nprincipal = "ops"\ntoken = "{OPERATOR}"\nroles = ["admin"]\n\n'
        f'[[token]]\nprincipal = "dash"\ntoken = "{WATCHER}"\nroles = ["observer"]\n'
    )
    gateway = gateway_factory(broker, "--tokens", str(tokens))
    open_client(stack, broker).enqueue("guarded", b"x")
    console = stack.enter_context(open_console(gateway, tmp_path / "chromium-profile"))

    # When the console opens without a token
    console.open("queues", state="unauthorized")

    # Then it says a token is wanted, and why
    error = console.page.locator(".error[data-code=unauthorized]").first
    error.wait_for(timeout=15_000)
    assert "HTTP 401" in error.inner_text()

    # When the observer's token is given, the queues show; a pause is refused readably
    console.page.fill("#token", WATCHER)
    console.page.click("#token-form button:not([type])")
    console.wait_text('tr[data-service="guarded"] td[data-field=ready]', "1")
    console.page.click('tr[data-service="guarded"] button[data-action=pause]')
    forbidden = console.page.locator(".error[data-code=forbidden]").first
    forbidden.wait_for(timeout=15_000)
    assert "Pausing guarded" in forbidden.inner_text()
    assert queue_row(broker, "guarded")["paused"] is False

    # When the operator's token replaces it, the same click pauses the queue
    console.page.fill("#token", OPERATOR)
    console.page.click("#token-form button:not([type])")
    console.page.click('tr[data-service="guarded"] button[data-action=pause]')
    wait_until(lambda: queue_row(broker, "guarded")["paused"] is True, timeout_s=15)

    # And the token lives in this tab's sessionStorage only, across a reload
    stored = "() => [sessionStorage.getItem('zbroker.token'), localStorage.length]"
    assert console.page.evaluate(stored) == [OPERATOR, 0]
    console.open("queues")


# How the console writes a figure the API gives as null (an en dash).
NONE_SHOWN = "\N{EN DASH}"
FIGURES = [
    *COUNTS,
    "credit_in_use",
    "enqueue_rate",
    "done_rate",
    "fail_rate",
    "oldest_age_s",
    "wait_s_p95",
    "run_s_p95",
    "limit",
]


def test_every_figure_is_the_cli_document_as_it_is(
    broker: BrokerProcess, console: Console, stack: ExitStack
) -> None:
    # Given a broker that has run some tasks, so that its rates and times are not zero
    start_worker(stack, broker, "busy", lambda task: task.payload)
    client = open_client(stack, broker)
    ids = [client.enqueue("busy", b"x") for _ in range(20)]
    client.enqueue("idle", b"waiting")
    client.result(ids[-1], timeout_s=15)
    document = cli_json(broker, "queues")

    # When the page is handed exactly what `zbroker queues --json` printed (the same moment)
    console.page.route("**/api/v1/queues", lambda route: route.fulfill(json=document))
    console.open("queues")

    # Then every figure it shows is that document's, unrounded and underived
    for row in document:
        selector = f'tr[data-service="{row["service"]}"]'
        console.page.wait_for_selector(selector)
        for field in FIGURES:
            text = console.text(f"{selector} [data-field={field}]")
            if row[field] is None:
                assert text == NONE_SHOWN, (row["service"], field, text)
            else:
                assert float(text) == row[field], (row["service"], field, text)
    busy = next(row for row in document if row["service"] == "busy")
    assert busy["done"] == 20 and busy["done_rate"] > 0 and busy["run_s_p95"] is not None


def test_the_console_files_name_no_other_host() -> None:
    # Given every file the console is made of
    files = [path for path in STATIC.rglob("*") if path.is_file()]
    assert {path.suffix for path in files} == {".html", ".css", ".js"}

    # Then none refers to anything beyond its own origin (the SVG namespace is a name,
    # never fetched), and none imports a module but by a relative path
    for path in files:
        text = path.read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path, urls)
        assert "@import" not in text, path
        assert not re.findall(r"url\(\s*['\"]?(?!#)", text), path  # url(#id): same document
        imports = re.findall(r"^import .* from \"([^\"]+)\";$", text, re.MULTILINE)
        assert all(name.startswith(".") for name in imports), (path, imports)
