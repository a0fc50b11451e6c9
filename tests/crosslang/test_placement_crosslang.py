"""Placement and flow control (docs/protocol.md §16) across languages, on real processes.

A Python client's `require=["gpu"]` task waits until a Node worker says it has a gpu
(Worker.setTags: ZBW01 TAGS, announced as `worker.tags` and shown by WORKERS) and
never runs on the Python worker beside it; a Node client's `concurrencyKey` tasks run
on a Python worker under a per-key limit set from Python; a Node client's LIMIT and
RATE show in a Python client's QUEUES; a Node client's debounced enqueues become one
task for a Python worker, with its last payload.

The Node peer (a client taking commands, or a worker that takes setTags commands) is
the script PEER below, written next to the test's logs: it imports the Node client and
the JSON-lines plumbing of tests/crosslang/node/ by path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerProcess, wait_until
from tests.crosslang.nodeproc import NODE_CLIENT, NOT_UTF8, SCRIPTS, NodeProcess, b64, unb64
from tests.integration.running import open_client, start_worker
from zbroker.client import Client, Task

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# node PEER ENDPOINT client: ops enqueue, enqueueMany (options as the Node client
# takes them; their answers as it gives them, receipts included), limit, rate (their
# answers), status ({state, require, prefer, affinity, concurrencyKey}), result
# (base64 frames).
# node PEER ENDPOINT worker SERVICE TAGS: a Worker with TAGS (comma-separated, "-" for
# none); prints {"event": "task", id, frames} per attempt and returns its frames and
# " >node"; takes the commands setTags ({tags}: answers with worker.tags) and stats.
PEER = """
import { Client, Worker } from 'CLIENT_URL'
import { b64, emit, serveCommands, unb64 } from 'IO_URL'

const [endpoint, role, service, tags] = process.argv.slice(2)
const frames = (list) => (list ?? []).map(unb64)

if (role === 'client') {
  const client = new Client(endpoint, { timeoutMs: 20_000 })
  serveCommands({
    enqueue: (c) => client.enqueue(c.service, frames(c.frames), c.options ?? {}),
    enqueueMany: (c) => client.enqueueMany(c.service, c.payloads.map(frames), c.options ?? {}),
    limit: (c) => client.limit(c.service, c.limit, c.options ?? {}),
    rate: (c) => client.rate(c.service, c.perS, c.options ?? {}),
    result: async (c) => (await client.result(c.id, { frames: true })).map(b64),
    status: async (c) => {
      const { state, require, prefer, affinity, concurrencyKey } = await client.status(c.id)
      return { state, require, prefer, affinity, concurrencyKey }
    }
  }, () => client.close())
  emit({ event: 'ready' })
} else {
  const handler = (task) => {
    emit({ event: 'task', id: task.id, frames: task.frames.map(b64) })
    return [...task.frames, Buffer.from(' >node')]
  }
  const worker = new Worker({
    endpoint,
    service,
    handler,
    tags: tags === '-' ? [] : tags.split(','),
    heartbeatIntervalMs: 200,
    logger: null
  })
  serveCommands({
    setTags: (c) => {
      worker.setTags(c.tags)
      return worker.tags
    },
    stats: () => worker.stats
  }, async () => { await worker.stop({ timeoutMs: 2000 }) })
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
        self.script = tmp_path / "placement_peer.mjs"
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

    def worker(self, service: str, tags: tuple[str, ...] = ()) -> NodeProcess:
        return self.start("worker", service, ",".join(tags) or "-")

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
    """A Python handler that records each task (id, payload, headers) and how many of
    each concurrency key's tasks (the payload's first byte) run at once; it returns
    its payload and " >py" after `hold_s`."""

    def __init__(self, hold_s: float = 0.0) -> None:
        self.hold_s = hold_s
        self.seen: list[tuple[str, bytes, dict[str, Any]]] = []
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.together = 0
        self._lock = threading.Lock()

    def __call__(self, task: Task) -> bytes:
        key = task.payload[:1].decode()
        with self._lock:
            self.seen.append((task.id, task.payload, dict(task.headers)))
            self.running[key] = self.running.get(key, 0) + 1
            self.most[key] = max(self.most.get(key, 0), self.running[key])
            self.together = max(self.together, sum(self.running.values()))
        time.sleep(self.hold_s)
        with self._lock:
            self.running[key] -= 1
        return task.payload + b" >py"


def queue_row(client: Client, service: str) -> dict[str, Any]:
    (row,) = [q for q in client.queues() if q["service"] == service]
    return row


def test_a_python_clients_gpu_task_waits_for_a_node_worker_that_sets_its_tags(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    python = Recorder()
    start_worker(stack, broker, "p.gpu", python, tags=["cpu"], concurrency=2)
    node_worker = peers.worker("p.gpu")
    client = open_client(stack, broker)
    # Given a Python client's task that requires gpu, and plain tasks after it
    gpu_task = client.enqueue("p.gpu", NOT_UTF8, require=["gpu"], prefer=["fast"])
    plain = [client.enqueue("p.gpu", b"plain %d" % i) for i in range(4)]
    for task_id in plain:
        assert client.result_frames(task_id, timeout_s=10)[-1].endswith((b" >py", b" >node"))
    # Then it waits, though both workers had credit to spare
    status = client.status(gpu_task)
    assert status.state.value == "ready"
    assert (status.require, status.prefer) == (("gpu",), ("fast",))
    assert queue_row(client, "p.gpu")["unplaceable"] == 1
    # When the Node worker says it has a gpu, without registering again
    assert node_worker.call("setTags", tags=["gpu", "model:x"]) == ["gpu", "model:x"]
    # Then the task runs there, its payload intact, and never on the Python worker
    assert client.result_frames(gpu_task, timeout_s=10) == [NOT_UTF8, b" >node"]
    assert gpu_task not in [task_id for task_id, _, _ in python.seen]
    assert [t["id"] for t in node_worker.events("task")].count(gpu_task) == 1
    assert queue_row(client, "p.gpu")["unplaceable"] == 0
    (shown,) = [w for w in client.workers() if w["service"] == "p.gpu" and w["tags"] != ["cpu"]]
    assert shown["tags"] == ["gpu", "model:x"]
    stats = node_worker.call("stats")
    assert (stats["tagsSent"], stats["reconnects"]) == (1, 0)


def test_a_node_clients_concurrency_keys_under_a_per_key_limit_set_from_python(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    client = open_client(stack, broker)
    client.limit("p.keyed", 1, per_key=True)
    python = Recorder(hold_s=0.15)
    start_worker(stack, broker, "p.keyed", python, concurrency=4)
    node_client = peers.client()
    # When a Node client enqueues three tasks for each of two keys
    ids = [
        *node_client.call(
            "enqueueMany",
            service="p.keyed",
            payloads=[[b64(b"A%d" % i)] for i in range(3)],
            options={"concurrencyKey": "user:A"},
        ),
        *node_client.call(
            "enqueueMany",
            service="p.keyed",
            payloads=[[b64(b"B%d" % i)] for i in range(3)],
            options={"concurrencyKey": "user:B"},
        ),
    ]
    for task_id in ids:
        client.result(task_id, timeout_s=10)
    # Then the Python worker ran one task of each key at a time, both keys side by side
    assert python.most == {"A": 1, "B": 1}
    assert python.together == 2
    assert client.status(ids[0]).concurrency_key == "user:A"
    assert node_client.call("status", id=ids[3]) == {
        "state": "done",
        "require": [],
        "prefer": [],
        "affinity": None,
        "concurrencyKey": "user:B",
    }
    assert queue_row(client, "p.keyed")["key_limit"] == 1


def test_a_node_clients_limit_and_rate_show_in_python_queues(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    node_client = peers.client()
    assert node_client.call("limit", service="p.settings", limit=2, options={"perKey": True}) == {
        "service": "p.settings",
        "limit": 2,
        "perKey": True,
    }
    assert node_client.call("rate", service="p.settings", perS=2.5, options={"burst": 5}) == {
        "service": "p.settings",
        "rate": 2.5,
        "burst": 5,
        "perKey": False,
    }
    node_client.call("rate", service="p.settings", perS=1, options={"perKey": True})
    client = open_client(stack, broker)
    row = queue_row(client, "p.settings")
    assert (row["limit"], row["key_limit"]) == (None, 2)
    assert row["rate"] == {"per_s": 2.5, "burst": 5}
    assert row["key_rate"] == {"per_s": 1, "burst": 1}
    # And a Python client removes them again
    client.limit("p.settings", None, per_key=True)
    client.rate("p.settings", None)
    client.rate("p.settings", None, per_key=True)
    row = queue_row(client, "p.settings")
    assert (row["key_limit"], row["rate"], row["key_rate"]) == (None, None, None)


def test_a_node_clients_debounced_enqueues_are_one_task_for_a_python_worker(
    broker: BrokerProcess, peers: Peers, stack: ExitStack
) -> None:
    python = Recorder()
    start_worker(stack, broker, "p.debounce", python)
    node_client = peers.client()
    options = {"key": "file:/tmp/a.txt", "debounceS": 1, "receipt": True}
    receipts = [
        node_client.call(
            "enqueue",
            service="p.debounce",
            frames=[b64(b"version %d" % n)],
            options={**options, "headers": {"rev": n}},
        )
        for n in (1, 2, 3)
    ]
    task_id = receipts[0]["id"]
    assert receipts == [
        {"id": task_id, "existing": False},
        {"id": task_id, "existing": True, "replaced": True},
        {"id": task_id, "existing": True, "replaced": True},
    ]
    client = open_client(stack, broker)
    assert client.result(task_id, timeout_s=10) == b"version 3 >py"
    assert [unb64(f) for f in node_client.call("result", id=task_id)] == [b"version 3 >py"]
    wait_until(lambda: len(python.seen) >= 1, timeout_s=5)
    time.sleep(0.2)
    assert python.seen == [(task_id, b"version 3", {"rev": 3})]
