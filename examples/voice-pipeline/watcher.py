"""watcher: publishes `fs.change` for every new or changed file in the inbox.

It polls the inbox with os.scandir every 0.2 s and announces a file once it has
looked the same (size and mtime) in two scans in a row, so a file still being
written is not announced half-done. Names starting with "." are ignored: write
to ".name" and rename into place.

Events are fire-and-forget, so a listener that was down has missed some. Anyone
can ask for them again by publishing `fs.rescan`: the watcher then announces
every file it has announced once more. A restarted watcher announces every file
too (it remembers nothing). Both are harmless because the coordinator's tasks
carry idempotency keys.
"""

from __future__ import annotations

import os
import threading
import time

from pipeline import BROKER, INBOX, announce_when_ready, say

from zbroker.client import ClientClosed, Event, Service

POLL_S = 0.2

svc = Service("watcher", **BROKER)
announced: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) as last announced


def announce(path: str, size: int, mtime_ns: int) -> None:
    change = {
        "path": path,
        "name": os.path.basename(path),
        "size": size,
        "mtime": mtime_ns / 1e9,  # seconds, for everyone (JavaScript included)
        "mtime_ns": mtime_ns,  # exact, beyond 2**53: JavaScript reads it rounded
    }
    svc.publish("fs.change", change)


@svc.on("fs.rescan")
def on_rescan(event: Event) -> None:
    files = announced.copy()  # one step under the GIL, while the watch thread may change it
    for path, (size, mtime_ns) in files.items():
        announce(path, size, mtime_ns)
    say(f"rescan asked by {event.source}: {len(files)} files announced again")


def scan() -> dict[str, tuple[int, int]]:
    """Path -> (size, mtime_ns) of every visible file in the inbox."""
    found = {}
    with os.scandir(INBOX) as entries:
        for entry in entries:
            if not entry.name.startswith(".") and entry.is_file():
                stat = entry.stat()
                found[entry.path] = (stat.st_size, stat.st_mtime_ns)
    return found


def watch() -> None:
    if not svc.wait_ready(timeout_s=60):  # publish nothing before the bus is reachable
        return
    previous: dict[str, tuple[int, int]] = {}
    while not svc.stopping:
        current = scan()
        for path, (size, mtime_ns) in current.items():
            if previous.get(path) != (size, mtime_ns) or announced.get(path) == (size, mtime_ns):
                continue  # still changing, or already announced as it is
            try:
                announce(path, size, mtime_ns)
            except ClientClosed:
                return  # stopping
            announced[path] = (size, mtime_ns)
            say(f"fs.change {os.path.basename(path)} ({size} bytes)")
        for gone in announced.keys() - current.keys():
            announced.pop(gone, None)  # deleted: announce it again if it comes back
        previous = current
        time.sleep(POLL_S)


INBOX.mkdir(parents=True, exist_ok=True)
announce_when_ready(svc, f"watching {INBOX}")
threading.Thread(target=watch, name="watch", daemon=True).start()
svc.run()  # until SIGINT/SIGTERM
