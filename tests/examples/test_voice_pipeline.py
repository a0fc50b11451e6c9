"""The voice-pipeline example run as its README says, with real processes: a broker,
the Python watcher, transcriber, LLM and coordinator, and the Node speaker.

Every part is restarted once while files flow (SIGKILL or SIGTERM), and still every
input comes out exactly once in the outbox, spoken and answered, from exactly one task
per file and queue. Each file's tasks are one graph, enqueued at once: tts and llm
wait for the file's stt task and get its result, reply-tts waits for it; the empty
file's stt task dies and the rest of its graph ends upstream_failed. The answers
stream: the speaker speaks the LLM's tokens as they come, and the interrupted one
stops on both sides, its tasks cancelled."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def check_graphs(summary: dict[str, Any], output: str, *, all_blocked: bool = True) -> None:
    """Each file's four tasks, as STATUS showed them at the end of the run (run.py saves
    them), make the coordinator's graph: tts and llm depend on the file's stt task with
    input "result", reply-tts depends on it with no input, stt on nothing. They waited
    for it `blocked` (their history says unblocked, or upstream failed): `all_blocked`.
    (With restarts, a coordinator killed between two enqueues leaves the rest to a
    rescan, which may find the stt task done already: then the others never wait.)"""
    graphs = summary["graphs"]
    assert sorted(graphs) == sorted(summary["inputs"]), output[-8000:]
    for name, tasks in graphs.items():
        assert sorted(tasks) == sorted(["stt", "tts", "llm", "reply-tts"]), name
        stt = tasks["stt"]
        assert (stt["depends_on"], stt["input"]) == ([], None), name
        for queue, input in (("tts", "result"), ("llm", "result"), ("reply-tts", None)):
            task = tasks[queue]
            assert (task["depends_on"], task["input"]) == ([stt["id"]], input), (name, queue)
            waited = {"unblocked", "upstream failed"} & set(task["history"])
            assert waited or not all_blocked, (name, queue, task["history"])
    assert summary["graph"]["chained"], summary["graph"]


def check_silent(summary: dict[str, Any], output: str) -> None:
    """The file with nothing to transcribe: its stt task is dead, the three tasks that
    depend on it ended upstream_failed without running, and the coordinator said so,
    the cause first."""
    tasks = summary["graphs"][summary["silent"]]
    stt = tasks["stt"]
    assert stt["state"] == "dead" and "nothing to transcribe" in stt["error"], stt
    dependents = [tasks[q] for q in ("tts", "llm", "reply-tts")]
    for task in dependents:
        assert task["state"] == "upstream_failed", task
        assert task["error"] == f"dependency {stt['id']} ended dead", task
        assert "attempt" not in task["history"], task  # it never ran
    dead = said(output, "coordinator", rf"  dead +stt task {stt['id']}: .*nothing to transcribe")
    assert dead, output[-8000:]
    for task in dependents:
        line = rf"  upstream_failed +[\w-]+ task {task['id']}: dependency {stt['id']} ended dead"
        reported = said(output, "coordinator", line)
        assert reported and reported[0][0] > dead[0][0], output[-8000:]


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
    # ...and by ours: one complete WAV file per input but the silent one, and one reply
    # per input but the silent and the interrupted ones, nothing else in the outbox
    inputs = visible(state / "inbox")
    assert len(inputs) >= 3
    interrupted, silent = summary["interrupted"]["name"], summary["silent"]
    assert interrupted in inputs and silent in inputs
    outputs = visible(state / "outbox")
    spoken = [f"{name}.wav" for name in inputs if name != silent]
    replies = [f"{name}.reply.wav" for name in inputs if name not in (silent, interrupted)]
    assert outputs == sorted(spoken + replies)
    for name in outputs:
        assert is_wav((state / "outbox" / name).read_bytes()), name
    check_interruption(state, summary, output, by_the_speaker=False)
    check_graphs(summary, output, all_blocked=False)
    check_silent(summary, output)
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
    interrupted, silent = summary["interrupted"]["name"], summary["silent"]
    assert summary["outputs"] == sorted(
        [f"{name}.wav" for name in inputs if name != silent]
        + [f"{name}.reply.wav" for name in inputs if name not in (silent, interrupted)]
    )
    check_interruption(state, summary, output)
    files = len(inputs)
    assert {q: f["done_total"] for q, f in summary["tasks"].items()} == {
        "stt": files - 1,
        "tts": files - 1,
        "llm": files - 2,
        "reply-tts": files - 2,
    }
    assert {q: f["dead_total"] for q, f in summary["tasks"].items()} == {
        "stt": 1,
        "tts": 0,
        "llm": 0,
        "reply-tts": 0,
    }
    # Each file's graph was enqueued whole: tts, llm and reply-tts blocked on its stt
    # task until the transcript was done, tts and llm given it as input
    check_graphs(summary, output)
    check_silent(summary, output)
    for name, tasks in summary["graphs"].items():  # and the coordinator said so
        stt = tasks["stt"]["id"]
        queued = said(output, "coordinator", rf"  \S+ enqueued +task \S+, depends on {stt}")
        assert len(queued) == 3, (name, output[-8000:])
    # The replies streamed: for every flow, the speaker's first audio came before the
    # LLM had finished its answer (the speaker did not wait for the whole of it)
    first_audio = {m[1]: n for n, m in said(output, "speaker", r"^(\w+) .*: first audio after")}
    answered = {m[1]: n for n, m in said(output, "llm", r"^(\w+) .*: answered")}
    assert len(first_audio) == files - 1, output[-8000:]
    assert len(answered) == files - 2, output[-8000:]
    assert all(first_audio[flow] < answered[flow] for flow in answered), output[-8000:]
    # And each answer was spoken whole: as many tokens as the LLM streamed
    streamed = {m[1]: m[2] for _, m in said(output, "llm", r"^(\w+) .*, (\d+) tokens streamed")}
    spoken = {m[1]: m[2] for _, m in said(output, "speaker", r"^(\w+) .*\.reply\.wav \((\d+) tok")}
    assert spoken == streamed, output[-8000:]
    pids = json.loads((state / "pids.json").read_text())
    assert [part for part, pid in pids.items() if alive(pid)] == []
