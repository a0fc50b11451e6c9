"""Workload "auth": what CURVE authentication (`zbroker start --auth FILE`) costs,
each figure measured without and with it in the same rounds.

The durable workload's machinery, with the auth file and keys made once in a
temporary directory (`zmq.auth` certificates: the broker's pair and one principal
`bench` with the roles `client` and `worker` for the service `bench`), `--auth` on
the broker's command line and the peers' CURVE keys in the environment variables
bench/durable_peers.py reads (BENCH_CURVE_SERVER_KEY, BENCH_CURVE_KEY). Cases, each
run without and with `--auth`, which of the two goes first alternating case by case
and round by round:

- `sync-single`, `sync-batch`: durable throughput, `durable.run_tasks` as the
  durable workload runs it (fresh broker, 2 ZBW01 workers, producers);
- `request-sync`, `request-memory`: sequential ZBC01 REQUEST round trips (enqueue,
  a worker answers, the result comes back) through a broker of that durability
  with 2 workers (durable_peers.py `requester`), and the broker's CPU per request;
- `connect`: new connections made one after another by this process, each a fresh
  DEALER: connect to the handshake's end (the socket's monitor), and to the answer
  to a first call sent right after connect; the broker's CPU per connection.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import durable
import durable_peers
import zmq
import zmq.auth
from harness import (
    EN_DASH,
    BenchError,
    JSONDict,
    Options,
    ProcessGroup,
    Say,
    Workload,
    fmt_count,
    fmt_range,
    mixed_builds_lines,
    process_cpu_s,
    python_argv,
    spread,
)
from zmq.utils.monitor import recv_monitor_message

from zbroker.client.keys import Credentials
from zbroker.protocol import zbc

PLAIN, AUTH = "plain", "auth"
THROUGHPUT_CASES = ("sync-single", "sync-batch")
REQUEST_CASES = {"request-sync": "sync", "request-memory": "memory"}
CONNECT = "connect"
CASES = (*THROUGHPUT_CASES, *REQUEST_CASES, CONNECT)
LABELS = {
    "sync-single": "sync, single-task ENQUEUEs",
    "sync-batch": "sync, ENQUEUE batches",
    "request-sync": "REQUEST round trip, sync",
    "request-memory": "REQUEST round trip, memory",
    CONNECT: "new connection",
}
# The variables durable_peers.py reads its CURVE keys from.
KEY_VARIABLES = (durable_peers.CURVE_SERVER_KEY, durable_peers.CURVE_KEY)
PRINCIPAL = "bench"
CONNECT_TIMEOUT_MS = 10_000
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclass(frozen=True, slots=True)
class Settings:
    throughput: durable.Settings  # the durable workload's, as they are
    request_samples: int
    request_warmup: int
    request_workers: int
    connect_samples: int
    connect_warmup: int

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        throughput = durable.Settings.for_mode(quick)
        if quick:
            return cls(throughput, 1_000, 100, throughput.workers, 200, 20)
        return cls(throughput, 5_000, 500, throughput.workers, 1_000, 50)


@dataclass(frozen=True, slots=True)
class Side:
    """How one side of the comparison starts its broker and its peers."""

    name: str  # PLAIN or AUTH
    broker_args: tuple[str, ...]
    peer_env: Mapping[str, str]
    credentials: Credentials | None  # for the sockets this process opens


def make_sides(directory: Path) -> tuple[Side, Side]:
    """Keys and an auth file in `directory`; the plain side and the `--auth` side."""
    keys = directory / "keys"
    keys.mkdir()
    zmq.auth.create_certificates(keys, "broker")
    zmq.auth.create_certificates(keys, PRINCIPAL)
    auth_file = directory / "auth.toml"
    auth_file.write_text(
        'server_secret = "keys/broker.key_secret"\n\n'
        "[[principal]]\n"
        f'name = "{PRINCIPAL}"\n'
        f'key = "keys/{PRINCIPAL}.key"\n'
        'roles = ["client", "worker"]\n'
        f'services = ["{durable_peers.SERVICE}"]\n'
    )
    server_key, secret_file = keys / "broker.key", keys / f"{PRINCIPAL}.key_secret"
    # Neither side inherits keys from the benchmark's environment: plain peers must not
    # try CURVE, and the auth side's are exactly these.
    base = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    plain = Side(PLAIN, (), base, None)
    auth = Side(
        AUTH,
        ("--auth", str(auth_file)),
        {
            **base,
            durable_peers.CURVE_SERVER_KEY: str(server_key),
            durable_peers.CURVE_KEY: str(secret_file),
        },
        Credentials.load(server_key, secret_file),
    )
    return plain, auth


# ------------------------------------------------------------------ request round trips


def run_requests(
    durability: str, settings: Settings, side: Side, procs: ProcessGroup, data_dir: Path
) -> JSONDict:
    """Sequential REQUESTs through a fresh broker with workers; latency and broker CPU."""
    endpoint, broker, _ = durable._start_broker(
        procs, "zbroker", durability, data_dir, extra_args=side.broker_args
    )
    credit = settings.throughput.credit
    workers = [
        procs.start(
            f"worker-{i}",
            python_argv(durable.PEERS, "worker", "--connect", endpoint, "--credit", credit),
            stdout_pipe=True,
            env=side.peer_env,
        )
        for i in range(settings.request_workers)
    ]
    for w in workers:
        durable._expect(w, "ready", timeout_s=20)
    requester = procs.start(
        "requester",
        python_argv(
            durable.PEERS,
            "requester",
            "--connect",
            endpoint,
            "--samples",
            settings.request_samples,
            "--warmup",
            settings.request_warmup,
            "--body-bytes",
            settings.throughput.body_bytes,
        ),
        stdout_pipe=True,
        env=side.peer_env,
    )
    durable._expect(requester, "ready", timeout_s=20)
    # The warm-up is in the CPU figure too: the broker does nothing else meanwhile.
    cpu_before = process_cpu_s(broker.pid)
    report = durable._read_json(requester, timeout_s=60 + settings.request_samples * 0.05)
    cpu_after = process_cpu_s(broker.pid)
    procs.check_alive(ignoring=[requester])
    calls = settings.request_samples + settings.request_warmup
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {
        "durability": durability,
        "latency_us": durable._latency_summary(report["latency_us"]),
        "broker_cpu_us_per_request": None if cpu is None else cpu * 1e6 / calls,
    }


# ------------------------------------------------------------------ new connections


def run_connects(settings: Settings, side: Side, procs: ProcessGroup, data_dir: Path) -> JSONDict:
    """New connections one after another (a fresh DEALER each, closed after its answer)
    to a fresh broker with nothing else to do."""
    endpoint, broker, _ = durable._start_broker(
        procs, "zbroker", "memory", data_dir, extra_args=side.broker_args
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    handshakes_us: list[float] = []
    answers_us: list[float] = []
    codes: set[str] = set()
    try:
        for _ in range(settings.connect_warmup):
            _connect_once(ctx, endpoint, side.credentials)
        cpu_before = process_cpu_s(broker.pid)
        for _ in range(settings.connect_samples):
            handshake_us, answer_us, code = _connect_once(ctx, endpoint, side.credentials)
            handshakes_us.append(handshake_us)
            answers_us.append(answer_us)
            codes.add(code)
        cpu_after = process_cpu_s(broker.pid)
    finally:
        ctx.destroy(linger=0)
    procs.check_alive()
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {
        "handshake_us": durable._latency_summary(sorted(handshakes_us)),
        "first_answer_us": durable._latency_summary(sorted(answers_us)),
        "first_answer": sorted(codes),
        "broker_cpu_us_per_connection": (
            None if cpu is None else cpu * 1e6 / settings.connect_samples
        ),
    }


def _connect_once(
    ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, credentials: Credentials | None
) -> tuple[float, float, str]:
    """(µs from connect to the handshake's end, µs from connect to the answer of a
    STATUS call sent right after connect, that answer's code or "ok")."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if credentials is not None:
        credentials.apply(sock)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED)
    status = zbc.call(zbc.STATUS, 1, id="bench-no-such-task")
    clock = time.perf_counter_ns
    try:
        started = clock()
        sock.connect(endpoint)
        sock.send_multipart(status)  # queued on the pipe until the handshake is done
        if not monitor.poll(CONNECT_TIMEOUT_MS):
            raise BenchError(f"no handshake with {endpoint} within {CONNECT_TIMEOUT_MS} ms")
        event = recv_monitor_message(monitor)
        shaken = clock()
        if event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            raise BenchError(f"handshake with {endpoint} failed: {event}")
        if not sock.poll(CONNECT_TIMEOUT_MS):
            raise BenchError(f"no answer from {endpoint} within {CONNECT_TIMEOUT_MS} ms")
        answer = zbc.decode_answer(sock.recv_multipart())
        answered = clock()
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
    if answer.rid != 1:
        raise BenchError(f"answer to call {answer.rid}, not 1")
    code = "ok" if answer.ok else str(answer.meta.get("code"))
    return (shaken - started) / 1000, (answered - started) / 1000, code


# ------------------------------------------------------------------ the workload


def _run_case(
    case: str, settings: Settings, batch: int, side: Side, procs: ProcessGroup, data_dir: Path
) -> JSONDict:
    if case in THROUGHPUT_CASES:
        return durable.run_tasks(
            case,
            settings.throughput,
            batch,
            procs,
            data_dir,
            broker_args=side.broker_args,
            peer_env=side.peer_env,
        )
    if case in REQUEST_CASES:
        return run_requests(REQUEST_CASES[case], settings, side, procs, data_dir)
    return run_connects(settings, side, procs, data_dir)


def _order(runs: int) -> list[tuple[int, str, str]]:
    """(round, case, side) in running order: each case's two sides back to back, the
    side that goes first alternating from case to case and from round to round."""
    order = []
    for round_ in range(1, runs + 1):
        for i, case in enumerate(CASES):
            sides = (PLAIN, AUTH) if (round_ + i) % 2 else (AUTH, PLAIN)
            order += [(round_, case, side) for side in sides]
    return order


def run(options: Options, say: Say) -> JSONDict:
    settings = Settings.for_mode(options.quick)
    throughput = settings.throughput
    digest_before = durable._source_digest()
    body = bytes(i % 251 for i in range(throughput.body_bytes))
    with (
        tempfile.TemporaryDirectory(prefix="zbroker-auth-probe-") as tmp,
        ProcessGroup(options.log_dir / "auth-probe") as procs,
    ):
        endpoint, _, _ = durable._start_broker(procs, "zbroker", "memory", Path(tmp))
        batch, batch_refusal = durable._largest_batch(endpoint, throughput.batch_tasks, body)
    if batch != throughput.batch_tasks:
        say(f"the broker refuses ENQUEUEs of {throughput.batch_tasks} tasks: using {batch}")
    order = _order(options.runs)
    say(
        f"{options.runs} rounds, each case without and with --auth in turn; "
        f"{fmt_count(throughput.tasks)} tasks per throughput run; "
        f"{fmt_count(settings.request_samples)} REQUESTs per latency run; "
        f"{fmt_count(settings.connect_samples)} connections per connect run"
    )
    runs: list[JSONDict] = []
    with tempfile.TemporaryDirectory(prefix="zbroker-auth-keys-") as keys_dir:
        sides = dict(zip((PLAIN, AUTH), make_sides(Path(keys_dir)), strict=True))
        for index, (round_, case, side) in enumerate(order, start=1):
            name = f"{case}+{side}"
            with (
                tempfile.TemporaryDirectory(prefix="zbroker-auth-") as tmp,
                ProcessGroup(options.log_dir / f"auth-{index:02d}-{name}") as procs,
            ):
                figures = _run_case(case, settings, batch, sides[side], procs, Path(tmp) / "data")
            record = {
                "run": index,
                "round": round_,
                "case": case,
                "side": side,
                # The machine is shared: other work skews a run; this says how much.
                "load_average_1m_after": round(os.getloadavg()[0], 2),
                **figures,
            }
            runs.append(record)
            say(
                f"{index}/{len(order)} {name}: {_describe(record)}; "
                f"load {record['load_average_1m_after']}"
            )
    digest_after = durable._source_digest()
    if digest_after != digest_before:
        say("WARNING: zbroker's sources changed during the run: figures mix two builds")
    return {
        "settings": asdict(settings),
        "principal": {
            "name": PRINCIPAL,
            "roles": ["client", "worker"],
            "services": [durable_peers.SERVICE],
        },
        "zbroker_source_digest": {"before": digest_before, "after": digest_after},
        "batch_tasks_used": batch,
        "batch_refusal": batch_refusal,
        "runs_per_side": options.runs,
        "data_dir_filesystem": durable._filesystem(Path(tempfile.gettempdir())),
        "runs": runs,
        "summary": summarize(runs),
    }


def _describe(record: JSONDict) -> str:
    case = record["case"]
    if case in THROUGHPUT_CASES:
        return durable._describe({**record, "system": case})
    if case in REQUEST_CASES:
        lat = record["latency_us"]
        return (
            f"REQUEST round trip p50 {lat['p50']:.0f} µs, p99 {lat['p99']:.0f} µs; broker CPU "
            f"{_fmt_opt(record['broker_cpu_us_per_request'])} µs per request"
        )
    hs, first = record["handshake_us"], record["first_answer_us"]
    return (
        f"connect to handshake p50 {hs['p50']:.0f} µs p99 {hs['p99']:.0f} µs, to first "
        f"answer p50 {first['p50']:.0f} µs p99 {first['p99']:.0f} µs "
        f"({', '.join(record['first_answer'])}); broker CPU "
        f"{_fmt_opt(record['broker_cpu_us_per_connection'])} µs per connection"
    )


def _fmt_opt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


# ------------------------------------------------------------------ summary and table


@dataclass(frozen=True, slots=True)
class Metric:
    label: str
    value: Callable[[JSONDict], float | None]
    fmt: Callable[[float], str]


def _two(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _micros(v: float) -> str:
    return f"{v:,.0f}"


def _field(name: str) -> Callable[[JSONDict], float | None]:
    return lambda r: None if r[name] is None else float(r[name])


def _quantile(name: str, q: str, scale: float = 1.0) -> Callable[[JSONDict], float | None]:
    return lambda r: float(r[name][q]) * scale


THROUGHPUT_METRICS = (
    Metric("end to end (tasks/s)", _field("throughput_tps"), fmt_count),
    Metric("confirm p50 (ms)", _quantile("confirm_latency_us", "p50", 1e-3), _two),
    Metric("broker CPU (s per 100k tasks)", _field("broker_cpu_s_per_100k"), _two),
    Metric("workers' CPU (s per 100k tasks)", _field("workers_cpu_s_per_100k"), _two),
    Metric("producers' CPU (s per 100k tasks)", _field("producers_cpu_s_per_100k"), _two),
)
REQUEST_METRICS = (
    Metric("p50 (µs)", _quantile("latency_us", "p50"), _micros),
    Metric("p99 (µs)", _quantile("latency_us", "p99"), _micros),
    Metric("broker CPU per request (µs)", _field("broker_cpu_us_per_request"), _micros),
)
CONNECT_METRICS = (
    Metric("connect to handshake done, p50 (µs)", _quantile("handshake_us", "p50"), _micros),
    Metric("connect to handshake done, p99 (µs)", _quantile("handshake_us", "p99"), _micros),
    Metric("connect to first answer, p50 (µs)", _quantile("first_answer_us", "p50"), _micros),
    Metric("connect to first answer, p99 (µs)", _quantile("first_answer_us", "p99"), _micros),
    Metric("broker CPU per connection (µs)", _field("broker_cpu_us_per_connection"), _micros),
)


def metrics_of(case: str) -> tuple[Metric, ...]:
    if case in THROUGHPUT_CASES:
        return THROUGHPUT_METRICS
    if case in REQUEST_CASES:
        return REQUEST_METRICS
    return CONNECT_METRICS


def summarize(runs: Sequence[JSONDict]) -> JSONDict:
    """Per case and metric: each side's median and range, the ratio auth/plain of the
    medians, and the ratios of the two runs of each round with their median."""
    summary: JSONDict = {}
    for case in CASES:
        of_case = [r for r in runs if r["case"] == case]
        rows: JSONDict = {}
        for metric in metrics_of(case):
            values = {
                side: {
                    r["round"]: v
                    for r in of_case
                    if r["side"] == side and (v := metric.value(r)) is not None
                }
                for side in (PLAIN, AUTH)
            }
            if not values[PLAIN] or not values[AUTH]:
                continue
            plain, auth = spread(list(values[PLAIN].values())), spread(list(values[AUTH].values()))
            by_round = [
                values[AUTH][k] / values[PLAIN][k]
                for k in sorted(values[PLAIN])
                if k in values[AUTH] and values[PLAIN][k]
            ]
            rows[metric.label] = {
                PLAIN: plain,
                AUTH: auth,
                "ratio": auth["median"] / plain["median"] if plain["median"] else None,
                "ratio_by_round": spread(by_round) if by_round else None,
            }
        summary[case] = rows
    return summary


def markdown(result: JSONDict) -> str:
    s = result["settings"]
    t = s["throughput"]
    batch = result["batch_tasks_used"]
    lines = [
        f"Without and with `zbroker start --auth FILE` (CURVE on every endpoint; one principal "
        f"with the roles client and worker for the service), each case's two runs back to back, "
        f"the one going first alternating, {result['runs_per_side']} runs each; median "
        f"(min{EN_DASH}max). Throughput as the `durable` workload: {fmt_count(t['tasks'])} "
        f"tasks of {t['body_bytes']} bytes, {t['workers']} ZBW01 workers with credit "
        f"{t['credit']}; `single` is {t['single_producers']} producers with up to "
        f"{t['single_in_flight']} single-task ENQUEUEs unanswered each, `batch` one producer "
        f"with ENQUEUE batches of {batch} tasks, up to {t['batch_in_flight']} unanswered; "
        f"timed from the first ENQUEUE to the last DONE. REQUEST round trip: "
        f"{fmt_count(s['request_samples'])} sequential ZBC01 REQUESTs (after "
        f"{fmt_count(s['request_warmup'])} untimed) from one process, {s['request_workers']} "
        f"workers; send to the final answer. New connection: {fmt_count(s['connect_samples'])} "
        "fresh DEALER sockets one after another, each sending a STATUS call right after "
        "connect; handshake done is the socket monitor's event. Broker CPU from "
        "/proc/PID/stat, all its threads. The ratio is with `--auth` over without, of the "
        "medians; by round, the ratio of the two runs of each round, median (min"
        f"{EN_DASH}max).",
        "",
        "| Case | Metric | without `--auth` | with `--auth` | ratio | ratio by round |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case, rows in result["summary"].items():
        fmts = {m.label: m.fmt for m in metrics_of(case)}
        for label, row in rows.items():
            fmt = fmts[label]
            ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}"
            by_round = row["ratio_by_round"]
            by_round_text = "n/a" if by_round is None else fmt_range(by_round, lambda v: f"{v:.2f}")
            lines.append(
                f"| {LABELS[case]} | {label} | {fmt_range(row[PLAIN], fmt)} | "
                f"{fmt_range(row[AUTH], fmt)} | {ratio} | {by_round_text} |"
            )
    lines[2:2] = mixed_builds_lines(result)
    loads = [r["load_average_1m_after"] for r in result["runs"]]
    lines += [
        "",
        f"Load average (1 min) after each run: median {statistics.median(loads):.2f}, "
        f"{min(loads):.2f}{EN_DASH}{max(loads):.2f}.",
    ]
    return "\n".join(lines)


WORKLOAD = Workload(
    name="auth",
    summary="what CURVE authentication (--auth) costs: durable throughput, REQUEST round "
    "trip, new connections, each without and with it",
    run=run,
    markdown=markdown,
)
