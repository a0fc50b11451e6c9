"""llm: serves the `llm` task queue, streaming its answer token by token.

A stand-in for a language model: given a transcript (the result of the flow's
`stt` task, which the broker hands over once it is done), it "answers" with a
sentence built from it, and sends that answer one token (a word and the space
after it) at a time, every VOICE_TOKEN_S seconds (--token-s), as chunks of the
task's stream (docs/protocol.md §13). The whole answer is the task's result.
Deterministic, so an attempt that runs again streams the same tokens again.

Whoever reads the task's stream gets each token as it is produced: the Node
speaker's `reply-tts` queue turns them into audio as they come. When the task
is cancelled (an interruption), the broker tells this worker at once: the
handler stops between two tokens and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Generator

import msgpack
from pipeline import BROKER, announce_when_ready, say

from zbroker.client import Service, Task

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument(
    "--token-s",
    type=float,
    default=float(os.environ.get("VOICE_TOKEN_S", "0.06")),
    help="time per token (s); default VOICE_TOKEN_S or 0.06",
)
TOKEN_S = parser.parse_args().token_s

svc = Service("llm", **BROKER)


def compose(text: str) -> str:
    """The "model": a deterministic answer to a transcript."""
    words = len(re.findall(r"[\w']+", text))
    sentences = max(1, len(re.findall(r"[.!?](\s|$)", text)))
    return (
        f"You said {words} words in {sentences} sentence{'s' if sentences > 1 else ''}: "
        f"{text} Thank you, I have understood it, and here is my answer, one word "
        "at a time, the way a language model gives it."
    )


def tokens_of(answer: str) -> list[str]:
    return re.findall(r"\S+\s*", answer)


@svc.task("llm", concurrency=8)
def answer(task: Task) -> Generator[str, None, bytes]:
    """A generator handler: each yield is a chunk of the stream, the return value the result."""
    # {flow, name} from the coordinator, then the transcript: the result of the stt task
    # this one depends on, {flow, name, text}, which the broker appended (input "result").
    job_frame, transcript_frame = task.frames
    job = json.loads(job_frame)
    tokens = tokens_of(compose(msgpack.unpackb(transcript_frame)["text"]))
    where = f"{job['flow']} {task.id} attempt {task.attempt}"
    say(f"{where}: answering {job['name']} in {len(tokens)} tokens")
    sent = 0
    try:
        for token in tokens:
            # The model thinks about its next token; wakes at once if the task is cancelled.
            if task.wait_cancelled(TOKEN_S):
                break
            yield token
            sent += 1
    except GeneratorExit:
        # Cancelled while suspended at a yield: the worker closes the generator there.
        say(f"{where}: interrupted after {sent} of {len(tokens)} tokens: stopped generating")
        raise
    if sent < len(tokens):
        say(f"{where}: interrupted after {sent} of {len(tokens)} tokens: stopped generating")
        return b""  # the attempt is over: the broker drops whatever it returns
    say(f"{where}: answered {job['name']}, {sent} tokens streamed")
    return "".join(tokens).encode()  # the result: the whole answer


announce_when_ready(svc, f"serving llm, a token every {TOKEN_S:g}s")
svc.run()  # until SIGINT/SIGTERM; a running answer finishes first
