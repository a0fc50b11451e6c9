"""Prometheus metrics and a health check over HTTP, in a thread of the broker process.

Every scrape asks the broker itself, over its own ROUTER socket, with the
admin calls QUEUES and STATS (docs/protocol.md §11): the figures are the
broker's exact bookkeeping, the same `zbroker queues --json` and `zbroker
status` print, never numbers rebuilt from events. The loop answers those
calls between two passes, so a scrape never sees half a pass. QUEUES is read
a page at a time (MAX_QUEUES_PAGE services), one call after the other: the
loop's share of a scrape is one page per pass it answers in, whatever the
number of services, and workers' heartbeats are served in between.

  GET /metrics  Prometheus text format; with a token (--metrics-token-file), only
                for `Authorization: Bearer <token>`, else 401
  GET /health   200 {"status": "ok", ...} when the broker answers, else 503; never
                asks for the token (it tells nothing but ok and the uptime)
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from zbroker.protocol import zbc
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.limits import MAX_QUEUES_PAGE
from zbroker.protocol.states import QUEUE_COUNTS, TaskState

log = logging.getLogger("zbroker.metrics")

# The per-state counts of QUEUES, exported as gauges: state -> (metric name, help).
_STATE_GAUGES = {
    TaskState.READY: ("zbroker_tasks_ready", "Durable tasks waiting to be delivered."),
    TaskState.DELAYED: (
        "zbroker_tasks_delayed",
        "Durable tasks waiting for their time (delay, backoff).",
    ),
    TaskState.BLOCKED: (
        "zbroker_tasks_blocked",
        "Durable tasks waiting for the tasks they depend on.",
    ),
    TaskState.INFLIGHT: ("zbroker_tasks_inflight", "Durable tasks with an attempt at a worker."),
    # Not zbroker_tasks_dead: that family is the broker's counter of tasks that died.
    TaskState.DEAD: ("zbroker_dead_letters", "Durable tasks in the dead-letter queue."),
    TaskState.DONE: ("zbroker_tasks_done_retained", "Finished tasks whose result is still kept."),
}
# Queue figures exported as gauges: QUEUES field -> (metric name, help). Every state
# count QUEUES gives has its gauge (a state added to QUEUE_COUNTS alone fails here).
_QUEUE_GAUGES = {
    **{state.value: _STATE_GAUGES[state] for state in QUEUE_COUNTS},
    "requests": ("zbroker_requests_queued", "MDP requests waiting for a worker."),
    "workers": ("zbroker_workers", "Registered workers."),
    "credit": ("zbroker_worker_credit", "Tasks the service's workers may hold at once."),
    "credit_in_use": ("zbroker_worker_credit_in_use", "Tasks the service's workers hold."),
    "oldest_age_s": ("zbroker_oldest_waiting_seconds", "Age of the oldest waiting task."),
}


# Per-service totals since the broker started: QUEUES field prefix -> help.
_SERVICE_COUNTERS = {
    "enqueued": "Durable tasks enqueued.",
    "done": "Durable tasks done.",
    "failed": "Attempts that ended without DONE.",
    "dead": "Durable tasks moved to the dead-letter queue.",
    "redeliveries": "Deliveries after the first of a task.",
}
# Histograms since the broker started.
_SERVICE_TIMES = {
    "wait": "Time from enqueue (or due time) to the first delivery.",
    "run": "Time from delivery to DONE.",
}


class BrokerAsker:
    """Admin calls to the broker from another thread: one DEALER per call (cheap at
    scrape rates, and nothing is shared with the broker's own thread)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, timeout_s: float):
        self._ctx = ctx
        self._endpoint = endpoint
        self._timeout_ms = int(timeout_s * 1000)
        self._rid = 0
        self._lock = threading.Lock()

    def call(self, command: bytes) -> dict[str, Any]:
        sock = self._socket()
        try:
            return self._ask(sock, command)
        finally:
            sock.close(linger=0)

    def queues(self) -> list[dict[str, Any]]:
        """Every QUEUES row, page after page on one connection."""
        rows: list[dict[str, Any]] = []
        after: str | None = None
        sock = self._socket()
        try:
            while True:
                meta = self._ask(sock, zbc.QUEUES, limit=MAX_QUEUES_PAGE, after=after)
                rows += meta["queues"]
                after = meta.get("next")
                if after is None:
                    return rows
        finally:
            sock.close(linger=0)

    def _socket(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(self._endpoint)
        return sock

    def _ask(self, sock: zmq.Socket[bytes], command: bytes, **fields: Any) -> dict[str, Any]:
        with self._lock:
            self._rid += 1
            rid = self._rid
        sock.send_multipart(zbc.call(command, rid, **fields))
        while sock.poll(self._timeout_ms):
            answer = zbc.decode_answer(sock.recv_multipart())
            if answer.rid == rid and answer.ok:
                return answer.meta
        raise TimeoutError(f"no answer from the broker at {self._endpoint}")


class BrokerCollector:
    """A prometheus_client collector reading QUEUES and STATS at each scrape."""

    def __init__(self, asker: BrokerAsker) -> None:
        self._asker = asker

    def collect(self) -> Iterator[Metric]:
        try:
            queues = self._asker.queues()
            stats = self._asker.call(zbc.STATS)
        except (TimeoutError, ProtocolError, zmq.ZMQError, KeyError) as exc:
            log.warning("metrics scrape failed: %s", exc)
            up = GaugeMetricFamily("zbroker_up", "1 when the broker answered this scrape.")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("zbroker_up", "1 when the broker answered this scrape.")
        up.add_metric([], 1)
        yield up
        for field, (name, text) in _QUEUE_GAUGES.items():
            gauge = GaugeMetricFamily(name, text, labels=["service"])
            for row in queues:
                gauge.add_metric([row["service"]], float(row[field]))
            yield gauge
        for field, text in _SERVICE_COUNTERS.items():
            counter = CounterMetricFamily(f"zbroker_service_{field}", text, labels=["service"])
            for row in queues:
                counter.add_metric([row["service"]], float(row.get(f"{field}_total", 0)))
            yield counter
        for field, text in _SERVICE_TIMES.items():
            histogram = HistogramMetricFamily(
                f"zbroker_task_{field}_seconds", text, labels=["service"]
            )
            for row in queues:
                data = row.get(f"{field}_histogram")
                if data:
                    buckets = [(str(bound), float(n)) for bound, n in data["buckets"]]
                    histogram.add_metric([row["service"]], buckets, float(data["sum"]))
            yield histogram
        paused = GaugeMetricFamily("zbroker_service_paused", "1 while paused.", labels=["service"])
        for row in queues:
            paused.add_metric([row["service"]], 1.0 if row.get("paused") else 0.0)
        yield paused
        for counter, value in stats["stats"].items():
            family = CounterMetricFamily(
                f"zbroker_{counter}", f"Broker counter {counter} since start."
            )
            family.add_metric([], float(value))
            yield family
        malformed = CounterMetricFamily(
            "zbroker_malformed", "Malformed messages dropped, by reason.", labels=["reason"]
        )
        for reason, value in stats["malformed"].items():
            malformed.add_metric([reason], float(value))
        yield malformed
        auth = stats.get("auth")
        if auth:
            admitted = CounterMetricFamily(
                "zbroker_handshakes_admitted", "CURVE handshakes the ZAP handler admitted."
            )
            admitted.add_metric([], float(auth["admitted"]))
            yield admitted
            refused = CounterMetricFamily(
                "zbroker_refused",
                "Handshakes, calls, requests, worker messages, publishes and subscriptions"
                " refused by --auth, by kind.",
                labels=["kind"],
            )
            for kind, value in auth["refused"].items():
                refused.add_metric([kind], float(value))
            yield refused
        uptime = GaugeMetricFamily("zbroker_uptime_seconds", "Seconds since the broker started.")
        uptime.add_metric([], float(stats["uptime_s"]))
        yield uptime
        journal = stats.get("journal")
        if journal:
            yield from _journal_metrics(journal)


# The journal's figures: STATS `journal` field, metric name, help, counter or gauge.
_JOURNAL_METRICS = (
    ("commits", "zbroker_journal_commits", "Journal commits that wrote something.", True),
    (
        "commit_seconds_total",
        "zbroker_journal_commit_seconds",
        "Time spent in journal commits (fsync included).",
        True,
    ),
    ("bytes_used", "zbroker_journal_bytes", "Bytes the journal uses on disk.", False),
    (
        "record_writes",
        "zbroker_journal_record_writes",
        "Task records the journal wrote or deleted (a held START is none).",
        True,
    ),
    (
        "flushes",
        "zbroker_journal_flushes",
        "Flushes to disk the journal asked for (sync: one per commit, one per settle).",
        True,
    ),
    (
        "crashes",
        "zbroker_journal_crashes",
        "Lives of the journal that ended without a clean stop, before this one.",
        False,
    ),
)


def _journal_metrics(journal: dict[str, Any]) -> Iterator[Metric]:
    """The journal's figures (STATS `journal`), for a broker that has one."""
    for field, name, text, counter in _JOURNAL_METRICS:
        family = CounterMetricFamily(name, text) if counter else GaugeMetricFamily(name, text)
        family.add_metric([], float(journal.get(field, 0)))
        yield family


class MetricsTokenError(OSError):
    """Raised when the metrics token file cannot be read or holds no usable token. An
    OSError, so that the broker's start handles it as a metrics port it cannot bind:
    what is open is closed, and one line says why."""


class _QuietHTTPServer(ThreadingHTTPServer):
    """A scraper that drops its connection is logged (debug), not printed to stderr
    as a traceback past the broker's log format."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: request from %s failed: %r", client_address, sys.exc_info()[1])


class MetricsServer:
    """The HTTP endpoint, in a daemon thread; `stop()` shuts it down. With a `token`,
    /metrics answers only requests that carry it as a bearer token."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        broker_endpoint: str,
        host: str,
        port: int,
        token: str | None = None,
    ) -> None:
        # Compared as bytes: http.server decodes header values as Latin-1, so encoding
        # them back gives the bytes the client sent (a UTF-8 token matches too).
        expected = None if token is None else token.encode()
        asker = BrokerAsker(ctx, broker_endpoint, timeout_s=2.0)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector(asker))

        class Handler(BaseHTTPRequestHandler):
            timeout = 10.0  # seconds a connection may sit idle before it is closed

            def do_GET(self) -> None:
                if self.path.split("?")[0] == "/metrics":
                    if expected is not None and not self._bearer_is(expected):
                        self._send(
                            401,
                            "text/plain",
                            b"unauthorized: /metrics needs Authorization: Bearer <token>\n",
                            {"WWW-Authenticate": 'Bearer realm="zbroker"'},
                        )
                        return
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                elif self.path == "/health":
                    try:
                        stats = asker.call(zbc.STATS)
                        body = {"status": "ok", "uptime_s": stats["uptime_s"]}
                        self._send(200, "application/json", json.dumps(body).encode())
                    except (TimeoutError, ProtocolError, zmq.ZMQError) as exc:
                        body = {"status": "unavailable", "error": str(exc)}
                        self._send(503, "application/json", json.dumps(body).encode())
                else:
                    self._send(404, "text/plain", b"not found: try /metrics or /health\n")

            def _bearer_is(self, expected: bytes) -> bool:
                scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
                given_bytes = given.strip().encode("latin-1")
                return scheme.lower() == "bearer" and hmac.compare_digest(given_bytes, expected)

            def _send(
                self,
                code: int,
                content_type: str,
                body: bytes,
                headers: dict[str, str] | None = None,
            ) -> None:
                self.send_response(code)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http %s", format % args)

        self.asks_token = token is not None
        self._httpd = _QuietHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="zbroker-metrics", daemon=True
        )

    @staticmethod
    def read_token(path: Path | None) -> str | None:
        """The token in `path` (None: no file, no token), surrounding whitespace
        stripped. Read once, at the broker's start; MetricsTokenError names the file
        when it cannot be read or holds no single-line token."""
        if path is None:
            return None
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MetricsTokenError(
                f"cannot read the metrics token file {path}: {exc.strerror or exc}"
            ) from exc
        except UnicodeDecodeError:
            raise MetricsTokenError(f"the metrics token file {path} is not UTF-8 text") from None
        if not token:
            raise MetricsTokenError(f"the metrics token file {path} is empty")
        # A header is one line of text: no request could ever carry such a token.
        if not token.isprintable():
            raise MetricsTokenError(
                f"the metrics token file {path} must hold one line"
                " (no line breaks or control characters inside the token)"
            )
        return token

    def start(self) -> None:
        self._thread.start()
        # Never the token itself: only whether one is asked for.
        if self.asks_token:
            log.info("metrics: /metrics asks for a bearer token; /health does not")
        else:
            log.info("metrics: /metrics asks for no token (no --metrics-token-file)")

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
