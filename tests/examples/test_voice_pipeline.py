"""The voice-pipeline example run as its README says, with real processes: a broker,
the Python watcher, transcriber, LLM and coordinator, and the Node speaker.

Every part is restarted once while files flow (SIGKILL or SIGTERM), and still every
input comes out exactly once in the outbox, spoken and answered, from exactly one task
per file and queue. The answers stream: the speaker speaks the LLM's tokens as they
come, and the interrupted one stops on both sides, its tasks cancelled."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.crosslang.nodeproc import node_binary

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RUN = ROOT / "examples" / "voice-pipeline" / "run.py"
DEMO_TIMEOUT_S = 60  # run.py's own deadline for the files to come out
WAIT_S = 90  # ours, for the whole run; then 20 s more for run.py to stop its parts


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_leftovers(state: Path) -> None:
    """Only after run.py itself was killed: end the parts it had started."""
    pids_file = state / "pids.json"
    if not pids_file.exists():
        return
    for pid in json.loads(pids_file.read_text()).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_demo(state: Path, *options: str) -> tuple[int, str]:
    argv = [sys.executable, str(RUN), "--demo", *options, "--state-dir", str(state)]
    argv += ["--timeout", str(DEMO_TIMEOUT_S)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        output, _ = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # run.py stops its parts, the broker last
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            kill_leftovers(state)
        pytest.fail(f"run.py did not finish in {WAIT_S}s:\n{output.decode(errors='replace')}")
    return proc.returncode, output.decode(errors="replace")


def is_wav(data: bytes) -> bool:
    return (
        data[:4] == b"RIFF"
        and data[8:12] == b"WAVE"
        and int.from_bytes(data[4:8], "little") == len(data) - 8
        and int.from_bytes(data[40:44], "little") == len(data) - 44
    )


def said(output: str, who: str, pattern: str) -> list[tuple[int, re.Match[str]]]:
    """(line number, match) of `pattern` in each line that `who` printed, in order."""
    prefix = re.compile(rf"^\s*{re.escape(who)} \| ")
    return [
        (number, m)
        for number, line in enumerate(output.splitlines())
        if prefix.match(line) and (m := re.search(pattern, prefix.sub("", line)))
    ]


def check_interruption(
    state: Path, summary: dict[str, object], output: str, *, by_the_speaker: bool = True
) -> None:
    """The interrupted reply stopped on both sides, and left no audio. `by_the_speaker`:
    the speaker was reading the stream, and cancelled the LLM task itself. (With restarts,
    the speaker may be down just as the interruption comes, its reply-tts task waiting
    for it: the coordinator then cancels the LLM task.)"""
    interrupted = summary["interrupted"]
    assert isinstance(interrupted, dict), output[-8000:]
    name = interrupted["name"]
    assert interrupted["llm_state"] == "cancelled"
    assert interrupted["reply_state"] == "cancelled"
    assert interrupted["tokens_streamed"] > 0  # it was interrupted mid-stream
    assert not (state / "outbox" / f"{name}.reply.wav").exists()
    assert not (state / "inbox" / f"{name}.interrupt").exists()  # used up by the coordinator
    # Both sides said that they stopped: the LLM between two tokens, the speaker's reader
    # by closing its stream, then cancelling the LLM task
    llm_task = interrupted["llm_task"]
    stopped = said(output, "llm", rf"{llm_task} attempt \d+: interrupted after (\d+) of (\d+)")
    assert stopped, output[-8000:]
    assert int(stopped[-1][1][1]) < int(stopped[-1][1][2])
    reader = said(output, "speaker", rf"{interrupted['reply_task']} attempt \d+: interrupted")
    coordinator = said(output, "coordinator", rf"interrupt .*llm task {llm_task} cancelled")
    assert coordinator, output[-8000:]
    cancelled_by_the_speaker = coordinator[-1][1].string.endswith("cancelled by the speaker")
    assert cancelled_by_the_speaker or not by_the_speaker, output[-8000:]
    if cancelled_by_the_speaker:
        assert reader, output[-8000:]
        assert f"LLM task {llm_task} cancelled" in reader[-1][1].string


def test_each_file_comes_out_once_although_every_part_is_restarted(tmp_path: Path) -> None:
    # Given: Node for the speaker (a missing one fails, never skips)
    node_binary()
    state = tmp_path / "state"

    # When: the demo runs, restarting each part once while files flow
    code, output = run_demo(state, "--restart-each")

    # Then: it passed, by its own account...
    assert code == 0, output[-8000:]
    summary = json.loads((state / "summary.json").read_text())
    assert summary["ok"], output[-8000:]
    assert [r["part"] for r in summary["restarts"]] == [
        "watcher",
        "transcriber",
        "llm",
        "speaker",
        "coordinator",
    ]
    assert summary["unexpected_exits"] == []
    # ...and by ours: one complete WAV file per input, and one reply per input but the
    # interrupted one, nothing else in the outbox
    inputs = visible(state / "inbox")
    assert len(inputs) >= 3
    interrupted = summary["interrupted"]["name"]
    assert interrupted in inputs
    outputs = visible(state / "outbox")
    replies = [f"{name}.reply.wav" for name in inputs if name != interrupted]
    assert outputs == sorted([f"{name}.wav" for name in inputs] + replies)
    for name in outputs:
        assert is_wav((state / "outbox" / name).read_bytes()), name
    check_interruption(state, summary, output, by_the_speaker=False)
    # Repeated events, rescans and restarts never made a second task for a file
    enqueued = {queue: figures["enqueued_total"] for queue, figures in summary["tasks"].items()}
    n = len(inputs)
    assert enqueued == {"stt": n, "tts": n, "llm": n, "reply-tts": n}
    assert summary["deduplicated"] > 0  # the keys did their work: there were repeats
    # And run.py left no process behind
    pids = json.loads((state / "pids.json").read_text())
    assert [part for part, pid in pids.items() if alive(pid)] == []


def test_replies_are_spoken_while_the_llm_streams_and_an_interruption_stops_both(
    tmp_path: Path,
) -> None:
    # Given: Node for the speaker
    node_binary()
    state = tmp_path / "state"

    # When: the demo runs without restarts
    code, output = run_demo(state)

    # Then: it passed, every input answered but the interrupted one
    assert code == 0, output[-8000:]
    summary = json.loads((state / "summary.json").read_text())
    assert summary["ok"], output[-8000:]
    inputs = visible(state / "inbox")
    interrupted = summary["interrupted"]["name"]
    assert summary["outputs"] == sorted(
        [f"{name}.wav" for name in inputs]
        + [f"{name}.reply.wav" for name in inputs if name != interrupted]
    )
    check_interruption(state, summary, output)
    assert {q: f["done_total"] for q, f in summary["tasks"].items()} == {
        "stt": len(inputs),
        "tts": len(inputs),
        "llm": len(inputs) - 1,
        "reply-tts": len(inputs) - 1,
    }
    # The replies streamed: for every flow, the speaker's first audio came before the
    # LLM had finished its answer (the speaker did not wait for the whole of it)
    first_audio = {m[1]: n for n, m in said(output, "speaker", r"^(\w+) .*: first audio after")}
    answered = {m[1]: n for n, m in said(output, "llm", r"^(\w+) .*: answered")}
    assert len(first_audio) == len(inputs), output[-8000:]
    assert len(answered) == len(inputs) - 1, output[-8000:]
    assert all(first_audio[flow] < answered[flow] for flow in answered), output[-8000:]
    # And each answer was spoken whole: as many tokens as the LLM streamed
    streamed = {m[1]: m[2] for _, m in said(output, "llm", r"^(\w+) .*, (\d+) tokens streamed")}
    spoken = {m[1]: m[2] for _, m in said(output, "speaker", r"^(\w+) .*\.reply\.wav \((\d+) tok")}
    assert spoken == streamed, output[-8000:]
    pids = json.loads((state / "pids.json").read_text())
    assert [part for part, pid in pids.items() if alive(pid)] == []
