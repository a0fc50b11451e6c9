"""Bearer tokens: who may call what through the gateway, and the gateway's own key
at a broker started with --auth."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess, write_auth
from tests.integration.running import start_worker
from tests.web.gateway import GatewayProcess
from zbroker.client import Task

pytestmark = pytest.mark.integration

ADMIN = "admin-token-0123456789"
OBSERVER = "observer-token-0123456789"
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789"


def write_tokens(directory: Path) -> Path:
    path = directory / "tokens.toml"
    bob_digest = hashlib.sha256(BOB.encode()).hexdigest()
    path.write_text(
        f"""
[[token]]
principal = "ops"
token = "{ADMIN}"
roles = ["admin"]

[[token]]
principal = "dash"
token = "{OBSERVER}"
roles = ["observer"]

[[token]]
principal = "alice"
token = "{ALICE}"
roles = ["client", "publisher", "subscriber"]
services = ["echo"]
topics = ["chat."]

[[token]]
principal = "bob"
sha256 = "{bob_digest}"
roles = ["client"]
services = ["echo"]
"""
    )
    return path


@pytest.fixture
def secured(
    broker: BrokerProcess, gateway_factory: Callable[..., GatewayProcess], tmp_path: Path
) -> GatewayProcess:
    return gateway_factory(broker, "--tokens", str(write_tokens(tmp_path)))


def test_a_caller_without_a_valid_token_is_401_but_health_is_public(
    secured: GatewayProcess,
) -> None:
    for token in (None, "wrong-token-0123456789"):
        http = secured.http(token)
        answer = http.get("/api/v1/queues")
        assert answer.status == 401 and answer.code == "unauthorized"
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert http.get("/api/v1/health").status == 200
        http.close()


def test_roles_decide_what_each_token_may_do(secured: GatewayProcess) -> None:
    admin, observer, alice = (secured.http(t) for t in (ADMIN, OBSERVER, ALICE))
    # An observer reads the figures but may not enqueue or administer
    assert observer.get("/api/v1/queues").status == 200
    assert observer.post("/api/v1/tasks", {"service": "echo"}).status == 403
    assert observer.post("/api/v1/queues/echo/pause").status == 403
    # A client enqueues to its services only, and reads no figures
    assert alice.post("/api/v1/tasks", {"service": "echo", "text": "x"}).status == 200
    refused = alice.post("/api/v1/tasks", {"service": "other", "text": "x"})
    assert refused.status == 403 and refused.code == "forbidden"
    assert alice.get("/api/v1/queues").status == 403
    # Publishing and following stay within its topics
    assert alice.post("/api/v1/events", {"topic": "chat.x", "payload": 1}).status == 200
    assert alice.post("/api/v1/events", {"topic": "news.x", "payload": 1}).status == 403
    refused_follow = alice.open_stream("/api/v1/events?topic=news.")
    refused_follow.close()
    assert refused_follow.status == 403
    # An admin does everything
    assert admin.post("/api/v1/queues/echo/pause").status == 200
    assert admin.post("/api/v1/queues/echo/resume").status == 200
    for http in (admin, observer, alice):
        http.close()


def upper(task: Task) -> bytes:
    return task.payload.upper()


def test_a_client_sees_only_its_own_tasks(broker: BrokerProcess, secured: GatewayProcess) -> None:
    with ExitStack() as stack:
        start_worker(stack, broker, "echo", upper)
        alice, bob, admin = (secured.http(t) for t in (ALICE, BOB, ADMIN))
        # Given a task alice enqueued
        task_id = alice.post("/api/v1/tasks", {"service": "echo", "text": "hi"}).json["id"]
        # Then alice reads its result; bob, with the same role, finds no such task
        assert alice.get(f"/api/v1/tasks/{task_id}/result?wait_s=10").json["result"] == {
            "text": "HI"
        }
        for path in ("", "/result", "/stream"):
            assert bob.get(f"/api/v1/tasks/{task_id}{path}").status == 404
        assert bob.post(f"/api/v1/tasks/{task_id}/cancel").status == 404
        # And the admin sees the task with the principal that enqueued it
        record = admin.get(f"/api/v1/tasks/{task_id}").json
        assert record["headers"]["web.principal"] == "alice"
        for http in (alice, bob, admin):
            http.close()


def test_a_query_token_serves_browsers_event_sources(secured: GatewayProcess) -> None:
    http = secured.http()
    assert http.get(f"/api/v1/queues?access_token={OBSERVER}").status == 200
    http.close()


def test_a_bad_token_file_stops_the_gateway_with_a_message(
    broker: BrokerProcess, gateway_factory: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[token]]\nprincipal = "x"\ntoken = "short"\nroles = ["admin"]\n')
    gateway = gateway_factory(broker, "--tokens", str(bad), start=False)
    done = subprocess.run(gateway.command(), capture_output=True, timeout=30, text=True)
    assert done.returncode == 2 and "16 characters" in done.stderr


def test_the_gateway_speaks_to_an_authenticated_broker_with_its_own_key(
    broker_factory: Callable[..., BrokerProcess],
    gateway_factory: Callable[..., GatewayProcess],
    tmp_path: Path,
) -> None:
    # Given a broker with --auth where the gateway's key is an observer
    keys = write_auth(tmp_path, {"gateway": {"roles": ["observer"]}, "ops": {"roles": ["admin"]}})
    broker = broker_factory("--auth", str(keys.path), credentials=keys.credentials("ops"))
    gateway = gateway_factory(broker, root_args=tuple(keys.cli_args("gateway")))
    http = gateway.http()
    # Then it reads the figures, and what its key may not do is the broker's `forbidden`
    assert http.get("/api/v1/queues").status == 200
    refused = http.post("/api/v1/tasks", {"service": "echo", "text": "x"})
    assert refused.status == 403 and refused.code == "forbidden"
    http.close()
