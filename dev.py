#!/usr/bin/env python3
"""One entry point for people and CI: it builds the environment it needs, then runs.

    python3 dev.py start [ARGS...]   install zbroker into .venv and run `zbroker start ARGS`
    python3 dev.py test  [PYTEST...] lint, type-check and run the whole test suite,
                                     once on the compiled core, once on pure Python
    python3 dev.py build [--clean]   compile the hot modules with mypyc (zbroker/native.py)
    python3 dev.py unasync           regenerate zbroker/client/client.py from aclient.py
    python3 dev.py bench [ARGS...]   run the benchmarks (see bench/README.md)
    python3 dev.py example [ARGS...] run the example system (examples/voice-pipeline; --demo)

Only the standard library is used here, so this works on a machine that has
nothing but Python 3.11+ (and Node.js for the Node client's tests). `test` also
installs Debian's Chromium for the console's browser tests when it is missing
(apt-get, as root).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
NODE_CLIENT = ROOT / "clients" / "node"
UNASYNC = ROOT / "scripts" / "unasync.py"
BUILD_NATIVE = ROOT / "scripts" / "build_native.py"
NO_COMPILER = 3  # build_native.py's exit status when this machine cannot compile
PURE = {"ZBROKER_PURE": "1"}
# The console's browser tests drive Debian's Chromium (Playwright downloads no browser here).
CHROMIUM = Path("/usr/bin/chromium")


def say(msg: str) -> None:
    print(f"[dev] {msg}", flush=True)


def run(cmd: list[str | os.PathLike[str]], **kw: object) -> None:
    say("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        sys.exit(proc.returncode)


def ensure_venv(extras: str) -> None:
    """Create .venv and (re)install the project when pyproject.toml or the extras change."""
    if not PY.exists():
        say(f"creating virtual environment in {VENV}")
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        run([PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    stamp = VENV / f".dev-stamp-{extras or 'base'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    say(f"installing zbroker ({extras or 'runtime'} dependencies)")
    run([PY, "-m", "pip", "install", "--quiet", "-e", target])
    stamp.write_text(digest)


def ensure_node_deps() -> bool:
    if not (NODE_CLIENT / "package.json").exists():
        return False
    if shutil.which("node") is None or shutil.which("npm") is None:
        sys.exit("Node.js and npm are needed for the Node client's tests")
    lock = NODE_CLIENT / "package-lock.json"
    stamp = NODE_CLIENT / "node_modules" / ".dev-stamp"
    digest = hashlib.sha256(
        (NODE_CLIENT / "package.json").read_bytes() + (lock.read_bytes() if lock.exists() else b"")
    ).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest):
        run(
            ["npm", "ci" if lock.exists() else "install", "--no-audit", "--no-fund"],
            cwd=NODE_CLIENT,
        )
        stamp.write_text(digest)
    return True


def ensure_chromium() -> None:
    """Install Debian's Chromium for the console's browser tests when it is missing."""
    if CHROMIUM.exists():
        return
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if shutil.which("apt-get") is None or not as_root:
        sys.exit(f"{CHROMIUM} is needed for the console's tests: apt-get install -y chromium")
    say("installing Chromium (Debian's package) for the console's browser tests")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-q"], env=env)
    run(["apt-get", "install", "-y", "-q", "chromium"], env=env)


def ensure_postgres() -> None:
    """Install PostgreSQL's server (Debian's package) for the journal's tests when
    missing; the tests start a private one (tests/pg.py) unless ZBROKER_TEST_POSTGRES
    names a server to use."""
    if os.environ.get("ZBROKER_TEST_POSTGRES"):
        return
    run([sys.executable, ROOT / "scripts" / "pgserver.py", "install"])


def build_native(required: bool = False) -> bool:
    """Compile the hot modules when this machine can (skipped when up to date);
    whether a compiled build is ready. `required`: a failed build stops here."""
    say("compiled core (mypyc): building when out of date")
    proc = subprocess.run([str(PY), str(BUILD_NATIVE)], cwd=ROOT)
    if proc.returncode == 0:
        return True
    if proc.returncode == NO_COMPILER:
        say("the pure-Python core runs (this machine cannot compile it)")
        return False
    if required:
        sys.exit(proc.returncode)
    say("the compiled build failed: the pure-Python core runs")
    return False


def which_core(env: dict[str, str] | None = None) -> None:
    """Say which build of the core a process with `env` runs."""
    code = "import zbroker.native as n; print(n.describe())"
    out = subprocess.run([str(PY), "-c", code], env=env, capture_output=True, text=True)
    say(f"core: {out.stdout.strip() or out.stderr.strip()}")


def cmd_start(args: list[str]) -> None:
    ensure_venv("build")  # mypy carries mypyc, which compiles the core
    build_native()
    which_core()
    os.execv(str(BIN / "zbroker"), [str(BIN / "zbroker"), "start", *args])


def cmd_test(args: list[str]) -> None:
    ensure_venv("test")
    have_node = ensure_node_deps()
    ensure_chromium()
    ensure_postgres()
    linted = ["zbroker", "tests", "bench", "examples", "scripts", "dev.py"]
    run([BIN / "ruff", "check", *linted], cwd=ROOT)
    run([BIN / "ruff", "format", "--check", *linted], cwd=ROOT)
    run([BIN / "mypy", "zbroker", "scripts"], cwd=ROOT)
    # The blocking Client is generated from AsyncClient: fail while it is stale.
    run([sys.executable, UNASYNC, "--check"], cwd=ROOT)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("ZBROKER_PURE", None)
    builds = [("pure Python", dict(env, **PURE))]
    if build_native(required=True):
        builds.insert(0, ("compiled", env))
    # The whole suite runs on each build: the same sources, two ways of running them.
    for name, build_env in builds:
        say(f"--- the whole test suite on the {name} core ---")
        which_core(build_env)
        if have_node:
            run(["npm", "test"], cwd=NODE_CLIENT, env=build_env)
        run([PY, "-m", "pytest", *args], cwd=ROOT, env=build_env)


def cmd_build(args: list[str]) -> None:
    ensure_venv("build")
    if args == ["--clean"]:
        run([PY, BUILD_NATIVE, "--clean"], cwd=ROOT)
    elif args:
        sys.exit("usage: python3 dev.py build [--clean]")
    else:
        build_native(required=True)
    which_core()


def cmd_unasync(args: list[str]) -> None:
    run([sys.executable, UNASYNC, *args], cwd=ROOT)


def cmd_bench(args: list[str]) -> None:
    ensure_venv("bench")
    ensure_venv("build")  # mypyc, for the compiled core the benchmarks measure
    build_native()
    which_core()
    os.execv(str(PY), [str(PY), str(ROOT / "bench" / "run.py"), *args])


def cmd_example(args: list[str]) -> None:
    ensure_venv("")
    ensure_node_deps()  # the example's speaker is a Node service
    run_py = ROOT / "examples" / "voice-pipeline" / "run.py"
    os.execv(str(PY), [str(PY), str(run_py), *args])


def main() -> None:
    commands = {
        "start": cmd_start,
        "test": cmd_test,
        "build": cmd_build,
        "unasync": cmd_unasync,
        "bench": cmd_bench,
        "example": cmd_example,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__)
        sys.exit(2)
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
