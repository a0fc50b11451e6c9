#!/usr/bin/env python3
"""Run the voice pipeline: a broker and the five parts of the pipeline, output interleaved.

    .venv/bin/python examples/voice-pipeline/run.py                 # until Ctrl-C
    .venv/bin/python examples/voice-pipeline/run.py --demo          # samples in, wait, exit
    .venv/bin/python examples/voice-pipeline/run.py --demo --restart-each

Without --demo it runs until Ctrl-C: drop text files into the inbox it prints and
their "speech" appears in the outbox. With --demo it drops a few sample files,
waits until every one has come out of the pipeline, checks the outbox and each
file's graph of tasks in the broker, prints a summary and exits 0 (1 if that
takes longer than --timeout). Once the spoken reply to one of them (INTERRUPTED)
has started, it drops an interruption for it: that reply must stop, its LLM task
end cancelled, and every other reply come out whole. One sample (SILENT) holds
nothing to transcribe: its stt task must die, and the tasks that depend on it
end upstream_failed. --restart-each
also stops every part once while files flow (SIGKILL or SIGTERM) and starts it
again; the outbox must still end up with exactly one output per input.

Any part that exits on its own is started again, as a supervisor would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

try:
    from zbroker.client import Client, ClientError, TaskStatus
except ImportError:
    sys.exit(
        "run.py needs zbroker: run it with the project's venv (.venv/bin/python), "
        "or from the repository root: python3 dev.py example --demo"
    )

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 60.0
DOWN_S = 0.5  # how long a restarted part stays down: work piles up meanwhile
WAV_HEADER_BYTES = 44

SAMPLES = {
    "morning.txt": "good morning.   the coffee machine is   on",
    "reminder.txt": "remember to water the plants\nthey look thirsty",
    "weather.txt": "rain later today. take an umbrella",
    "shopping.txt": "milk, bread,   eggs and   a lot of cheese",
    "meeting.txt": "the meeting moved to three o'clock! do not be late",
    "goodnight.txt": "good night.  sleep well",
    "silence.txt": "",
}
# --restart-each: who is stopped, and how, in order; a worker once it holds a task.
RESTARTS = [
    ("watcher", signal.SIGTERM, None),
    ("transcriber", signal.SIGKILL, "stt"),
    ("llm", signal.SIGKILL, "llm"),  # mid-answer: the answer streams again, as attempt 2
    ("speaker", signal.SIGKILL, "tts"),
    ("coordinator", signal.SIGKILL, None),
]
# --demo: the sample whose spoken reply is interrupted once it has begun.
INTERRUPTED = "meeting.txt"
# --demo: the sample with nothing to transcribe: its stt task dies, its flow stops there.
SILENT = "silence.txt"
# What the demo waits for and checks in the broker: one task per file in each.
QUEUES = ("stt", "tts", "llm", "reply-tts")
# Each file's graph, as the coordinator enqueues it: queue -> (waits for the stt task,
# gets its result as input).
GRAPH = {
    "stt": (False, None),
    "tts": (True, "result"),
    "llm": (True, "result"),
    "reply-tts": (True, None),
}
FINAL_STATES = ("done", "cancelled", "dead", "upstream_failed", "expired")
DATE = re.compile(r"^\d{4}-\d\d-\d\d ")
COLOURS = {
    "broker": 90,
    "watcher": 36,
    "coordinator": 1,
    "transcriber": 33,
    "llm": 34,
    "speaker": 35,
}


class Console:
    """One line at a time, each prefixed with who said it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def show(self, who: str, line: str) -> None:
        prefix = f"{who:>11} |"
        if self.colour:
            prefix = f"\x1b[{COLOURS.get(who, 32)}m{prefix}\x1b[0m"
        with self.lock:
            print(f"{prefix} {line}", flush=True)


class Part:
    """One child process of the pipeline; its output goes to the console."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], console: Console) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.console = console
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = threading.Event()  # the part printed "ready: ..."
        self.stopping = False  # the runner is stopping it: its exit is no surprise
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            self.ready.clear()
            # A process group of its own: Ctrl-C reaches only the runner, which then
            # stops the parts, and the broker last.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=HERE,
                process_group=0,
            )
            self.stopping = False
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            line = DATE.sub("", line)  # the broker's log lines: the time of day is enough
            if line.startswith("ready:"):
                self.ready.set()
            self.console.show(self.name, line)
        proc.stdout.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        with self.lock:
            proc = self.proc
            if proc is None:
                return None
            self.stopping = True
            if proc.poll() is None:
                proc.send_signal(sig)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.console.show("run", f"{self.name} did not stop in {timeout_s:g}s: SIGKILL")
            proc.kill()
            return proc.wait()

    def exited_by_itself(self) -> int | None:
        with self.lock:
            if self.proc is None or self.stopping:
                return None
            return self.proc.poll()


class Pipeline:
    def __init__(self, args: argparse.Namespace, state: Path) -> None:
        self.args = args
        self.state = state
        self.inbox = state / "inbox"
        self.outbox = state / "outbox"
        self.console = Console()
        self.stop_requested = threading.Event()
        self.restarts: list[dict[str, Any]] = []
        self.unexpected_exits: list[dict[str, Any]] = []
        ports = free_ports(3) if args.port == 0 else [args.port + i for i in range(3)]
        self.endpoint, events_in, events_out = (f"tcp://127.0.0.1:{p}" for p in ports)
        self.events_out = events_out
        env = dict(
            os.environ,
            ZBROKER_ENDPOINT=self.endpoint,
            ZBROKER_EVENTS_IN=events_in,
            ZBROKER_EVENTS_OUT=events_out,
            VOICE_INBOX=str(self.inbox),
            VOICE_OUTBOX=str(self.outbox),
            VOICE_WORK_S=str(args.work_s),
            VOICE_TOKEN_S=str(args.token_s),
            PYTHONUNBUFFERED="1",
        )
        node = shutil.which("node")
        if node is None:
            sys.exit("the speaker needs Node.js 20+ (`node` on PATH)")
        python = sys.executable
        broker_argv = [python, "-m", "zbroker", "start", "--bind", self.endpoint]
        broker_argv += ["--events-in", events_in, "--events-out", events_out]
        broker_argv += ["--data-dir", str(state / "broker")]
        # Short heartbeats: a killed worker's task goes back to the queue within a second.
        broker_argv += ["--heartbeat-interval", "0.5"]
        # Finished tasks, and so their idempotency keys, are kept a week (default: an hour):
        # a rescan of a file done before that finds its tasks and does not do it again.
        broker_argv += ["--retention", str(7 * 24 * 3600)]
        self.broker = Part("broker", broker_argv, env, self.console)
        self.parts = {
            "speaker": Part("speaker", [node, str(HERE / "speaker.mjs")], env, self.console),
            "transcriber": Part(
                "transcriber", [python, str(HERE / "transcriber.py")], env, self.console
            ),
            "llm": Part("llm", [python, str(HERE / "llm.py")], env, self.console),
            "coordinator": Part(
                "coordinator", [python, str(HERE / "coordinator.py")], env, self.console
            ),
            "watcher": Part("watcher", [python, str(HERE / "watcher.py")], env, self.console),
        }

    def say(self, line: str) -> None:
        self.console.show("run", line)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.outbox.mkdir(parents=True, exist_ok=True)
        self.broker.start()
        self.write_pids()
        if not self.wait_for_broker():
            self.say("the broker did not come up")
            return False
        for part in self.parts.values():
            part.start()
        self.write_pids()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for part in self.parts.values():
            if not part.ready.wait(max(0.0, deadline - time.monotonic())):
                self.say(f"{part.name} did not become ready in {READY_TIMEOUT_S:g}s")
                return False
        self.say(f"inbox:  {self.inbox}")
        self.say(f"outbox: {self.outbox}")
        return True

    def wait_for_broker(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with Client(self.endpoint, timeout_s=0.5, retries=0) as client:
            while time.monotonic() < deadline and not self.stop_requested.is_set():
                try:
                    client.mmi_service("stt")  # any answer means the broker is up
                    return True
                except ClientError:
                    if self.broker.exited_by_itself() is not None:
                        return False
        return False

    def stop(self) -> None:
        """Every part at once (each finishes its running task), then the broker."""
        stoppers = [threading.Thread(target=part.stop, daemon=True) for part in self.parts.values()]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        self.broker.stop()

    def supervise(self) -> None:
        """Start again any part that exited without being asked to."""
        for part in [self.broker, *self.parts.values()]:
            code = part.exited_by_itself()
            if code is not None and not self.stop_requested.is_set():
                self.say(f"{part.name} exited by itself (code {code}): starting it again")
                self.unexpected_exits.append({"part": part.name, "code": code})
                part.start()
                self.write_pids()

    def write_pids(self) -> None:
        """For whoever must clean up after a runner that was killed (the test does)."""
        pids = {
            p.name: p.proc.pid for p in [self.broker, *self.parts.values()] if p.proc is not None
        }
        (self.state / "pids.json").write_text(json.dumps(pids))

    def wait(self, seconds: float) -> bool:
        """Sleep while supervising; False if a stop was requested."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stop_requested.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                return False
            self.supervise()
        return not self.stop_requested.is_set()

    # ------------------------------------------------------------ demo

    def demo(self) -> bool:
        dropped = threading.Semaphore(0)
        restarter = None
        if self.args.restart_each:
            restarter = threading.Thread(target=self.restart_each, args=(dropped,), daemon=True)
            restarter.start()
        interrupter = threading.Thread(target=self.interrupt, daemon=True)
        started = time.monotonic()
        deadline = started + self.args.timeout
        for name, text in SAMPLES.items():
            drop(self.inbox, name, text)
            self.say(f"dropped {name} into the inbox")
            if name == INTERRUPTED:
                interrupter.start()
            dropped.release()
            if not self.wait(self.args.interval):
                return False
        expected = expected_outputs()
        while (
            not (expected <= outputs(self.outbox))
            or interrupter.is_alive()
            or (self.inbox / f"{INTERRUPTED}.interrupt").exists()  # not acted on yet
            or not self.settled()
            or (restarter and restarter.is_alive())
        ):
            if time.monotonic() > deadline:
                missing = sorted(expected - outputs(self.outbox))
                self.say(f"timed out after {self.args.timeout:g}s; missing: {missing}")
                return False
            if not self.wait(0.1):
                return False
        self.say(f"all {len(SAMPLES)} files came out in {time.monotonic() - started:.1f}s")
        return True

    def interrupt(self) -> None:
        """Once INTERRUPTED's reply is being spoken, drop `<name>.interrupt` into the inbox.

        The speaker writes a reply's audio as its tokens come, into a hidden file of
        the outbox: audio in it says that the reply has begun.
        """
        deadline = time.monotonic() + self.args.timeout
        while not any(
            size_of(partial) > WAV_HEADER_BYTES  # some audio after the header
            for partial in self.outbox.glob(f".{INTERRUPTED}.reply.wav.*.partial")
        ):
            if time.monotonic() > deadline or self.stop_requested.wait(0.02):
                return
        drop(self.inbox, f"{INTERRUPTED}.interrupt", "stop")
        self.say(f"the reply to {INTERRUPTED} has begun: dropped {INTERRUPTED}.interrupt")

    def settled(self) -> bool:
        """Every file has its one task in each queue, and none is waiting or running."""
        try:
            with Client(self.endpoint, timeout_s=1.0, retries=0) as client:
                queues = {q["service"]: q for q in client.queues() if q["service"] in QUEUES}
        except ClientError:
            return False  # the broker is busy: ask again
        return all(
            name in queues
            and queues[name]["enqueued_total"] == len(SAMPLES)
            and sum(queues[name][n] for n in ("ready", "delayed", "blocked", "inflight")) == 0
            for name in QUEUES
        )

    def restart_each(self, dropped: threading.Semaphore) -> None:
        for name, sig, queue in RESTARTS:
            dropped.acquire()  # spread the restarts over the drops
            if not self.wait_quietly(0.3):  # let some of its work get under way
                return
            busy = queue is not None and self.wait_until_busy(queue)
            if busy and name == "llm" and not self.wait_quietly(0.3):
                return  # (the llm: once some tokens of its answer have streamed)
            part = self.parts[name]
            self.say(
                f"restarting {name}: {signal.Signals(sig).name}"
                + (f" mid-task ({queue})" if busy else "")
            )
            code = part.stop(sig)
            if not self.wait_quietly(DOWN_S):
                return
            part.start()
            self.write_pids()
            back = part.ready.wait(READY_TIMEOUT_S)
            self.restarts.append({"part": name, "signal": signal.Signals(sig).name, "code": code})
            self.say(f"{name} is back" if back else f"{name} did not come back")

    def wait_until_busy(self, queue: str, timeout_s: float = 3.0) -> bool:
        """Wait until a worker of `queue` holds a task, so that a kill interrupts work."""
        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint, timeout_s=1.0, retries=0) as client:
            while time.monotonic() < deadline and not self.stop_requested.is_set():
                try:
                    if any(q["service"] == queue and q["inflight"] for q in client.queues()):
                        return True
                except ClientError:
                    pass  # the broker is busy: look again
                time.sleep(0.05)
        return False

    def wait_quietly(self, seconds: float) -> bool:
        return not self.stop_requested.wait(seconds)

    def check_and_summarise(self, finished: bool) -> bool:
        expected = sorted(expected_outputs())
        found = sorted(outputs(self.outbox))
        bad = [name for name in found if not is_wav(self.outbox / name)]
        queues: dict[str, dict[str, Any]] = {}
        deduplicated = None
        interrupted: dict[str, Any] = {}
        flows: dict[str, dict[str, TaskStatus]] = {}
        try:
            with Client(self.endpoint, timeout_s=2.0, retries=1) as client:
                queues = {q["service"]: q for q in client.queues()}
                deduplicated = client.broker_stats()["stats"]["tasks_deduplicated"]
                interrupted = interruption(client)
                flows = graphs(client)
        except ClientError as exc:
            self.say(f"could not ask the broker for its figures: {exc}")
        figures = {
            name: {
                k: q[k]
                for k in ("enqueued_total", "done_total", "redeliveries_total", "dead_total")
            }
            for name in QUEUES
            if (q := queues.get(name)) is not None
        }
        # At-least-once may run a task twice, but the keys never let a file make two tasks.
        one_task_per_file = all(
            figures.get(queue, {}).get("enqueued_total") == len(SAMPLES) for queue in QUEUES
        )
        # The interruption stopped both sides mid-stream: the LLM's task and the
        # speaker's are cancelled (neither ended done), after some tokens had streamed.
        stopped = (
            interrupted.get("llm_state") == "cancelled"
            and interrupted.get("reply_state") == "cancelled"
            and interrupted.get("tokens_streamed", 0) > 0
        )
        graph = check_graphs(flows)
        silent = flows.get(SILENT, {})
        # The silent file's flow stopped at its stt task: the rest never ran.
        silent_stopped = {q: str(t.state) for q, t in silent.items()} == {
            "stt": "dead",
            **{q: "upstream_failed" for q in QUEUES if q != "stt"},
        }
        ok = (
            finished
            and found == expected
            and not bad
            and one_task_per_file
            and graph["chained"]
            and silent_stopped
            and stopped
            and not self.unexpected_exits
            and len(self.restarts) == (len(RESTARTS) if self.args.restart_each else 0)
        )
        replies = [name for name in found if name.endswith(".reply.wav")]
        self.say(
            f"{len(SAMPLES)} files in, {len(found) - len(replies)} spoken: "
            + ", ".join(name for name in found if name not in replies)
        )
        self.say(f"{len(replies)} replies spoken: {', '.join(replies)}")
        if bad:
            self.say(f"not valid WAV files: {bad}")
        if missing := sorted(set(expected) - set(found)):
            self.say(f"missing: {missing}")
        if extra := sorted(set(found) - set(expected)):
            self.say(f"not expected: {extra}")
        for name, f in figures.items():
            self.say(
                f"{name}: {f['enqueued_total']} tasks, {f['done_total']} done, "
                f"{f['redeliveries_total']} redelivered, {f['dead_total']} dead"
            )
        self.say(
            f"graph: {graph['flows']} files, each stt -> tts, llm (its result as input) and "
            f"reply-tts; {graph['waited']} of {graph['dependents']} waited blocked for their "
            "stt task" + ("" if graph["chained"] else f"; NOT AS ENQUEUED: {graph['wrong']}")
        )
        if "stt" in silent:
            stt = silent["stt"]
            self.say(
                f"failed {SILENT}: stt task {stt.id} {stt.state} ({stt.error}); "
                + ", ".join(f"{q} task {t.id} {t.state}" for q, t in silent.items() if q != "stt")
                + ", no output"
            )
        else:
            self.say(f"failed {SILENT}: no tasks found")
        if interrupted:
            self.say(
                f"interrupted {INTERRUPTED}: llm task {interrupted['llm_task']} "
                f"{interrupted['llm_state']} after {interrupted['tokens_streamed']} tokens "
                f"streamed, reply-tts task "
                f"{interrupted['reply_task']} {interrupted['reply_state']}, no reply audio"
            )
        else:
            self.say(f"interrupted {INTERRUPTED}: no cancelled llm task found")
        self.say(f"{deduplicated} enqueues found their task already there (idempotency keys)")
        for r in self.restarts:
            self.say(f"restarted {r['part']} ({r['signal']})")
        for e in self.unexpected_exits:
            self.say(f"unexpected exit: {e['part']} (code {e['code']})")
        summary = {
            "ok": ok,
            "inputs": sorted(SAMPLES),
            "outputs": found,
            "tasks": figures,
            "graph": graph,
            "silent": SILENT,
            # Each file's tasks as STATUS gave them, for whoever checks this run.
            "graphs": {
                name: {
                    queue: {
                        "id": task.id,
                        "state": str(task.state),
                        "error": task.error,
                        "depends_on": list(task.depends_on),
                        "input": task.input,
                        "history": [entry[0] for entry in task.history],
                    }
                    for queue, task in tasks.items()
                }
                for name, tasks in flows.items()
            },
            "interrupted": interrupted,
            "deduplicated": deduplicated,
            "restarts": self.restarts,
            "unexpected_exits": self.unexpected_exits,
        }
        (self.state / "summary.json").write_text(json.dumps(summary, indent=2))
        self.say("demo passed" if ok else "demo FAILED")
        return ok


def interruption(client: Client) -> dict[str, Any]:
    """The interrupted flow's tasks as the broker has them: its llm task's STATUS (the
    length of its stream included) and its reply-tts task's. {} unless exactly one llm
    task was cancelled, and it was INTERRUPTED's."""
    cancelled, _ = client.tasks("llm", "cancelled")
    if len(cancelled) != 1:
        return {}
    llm = client.status(cancelled[0]["id"])
    if llm.headers.get("name") != INTERRUPTED:
        return {}
    replies, _ = client.tasks("reply-tts", "cancelled")
    reply = next(
        (s for s in map(client.status, (r["id"] for r in replies)) if s.headers == llm.headers),
        None,
    )
    return {
        "name": INTERRUPTED,
        "flow": llm.headers.get("flow"),
        "llm_task": llm.id,
        "llm_state": str(llm.state),
        "tokens_streamed": llm.stream_chunks,
        "reply_task": reply.id if reply else None,
        "reply_state": str(reply.state) if reply else None,
    }


def graphs(client: Client) -> dict[str, dict[str, TaskStatus]]:
    """Every file's tasks as the broker has them, once they have all ended: by file name,
    then queue, the STATUS of each (its depends_on, input and history included)."""
    flows: dict[str, dict[str, TaskStatus]] = {}
    for queue in QUEUES:
        for state in FINAL_STATES:
            records, _ = client.tasks(queue, state, limit=1000)
            for record in records:
                task = client.status(record["id"])
                flows.setdefault(task.headers.get("name", "?"), {})[queue] = task
    return flows


def check_graphs(flows: dict[str, dict[str, TaskStatus]]) -> dict[str, Any]:
    """Whether every file's four tasks make the graph the coordinator enqueues (GRAPH):
    tts and llm depend on the file's stt task and get its result as input, reply-tts
    depends on it; and how many of those dependents did wait for it, `blocked` (their
    history says `unblocked` or `upstream failed`), rather than find it ended already."""
    wrong = sorted(set(SAMPLES) ^ set(flows))  # a file without tasks, or tasks of no file
    waited = 0
    for name, tasks in sorted(flows.items()):
        if set(tasks) != set(QUEUES):
            wrong.append(f"{name}: {sorted(tasks)}")
            continue
        for queue, (after_stt, input) in GRAPH.items():
            task = tasks[queue]
            if task.depends_on != ((tasks["stt"].id,) if after_stt else ()) or task.input != input:
                wrong.append(f"{name} {queue}: depends_on {task.depends_on}, input {task.input}")
            if after_stt and any(e[0] in ("unblocked", "upstream failed") for e in task.history):
                waited += 1
    return {
        "flows": len(flows),
        "dependents": sum(after_stt for after_stt, _ in GRAPH.values()) * len(flows),
        "waited": waited,
        "chained": not wrong,
        "wrong": wrong,
    }


# ------------------------------------------------------------ files and ports


def drop(inbox: Path, name: str, text: str) -> None:
    """Write under a hidden name, then rename: the watcher never sees half a file."""
    partial = inbox / f".{name}.partial"
    partial.write_text(text + "\n")
    partial.replace(inbox / name)


def expected_outputs() -> set[str]:
    """Every file spoken but the silent one, and the reply to every file but the silent
    and the interrupted ones."""
    spoken = {f"{name}.wav" for name in SAMPLES if name != SILENT}
    return spoken | {f"{name}.reply.wav" for name in SAMPLES if name not in (SILENT, INTERRUPTED)}


def outputs(outbox: Path) -> set[str]:
    return {p.name for p in outbox.iterdir() if not p.name.startswith(".")}


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def is_wav(path: Path) -> bool:
    data = path.read_bytes()
    return (
        len(data) > WAV_HEADER_BYTES
        and data[:4] == b"RIFF"
        and data[8:16] == b"WAVEfmt "
        and int.from_bytes(data[4:8], "little") == len(data) - 8
        and int.from_bytes(data[40:44], "little") == len(data) - WAV_HEADER_BYTES
    )


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if (port := s.getsockname()[1]) not in ports:
                ports.append(port)
    return ports


# ------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="drop samples, wait for them, exit")
    parser.add_argument(
        "--restart-each", action="store_true", help="with --demo: restart every part once"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="inbox, outbox and the broker's journal (default: ./state next to run.py; "
        "with --demo a new temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="first of three ports in a row (default: free ones)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="--demo: give up after (s)")
    parser.add_argument("--interval", type=float, default=0.5, help="--demo: between drops (s)")
    parser.add_argument("--work-s", type=float, default=0.3, help="fake model time per task (s)")
    parser.add_argument(
        "--token-s", type=float, default=0.06, help="the fake LLM's time per token (s)"
    )
    args = parser.parse_args()
    if args.restart_each and not args.demo:
        parser.error("--restart-each goes with --demo")
    return args


def main() -> int:
    args = parse_args()
    temporary = args.demo and args.state_dir is None
    if temporary:
        state = Path(tempfile.mkdtemp(prefix="voice-pipeline-"))
    else:
        state = (args.state_dir or HERE / "state").resolve()
        state.mkdir(parents=True, exist_ok=True)
        if args.demo and any(any((state / box).glob("*")) for box in ("inbox", "outbox")):
            sys.exit(f"--demo needs an empty state directory: {state} has files already")
    pipeline = Pipeline(args, state)

    def on_signal(signum: int, frame: object) -> None:
        pipeline.stop_requested.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ok = False
    try:
        if pipeline.start():
            if args.demo:
                finished = pipeline.demo()
                if not pipeline.stop_requested.is_set():
                    ok = pipeline.check_and_summarise(finished)
            else:
                pipeline.say("drop text files into the inbox; Ctrl-C stops everything")
                pipeline.say("to look inside, in another terminal (with .venv/bin on PATH):")
                pipeline.say(
                    f"  export ZBROKER_ENDPOINT={pipeline.endpoint} "
                    f"ZBROKER_EVENTS_OUT={pipeline.events_out}"
                )
                pipeline.say(
                    "  zbroker queues;  zbroker tail fs. transcript. speech. reply.;  zbroker top"
                )
                while pipeline.wait(3600):
                    pass
                ok = True
    finally:
        pipeline.say("stopping")
        pipeline.stop()
        if temporary:
            shutil.rmtree(state, ignore_errors=True)
    if pipeline.stop_requested.is_set():
        return 130 if not ok else 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
