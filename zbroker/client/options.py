"""TaskOptions: how a task is to be run, as one value instead of eight keywords.

`Client` and `AsyncClient` take these options either as keywords of each
call (`enqueue(..., priority=5)`) or as one `options=TaskOptions(priority=5)`,
never both. A TaskOptions is checked when it is made, with the rules and
errors of the keywords, so a bad value fails where it is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from zbroker.protocol import zbc
from zbroker.protocol.limits import MAX_TAGS

When = datetime | float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskOptions:
    """How one task (or every task of a batch) is to be run. Every field is optional.

    - `priority`: -128..127, higher runs first.
    - `delay_s` or `not_before` (a datetime, or seconds since the epoch): not
      before then. Not both.
    - `ttl_s`: expire unless started within it.
    - `max_attempts`: 1..1000 (None: the broker's default).
    - `timeout_s`: the run-time limit of one attempt (what `request()` calls
      `task_timeout_s`, its own `timeout_s` being how long the caller waits).
    - `key`: the idempotency key of one task (`enqueue_many` takes `keys=`).
    - `headers`: a map given to the worker (copied when the value is made).
    - `depends_on`: tasks it waits for (docs/protocol.md §15), each a task id or a
      `(service, key)` pair naming a task by its idempotency key; `run_anyway`:
      run even when one of them ended without a result; `input`: `"result"`
      (one dependency: its result frames follow the payload) or `"results"`
      (one more frame, a msgpack list of every dependency's result frames).
    - `require` / `prefer`: worker tags it must have / that make a worker a better
      fit; `affinity`: a key that sends it to the worker that last ran that key;
      `concurrency_key`: the key its service's per-key round robin and limit use.
    - `debounce_s` (with `key`): the task waits that long, and an enqueue of the same
      key meanwhile replaces its payload instead of storing another task.

    Values are made with keywords only, compared by their fields, and changed
    with `dataclasses.replace()`.
    """

    priority: int = 0
    delay_s: float | None = None
    not_before: When | None = None
    ttl_s: float | None = None
    max_attempts: int | None = None
    timeout_s: float | None = None
    key: str | None = None
    headers: dict[str, Any] | None = field(default=None, hash=False)
    depends_on: tuple[zbc.DependencyRef, ...] = ()
    run_anyway: bool = False
    input: str | None = None
    require: tuple[str, ...] = ()
    prefer: tuple[str, ...] = ()
    affinity: str | None = None
    concurrency_key: str | None = None
    debounce_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError("priority must be an int")
        if not zbc.PRIORITY_MIN <= self.priority <= zbc.PRIORITY_MAX:
            raise ValueError(f"priority must be {zbc.PRIORITY_MIN}..{zbc.PRIORITY_MAX}")
        if self.delay_s is not None and self.not_before is not None:
            raise ValueError("give delay_s or not_before, not both")
        max_attempts = self.max_attempts
        if max_attempts is not None and (
            isinstance(max_attempts, bool)
            or not isinstance(max_attempts, int)
            or not 1 <= max_attempts <= zbc.MAX_ATTEMPTS_LIMIT
        ):
            raise ValueError(f"max_attempts must be an int 1..{zbc.MAX_ATTEMPTS_LIMIT}")
        if self.headers is not None:
            if not isinstance(self.headers, dict):
                raise TypeError("headers must be a dict")
            # A frozen value: the caller's dict may change after this, the options may not.
            object.__setattr__(self, "headers", dict(self.headers))
        if self.key is not None:
            check_key(self.key)
        seconds("delay_s", self.delay_s)
        seconds("not_before", self.not_before_s)
        seconds("ttl_s", self.ttl_s)
        seconds("timeout_s", self.timeout_s, positive=True)
        self._check_graph()
        self._check_scheduling()

    def _check_graph(self) -> None:
        """`depends_on`, `run_anyway`, `input` (docs/protocol.md §15)."""
        object.__setattr__(self, "depends_on", dependencies(self.depends_on))
        if not isinstance(self.run_anyway, bool):
            raise TypeError("run_anyway must be a bool")
        if self.input is not None and self.input not in zbc.INPUTS:
            raise ValueError(f"input must be one of {', '.join(zbc.INPUTS)}")
        if not self.depends_on and (self.run_anyway or self.input is not None):
            raise ValueError("run_anyway and input need depends_on")
        if self.input == zbc.INPUT_RESULT and len(self.depends_on) != 1:
            raise ValueError('input="result" takes exactly one dependency')

    def _check_scheduling(self) -> None:
        """Placement and flow control (docs/protocol.md §16)."""
        object.__setattr__(self, "require", tag_list("require", self.require))
        object.__setattr__(self, "prefer", tag_list("prefer", self.prefer))
        for name in ("affinity", "concurrency_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty str")
        if self.debounce_s is not None:
            seconds("debounce_s", self.debounce_s, positive=True)
            if self.key is None or self.delay_s is not None or self.not_before is not None:
                raise ValueError("debounce_s needs a key, and no delay_s or not_before")

    @property
    def not_before_s(self) -> float | None:
        """`not_before` as seconds since the epoch (None when not given)."""
        at = self.not_before
        return at.timestamp() if isinstance(at, datetime) else at

    def given(self) -> list[str]:
        """The names of the fields not at their defaults."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]


def pick_options(
    options: TaskOptions | None, keywords: TaskOptions, *, timeout_name: str = "timeout_s"
) -> TaskOptions:
    """The task options of a call: `options` when given, else those its keywords made.

    Raises TypeError when both are given: `options` and any task-option keyword
    not at its default (a keyword at its default is taken as not given).
    `timeout_name` is what the call calls the run-time limit (`task_timeout_s`
    in `request()`), for the message.
    """
    if options is None:
        return keywords
    if not isinstance(options, TaskOptions):
        raise TypeError(f"options must be a TaskOptions, not {type(options).__name__}")
    given = [timeout_name if name == "timeout_s" else name for name in keywords.given()]
    if given:
        raise TypeError(
            "give task options as keywords or as options=TaskOptions(...), not both "
            f"(also given: {', '.join(given)})"
        )
    return options


def dependencies(refs: Any) -> tuple[zbc.DependencyRef, ...]:
    """`depends_on` as a tuple of task ids (str, TaskId) and (service, key) pairs."""
    if isinstance(refs, str | bytes) or not hasattr(refs, "__iter__"):
        raise TypeError("depends_on must be a sequence of task ids or (service, key) pairs")
    out: list[zbc.DependencyRef] = []
    for ref in refs:
        if isinstance(ref, str) and ref:
            out.append(str(ref))
        elif (
            isinstance(ref, tuple | list)
            and len(ref) == 2
            and all(isinstance(part, str) and part for part in ref)
        ):
            out.append((ref[0], ref[1]))
        else:
            raise ValueError(f"a dependency is a task id or a (service, key) pair, not {ref!r}")
    if len(out) > zbc.MAX_DEPENDENCIES:
        raise ValueError(f"depends_on takes at most {zbc.MAX_DEPENDENCIES} dependencies")
    return tuple(out)


def tag_list(name: str, tags: Any) -> tuple[str, ...]:
    """`require` or `prefer`: at most MAX_TAGS non-empty strings, as a tuple."""
    if isinstance(tags, str | bytes) or not hasattr(tags, "__iter__"):
        raise TypeError(f"{name} must be a sequence of tags (str)")
    out = tuple(tags)
    if len(out) > MAX_TAGS or not all(isinstance(t, str) and t for t in out):
        raise ValueError(f"{name} takes at most {MAX_TAGS} non-empty strings")
    return out


def check_key(key: object) -> str:
    """An idempotency key: a non-empty str."""
    if not isinstance(key, str) or not key:
        raise ValueError("an idempotency key must be a non-empty str")
    return key


def seconds(name: str, value: float | None, *, positive: bool = False) -> float | None:
    """A duration or time in seconds as a float (None stays None); raise when it is not one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0")
    return float(value)
