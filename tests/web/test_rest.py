"""The REST API of `zbroker web` against a real broker, over real HTTP."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack

import pytest

from tests.conftest import ROOT, BrokerProcess, wait_until
from tests.integration.running import start_worker
from tests.web.gateway import GatewayProcess, Http
from zbroker.client import Client, Task
from zbroker.client.errors import NonRetryableError

pytestmark = pytest.mark.integration


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def cli_json(broker: BrokerProcess, *args: str) -> object:
    """What `zbroker ARGS --json` prints, parsed."""
    out = subprocess.run(
        [sys.executable, "-m", "zbroker", *args, "--json", "--endpoint", broker.endpoint],
        capture_output=True,
        check=True,
        cwd=ROOT,
        timeout=30,
    )
    return json.loads(out.stdout)


def upper(task: Task) -> bytes:
    return task.payload.upper()


def test_health_and_openapi_describe_every_route(http: Http) -> None:
    # When the health and the OpenAPI document are fetched
    health = http.get("/api/v1/health")
    spec = http.get("/api/v1/openapi.json").json
    # Then the broker answers, and the document holds every route of the table
    assert health.status == 200 and health.json["status"] == "ok"
    assert spec["openapi"] == "3.1.0"
    assert "/tasks/{id}/stream" in spec["paths"]
    assert set(spec["paths"]["/queues/{service}/dead/redrive"]) == {"post"}


def test_queues_workers_and_stats_are_the_cli_documents(
    broker: BrokerProcess, http: Http, stack: ExitStack
) -> None:
    # Given a worker and a few tasks waiting in another service
    start_worker(stack, broker, "echo", upper)
    with Client(broker.endpoint) as client:
        for i in range(3):
            client.enqueue("idle", b"x%d" % i)
    # When /queues and /workers are read, and the CLI is asked the same
    queues = http.get("/api/v1/queues")
    workers = http.get("/api/v1/workers")
    # Then they are the documents `zbroker queues --json` / `workers --json` print
    assert queues.status == 200
    by_service = {row["service"]: row for row in queues.json}
    assert by_service["idle"]["ready"] == 3
    cli_queues = {row["service"]: row for row in cli_json(broker, "queues")}  # type: ignore[attr-defined]
    assert set(by_service["idle"]) == set(cli_queues["idle"])
    assert by_service["idle"]["ready"] == cli_queues["idle"]["ready"]
    assert [w["worker"] for w in workers.json] == [
        w["worker"]
        for w in cli_json(broker, "workers")  # type: ignore[attr-defined]
    ]
    stats = http.get("/api/v1/stats").json
    assert stats["stats"]["tasks_enqueued"] >= 3 and "uptime_s" in stats


def test_enqueue_json_text_and_base64_then_fetch_results(
    broker: BrokerProcess, http: Http, stack: ExitStack
) -> None:
    # Given a worker that upper-cases its payload
    start_worker(stack, broker, "echo", upper)
    # When tasks are enqueued with a JSON, a text and a base64 payload
    ids = []
    for body in (
        {"payload": {"a": "b"}},
        {"text": "hello"},
        {"base64": base64.b64encode(b"\xffraw").decode(), "priority": 5, "max_attempts": 2},
    ):
        answer = http.post("/api/v1/tasks", {"service": "echo", **body})
        assert answer.status == 200, answer.body
        ids.append(answer.json["id"])
    results = [http.get(f"/api/v1/tasks/{i}/result?wait_s=10").json for i in ids]
    # Then each result comes back as text, or base64 when it is not UTF-8
    assert results[0]["result"] == {"text": '{"A":"B"}'}
    assert results[1]["result"] == {"text": "HELLO"} and results[1]["state"] == "done"
    assert results[2]["result"] == {"base64": base64.b64encode(b"\xffRAW").decode()}
    # And the task's record shows its options and history
    record = http.get(f"/api/v1/tasks/{ids[2]}").json
    assert record["priority"] == 5 and record["max_attempts"] == 2 and record["state"] == "done"
    assert record["history"][0][0] == "enqueued"


def test_a_task_record_shows_the_start_of_its_payload(http: Http) -> None:
    # Given a text task and a binary one, waiting in a service nobody serves
    text_id = http.post("/api/v1/tasks", {"service": "nobody", "text": "héllo world"}).json["id"]
    raw = b"\xff\x00" + b"z" * 3000
    binary = {"service": "nobody", "base64": base64.b64encode(raw).decode()}
    binary_id = http.post("/api/v1/tasks", binary).json["id"]

    # When their records are read, by default and with a preview of 2 bytes
    text = http.get(f"/api/v1/tasks/{text_id}").json["payload"]
    cut = http.get(f"/api/v1/tasks/{text_id}?preview=2").json["payload"]
    data = http.get(f"/api/v1/tasks/{binary_id}").json["payload"]

    # Then the text shows as text, cut before a character the preview would split
    assert text == {"frames": 1, "bytes": 12, "preview": {"text": "héllo world"}}
    assert cut["preview"] == {"text": "h"}
    # And the binary as base64, its first 1024 bytes, with the whole payload's size
    assert data["bytes"] == 3002 and data["frames"] == 1
    assert base64.b64decode(data["preview"]["base64"]) == raw[:1024]
    # And preview=0 leaves the payload out; a preview over the cap is refused
    assert "payload" not in http.get(f"/api/v1/tasks/{text_id}?preview=0").json
    assert http.get(f"/api/v1/tasks/{text_id}?preview=999999").status == 400


def test_an_idempotency_key_answers_the_stored_task(http: Http) -> None:
    first = http.post("/api/v1/tasks", {"service": "later", "text": "a", "key": "k1"}).json
    again = http.post("/api/v1/tasks", {"service": "later", "text": "b", "key": "k1"}).json
    assert first == {"id": first["id"], "existing": False}
    assert again == {"id": first["id"], "existing": True}


def test_a_pending_result_is_202_and_a_cancelled_one_409(http: Http) -> None:
    # Given a task of a service nobody serves
    task_id = http.post("/api/v1/tasks", {"service": "nobody", "text": "x"}).json["id"]
    # When its result is asked without waiting
    pending = http.get(f"/api/v1/tasks/{task_id}/result")
    # Then it is pending (202) in state ready
    assert pending.status == 202 and pending.json["pending"] and pending.json["state"] == "ready"
    # When it is cancelled
    cancelled = http.post(f"/api/v1/tasks/{task_id}/cancel")
    assert cancelled.json == {"id": task_id, "was": "ready"}
    # Then its result is a conflict naming its state, and cancelling again is one too
    failed = http.get(f"/api/v1/tasks/{task_id}/result")
    assert failed.status == 409 and failed.code == "task_failed"
    assert failed.json["error"]["state"] == "cancelled"
    again = http.post(f"/api/v1/tasks/{task_id}/cancel")
    assert again.status == 409 and again.code == "conflict"


def test_list_tasks_pages_through_a_state(http: Http) -> None:
    for i in range(5):
        http.post("/api/v1/tasks", {"service": "pile", "text": str(i)})
    first = http.get("/api/v1/tasks?service=pile&state=ready&limit=3").json
    rest = http.get(f"/api/v1/tasks?service=pile&limit=3&after={first['next_after']}").json
    ids = [t["id"] for t in first["tasks"] + rest["tasks"]]
    assert len(ids) == 5 == len(set(ids))
    assert rest["next_after"] is None


def speak(task: Task) -> Generator[str, None, bytes]:
    for word in task.payload.decode().split():
        yield word + " "
    return b"spoken"


def test_a_task_stream_is_server_sent_events_then_its_result(
    broker: BrokerProcess, http: Http, stack: ExitStack
) -> None:
    # Given a generator worker and a task of it
    start_worker(stack, broker, "speak", speak)
    task_id = http.post("/api/v1/tasks", {"service": "speak", "text": "one two three"}).json["id"]
    # When its stream is read as SSE from the start
    sse = http.open_stream(f"/api/v1/tasks/{task_id}/stream")
    events = list(sse)
    sse.close()
    # Then each chunk comes with its offset as the event id, then the result
    assert sse.status == 200
    assert [e.event for e in events] == ["chunk", "chunk", "chunk", "result"]
    assert [e.data["text"] for e in events[:3]] == ["one ", "two ", "three "]
    assert [e.id for e in events[:3]] == ["0", "1", "2"]
    assert events[3].data["frames"] == [{"text": "spoken"}]
    # And a reader resuming after chunk 1 (Last-Event-ID) gets the rest only
    resumed = http.open_stream(f"/api/v1/tasks/{task_id}/stream", {"Last-Event-ID": "1"})
    assert [e.data.get("text") for e in resumed][:1] == ["three "]
    resumed.close()


def test_an_unknown_task_is_404_everywhere(http: Http) -> None:
    for path in ("", "/result", "/stream"):
        answer = http.get(f"/api/v1/tasks/nosuchtask{path}")
        assert answer.status == 404, path
        assert answer.code == "not_found"
    assert http.post("/api/v1/tasks/nosuchtask/cancel").status == 404


def fail(task: Task) -> bytes:
    raise NonRetryableError("no way")


def test_admin_pause_resume_purge_limit_and_dead_letters(
    broker: BrokerProcess, http: Http, stack: ExitStack
) -> None:
    # Given a paused service with waiting tasks
    assert http.post("/api/v1/queues/work/pause").json == {"service": "work", "paused": True}
    for i in range(3):
        http.post("/api/v1/tasks", {"service": "work", "text": str(i)})
    # When it is purged, limited and resumed
    assert http.post("/api/v1/queues/work/purge").json["purged"] == 3
    limited = http.request("PUT", "/api/v1/queues/work/limit", {"limit": 2})
    assert limited.json == {"service": "work", "limit": 2, "per_key": False}
    assert http.request("PUT", "/api/v1/queues/work/limit", {"limit": 0}).status == 400
    assert http.post("/api/v1/queues/work/resume").json["paused"] is False
    # Given two tasks that die at once
    start_worker(stack, broker, "bad", fail)
    ids = [http.post("/api/v1/tasks", {"service": "bad", "text": "x"}).json["id"] for _ in "ab"]
    for task_id in ids:
        assert http.get(f"/api/v1/tasks/{task_id}/result?wait_s=10").code == "task_failed"
    # Then they are listed as dead letters, one can be redriven and the rest dropped
    dead = http.get("/api/v1/queues/bad/dead").json
    assert sorted(d["id"] for d in dead) == sorted(ids)
    redriven = http.post("/api/v1/queues/bad/dead/redrive", {"ids": [ids[0]]}).json
    assert redriven == {"service": "bad", "redriven": [ids[0]]}
    wait_until(lambda: http.get(f"/api/v1/tasks/{ids[0]}").json["state"] == "dead")
    assert http.post("/api/v1/queues/bad/dead/drop").json["dropped"] == 2
    assert http.get("/api/v1/queues/bad/dead").json == []


def test_drain_a_worker_and_an_unknown_one(
    broker: BrokerProcess, http: Http, stack: ExitStack
) -> None:
    start_worker(stack, broker, "echo", upper)
    (worker,) = http.get("/api/v1/workers").json
    drained = http.post(f"/api/v1/workers/{worker['worker']}/drain")
    assert drained.json == {"worker": worker["worker"], "tasks": 0}
    assert http.post("/api/v1/workers/ffff/drain").status == 404


def test_events_follow_and_publish_as_sse(gateway: GatewayProcess, http: Http) -> None:
    # Given a follower of the `demo.` events
    sse = gateway.http().open_stream("/api/v1/events?topic=demo.")
    assert sse.status == 200
    got: list[dict[str, object]] = []

    def read() -> None:
        for event in sse:
            if event.event == "event":
                got.append(event.data)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    # When one event is published through the gateway, once, right after its start
    answer = http.post("/api/v1/events", {"topic": "demo.hi", "payload": {"n": 1}})
    assert answer.status == 200

    # (the gateway waited for the follower's subscription to reach it: no retry needed)
    reader.join(timeout=10)
    sse.close()
    # Then the follower gets it with its payload
    assert got[0]["type"] == "demo.hi" and got[0]["payload"] == {"n": 1}
    assert got[0]["source"] == "web"


def test_the_broker_topics_cannot_be_published(http: Http) -> None:
    for topic in ("task.done.x", "worker.down", "schedule.x"):
        answer = http.post("/api/v1/events", {"topic": topic, "payload": 1})
        assert answer.status == 403 and answer.code == "forbidden"


def test_a_full_queue_is_429_with_the_broker_code(
    broker_factory: Callable[..., BrokerProcess],
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    # Given a broker that keeps at most 2 tasks per service
    broker = broker_factory("--max-tasks", "2")
    http = gateway_factory(broker).http()
    for i in range(2):
        assert http.post("/api/v1/tasks", {"service": "small", "text": str(i)}).status == 200
    # When a third is enqueued
    answer = http.post("/api/v1/tasks", {"service": "small", "text": "2"})
    # Then it is refused with the broker's code and 429
    assert answer.status == 429 and answer.code == "queue_full"
    http.close()
