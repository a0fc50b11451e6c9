"""zbroker's client protocol for durable tasks (ZBC01).

What a 7/MDP client cannot say: enqueue a durable task (or a batch) and get
its id back once it is committed, wait for or fetch a task's result by id
(also from a new connection), ask a task's status, cancel it, list and
redrive dead letters.

Frames after the ROUTER routing id: ["", "ZBC01", command, meta, payload...].
`meta` is one msgpack map and always carries `rid`, a number the client picks;
the broker quotes it in its answer, so one DEALER socket may have many calls
outstanding. Payload and result frames are never decoded by the broker.
Pure codec: no sockets, no clock, no broker state.

Calls and their answers (REPLY meta besides `rid`; any call may instead get
ERROR {rid, code, message}, codes E_* below):
  ENQUEUE  {service, options, counts?}, payloads
           -> REPLY {ids: [id, ...], existing?: [index, ...]}   sent after the
              journal commit that holds the tasks; `existing` lists the tasks
              whose idempotency key matched a task already stored (its id is given)
  REQUEST  {service, wait_s?, options}, payload
           -> REPLY {ids: [id]} once committed, then a second answer to the same
              rid when the task ends: the RESULT answer below
  RESULT   {id, wait_s?}
           -> REPLY {id, state, error?}, result frames when state is "done".
              A task not finished yet answers with its current state at once,
              or, with wait_s > 0, when it ends or when wait_s has passed
  STATUS   {id}           -> REPLY {task: {id, service, state, attempt, max_attempts,
                              priority, created_at, not_before, expires_at, timeout_s,
                              key, headers, error, finished_at, keep_until, history}}
  CANCEL   {id}           -> REPLY {id, state: "cancelled", was: <state before>}
                             ERROR conflict when the task had already ended
  DEAD     {service, limit?, after?}
           -> REPLY {tasks: [{id, seq, attempt, error, created_at, finished_at}], next}
              `next` is the `after` of the following page, nil on the last one
  REDRIVE  {service, ids?} -> REPLY {ids: [id, ...]}  dead letters back to READY
                              with their attempts reset (MAX_BATCH per call)
  QUEUES   {limit?, after?}  -> REPLY {queues: [{service, ready, delayed, inflight,
                  dead, requests, workers, credit, credit_in_use, oldest_age_s}, ...],
                  next}  a page of services in name order (MAX_QUEUES_PAGE at most,
                  DEFAULT_QUEUES_PAGE without `limit`); `next` is the `after` of the
                  following page, nil on the last one
  WORKERS  {}  -> REPLY {workers: [{worker, service, dialect, credit, tasks, tags,
                  metrics, last_seen_s, state}, ...]}
  DRAIN    {worker} -> REPLY {worker, tasks}   (ERROR not_found for an unknown worker)
  STATS    {} -> REPLY {stats: {counter: value...}, malformed: {reason: n},
                  journal: {durability, commits, bytes_used, map_size, ...}, uptime_s}
  LIMIT    {service, limit, per_key?} -> REPLY {service, limit, per_key}   (limit nil:
           none; per_key: a cap for each concurrency key, §16)
  RATE     {service, rate?, burst?, per_key?} -> REPLY {service, rate, burst, per_key}
           tasks per second handed out (a token bucket; rate nil: none), §16
  PURGE    {service} -> REPLY {purged, more}   waiting tasks cancelled, MAX_BATCH per call
  DROP     {service, ids?} -> REPLY {dropped, more}   dead letters deleted (MAX_BATCH
                              per call)
`ids` (REDRIVE, DROP) lists at most MAX_BATCH task ids: a longer list is refused
with bad_request, never acted on in part.
  PAUSE    {service} -> REPLY {service, paused: true}
  RESUME   {service} -> REPLY {service, paused: false}
  SCHEDULE {name, service, every_s? | cron?, tz?, options}, payload
           -> REPLY {schedule: {...}, was}   a recurring task, kept in the journal;
              each firing enqueues the payload with key "schedule:<name>:<instant>"
  SCHEDULES {} -> REPLY {schedules: [{...}, ...]}
  UNSCHEDULE {name} -> REPLY {name, removed: true}   (ERROR not_found: no such schedule)
States are lower-case strings (zbroker.protocol.states): ready, delayed, blocked,
inflight, done, dead, cancelled, expired, upstream_failed. Final states: done, dead,
cancelled, expired, upstream_failed.
Limits (MAX_BATCH and the others below) come from zbroker.protocol.limits.
Options (all optional): priority (int -128..127, higher first), delay_s or
not_before (seconds since the epoch), ttl_s, max_attempts, timeout_s, key
(one task) or keys (a batch: one str or nil per task), headers (map),
depends_on (task ids or {service, key} maps), run_anyway, input (§15),
require and prefer (tags), affinity, concurrency_key, debounce_s (§16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zbroker.protocol import cron, limits
from zbroker.protocol.errors import ProtocolError
from zbroker.protocol.ext import pack_meta, unpack_meta
from zbroker.protocol.states import LISTABLE_STATES as _LISTABLE
from zbroker.protocol.states import TaskState

ZBC01 = b"ZBC01"
EMPTY = b""

# Client -> broker commands (one byte).
ENQUEUE = b"\x01"  # {rid, service, options..., counts?}, payload frames
REQUEST = b"\x02"  # {rid, service, options...}, payload frames: enqueue and wait
RESULT = b"\x03"  # {rid, id, wait_s?}
STATUS = b"\x04"  # {rid, id}
CANCEL = b"\x05"  # {rid, id}
DEAD = b"\x06"  # {rid, service, limit?, after?}: list dead letters
REDRIVE = b"\x07"  # {rid, service, ids?}: dead letters back to the queue
QUEUES = b"\x08"  # {rid}: every service's queue figures (admin)
WORKERS = b"\x09"  # {rid}: every registered worker (admin)
DRAIN = b"\x0a"  # {rid, worker}: no new tasks for that worker (admin)
PAUSE = b"\x0b"  # {rid, service}: no deliveries for that service until RESUME (admin)
RESUME = b"\x0c"  # {rid, service}
STATS = b"\x0d"  # {rid}: the broker's counters (admin)
LIMIT = b"\x0e"  # {rid, service, limit}: concurrency across the service's workers (admin)
PURGE = b"\x0f"  # {rid, service}: cancel the service's waiting tasks (admin)
DROP = b"\x10"  # {rid, service, ids?}: delete dead letters (admin)
TASKS = b"\x11"  # {rid, service, state, limit?, after?, older_than_s?}: list tasks (admin)
STREAM = b"\x12"  # {rid, service, options..., window?, attempts?, ...}, payload: REQUEST, streamed
READ = b"\x13"  # {rid, id, offset?, window?, attempts?, ...}: follow a task's stream
MORE = b"\x14"  # {rid, credit}: this many more chunks of stream call rid consumed
CLOSE = b"\x15"  # {rid}: stream call rid abandoned (no answer)
# Recurring tasks (§17), admin calls.
SCHEDULE = b"\x16"  # {rid, name, service, every_s? | cron?, tz?, options...}, payload frames
SCHEDULES = b"\x17"  # {rid}: every schedule
UNSCHEDULE = b"\x18"  # {rid, name}
RATE = b"\x19"  # {rid, service, rate?, burst?, per_key?}: tasks per second (admin, §16)

# Broker -> client.
REPLY = b"\x10"  # {rid, ...}, frames
ERROR = b"\x11"  # {rid, code, message}
CHUNKS = b"\x12"  # {rid, id, offset, attempt}, one frame per chunk (stream calls)

COMMAND_NAMES = {
    ENQUEUE: "ENQUEUE",
    REQUEST: "REQUEST",
    RESULT: "RESULT",
    STATUS: "STATUS",
    CANCEL: "CANCEL",
    DEAD: "DEAD",
    REDRIVE: "REDRIVE",
    QUEUES: "QUEUES",
    WORKERS: "WORKERS",
    DRAIN: "DRAIN",
    PAUSE: "PAUSE",
    RESUME: "RESUME",
    STATS: "STATS",
    LIMIT: "LIMIT",
    PURGE: "PURGE",
    DROP: "DROP",
    TASKS: "TASKS",
    STREAM: "STREAM",
    READ: "READ",
    MORE: "MORE",
    CLOSE: "CLOSE",
    SCHEDULE: "SCHEDULE",
    SCHEDULES: "SCHEDULES",
    UNSCHEDULE: "UNSCHEDULE",
    RATE: "RATE",
    REPLY: "REPLY",
    ERROR: "ERROR",
}

# Error codes the broker answers with (ERROR meta `code`).
E_BAD_REQUEST = "bad_request"  # the call is malformed or an option is out of range
E_NOT_FOUND = "not_found"  # no such task (never existed, or its record lapsed)
E_QUEUE_FULL = "queue_full"  # the service's queue is at its cap: nothing was enqueued
E_TOO_LARGE = "too_large"  # the message is over the broker's size or frame cap
E_CONFLICT = "conflict"  # the task is not in a state the call applies to
E_SHUTTING_DOWN = "shutting_down"  # the broker is stopping: call again after it restarts
E_UNAVAILABLE = "unavailable"  # the broker cannot take the call now (journal failure)
E_TOO_MANY_WAITERS = "too_many_waiters"  # too many calls are already waiting for results
E_FORBIDDEN = "forbidden"  # the sender's principal may not make this call (--auth)

# The limits of ZBC01 calls, under the names this module has always given them
# (their home, with the reason for each, is zbroker.protocol.limits).
MAX_BATCH = limits.ZBC_MAX_BATCH
BATCH_FRAMES = limits.BATCH_FRAMES
BATCH_BYTES = limits.BATCH_BYTES
MAX_WAIT_S = limits.MAX_WAIT_S
MAX_LIST = limits.MAX_LIST
PRIORITY_MIN = limits.PRIORITY_MIN
PRIORITY_MAX = limits.PRIORITY_MAX
MAX_ATTEMPTS_LIMIT = limits.MAX_ATTEMPTS_LIMIT
MAX_DEPENDENCIES = limits.MAX_DEPENDENCIES


# A dependency as a call names it: a task id, or the (service, key) of the task that
# holds that idempotency key in that service.
DependencyRef = str | tuple[str, str]

# What a dependent task is given of its dependencies' results (option `input`, §15):
# the result frames of its one dependency, or one msgpack frame listing every
# dependency's result frames (nil for one that did not end done).
INPUT_RESULT = "result"
INPUT_RESULTS = "results"
INPUTS = (INPUT_RESULT, INPUT_RESULTS)


# Built once per message (or task) on the hot path: not frozen, whose __init__ costs
# about 3x more in CPython 3.11 (bench/instructions.py). Treat it as a value all the same
# (it hashes by its fields, as a frozen one would).
@dataclass(slots=True, unsafe_hash=True)
class TaskOptions:
    """How one task (or every task of a batch) is to be run. All optional."""

    priority: int = 0  # PRIORITY_MIN..PRIORITY_MAX, higher runs first
    delay_s: float | None = None  # not before now + delay_s
    not_before: float | None = None  # not before this time (seconds since the epoch)
    ttl_s: float | None = None  # expire unless started within ttl_s of the enqueue
    max_attempts: int | None = None  # None: the broker's default
    timeout_s: float | None = None  # run-time limit of one attempt
    key: str | None = None  # idempotency key (single task)
    keys: tuple[str | None, ...] | None = None  # idempotency keys, one per task of a batch
    headers: dict[str, Any] = field(default_factory=dict)
    # §15: the tasks it waits for, each a task id or a (service, idempotency key) pair;
    # whether it runs even when one ends without done; what of their results it is given.
    depends_on: tuple[DependencyRef, ...] = ()
    run_anyway: bool = False
    input: str | None = None
    # §16: tags its worker must have, tags that make a worker a better fit, the key
    # that sends it to the worker that last ran that key, the key of its flow control.
    require: tuple[str, ...] = ()
    prefer: tuple[str, ...] = ()
    affinity: str | None = None
    concurrency_key: str | None = None
    # §16: with `key`, wait this long; an enqueue of the same key meanwhile replaces
    # the payload of the task still waiting instead of storing another.
    debounce_s: float | None = None


# Built once per message (or task) on the hot path: not frozen, whose __init__ costs
# about 3x more in CPython 3.11 (bench/instructions.py). Treat it as a value all the same
# (it hashes by its fields, as a frozen one would).
@dataclass(frozen=True, slots=True)
class Follow:
    """How a stream call (STREAM, READ) wants the task's chunks (§13)."""

    window: int = limits.STREAM_WINDOW_DEFAULT  # chunks sent beyond what MORE credited
    current_only: bool = False  # `attempts: "current"`: skip chunks of older attempts
    cancel_on_abandon: bool = False  # cancel the task when the call is abandoned


@dataclass(slots=True, unsafe_hash=True)
class Enqueue:
    """ENQUEUE (wait False: one or more tasks) or REQUEST (wait True: one task)."""

    rid: int
    service: str
    payloads: tuple[tuple[bytes, ...], ...]
    options: TaskOptions
    wait: bool = False
    wait_s: float | None = None  # REQUEST: how long to hold the call for the result
    follow: Follow | None = None  # STREAM: a REQUEST whose answers stream (§13)


@dataclass(frozen=True, slots=True)
class Result:
    rid: int
    id: str
    wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Read:
    """READ: follow the stream of task `id` from `offset` (§13)."""

    rid: int
    id: str
    offset: int
    wait_s: float | None
    follow: Follow


@dataclass(frozen=True, slots=True)
class More:
    """MORE: the client consumed `credit` more chunks of stream call `rid`."""

    rid: int
    credit: int


@dataclass(frozen=True, slots=True)
class Close:
    """CLOSE: stream call `rid` is abandoned."""

    rid: int


@dataclass(frozen=True, slots=True)
class Status:
    rid: int
    id: str
    # Bytes of the payload's first frame to answer with (0: no payload at all).
    preview: int = 0


@dataclass(frozen=True, slots=True)
class Cancel:
    rid: int
    id: str


@dataclass(frozen=True, slots=True)
class Dead:
    rid: int
    service: str
    limit: int = 100
    after: int | None = None  # `seq` of the last entry of a previous page


@dataclass(frozen=True, slots=True)
class Redrive:
    rid: int
    service: str
    ids: tuple[str, ...] | None = None  # None: the oldest MAX_BATCH dead letters


@dataclass(frozen=True, slots=True)
class Queues:
    rid: int
    limit: int = limits.DEFAULT_QUEUES_PAGE
    after: str | None = None  # `service` of the last row of a previous page


@dataclass(frozen=True, slots=True)
class Workers:
    rid: int


@dataclass(frozen=True, slots=True)
class Drain:
    rid: int
    worker: str  # routing id in hex, as WORKERS shows it


@dataclass(frozen=True, slots=True)
class Pause:
    rid: int
    service: str
    paused: bool  # False: RESUME


@dataclass(frozen=True, slots=True)
class Stats:
    rid: int


@dataclass(frozen=True, slots=True)
class Purge:
    rid: int
    service: str


@dataclass(frozen=True, slots=True)
class Drop:
    rid: int
    service: str
    ids: tuple[str, ...] | None = None  # None: the oldest MAX_BATCH dead letters


@dataclass(frozen=True, slots=True)
class ListTasks:
    rid: int
    service: str
    state: TaskState
    limit: int = 100
    after: int = 0  # how many of the list a previous page already gave
    older_than_s: float = 0.0


# What TASKS may list, as plain strings (zbroker.protocol.states has them as TaskState).
LISTABLE_STATES = tuple(state.value for state in _LISTABLE)


@dataclass(frozen=True, slots=True)
class Limit:
    rid: int
    service: str
    limit: int | None  # None: no limit
    per_key: bool = False  # the limit is per concurrency key (§16), not for the service


@dataclass(frozen=True, slots=True)
class Rate:
    rid: int
    service: str
    rate: float | None  # tasks per second; None: no rate
    burst: int  # tokens the bucket holds at most (tasks handed out at once)
    per_key: bool = False  # for each concurrency key (§16), not for the service


# ------------------------------------------------- recurring tasks (§17)


@dataclass(frozen=True, slots=True)
class Schedule:
    """SCHEDULE: fire `payload` to `service` every `every_s` seconds or at the instants
    of `cron` (in time zone `tz`, None: UTC); exactly one of the two is given.
    `options` holds what each firing's task gets: priority, ttl_s, max_attempts,
    timeout_s, headers (never a key or a delay: the broker sets those)."""

    rid: int
    name: str
    service: str
    payload: tuple[bytes, ...]
    options: TaskOptions
    every_s: int | None = None
    cron: str | None = None
    tz: str | None = None


@dataclass(frozen=True, slots=True)
class ListSchedules:
    """SCHEDULES: every schedule the broker keeps."""

    rid: int


@dataclass(frozen=True, slots=True)
class Unschedule:
    """UNSCHEDULE: remove schedule `name` (firings already enqueued stay)."""

    rid: int
    name: str


ClientMessage = (
    Schedule
    | ListSchedules
    | Unschedule
    | Enqueue
    | Rate
    | Result
    | Status
    | Cancel
    | Dead
    | Redrive
    | Queues
    | Workers
    | Drain
    | Pause
    | Stats
    | Limit
    | Purge
    | Drop
    | ListTasks
    | Read
    | More
    | Close
)


class CallError(ProtocolError):
    """A well-framed call the broker must refuse with an ERROR reply (the rid is known)."""

    def __init__(self, rid: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.rid = rid
        self.code = code
        self.message = message


# ------------------------------------------------------------------- helpers


def _number(meta: dict[str, Any], name: str, rid: int, *, minimum: float = 0.0) -> float | None:
    value = meta.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CallError(rid, E_BAD_REQUEST, f"'{name}' must be a finite number")
    if value < minimum:
        raise CallError(rid, E_BAD_REQUEST, f"'{name}' must be at least {minimum:g}")
    return float(value)


def _int(meta: dict[str, Any], name: str, rid: int, lo: int, hi: int, default: int) -> int:
    value = meta.get(name, default)
    if type(value) is not int or not lo <= value <= hi:
        raise CallError(rid, E_BAD_REQUEST, f"'{name}' must be an integer {lo}..{hi}")
    return value


def _str(meta: dict[str, Any], name: str, rid: int) -> str:
    value = meta.get(name)
    if not isinstance(value, str) or not value:
        raise CallError(rid, E_BAD_REQUEST, f"'{name}' must be a non-empty string")
    return value


# Fields of an ENQUEUE or REQUEST that are not task options.
_NOT_OPTIONS = frozenset(
    {"rid", "service", "counts", "wait_s", "window", "attempts", "cancel_on_abandon"}
)


def _options(meta: dict[str, Any], rid: int, n_tasks: int) -> TaskOptions:
    if meta.keys() <= _NOT_OPTIONS:
        return TaskOptions()  # no options given: nothing to check
    max_attempts = meta.get("max_attempts")
    if max_attempts is not None and (
        type(max_attempts) is not int or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
    ):
        raise CallError(rid, E_BAD_REQUEST, f"'max_attempts' must be 1..{MAX_ATTEMPTS_LIMIT}")
    key = meta.get("key")
    if key is not None and (not isinstance(key, str) or not key):
        raise CallError(rid, E_BAD_REQUEST, "'key' must be a non-empty string")
    keys = meta.get("keys")
    if keys is not None:
        if (
            not isinstance(keys, list)
            or len(keys) != n_tasks
            or not all(k is None or (isinstance(k, str) and k) for k in keys)
        ):
            raise CallError(rid, E_BAD_REQUEST, "'keys' must list one string or nil per task")
        if key is not None:
            raise CallError(rid, E_BAD_REQUEST, "give 'key' or 'keys', not both")
        keys = tuple(keys)
    elif key is not None and n_tasks != 1:
        raise CallError(rid, E_BAD_REQUEST, "'key' is for one task: use 'keys' for a batch")
    headers = meta.get("headers", {})
    if not isinstance(headers, dict):
        raise CallError(rid, E_BAD_REQUEST, "'headers' must be a map")
    delay_s = _number(meta, "delay_s", rid)
    not_before = _number(meta, "not_before", rid)
    if delay_s is not None and not_before is not None:
        raise CallError(rid, E_BAD_REQUEST, "give 'delay_s' or 'not_before', not both")
    timeout_s = _number(meta, "timeout_s", rid)
    if timeout_s is not None and timeout_s <= 0:
        raise CallError(rid, E_BAD_REQUEST, "'timeout_s' must be positive")
    options = TaskOptions(
        priority=_int(meta, "priority", rid, PRIORITY_MIN, PRIORITY_MAX, 0),
        delay_s=delay_s,
        not_before=not_before,
        ttl_s=_number(meta, "ttl_s", rid),
        max_attempts=max_attempts,
        timeout_s=timeout_s,
        key=key,
        keys=keys,
        headers=headers,
    )
    if not meta.keys().isdisjoint(_RULE_OPTIONS):
        _rules(options, meta, rid, n_tasks)
    return options


# Options of §15 and §16: most calls give none of them.
_RULE_OPTIONS = frozenset(
    {
        "depends_on",
        "run_anyway",
        "input",
        "require",
        "prefer",
        "affinity",
        "concurrency_key",
        "debounce_s",
    }
)


def _rules(options: TaskOptions, meta: dict[str, Any], rid: int, n_tasks: int) -> None:
    """Read the options of §15 and §16 into `options`, checked."""
    options.depends_on, options.run_anyway, options.input = _dependencies(meta, rid)
    options.require = _tag_list(meta, "require", rid)
    options.prefer = _tag_list(meta, "prefer", rid)
    options.affinity = _key_option(meta, "affinity", rid)
    options.concurrency_key = _key_option(meta, "concurrency_key", rid)
    debounce_s = _number(meta, "debounce_s", rid)
    if debounce_s is not None and (debounce_s <= 0 or options.key is None or n_tasks != 1):
        raise CallError(
            rid, E_BAD_REQUEST, "'debounce_s' must be positive, with the 'key' of one task"
        )
    if debounce_s is not None and (options.delay_s is not None or options.not_before is not None):
        raise CallError(rid, E_BAD_REQUEST, "give 'debounce_s' or a delay, not both")
    options.debounce_s = debounce_s


def _tag_list(meta: dict[str, Any], name: str, rid: int) -> tuple[str, ...]:
    """`require` or `prefer`: at most MAX_TAGS non-empty strings."""
    tags = meta.get(name, ())
    if tags == ():
        return ()
    if (
        not isinstance(tags, list)
        or len(tags) > limits.MAX_TAGS
        or not all(isinstance(t, str) and t for t in tags)
    ):
        raise CallError(
            rid, E_BAD_REQUEST, f"'{name}' must list at most {limits.MAX_TAGS} non-empty strings"
        )
    return tuple(dict.fromkeys(tags))


def _key_option(meta: dict[str, Any], name: str, rid: int) -> str | None:
    """`affinity` or `concurrency_key`: a non-empty string."""
    value = meta.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise CallError(rid, E_BAD_REQUEST, f"'{name}' must be a non-empty string")
    return value


def _dependencies(
    meta: dict[str, Any], rid: int
) -> tuple[tuple[DependencyRef, ...], bool, str | None]:
    """`depends_on`, `run_anyway` and `input` (§15), checked."""
    raw = meta.get("depends_on")
    run_anyway = meta.get("run_anyway", False)
    input_ = meta.get("input")
    if raw is None:
        if run_anyway or input_ is not None:
            raise CallError(rid, E_BAD_REQUEST, "'run_anyway' and 'input' need 'depends_on'")
        return (), False, None
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_DEPENDENCIES:
        raise CallError(
            rid, E_BAD_REQUEST, f"'depends_on' must list 1..{MAX_DEPENDENCIES} dependencies"
        )
    refs: list[DependencyRef] = []
    for entry in raw:
        if isinstance(entry, str) and entry:
            refs.append(entry)
        elif (
            isinstance(entry, dict)
            and entry.keys() == {"service", "key"}
            and isinstance(entry["service"], str)
            and isinstance(entry["key"], str)
            and entry["service"]
            and entry["key"]
        ):
            refs.append((entry["service"], entry["key"]))
        else:
            raise CallError(
                rid,
                E_BAD_REQUEST,
                "'depends_on' entries are task ids or {service, key} maps of non-empty strings",
            )
    if type(run_anyway) is not bool:
        raise CallError(rid, E_BAD_REQUEST, "'run_anyway' must be true or false")
    if input_ is not None and input_ not in INPUTS:
        raise CallError(rid, E_BAD_REQUEST, f"'input' must be one of {', '.join(INPUTS)}")
    if input_ == INPUT_RESULT and len(refs) != 1:
        raise CallError(rid, E_BAD_REQUEST, "'input': 'result' takes exactly one dependency")
    return tuple(refs), run_anyway, input_


def _ids(meta: dict[str, Any], rid: int) -> tuple[str, ...] | None:
    """The `ids` of a REDRIVE or DROP: nil (the call picks), or 0..MAX_BATCH task ids.

    A longer list is refused whole: acting on its first MAX_BATCH ids and answering
    as if that were all would leave the caller believing the rest were handled."""
    ids = meta.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CallError(rid, E_BAD_REQUEST, "'ids' must be a list of task ids")
    if len(ids) > MAX_BATCH:
        raise CallError(
            rid,
            E_BAD_REQUEST,
            f"'ids' lists {len(ids)} task ids: at most {MAX_BATCH} per call, nothing was done",
        )
    return tuple(ids)


def _split(frames: Sequence[bytes], counts: Any, rid: int) -> tuple[tuple[bytes, ...], ...]:
    if (
        not isinstance(counts, list)
        or not counts
        or len(counts) > MAX_BATCH
        or not all(type(c) is int and c >= 0 for c in counts)
    ):
        raise CallError(rid, E_BAD_REQUEST, f"'counts' must list 1..{MAX_BATCH} frame counts")
    if sum(counts) != len(frames):
        raise CallError(rid, E_BAD_REQUEST, "'counts' does not add up to the payload frames")
    out = []
    i = 0
    for c in counts:
        out.append(tuple(frames[i : i + c]))
        i += c
    return tuple(out)


# ------------------------------------------------------------ broker side


# One decoder per command. ENQUEUE and REQUEST are given their payload frames; every
# other call is its meta alone (decode_client refuses payload frames for them first).
# The checks inside a decoder run in the order they always have: when a call breaks
# several rules, the same one is reported.


def _decode_enqueue(meta: dict[str, Any], rid: int, body: Sequence[bytes]) -> Enqueue:
    service = _str(meta, "service", rid)
    counts = meta.get("counts")
    payloads = (tuple(body),) if counts is None else _split(body, counts, rid)
    return Enqueue(rid, service, payloads, _options(meta, rid, len(payloads)))


def _decode_request(meta: dict[str, Any], rid: int, body: Sequence[bytes]) -> Enqueue:
    service = _str(meta, "service", rid)
    if meta.get("counts") is not None:
        raise CallError(rid, E_BAD_REQUEST, "REQUEST carries one task: no 'counts'")
    options = _options(meta, rid, 1)
    wait_s = _number(meta, "wait_s", rid)
    if wait_s is not None:
        wait_s = min(wait_s, MAX_WAIT_S)
    return Enqueue(rid, service, (tuple(body),), options, wait=True, wait_s=wait_s)


_ATTEMPTS = ("all", "current")
_MAX_OFFSET = 2**63 - 1


def _follow(meta: dict[str, Any], rid: int, cancel_on_abandon: bool) -> Follow:
    window = _int(meta, "window", rid, 1, limits.STREAM_WINDOW_MAX, limits.STREAM_WINDOW_DEFAULT)
    attempts = meta.get("attempts", "all")
    if attempts not in _ATTEMPTS:
        raise CallError(rid, E_BAD_REQUEST, '\'attempts\' must be "all" or "current"')
    cancel = meta.get("cancel_on_abandon", cancel_on_abandon)
    if type(cancel) is not bool:
        raise CallError(rid, E_BAD_REQUEST, "'cancel_on_abandon' must be a boolean")
    return Follow(window, attempts == "current", cancel)


def _wait_s(meta: dict[str, Any], rid: int) -> float | None:
    wait_s = _number(meta, "wait_s", rid)
    return None if wait_s is None else min(wait_s, MAX_WAIT_S)


def _decode_stream(meta: dict[str, Any], rid: int, body: Sequence[bytes]) -> Enqueue:
    request = _decode_request(meta, rid, body)
    request.follow = _follow(meta, rid, True)
    return request


def _decode_read(meta: dict[str, Any], rid: int) -> Read:
    task_id = _str(meta, "id", rid)
    offset = _int(meta, "offset", rid, 0, _MAX_OFFSET, 0)
    return Read(rid, task_id, offset, _wait_s(meta, rid), _follow(meta, rid, False))


def _decode_more(meta: dict[str, Any], rid: int) -> More:
    return More(rid, _int(meta, "credit", rid, 1, limits.STREAM_CREDIT_MAX, 0))


def _decode_close(meta: dict[str, Any], rid: int) -> Close:
    return Close(rid)


def _decode_result(meta: dict[str, Any], rid: int) -> Result:
    wait_s = _number(meta, "wait_s", rid) or 0.0
    return Result(rid, _str(meta, "id", rid), min(wait_s, MAX_WAIT_S))


def _decode_status(meta: dict[str, Any], rid: int) -> Status:
    preview = _int(meta, "preview", rid, 0, limits.MAX_PREVIEW_BYTES, 0)
    return Status(rid, _str(meta, "id", rid), preview)


def _decode_cancel(meta: dict[str, Any], rid: int) -> Cancel:
    return Cancel(rid, _str(meta, "id", rid))


def _decode_dead(meta: dict[str, Any], rid: int) -> Dead:
    after = meta.get("after")
    if after is not None and type(after) is not int:
        raise CallError(rid, E_BAD_REQUEST, "'after' must be an integer")
    limit = _int(meta, "limit", rid, 1, MAX_LIST, 100)
    return Dead(rid, _str(meta, "service", rid), limit, after)


def _decode_redrive(meta: dict[str, Any], rid: int) -> Redrive:
    return Redrive(rid, _str(meta, "service", rid), _ids(meta, rid))


def _decode_queues(meta: dict[str, Any], rid: int) -> Queues:
    after = meta.get("after")
    if after is not None and not isinstance(after, str):
        raise CallError(rid, E_BAD_REQUEST, "'after' must be a service name")
    limit = _int(meta, "limit", rid, 1, limits.MAX_QUEUES_PAGE, limits.DEFAULT_QUEUES_PAGE)
    return Queues(rid, limit, after)


def _decode_workers(meta: dict[str, Any], rid: int) -> Workers:
    return Workers(rid)


def _decode_drain(meta: dict[str, Any], rid: int) -> Drain:
    return Drain(rid, _str(meta, "worker", rid))


def _decode_stats(meta: dict[str, Any], rid: int) -> Stats:
    return Stats(rid)


def _decode_tasks(meta: dict[str, Any], rid: int) -> ListTasks:
    state = meta.get("state")
    if not isinstance(state, str) or state not in LISTABLE_STATES:
        raise CallError(rid, E_BAD_REQUEST, f"'state' must be one of {', '.join(LISTABLE_STATES)}")
    return ListTasks(
        rid,
        _str(meta, "service", rid),
        TaskState(state),
        _int(meta, "limit", rid, 1, MAX_LIST, 100),
        _int(meta, "after", rid, 0, limits.MAX_LIST_AFTER, 0),
        _number(meta, "older_than_s", rid) or 0.0,
    )


def _decode_purge(meta: dict[str, Any], rid: int) -> Purge:
    return Purge(rid, _str(meta, "service", rid))


def _decode_drop(meta: dict[str, Any], rid: int) -> Drop:
    return Drop(rid, _str(meta, "service", rid), _ids(meta, rid))


def _decode_limit(meta: dict[str, Any], rid: int) -> Limit:
    cap = meta.get("limit")
    if cap is not None and (type(cap) is not int or not 1 <= cap <= limits.MAX_SERVICE_LIMIT):
        raise CallError(
            rid,
            E_BAD_REQUEST,
            f"'limit' must be an integer 1..{limits.MAX_SERVICE_LIMIT} or nil",
        )
    per_key = meta.get("per_key", False)
    if type(per_key) is not bool:
        raise CallError(rid, E_BAD_REQUEST, "'per_key' must be true or false")
    return Limit(rid, _str(meta, "service", rid), cap, per_key)


def _decode_rate(meta: dict[str, Any], rid: int) -> Rate:
    service = _str(meta, "service", rid)
    rate = _number(meta, "rate", rid)  # absent or nil: no rate, as LIMIT's limit
    if rate is not None and not 0 < rate <= limits.MAX_RATE_PER_S:
        raise CallError(
            rid,
            E_BAD_REQUEST,
            f"'rate' must be a number of tasks per second in (0, {limits.MAX_RATE_PER_S:g}]",
        )
    default = max(1, math.ceil(rate)) if rate is not None else 1
    burst = _int(meta, "burst", rid, 1, limits.MAX_BURST, default)
    per_key = meta.get("per_key", False)
    if type(per_key) is not bool:
        raise CallError(rid, E_BAD_REQUEST, "'per_key' must be true or false")
    return Rate(rid, service, rate, burst, per_key)


def _decode_pause(meta: dict[str, Any], rid: int) -> Pause:
    return Pause(rid, _str(meta, "service", rid), True)


def _decode_resume(meta: dict[str, Any], rid: int) -> Pause:
    return Pause(rid, _str(meta, "service", rid), False)


# The calls that carry payload frames (frames after meta), and those that carry none.
_PAYLOAD_DECODERS: dict[
    bytes, Callable[[dict[str, Any], int, Sequence[bytes]], Enqueue | Schedule]
] = {
    ENQUEUE: _decode_enqueue,
    REQUEST: _decode_request,
    STREAM: _decode_stream,
}
_CALL_DECODERS: dict[bytes, Callable[[dict[str, Any], int], ClientMessage]] = {
    RESULT: _decode_result,
    STATUS: _decode_status,
    CANCEL: _decode_cancel,
    DEAD: _decode_dead,
    REDRIVE: _decode_redrive,
    QUEUES: _decode_queues,
    WORKERS: _decode_workers,
    DRAIN: _decode_drain,
    PAUSE: _decode_pause,
    RESUME: _decode_resume,
    STATS: _decode_stats,
    LIMIT: _decode_limit,
    RATE: _decode_rate,
    PURGE: _decode_purge,
    DROP: _decode_drop,
    TASKS: _decode_tasks,
    READ: _decode_read,
    MORE: _decode_more,
    CLOSE: _decode_close,
}


def decode_client(frames: Sequence[bytes]) -> ClientMessage:
    """Broker side: frames after the routing id, from a ZBC01 client.

    Raises ProtocolError for a message whose sender cannot be answered (no
    readable rid), CallError (a ProtocolError with a rid) for a call to refuse."""
    n = len(frames)
    if n < 4:
        raise ProtocolError("missing_frames", "ZBC01 message needs a command and a meta frame")
    if frames[0]:
        raise ProtocolError("bad_delimiter", "first frame must be empty")
    meta = unpack_meta(frames[3])
    rid = meta.get("rid")
    if type(rid) is not int:
        raise ProtocolError("bad_meta", "ZBC01 meta needs an integer 'rid'")
    command = frames[2]
    with_payload = _PAYLOAD_DECODERS.get(command)
    if with_payload is not None:
        return with_payload(meta, rid, frames[4:])
    if n != 4:
        raise CallError(rid, E_BAD_REQUEST, "this command takes no payload frames")
    decode = _CALL_DECODERS.get(command)
    if decode is None:
        raise CallError(rid, E_BAD_REQUEST, f"unknown ZBC01 command {command[:8]!r}")
    return decode(meta, rid)


def reply(rid: int, fields: dict[str, Any], frames: Sequence[bytes] = ()) -> list[bytes]:
    """Broker -> client: the answer to call `rid` (without the routing id)."""
    meta = dict(fields)
    meta["rid"] = rid
    return [EMPTY, ZBC01, REPLY, pack_meta(meta), *frames]


def chunks(rid: int, task_id: str, offset: int, attempt: int, data: Sequence[bytes]) -> list[bytes]:
    """Broker -> client: chunks `offset`.. of task `task_id`'s stream, all of `attempt`,
    for stream call `rid` (without the routing id)."""
    meta = pack_meta({"rid": rid, "id": task_id, "offset": offset, "attempt": attempt})
    return [EMPTY, ZBC01, CHUNKS, meta, *data]


def error(rid: int, code: str, message: str) -> list[bytes]:
    return [EMPTY, ZBC01, ERROR, pack_meta({"rid": rid, "code": code, "message": message})]


# ------------------------------------------------------------ client side


def _option_meta(options: TaskOptions) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if options.priority:
        meta["priority"] = options.priority
    for name in ("delay_s", "not_before", "ttl_s", "max_attempts", "timeout_s", "key"):
        value = getattr(options, name)
        if value is not None:
            meta[name] = value
    if options.keys is not None:
        meta["keys"] = list(options.keys)
    if options.headers:
        meta["headers"] = options.headers
    if options.depends_on:
        meta["depends_on"] = [
            ref if isinstance(ref, str) else {"service": ref[0], "key": ref[1]}
            for ref in options.depends_on
        ]
        if options.run_anyway:
            meta["run_anyway"] = True
        if options.input is not None:
            meta["input"] = options.input
    if options.require:
        meta["require"] = list(options.require)
    if options.prefer:
        meta["prefer"] = list(options.prefer)
    if options.affinity is not None:
        meta["affinity"] = options.affinity
    if options.concurrency_key is not None:
        meta["concurrency_key"] = options.concurrency_key
    if options.debounce_s is not None:
        meta["debounce_s"] = options.debounce_s
    return meta


def enqueue(
    rid: int,
    service: str,
    payloads: Sequence[Sequence[bytes]],
    options: TaskOptions | None = None,
    *,
    batch: bool = False,
) -> list[bytes]:
    """ENQUEUE one task (`batch` False: `payloads` holds exactly one) or a batch."""
    meta = _option_meta(options or TaskOptions())
    meta["rid"] = rid
    meta["service"] = service
    frames: list[bytes] = []
    if batch:
        meta["counts"] = [len(p) for p in payloads]
    elif len(payloads) != 1:
        raise ValueError("a single ENQUEUE carries exactly one payload")
    for p in payloads:
        frames.extend(p)
    return [EMPTY, ZBC01, ENQUEUE, pack_meta(meta), *frames]


def request(
    rid: int,
    service: str,
    payload: Sequence[bytes],
    options: TaskOptions | None = None,
    wait_s: float | None = None,
) -> list[bytes]:
    """REQUEST: enqueue one task and have the broker hold the call for its result
    (up to `wait_s`; None: the broker's default)."""
    meta = _option_meta(options or TaskOptions())
    meta["rid"] = rid
    meta["service"] = service
    if wait_s is not None:
        meta["wait_s"] = wait_s
    return [EMPTY, ZBC01, REQUEST, pack_meta(meta), *payload]


def _follow_meta(
    meta: dict[str, Any],
    window: int | None,
    attempts: str | None,
    cancel_on_abandon: bool | None,
    wait_s: float | None,
) -> None:
    if window is not None:
        meta["window"] = window
    if attempts is not None:
        meta["attempts"] = attempts
    if cancel_on_abandon is not None:
        meta["cancel_on_abandon"] = cancel_on_abandon
    if wait_s is not None:
        meta["wait_s"] = wait_s


def stream(
    rid: int,
    service: str,
    payload: Sequence[bytes],
    options: TaskOptions | None = None,
    *,
    wait_s: float | None = None,
    window: int | None = None,
    attempts: str | None = None,
    cancel_on_abandon: bool | None = None,
) -> list[bytes]:
    """STREAM: REQUEST one task and have its stream's chunks sent as they come (§13).
    None leaves a field to the broker's default."""
    meta = _option_meta(options or TaskOptions())
    meta["rid"] = rid
    meta["service"] = service
    _follow_meta(meta, window, attempts, cancel_on_abandon, wait_s)
    return [EMPTY, ZBC01, STREAM, pack_meta(meta), *payload]


def read(
    rid: int,
    task_id: str,
    offset: int = 0,
    *,
    wait_s: float | None = None,
    window: int | None = None,
    attempts: str | None = None,
    cancel_on_abandon: bool | None = None,
) -> list[bytes]:
    """READ: follow task `task_id`'s stream from `offset` (§13)."""
    meta: dict[str, Any] = {"rid": rid, "id": task_id}
    if offset:
        meta["offset"] = offset
    _follow_meta(meta, window, attempts, cancel_on_abandon, wait_s)
    return [EMPTY, ZBC01, READ, pack_meta(meta)]


def call(command: bytes, rid: int, **fields: Any) -> list[bytes]:
    """RESULT, STATUS, CANCEL, DEAD or REDRIVE: a meta-only call (None fields left out)."""
    meta = {k: v for k, v in fields.items() if v is not None}
    meta["rid"] = rid
    return [EMPTY, ZBC01, command, pack_meta(meta)]


@dataclass(frozen=True, slots=True)
class Answer:
    """What a client receives: a REPLY (ok) or an ERROR (code, message), for call `rid`."""

    rid: int
    ok: bool
    meta: dict[str, Any]
    frames: tuple[bytes, ...] = ()
    chunks: bool = False  # a CHUNKS of a stream call (meta {id, offset, attempt}), not an end

    @property
    def code(self) -> str:
        return str(self.meta.get("code", ""))

    @property
    def message(self) -> str:
        return str(self.meta.get("message", ""))


def decode_answer(frames: Sequence[bytes]) -> Answer:
    """Client side: what a DEALER receives (empty, ZBC01, REPLY|ERROR, meta, frames...)."""
    if len(frames) < 4 or frames[0] or frames[1] != ZBC01:
        raise ProtocolError("bad_header", "not a ZBC01 answer")
    meta = unpack_meta(frames[3])
    rid = meta.get("rid")
    if type(rid) is not int:
        raise ProtocolError("bad_meta", "ZBC01 answer without an integer 'rid'")
    command = frames[2]
    if command == REPLY:
        return Answer(rid, True, meta, tuple(frames[4:]))
    if command == ERROR:
        return Answer(rid, False, meta)
    if command == CHUNKS:
        return Answer(rid, True, meta, tuple(frames[4:]), True)
    raise ProtocolError("unknown_command", f"unexpected ZBC01 command {command[:8]!r}")


# ------------------------------------------------- recurring tasks (§17)

# What a firing's task may not be told by its schedule: the broker sets its key
# (one per instant) and it runs when it fires.
_NOT_FOR_FIRINGS = ("key", "keys", "delay_s", "not_before", "counts", "wait_s")


def _decode_schedule(meta: dict[str, Any], rid: int, body: Sequence[bytes]) -> Schedule:
    name = _str(meta, "name", rid)
    if len(name.encode()) > limits.MAX_SCHEDULE_NAME_BYTES or not name.isprintable():
        raise CallError(
            rid,
            E_BAD_REQUEST,
            f"'name' must be 1..{limits.MAX_SCHEDULE_NAME_BYTES} bytes of printable text",
        )
    service = _str(meta, "service", rid)
    given = [field for field in _NOT_FOR_FIRINGS if meta.get(field) is not None]
    if given:
        raise CallError(
            rid,
            E_BAD_REQUEST,
            f"a schedule's firings take no {', '.join(repr(f) for f in given)}: "
            "the broker keys each firing by its instant and enqueues it when due",
        )
    every, expr, tz = meta.get("every_s"), meta.get("cron"), meta.get("tz")
    if (every is None) == (expr is None):
        raise CallError(rid, E_BAD_REQUEST, "give exactly one of 'every_s' and 'cron'")
    try:
        if every is not None:
            if tz is not None:
                raise ValueError("'tz' goes with 'cron' only: an interval is the same in any zone")
            every = cron.check_every(every)
        else:
            if not isinstance(expr, str):
                raise ValueError("'cron' must be a string: a cron expression")
            if tz is not None and not isinstance(tz, str):
                raise ValueError("'tz' must be an IANA time zone name")
            expr = cron.Cron.parse(expr, tz).expr
    except ValueError as exc:
        raise CallError(rid, E_BAD_REQUEST, str(exc)) from None
    size = sum(map(len, body))
    if size > limits.MAX_SCHEDULE_PAYLOAD_BYTES:
        raise CallError(
            rid,
            E_BAD_REQUEST,
            f"a schedule's payload is at most {limits.MAX_SCHEDULE_PAYLOAD_BYTES} bytes,"
            f" this one {size}",
        )
    options = _options(meta, rid, 1)
    return Schedule(rid, name, service, tuple(body), options, every, expr, tz)


def _decode_schedules(meta: dict[str, Any], rid: int) -> ListSchedules:
    return ListSchedules(rid)


def _decode_unschedule(meta: dict[str, Any], rid: int) -> Unschedule:
    return Unschedule(rid, _str(meta, "name", rid))


_PAYLOAD_DECODERS[SCHEDULE] = _decode_schedule
_CALL_DECODERS[SCHEDULES] = _decode_schedules
_CALL_DECODERS[UNSCHEDULE] = _decode_unschedule


def schedule(
    rid: int,
    name: str,
    service: str,
    payload: Sequence[bytes],
    options: TaskOptions | None = None,
    *,
    every_s: int | None = None,
    cron: str | None = None,
    tz: str | None = None,
) -> list[bytes]:
    """SCHEDULE: fire `payload` to `service` every `every_s` seconds or at the instants
    of `cron` (in `tz`); None fields are left out."""
    meta = _option_meta(options or TaskOptions())
    meta.update({"rid": rid, "name": name, "service": service})
    for key, value in (("every_s", every_s), ("cron", cron), ("tz", tz)):
        if value is not None:
            meta[key] = value
    return [EMPTY, ZBC01, SCHEDULE, pack_meta(meta), *payload]
