"""One home for the wire vocabulary: zbroker.protocol.limits and zbroker.protocol.states.

Every other module takes its limits and state names from there; these tests fail
when one of them grows its own copy again, or when the copies disagree.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from zbroker.client import TaskState as ClientTaskState
from zbroker.client.errors import TaskFailed, task_failure
from zbroker.journal import FINISHED_STATES
from zbroker.journal import TaskState as StoredState
from zbroker.protocol import events, ext, limits, zbc
from zbroker.protocol.states import (
    FAILED_STATES,
    FINAL_STATES,
    LISTABLE_STATES,
    QUEUE_COUNTS,
    WAITING_STATES,
    TaskState,
)


def test_importing_the_protocol_loads_neither_zmq_nor_lmdb() -> None:
    code = (
        "import sys, zbroker.protocol, zbroker.protocol.limits, zbroker.protocol.states, "
        "zbroker.protocol.zbc, zbroker.protocol.ext, zbroker.protocol.mdp, "
        "zbroker.protocol.events; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('zmq', 'lmdb')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "name", "home"),
    [
        (zbc, "MAX_BATCH", "ZBC_MAX_BATCH"),
        (zbc, "BATCH_FRAMES", "BATCH_FRAMES"),
        (zbc, "BATCH_BYTES", "BATCH_BYTES"),
        (zbc, "MAX_WAIT_S", "MAX_WAIT_S"),
        (zbc, "MAX_LIST", "MAX_LIST"),
        (zbc, "PRIORITY_MIN", "PRIORITY_MIN"),
        (zbc, "PRIORITY_MAX", "PRIORITY_MAX"),
        (zbc, "MAX_ATTEMPTS_LIMIT", "MAX_ATTEMPTS_LIMIT"),
        (ext, "MAX_BATCH", "ZBW_MAX_BATCH"),
        (ext, "MAX_CREDIT", "MAX_CREDIT"),
        (ext, "MAX_TAGS", "MAX_TAGS"),
        (events, "MAX_TOPIC_BYTES", "MAX_TOPIC_BYTES"),
        (events, "MAX_BATCH_EVENTS", "MAX_BATCH_EVENTS"),
    ],
)
def test_the_codecs_old_names_are_the_limits(module: object, name: str, home: str) -> None:
    assert getattr(module, name) == getattr(limits, home)


def test_the_limits_fit_together() -> None:
    # A full ENQUEUE batch of one-frame tasks fits the frame cap with its 5 other
    # frames (routing id, "", ZBC01, command, meta), and so does a batch a client sizes.
    assert limits.ZBC_MAX_BATCH + 5 <= limits.MAX_FRAMES
    assert limits.BATCH_FRAMES + 5 <= limits.MAX_FRAMES
    assert limits.BATCH_BYTES < limits.DEFAULT_MAX_MESSAGE_BYTES
    assert limits.MIN_MESSAGE_BYTES < limits.DEFAULT_MAX_MESSAGE_BYTES
    # Priorities fit one byte of an index key.
    assert limits.PRIORITY_MAX - limits.PRIORITY_MIN == 255
    # A worker's whole credit can go out in TASKS messages of ZBW_MAX_BATCH.
    assert limits.ZBW_MAX_BATCH <= limits.MAX_CREDIT


def test_no_module_spells_a_protocol_limit_again() -> None:
    # The distinctive numbers of limits.py appear as literals nowhere else in the
    # codecs or in the client modules that used to repeat them (the AST is read, so
    # a docstring may still quote a number to the reader).
    distinctive = {
        limits.MAX_FRAMES,
        limits.ZBC_MAX_BATCH,
        limits.BATCH_FRAMES,
        int(limits.MAX_WAIT_S),
        limits.MAX_SERVICE_LIMIT,
        limits.MAX_LIST_AFTER,
    }
    checked = [
        "zbroker/protocol/zbc.py",
        "zbroker/protocol/ext.py",
        "zbroker/protocol/events.py",
        "zbroker/protocol/mdp.py",
        "zbroker/client/worker.py",
        "zbroker/client/service.py",
        "zbroker/client/events.py",
        "zbroker/client/durable.py",
    ]
    for path in checked:
        source = (ROOT / path).read_text()
        tree = ast.parse(source)
        found = [
            f"line {node.lineno}: {node.value}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and type(node.value) in (int, float)
            and node.value in distinctive
        ]
        found += [f"a byte cap: {m.group()}" for m in re.finditer(r"16 \* 1024 \* 1024", source)]
        assert not found, f"{path} spells a limit of zbroker/protocol/limits.py: {found}"


def test_states_final_failed_waiting_listable() -> None:
    assert {s.value for s in TaskState} == {
        "ready",
        "delayed",
        "inflight",
        "done",
        "dead",
        "cancelled",
        "expired",
        "blocked",
        "upstream_failed",
    }
    assert {s for s in TaskState if s.final} == FINAL_STATES
    assert FINAL_STATES - {TaskState.DONE} == FAILED_STATES
    assert not WAITING_STATES & FINAL_STATES
    assert set(LISTABLE_STATES) == set(TaskState)
    assert set(QUEUE_COUNTS) <= set(TaskState)
    assert tuple(s.value for s in LISTABLE_STATES) == zbc.LISTABLE_STATES
    assert all(type(name) is str for name in zbc.LISTABLE_STATES)  # plain strings


def test_the_journal_stores_exactly_the_protocols_states() -> None:
    assert [s.name for s in StoredState] == [s.name for s in TaskState]
    for stored in StoredState:
        assert stored.wire is TaskState[stored.name]
        assert StoredState.from_wire(stored.wire.value) is stored
    with pytest.raises(ValueError):
        StoredState.from_wire("running")
    # Finished records lapse; a dead letter is final but stays until redriven or dropped.
    assert {s.wire for s in FINISHED_STATES} == FINAL_STATES - {TaskState.DEAD}


def test_the_clients_hand_out_the_protocols_states_and_failures() -> None:
    assert ClientTaskState is TaskState
    for state in TaskState:
        if state in FAILED_STATES:
            failure = task_failure(state.value, "t", "why")
            assert isinstance(failure, TaskFailed) and failure.state == state
            assert type(failure) is not TaskFailed
        else:
            with pytest.raises(KeyError):
                task_failure(state.value, "t", None)


def test_the_protocol_document_states_the_limits() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for phrase in [
        f"more than {limits.MAX_FRAMES} frames",
        f"`credit` | int, 1..{limits.MAX_CREDIT} |",
        f"(1..{limits.ZBW_MAX_BATCH} entries)",
        f"1..{limits.ZBC_MAX_BATCH} entries",
        f"at most {limits.ZBC_MAX_BATCH} ids",
        f"`limit` (1..{limits.MAX_LIST},",
        f"at most {int(limits.MAX_WAIT_S)})",
    ]:
        assert phrase in doc, f"docs/protocol.md does not say {phrase!r}"
