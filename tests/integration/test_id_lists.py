"""REDRIVE and DROP through a real broker: an `ids` list over MAX_BATCH is refused
whole with bad_request, and nothing of it is done (docs/protocol.md §11.3)."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from tests.conftest import BrokerProcess
from zbroker.client import Client, TaskNotFound
from zbroker.protocol import ext, zbc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]


def dealer(ctx: Ctx, broker: BrokerProcess) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    return sock


def ask(client: zmq.Socket[bytes], command: bytes, rid: int, **fields: Any) -> zbc.Answer:
    client.send_multipart(zbc.call(command, rid, **fields))
    assert client.poll(10_000), f"no answer to {zbc.COMMAND_NAMES[command]}"
    answer = zbc.decode_answer(client.recv_multipart())
    assert answer.rid == rid
    return answer


def next_task(worker: zmq.Socket[bytes]) -> ext.Task:
    """Skip heartbeats; the next TASK."""
    while True:
        assert worker.poll(10_000), "no task delivered"
        msg = ext.decode_for_worker(worker.recv_multipart())
        if isinstance(msg, ext.Task):
            return msg


def dead_letter(ctx: Ctx, broker: BrokerProcess, client: zmq.Socket[bytes]) -> str:
    """A task of service `ocr` that a worker failed for good: a dead letter."""
    client.send_multipart(zbc.enqueue(1, "ocr", [[b"page"]], zbc.TaskOptions(max_attempts=1)))
    assert client.poll(10_000)
    (task_id,) = zbc.decode_answer(client.recv_multipart()).meta["ids"]
    worker = dealer(ctx, broker)
    worker.send_multipart(ext.ready("ocr", 1))
    task = next_task(worker)
    worker.send_multipart(ext.fail(task.id, task.attempt, "unreadable", retry=False))
    for rid in range(2, 200):
        if ask(client, zbc.STATUS, rid, id=task_id).meta["task"]["state"] == "dead":
            return str(task_id)
    raise AssertionError("the failed task never became a dead letter")


@pytest.mark.parametrize("command", [zbc.REDRIVE, zbc.DROP])
def test_an_id_list_over_max_batch_is_refused_and_nothing_is_done(
    broker: BrokerProcess, zmq_ctx: Ctx, command: bytes
) -> None:
    # Given a dead letter
    client = dealer(zmq_ctx, broker)
    task_id = dead_letter(zmq_ctx, broker, client)
    # When REDRIVE or DROP names it among MAX_BATCH + 1 ids
    ids = [task_id, *(f"nosuch{i}" for i in range(zbc.MAX_BATCH))]
    refused = ask(client, command, 500, service="ocr", ids=ids)
    # Then the call is refused, and the dead letter is still there, untouched
    assert not refused.ok and refused.code == zbc.E_BAD_REQUEST
    assert f"at most {zbc.MAX_BATCH}" in refused.message
    assert ask(client, zbc.STATUS, 501, id=task_id).meta["task"]["state"] == "dead"
    # And the same call with MAX_BATCH ids acts on it
    done = ask(client, command, 502, service="ocr", ids=ids[: zbc.MAX_BATCH])
    assert done.ok
    if command == zbc.REDRIVE:
        assert done.meta["ids"] == [task_id]
    else:
        assert done.meta["dropped"] == 1


@pytest.mark.parametrize("call", ["redrive", "drop_dead_letters"])
def test_the_python_client_sends_a_long_id_list_in_calls_the_broker_takes(
    broker: BrokerProcess, zmq_ctx: Ctx, call: str
) -> None:
    # Given a dead letter
    raw = dealer(zmq_ctx, broker)
    task_id = dead_letter(zmq_ctx, broker, raw)
    # When the client redrives or drops it among more ids than one call may carry
    ids = [*(f"nosuch{i}" for i in range(zbc.MAX_BATCH)), task_id]
    with Client(broker.endpoint, timeout_s=10.0) as client:
        outcome = getattr(client, call)("ocr", ids)
        # Then the calls were taken (none refused), and the dead letter was acted on
        state = client.status(task_id).state if call == "redrive" else None
        if call == "redrive":
            assert outcome == [task_id]
            assert state in {"ready", "inflight"}
        else:
            assert outcome == 1
            with pytest.raises(TaskNotFound):
                client.status(task_id)
