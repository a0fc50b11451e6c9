"""The voice-pipeline example run as its README says, with real processes: a broker,
the Python watcher, transcriber and coordinator, and the Node speaker. Every part is
restarted once while files flow (SIGKILL or SIGTERM), and still every input comes out
exactly once in the outbox, from exactly one task per file and queue."""

from __future__ import annotations

import contextlib
import json
import os
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


def run_demo(state: Path) -> tuple[int, str]:
    argv = [sys.executable, str(RUN), "--demo", "--restart-each", "--state-dir", str(state)]
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


def test_each_file_comes_out_once_although_every_part_is_restarted(tmp_path: Path) -> None:
    # Given: Node for the speaker (a missing one fails, never skips)
    node_binary()
    state = tmp_path / "state"

    # When: the demo runs, restarting each part once while files flow
    code, output = run_demo(state)

    # Then: it passed, by its own account...
    assert code == 0, output[-8000:]
    summary = json.loads((state / "summary.json").read_text())
    assert summary["ok"], output[-8000:]
    assert [r["part"] for r in summary["restarts"]] == [
        "watcher",
        "transcriber",
        "speaker",
        "coordinator",
    ]
    assert summary["unexpected_exits"] == []
    # ...and by ours: one complete WAV file per input, nothing else in the outbox
    inputs = visible(state / "inbox")
    assert len(inputs) >= 3
    outputs = visible(state / "outbox")
    assert outputs == sorted(f"{name}.wav" for name in inputs)
    for name in outputs:
        wav = (state / "outbox" / name).read_bytes()
        assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE", name
        assert int.from_bytes(wav[4:8], "little") == len(wav) - 8, name
    # Repeated events, rescans and restarts never made a second task for a file
    enqueued = {queue: figures["enqueued_total"] for queue, figures in summary["tasks"].items()}
    assert enqueued == {"stt": len(inputs), "tts": len(inputs)}
    assert summary["deduplicated"] > 0  # the keys did their work: there were repeats
    # And run.py left no process behind
    pids = json.loads((state / "pids.json").read_text())
    assert [part for part, pid in pids.items() if alive(pid)] == []
