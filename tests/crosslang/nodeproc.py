"""Node.js peers for cross-language tests: a `node` child process running one of the
scripts in tests/crosslang/node/, spoken to through JSON lines.

A script prints one JSON object per line on stdout: `{"event": "ready"}` once it can
be used, then whatever it reports. Scripts that take commands read one JSON object
per line on stdin, `{"cmd": n, "op": ...}`, and answer `{"cmd": n, "ok": true,
"value": ...}` or `{"cmd": n, "ok": false, "error": {...}}`. Bytes travel as base64.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.conftest import ROOT

SCRIPTS = Path(__file__).with_name("node")
NODE_CLIENT = ROOT / "clients" / "node"

Message = dict[str, Any]

# Bytes that are not valid UTF-8 (a lone continuation byte, a bad sequence, an encoded
# surrogate) mixed with NUL, 0xff and some valid UTF-8: a payload that must cross
# every language boundary untouched.
NOT_UTF8 = b"\x80\xc3\x28\x00\xff\xfe caf\xc3\xa9 \xed\xa0\x80"


def b64(frame: bytes) -> str:
    return base64.b64encode(frame).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def node_binary() -> str:
    """The `node` executable. CI always has Node: a missing one is a failure, never a skip."""
    node = shutil.which("node")
    if node is None:
        raise AssertionError(
            "the cross-language tests need Node.js 20+ (`node` on PATH) and the Node "
            "client's dependencies (`npm ci` in clients/node); `node` was not found"
        )
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    major = version.lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 20:
        raise AssertionError(f"the Node client needs Node.js 20+, found {version!r} at {node}")
    if not (NODE_CLIENT / "node_modules" / "zeromq").is_dir():
        raise AssertionError(
            f"the Node client's dependencies are not installed: run `npm ci` in {NODE_CLIENT}"
        )
    return node


class NodeProcess:
    """One `node` child process; its stdout lines are collected by a reader thread."""

    def __init__(self, node: str, script: str, args: Sequence[str], log_path: Path) -> None:
        self.name = f"{script} {' '.join(args)}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [node, str(SCRIPTS / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
        )
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._cmds = itertools.count(1)
        self._reader = threading.Thread(target=self._read, name=f"node:{script}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError:
                message = {"event": "raw", "line": line}
            with self._lock:
                self.messages.append(message)

    # ------------------------------------------------------------ reading

    def seen(self, predicate: Callable[[Message], bool] = lambda m: True) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def events(self, name: str) -> list[Message]:
        return self.seen(lambda m: m.get("event") == name)

    def wait_for(
        self, predicate: Callable[[Message], bool], timeout_s: float = 10.0, what: str = ""
    ) -> Message:
        """The first message (in arrival order) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.seen(predicate)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                # The reader may still be draining the last lines of a process that ended.
                self._reader.join(2)
                found = self.seen(predicate)
                if found:
                    return found[0]
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before {what or predicate}"
                    f"\n{self.diagnostics()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name}: no {what or predicate} within {timeout_s}s\n{self.diagnostics()}"
                )
            time.sleep(0.01)

    def wait_event(self, name: str, timeout_s: float = 10.0, **fields: Any) -> Message:
        def match(m: Message) -> bool:
            return m.get("event") == name and all(m.get(k) == v for k, v in fields.items())

        return self.wait_for(match, timeout_s, f"event {name} {fields or ''}")

    def wait_ready(self, timeout_s: float = 15.0) -> Message:
        return self.wait_event("ready", timeout_s)

    def diagnostics(self) -> str:
        stderr = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"stdout: {self.seen()[-20:]}\nstderr (tail): {stderr[-3000:]}"

    # ------------------------------------------------------------ commands

    def send(self, op: str, **args: Any) -> int:
        """Send a command; return its number (answers quote it as `cmd`)."""
        cmd = next(self._cmds)
        assert self.proc.stdin is not None, "this script takes no commands"
        self.proc.stdin.write(json.dumps({"cmd": cmd, "op": op, **args}).encode() + b"\n")
        self.proc.stdin.flush()
        return cmd

    def answer(self, cmd: int, timeout_s: float = 15.0) -> Message:
        return self.wait_for(lambda m: m.get("cmd") == cmd, timeout_s, f"answer to command {cmd}")

    def call(self, op: str, timeout_s: float = 15.0, **args: Any) -> Any:
        """Run a command and return its value; AssertionError if it failed."""
        answer = self.answer(self.send(op, **args), timeout_s)
        assert answer["ok"], f"{op} {args} failed in {self.name}: {answer['error']}"
        return answer["value"]

    def call_error(self, op: str, timeout_s: float = 15.0, **args: Any) -> dict[str, Any]:
        """Run a command that must fail; return the error it reported."""
        answer = self.answer(self.send(op, **args), timeout_s)
        assert not answer["ok"], f"{op} {args} should have failed, got {answer['value']!r}"
        error: dict[str, Any] = answer["error"]
        return error

    # ------------------------------------------------------------ ending

    def kill(self) -> None:
        """SIGKILL: the script gets no chance to say goodbye to the broker."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        """End the process (SIGTERM, then SIGKILL after 5 s) and release its pipes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        self._log.close()


class NodeFactory:
    """Starts node scripts for one test and reaps them all at teardown."""

    def __init__(self, node: str, tmp_path: Path) -> None:
        self.node = node
        self.tmp_path = tmp_path
        self.started: list[NodeProcess] = []

    def __call__(self, script: str, *args: str, wait_ready: bool = True) -> NodeProcess:
        log = self.tmp_path / f"node{len(self.started)}-{script.replace('.mjs', '')}.log"
        proc = NodeProcess(self.node, script, args, log)
        self.started.append(proc)
        if wait_ready:
            proc.wait_ready()
        return proc

    def close_all(self) -> None:
        for proc in self.started:
            proc.close()
