"""`fuzz`: the hostile-peer fuzzer of tests/hostile/fuzz.py, a million messages long.

    python3 dev.py bench --only fuzz                          1,000,000 messages, seed 1
    python3 dev.py bench --only fuzz --messages 200000 --seed 7
    python3 dev.py bench --only fuzz --quick                  50,000 messages

One fresh `zbroker start` process (sync journal in a temporary directory, finished
tasks kept RETENTION_S, defaults otherwise) takes every protocol the fuzzer speaks:
MDPC01, MDPW01, ZBW01 and ZBC01 peers on the ROUTER (some with their own routing id,
reconnecting now and then), a publisher on events-in, subscribers on events-out. Every
PROBE_EVERY messages a fresh DEALER asks 8/MMI and STATS; the run reports messages
sent per protocol, whether the broker exited (a crash), probes answered and missed,
the refusals STATS counted by reason, the broker's RSS (VmRSS) at start, peak and end
against BENCH_RSS_BUDGET_MIB, and the duration. Unlike the test, a missed probe or an
RSS over the budget does not stop the run: it is counted.
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import Any

import zmq
from harness import (
    ROOT,
    Child,
    JSONDict,
    Options,
    ProcessGroup,
    Say,
    Workload,
    fmt_count,
    free_tcp_ports,
    wait_for_listener,
)

sys.path.insert(0, str(ROOT))  # tests.hostile.fuzz: the fuzzer the test suite runs too

from tests.hostile.fuzz import (
    PROBE_DEADLINE_S,
    Endpoints,
    Fuzzer,
    FuzzReport,
    probe,
)

DEFAULT_MESSAGES = 1_000_000
QUICK_MESSAGES = 50_000
DEFAULT_SEED = 1
PROBE_EVERY = 1_000
# One costly shot (a batch of 10,000 tasks, a message near or over a cap...) per this
# many messages: 100 in a million.
HEAVY_EVERY = 10_000
# Finished tasks (the fuzz clients store and cancel many) are kept this long instead of
# the default hour: each costs the broker memory while it is kept, and a million
# messages store hundreds of thousands, which would hide in the RSS whatever else grew.
RETENTION_S = 60
# The broker's RSS budget over a million messages, in MiB (the test's, RSS_BUDGET_MIB,
# is for 10,000). Measured on 2026-12-07, seed 1: 45 MiB at start, peaks of 663 and
# 682 in two runs, still rising slowly at the end (bench/results/fuzz.json); mostly
# native memory (libzmq's queues, glibc's heap after many-MiB messages), see the README.
BENCH_RSS_BUDGET_MIB = 1024
PROGRESS_STEPS = 20
READY_TIMEOUT_S = 20.0


def _broker_argv(ports: list[int], data_dir: str) -> list[str]:
    router, events_in, events_out = (f"tcp://127.0.0.1:{p}" for p in ports)
    return [
        sys.executable,
        "-m",
        "zbroker",
        "start",
        "--bind",
        router,
        "--events-in",
        events_in,
        "--events-out",
        events_out,
        "--data-dir",
        data_dir,
        "--log-level",
        "warning",
        "--retention",
        str(RETENTION_S),
    ]


def _wait_ready(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, broker: Child) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if broker.proc.poll() is not None:
            raise broker.failure("exited before answering")
        if probe(ctx, endpoint, 0.5).latency_s is not None:
            return
    raise broker.failure(f"did not answer a probe within {READY_TIMEOUT_S:.0f}s")


def _progress(say: Say, total: int) -> Any:
    def show(report: FuzzReport) -> None:
        rate = report.messages / report.duration_s if report.duration_s else 0.0
        say(
            f"{fmt_count(report.messages)}/{fmt_count(total)} messages "
            f"({fmt_count(rate)}/s), probes {report.probes_answered} answered / "
            f"{report.probes_missed} missed, broker RSS {report.rss_end_kib / 1024:.0f} MiB "
            f"(peak {report.rss_peak_kib / 1024:.0f})"
        )

    return show


def run_fuzz(options: Options, say: Say, messages: int, seed: int) -> JSONDict:
    """One fuzz run against a fresh broker; the figures as a JSON-able dict."""
    ports = free_tcp_ports(3)
    endpoints = Endpoints(*(f"tcp://127.0.0.1:{p}" for p in ports))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with (
        ProcessGroup(options.log_dir) as procs,
        tempfile.TemporaryDirectory(prefix="zbroker-fuzz-") as data_dir,
    ):
        broker = procs.start("fuzz-broker", _broker_argv(ports, data_dir))
        try:
            wait_for_listener(ports[0], broker)
            _wait_ready(ctx, endpoints.router, broker)
            say(f"seed {seed}: {fmt_count(messages)} messages to broker pid {broker.pid}")
            fuzzer = Fuzzer(
                ctx,
                endpoints,
                broker.pid,
                alive=lambda: broker.proc.poll() is None,
                seed=seed,
                probe_every=PROBE_EVERY,
                heavy_every=HEAVY_EVERY,
                allow_huge=True,
                rss_budget_mib=BENCH_RSS_BUDGET_MIB,
            )
            report = fuzzer.run(
                messages,
                progress=_progress(say, messages),
                progress_every=max(1, messages // PROGRESS_STEPS),
                stop_on_failure=False,
            )
        finally:
            ctx.destroy(linger=0)
        exit_code = broker.proc.poll()
        log_tail = broker.log_tail(60) if exit_code is not None or report.failure else ""
    say(report.summary())
    if report.failure:
        say(f"FAILURE: {report.failure}")
    return _result(report, messages, exit_code, log_tail)


def _result(report: FuzzReport, wanted: int, exit_code: int | None, log_tail: str) -> JSONDict:
    malformed = {
        reason: count - report.malformed_start.get(reason, 0)
        for reason, count in sorted(report.malformed_end.items())
    }
    return {
        "seed": report.seed,
        "messages_wanted": wanted,
        "messages_sent": report.messages,
        "messages_by_protocol": dict(sorted(report.by_kind.items())),
        "messages_by_endpoint": dict(sorted(report.by_target.items())),
        "answers_read": report.answers,
        "reconnects": report.reconnects,
        "send_timeouts": report.send_timeouts,
        "crashes": 0 if exit_code is None else 1,
        "broker_exit_code": exit_code,
        "probes_answered": report.probes_answered,
        "probes_missed": report.probes_missed,
        "probe_deadline_s": PROBE_DEADLINE_S,
        "probe_slowest_s": round(report.probe_max_s, 4),
        "malformed_by_reason": malformed,
        "malformed_total": sum(malformed.values()),
        "broker_stats_at_end": report.stats_end.get("stats", {}),
        "rss_mib": {
            "start": round(report.rss_start_kib / 1024, 1),
            "peak": round(report.rss_peak_kib / 1024, 1),
            "end": round(report.rss_end_kib / 1024, 1),
            "budget": BENCH_RSS_BUDGET_MIB,
        },
        "duration_s": round(report.duration_s, 1),
        "messages_per_s": round(report.messages / report.duration_s) if report.duration_s else 0,
        "failure": report.failure,
        "last_shots": report.last_shots[-20:] if report.failure else [],
        "broker_log_tail": log_tail,
    }


def workload(messages: int | None = None, seed: int | None = None) -> Workload:
    """The workload with its own options (`dev.py bench --messages N --seed S`)."""

    def run(options: Options, say: Say) -> JSONDict:
        wanted = messages or (QUICK_MESSAGES if options.quick else DEFAULT_MESSAGES)
        result = run_fuzz(options, say, wanted, DEFAULT_SEED if seed is None else seed)
        if result["crashes"]:
            code, tail = result["broker_exit_code"], result["broker_log_tail"]
            say(f"the broker exited (code {code}):\n{tail}")
        return result

    return Workload(
        "fuzz",
        "a million hostile messages over all protocols: crashes, probes, RSS",
        run,
        markdown,
    )


def markdown(result: JSONDict) -> str:
    rss = result["rss_mib"]
    by_protocol = ", ".join(
        f"{k} {fmt_count(v)}" for k, v in result["messages_by_protocol"].items()
    )
    malformed = ", ".join(f"{k} {fmt_count(v)}" for k, v in result["malformed_by_reason"].items())
    rows = [
        ("seed", str(result["seed"])),
        ("messages sent", f"{fmt_count(result['messages_sent'])} ({by_protocol})"),
        ("crashes", str(result["crashes"])),
        (
            "probes answered / missed",
            f"{result['probes_answered']} / {result['probes_missed']} "
            f"(slowest {result['probe_slowest_s']:.3f} s, deadline {result['probe_deadline_s']} s)",
        ),
        ("refused as malformed", f"{fmt_count(result['malformed_total'])} ({malformed})"),
        ("ZBC01 calls refused", fmt_count(result["broker_stats_at_end"].get("calls_refused", 0))),
        (
            "broker RSS start / peak / end",
            f"{rss['start']:.0f} / {rss['peak']:.0f} / {rss['end']:.0f} MiB "
            f"(budget {rss['budget']})",
        ),
        (
            "duration",
            f"{result['duration_s']:.0f} s ({fmt_count(result['messages_per_s'])} messages/s)",
        ),
        ("failure", result["failure"] or "none"),
    ]
    lines = ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


WORKLOAD = workload()
