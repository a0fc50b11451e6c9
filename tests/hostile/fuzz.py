"""A seeded fuzzer over the broker's ROUTER protocols (MDPC01, MDPW01, ZBW01, ZBC01)
and its event endpoints (XSUB events-in, XPUB events-out), with the checks of a
hostile-peer run: the broker stays alive, answers probes, and its memory stays bounded.

`ShotMaker` turns a seed into what a hostile or buggy peer could send: messages built
with zbroker.protocol's encoders, the same with a frame or a meta field mutated (wrong
types, extreme numbers, NaN, keys missing or unknown, truncated msgpack), valid calls in
odd orders (DONE for unknown tasks, ACK before READY, a second READY), batches at and
over the limits, a few messages near and over the size caps, and raw random frames.
`Fuzzer` sends them from several DEALER peers (some set their own routing id, some
reconnect now and then), a PUB on events-in and SUB/XSUB peers on events-out, and
probes the broker every `probe_every` messages.

The shots depend on the seed and on what the broker answered (the task ids and
attempts its fuzz workers were handed), so a seed replays exactly only while the
broker answers alike; the last shots sent are kept for the report of a failure.
Shared by tests/hostile/test_fuzz.py (bounded) and bench/fuzz.py (a million messages).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zbroker.protocol import ext, limits, mdp, zbc
from zbroker.protocol.events import Event, encode_event

# What the broker's resident memory (VmRSS) may reach during a run of 10,000 messages
# against a fresh broker, in MiB. Measured on 2026-12-07 (seeds 1-4, 10 heavy shots
# each): 45 at start, peaks of 108 to 141; seeds 4-17 with twice as many messages and
# heavy shots peaked at 117 to 202. A million messages cost more (bench/fuzz.py has
# its own budget): the tasks the fuzz clients store, and native memory that grows
# with many-MiB messages.
RSS_BUDGET_MIB = 300
# How long a probe (an 8/MMI query and a ZBC01 STATS, from a fresh DEALER) may take.
PROBE_DEADLINE_S = 5.0
# A send that cannot be queued within this long gives up (the peer then reconnects):
# a peer whose routing id another connection holds is never read by the ROUTER.
SEND_TIMEOUT_MS = 500
# Answers read from the peers (and learnt from) every this many shots.
DRAIN_EVERY = 16
MAX_BYTES = limits.DEFAULT_MAX_MESSAGE_BYTES

ROUTER = "router"
EVENTS_IN = "events-in"
EVENTS_OUT = "events-out"

# Services the fuzz clients and workers share, so that they meet; a few shots use others.
SERVICES = ("fuzz.a", "fuzz.b", "fuzz.c")
WORKER_SLOTS = 8  # DEALER peers on the ROUTER

EXTREMES: tuple[Any, ...] = (
    0,
    -1,
    1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1e308,
    -1e308,
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    5e-324,
    1.0,
    True,
    False,
    None,
    "",
    "x" * 300,
    "\u0000\uffff",
    b"\x00\xff",
    [],
    {},
    [[1, 2]],
    [["t1", 1, 0]],
    {"k": [None]},
    {1: 2},
    msgpack.ExtType(5, b"xx"),
    msgpack.Timestamp(0, 1),
)


@dataclass(frozen=True, slots=True)
class Shot:
    """One message to send: where (`target`, and for the ROUTER which peer `slot`),
    which protocol it imitates (`kind`), how it was made (`note`) and its frames."""

    target: str
    kind: str
    note: str
    frames: list[bytes]
    slot: int = 0

    def describe(self) -> str:
        parts = ", ".join(_frame_repr(f) for f in self.frames[:8])
        more = f", ... {len(self.frames)} frames" if len(self.frames) > 8 else ""
        return f"{self.target}/{self.kind} slot {self.slot} [{self.note}]: [{parts}{more}]"


def _frame_repr(frame: bytes) -> str:
    if len(frame) <= 48:
        return repr(frame)
    return f"{frame[:40]!r}...({len(frame)} bytes)"


# ------------------------------------------------------------------ knowledge


class Knowledge:
    """What the fuzz peers learnt from the broker's answers: task attempts handed to
    each slot, MDP client addresses, task ids and worker ids. Bounded."""

    def __init__(self) -> None:
        self.refs: dict[int, deque[tuple[str, int]]] = {}
        self.clients: dict[int, deque[bytes]] = {}
        self.task_ids: deque[str] = deque(maxlen=256)
        self.worker_ids: deque[str] = deque(maxlen=32)
        self.answers = 0

    def refs_of(self, slot: int) -> deque[tuple[str, int]]:
        return self.refs.setdefault(slot, deque(maxlen=64))

    def clients_of(self, slot: int) -> deque[bytes]:
        return self.clients.setdefault(slot, deque(maxlen=16))

    def learn(self, slot: int, frames: list[bytes]) -> None:
        self.answers += 1
        if len(frames) < 4 or frames[0]:
            return
        header, command = frames[1], frames[2]
        try:
            if header == ext.ZBW01 and command in (ext.TASK, ext.TASKS):
                self._learn_tasks(slot, command, ext.unpack_meta(frames[3]))
            elif header == mdp.MDPW01 and command == mdp.REQUEST:
                self.clients_of(slot).append(frames[3])
            elif header == zbc.ZBC01 and command == zbc.REPLY:
                self._learn_reply(ext.unpack_meta(frames[3]))
        except Exception:  # an answer we cannot read teaches nothing
            return

    def _learn_tasks(self, slot: int, command: bytes, meta: dict[str, Any]) -> None:
        entries = [meta] if command == ext.TASK else meta.get("tasks", [])
        refs = self.refs_of(slot)
        for entry in entries:
            refs.append((str(entry["id"]), int(entry["attempt"])))
            self.task_ids.append(str(entry["id"]))

    def _learn_reply(self, meta: dict[str, Any]) -> None:
        for task_id in meta.get("ids", ())[:8]:
            self.task_ids.append(str(task_id))
        for worker in meta.get("workers", ())[:8]:
            self.worker_ids.append(str(worker.get("worker")))
        for task in meta.get("tasks", ())[:8]:
            if isinstance(task, dict) and "id" in task:
                self.task_ids.append(str(task["id"]))

    def forget_slot(self, slot: int) -> None:
        """The slot reconnected: what it held is stale now (and kept as such, to be
        quoted by a peer that should not)."""
        stale = self.refs.pop(slot, None)
        if stale:
            self.refs_of(-1).extend(stale)
        self.clients.pop(slot, None)


# ------------------------------------------------------------------ drafts


@dataclass(slots=True)
class Draft:
    """A message before mutation: frames before the meta, the meta map (None for a
    protocol without one), and frames after it."""

    kind: str
    note: str
    head: list[bytes]
    meta: Any = None
    tail: list[bytes] = field(default_factory=list)


def _pack(meta: Any) -> bytes:
    try:
        if isinstance(meta, dict) and len(meta) < 1 << 16:
            items = (_pack_value(k) + _pack_value(v) for k, v in meta.items())
            return _map_header(len(meta)) + b"".join(items)
        return _pack_value(meta)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"  # never used by msgpack: the broker must refuse it all the same


def _nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"n": value}
    return value


@dataclass(frozen=True, slots=True)
class Deep:
    """A value nested `depth` maps deep, packed by hand: msgpack's own packer refuses
    more than 511 levels, a hostile peer need not."""

    depth: int

    def packed(self) -> bytes:
        return b"\x81\xa1n" * self.depth + b"\x80"


def _pack_value(value: Any) -> bytes:
    if isinstance(value, Deep):
        return value.packed()
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


class ShotMaker:
    """Seeded source of shots. `heavy_every`: one costly shot (a batch at a limit, a
    message near or over a cap) per that many shots; `allow_huge`: whether a frame
    over four times the cap (which makes libzmq drop the connection) may be sent."""

    def __init__(
        self,
        seed: int,
        knowledge: Knowledge,
        *,
        heavy_every: int = 2500,
        allow_huge: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.k = knowledge
        self.heavy_every = heavy_every
        self.allow_huge = allow_huge
        self.count = 0
        self.rid = 0
        self._blobs: dict[int, bytes] = {}
        self._kinds: list[tuple[Callable[[], Shot], int]] = [
            (self._zbc_shot, 30),
            (self._zbw_shot, 22),
            (self._mdpc_shot, 13),
            (self._mdpw_shot, 12),
            (self._raw_shot, 8),
            (self._events_in_shot, 8),
            (self._events_out_shot, 7),
        ]
        self._makers = [m for m, _ in self._kinds]
        self._weights = [w for _, w in self._kinds]

    # ------------------------------------------------------------ public

    def next(self) -> Shot:
        self.count += 1
        if self.heavy_every and self.count % self.heavy_every == self.heavy_every // 2:
            return self._heavy_shot()
        maker = self.rng.choices(self._makers, self._weights)[0]
        return maker()

    def routing_id(self, slot: int) -> bytes | None:
        """The routing id a (re)connecting peer of `slot` sets: none for half of the
        slots, else its own, one shared with another slot, or one of odd bytes."""
        if slot < WORKER_SLOTS // 2:
            return None
        rng = self.rng
        choice = rng.random()
        if choice < 0.6:
            return f"fuzz-peer-{slot}-{rng.randrange(1 << 30)}".encode()
        if choice < 0.75:
            return b"fuzz-shared-id"
        if choice < 0.9:
            return bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randrange(0, 254))
        return b"\x00" + rng.randbytes(rng.choice((3, 5, 8)))

    def wants_reconnect(self) -> int | None:
        """A slot to reconnect now, about once per 400 shots."""
        if self.rng.random() < 1 / 400:
            return self.rng.randrange(WORKER_SLOTS)
        return None

    # ------------------------------------------------------------ helpers

    def blob(self, size: int) -> bytes:
        if size not in self._blobs:
            self._blobs[size] = b"\xab" * size
        return self._blobs[size]

    def _next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def _service(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.85:
            return rng.choice(SERVICES)
        if roll < 0.92:
            return f"fuzz.x{rng.randrange(50)}"
        return rng.choice(("mmi.service", "", "é" * 40, "a" * 1000, "fuzz.\x00", "s" * 70_000))

    def _small_body(self) -> list[bytes]:
        rng = self.rng
        return [rng.randbytes(rng.choice((0, 1, 5, 64, 300))) for _ in range(rng.randrange(4))]

    def _task_ref(self, slot: int) -> tuple[str, int]:
        """An attempt this slot holds (most often), one another slot holds or a stale
        one, or a made-up one."""
        rng = self.rng
        roll = rng.random()
        pool = self.k.refs_of(slot) if roll < 0.6 else self.k.refs_of(rng.randrange(-1, 8))
        if pool and roll < 0.9:
            task_id, attempt = rng.choice(pool)
            return task_id, attempt + rng.choice((0, 0, 0, 1, -1))
        return rng.choice((f"t{rng.randrange(1000):x}", f"m{rng.randrange(100)}", "", "t")), 1

    def _task_id(self) -> str:
        if self.k.task_ids and self.rng.random() < 0.7:
            return self.rng.choice(self.k.task_ids)
        return self.rng.choice(("t1", "t2a", "nope", "", "x" * 500, "t" + "f" * 40))

    def _slot(self) -> int:
        return self.rng.randrange(WORKER_SLOTS)

    # ------------------------------------------------------------ finishing

    def _finish(self, draft: Draft, target: str = ROUTER, slot: int | None = None) -> Shot:
        """Mutate the draft (or not), pack it, make the shot."""
        rng = self.rng
        roll = rng.random()
        note = draft.note
        meta = draft.meta
        if meta is not None and roll < 0.3:
            meta, how = self._mutate_meta(meta)
            note += f"/meta:{how}"
        packed = [] if meta is None else [_pack(meta)]
        if packed and 0.3 <= roll < 0.4:
            packed, how = [self._mutate_packed(packed[0])], "bytes"
            note += f"/meta:{how}"
        frames = [*draft.head, *packed, *draft.tail]
        if 0.4 <= roll < 0.6:
            frames, how = self._mutate_frames(frames)
            note += f"/frames:{how}"
        return Shot(target, draft.kind, note, frames, self._slot() if slot is None else slot)

    def _mutate_meta(self, meta: Any) -> tuple[Any, str]:
        rng = self.rng
        if not isinstance(meta, dict):
            return rng.choice(EXTREMES), "replaced"
        meta = dict(meta)
        op = rng.randrange(7)
        key = rng.choice(list(meta)) if meta else "rid"
        if op <= 1:
            meta[key] = rng.choice(EXTREMES)
            return meta, f"{key}=extreme"
        if op == 2:
            meta.pop(key, None)
            return meta, f"-{key}"
        if op == 3:
            meta[rng.choice(("zz", "rid", "tasks", "counts", "headers", "metrics"))] = rng.choice(
                EXTREMES
            )
            return meta, "+key"
        if op == 4:
            meta[rng.choice((7, b"bin", 1.5, None))] = 1  # type: ignore[index]
            return meta, "non-str key"
        if op == 5:
            depth = rng.choice((5, 100, 600, 2000))
            meta[key] = Deep(depth) if depth > 500 else _nested(depth)
            return meta, f"{key}=nested"
        return rng.choice(([meta], 7, "map", b"map", None)), "not a map"

    def _mutate_packed(self, packed: bytes) -> bytes:
        rng = self.rng
        op = rng.randrange(4)
        if op == 0 and packed:
            return packed[: rng.randrange(len(packed))]
        if op == 1:
            return packed + rng.randbytes(rng.randrange(1, 9))
        if op == 2 and packed:
            i = rng.randrange(len(packed))
            return packed[:i] + bytes([rng.randrange(256)]) + packed[i + 1 :]
        return rng.randbytes(rng.randrange(0, 40))

    def _mutate_frames(self, frames: list[bytes]) -> tuple[list[bytes], str]:
        rng = self.rng
        frames = list(frames)
        op = rng.randrange(7)
        i = rng.randrange(len(frames)) if frames else 0
        if op == 0 and frames:
            del frames[i]
            return frames, f"drop {i}"
        if op == 1:
            frames.insert(i, rng.randbytes(rng.randrange(0, 20)))
            return frames, f"insert {i}"
        if op == 2 and frames:
            frames.insert(i, frames[i])
            return frames, f"dup {i}"
        if op == 3 and frames:
            frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
            return frames, f"truncate {i}"
        if op == 4 and len(frames) > 2:
            frames[2] = bytes([rng.randrange(256)])
            return frames, "command byte"
        if op == 5 and len(frames) > 1:
            frames[1] = rng.choice((b"MDPC02", b"mdpc01", b"ZBC01\x00", b"ZBW0", b"", b"MDPW01"))
            return frames, "header"
        frames.extend(b"" for _ in range(rng.randrange(1, 4)))
        return frames, "extra"

    # ------------------------------------------------------------ ZBC01

    def _options(self) -> dict[str, Any]:
        rng = self.rng
        choices: dict[str, Callable[[], Any]] = {
            "priority": lambda: rng.choice((-128, 127, 0, rng.randrange(-128, 128))),
            "delay_s": lambda: rng.choice((0, 0.01, 0.5, 1e9)),
            "not_before": lambda: rng.choice((0, time.time() + 1, 1e12, -5)),
            "ttl_s": lambda: rng.choice((0, 0.05, 3600)),
            "max_attempts": lambda: rng.choice((1, 2, 1000)),
            "timeout_s": lambda: rng.choice((0.05, 1, 1e6)),
            "key": lambda: f"k{rng.randrange(30)}",
            "headers": lambda: {"correlation_id": "c", "n": rng.randrange(9), "b": b"\x00"},
            # §15, §16: dependencies (known, unknown and by key), placement, keys
            "depends_on": lambda: rng.choice(
                (
                    [self._task_id()],
                    [self._task_id(), {"service": self._service(), "key": "k1"}],
                    ["t999-0"],
                    [],
                    "t1",
                )
            ),
            "run_anyway": lambda: rng.choice((True, False, 1)),
            "input": lambda: rng.choice(("result", "results", "all")),
            "require": lambda: rng.choice((["gpu"], ["gpu", "de-DE"], [""], "gpu")),
            "prefer": lambda: rng.choice((["de-DE"], ["x"] * 40)),
            "affinity": lambda: rng.choice(("conv-1", "", 7)),
            "concurrency_key": lambda: f"user:{rng.randrange(4)}",
            "debounce_s": lambda: rng.choice((0.05, 0, -1, 1e9)),
        }
        picked = rng.sample(list(choices), rng.randrange(0, 4))
        return {name: choices[name]() for name in picked}

    def _zbc_enqueue(self) -> Draft:
        rng = self.rng
        meta = {"rid": self._next_rid(), "service": self._service(), **self._options()}
        if rng.random() < 0.3:
            counts = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
            meta["counts"] = counts
            if "key" in meta:
                meta["keys"] = [meta.pop("key"), *([None] * (len(counts) - 1))]
            tail = [rng.randbytes(8) for _ in range(sum(counts))]
            return Draft("ZBC01", "enqueue batch", [b"", zbc.ZBC01, zbc.ENQUEUE], meta, tail)
        return Draft("ZBC01", "enqueue", [b"", zbc.ZBC01, zbc.ENQUEUE], meta, self._small_body())

    def _zbc_request(self) -> Draft:
        meta = {"rid": self._next_rid(), "service": self._service(), **self._options()}
        meta["wait_s"] = self.rng.choice((0, 0.1, 2, 86400, 1e12))
        return Draft("ZBC01", "request", [b"", zbc.ZBC01, zbc.REQUEST], meta, self._small_body())

    def _zbc_call(self) -> Draft:
        rng = self.rng
        # The calls that scan (QUEUES, WORKERS, PURGE, TASKS) cost the broker a pass of
        # milliseconds each by design; they come four times less often than the others,
        # so that a run spends its time on many inputs rather than on a few scans.
        command, fields = rng.choices(
            (
                (zbc.RESULT, lambda: {"id": self._task_id(), "wait_s": rng.choice((0, 0.05, 3))}),
                (zbc.STATUS, lambda: {"id": self._task_id()}),
                (zbc.CANCEL, lambda: {"id": self._task_id()}),
                (zbc.DEAD, lambda: {"service": self._service(), "after": rng.choice(EXTREMES)}),
                (zbc.REDRIVE, lambda: {"service": self._service(), "ids": [self._task_id()]}),
                (zbc.QUEUES, lambda: {"limit": rng.choice((1, 1000)), "after": self._service()}),
                (zbc.WORKERS, dict),
                (zbc.DRAIN, self._drain_fields),
                (zbc.PAUSE, lambda: {"service": self._service()}),
                (zbc.RESUME, lambda: {"service": self._service()}),
                (zbc.STATS, dict),
                (zbc.LIMIT, self._limit_fields),
                (zbc.RATE, self._rate_fields),
                (zbc.PURGE, lambda: {"service": self._service()}),
                (zbc.DROP, lambda: {"service": self._service(), "ids": [self._task_id()]}),
                (zbc.TASKS, self._tasks_fields),
                (bytes([rng.randrange(256)]), dict),
            ),
            (4, 4, 4, 4, 4, 1, 1, 4, 4, 4, 4, 4, 4, 1, 4, 1, 4),
        )[0]
        meta = {"rid": self._next_rid(), **fields()}
        name = zbc.COMMAND_NAMES.get(command, f"0x{command.hex()}")
        return Draft("ZBC01", f"call {name}", [b"", zbc.ZBC01, command], meta)

    def _limit_fields(self) -> dict[str, Any]:
        rng = self.rng
        fields = {"service": self._service(), "limit": rng.choice((None, 1, 2))}
        if rng.random() < 0.5:
            fields["per_key"] = rng.choice((True, False, 1))
        return fields

    def _rate_fields(self) -> dict[str, Any]:
        rng = self.rng
        fields: dict[str, Any] = {"service": self._service()}
        fields["rate"] = rng.choice((None, 0, 0.5, 50.0, 1e12, -1, "x"))
        if rng.random() < 0.5:
            fields["burst"] = rng.choice((0, 1, 5, 10**9))
        if rng.random() < 0.5:
            fields["per_key"] = rng.choice((True, False))
        return fields

    def _drain_fields(self) -> dict[str, Any]:
        pool = self.k.worker_ids
        return {"worker": self.rng.choice(pool) if pool else "0123456789"}

    def _tasks_fields(self) -> dict[str, Any]:
        rng = self.rng
        return {
            "service": self._service(),
            "state": rng.choice(("ready", "dead", "inflight", "done", "bogus")),
            "limit": rng.choice((1, 1000)),
            "after": rng.choice((0, 5, 10**9)),
            "older_than_s": rng.choice((0, 1e9)),
        }

    def _zbc_shot(self) -> Shot:
        roll = self.rng.random()
        if roll < 0.35:
            draft = self._zbc_enqueue()
        elif roll < 0.45:
            draft = self._zbc_request()
        elif roll < 0.5:
            draft = self._zbc_schedule()
        else:
            draft = self._zbc_call()
        return self._finish(draft)

    def _zbc_schedule(self) -> Draft:
        """SCHEDULE (§17), SCHEDULES or UNSCHEDULE; mostly a malformed or odd rule. Names
        come from a small pool, so the broker keeps a few schedules at most."""
        rng = self.rng
        rid = self._next_rid()
        name: Any = rng.choice(("s0", "s1", "s2", "", "x" * 300, 5, None, "a\nb"))
        roll = rng.random()
        if roll < 0.15:
            return Draft("ZBC01", "call SCHEDULES", [b"", zbc.ZBC01, zbc.SCHEDULES], {"rid": rid})
        if roll < 0.3:
            meta = {"rid": rid, "name": name}
            return Draft("ZBC01", "call UNSCHEDULE", [b"", zbc.ZBC01, zbc.UNSCHEDULE], meta)
        rules: dict[str, Any] = rng.choice(
            (
                {"every_s": rng.choice((1, 5, 0, -1, 1.5, 1e300, "5", True, None))},
                {"cron": rng.choice(("* * * * *", "*/5 * * * *", "61 * * * *", "", 5, "@often"))},
                {"cron": "0 * * * *", "tz": rng.choice(("Europe/Paris", "../etc", 7, "No/Pe"))},
                {"every_s": 10, "cron": "* * * * *"},
                {},
            )
        )
        meta = {"rid": rid, "name": name, "service": self._service(), **rules, **self._options()}
        return Draft("ZBC01", "schedule", [b"", zbc.ZBC01, zbc.SCHEDULE], meta, self._small_body())

    # ------------------------------------------------------------ ZBW01

    def _zbw_shot(self) -> Shot:
        rng = self.rng
        slot = self._slot()
        head = [b"", ext.ZBW01]
        roll = rng.random()
        if roll < 0.15:
            meta: dict[str, Any] = {
                "service": self._service(),
                "credit": rng.choice((1, 2, 64, 10_000)),
            }
            if rng.random() < 0.5:
                meta["batch"] = True
            if rng.random() < 0.2:
                meta["tags"] = ["gpu", "de-DE"][: rng.randrange(3)]
            draft = Draft("ZBW01", "READY", [*head, ext.READY], meta)
        elif roll < 0.35:
            refs = [list(self._task_ref(slot)) for _ in range(rng.randrange(1, 4))]
            draft = Draft("ZBW01", "ACK", [*head, ext.ACK], {"tasks": refs})
        elif roll < 0.55:
            task_id, attempt = self._task_ref(slot)
            meta = {"id": task_id, "attempt": attempt}
            draft = Draft("ZBW01", "DONE", [*head, ext.DONE], meta, self._small_body())
        elif roll < 0.65:
            draft = self._zbw_dones(slot)
        elif roll < 0.75:
            task_id, attempt = self._task_ref(slot)
            meta = {
                "id": task_id,
                "attempt": attempt,
                "reason": "fuzz",
                "retry": rng.random() < 0.7,
            }
            if rng.random() < 0.5:
                meta["delay_s"] = rng.choice((0, 0.01, 1e9, -1.0))
            draft = Draft("ZBW01", "FAIL", [*head, ext.FAIL], meta)
        elif roll < 0.82:
            task_id, attempt = self._task_ref(slot)
            meta = {"id": task_id, "attempt": attempt}
            draft = Draft("ZBW01", "PROGRESS", [*head, ext.PROGRESS], meta, self._small_body())
        else:
            draft = self._zbw_other(head)
        return self._finish(draft, slot=slot)

    def _zbw_dones(self, slot: int) -> Draft:
        rng = self.rng
        entries = []
        tail: list[bytes] = []
        for _ in range(rng.randrange(1, 6)):
            task_id, attempt = self._task_ref(slot)
            body = self._small_body()
            entries.append([task_id, attempt, len(body)])
            tail.extend(body)
        meta = {"tasks": entries}
        return Draft("ZBW01", "DONES", [b"", ext.ZBW01, ext.DONES], meta, tail)

    def _zbw_other(self, head: list[bytes]) -> Draft:
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            metrics = rng.choice((None, {"cpu": 0.5}, {"m": list(range(50))}))
            meta = None if metrics is None else {"metrics": metrics}
            return Draft("ZBW01", "HEARTBEAT", [*head, ext.HEARTBEAT], meta)
        if roll < 0.65:
            return Draft("ZBW01", "DISCONNECT", [*head, ext.DISCONNECT], {"reason": "fuzz"})
        if roll < 0.8:
            tags = rng.choice((["gpu"], [], ["x"] * 40, "gpu", [1]))
            return Draft("ZBW01", "TAGS", [*head, ext.TAGS], {"tags": tags})
        command = bytes([rng.choice((0, 2, 9, 10, 12, 13, 0x7F, 0xFF))])
        return Draft("ZBW01", f"command 0x{command.hex()}", [*head, command], {"id": "t1"})

    # ------------------------------------------------------------ MDP

    def _mdpc_shot(self) -> Shot:
        rng = self.rng
        roll = rng.random()
        if roll < 0.25:
            body = rng.choice(([], [b"fuzz.a"], [b"fuzz.b", b"extra"], [b"\xff" * 300]))
            frames = mdp.client_request(mdp.MMI_SERVICE, body)
            note = "mmi.service"
        elif roll < 0.3:
            frames = mdp.client_request(b"mmi." + rng.randbytes(4), [b"x"])
            note = "mmi.other"
        else:
            frames = mdp.client_request(self._service().encode(), self._small_body())
            note = "request"
        return self._finish(Draft("MDPC01", note, frames))

    def _mdpw_shot(self) -> Shot:
        rng = self.rng
        slot = self._slot()
        roll = rng.random()
        if roll < 0.3:
            service = rng.choice((self._service().encode(), b"mmi.fuzz", b"", b"\xff\xfe"))
            frames, note = mdp.worker_ready(service), "READY"
        elif roll < 0.65:
            known = self.k.clients_of(slot)
            client = rng.choice(known) if known and rng.random() < 0.8 else rng.randbytes(5)
            frames, note = mdp.worker_reply(client, self._small_body()), "REPLY"
        elif roll < 0.85:
            frames, note = mdp.worker_heartbeat(), "HEARTBEAT"
        elif roll < 0.95:
            frames, note = mdp.worker_disconnect(), "DISCONNECT"
        else:
            frames, note = [b"", mdp.MDPW01, bytes([rng.randrange(256)])], "command"
        return self._finish(Draft("MDPW01", note, frames), slot=slot)

    # ------------------------------------------------------------ raw and heavy

    def _raw_shot(self) -> Shot:
        rng = self.rng
        frames = [rng.randbytes(rng.choice((0, 1, 2, 6, 30))) for _ in range(rng.randrange(0, 9))]
        if frames and rng.random() < 0.5:
            frames[0] = b""
        if len(frames) > 1 and rng.random() < 0.5:
            frames[1] = rng.choice((mdp.MDPC01, mdp.MDPW01, ext.ZBW01, zbc.ZBC01))
        return Shot(ROUTER, "raw", "random frames", frames or [b""], self._slot())

    def _heavy_shot(self) -> Shot:
        rng = self.rng
        options = [
            self._batch_at_limit,
            self._batch_over_limit,
            self._ids_over_limit,
            self._near_cap,
            self._over_cap,
            self._too_many_frames,
            self._deep_meta,
        ]
        if self.allow_huge:
            options.append(self._over_frame_cap)
        return rng.choice(options)()

    def _zbc(self, command: bytes, note: str, meta: dict[str, Any], tail: list[bytes]) -> Shot:
        frames = [b"", zbc.ZBC01, command, _pack(meta), *tail]
        return Shot(ROUTER, "ZBC01", note, frames, self._slot())

    def _batch_at_limit(self) -> Shot:
        meta = {"rid": self._next_rid(), "service": "fuzz.c", "counts": [0] * zbc.MAX_BATCH}
        return self._zbc(zbc.ENQUEUE, "heavy: batch of 10000 tasks", meta, [])

    def _batch_over_limit(self) -> Shot:
        counts = [0] * (zbc.MAX_BATCH + 1)
        meta = {"rid": self._next_rid(), "service": "fuzz.c", "counts": counts}
        return self._zbc(zbc.ENQUEUE, "heavy: batch of 10001 tasks", meta, [])

    def _ids_over_limit(self) -> Shot:
        n = zbc.MAX_BATCH + self.rng.choice((0, 1))
        command = self.rng.choice((zbc.REDRIVE, zbc.DROP))
        meta = {"rid": self._next_rid(), "service": "fuzz.a", "ids": [f"t{i:x}" for i in range(n)]}
        return self._zbc(command, f"heavy: {n} ids", meta, [])

    def _near_cap(self) -> Shot:
        size = MAX_BYTES - 4096
        if self.rng.random() < 0.5:
            frames = mdp.client_request(b"fuzz.x0", [self.blob(size)])
            return Shot(ROUTER, "MDPC01", "heavy: request near the byte cap", frames, self._slot())
        meta = {"rid": self._next_rid(), "service": "fuzz.x1", "ttl_s": 0.1}
        return self._zbc(zbc.ENQUEUE, "heavy: enqueue near the byte cap", meta, [self.blob(size)])

    def _over_cap(self) -> Shot:
        meta = {"rid": self._next_rid(), "service": "fuzz.a"}
        return self._zbc(zbc.ENQUEUE, "heavy: over the byte cap", meta, [self.blob(MAX_BYTES)])

    def _too_many_frames(self) -> Shot:
        n = limits.MAX_FRAMES - 4 + self.rng.choice((0, 1))  # with the routing id: at, over
        meta = {"rid": self._next_rid(), "service": "fuzz.x2", "counts": [1] * n, "ttl_s": 0.1}
        if n > zbc.MAX_BATCH:
            meta["counts"] = [n]
        return self._zbc(zbc.ENQUEUE, f"heavy: {n} payload frames", meta, [b""] * n)

    def _deep_meta(self) -> Shot:
        meta = {"rid": self._next_rid(), "service": "fuzz.a", "headers": Deep(5000)}
        return self._zbc(zbc.ENQUEUE, "heavy: meta nested 5000 deep", meta, [])

    def _over_frame_cap(self) -> Shot:
        frames = mdp.client_request(b"fuzz.a", [self.blob(4 * MAX_BYTES + 1)])
        return Shot(ROUTER, "MDPC01", "heavy: frame over 4x the cap", frames, self._slot())

    # ------------------------------------------------------------ events

    def _events_in_shot(self) -> Shot:
        rng = self.rng
        roll = rng.random()
        topic = rng.choice(("fs.change", "task.done.fuzz.a", "heartbeat.ping", "x" * 255))
        event = Event(topic, "fuzz", {"n": rng.randrange(9)}, time.time())
        frames = encode_event(event)
        if roll < 0.5:
            frames, how = self._mutate_frames(frames)
            return Shot(EVENTS_IN, "events-in", f"event/frames:{how}", frames)
        if roll < 0.7:
            frames[1] = self._mutate_packed(frames[1])
            return Shot(EVENTS_IN, "events-in", "event/envelope bytes", frames)
        if roll < 0.8:
            frames[0] = rng.choice((b"", b"t" * 10_000, b"\xff\xfe", b"\x01task.", b"\x00"))
            return Shot(EVENTS_IN, "events-in", "event/topic", frames)
        return Shot(EVENTS_IN, "events-in", "event", frames)

    def _events_out_shot(self) -> Shot:
        """A subscription change: frame 0 is b"+" (SUB subscribe), b"-" (unsubscribe)
        or b"x" (raw frames from an XSUB peer), then the prefix or the raw frames."""
        rng = self.rng
        prefix = rng.choice(
            (
                b"",
                b"task.",
                b"task.done.",
                b"worker.",
                b"t\xc3",
                b"\xff",
                b"\x00",
                b"\x01task.",
                rng.randbytes(rng.randrange(1, 12)),
                b"p" * rng.choice((255, 4096, 65536)),
            )
        )
        roll = rng.random()
        if roll < 0.45:
            return Shot(EVENTS_OUT, "events-out", "subscribe", [b"+", prefix])
        if roll < 0.7:
            return Shot(EVENTS_OUT, "events-out", "unsubscribe", [b"-", prefix])
        raw = rng.choice(
            (
                [b"\x01" + prefix],
                [b"\x00" + prefix],
                [b"\x02junk"],
                [b""],
                [b"\x02", b"\x01" + prefix],
                [b"\x01" + prefix, b"\x01fuzz.tail"],
            )
        )
        return Shot(EVENTS_OUT, "events-out", "xsub raw", [b"x", *raw])


# ------------------------------------------------------------------ the run


@dataclass(frozen=True, slots=True)
class Endpoints:
    router: str
    events_in: str
    events_out: str


def rss_kib(pid: int) -> int | None:
    """VmRSS of process `pid` in KiB, None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass(slots=True)
class ProbeResult:
    latency_s: float | None  # None: missed (no answer within the deadline)
    stats: dict[str, Any] | None = None  # the STATS reply's meta


def probe(
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    deadline_s: float = PROBE_DEADLINE_S,
) -> ProbeResult:
    """From a fresh DEALER: an 8/MMI `mmi.service` query and a ZBC01 STATS call, both
    answered within `deadline_s`."""
    started = time.monotonic()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(endpoint)
        sock.send_multipart(mdp.client_request(mdp.MMI_SERVICE, [SERVICES[0].encode()]))
        sock.send_multipart(zbc.call(zbc.STATS, 1))
        mmi_ok = False
        stats: dict[str, Any] | None = None
        while not (mmi_ok and stats is not None):
            left_ms = int((started + deadline_s - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms):
                return ProbeResult(None)
            frames = sock.recv_multipart()
            if frames[:3] == [b"", mdp.MDPC01, mdp.MMI_SERVICE]:
                mmi_ok = frames[3:] in ([mdp.MMI_FOUND], [mdp.MMI_NOT_FOUND])
            elif frames[1:2] == [zbc.ZBC01]:
                answer = zbc.decode_answer(frames)
                stats = answer.meta if answer.ok and answer.rid == 1 else None
        return ProbeResult(time.monotonic() - started, stats)
    finally:
        sock.close(linger=0)


@dataclass(slots=True)
class FuzzReport:
    """What a run did and saw. `failure` is None when every check held."""

    seed: int
    messages: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_target: Counter[str] = field(default_factory=Counter)
    answers: int = 0
    reconnects: int = 0
    send_timeouts: int = 0
    probes_answered: int = 0
    probes_missed: int = 0
    probe_max_s: float = 0.0
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    malformed_start: dict[str, int] = field(default_factory=dict)
    malformed_end: dict[str, int] = field(default_factory=dict)
    stats_end: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    failure: str | None = None
    last_shots: list[str] = field(default_factory=list)

    @property
    def malformed_rise(self) -> int:
        return sum(self.malformed_end.values()) - sum(self.malformed_start.values())

    def summary(self) -> str:
        mib = 1 / 1024
        return (
            f"seed {self.seed}: {self.messages:,} messages in {self.duration_s:.1f}s "
            f"({dict(self.by_kind)}), {self.reconnects} reconnects, {self.send_timeouts} send "
            f"timeouts, probes {self.probes_answered} answered / {self.probes_missed} missed "
            f"(slowest {self.probe_max_s:.3f}s), RSS {self.rss_start_kib * mib:.0f} -> peak "
            f"{self.rss_peak_kib * mib:.0f} -> {self.rss_end_kib * mib:.0f} MiB, malformed +"
            f"{self.malformed_rise:,} {self.malformed_end}"
        )

    def describe(self) -> str:
        """The summary, the failure and the last shots sent before it."""
        shots = "\n  ".join(self.last_shots[-20:])
        return f"{self.summary()}\nfailure: {self.failure}\nlast shots:\n  {shots}"


class Fuzzer:
    """Sends `messages` shots of one seed to a broker and checks it after each probe.
    `alive` says whether the broker process still runs; `pid` is read for its RSS."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoints: Endpoints,
        pid: int,
        alive: Callable[[], bool],
        seed: int,
        *,
        probe_every: int = 1000,
        heavy_every: int = 2500,
        allow_huge: bool = False,
        rss_budget_mib: int = RSS_BUDGET_MIB,
    ) -> None:
        self.ctx = ctx
        self.endpoints = endpoints
        self.pid = pid
        self.alive = alive
        self.probe_every = probe_every
        self.rss_budget_kib = rss_budget_mib * 1024
        self.knowledge = Knowledge()
        self.maker = ShotMaker(seed, self.knowledge, heavy_every=heavy_every, allow_huge=allow_huge)
        self.report = FuzzReport(seed)
        self._recent: deque[str] = deque(maxlen=50)
        self._peers: list[zmq.Socket[bytes]] = []
        self._publisher = self._open(zmq.PUB, endpoints.events_in)
        self._subscriber = self._open(zmq.SUB, endpoints.events_out)
        self._xsub = self._open(zmq.XSUB, endpoints.events_out)
        for slot in range(WORKER_SLOTS):
            self._peers.append(self._open_peer(slot))

    # ------------------------------------------------------------ sockets

    def _open(self, kind: int, endpoint: str, routing_id: bytes | None = None) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.sndtimeo = SEND_TIMEOUT_MS
        if routing_id is not None:
            sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.connect(endpoint)
        return sock

    def _open_peer(self, slot: int) -> zmq.Socket[bytes]:
        return self._open(zmq.DEALER, self.endpoints.router, self.maker.routing_id(slot))

    def _reconnect(self, slot: int) -> None:
        self._peers[slot].close(linger=0)
        self._peers[slot] = self._open_peer(slot)
        self.knowledge.forget_slot(slot)
        self.report.reconnects += 1

    def close(self) -> None:
        for sock in (*self._peers, self._publisher, self._subscriber, self._xsub):
            sock.close(linger=0)

    # ------------------------------------------------------------ sending

    def _send(self, shot: Shot) -> None:
        if shot.target == EVENTS_OUT:
            self._send_subscription(shot.frames)
            return
        sock = self._publisher if shot.target == EVENTS_IN else self._peers[shot.slot]
        try:
            sock.send_multipart(shot.frames, copy=len(shot.frames) < 64)
        except zmq.Again:
            self.report.send_timeouts += 1
            if shot.target == ROUTER:
                self._reconnect(shot.slot)

    def _send_subscription(self, frames: list[bytes]) -> None:
        what, rest = frames[0], frames[1:]
        try:
            if what == b"+":
                self._subscriber.setsockopt(zmq.SUBSCRIBE, rest[0])
            elif what == b"-":
                self._subscriber.setsockopt(zmq.UNSUBSCRIBE, rest[0])
            else:
                self._xsub.send_multipart(rest, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.report.send_timeouts += 1

    def _drain(self) -> None:
        learn = self.knowledge.learn
        for slot, sock in enumerate(self._peers):
            for _ in range(256):
                try:
                    learn(slot, sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
        for sock in (self._subscriber, self._xsub):
            for _ in range(256):
                try:
                    sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break

    # ------------------------------------------------------------ checks

    def _check(self) -> str | None:
        """Probe the broker and read its memory: a failure, or None."""
        report = self.report
        if not self.alive():
            return "the broker process exited"
        result = probe(self.ctx, self.endpoints.router)
        if result.latency_s is None:
            report.probes_missed += 1
            if not self.alive():
                return "the broker process exited"
            return f"probe unanswered within {PROBE_DEADLINE_S}s"
        report.probes_answered += 1
        report.probe_max_s = max(report.probe_max_s, result.latency_s)
        if result.stats is not None:
            report.malformed_end = dict(result.stats.get("malformed", {}))
            report.stats_end = result.stats
        rss = rss_kib(self.pid) or 0
        report.rss_end_kib = rss
        report.rss_peak_kib = max(report.rss_peak_kib, rss)
        if rss > self.rss_budget_kib:
            budget_mib = self.rss_budget_kib // 1024
            return f"broker RSS {rss / 1024:.0f} MiB over the budget of {budget_mib} MiB"
        return None

    # ------------------------------------------------------------ the loop

    def run(
        self,
        messages: int,
        progress: Callable[[FuzzReport], None] | None = None,
        progress_every: int = 0,
        stop_on_failure: bool = True,
    ) -> FuzzReport:
        """Send `messages` shots, probing every `probe_every`; a last probe at the end.
        Stops at the first failure unless `stop_on_failure` is False (then counts on)."""
        report = self.report
        first = probe(self.ctx, self.endpoints.router)
        if first.stats is not None:
            report.malformed_start = dict(first.stats.get("malformed", {}))
        report.rss_start_kib = report.rss_peak_kib = rss_kib(self.pid) or 0
        started = time.monotonic()
        try:
            for i in range(1, messages + 1):
                self._one(i)
                probing = i % self.probe_every == 0 and i < messages
                if probing and not self._checked(i) and (stop_on_failure or not self.alive()):
                    break
                if progress is not None and progress_every and i % progress_every == 0:
                    report.duration_s = time.monotonic() - started
                    progress(report)
            else:
                self._settle()
                self._checked(messages)
        finally:
            report.duration_s = time.monotonic() - started
            report.answers = self.knowledge.answers
            report.last_shots = list(self._recent)
            self.close()
        return report

    def _checked(self, i: int) -> bool:
        """Check the broker; record the first failure. Whether all held."""
        failure = self._check()
        if failure is not None and self.report.failure is None:
            self.report.failure = f"after {i:,} messages: {failure}"
        return failure is None

    def _settle(self, timeout_s: float = 4 * PROBE_DEADLINE_S) -> None:
        """Wait until the broker has read what the peers sent (a probe's connection
        may be served before their queues): until its count of refused messages holds
        still between two probes, which happens only once nothing more arrives."""
        self._drain()
        deadline = time.monotonic() + timeout_s
        last = -1
        while time.monotonic() < deadline and self.alive():
            stats = probe(self.ctx, self.endpoints.router).stats
            total = sum(stats.get("malformed", {}).values()) if stats else -2
            if total == last:
                return
            last = total
            self._drain()

    def _one(self, i: int) -> None:
        shot = self.maker.next()
        self._recent.append(f"#{i} {shot.describe()}")
        self._send(shot)
        self.report.messages += 1
        self.report.by_kind[shot.kind] += 1
        self.report.by_target[shot.target] += 1
        if i % DRAIN_EVERY == 0:
            self._drain()
        slot = self.maker.wants_reconnect()
        if slot is not None:
            self._reconnect(slot)
