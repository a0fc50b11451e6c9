"""coordinator: enqueues each file's pipeline as one graph of tasks, and prints each
step of each file's flow.

    fs.change  -> enqueue the flow's four tasks at once (docs/protocol.md §15):
                    stt        transcribes the file
                    tts        depends_on stt, input "result": speaks the transcript
                    llm        depends_on stt, input "result": streams an answer to it
                    reply-tts  depends_on stt: speaks the llm task's stream as it comes
                  The last three wait in the broker, `blocked`, until the stt task is
                  done; the broker then queues them, and appends the stt task's result
                  (the transcript) to the payload of tts and llm.
    transcript.final, speech.done, reply.done -> printed: the flow goes on
    task.dead.*, task.upstream_failed.*       -> printed: a task of a flow failed for
                  good (a dead stt task ends the three others `upstream_failed`)

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
the task it already has. If that task has already ended, the coordinator asks
the broker how, and prints what it missed.

Events are fire-and-forget: those that went by while this coordinator was down
are lost, a file announced then has no tasks yet, and the steps of the others
went unprinted. So it asks the watcher to announce every file again
(`fs.rescan`) when it starts, and every VOICE_RESCAN_S seconds after that, and
walks each file's flow again, without redoing any work. Once a file's graph is
in the broker, its work goes on without the coordinator.
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
printed: set[tuple[str, str, str]] = set()  # (flow, step, about) already printed
INTERRUPT = ".interrupt"
SPEAKER_CANCELS_S = 2.0  # how long the speaker may take to cancel an interrupted llm task
replies: dict[str, tuple[str, str, str]] = {}  # name -> (flow, llm task, reply-tts task), latest
interrupts: dict[str, str] = {}  # name -> path of its .interrupt file, not acted on yet


def step(flow: str, what: str, detail: str, about: str = "") -> None:
    """Print a step of the flow once (`about` tells apart the steps of the same name of
    several tasks: their failures)."""
    if (flow, what, about) not in printed:
        printed.add((flow, what, about))
        say(f"{flow}  {what:<18} {detail}")


def flow_of(change: dict[str, Any]) -> str:
    """One flow per version of a file: the same path and mtime give the same id."""
    return hashlib.sha256(f"{change['path']}\0{change['mtime_ns']}".encode()).hexdigest()[:8]


def enqueue(
    queue: str, flow: str, job: dict[str, Any], after: str | None = None, input: str | None = None
) -> str:
    """Enqueue the flow's task of `queue` (or find it: the flow is its key); with
    `after`, one that waits for that task (and, with `input="result"`, gets its
    result after the job)."""
    headers = {"flow": flow, "name": job["name"]}
    task_id = client.enqueue(
        queue,
        json.dumps(job).encode(),
        key=flow,
        headers=headers,
        depends_on=[after] if after else [],
        input=input,
    )
    detail = f"task {task_id}"
    if after:
        detail += f", depends on {after}" + (" (its result as input)" if input else "")
    if task_id.existing:
        detail += ": there already (its key)"
    step(flow, f"{queue} enqueued", detail)
    return task_id


def catch_up(
    flow: str,
    queue: str,
    task_id: str,
    then: Callable[[dict[str, Any], str, str], None] | None = None,
) -> None:
    """If the task has ended already (we may have missed its event), say how: `then`
    with its result, or its failure."""
    try:
        result = client.result(task_id, timeout_s=0)
    except TaskPending:
        return  # still to do (queued, running or blocked): its event will come
    except TaskFailed as failure:
        failed(flow, queue, task_id, failure.state, failure.error)
        return
    if then is not None:
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
    # The whole graph at once. tts and llm get {flow, name}, then the transcript:
    # the stt task's result, which the broker appends to their payload when it is done.
    stt_task = enqueue("stt", flow, {"flow": flow, "path": change["path"], "name": change["name"]})
    job = {"flow": flow, "name": change["name"]}
    tts_task = enqueue("tts", flow, job, after=stt_task, input="result")
    llm_task = enqueue("llm", flow, job, after=stt_task, input="result")
    # The reply reads the llm task's stream while it is written: it cannot wait for the
    # llm task to end. It waits for the transcript, like the llm task, so that it holds
    # no speaker slot before there is anything to say, and ends with the others if
    # there never is.
    reply_job = {**job, "llm_task": llm_task}
    reply_task = enqueue("reply-tts", flow, reply_job, after=stt_task)
    replies[change["name"]] = (flow, llm_task, reply_task)
    interrupt(change["name"])  # if an interruption was waiting for this reply
    catch_up(flow, "stt", stt_task, transcribed)
    catch_up(flow, "tts", tts_task, spoken)
    catch_up(flow, "llm", llm_task)
    catch_up(flow, "reply-tts", reply_task, replied)


@svc.on("transcript.final")
def on_transcript(event: Event) -> None:
    transcribed(event.payload, event.correlation_id or "?")


def transcribed(transcript: dict[str, Any], stt_task: str, note: str = "") -> None:
    step(transcript["flow"], "transcript.final", f"task {stt_task}: {transcript['text']!r}{note}")


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


@svc.on("task.dead.")  # the broker's events (§6.1): {id, ...}, without headers
@svc.on("task.upstream_failed.")
def on_failed(event: Event) -> None:
    task = client.status(event.payload["id"])
    flow = task.headers.get("flow")
    if not isinstance(flow, str):
        return  # not one of ours
    if task.state == TaskState.UPSTREAM_FAILED:  # the cause first, whatever the events' order
        for cause in map(client.status, task.depends_on):
            if cause.final and cause.state != TaskState.DONE:
                failed(flow, cause.service, cause.id, cause.state, cause.error)
    failed(flow, task.service, task.id, task.state, task.error)


def failed(flow: str, queue: str, task_id: str, state: str, error: str | None) -> None:
    """A task of the flow ended without a result. A dead stt task ends the tasks that
    depend on it `upstream_failed`, their error naming it: the flow stops there."""
    why = f": {error}" if error and state != TaskState.CANCELLED else ""
    step(flow, str(state), f"{queue} task {task_id}{why}", about=queue)


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
        else:  # it never started (blocked or queued): nobody reads the llm task, cancel it here
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
    say("ready: fs.change -> stt => tts, llm (given its result), reply-tts ~> llm's stream")
    say(f"asking the watcher for a rescan now and every {RESCAN_S:g}s")
    while not svc.stopping:
        try:
            svc.publish("fs.rescan")
        except ClientClosed:
            return  # stopping
        time.sleep(RESCAN_S)


threading.Thread(target=rescans, name="rescans", daemon=True).start()
svc.run()  # until SIGINT/SIGTERM
