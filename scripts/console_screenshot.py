#!/usr/bin/env python3
"""Screenshots of the console for docs/console.md, against a real broker with some load.

    .venv/bin/python scripts/console_screenshot.py [--out docs/img] [--warmup-s 12]

Starts a broker (its journal in a temporary directory) and `zbroker web` on free
loopback ports, workers of a few services (one streams, one fails, one is
tagged and reports metrics), a steady trickle of tasks, a chain and a fan-in,
and events on the bus; then opens each view of the console in headless Chromium
(scripts/chromium.py) and writes console-VIEW.png. Everything stops at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chromium import launch  # noqa: E402  (scripts/ is this script's own directory)
from playwright.sync_api import Page, sync_playwright  # noqa: E402

from zbroker.client import Client, Publisher, Task, Worker  # noqa: E402


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in ports:
            ports.append(port)
    return ports


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    sys.exit(f"nothing listens on {port} after {timeout_s}s")


@contextlib.contextmanager
def process(args: list[str], log: Path, port: int) -> Iterator[None]:
    """`python -m zbroker ARGS` until the block ends (SIGTERM), once `port` listens."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zbroker", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    try:
        wait_listening(port, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


SPOKEN = (
    "a stream arrives word by word while the worker is still speaking and the console"
    " shows every chunk as it comes then the result once the task is done"
)


def transcribe(task: Task) -> bytes:
    words = task.payload.decode().split()
    for word in words:
        task.emit(word.encode() + b" ")
        time.sleep(0.15)
    return f"{len(words)} words".encode()


def embed(task: Task) -> bytes:
    time.sleep(random.uniform(0.01, 0.08))
    return bytes(16)


def speak(task: Task) -> bytes:
    if b"glitch" in task.payload:
        raise RuntimeError("voice model failed: unsupported phoneme")
    time.sleep(0.05)
    return b"audio"


def load(endpoint: str, events_in: str, stop: threading.Event) -> None:
    """A trickle of tasks and events until `stop`."""
    sentences = ["the quick brown fox jumps", "hello there how are you", "one two three four"]
    with Client(endpoint) as client, Publisher(events_in, source="watcher") as publisher:
        n = 0
        while not stop.wait(0.1):
            n += 1
            client.enqueue("embed", f"chunk {n}".encode())
            if n % 4 == 0:
                client.enqueue("transcribe", random.choice(sentences).encode())
            if n % 6 == 0:
                client.enqueue("speak", b"glitch" if n % 12 == 0 else b"hi", max_attempts=1)
            if n % 10 == 0:
                client.enqueue("summarise", f"document {n}".encode())
                publisher.publish("fs.change", {"path": f"/srv/inbox/note-{n}.txt"})


def graphs(endpoint: str) -> str:
    """A chain and a fan-in; the id of the fan-in's joining task."""
    with Client(endpoint) as client:
        client.chain([("transcribe", b"good morning everyone"), ("embed", None), ("speak", None)])
        parts = [("embed", f"part {i}".encode()) for i in range(3)]
        ids = client.fan_in(parts, ("summarise", None))
    return str(ids[-1])


def shoot(page: Page, url: str, view: str, out: Path, ready: str, settle_ms: int = 1500) -> None:
    page.goto(f"{url}/#{view}")
    page.wait_for_selector("#connection[data-state=connected]", timeout=15_000)
    page.wait_for_selector(ready, timeout=15_000)
    page.wait_for_timeout(settle_ms)  # a picture, not a check: let the next refresh draw
    name = view.split("?")[0]
    page.screenshot(path=str(out / f"console-{name}.png"))
    print(f"wrote {out / f'console-{name}.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--warmup-s", type=float, default=12.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bind, events_in, events_out, http = free_ports(4)
    endpoint = f"tcp://127.0.0.1:{bind}"
    bus = [f"tcp://127.0.0.1:{events_in}", f"tcp://127.0.0.1:{events_out}"]
    os.environ.setdefault("ZBROKER_PURE", "1")
    logging.basicConfig(level=logging.CRITICAL)  # the failing worker's tracebacks are expected
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        broker = ["start", "--bind", endpoint, "--events-in", bus[0], "--events-out", bus[1]]
        broker += ["--data-dir", f"{tmp}/data", "--heartbeat-interval", "0.5"]
        stack.enter_context(process(broker, Path(tmp) / "broker.log", bind))
        web = ["web", "--listen", f"127.0.0.1:{http}", "--endpoint", endpoint]
        web += ["--events-in", bus[0], "--events-out", bus[1]]
        stack.enter_context(process(web, Path(tmp) / "web.log", http))
        workers = [
            Worker(
                endpoint,
                "transcribe",
                transcribe,
                concurrency=2,
                tags=["gpu", "whisper"],
                metrics=lambda: {"gpu_mem_gb": 3.2, "model": "small"},
            ),
            Worker(endpoint, "embed", embed, concurrency=4, tags=["cpu"]),
            Worker(endpoint, "speak", speak, tags=["gpu"]),
        ]
        for worker in workers:
            stack.enter_context(worker)
        with Client(endpoint) as client:
            client.pause("summarise")  # a paused queue with a backlog
        stop = threading.Event()
        feeder = threading.Thread(target=load, args=(endpoint, bus[0], stop), daemon=True)
        feeder.start()
        joined = graphs(endpoint)
        url = f"http://127.0.0.1:{http}"
        with sync_playwright() as pw:
            context = launch(pw, Path(tmp) / "profile", width=1720, height=760)
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(f"{url}/#queues")
            time.sleep(args.warmup_s)  # the sparklines fill as the page samples
            shoot(page, url, "queues", args.out, "tr[data-service=embed]")
            shoot(page, url, "workers", args.out, "tr[data-worker]")
            shoot(page, url, "tasks?service=embed&state=done", args.out, "tr[data-task]")
            shoot(page, url, "dead?service=speak", args.out, "tr[data-task]")
            shoot(page, url, "events", args.out, "li.event")
            shoot(page, url, f"graph?id={joined}", args.out, "svg.dag")
            with Client(endpoint) as client:
                talk = client.enqueue("transcribe", SPOKEN.encode())
            shoot(page, url, f"task?id={talk}", args.out, "span.chunk", settle_ms=2300)
            context.close()
        stop.set()
        feeder.join(10)


if __name__ == "__main__":
    main()
