"""coordinator: chains the pipeline and prints each step of each file's flow.

    fs.change         -> enqueue an `stt` task
    transcript.final  -> enqueue a `tts` task
    speech.done       -> the flow is complete

Every task carries an idempotency key derived from the file's path and mtime
(the flow id), so a repeated event, a rescan or a restarted coordinator never
creates a second task for the same version of a file: the broker answers with
the task it already has. If that task has already ended, its result is read
from the broker and the flow carries on from there.

Events are fire-and-forget: those that went by while this coordinator was down
are lost. So it asks the watcher to announce every file again (`fs.rescan`)
when it starts, and every VOICE_RESCAN_S seconds after that, and walks each
file's flow again, without redoing any work. Events make the pipeline quick;
the rescans and the keys make it correct.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
from pipeline import BROKER, say

from zbroker.client import Client, ClientClosed, Event, Service, TaskFailed, TaskPending

RESCAN_S = float(os.environ.get("VOICE_RESCAN_S", "30"))

svc = Service("coordinator", **BROKER)
client = Client(BROKER["endpoint"])  # used only from the service's event thread
printed: set[tuple[str, str]] = set()  # (flow, step) already printed by this process


def step(flow: str, what: str, detail: str) -> None:
    if (flow, what) not in printed:
        printed.add((flow, what))
        say(f"{flow}  {what:<17} {detail}")


def flow_of(change: dict[str, Any]) -> str:
    """One flow per version of a file: the same path and mtime give the same id."""
    return hashlib.sha256(f"{change['path']}\0{change['mtime_ns']}".encode()).hexdigest()[:8]


def enqueue(queue: str, flow: str, job: dict[str, Any]) -> str:
    task_id = client.enqueue(queue, json.dumps(job).encode(), key=flow, headers={"flow": flow})
    step(flow, f"{queue} enqueued", f"task {task_id}")
    return task_id


def catch_up(flow: str, task_id: str, then: Callable[[dict[str, Any], str, str], None]) -> None:
    """If the task has ended already (we missed its event), go on from its result."""
    try:
        result = client.result(task_id, timeout_s=0)
    except TaskPending:
        return  # still to do: its event will come
    except TaskFailed as failure:
        step(flow, "failed", f"task {task_id} {failure.state}: {failure.error}")
        return
    then(msgpack.unpackb(result), task_id, " (read from the task: event missed)")


@svc.on("fs.change")
def on_change(event: Event) -> None:
    change = event.payload
    flow = flow_of(change)
    step(flow, "fs.change", f"{change['name']}, {change['size']} bytes")
    job = {"flow": flow, "path": change["path"], "name": change["name"]}
    catch_up(flow, enqueue("stt", flow, job), transcribed)


@svc.on("transcript.final")
def on_transcript(event: Event) -> None:
    transcribed(event.payload, event.correlation_id or "?")


def transcribed(transcript: dict[str, Any], stt_task: str, note: str = "") -> None:
    flow = transcript["flow"]
    step(flow, "transcript.final", f"task {stt_task}: {transcript['text']!r}{note}")
    job = {"flow": flow, "name": transcript["name"], "text": transcript["text"]}
    catch_up(flow, enqueue("tts", flow, job), spoken)


@svc.on("speech.done")
def on_speech(event: Event) -> None:
    spoken(event.payload, event.correlation_id or "?")


def spoken(speech: dict[str, Any], tts_task: str, note: str = "") -> None:
    step(speech["flow"], "speech.done", f"task {tts_task}: {speech['output']}{note}")


def rescans() -> None:
    if not svc.wait_ready(timeout_s=60):
        return
    say("ready: fs.change -> stt -> transcript.final -> tts -> speech.done")
    say(f"asking the watcher for a rescan now and every {RESCAN_S:g}s")
    while not svc.stopping:
        try:
            svc.publish("fs.rescan")
        except ClientClosed:
            return  # stopping
        time.sleep(RESCAN_S)


threading.Thread(target=rescans, name="rescans", daemon=True).start()
svc.run()  # until SIGINT/SIGTERM
