"""Task graphs (docs/protocol.md §15) across languages, on real processes.

A Node Client builds chains whose steps run on Python and Node workers, a Python
client's fan_in() is joined by a Node worker that reads its input with
unpackResults(), and a failure spreads as upstream_failed to whichever client waits
(TaskUpstreamFailed in both). Every payload crosses byte for byte, and each worker
sees the ids of the tasks its task depended on (Task.depends_on, task.dependsOn).

The Node peer (a client taking commands, or a worker) is the script PEER below,
written next to the test's logs: it imports the Node client and the JSON-lines
plumbing of tests/crosslang/node/ by path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerProcess
from tests.crosslang.nodeproc import NODE_CLIENT, NOT_UTF8, SCRIPTS, NodeProcess, b64, unb64
from tests.integration.running import open_client, start_worker
from zbroker.client import NonRetryableError, Task, TaskDead, TaskUpstreamFailed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# node PEER ENDPOINT client: ops chain, fanIn, enqueue (options as the Node client
# takes them), result (base64 frames), status ({state, dependsOn, blockedOn,
# runAnyway, input}). node PEER ENDPOINT worker SERVICE MODE:
# prints {"event": "task", id, dependsOn, frames} per attempt, then in mode `append`
# returns its frames joined by "|" and " >node"; in mode `join` returns one JSON frame
# {dependsOn, head (its own payload frames), results (unpackResults of the last
# frame: base64 lists, or null)}.
PEER = """
import { Client, Worker, unpackResults } from 'CLIENT_URL'
import { b64, emit, serveCommands, unb64 } from 'IO_URL'

const [endpoint, role, service, mode] = process.argv.slice(2)
const frames = (list) => (list ?? []).map(unb64)

if (role === 'client') {
  const client = new Client(endpoint, { timeoutMs: 20_000 })
  const steps = (list) => list.map(([name, data]) => [name, data === null ? null : frames(data)])
  serveCommands({
    chain: (c) => client.chain(steps(c.steps), c.options ?? {}),
    fanIn: (c) => client.fanIn(steps(c.parts), steps([c.then])[0], c.options ?? {}),
    enqueue: (c) => client.enqueue(c.service, frames(c.frames), c.options ?? {}),
    result: async (c) => (await client.result(c.id, { frames: true })).map(b64),
    status: async (c) => {
      const { state, dependsOn, blockedOn, runAnyway, input } = await client.status(c.id)
      return { state, dependsOn, blockedOn, runAnyway, input }
    }
  }, () => client.close())
  emit({ event: 'ready' })
} else {
  const handler = (task) => {
    emit({ event: 'task', id: task.id, dependsOn: task.dependsOn, frames: task.frames.map(b64) })
    if (mode === 'join') {
      const results = unpackResults(task.frames.at(-1))
      return JSON.stringify({
        dependsOn: task.dependsOn,
        head: task.frames.slice(0, -1).map(b64),
        results: results.map((r) => r === null ? null : r.map(b64))
      })
    }
    const joined = task.frames.flatMap((f, i) => i === 0 ? [f] : [Buffer.from('|'), f])
    return Buffer.concat([...joined, Buffer.from(' >node')])
  }
  const worker = new Worker({ endpoint, service, handler, heartbeatIntervalMs: 200, logger: null })
  process.once('SIGTERM', async () => {
    await worker.stop({ timeoutMs: 2000 })
    process.exit(0)
  })
  await worker.start()
  emit({ event: 'ready' })
}
"""


class Peers:
    """Node peers (PEER) for one test, all ended at teardown."""

    def __init__(self, node: str, tmp_path: Path, endpoint: str) -> None:
        self.node = node
        self.tmp_path = tmp_path
        self.endpoint = endpoint
        self.script = tmp_path / "graph_peer.mjs"
        text = PEER.replace("CLIENT_URL", (NODE_CLIENT / "index.js").as_uri())
        self.script.write_text(text.replace("IO_URL", (SCRIPTS / "io.mjs").as_uri()))
        self.started: list[NodeProcess] = []

    def start(self, *args: str) -> NodeProcess:
        log = self.tmp_path / f"peer{len(self.started)}-{'-'.join(args)}.log"
        # SCRIPTS / an absolute path is that path.
        proc = NodeProcess(self.node, str(self.script), [self.endpoint, *args], log)
        self.started.append(proc)
        proc.wait_ready()
        return proc

    def client(self) -> NodeProcess:
        return self.start("client")

    def worker(self, service: str, mode: str = "append") -> NodeProcess:
        return self.start("worker", service, mode)

    def close_all(self) -> None:
        for proc in self.started:
            proc.close()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory("--durability", "memory")


@pytest.fixture
def peers(node_path: str, tmp_path: Path, broker: BrokerProcess) -> Iterator[Peers]:
    made = Peers(node_path, tmp_path, broker.endpoint)
    try:
        yield made
    finally:
        made.close_all()


class Recorder:
    """A Python handler that records each task's depends_on and frames, and returns
    its frames joined by "|" and " >py" (`fail`: fails for good instead)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.seen: list[tuple[str, tuple[str, ...], tuple[bytes, ...]]] = []
        self._lock = threading.Lock()

    def __call__(self, task: Task) -> list[bytes]:
        with self._lock:
            self.seen.append((task.id, task.depends_on, task.frames))
        if self.fail:
            raise NonRetryableError("this step cannot work")
        return [b"|".join(task.frames) + b" >py", b"py second frame"]


def python_worker(stack: ExitStack, broker: BrokerProcess, service: str, **kw: bool) -> Recorder:
    handler = Recorder(**kw)
    start_worker(stack, broker, service, handler, concurrency=4)
    return handler


def node_tasks(worker: NodeProcess) -> list[dict[str, Any]]:
    return worker.events("task")


def by_id(seen: list[tuple[str, Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """What each task's attempts saw, by task id: a worker that missed heartbeats under
    load may run a task twice, but every attempt must see the same."""
    out: dict[str, tuple[Any, Any]] = {}
    for task_id, deps, frames in seen:
        assert out.setdefault(task_id, (deps, frames)) == (deps, frames), task_id
    return out


def node_seen(worker: NodeProcess) -> dict[str, tuple[Any, Any]]:
    return by_id(
        [(t["id"], t["dependsOn"], [unb64(f) for f in t["frames"]]) for t in node_tasks(worker)]
    )


# ------------------------------------------------------------ Node client


def test_a_node_chain_runs_step_by_step_on_python_and_node_workers(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    py = python_worker(stack, broker, "g.py-step")
    node_worker = peers.worker("g.node-step")
    client = peers.client()
    # When a Node client chains a Python step, a Node step and a Python step
    ids = client.call(
        "chain",
        steps=[
            ["g.py-step", [b64(NOT_UTF8)]],
            ["g.node-step", None],
            ["g.py-step", [b64(b"own")]],
        ],
        options={"maxAttempts": 2},
    )
    assert len(ids) == 3
    # Then each step got the previous one's result frames after its own payload
    last = [unb64(f) for f in client.call("result", id=ids[2])]
    middle = b"|".join([NOT_UTF8 + b" >py", b"py second frame"])
    assert last == [b"own|" + middle + b" >node >py", b"py second frame"]
    python_client = open_client(stack, broker)
    assert python_client.result_frames(ids[2]) == last
    # And each worker saw the id of the step before
    assert by_id(py.seen) == {
        ids[0]: ((), (NOT_UTF8,)),
        ids[2]: ((ids[1],), (b"own", middle + b" >node")),
    }
    assert node_seen(node_worker) == {
        ids[1]: ([ids[0]], [NOT_UTF8 + b" >py", b"py second frame"]),
    }
    assert client.call("status", id=ids[2]) == {
        "state": "done",
        "dependsOn": [ids[1]],
        "blockedOn": 0,
        "runAnyway": False,
        "input": "result",
    }


def test_a_node_client_depends_on_a_python_clients_task_by_its_key(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    python_worker(stack, broker, "g.py-step")
    node_worker = peers.worker("g.node-step")
    python_client = open_client(stack, broker)
    first = python_client.enqueue("g.py-step", b"from python", key="rec-42")
    client = peers.client()
    # When a Node client names the Python client's task by service and key
    second = client.call(
        "enqueue",
        service="g.node-step",
        frames=[],
        options={"dependsOn": [{"service": "g.py-step", "key": "rec-42"}], "input": "result"},
    )
    # Then its Node worker gets that task's result and knows it by id
    assert python_client.result(second) == b"from python >py|py second frame >node"
    assert node_seen(node_worker) == {
        second: ([first], [b"from python >py", b"py second frame"]),
    }


def test_a_failed_python_step_ends_a_node_chain_upstream_failed(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    python_worker(stack, broker, "g.py-fails", fail=True)
    node_worker = peers.worker("g.node-step")
    client = peers.client()
    ids = client.call("chain", steps=[["g.py-fails", [b64(b"x")]], ["g.node-step", None]] * 2)
    python_client = open_client(stack, broker)
    with pytest.raises(TaskDead):
        python_client.result(ids[0], timeout_s=20)
    # Then the Node client's wait for any later step ends with TaskUpstreamFailed
    for i in (1, 3):
        error = client.call_error("result", id=ids[i])
        assert error["name"] == "TaskUpstreamFailed"
        assert error["state"] == "upstream_failed"
        assert error["taskId"] == ids[i]
        assert error["error"] == f"dependency {ids[i - 1]} ended " + (
            "dead" if i == 1 else "upstream_failed"
        )
    # And the Python client's too, and no later step ever ran
    with pytest.raises(TaskUpstreamFailed) as caught:
        python_client.result(ids[2], timeout_s=20)
    assert caught.value.error == f"dependency {ids[1]} ended upstream_failed"
    assert node_tasks(node_worker) == []


# ------------------------------------------------------------ Python client


def test_a_python_fan_in_is_joined_by_a_node_worker_with_unpack_results(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    python_worker(stack, broker, "g.py-part")
    peers.worker("g.node-part")
    joiner = peers.worker("g.node-join", "join")
    client = open_client(stack, broker)
    # When a Python client fans three parts (Python, Node, Python) into a Node join
    ids = client.fan_in(
        [("g.py-part", b"one"), ("g.node-part", NOT_UTF8), ("g.py-part", [b"three", b"3"])],
        ("g.node-join", [b"head", b""]),
    )
    assert len(ids) == 4
    # Then the Node worker unpacks every part's result frames, in the parts' order
    joined = json.loads(client.result(ids[3]))
    assert joined["dependsOn"] == ids[:3]
    assert [unb64(f) for f in joined["head"]] == [b"head", b""]
    assert [[unb64(f) for f in r] for r in joined["results"]] == [
        [b"one >py", b"py second frame"],
        [NOT_UTF8 + b" >node"],
        [b"three|3 >py", b"py second frame"],
    ]
    assert list(node_seen(joiner)) == [ids[3]]


def test_run_anyway_hands_a_node_worker_nil_for_a_failed_python_dependency(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    python_worker(stack, broker, "g.py-part")
    python_worker(stack, broker, "g.py-fails", fail=True)
    peers.worker("g.node-join", "join")
    client = open_client(stack, broker)
    good = client.enqueue("g.py-part", b"fine")
    bad = client.enqueue("g.py-fails", b"broken")
    joined = client.enqueue(
        "g.node-join", b"", depends_on=[good, bad], run_anyway=True, input="results"
    )
    got = json.loads(client.result(joined, timeout_s=20))
    status = peers.client().call("status", id=joined)
    assert (status["runAnyway"], status["input"]) == (True, "results")
    assert got["dependsOn"] == [good, bad]
    assert got["head"] == [b64(b"")]
    assert got["results"][1] is None
    assert [unb64(f) for f in got["results"][0]] == [b"fine >py", b"py second frame"]
