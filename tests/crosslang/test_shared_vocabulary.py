"""The Node client's copies of the protocol's vocabulary, compared with zbroker.protocol.

The Node client cannot import Python, so it spells the limits, the state names,
the error codes and the command bytes again (clients/node/lib/protocol.js,
errors.js, index.d.ts). Node loads them here (tests/crosslang/node/vocabulary.mjs)
and each is compared with its home in zbroker/protocol/: a change on either side
alone fails. A new constant in protocol.js fails too until it is paired below.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest

from tests.crosslang.nodeproc import NODE_CLIENT, SCRIPTS
from zbroker.client.errors import task_failure
from zbroker.protocol import (
    DEFAULT_ENDPOINT,
    DEFAULT_EVENTS_IN,
    DEFAULT_EVENTS_OUT,
    access,
    ext,
    limits,
    mdp,
    zbc,
)
from zbroker.protocol.states import FAILED_STATES, FINAL_STATES, TaskState

pytestmark = pytest.mark.timeout(60)

# Every plain constant protocol.js exports, and the Python value it must equal.
PAIRED: dict[str, Any] = {
    "DEFAULT_ENDPOINT": DEFAULT_ENDPOINT,
    "DEFAULT_EVENTS_IN": DEFAULT_EVENTS_IN,
    "DEFAULT_EVENTS_OUT": DEFAULT_EVENTS_OUT,
    "DEFAULT_MAX_MESSAGE_BYTES": limits.DEFAULT_MAX_MESSAGE_BYTES,
    "MIN_MESSAGE_BYTES": limits.MIN_MESSAGE_BYTES,
    "MAX_FRAMES": limits.MAX_FRAMES,
    "BATCH_FRAMES": limits.BATCH_FRAMES,
    "MAX_BATCH": limits.ZBC_MAX_BATCH,
    "MAX_WAIT_S": limits.MAX_WAIT_S,
    "MAX_LIST": limits.MAX_LIST,
    "MAX_QUEUES_PAGE": limits.MAX_QUEUES_PAGE,
    "PRIORITY_MIN": limits.PRIORITY_MIN,
    "PRIORITY_MAX": limits.PRIORITY_MAX,
    "MAX_ATTEMPTS_LIMIT": limits.MAX_ATTEMPTS_LIMIT,
    "MAX_SERVICE_LIMIT": limits.MAX_SERVICE_LIMIT,
    "MAX_RATE_PER_S": limits.MAX_RATE_PER_S,
    "MAX_BURST": limits.MAX_BURST,
    "MAX_CREDIT": limits.MAX_CREDIT,
    "MAX_TAGS": limits.MAX_TAGS,
    "MAX_WORKER_BATCH": limits.ZBW_MAX_BATCH,
    "MAX_TOPIC_BYTES": limits.MAX_TOPIC_BYTES,
    "STREAM_WINDOW_DEFAULT": limits.STREAM_WINDOW_DEFAULT,
    "STREAM_WINDOW_MAX": limits.STREAM_WINDOW_MAX,
    "STREAM_CREDIT_MAX": limits.STREAM_CREDIT_MAX,
    "STREAM_UNCREDITED_BYTES": limits.STREAM_UNCREDITED_BYTES,
    "MAX_DEPENDENCIES": limits.MAX_DEPENDENCIES,
    "INPUTS": list(zbc.INPUTS),
    "MAX_SCHEDULE_NAME_BYTES": limits.MAX_SCHEDULE_NAME_BYTES,
    "MIN_SCHEDULE_INTERVAL_S": limits.MIN_SCHEDULE_INTERVAL_S,
    "MAX_SCHEDULE_INTERVAL_S": limits.MAX_SCHEDULE_INTERVAL_S,
    "MAX_SCHEDULE_PAYLOAD_BYTES": limits.MAX_SCHEDULE_PAYLOAD_BYTES,
    "MDPC01": mdp.MDPC01.decode(),
    "MMI_SERVICE": mdp.MMI_SERVICE.decode(),
    "ZBW01": ext.ZBW01.decode(),
    "ZBC01": zbc.ZBC01.decode(),
    "TASK_STATES": [state.value for state in TaskState],
    "FINAL_STATES": sorted(FINAL_STATES),  # a Set in Node: compared sorted
    "FAILED_STATES": sorted(FAILED_STATES),  # a Set in Node: compared sorted
    "FORBIDDEN_PREFIX": access.FORBIDDEN_PREFIX,
    "C": "ZBC01 command bytes, compared one by one below",
    "W": "ZBW01 command bytes, compared one by one below",
}
# Node-only constants, with the reason they have no Python counterpart.
NODE_ONLY = {
    # The Node Client (not its Worker) accepts a smaller --max-message-bytes than the
    # Python clients: a client's own metadata is only its call's.
    "MIN_CLIENT_MESSAGE_BYTES": "Node Client's own lower bound",
}


@pytest.fixture(scope="module")
def node_vocabulary(node_path: str) -> dict[str, Any]:
    done = subprocess.run(
        [node_path, str(SCRIPTS / "vocabulary.mjs")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    vocabulary: dict[str, Any] = json.loads(done.stdout)
    return vocabulary


def test_every_plain_constant_of_protocol_js_is_paired(node_vocabulary: dict[str, Any]) -> None:
    exported = set(node_vocabulary["protocol"])
    assert exported == set(PAIRED) | set(NODE_ONLY)


@pytest.mark.parametrize("name", sorted(set(PAIRED) - {"C", "W"}))
def test_node_constant_equals_python(node_vocabulary: dict[str, Any], name: str) -> None:
    node = node_vocabulary["protocol"][name]
    if name in ("FINAL_STATES", "FAILED_STATES"):
        node = sorted(node)
    assert node == PAIRED[name], f"protocol.js {name} = {node!r}, Python says {PAIRED[name]!r}"


@pytest.mark.parametrize(("table", "module"), [("C", zbc), ("W", ext)])
def test_command_bytes_match(node_vocabulary: dict[str, Any], table: str, module: Any) -> None:
    for name, byte in node_vocabulary["protocol"][table].items():
        python = getattr(module, name)
        assert python == bytes([byte]), f"protocol.js {table}.{name} = {byte:#04x}, Python {python}"


def test_error_codes_match(node_vocabulary: dict[str, Any]) -> None:
    python = {name[2:]: value for name, value in vars(zbc).items() if name.startswith("E_")}
    assert node_vocabulary["errorCodes"] == python


def test_each_failed_state_has_the_same_error_class(node_vocabulary: dict[str, Any]) -> None:
    classes = node_vocabulary["taskErrors"]
    assert set(classes) == {state.value for state in TaskState}
    special = {state for state, name in classes.items() if name != "TaskError"}
    assert special == {state.value for state in FAILED_STATES}
    for state in special:
        assert classes[state] == type(task_failure(state, "t", None)).__name__


def _union(declarations: str, name: str) -> list[str]:
    match = re.search(rf"^export type {name} = ([^\n]+)$", declarations, re.MULTILINE)
    assert match, f"index.d.ts declares no type {name}"
    members = [m.strip() for m in match.group(1).split("|")]
    assert all(re.fullmatch(r"'[a-z_]+'", m) for m in members), members
    return [m.strip("'") for m in members]


def test_typings_spell_the_same_states_and_codes() -> None:
    declarations = (NODE_CLIENT / "index.d.ts").read_text()
    assert _union(declarations, "TaskState") == [state.value for state in TaskState]
    codes = {value for name, value in vars(zbc).items() if name.startswith("E_")}
    assert set(_union(declarations, "BrokerErrorCode")) == codes
