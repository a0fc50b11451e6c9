"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, for the console.

Playwright downloads no browser here: scripts/chromium.py launches the system
one with a fresh user-data-dir per test. `Console` is a page on a gateway's
console that records every request the page makes, every script error and every
dialog, so a test can check that nothing left loopback and nothing failed unseen.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import BrowserContext, Dialog, Locator, sync_playwright

from scripts.chromium import ChromiumMissing, launch
from tests.conftest import ROOT, BrokerProcess, wait_until
from tests.integration.running import open_client, start_worker
from tests.web.gateway import GatewayProcess
from zbroker.client import Publisher, Task

# Pages and fetches of the console go to these hosts only.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# Schemes that never leave the page (the favicon is a data: URL).
LOCAL_SCHEMES = frozenset({"data", "blob", "about", "chrome-error"})


@contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    """A Chromium browser context on a fresh profile directory `profile`."""
    with sync_playwright() as pw:
        try:
            context = launch(pw, profile)
        except ChromiumMissing as exc:
            pytest.fail(str(exc))
        try:
            yield context
        finally:
            context.close()


class Console:
    """The console of one gateway, open in one page."""

    def __init__(self, context: BrowserContext, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.requests: list[str] = []
        self.script_errors: list[str] = []
        self.dialogs: list[str] = []
        context.on("request", lambda request: self.requests.append(request.url))
        self.page = context.pages[0] if context.pages else context.new_page()
        self.page.on("pageerror", lambda exc: self.script_errors.append(str(exc)))
        self.page.on("dialog", self._accept)

    def _accept(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept()

    def open(self, view: str = "queues", state: str = "connected") -> None:
        """Open `view` and wait for the connection state the header shows."""
        self.page.goto(f"{self.gateway.url}/#{view}")
        self.page.wait_for_selector(f"#connection[data-state={state}]", timeout=15_000)

    def text(self, selector: str) -> str:
        return self.page.locator(selector).first.inner_text(timeout=10_000).strip()

    def wait_text(self, selector: str, expected: str, timeout_s: float = 15.0) -> None:
        """Poll until the first element matching `selector` reads `expected`."""
        deadline = time.monotonic() + timeout_s
        seen = None
        while time.monotonic() < deadline:
            locator = self.page.locator(selector)
            if locator.count():
                seen = locator.first.inner_text().strip()
                if seen == expected:
                    return
            self.page.wait_for_timeout(50)
        raise AssertionError(f"{selector} reads {seen!r}, not {expected!r}, after {timeout_s}s")

    def foreign_requests(self) -> list[str]:
        """Every request that went anywhere but the gateway on loopback."""
        out = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in LOCAL_SCHEMES:
                continue
            if parts.hostname not in LOOPBACK or parts.port != self.gateway.port:
                out.append(url)
        return out


@contextmanager
def open_console(gateway: GatewayProcess, profile: Path) -> Iterator[Console]:
    """A console page on `gateway`; at the end, no request may have left loopback and
    no script may have failed."""
    with chromium(profile) as context:
        console = Console(context, gateway)
        yield console
        assert console.foreign_requests() == [], console.foreign_requests()
        assert console.script_errors == [], console.script_errors


def cli_json(broker: BrokerProcess, *args: str) -> Any:
    """The JSON a `zbroker ... --json --endpoint` command prints."""
    out = subprocess.run(
        [sys.executable, "-m", "zbroker", *args, "--json", "--endpoint", broker.endpoint],
        capture_output=True,
        text=True,
        timeout=30,
        env=broker.env,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout)


def queue_row(broker: BrokerProcess, service: str) -> dict[str, Any]:
    """`service`'s row of `zbroker queues --json`."""
    rows = cli_json(broker, "queues")
    found = [row for row in rows if row["service"] == service]
    assert found, f"no queue {service!r} in {rows}"
    return dict(found[0])


def cells(console: Console, service: str, fields: Sequence[str]) -> dict[str, str]:
    """The text of `fields` in `service`'s row of the queues view."""
    row = f"table.queues tr[data-service={json.dumps(service)}]"
    return {f: console.text(f"{row} td[data-field={f}]") for f in fields}


def publish_until_shown(
    console: Console, publisher: Publisher, topic: str, payload: Any
) -> Locator:
    """Publish on `topic` again until the event tail shows it (a subscription takes a
    moment to reach the bus); the tail's entries of that topic."""
    shown = console.page.locator(f"li.event[data-topic={json.dumps(topic)}]")

    def arrived() -> bool:
        publisher.publish(topic, payload)
        return bool(shown.count())

    wait_until(arrived, timeout_s=15, step_s=0.2)
    return shown


def gated_stream(
    stack: ExitStack, broker: BrokerProcess, first: bytes, last: bytes
) -> tuple[str, threading.Event]:
    """A task of service "talk" whose worker streams `first`, then waits for the
    returned event before it streams `last` and returns b"done"; the task's id."""
    may_finish = threading.Event()

    def handler(task: Task) -> bytes:
        task.emit(first)
        may_finish.wait(30)
        task.emit(last)
        return b"done"

    start_worker(stack, broker, "talk", handler)
    stack.callback(may_finish.set)
    return open_client(stack, broker).enqueue("talk", b"go"), may_finish


def always_fails(task: Task) -> bytes:
    """A worker handler whose every attempt fails."""
    raise RuntimeError("always fails")
