"""transcriber: serves the `stt` task queue and publishes `transcript.final`.

A stand-in for a speech-to-text model: the "recordings" in the inbox are text
files, and transcribing one means reading it and tidying it up (whitespace,
capitals, a full stop). Deterministic, so a task that runs twice (at-least-once
delivery) gives the same transcript twice.

The result, `{flow, name, text}`, is also what the broker hands to the flow's
`tts` and `llm` tasks, which depend on this one (`input: "result"`). A recording
with nothing in it fails for good: the tasks that depend on it (`reply-tts` too)
then end `upstream_failed`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline import BROKER, WORK_S, announce_when_ready, say

from zbroker.client import NonRetryableError, Service, Task

svc = Service("transcriber", **BROKER)


@svc.task("stt", publish="transcript.final")  # the returned dict is the result and the event
def transcribe(task: Task) -> dict[str, object]:
    job = json.loads(task.payload)  # {flow, path, name}, from the coordinator
    try:
        audio = Path(job["path"]).read_text(errors="replace")
    except FileNotFoundError:
        raise NonRetryableError(f"{job['path']} is gone") from None  # no retry can help
    if task.wait_cancelled(WORK_S):  # the model thinks; wakes early if the task is taken back
        return {}  # the broker no longer wants this attempt: its result is dropped
    text = " ".join(audio.split())
    if not text:  # silence: no attempt will ever hear anything in it
        say(f"{job['flow']} {task.id} attempt {task.attempt}: {job['name']} -> nothing to hear")
        raise NonRetryableError(f"{job['name']}: nothing to transcribe")
    text = re.sub(r"(^|[.!?] )(\w)", lambda m: m.group(1) + m.group(2).upper(), text)
    if text and text[-1] not in ".!?":
        text += "."
    say(f"{job['flow']} {task.id} attempt {task.attempt}: {job['name']} -> {text!r}")
    return {"flow": job["flow"], "name": job["name"], "text": text}


announce_when_ready(svc, "serving stt")
svc.run()  # until SIGINT/SIGTERM; a running transcription finishes first
