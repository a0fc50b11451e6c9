"""A private PostgreSQL server for the tests and the benchmarks: installed from the
system's packages when missing, started in a directory of its own, on loopback only,
on a free port, and stopped with its caller.

    python3 scripts/pgserver.py install     # apt-get install postgresql, when missing
    python3 scripts/pgserver.py run DIR     # start one, print its URL, stop on Ctrl-C

The tests start one per session (tests/pg.py) unless ZBROKER_TEST_POSTGRES names a
server to use; bench/postgres.py starts one per run. Standard library only: dev.py
installs the server before the project's environment exists.

PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user
the Debian package creates, in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from itertools import count
from pathlib import Path

# The database and role every private server has: the URL's path and user.
DATABASE = "zbroker"
ROLE = "zbroker"
READY_TIMEOUT_S = 60.0
PACKAGE = "postgresql"


class PostgresError(RuntimeError):
    """The private server could not be installed or started: the message says why."""


def bin_dir() -> Path | None:
    """Where this machine's PostgreSQL server programs are (the newest version), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_version_of)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return None if on_path is None else Path(on_path).resolve().parent


def _version_of(path: str) -> int:
    try:
        return int(Path(path).parts[-3])
    except ValueError:
        return 0


def apt_install(packages: list[str]) -> None:
    """apt-get install `packages` (as root, without prompts), keeping them from
    starting their own system-wide services (the project starts its own servers):
    a policy-rc.d is placed while installing, only if none is there already.
    RuntimeError (PostgresError) with apt-get's message when it fails."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    placed = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# placed by zbroker while installing packages\nexit 101\n")
        policy.chmod(0o755)
        placed = True
    try:
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        ):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise PostgresError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    finally:
        if placed:
            policy.unlink(missing_ok=True)


def install(say: object = print) -> Path:
    """The server's programs, installed with apt-get (as root) when missing."""
    found = bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PostgresError(f"PostgreSQL is needed: apt-get install -y {PACKAGE}")
    say(f"installing PostgreSQL (Debian's package {PACKAGE!r}) for the tests")  # type: ignore[operator]
    apt_install([PACKAGE])
    found = bin_dir()
    if found is None:
        raise PostgresError(f"apt-get installed {PACKAGE} but no postgres program was found")
    return found


def with_schema(url: str, schema: str) -> str:
    """`url` with libpq's `options` setting search_path to `schema`: the journal's
    tables (unqualified names) are then made and read there."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    query.append(("options", f"-csearch_path={schema}"))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


_schemas = count(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """One PostgreSQL server of our own. `start()` makes its cluster (the first time)
    and starts it; `stop()` stops it; `url` is where clients connect (trust
    authentication on loopback: it is nobody else's)."""

    def __init__(self, root: Path | None = None, fsync: bool = True) -> None:
        self.bin = install()
        self.fsync = fsync
        self._own_root = root is None
        # Under /tmp, not a pytest tmp_path: the server's user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="zbroker-pg-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresError("as root, the server needs the `postgres` user") from exc
            self._user = "postgres"
            os.chmod(self.root, 0o755)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    @property
    def url(self) -> str:
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            user=self._user,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.root,
        )
        if done.returncode != 0:
            raise PostgresError(f"{argv[0]} failed: {done.stderr.strip()[-2000:]}")

    def start(self) -> str:
        """Start the server (making its cluster on first use); its URL once it answers."""
        if not self.data.exists():
            self._run(
                *("initdb", "-D", str(self.data), "-U", ROLE, "-A", "trust"),
                *("-E", "UTF8", "--no-sync", "--locale=C"),
            )
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        settings = {
            "listen_addresses": "127.0.0.1",
            "fsync": "on" if self.fsync else "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
        }
        argv = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        argv += ["-k", str(self.root)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        self.proc = subprocess.Popen(
            argv,
            user=self._user,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise PostgresError(f"postgres exited at start:\n{self._log_tail()}")
            done = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if done.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise PostgresError(f"postgres did not answer in time:\n{self._log_tail()}")
            time.sleep(0.1)
        self._create_database()
        return self.url

    def _create_database(self) -> None:
        query = f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"
        if self._psql("-d", "postgres", "-tAc", query).strip() != "1":
            self._psql("-d", "postgres", "-c", f"CREATE DATABASE {DATABASE}")

    def fresh_url(self) -> str:
        """The URL of a new, empty schema of this server (a journal of its own)."""
        name = f"zb_{os.getpid()}_{next(_schemas)}"
        self._psql("-d", DATABASE, "-c", f"CREATE SCHEMA {name}")
        return with_schema(self.url, name)

    def _psql(self, *args: str) -> str:
        psql = self.bin / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        base = ["-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, "-v", "ON_ERROR_STOP=1"]
        done = subprocess.run([str(psql), *base, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise PostgresError(f"psql {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server (a fast shutdown: sessions are ended), and remove its
        directory if it made it."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        print(install())
        return 0
    if argv[:1] == ["run"]:
        server = PrivateServer(Path(argv[1]) if len(argv) > 1 else None)
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # sigwait takes them, nothing else
        try:
            print(server.start(), flush=True)
            signal.sigwait(stop)
        finally:
            server.stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
