"""Workload "scheduling": what each scheduling rule of issue 19 (docs/protocol.md §15
task graphs, §16 placement and flow control) costs the broker per task, against plain
tasks measured in the same rounds; and plain tasks against the broker as it was before
the rules (commit BEFORE_COMMIT), for the issue's bar: plain enqueue-to-done
throughput within 5% of before.

Per run, fresh processes, all on loopback TCP: a `zbroker start` broker (journal in a
temporary directory), two worker processes and one producer process. Peers use raw
pyzmq sockets and zbroker's pure codecs (`zbroker.protocol.zbc`, `.ext`), never
zbroker's client library, so what differs between systems is the broker's work.

- Workers (ZBW01, READY with `batch`): each reads every message waiting on its
  sockets, sends one ACK per socket for what it read, then DONES with a RESULT_BYTES
  result for each task. Plain systems: one socket per process, credit CREDIT. `100w-*`
  systems: TAGGED_SOCKETS sockets over the two processes, credit TAGGED_CREDIT each,
  each socket with a few tags (`model-<i % 10>`, `zone-<i // 10 % 4>`, and `gpu` for
  every third). Workers check what they are given: a task that required a tag came to
  a socket with that tag; a chain step's payload is its dependency's result; a join's
  payload is the msgpack list of its parts' results; with the per-key limit of 1, no
  key twice among the tasks read in one round (the broker cannot have seen a DONE of
  the first before they were read). A failed check kills the run.
- Producer (ZBC01): single-task ENQUEUEs of BODY_BYTES with up to IN_FLIGHT calls
  unanswered (or, `plain-batch`, ENQUEUE batches of BATCH tasks, BATCH_IN_FLIGHT
  unanswered). A task that depends on others is sent once their ids are answered,
  before any other task waiting to be sent (a client building a graph as fast as it
  can). Messages that need no id are encoded before the clock starts; the producer
  and the workers start on a signal once every peer is connected.

Systems (see SYSTEMS): `plain`, `plain-batch`; the same two run by the broker of
BEFORE_COMMIT (`@before`); `chain` (chains of CHAIN_LENGTH, each step `depends_on` the
previous one with `input: "result"` and no payload of its own); `fan-in` (FANIN_PARTS
parts, then one task depending on all of them with `input: "results"`); `keys`
(`concurrency_key` round robin over KEYS keys); `keys+limit` (the same, LIMIT
`per_key` KEY_LIMIT); `100w-plain` (plain tasks, 100 tagged worker sockets: the
baseline of the next three); `100w-require` (each task requires one `model-*` tag,
which 10 sockets have), `100w-prefer` (prefers one `zone-*` tag),
`100w-require+prefer` (both). The last three run 1/PLACED_SHARE of the tasks: the
broker looks over its window for every delivery and they are far slower.

Timed from the first ENQUEUE sent to the last DONE sent (wall clock across
processes); the broker's CPU (all its threads, /proc/PID/task/*/schedstat) over the
same span, per task; ratios to `plain` of the same run (medians) and round by round.
A thread of the orchestrator asks QUEUES every DEPTH_INTERVAL_S how many tasks wait
`ready` (a rule that looks over the window costs more the fuller it is); the broker
answers between two passes, so tasks enqueued and delivered within one pass are not
counted.
After each run the broker's STATS must count every task done and none
upstream_failed, and for graph systems a sample of dependents' STATUS says how many
were still blocked when they were enqueued (history "unblocked").

Systems alternate run by run, each round starting with the next one. The broker runs
from this working tree, or from BENCH_ZBROKER_TREE (a `git archive` of a commit, as for
the streams workload); `@before` brokers from a `git archive BEFORE_COMMIT zbroker`
made in a temporary directory (or BENCH_SCHEDULING_BEFORE_TREE; BENCH_SCHEDULING_BEFORE
names another commit, `none` leaves those systems out). Peers always use the codecs
of the current tree. BENCH_SCHEDULING_DURABILITY picks the journal's durability
(default DURABILITY). The peers are this file: `python bench/scheduling.py
worker|producer ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
from harness import (
    CONNECT_TIMEOUT_MS,
    EN_DASH,
    ROOT,
    BenchError,
    Child,
    JSONDict,
    Options,
    ProcessGroup,
    Say,
    Workload,
    connect_handshaken,
    fmt_count,
    fmt_range,
    free_tcp_ports,
    mixed_builds_lines,
    percentile,
    python_argv,
    spread,
    wait_for_listener,
    zmq_socket,
)

from zbroker.protocol import ext, zbc

SCRIPT = Path(__file__).resolve()
SERVICE = "bench-sched"
BODY_BYTES = 100
RESULT_BYTES = 100
RESULT = bytes(i % 241 for i in range(RESULT_BYTES))
DURABILITY = "async"
DURABILITY_VARIABLE = "BENCH_SCHEDULING_DURABILITY"

# The last commit before issue 19's rules (3f91d7f, 9426ffe, 7a9910e).
BEFORE_COMMIT = "6b21f0e"
BEFORE_VARIABLE = "BENCH_SCHEDULING_BEFORE"
BEFORE_TREE_VARIABLE = "BENCH_SCHEDULING_BEFORE_TREE"
BROKER_TREE_VARIABLE = "BENCH_ZBROKER_TREE"  # shared with bench/streams.py

WORKER_PROCESSES = 2
CREDIT = 64
IN_FLIGHT = 128
BATCH = 100
BATCH_IN_FLIGHT = 8
CHAIN_LENGTH = 10
FANIN_PARTS = 10
KEYS = 100
KEY_LIMIT = 1
TAGGED_SOCKETS = 100
TAGGED_CREDIT = 4
MODELS = 10
ZONES = 4
# The bar: plain enqueue-to-done throughput within 5% of before.
BAR_RATIO = 0.95

WORKER_HEARTBEAT_S = 1.0  # the broker's default interval is 2.5 s, liveness 3
WORKER_REPORT_IDLE_MS = 250
ANSWER_TIMEOUT_MS = 60_000
STATUS_SAMPLE = 100
DEPTH_INTERVAL_S = 0.2

PLAIN = "plain"
PLAIN_BATCH = "plain-batch"
BEFORE_SUFFIX = "@before"
CHAIN = "chain"
FANIN = "fan-in"
KEYS_SYSTEM = "keys"
KEY_LIMIT_SYSTEM = "keys+limit"
TAGS_PLAIN = "100w-plain"
REQUIRE = "100w-require"
PREFER = "100w-prefer"
PLACEMENT = "100w-require+prefer"
BEFORE_SYSTEMS = (PLAIN + BEFORE_SUFFIX, PLAIN_BATCH + BEFORE_SUFFIX)
GRAPH_SYSTEMS = (CHAIN, FANIN)
TAGGED_SYSTEMS = (TAGS_PLAIN, REQUIRE, PREFER, PLACEMENT)
# Systems whose rule makes the broker look over its window for every delivery: far
# slower, so they run PLACED_SHARE of the tasks (their cost per task is what counts).
PLACED_SYSTEMS = (REQUIRE, PREFER, PLACEMENT)
PLACED_SHARE = 10
SYSTEMS = (
    PLAIN,
    PLAIN_BATCH,
    *BEFORE_SYSTEMS,
    *GRAPH_SYSTEMS,
    KEYS_SYSTEM,
    KEY_LIMIT_SYSTEM,
    *TAGGED_SYSTEMS,
)
# A subset of SYSTEMS, comma-separated (plain is always run: every ratio needs it).
SYSTEMS_VARIABLE = "BENCH_SCHEDULING_SYSTEMS"
# What each system's ratios are taken against: `plain` of the same run for a rule's
# cost over plain tasks; for placement also plain tasks over the same 100 tagged
# sockets (the rule's own cost); for `@before`, the current broker's same workload.
REFERENCES: dict[str, tuple[str, ...]] = {
    PLAIN: (),
    PLAIN_BATCH: (PLAIN,),
    PLAIN + BEFORE_SUFFIX: (),  # see CURRENT_OF and summary["before_after"]
    PLAIN_BATCH + BEFORE_SUFFIX: (),
    CHAIN: (PLAIN,),
    FANIN: (PLAIN,),
    KEYS_SYSTEM: (PLAIN,),
    KEY_LIMIT_SYSTEM: (PLAIN,),
    TAGS_PLAIN: (PLAIN,),
    REQUIRE: (TAGS_PLAIN, PLAIN),
    PREFER: (TAGS_PLAIN, PLAIN),
    PLACEMENT: (TAGS_PLAIN, PLAIN),
}
# The current broker's system measured against each `@before` one (the bar).
CURRENT_OF = {PLAIN + BEFORE_SUFFIX: PLAIN, PLAIN_BATCH + BEFORE_SUFFIX: PLAIN_BATCH}
LABELS = {
    PLAIN: "plain tasks",
    PLAIN_BATCH: f"plain tasks, ENQUEUE batches of {BATCH}",
    PLAIN + BEFORE_SUFFIX: f"plain tasks, broker of {BEFORE_COMMIT}",
    PLAIN_BATCH + BEFORE_SUFFIX: f"plain tasks, batches of {BATCH}, broker of {BEFORE_COMMIT}",
    CHAIN: f"chains of {CHAIN_LENGTH} (`depends_on` the previous step, `input: result`)",
    FANIN: f"fan-in: {FANIN_PARTS} parts, then a join (`input: results`)",
    KEYS_SYSTEM: f"`concurrency_key`, {KEYS} keys round robin",
    KEY_LIMIT_SYSTEM: f"`concurrency_key`, {KEYS} keys, LIMIT per key {KEY_LIMIT}",
    TAGS_PLAIN: f"plain tasks, {TAGGED_SOCKETS} tagged worker sockets",
    REQUIRE: f"`require` 1 of {MODELS} tags, {TAGGED_SOCKETS} tagged worker sockets",
    PREFER: f"`prefer` 1 of {ZONES} tags, {TAGGED_SOCKETS} tagged worker sockets",
    PLACEMENT: f"`require` 1 of {MODELS} tags + `prefer` 1 of {ZONES}, "
    f"{TAGGED_SOCKETS} tagged worker sockets",
}


@dataclass(frozen=True, slots=True)
class Settings:
    tasks: int  # per run (a graph system rounds down to whole graphs)
    durability: str
    body_bytes: int = BODY_BYTES
    result_bytes: int = RESULT_BYTES
    worker_processes: int = WORKER_PROCESSES
    credit: int = CREDIT
    in_flight: int = IN_FLIGHT
    batch: int = BATCH
    batch_in_flight: int = BATCH_IN_FLIGHT
    chain_length: int = CHAIN_LENGTH
    fanin_parts: int = FANIN_PARTS
    keys: int = KEYS
    key_limit: int = KEY_LIMIT
    tagged_sockets: int = TAGGED_SOCKETS
    tagged_credit: int = TAGGED_CREDIT
    models: int = MODELS
    zones: int = ZONES
    placed_share: int = PLACED_SHARE
    before_commit: str | None = BEFORE_COMMIT
    systems: tuple[str, ...] = field(default=SYSTEMS)

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        durability = os.environ.get(DURABILITY_VARIABLE, DURABILITY)
        if durability not in ("sync", "async", "memory"):
            raise BenchError(f"{DURABILITY_VARIABLE}={durability}: sync, async or memory")
        systems = SYSTEMS
        wanted = os.environ.get(SYSTEMS_VARIABLE)
        if wanted:
            names = {PLAIN, *(n.strip() for n in wanted.split(","))}
            if unknown := names - set(SYSTEMS):
                raise BenchError(f"{SYSTEMS_VARIABLE}: unknown {', '.join(sorted(unknown))}")
            systems = tuple(s for s in SYSTEMS if s in names)
        before: str | None = os.environ.get(BEFORE_VARIABLE, BEFORE_COMMIT)
        if before is not None and before.lower() == "none":
            before = None
            systems = tuple(s for s in systems if s not in BEFORE_SYSTEMS)
        elif not any(s in BEFORE_SYSTEMS for s in systems):
            before = None
        return cls(5_000 if quick else 30_000, durability, before_commit=before, systems=systems)

    def tasks_of(self, system: str) -> int:
        """Tasks the system's plan asks for (graphs round down to whole graphs)."""
        return self.tasks // self.placed_share if system in PLACED_SYSTEMS else self.tasks

    def run_timeout_s(self) -> float:
        return 120.0 + self.tasks / 200


# ------------------------------------------------------------------ what tasks a system sends


def tagged_socket_tags(index: int, zones: int = ZONES, models: int = MODELS) -> list[str]:
    """The tags of tagged worker socket `index`: 2 or 3 of MODELS + ZONES + 1."""
    tags = [f"model-{index % models}", f"zone-{index // models % zones}"]
    if index % 3 == 0:
        tags.append("gpu")
    return tags


def _body(label: str, size: int) -> bytes:
    """A payload of `size` bytes starting with `label|` (what the worker checks)."""
    head = f"{label}|".encode() if label else b""
    return head + bytes(i % 251 for i in range(max(0, size - len(head))))


@dataclass(slots=True)
class Plan:
    """The tasks one producer sends, in order: payload, options, the items it depends on
    (indices of earlier items) and the input it asks for."""

    payloads: list[tuple[bytes, ...]] = field(default_factory=list)
    options: list[zbc.TaskOptions] = field(default_factory=list)
    deps: list[tuple[int, ...]] = field(default_factory=list)
    inputs: list[str | None] = field(default_factory=list)

    def add(
        self,
        payload: tuple[bytes, ...],
        options: zbc.TaskOptions,
        deps: tuple[int, ...] = (),
        input_: str | None = None,
    ) -> int:
        self.payloads.append(payload)
        self.options.append(options)
        self.deps.append(deps)
        self.inputs.append(input_)
        return len(self.payloads) - 1


def build_plan(system: str, s: Settings) -> Plan:
    plan = Plan()
    plain = zbc.TaskOptions()
    body = _body("", s.body_bytes)
    kind = system.removesuffix(BEFORE_SUFFIX)
    tasks = s.tasks_of(system)
    if kind in (PLAIN, PLAIN_BATCH, TAGS_PLAIN):
        for _ in range(tasks):
            plan.add((body,), plain)
    elif kind == CHAIN:
        for _ in range(tasks // s.chain_length):
            previous = plan.add((body,), plain)
            for _ in range(s.chain_length - 1):
                previous = plan.add((), plain, (previous,), zbc.INPUT_RESULT)
    elif kind == FANIN:
        for _ in range(tasks // (s.fanin_parts + 1)):
            parts = tuple(plan.add((body,), plain) for _ in range(s.fanin_parts))
            plan.add((), plain, parts, zbc.INPUT_RESULTS)
    elif kind in (KEYS_SYSTEM, KEY_LIMIT_SYSTEM):
        for j in range(tasks):
            key = f"user-{j % s.keys}"
            plan.add((_body(f"k={key}", s.body_bytes),), zbc.TaskOptions(concurrency_key=key))
    elif kind in PLACED_SYSTEMS:
        for j in range(tasks):
            model, zone = f"model-{j % s.models}", f"zone-{j // s.models % s.zones}"
            require = (model,) if kind != PREFER else ()
            prefer = (zone,) if kind != REQUIRE else ()
            label = f"r={model}" if require else ""
            options = zbc.TaskOptions(require=require, prefer=prefer)
            plan.add((_body(label, s.body_bytes),), options)
    else:
        raise ValueError(f"unknown system {system!r}")
    return plan


# ------------------------------------------------------------------ worker (own process)


class Checks:
    """What a worker verifies of the tasks it is given (see the module's docstring)."""

    def __init__(self, key_limit: int | None) -> None:
        self.key_limit = key_limit
        self.results_frame: dict[int, bytes] = {}  # number of parts -> the `results` frame expected
        self.failures = 0

    def task(self, task: ext.Task, tags: frozenset[str]) -> None:
        deps = task.deps
        if deps:
            self._input(task)
            return
        head = task.payload[0][:2] if task.payload else b""
        if head == b"r=":
            body = task.payload[0]
            tag = body[2 : body.index(b"|")].decode()
            if tag not in tags:
                sys.exit(f"task {task.id} requires {tag}, given to a socket with {sorted(tags)}")

    def _input(self, task: ext.Task) -> None:
        n = len(task.deps)
        if n == 1:
            if task.payload != (RESULT,):
                sys.exit(f"chain step {task.id}: payload {task.payload!r} is not the result")
            return
        expected = self.results_frame.get(n)
        if expected is None:
            expected = self.results_frame[n] = msgpack.packb([[RESULT]] * n, use_bin_type=True)
        if task.payload != (expected,):
            sys.exit(f"join {task.id}: payload is not the {n} results")

    def keys_once(self, tasks: Sequence[ext.Task]) -> None:
        """With a per-key limit of 1: no key twice among tasks read in one round."""
        seen: set[bytes] = set()
        for task in tasks:
            body = task.payload[0] if task.payload else b""
            if body[:2] != b"k=":
                continue
            key = body[2 : body.index(b"|")]
            if key in seen:
                sys.exit(f"key {key.decode()} had two tasks at once (limit 1)")
            seen.add(key)


def worker(endpoint: str, sockets: int, credit: int, tags: list[list[str]], key_limit: int) -> None:
    """Serve tasks on `sockets` DEALER sockets; print `{count, last_done}` once idle."""
    ctx = zmq.Context()
    socks = [zmq_socket(ctx, zmq.DEALER) for _ in range(sockets)]
    sock_tags: dict[zmq.Socket[bytes], frozenset[str]] = {}
    for sock, own in zip(socks, tags, strict=True):
        connect_handshaken(sock, endpoint)
        sock.send_multipart(ext.ready(SERVICE, credit, own, batch=True))
        sock_tags[sock] = frozenset(own)
    # The broker greets a READY at once (HEARTBEAT): registered.
    for sock in socks:
        if not sock.poll(CONNECT_TIMEOUT_MS):
            sys.exit("no greeting after READY")
        greeting = ext.decode_for_worker(sock.recv_multipart())
        if type(greeting) is not ext.Heartbeat:
            sys.exit(f"expected a greeting, got {greeting!r}")
    print("ready", flush=True)
    checks = Checks(key_limit or None)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    _serve(poller, socks, sock_tags, checks)


def _read_tasks(sock: zmq.Socket[bytes]) -> list[ext.Task]:
    tasks: list[ext.Task] = []
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return tasks
        msg = ext.decode_for_worker(frames)
        if type(msg) is ext.Tasks:
            tasks.extend(msg.tasks)
        elif type(msg) is ext.Task:
            tasks.append(msg)
        elif type(msg) is ext.Disconnect:
            sys.exit(f"broker sent DISCONNECT: {msg.reason}")
        elif type(msg) is ext.Cancel:
            sys.exit(f"broker took back {msg.id} attempt {msg.attempt}")


def _serve(
    poller: zmq.Poller,
    socks: list[zmq.Socket[bytes]],
    sock_tags: dict[zmq.Socket[bytes], frozenset[str]],
    checks: Checks,
) -> None:
    heartbeat = ext.heartbeat()
    monotonic = time.monotonic
    last_sent = dict.fromkeys(socks, monotonic())
    last_scan = monotonic()
    count = reported = 0
    last_done = 0.0
    while True:
        events = poller.poll(WORKER_REPORT_IDLE_MS)
        if not events and count != reported:
            print(json.dumps({"count": count, "last_done": last_done}), flush=True)
            reported = count
        read = [(sock, _read_tasks(sock)) for sock, _ in events]
        if checks.key_limit == 1:
            checks.keys_once([t for _, tasks in read for t in tasks])
        for sock, tasks in read:
            if not tasks:
                continue
            own = sock_tags[sock]
            for task in tasks:
                checks.task(task, own)
            sock.send_multipart(ext.ack([(t.id, t.attempt) for t in tasks]))
            for at in range(0, len(tasks), ext.MAX_BATCH):
                part = tasks[at : at + ext.MAX_BATCH]
                sock.send_multipart(ext.dones([(t.id, t.attempt, (RESULT,)) for t in part]))
            count += len(tasks)
            last_done = time.time()
            last_sent[sock] = monotonic()
        now = monotonic()
        if now - last_scan >= WORKER_HEARTBEAT_S / 4:
            last_scan = now
            for sock in socks:
                if now - last_sent[sock] >= WORKER_HEARTBEAT_S:
                    sock.send_multipart(heartbeat)
                    last_sent[sock] = now


# ------------------------------------------------------------------ producer (own process)


@dataclass(slots=True)
class Sending:
    """The producer's state: what may be sent, what each item waits for, ids."""

    plan: Plan
    ready: deque[int]
    waiting_on: list[int]
    dependents: list[list[int]]
    ids: list[str | None]

    @classmethod
    def of(cls, plan: Plan) -> Sending:
        n = len(plan.payloads)
        dependents: list[list[int]] = [[] for _ in range(n)]
        for item, deps in enumerate(plan.deps):
            for dep in deps:
                dependents[dep].append(item)
        waiting_on = [len(d) for d in plan.deps]
        ready = deque(i for i in range(n) if not waiting_on[i])
        return cls(plan, ready, waiting_on, dependents, [None] * n)

    def answered(self, item: int, task_id: str) -> None:
        self.ids[item] = task_id
        unblocked = []
        for dependent in self.dependents[item]:
            self.waiting_on[dependent] -= 1
            if not self.waiting_on[dependent]:
                unblocked.append(dependent)
        # Depth first: a client building a graph sends the next step as soon as it can.
        self.ready.extendleft(reversed(unblocked))

    def message(self, item: int, encoded: dict[int, list[bytes]]) -> list[bytes]:
        message = encoded.pop(item, None)
        if message is not None:
            return message
        plan = self.plan
        ids = tuple(self.ids[d] or "" for d in plan.deps[item])
        options = zbc.TaskOptions(depends_on=ids, input=plan.inputs[item])
        return zbc.enqueue(item, SERVICE, [plan.payloads[item]], options)


def producer(endpoint: str, system: str, settings: Settings) -> None:
    """Send the system's plan (see the module's docstring). Prints `ready` once its
    messages are encoded, waits for SIGUSR1, then prints one JSON line."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    ctx = zmq.Context()
    sock = zmq_socket(ctx, zmq.DEALER)
    sock.rcvtimeo = ANSWER_TIMEOUT_MS
    connect_handshaken(sock, endpoint)
    plan = build_plan(system, settings)
    if system.removesuffix(BEFORE_SUFFIX) == PLAIN_BATCH:
        calls = _batch_calls(plan, settings.batch)
        in_flight = settings.batch_in_flight
    else:
        calls = None
        in_flight = settings.in_flight
    sending = Sending.of(plan)
    encoded = {
        i: zbc.enqueue(i, SERVICE, [plan.payloads[i]], plan.options[i])
        for i in range(len(plan.payloads))
        if not plan.deps[i]
    }
    print("ready", flush=True)
    signal.sigwait({signal.SIGUSR1})
    try:
        if calls is None:
            result = _send_items(sock, sending, encoded, in_flight)
        else:
            result = _send_batches(sock, calls, in_flight)
    except zmq.Again:
        sys.exit(f"no answer within {ANSWER_TIMEOUT_MS} ms")
    dependents = [i for i, deps in enumerate(plan.deps) if deps]
    step = max(1, len(dependents) // STATUS_SAMPLE)
    result["dependent_sample"] = [sending.ids[i] for i in dependents[::step][:STATUS_SAMPLE]]
    result["tasks"] = len(plan.payloads)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    sock.close(linger=0)
    ctx.term()


def _batch_calls(plan: Plan, batch: int) -> list[tuple[int, list[bytes]]]:
    """(tasks, message) of each ENQUEUE batch of plain tasks."""
    payloads = plan.payloads
    calls = []
    for rid, at in enumerate(range(0, len(payloads), batch)):
        part = payloads[at : at + batch]
        calls.append((len(part), zbc.enqueue(rid, SERVICE, part, plan.options[0], batch=True)))
    return calls


def _answer_ids(answer: zbc.Answer, expected: int) -> list[str]:
    if not answer.ok:
        sys.exit(f"call {answer.rid} refused: {answer.code}: {answer.message}")
    ids: list[str] = answer.meta["ids"]
    if len(ids) != expected:
        sys.exit(f"call {answer.rid}: {len(ids)} ids, not {expected}")
    return ids


def _send_items(
    sock: zmq.Socket[bytes], sending: Sending, encoded: dict[int, list[bytes]], in_flight: int
) -> JSONDict:
    send, recv, decode = sock.send_multipart, sock.recv_multipart, zbc.decode_answer
    clock = time.perf_counter_ns
    total = len(sending.ids)
    sent_at = [0] * total
    latencies: list[int] = []
    outstanding = answered = 0
    started = time.time()
    cpu_started = time.process_time()
    while answered < total:
        while outstanding < in_flight and sending.ready:
            item = sending.ready.popleft()
            sent_at[item] = clock()
            send(sending.message(item, encoded))
            outstanding += 1
        if not outstanding:
            sys.exit(f"nothing to send and nothing outstanding after {answered} of {total}")
        answer = decode(recv())
        latencies.append((clock() - sent_at[answer.rid]) // 1000)
        sending.answered(answer.rid, _answer_ids(answer, 1)[0])
        outstanding -= 1
        answered += 1
    return _producer_figures(started, cpu_started, latencies)


def _send_batches(
    sock: zmq.Socket[bytes], calls: list[tuple[int, list[bytes]]], in_flight: int
) -> JSONDict:
    send, recv, decode = sock.send_multipart, sock.recv_multipart, zbc.decode_answer
    clock = time.perf_counter_ns
    sent_at = [0] * len(calls)
    latencies: list[int] = []
    sent = answered = 0
    started = time.time()
    cpu_started = time.process_time()
    while answered < len(calls):
        while sent < len(calls) and sent - answered < in_flight:
            sent_at[sent] = clock()
            send(calls[sent][1])
            sent += 1
        answer = decode(recv())
        latencies.append((clock() - sent_at[answer.rid]) // 1000)
        _answer_ids(answer, calls[answer.rid][0])
        answered += 1
    return _producer_figures(started, cpu_started, latencies)


def _producer_figures(started: float, cpu_started: float, latencies: list[int]) -> JSONDict:
    ended = time.time()
    latencies.sort()
    return {
        "started": started,
        "ended": ended,
        "cpu_s": time.process_time() - cpu_started,
        "calls": len(latencies),
        "confirm_p50_us": percentile(latencies, 50),
        "confirm_p99_us": percentile(latencies, 99),
    }


# ------------------------------------------------------------------ broker trees


def broker_tree() -> Path:
    """The current broker: BENCH_ZBROKER_TREE, else this working tree."""
    tree = os.environ.get(BROKER_TREE_VARIABLE)
    return Path(tree).resolve() if tree else ROOT


def _peer_env() -> dict[str, str] | None:
    """Peers import the current tree's codecs (BENCH_ZBROKER_TREE's when set)."""
    tree = broker_tree()
    if tree == ROOT:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def before_tree(commit: str | None, say: Say) -> Iterator[Path | None]:
    """The tree `@before` brokers run from: BEFORE_TREE_VARIABLE, or a `git archive` of
    `commit`'s zbroker/ in a temporary directory (None: no `@before` systems)."""
    if commit is None:
        yield None
        return
    given = os.environ.get(BEFORE_TREE_VARIABLE)
    if given:
        yield Path(given).resolve()
        return
    with tempfile.TemporaryDirectory(prefix=f"zbroker-{commit}-") as tmp:
        archive = subprocess.run(
            ["git", "archive", commit, "zbroker"], cwd=ROOT, capture_output=True, check=False
        )
        if archive.returncode != 0:
            raise BenchError(f"git archive {commit}: {archive.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        say(f"the {BEFORE_SUFFIX} broker runs from git archive {commit} in {tmp}")
        yield Path(tmp)


def _imported_from(tree: Path) -> str:
    """Where `python -m zbroker` run in `tree` imports zbroker from (it must be there)."""
    out = subprocess.run(
        [sys.executable, "-c", "import zbroker; print(zbroker.__file__)"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        raise BenchError(f"a broker started in {tree} would import zbroker from {out}")
    return out


def _git_commit_of(commit: str) -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short=12", commit],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or commit


# ------------------------------------------------------------------ one run


def _start_broker(
    procs: ProcessGroup, tree: Path, durability: str, data_dir: Path
) -> tuple[str, Child]:
    import durable  # the broker's command line, as the durable workload builds it

    port, events_in, events_out = free_tcp_ports(3)
    endpoint = f"tcp://127.0.0.1:{port}"
    argv = durable._broker_argv(endpoint, events_in, events_out, durability, data_dir, "warning")
    broker = procs.start("zbroker", argv, cwd=tree)
    wait_for_listener(port, broker)
    return endpoint, broker


def _admin(endpoint: str, command: bytes, **fields: Any) -> JSONDict:
    """One admin call on a fresh DEALER; the REPLY's meta (BenchError on ERROR)."""
    ctx = zmq.Context()
    sock = zmq_socket(ctx, zmq.DEALER)
    sock.rcvtimeo = 10_000
    try:
        sock.connect(endpoint)
        sock.send_multipart(zbc.call(command, 1, **fields))
        try:
            answer = zbc.decode_answer(sock.recv_multipart())
        except zmq.Again:
            raise BenchError(f"no answer to {zbc.COMMAND_NAMES[command]}") from None
        if not answer.ok:
            raise BenchError(f"{zbc.COMMAND_NAMES[command]} refused: {answer.code}")
        return answer.meta
    finally:
        sock.close(linger=0)
        ctx.term()


class DepthSampler(threading.Thread):
    """How many of the service's tasks wait `ready` during a run: QUEUES every
    DEPTH_INTERVAL_S from a thread of the orchestrator (a rule that looks over the
    window costs more the fuller it is)."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self._endpoint = endpoint
        self._stopped = threading.Event()
        self.samples: list[int] = []
        self.error: str | None = None

    def run(self) -> None:
        ctx = zmq.Context()
        sock = zmq_socket(ctx, zmq.DEALER)
        sock.rcvtimeo = 5_000
        sock.connect(self._endpoint)
        rid = 0
        try:
            while not self._stopped.wait(DEPTH_INTERVAL_S):
                rid += 1
                sock.send_multipart(zbc.call(zbc.QUEUES, rid))
                answer = zbc.decode_answer(sock.recv_multipart())
                rows = [q for q in answer.meta.get("queues", ()) if q["service"] == SERVICE]
                self.samples.append(rows[0]["ready"] if rows else 0)
        except (zmq.ZMQError, KeyError) as exc:
            self.error = repr(exc)
        finally:
            sock.close(linger=0)
            ctx.term()

    def stop(self) -> None:
        self._stopped.set()
        self.join(10)

    def summary(self) -> JSONDict:
        values = sorted(self.samples)
        if not values:
            return {"samples": 0, "error": self.error}
        return {
            "samples": len(values),
            "median": percentile(values, 50),
            "max": values[-1],
            "error": self.error,
        }


def _blocked_share(endpoint: str, ids: Sequence[str]) -> JSONDict | None:
    """Of a sample of dependents, how many waited `blocked` (history "unblocked")
    rather than finding their dependencies ended already."""
    if not ids:
        return None
    blocked = 0
    for task_id in ids:
        task = _admin(endpoint, zbc.STATUS, id=task_id)["task"]
        if task["state"] != "done":
            raise BenchError(f"dependent {task_id} ended {task['state']}")
        if any(entry[0] == "unblocked" for entry in task["history"]):
            blocked += 1
    return {"sampled": len(ids), "blocked": blocked}


def _start_workers(
    procs: ProcessGroup, system: str, s: Settings, endpoint: str, env: dict[str, str] | None
) -> list[Child]:
    if system in TAGGED_SYSTEMS:
        per_process = [
            list(range(p, s.tagged_sockets, s.worker_processes)) for p in range(s.worker_processes)
        ]
        tags = [[tagged_socket_tags(i, s.zones, s.models) for i in idx] for idx in per_process]
        credit = s.tagged_credit
    else:
        tags = [[[]] for _ in range(s.worker_processes)]
        credit = s.credit
    key_limit = s.key_limit if system == KEY_LIMIT_SYSTEM else 0
    workers = [
        procs.start(
            f"worker-{i}",
            python_argv(
                SCRIPT,
                "worker",
                "--connect",
                endpoint,
                "--sockets",
                len(own),
                "--credit",
                credit,
                "--tags",
                json.dumps(own),
                "--key-limit",
                key_limit,
            ),
            stdout_pipe=True,
            env=env,
        )
        for i, own in enumerate(tags)
    ]
    for w in workers:
        line = w.read_line(60)
        if line != "ready":
            raise w.failure(f"said {line!r} instead of 'ready'")
    return workers


def run_once(
    system: str, s: Settings, trees: dict[str, Path], procs: ProcessGroup, data_dir: Path
) -> JSONDict:
    """Fresh broker, workers and producer; the run's figures."""
    import durable  # _collect: producers' JSON and workers' counts
    import streams  # cpu_ns: schedstat of every thread

    tree = trees["before" if system.endswith(BEFORE_SUFFIX) else "current"]
    endpoint, broker = _start_broker(procs, tree, s.durability, data_dir)
    if system == KEY_LIMIT_SYSTEM:
        _admin(endpoint, zbc.LIMIT, service=SERVICE, limit=s.key_limit, per_key=True)
    env = _peer_env()
    workers = _start_workers(procs, system, s, endpoint, env)
    producer_proc = procs.start(
        "producer",
        python_argv(
            SCRIPT,
            "producer",
            "--connect",
            endpoint,
            "--system",
            system,
            "--settings",
            json.dumps(asdict(s)),
        ),
        stdout_pipe=True,
        env=env,
    )
    line = producer_proc.read_line(120)
    if line != "ready":
        raise producer_proc.failure(f"said {line!r} instead of 'ready'")
    plan_tasks = len(build_plan(system, s).payloads)
    broker_before = streams.cpu_ns(broker.pid)
    workers_before = [streams.cpu_ns(w.pid) for w in workers]
    depth = DepthSampler(endpoint)
    os.kill(producer_proc.pid, signal.SIGUSR1)
    depth.start()
    try:
        produced, done = durable._collect(
            procs, [producer_proc], workers, plan_tasks, s.run_timeout_s()
        )
    finally:
        depth.stop()
    broker_after = streams.cpu_ns(broker.pid)
    workers_after = [streams.cpu_ns(w.pid) for w in workers]
    procs.check_alive(ignoring=(producer_proc,))
    report = produced[0]
    stats = _admin(endpoint, zbc.STATS)["stats"]
    if stats["tasks_done"] != plan_tasks or stats.get("tasks_upstream_failed", 0):
        raise BenchError(
            f"{system}: STATS counts {stats['tasks_done']} done of {plan_tasks}, "
            f"{stats.get('tasks_upstream_failed', 0)} upstream_failed"
        )
    blocked = _blocked_share(endpoint, report["dependent_sample"])
    ready = depth.summary()
    elapsed = max(r["last_done"] for r in done) - report["started"]
    done_count = sum(r["count"] for r in done)
    return {
        "tasks": plan_tasks,
        "done": done_count,
        "calls": report["calls"],
        "elapsed_s": elapsed,
        "throughput_tps": plan_tasks / elapsed,
        "broker_cpu_us_per_task": _per_task_us(broker_before, broker_after, plan_tasks),
        "workers_cpu_us_per_task": _per_task_us(
            sum(workers_before) if None not in workers_before else None,  # type: ignore[arg-type]
            sum(workers_after) if None not in workers_after else None,  # type: ignore[arg-type]
            plan_tasks,
        ),
        "producer_cpu_us_per_task": report["cpu_s"] * 1e6 / plan_tasks,
        "confirm_p50_ms": report["confirm_p50_us"] / 1000,
        "confirm_p99_ms": report["confirm_p99_us"] / 1000,
        "done_per_worker": [r["count"] for r in done],
        "dependents_blocked": blocked,
        "ready_depth": ready,
        "ready_median": ready.get("median"),
    }


def _per_task_us(before: int | None, after: int | None, tasks: int) -> float | None:
    if before is None or after is None:
        return None
    return (after - before) / 1000 / tasks


# ------------------------------------------------------------------ the workload


def run(options: Options, say: Say) -> JSONDict:
    import durable  # _filesystem
    import streams  # fdatasync_probe, _tree_digest

    s = Settings.for_mode(options.quick)
    current = broker_tree()
    if not (current / "zbroker" / "__main__.py").is_file():
        raise BenchError(f"{BROKER_TREE_VARIABLE}={current}: no zbroker package there")
    systems = s.systems
    n = len(systems)
    order = [systems[(r + i) % n] for r in range(options.runs) for i in range(n)]
    with before_tree(s.before_commit, say) as before:
        trees = {"current": current}
        if before is not None:
            trees["before"] = before
        imported = {name: _imported_from(tree) for name, tree in trees.items()}
        digests_before = {name: streams._tree_digest(tree) for name, tree in trees.items()}
        if current != ROOT:
            say(f"the broker runs from {current} ({BROKER_TREE_VARIABLE})")
        say(
            f"{options.runs} rounds of {len(systems)} systems (each round starting with the "
            f"next), {fmt_count(s.tasks)} tasks of {s.body_bytes} bytes per run "
            f"({fmt_count(s.tasks // s.placed_share)} for {', '.join(PLACED_SYSTEMS)}), durability "
            f"{s.durability}; {s.worker_processes} worker processes (credit {s.credit}, or "
            f"{s.tagged_sockets} tagged sockets of credit {s.tagged_credit}); single ENQUEUEs "
            f"with {s.in_flight} in flight, batches of {s.batch} with {s.batch_in_flight}"
        )
        with tempfile.TemporaryDirectory(prefix="zbroker-scheduling-") as tmp:
            fdatasync = streams.fdatasync_probe(Path(tmp))
        say(
            f"4 KiB write + fdatasync where the journals go: p50 {fdatasync['p50'] / 1000:.2f} "
            f"ms, p99 {fdatasync['p99'] / 1000:.2f} ms"
        )
        runs = _run_all(order, s, trees, options, say)
        digests_after = {name: streams._tree_digest(tree) for name, tree in trees.items()}
    if digests_after != digests_before:
        say("WARNING: a broker tree's sources changed during the run: figures mix two builds")
    return {
        "settings": asdict(s),
        "broker_trees": {name: str(tree) for name, tree in trees.items()},
        "zbroker_imported_from": imported,
        "before_commit": None if s.before_commit is None else _git_commit_of(s.before_commit),
        "zbroker_source_digest": {"before": digests_before, "after": digests_after},
        "runs_per_system": options.runs,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "data_dir_filesystem": durable._filesystem(Path(tempfile.gettempdir())),
        "fdatasync_4k_us": fdatasync,
        "runs": runs,
        "summary": summarize(runs, systems),
    }


def _run_all(
    order: list[str], s: Settings, trees: dict[str, Path], options: Options, say: Say
) -> list[JSONDict]:
    runs: list[JSONDict] = []
    per_round = len(s.systems)
    for index, system in enumerate(order, start=1):
        tag = f"{index}/{len(order)}"
        with (
            tempfile.TemporaryDirectory(prefix="zbroker-scheduling-") as tmp,
            ProcessGroup(options.log_dir / f"scheduling-{index:02d}-{system}") as procs,
        ):
            figures = run_once(system, s, trees, procs, Path(tmp) / "data")
        record = {
            "run": index,
            "round": (index - 1) // per_round + 1,
            "system": system,
            "load_average_1m_after": round(os.getloadavg()[0], 2),
            **figures,
        }
        runs.append(record)
        say(f"{tag} {system}: {_describe(record)}")
    return runs


def _opt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _describe(r: JSONDict) -> str:
    text = (
        f"{fmt_count(r['throughput_tps'])} tasks/s end to end, broker CPU "
        f"{_opt(r['broker_cpu_us_per_task'])} µs/task (workers "
        f"{_opt(r['workers_cpu_us_per_task'])}, producer {_opt(r['producer_cpu_us_per_task'])}), "
        f"confirm p50 {r['confirm_p50_ms']:.1f} ms"
    )
    depth = r["ready_depth"]
    if depth["samples"]:
        text += f", ready between passes median {depth['median']} max {depth['max']}"
    blocked = r["dependents_blocked"]
    if blocked:
        text += f", {blocked['blocked']} of {blocked['sampled']} sampled dependents waited blocked"
    return f"{text}; load {r['load_average_1m_after']}"


# ------------------------------------------------------------------ summary and table

METRICS = (
    "throughput_tps",
    "broker_cpu_us_per_task",
    "workers_cpu_us_per_task",
    "producer_cpu_us_per_task",
    "confirm_p50_ms",
    "ready_median",
)
RATIO_METRICS = ("throughput_tps", "broker_cpu_us_per_task")


def _paired(runs: list[JSONDict], system: str, reference: str, metric: str) -> list[float]:
    """`system` over `reference` in the same round, for every round that has both."""
    by_round = {r["round"]: r for r in runs if r["system"] == reference}
    out = []
    for r in runs:
        ref = by_round.get(r["round"])
        if r["system"] == system and ref is not None and r[metric] and ref[metric]:
            out.append(r[metric] / ref[metric])
    return out


def summarize(runs: list[JSONDict], systems: Sequence[str]) -> JSONDict:
    table: JSONDict = {}
    for system in systems:
        of = [r for r in runs if r["system"] == system]
        table[system] = {
            m: spread(values) for m in METRICS if (values := [r[m] for r in of if r[m] is not None])
        }
    ratios: JSONDict = {}
    for system in systems:
        ratios[system] = {
            ref: _ratios(runs, table, system, ref) for ref in REFERENCES[system] if ref in table
        }
    before_after: JSONDict = {}
    for before, now in CURRENT_OF.items():
        if before in table and now in table:
            # the current broker over the one before: the bar is on throughput
            figures = _ratios(runs, table, now, before)
            before_after[now] = {
                "before": before,
                "bar": BAR_RATIO,
                "verdict": _verdict(figures["throughput_tps"]),
                **figures,
            }
    return {"systems": table, "ratios": ratios, "before_after": before_after}


def _verdict(ratio: JSONDict) -> str:
    """ "met" when the ratio of the medians and the median of the round-by-round ratios
    are both at least BAR_RATIO, "not met" when both are below, else "unclear" (the
    machine's noise is larger than the difference)."""
    readings = [ratio["of_medians"]]
    if ratio["by_round"] is not None:
        readings.append(ratio["by_round"]["median"])
    if all(r >= BAR_RATIO for r in readings):
        return "met"
    if all(r < BAR_RATIO for r in readings):
        return "not met"
    return "unclear"


def _ratios(runs: list[JSONDict], table: JSONDict, system: str, ref: str) -> JSONDict:
    """`system` over `ref` for each RATIO_METRICS: of the medians, and round by round."""
    out: JSONDict = {}
    for m in RATIO_METRICS:
        if m in table[system] and m in table[ref]:
            pairs = _paired(runs, system, ref, m)
            out[m] = {
                "of_medians": table[system][m]["median"] / table[ref][m]["median"],
                "by_round": spread(pairs) if pairs else None,
            }
    return out


def _fmt(value: float) -> str:
    if value >= 100:
        return fmt_count(value)
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio_cells(ratio: JSONDict | None, metric: str, digits: int = 2) -> str:
    if not ratio or metric not in ratio:
        return " | "
    r = ratio[metric]
    paired = r["by_round"]
    fmt = lambda v: f"{v:.{digits}f}"  # noqa: E731
    return f"{fmt(r['of_medians'])} | " + (fmt_range(paired, fmt) if paired else "")


def markdown(result: JSONDict) -> str:
    s = result["settings"]
    summary = result["summary"]
    lines = [
        f"Tasks end to end through a `zbroker start` process (`--durability "
        f"{s['durability']}`, journal on {result['data_dir_filesystem']}), "
        f"{fmt_count(s['tasks'])} tasks of {s['body_bytes']} bytes per run "
        f"({fmt_count(s['tasks'] // s['placed_share'])} for `require`/`prefer`), results of "
        f"{s['result_bytes']} bytes; {s['worker_processes']} ZBW01 worker processes (one "
        f"socket of credit {s['credit']} each, or {s['tagged_sockets']} tagged sockets of "
        f"credit {s['tagged_credit']} between them), one producer (single-task ENQUEUEs, "
        f"{s['in_flight']} unanswered; batches of {s['batch']}, {s['batch_in_flight']} "
        f"unanswered). Timed from the first ENQUEUE sent to the last DONE sent; broker CPU is "
        f"all its threads over that span, per task; ready between passes is the median of "
        f"QUEUES `ready` asked every {DEPTH_INTERVAL_S:g} s (answered between two passes of "
        "the broker, so tasks enqueued and delivered within one pass are not in it). "
        f"Median of {result['runs_per_system']} "
        f"runs (min{EN_DASH}max), systems alternated run by run. Ratios: of the medians, and "
        "round by round (median and range).",
        "",
        *_rules_table(summary),
        *_blocked_line(result),
        *_before_after_lines(result),
    ]
    loads = [r["load_average_1m_after"] for r in result["runs"]]
    lines += [
        "",
        f"Load average (1 min) after each run: {min(loads):.2f} to {max(loads):.2f} on "
        f"{result['cpus_usable']} CPUs (the benchmark's own processes included).",
    ]
    lines[:0] = mixed_builds_lines(result)
    return "\n".join(lines)


def _rules_table(summary: JSONDict) -> list[str]:
    lines = [
        "| System | tasks/s | broker CPU (µs/task) | compared with | tasks/s ratio | "
        "by round | CPU ratio | by round | workers, producer CPU (µs/task) | "
        "ready between passes |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for system, m in summary["systems"].items():
        if system in CURRENT_OF:
            continue
        peers = ", ".join(
            _fmt(m[name]["median"]) if name in m else "n/a"
            for name in ("workers_cpu_us_per_task", "producer_cpu_us_per_task")
        )
        refs = summary["ratios"].get(system) or {"": None}
        for ref, ratio in refs.items():
            lines.append(
                f"| {LABELS[system]} | {fmt_range(m['throughput_tps'], fmt_count)} | "
                f"{fmt_range(m['broker_cpu_us_per_task'], _fmt)} | {ref and f'`{ref}`'} | "
                f"{_ratio_cells(ratio, 'throughput_tps')} | "
                f"{_ratio_cells(ratio, 'broker_cpu_us_per_task')} | {peers} | "
                f"{fmt_range(m['ready_median'], fmt_count) if 'ready_median' in m else 'n/a'} |"
            )
    return lines


def _blocked_line(result: JSONDict) -> list[str]:
    blocked = [
        f"{system} {sum(b['blocked'] for b in bs)} of {sum(b['sampled'] for b in bs)}"
        for system in GRAPH_SYSTEMS
        if (bs := [r["dependents_blocked"] for r in result["runs"] if r["system"] == system])
    ]
    if not blocked:
        return []
    return [
        "",
        "Dependents that waited `blocked` (a STATUS sample of each run): "
        + "; ".join(blocked)
        + ".",
    ]


def _before_after_lines(result: JSONDict) -> list[str]:
    summary = result["summary"]
    before_after = summary["before_after"]
    if not before_after:
        return []
    commit = result["before_commit"]
    lines = [
        "",
        f"Plain tasks, this broker against the broker of `{commit}` (before issue 19), "
        "same run, alternated: the ratio is this broker over that one.",
        "",
        "| Workload | tasks/s now | tasks/s before | ratio | by round | broker CPU now "
        "(µs/task) | before | ratio | by round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    table = summary["systems"]
    for now, ba in before_after.items():
        a, b = table[now], table[ba["before"]]
        lines.append(
            f"| {LABELS[now]} | {fmt_range(a['throughput_tps'], fmt_count)} | "
            f"{fmt_range(b['throughput_tps'], fmt_count)} | "
            f"{_ratio_cells(ba, 'throughput_tps', 3)} | "
            f"{fmt_range(a['broker_cpu_us_per_task'], _fmt)} | "
            f"{fmt_range(b['broker_cpu_us_per_task'], _fmt)} | "
            f"{_ratio_cells(ba, 'broker_cpu_us_per_task', 3)} |"
        )
    for now, ba in before_after.items():
        r = ba["throughput_tps"]
        paired = r["by_round"]
        lines += [
            "",
            f"Bar, `{now}` throughput at least {ba['bar']:.2f} of before: {ba['verdict']} "
            f"({r['of_medians']:.3f} of the medians"
            + (f", {paired['median']:.3f} median round by round" if paired else "")
            + ").",
        ]
    return lines


WORKLOAD = Workload(
    name="scheduling",
    summary="task graphs, placement, concurrency keys: broker CPU per task against plain "
    f"tasks; plain tasks against the broker of {BEFORE_COMMIT}",
    run=run,
    markdown=markdown,
)


# ------------------------------------------------------------------ command line (peers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="peers of the scheduling workload")
    sub = parser.add_subparsers(dest="role", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--connect", required=True)
    w.add_argument("--sockets", type=int, required=True)
    w.add_argument("--credit", type=int, required=True)
    w.add_argument("--tags", required=True, help="JSON: a list of tags per socket")
    w.add_argument("--key-limit", type=int, default=0)
    p = sub.add_parser("producer")
    p.add_argument("--connect", required=True)
    p.add_argument("--system", required=True, choices=SYSTEMS)
    p.add_argument("--settings", required=True, help="JSON of Settings")
    args = parser.parse_args(argv)
    if args.role == "worker":
        tags = json.loads(args.tags)
        if len(tags) != args.sockets:
            parser.error("--tags needs one list per socket")
        worker(args.connect, args.sockets, args.credit, tags, args.key_limit)
    else:
        raw = json.loads(args.settings)
        raw["systems"] = tuple(raw["systems"])
        producer(args.connect, args.system, Settings(**raw))


if __name__ == "__main__":
    main()
