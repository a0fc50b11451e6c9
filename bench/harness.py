"""What every workload needs around its measurement: child processes that are always
stopped, free loopback ports, CPU accounting from /proc, summary statistics,
machine facts and progress lines.

Nothing here knows about a particular system or protocol; workloads own that.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# Every run's JSON, kept: bench/results/<workload>.json is only the latest.
RUNS_DIR = RESULTS_DIR / "runs"

JSONDict = dict[str, Any]
Say = Callable[[str], None]


def load_pgserver() -> Any:
    """scripts/pgserver.py: the one home of installing system packages (apt-get) and
    of private PostgreSQL servers, for the tests and the benchmarks alike."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.append(scripts)
    import pgserver as module

    return module


class BenchError(RuntimeError):
    """A run could not be completed: a process died, timed out or answered wrongly."""


# ------------------------------------------------------------------ workloads


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line decided for every workload."""

    quick: bool
    runs: int
    log_dir: Path
    # Where py-spy profiles of zbroker go; None: no profiling.
    profile_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    """One benchmark: `run` measures and returns a JSON-able result, `markdown`
    renders that result as a table for docs/performance.md."""

    name: str
    summary: str
    run: Callable[[Options, Say], JSONDict]
    markdown: Callable[[JSONDict], str]


# ------------------------------------------------------------------ processes

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the benchmark itself is killed (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _pending: bytes = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, max_lines: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-max_lines:])

    def read_line(self, timeout_s: float) -> str:
        """The next line the child writes to stdout, or BenchError after `timeout_s`."""
        stdout = self.proc.stdout
        assert stdout is not None, f"{self.name} was started without a stdout pipe"
        fd = stdout.fileno()
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{self.name}: no output after {timeout_s:.0f}s")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self.failure("exited before reporting")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def failure(self, what: str) -> BenchError:
        code = self.proc.poll()
        status = "still running" if code is None else f"exit code {code}"
        tail = self.log_tail()
        detail = f"\n--- {self.log_path} ---\n{tail}" if tail else ""
        return BenchError(f"{self.name} {what} ({status}){detail}")


@dataclass
class ProcessGroup:
    """Children started for one run. Leaving the `with` block stops every one of them,
    whatever happened: each child leads its own process group, which is signalled
    as a whole (SIGTERM, then SIGKILL)."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout_pipe: bool = False,
        cwd: Path = ROOT,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                env=None if env is None else dict(env),
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def interrupt(self, child: Child, timeout_s: float = 15.0) -> int | None:
        """SIGINT the child alone (a profiler writes its output on it) and wait for it."""
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout_s)
        return self.stop(child)

    def check_alive(self, ignoring: Sequence[Child | None] = ()) -> None:
        """BenchError if any child has exited, other than those `ignoring`."""
        for child in self.children:
            if child not in ignoring and child.proc.poll() is not None:
                raise child.failure("died during the run")

    def stop(self, child: Child, grace_s: float = 5.0) -> int | None:
        """SIGTERM the child's group, SIGKILL it after `grace_s`; the exit code, if any."""
        proc = child.proc
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        # Whatever the leader did, leave nothing of its group behind.
        _signal_group(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
        _close(proc.stdout)
        return proc.returncode

    def stop_all(self) -> None:
        # Signal everyone first so they wind down in parallel, then reap.
        for child in self.children:
            if child.proc.poll() is None:
                _signal_group(child.pid, signal.SIGTERM)
        for child in reversed(self.children):
            self.stop(child)
        self.children.clear()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()


def python_argv(script: Path, *args: object) -> list[str]:
    """Run a bench script with the interpreter running the benchmark (the project venv)."""
    return [sys.executable, str(script), *(str(a) for a in args)]


# ------------------------------------------------------------------ network

# How long a bench peer waits for its ZMTP handshake (and a first answer) from a server.
CONNECT_TIMEOUT_MS = 10_000


def zmq_socket(ctx: Any, kind: int) -> Any:
    """A pyzmq socket of `kind` that drops what it has not sent when closed."""
    sock = ctx.socket(kind)
    sock.linger = 0
    return sock


def connect_handshaken(sock: Any, endpoint: str) -> None:
    """Connect and wait for the ZMTP handshake, so a peer reports ready only when it is."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.connect(endpoint)
        if not monitor.poll(CONNECT_TIMEOUT_MS):
            sys.exit(f"no ZMTP handshake with {endpoint} within {CONNECT_TIMEOUT_MS} ms")
        recv_monitor_message(monitor)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def free_tcp_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_listener(port: int, owner: Child, timeout_s: float = 20.0) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if owner.proc.poll() is not None:
            raise owner.failure(f"exited before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise owner.failure(f"not listening on port {port} after {timeout_s:.0f}s")
        time.sleep(0.02)


# ------------------------------------------------------------------ measuring


_CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of every thread of `pid` so far, or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS_PER_S


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil without floats going wrong
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def spread(values: Sequence[float]) -> JSONDict:
    """Median and range of one metric over repeated runs."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


# ------------------------------------------------------------------ profiling


def py_spy_path() -> Path:
    """The py-spy next to this interpreter (or on PATH); BenchError if there is none."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return local
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return Path(found)


def mixed_builds_lines(result: JSONDict) -> list[str]:
    """The warning a results table opens with when zbroker's sources changed during
    the run (`zbroker_source_digest` before and after differ); [] when they did not."""
    digests = result.get("zbroker_source_digest", {})
    if digests.get("before") == digests.get("after"):
        return []
    return ["**zbroker's sources changed during this run: the figures mix two builds.**", ""]


def start_py_spy(procs: ProcessGroup, name: str, pid: int, out: Path) -> Child:
    """Sample `pid` into a collapsed-stack file until interrupted with `procs.interrupt`.

    With native frames (`--native`): the compiled core's functions (mypyc's C) and
    libzmq's show up by name instead of folded into the Python frame that called
    them. py-spy reads native stacks only while the target is paused, so each sample
    stops the broker briefly and figures move: profiled runs are flagged in the
    results, and what to read from them is the shares, not the rates.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(py_spy_path()), "record", "--pid", str(pid), "--native"]
    argv += ["--rate", "200", "--format", "raw", "--output", str(out)]
    return procs.start(name, argv)


TRUNK_SHARE = 0.95


def top_functions(collapsed: Path, limit: int = 15) -> JSONDict:
    """Self and inclusive shares of the busiest functions in a collapsed-stack file,
    with line numbers dropped so each function counts once. Functions on the stack
    of at least TRUNK_SHARE of all samples are left out."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_function_of(frame) for frame in stack.split(";")]
        self_samples[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def shares(counter: Counter[str]) -> list[JSONDict]:
        rows = ((fn, n / total) for fn, n in counter.most_common() if total)
        # The call chain nearly every sample shares (interpreter start-up, CLI, the
        # event loop itself) says nothing about where time goes: leave it out.
        return [{"function": fn, "share": share} for fn, share in rows if share < TRUNK_SHARE][
            :limit
        ]

    return {"samples": total, "self": shares(self_samples), "inclusive": shares(inclusive)}


# The broker's event loop: its thread's samples are split by what it was doing.
LOOP_FUNCTION = "BrokerServer.serve_forever"


def loop_shares(collapsed: Path, limit: int = 8) -> JSONDict:
    """How the broker loop's thread spends its time at work: its samples split by the
    function right under the loop (reading frames, the core, the commit, sending),
    the poll that waits for messages (pyzmq's zmq_poll) counted apart as idle. Needs
    native stacks (`start_py_spy`) for the compiled core to appear by name."""
    parts: Counter[str] = Counter()
    waiting = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if LOOP_FUNCTION not in stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        at = max(i for i, frame in enumerate(frames) if LOOP_FUNCTION in frame)
        under = frames[at + 1] if at + 1 < len(frames) else LOOP_FUNCTION
        if "zmq/backend/cython" in under or under.startswith("zmq_poll"):
            waiting += int(count_text)
        else:
            parts[_function_of(under)] += int(count_text)
    busy = sum(parts.values())
    rows = [{"function": fn, "share": n / busy} for fn, n in parts.most_common(limit)]
    return {"busy_samples": busy, "waiting_samples": waiting, "shares": rows}


def summarize_profiles(
    profile_dir: Path, workload: str, systems: Sequence[str], say: Say
) -> JSONDict:
    """Merge each system's collapsed stacks (files `<workload>-<run>-<system>.txt`),
    then name its busiest functions and how the loop thread spends its time."""
    out: JSONDict = {}
    for system in systems:
        parts = sorted(profile_dir.glob(f"{workload}-[0-9]*-{system}.txt"))
        if not parts:
            continue
        merged = profile_dir / f"{workload}-{system}-merged.txt"
        with merged.open("w") as f:
            for part in parts:
                f.write(part.read_text(errors="replace"))
        top, loop = top_functions(merged), loop_shares(merged)
        say(f"py-spy, {system}: {fmt_count(top['samples'])} samples of the broker in {merged}")
        say_profile(top, loop, say)
        out[system] = {"collapsed_stacks": str(merged), **top, "loop": loop}
    return out


def say_profile(top: JSONDict, loop: JSONDict, say: Say, limit: int = 10) -> None:
    """Print a profile's busiest functions and its loop thread's split."""
    for kind in ("self", "inclusive"):
        say(f"  top functions by {kind} time:")
        for row in top[kind][:limit]:
            say(f"    {100 * row['share']:5.1f}%  {row['function']}")
    say(
        f"  the loop thread: {loop['busy_samples']} samples at work,"
        f" {loop['waiting_samples']} waiting in poll; at work:"
    )
    for row in loop["shares"]:
        say(f"    {100 * row['share']:5.1f}%  {row['function']}")


def _function_of(frame: str) -> str:
    # "name (path/to/file.py:123)" -> "name (path/to/file.py)"
    head, sep, where = frame.rpartition(" (")
    if not sep:
        return frame
    return f"{head} ({where.rstrip(')').rsplit(':', 1)[0]})"


# ------------------------------------------------------------------ reporting


def progress(tag: str) -> Say:
    def say(message: str) -> None:
        print(f"[{tag}] {message}", flush=True)

    return say


def fmt_count(value: float) -> str:
    return f"{value:,.0f}"


EN_DASH = "\u2013"


def fmt_range(s: JSONDict, fmt: Callable[[float], str]) -> str:
    """`median (min to max)`, joined by an en dash as typeset tables do."""
    return f"{fmt(s['median'])} ({fmt(s['min'])}{EN_DASH}{fmt(s['max'])})"


def machine_info() -> JSONDict:
    import msgpack  # type: ignore[import-untyped,unused-ignore]
    import zmq

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "zbroker_commit": _git_describe(),
        # Other work on the machine skews every figure; this says whether there was any.
        "load_average_1m_at_start": _load_average_1m(),
    }


def run_file_name(machine: JSONDict, workload: str, quick: bool) -> str:
    """The name of a run's JSON in RUNS_DIR: when it started, the workload, the commit
    measured, e.g. `20261123T184814Z-mdp-98afb055e6be.json` (names sort by date)."""
    started = dt.datetime.fromisoformat(machine["date"]).astimezone(dt.UTC)
    commit = str(machine["zbroker_commit"]).replace("+", "-")
    return f"{started:%Y%m%dT%H%M%SZ}-{workload}-{commit}{'-quick' if quick else ''}.json"


def machine_line(machine: JSONDict) -> str:
    cpus = machine["cpus_usable"] or machine["cpu_count"]
    return (
        f"{cpus} CPUs ({machine['cpu_model']}), {machine['platform']}, "
        f"Python {machine['python']}, pyzmq {machine['pyzmq']}, libzmq {machine['libzmq']}, "
        f"zbroker {machine['zbroker_commit']}, {machine['date']}"
    )


def _load_average_1m() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _git_describe() -> str:
    try:
        head = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "zbroker")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}"


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
    )
    return out.stdout.strip()


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the children."""

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
