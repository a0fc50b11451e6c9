"""coordinator: chains the pipeline and prints each step of each file's flow.

    fs.change         -> enqueue an `stt` task
    transcript.final  -> enqueue a `tts` task, an `llm` task, and a `reply-tts`
                         task that speaks the `llm` task's stream as it comes
    speech.done       -> the transcript is spoken
    reply.done        -> the answer is spoken: the flow is complete

A file named `<name>.interrupt` in the inbox interrupts the reply to `<name>`:
the coordinator cancels its `reply-tts` task (the speaker then stops reading
and cancels the `llm` task; if the reply had not started yet, or the speaker
has not cancelled the `llm` task within SPEAKER_CANCELS_S, the coordinator
cancels it itself), and deletes the `.interrupt` file once done.
One that comes before the reply is known waits for it; one that comes after
the reply is complete does nothing.

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

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
from pipeline import BROKER, say

from zbroker.client import (
    Client,
    ClientClosed,
    Event,
    Service,
    TaskConflict,
    TaskFailed,
    TaskPending,
    TaskState,
)

RESCAN_S = float(os.environ.get("VOICE_RESCAN_S", "30"))

svc = Service("coordinator", **BROKER)
client = Client(BROKER["endpoint"])  # used only from the service's event thread
printed: set[tuple[str, str]] = set()  # (flow, step) already printed by this process
INTERRUPT = ".interrupt"
SPEAKER_CANCELS_S = 2.0  # how long the speaker may take to cancel an interrupted llm task
replies: dict[str, tuple[str, str, str]] = {}  # name -> (flow, llm task, reply-tts task), latest
interrupts: dict[str, str] = {}  # name -> path of its .interrupt file, not acted on yet


def step(flow: str, what: str, detail: str) -> None:
    if (flow, what) not in printed:
        printed.add((flow, what))
        say(f"{flow}  {what:<18} {detail}")


def flow_of(change: dict[str, Any]) -> str:
    """One flow per version of a file: the same path and mtime give the same id."""
    return hashlib.sha256(f"{change['path']}\0{change['mtime_ns']}".encode()).hexdigest()[:8]


def enqueue(queue: str, flow: str, job: dict[str, Any]) -> str:
    headers = {"flow": flow, "name": job["name"]}
    task_id = client.enqueue(queue, json.dumps(job).encode(), key=flow, headers=headers)
    step(flow, f"{queue} enqueued", f"task {task_id}")
    return task_id


def catch_up(flow: str, task_id: str, then: Callable[[dict[str, Any], str, str], None]) -> None:
    """If the task has ended already (we missed its event), go on from its result."""
    try:
        result = client.result(task_id, timeout_s=0)
    except TaskPending:
        return  # still to do: its event will come
    except TaskFailed as failure:
        why = "" if failure.state == TaskState.CANCELLED else f": {failure.error}"
        step(flow, f"{failure.state}", f"task {task_id}{why}")
        return
    then(msgpack.unpackb(result), task_id, " (read from the task: event missed)")


@svc.on("fs.change")
def on_change(event: Event) -> None:
    change = event.payload
    if change["name"].endswith(INTERRUPT):
        interrupts[change["name"][: -len(INTERRUPT)]] = change["path"]
        interrupt(change["name"][: -len(INTERRUPT)])
        return
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
    # The answer: the LLM streams it, and the speaker speaks it while it streams.
    llm_task = enqueue("llm", flow, job)
    reply_job = {"flow": flow, "name": transcript["name"], "llm_task": llm_task}
    reply_task = enqueue("reply-tts", flow, reply_job)
    replies[transcript["name"]] = (flow, llm_task, reply_task)
    interrupt(transcript["name"])  # if an interruption was waiting for this reply
    catch_up(flow, reply_task, replied)


@svc.on("speech.done")
def on_speech(event: Event) -> None:
    spoken(event.payload, event.correlation_id or "?")


def spoken(speech: dict[str, Any], tts_task: str, note: str = "") -> None:
    step(speech["flow"], "speech.done", f"task {tts_task}: {speech['output']}{note}")


@svc.on("reply.done")
def on_reply(event: Event) -> None:
    replied(event.payload, event.correlation_id or "?")


def replied(reply: dict[str, Any], reply_task: str, note: str = "") -> None:
    detail = f"{reply['output']}, {reply['tokens']} tokens"
    if reply.get("first_audio_ms") is not None:
        detail += f", first audio after {reply['first_audio_ms']} ms"
    step(reply["flow"], "reply.done", f"task {reply_task}: {detail}{note}")


def interrupt(name: str) -> None:
    """Interrupt the reply to `name`, once there is both an interruption and a reply."""
    if name not in interrupts or name not in replies:
        if name in interrupts:
            say(f"{'':8}  {'interrupt':<18} {name}: waiting for its reply to start")
        return
    flow, llm_task, reply_task = replies[name]
    try:
        was = client.cancel(reply_task)
    except TaskConflict:  # it has ended already
        state = client.status(reply_task).state
        if state == TaskState.CANCELLED:  # by us, before a restart: was the llm stopped?
            detail = f"reply-tts task {reply_task} was interrupted already; {stop_llm(llm_task)}"
        else:
            detail = f"too late, reply-tts task {reply_task} is {state}"
    else:
        if was == TaskState.INFLIGHT:  # the speaker stops, and cancels the llm task itself
            llm = stop_llm(llm_task, SPEAKER_CANCELS_S, by="the speaker")
        else:  # it never started: nobody reads the llm task, so cancel it here
            llm = stop_llm(llm_task)
        detail = f"reply-tts task {reply_task} cancelled ({was}); {llm}"
    step(flow, "interrupt", f"{name}: {detail}")
    # Acted on: the interruption is used up (a rescan does not bring it back).
    path = interrupts.pop(name)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def stop_llm(llm_task: str, wait_s: float = 0.0, by: str = "") -> str:
    """Make sure that an interrupted reply's llm task stops. The speaker reading it
    cancels it: wait up to `wait_s` for that. If it is still running then (no speaker
    was reading it: killed, say, just as the interruption came), cancel it here."""
    try:
        client.result(llm_task, timeout_s=wait_s)
        return f"llm task {llm_task} had finished"
    except TaskFailed as failure:
        return f"llm task {llm_task} {failure.state}" + (f" by {by}" if by else "")
    except TaskPending:
        pass
    try:
        client.cancel(llm_task)
    except TaskConflict:
        return f"llm task {llm_task} ended meanwhile"
    return f"llm task {llm_task} cancelled" + (f" here ({by} did not)" if by else "")


def rescans() -> None:
    if not svc.wait_ready(timeout_s=60):
        return
    say("ready: fs.change -> stt -> transcript.final -> tts, llm ~> reply-tts -> reply.done")
    say(f"asking the watcher for a rescan now and every {RESCAN_S:g}s")
    while not svc.stopping:
        try:
            svc.publish("fs.rescan")
        except ClientClosed:
            return  # stopping
        time.sleep(RESCAN_S)


threading.Thread(target=rescans, name="rescans", daemon=True).start()
svc.run()  # until SIGINT/SIGTERM
