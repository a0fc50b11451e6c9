"""More of the console in headless Chromium: workers and drain, cancelling a selection
of tasks, the dependency graph (a real broker and `zbroker web`, as test_console.py)."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from tests.web.browser import (
    Console,
    always_fails,
    cli_json,
    gated_stream,
    open_console,
    publish_until_shown,
)
from tests.web.gateway import GatewayProcess
from zbroker.client import Publisher, Task

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def console_on(stack: ExitStack, gateway: GatewayProcess, tmp_path: Path) -> Console:
    return stack.enter_context(open_console(gateway, tmp_path / "chromium-profile"))


def test_workers_show_what_the_cli_shows_and_drain(
    broker: BrokerProcess, gateway: GatewayProcess, tmp_path: Path, stack: ExitStack
) -> None:
    # Given a tagged worker holding one task and reporting metrics
    release = threading.Event()

    def hold(task: Task) -> bytes:
        release.wait(30)
        return b"ok"

    start_worker(
        stack, broker, "gpu", hold, concurrency=2, tags=["cuda"], metrics=lambda: {"vram": 7}
    )
    stack.callback(release.set)
    task_id = open_client(stack, broker).enqueue("gpu", b"x")
    wait_until(lambda: cli_json(broker, "workers")[0]["tasks"] == [task_id], timeout_s=15)
    (row,) = cli_json(broker, "workers")
    console = console_on(stack, gateway, tmp_path)

    # When the workers view is open
    console.open("workers")
    tr = f'tr[data-worker="{row["worker"]}"]'

    # Then it shows the worker as the command line does
    console.wait_text(f"{tr} [data-field=metrics]", "vram=7")
    for field in ["service", "dialect", "credit", "state"]:
        assert console.text(f"{tr} [data-field={field}]") == str(row[field])
    assert console.text(f"{tr} [data-field=tasks]") == task_id
    assert console.text(f"{tr} [data-field=tags]") == "cuda"

    # When Drain is clicked, the broker drains it
    console.page.click(f"{tr} button[data-action=drain]")
    wait_until(lambda: cli_json(broker, "workers")[0]["state"] == "draining", timeout_s=15)
    console.wait_text(f"{tr} [data-field=state]", "draining")


def test_a_selection_of_tasks_is_cancelled(
    broker: BrokerProcess, gateway: GatewayProcess, tmp_path: Path, stack: ExitStack
) -> None:
    # Given four waiting tasks
    client = open_client(stack, broker)
    ids = [client.enqueue("backlog", f"{i}".encode()) for i in range(4)]
    console = console_on(stack, gateway, tmp_path)
    console.open("tasks?service=backlog&state=ready")
    for task_id in ids:
        console.page.wait_for_selector(f'tr[data-task="{task_id}"]')

    # When two are selected and cancelled
    for task_id in ids[1:3]:
        console.page.check(f'input[data-id="{task_id}"]')
    console.page.click("button[data-action=cancel]")

    # Then those two are cancelled and the others still wait
    wait_until(lambda: client.status(ids[2]).state == "cancelled", timeout_s=15)
    assert [client.status(i).state for i in ids] == ["ready", "cancelled", "cancelled", "ready"]
    console.page.wait_for_selector(f'tr[data-task="{ids[1]}"]', state="detached")
    assert console.page.locator("tr[data-task]").count() == 2

    # And "select all" selects the two left, each box checked
    console.page.check("input[data-all]")
    console.wait_text(".selection .count", "2 selected")
    for task_id in (ids[0], ids[3]):
        assert console.page.is_checked(f'input[data-id="{task_id}"]')


def test_the_graph_draws_a_chain_and_a_fan_in(
    broker: BrokerProcess, gateway: GatewayProcess, tmp_path: Path, stack: ExitStack
) -> None:
    # Given a fan-in whose parts nobody serves yet, so that the join waits on three
    client = open_client(stack, broker)
    ids = client.fan_in([("part", b"a"), ("part", b"b"), ("part", b"c")], ("join", None))
    join = ids[-1]
    console = console_on(stack, gateway, tmp_path)

    # When the graph around the joining task is drawn
    console.open(f"graph?id={join}")
    console.page.wait_for_selector(f'a.node[data-task="{join}"].state-blocked')

    # Then each task is a box, and an arrow goes from each part to the join
    for task_id in ids:
        console.page.wait_for_selector(f'a.node[data-task="{task_id}"]')
    assert console.page.locator("svg.dag path.edge").count() == 3
    assert "waits on 3" in (
        console.page.locator(f'a.node[data-task="{join}"]').text_content() or ""
    )

    # When the parts are done, the join is no longer blocked
    start_worker(stack, broker, "part", lambda task: task.payload)
    wait_until(lambda: client.status(join).state == "ready", timeout_s=15)
    console.page.wait_for_selector(f'a.node[data-task="{join}"].state-ready', timeout=15_000)


def test_the_header_shows_when_the_gateway_is_gone_and_back(
    broker: BrokerProcess, gateway: GatewayProcess, tmp_path: Path, stack: ExitStack
) -> None:
    # Given the console showing the queues
    console = console_on(stack, gateway, tmp_path)
    console.open("queues")

    # When the gateway stops, the header says so and the failure is shown once
    gateway.stop()
    console.page.wait_for_selector("#connection[data-state=offline]", timeout=15_000)
    failed = console.page.locator(".error[data-code=unreachable]", has_text="Reading the queues")
    failed.first.wait_for()

    # When it is back on the same address, the console reconnects by itself
    gateway.start()
    console.page.wait_for_selector("#connection[data-state=connected]", timeout=15_000)
    assert failed.count() == 1  # once per failure run, not once a second


def test_a_stream_resumes_where_it_was_after_the_gateway_restarts(
    broker: BrokerProcess, gateway: GatewayProcess, tmp_path: Path, stack: ExitStack
) -> None:
    # Given a task whose first chunk the console shows while it runs
    task_id, may_finish = gated_stream(stack, broker, b"before ", b"after")
    console = console_on(stack, gateway, tmp_path)
    console.open(f"task?id={task_id}")
    console.wait_text("[data-field=stream]", "before")

    # When the gateway restarts in the middle of the stream, and the task goes on
    gateway.stop()
    console.page.wait_for_selector("[data-field=stream-state]:has-text('interrupted')")
    gateway.start()
    may_finish.set()

    # Then the rest arrives once, after what was shown: nothing repeated, nothing lost
    console.wait_text("[data-field=stream]", "before after", timeout_s=20)
    console.wait_text("[data-field=result]", "done")
    assert console.page.locator("span.chunk").count() == 2


def test_the_event_tail_follows_again_after_the_gateway_restarts(
    broker: BrokerProcess, gateway: GatewayProcess, tmp_path: Path, stack: ExitStack
) -> None:
    # Given the tail following "again."
    console = console_on(stack, gateway, tmp_path)
    console.open("events?topic=again.")
    console.page.wait_for_selector("[data-field=tail-state][data-state=open]")

    # When the gateway restarts
    gateway.stop()
    console.page.wait_for_selector("[data-field=tail-state]:not([data-state=open])")
    gateway.start()

    # Then the tail follows again by itself and shows what is published next
    publisher = stack.enter_context(Publisher(broker.events_in, source="test"))
    publish_until_shown(console, publisher, "again.hello", "back")
    assert console.page.locator("[data-field=tail-state]").get_attribute("data-state") == "open"


def test_a_dead_task_is_redriven_from_its_page(
    broker: BrokerProcess, gateway: GatewayProcess, tmp_path: Path, stack: ExitStack
) -> None:
    # Given a dead letter (its only attempt failed) and no worker left
    with ExitStack() as failing:
        start_worker(failing, broker, "once", always_fails)
        task_id = open_client(stack, broker).enqueue("once", b"\xff\x00x", max_attempts=1)
        wait_until(lambda: cli_json(broker, "task", task_id)["state"] == "dead", timeout_s=15)
    console = console_on(stack, gateway, tmp_path)
    console.open(f"task?id={task_id}")
    console.wait_text(".taskhead [data-field=state]", "dead")
    assert "always fails" in console.text("tr[data-field=error] td")
    # And its binary payload shows as base64, said to be binary
    binary = "[data-field=payload][data-kind=binary]"
    console.wait_text(f"{binary} pre", "/wB4")
    assert console.text(f"{binary} .note") == "binary, 1 frame(s), 3 bytes, as base64"

    # When Redrive is clicked on its page
    console.page.click(".taskhead button[data-action=redrive]")

    # Then it is queued again (says the CLI), and its page follows it afresh
    wait_until(lambda: cli_json(broker, "task", task_id)["state"] == "ready", timeout_s=15)
    console.wait_text(".taskhead [data-field=state]", "ready")
    assert cli_json(broker, "dlq", "list", "once") == []
