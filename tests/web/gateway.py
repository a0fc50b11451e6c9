"""A real `zbroker web` process for tests, and a small HTTP client over real sockets.

`Http` speaks HTTP/1.1 through http.client (one keep-alive connection); `sse`
reads Server-Sent Events off a response, event by event, with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, BrokerProcess, free_port


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        return str(self.json["error"]["code"])


@dataclass
class GatewayProcess:
    """`zbroker web` beside a test broker."""

    broker: BrokerProcess
    log_path: Path
    extra: list[str] = field(default_factory=list)
    root_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "zbroker",
            *self.root_args,
            "web",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--endpoint",
            self.broker.endpoint,
            "--events-in",
            self.broker.events_in,
            "--events-out",
            self.broker.events_out,
            *self.extra,
        ]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                cwd=ROOT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"zbroker web exited:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"zbroker web not listening within 20s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def http(self, token: str | None = None) -> Http:
        return Http(self.port, token)


class Http:
    """One keep-alive HTTP/1.1 connection to the gateway."""

    def __init__(self, port: int, token: str | None = None, timeout_s: float = 15.0) -> None:
        self.port = port
        self.token = token
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        self.conn.request(method, path, body=data, headers=sent)
        response = self.conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.request("POST", path, body, **kw)

    def open_stream(self, path: str, headers: dict[str, str] | None = None) -> Sse:
        """A GET whose answer is read as Server-Sent Events (its own connection)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        sent = dict(headers or {})
        if self.token is not None:
            sent["Authorization"] = f"Bearer {self.token}"
        conn.request("GET", path, headers=sent)
        return Sse(conn, conn.getresponse())

    def close(self) -> None:
        self.conn.close()


@dataclass
class SseEvent:
    event: str
    data: Any
    id: str | None


class Sse:
    """The events of one text/event-stream response, in order."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self.conn = conn
        self.response = response
        self.status = response.status

    def __iter__(self) -> Iterator[SseEvent]:
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                return
            text = line.decode().rstrip("\r\n")
            if text.startswith(":"):
                continue
            if text:
                name, _, value = text.partition(":")
                fields[name] = value.removeprefix(" ")
                continue
            if "data" in fields:
                yield SseEvent(
                    fields.get("event", "message"), json.loads(fields["data"]), fields.get("id")
                )
            fields = {}

    def next(self) -> SseEvent:
        return next(iter(self))

    def close(self) -> None:
        self.conn.close()
