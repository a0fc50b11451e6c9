"""CURVE authentication and roles, against a real `zbroker start --auth` broker.

Every kind of Python peer (Client, AsyncClient, Worker, Service, Publisher,
Subscriber) and the CLI is refused at its handshake, without a silent wait, when
it has no key, an unknown key, the wrong broker key, or a key whose principal
has no role for that endpoint; with the right key each works. Past the
handshake every message is checked against its principal: calls outside its
grants are `forbidden`, tasks belong to who enqueued them, the event bus keeps
each publisher and subscriber within its topics (and `task.`/`worker.` for the
broker), and raw 7/MDP peers get the same rules. One broker serves the module;
each test uses services and topics of its own, so none depends on another.
"""

from __future__ import annotations

import ast
import asyncio
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
import zmq
import zmq.auth

from tests.conftest import (
    ROOT,
    AuthKeys,
    BrokerProcess,
    new_broker,
    wait_until,
    write_auth,
)
from tests.integration.running import HEARTBEAT_S, open_client, start_worker
from zbroker.client import (
    AsyncClient,
    AuthenticationFailed,
    Client,
    Credentials,
    Forbidden,
    Publisher,
    Service,
    Subscriber,
    Task,
    TaskState,
    Worker,
)
from zbroker.client.errors import TaskNotFound
from zbroker.protocol import ext, mdp, zbc
from zbroker.protocol.events import Event

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Ctx = zmq.Context[zmq.Socket[bytes]]

# Who the module's broker knows. Services and topics are globs and prefixes that
# each test picks names within (or, for refusals, outside).
PRINCIPALS: dict[str, dict[str, list[str]]] = {
    "alice": {"roles": ["client"], "services": ["echo.*", "svc.*"]},
    "bob": {"roles": ["client"], "services": ["echo.*"]},
    "wrk": {"roles": ["worker"], "services": ["echo.*"]},
    # What a Service needs: its queues, its topics and `service.` (heartbeats, probes).
    "svc": {
        "roles": ["worker", "publisher", "subscriber"],
        "services": ["svc.*"],
        "topics": ["service.", "fs."],
    },
    # Its topics name the broker's own (task., worker.): no peer may publish them anyway.
    "pub": {"roles": ["publisher"], "topics": ["fs.", "transcript.", "task.", "worker."]},
    "sub": {"roles": ["subscriber"], "topics": ["fs.", "secret.", "task.done.", "worker."]},
    "observer": {"roles": ["observer"]},
    "admin": {"roles": ["admin"]},
}

# Calls wait this long for an answer; a refusal must come well before.
CALL_TIMEOUT_S = 10.0
QUICK_S = 5.0

TASK_ID = re.compile(r"t([0-9a-f]+)-([0-9a-f]{16})")


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> AuthKeys:
    """The module's auth file and keys, and a key the file does not name (`stranger`)."""
    return write_auth(tmp_path_factory.mktemp("auth"), PRINCIPALS, strangers=["stranger"])


@pytest.fixture(scope="module")
def secured(auth: AuthKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker started with `--auth` for the whole module."""
    broker = new_broker(
        tmp_path_factory.mktemp("broker"),
        0,
        "--auth",
        str(auth.path),
        credentials=auth.credentials("admin"),
    )
    broker.start()
    yield broker
    broker.stop()


# ------------------------------------------------------------------ helpers


def raised_by(call: Callable[[], object], within_s: float = QUICK_S) -> BaseException:
    """What `call` raised (run in a thread of its own); the test fails if it returned,
    or was still waiting after `within_s`: a silent hang."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="raised-by", daemon=True)
    thread.start()
    thread.join(within_s)
    assert outcome, f"still waiting after {within_s}s instead of raising"
    error = outcome[0]
    assert error is not None, "returned instead of raising"
    return error


def curve_dealer(
    ctx: Ctx, endpoint: str, credentials: Credentials, routing_id: bytes | None = None
) -> zmq.Socket[bytes]:
    """A raw DEALER that is a CURVE client of the broker (optionally with the routing
    id it asks the broker's ROUTER to know it by)."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    credentials.apply(sock)
    if routing_id is not None:
        sock.routing_id = routing_id
    sock.connect(endpoint)
    return sock


def recv(sock: zmq.Socket[bytes], timeout_s: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), f"nothing received within {timeout_s}s"
    return sock.recv_multipart()


def next_request(worker: zmq.Socket[bytes]) -> mdp.BrokerRequest:
    """The next REQUEST a raw MDP worker receives (heartbeats skipped)."""
    while True:
        message = mdp.decode_from_broker_to_worker(recv(worker))
        if isinstance(message, mdp.BrokerRequest):
            return message


def forbidden(admin: Client) -> int:
    """STATS `forbidden`: the messages the broker refused to their senders' roles."""
    return int(admin.broker_stats()["stats"]["forbidden"])


def counted_after(admin: Client, before: int) -> Callable[[], bool]:
    """True once STATS `forbidden` has gone past `before`."""
    return lambda: forbidden(admin) > before


def subscribed(broker: BrokerProcess) -> list[str]:
    """The prefixes the broker last said its lifecycle events are wanted for."""
    lines = [line for line in broker.log().splitlines() if "subscribers want" in line]
    if not lines:
        return []
    wanted = ast.literal_eval(lines[-1].split("subscribers want ", 1)[1])
    assert isinstance(wanted, list)
    return sorted(str(prefix) for prefix in wanted)


def receive_until(sub: Subscriber, last: Callable[[Event], bool]) -> list[Event]:
    """Every event `sub` receives, up to and including the first for which `last`."""
    events: list[Event] = []
    while True:
        event = sub.recv(timeout_s=5)
        assert event is not None, f"the awaited event never came; got {[e.type for e in events]}"
        events.append(event)
        if last(event):
            return events


def of_type(type: str) -> Callable[[Event], bool]:
    return lambda event: event.type == type


def synced(pub: Publisher, *subs: Subscriber) -> None:
    """Publish `fs.sync.<nonce>` until every subscriber has received it: their
    subscriptions are then in place, and what `pub` publishes next reaches them after
    anything it published before (one publisher's events keep their order)."""
    topic = f"fs.sync.{secrets.token_hex(4)}"
    waiting = list(subs)
    deadline = time.monotonic() + 10
    while waiting:
        assert time.monotonic() < deadline, f"{topic} never reached every subscriber"
        pub.publish(topic, None)
        for sub in list(waiting):
            event = sub.recv(timeout_s=0.05)
            while event is not None and event.type != topic:
                event = sub.recv(timeout_s=0)
            if event is not None:
                waiting.remove(sub)


def upper(task: Task) -> bytes:
    return task.payload.upper()


def zbroker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zbroker", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


# ------------------------------------------ handshakes: every peer, every refusal

Use = Callable[[BrokerProcess, Credentials | None], object]


def use_client(broker: BrokerProcess, credentials: Credentials | None) -> object:
    with Client(
        broker.endpoint, timeout_s=CALL_TIMEOUT_S, retries=0, credentials=credentials
    ) as client:
        return client.enqueue("echo.matrix", b"x")


def use_async_client(broker: BrokerProcess, credentials: Credentials | None) -> object:
    async def enqueue() -> str:
        async with AsyncClient(
            broker.endpoint, timeout_s=CALL_TIMEOUT_S, retries=0, credentials=credentials
        ) as client:
            return await client.enqueue("echo.matrix", b"x")

    return asyncio.run(enqueue())


def use_worker(broker: BrokerProcess, credentials: Credentials | None) -> object:
    Worker(
        broker.endpoint,
        "echo.matrix",
        upper,
        heartbeat_interval_s=HEARTBEAT_S,
        credentials=credentials,
    ).run()
    return None


def use_service(broker: BrokerProcess, credentials: Credentials | None) -> object:
    service = Service(
        "svc.matrix",
        endpoint=broker.endpoint,
        events_in=broker.events_in,
        events_out=broker.events_out,
        heartbeat_s=None,
        credentials=credentials,
    )
    service.task("svc.matrix")(upper)
    service.on("fs.matrix")(lambda event: None)
    service.run()
    return None


def use_publisher(broker: BrokerProcess, credentials: Credentials | None) -> object:
    with Publisher(broker.events_in, credentials=credentials) as pub:
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while time.monotonic() < deadline:
            pub.publish("fs.matrix", None)  # raises once the handshake is refused
            time.sleep(0.01)
    return None


def use_subscriber(broker: BrokerProcess, credentials: Credentials | None) -> object:
    with Subscriber(broker.events_out, "fs.matrix", credentials=credentials) as sub:
        return sub.recv(timeout_s=CALL_TIMEOUT_S)


# Each peer, and a principal the broker knows that has no role for its endpoint:
# a publisher on the ROUTER, a client on the event endpoints.
PEERS: dict[str, tuple[Use, str]] = {
    "Client": (use_client, "pub"),
    "AsyncClient": (use_async_client, "pub"),
    "Worker": (use_worker, "pub"),
    "Service": (use_service, "pub"),
    "Publisher": (use_publisher, "alice"),
    "Subscriber": (use_subscriber, "alice"),
}
REFUSALS = ("no key", "unknown key", "wrong broker key", "no role for the endpoint")


def keys_for(auth: AuthKeys, refusal: str, without_role: str) -> Credentials | None:
    if refusal == "no key":
        return None
    if refusal == "unknown key":
        return auth.credentials("stranger")
    if refusal == "wrong broker key":
        # An admin's own keys, which every endpoint would admit, but another server key.
        return Credentials.load(auth.keys / "stranger.key", auth.secret("admin"))
    return auth.credentials(without_role)


def cli_keys(auth: AuthKeys, refusal: str, without_role: str) -> list[str]:
    if refusal == "no key":
        return []
    if refusal == "unknown key":
        return auth.cli_args("stranger")
    if refusal == "wrong broker key":
        return ["--server-key", str(auth.keys / "stranger.key"), "--key", str(auth.secret("admin"))]
    return auth.cli_args(without_role)


@pytest.mark.parametrize("refusal", REFUSALS)
@pytest.mark.parametrize("peer", list(PEERS))
def test_a_refused_handshake_raises_authentication_failed_at_once(
    secured: BrokerProcess, auth: AuthKeys, peer: str, refusal: str
) -> None:
    # Given a peer whose keys the broker does not admit on its endpoint
    use, without_role = PEERS[peer]
    credentials = keys_for(auth, refusal, without_role)
    # When it makes its first call (which would wait up to 10 s for an answer)
    started = time.monotonic()
    error = raised_by(lambda: use(secured, credentials))
    # Then it raises AuthenticationFailed, long before that
    assert isinstance(error, AuthenticationFailed), repr(error)
    assert time.monotonic() - started < QUICK_S


@pytest.mark.parametrize("refusal", REFUSALS)
def test_the_cli_says_the_handshake_was_refused(
    secured: BrokerProcess, auth: AuthKeys, refusal: str
) -> None:
    # Given the CLI with keys the ROUTER does not admit (a publisher has no role there)
    keys = cli_keys(auth, refusal, "pub")
    # When it asks for the queues, allowing 10 s for an answer
    started = time.monotonic()
    result = zbroker(*keys, "queues", "--endpoint", secured.endpoint, "--timeout", "10")
    # Then it fails at once with one line that says so, not a traceback
    assert time.monotonic() - started < QUICK_S
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("zbroker: ") and "authentication with" in line


@pytest.mark.parametrize("refusal", REFUSALS)
def test_top_says_the_handshake_was_refused(
    secured: BrokerProcess, auth: AuthKeys, refusal: str
) -> None:
    # Given `zbroker top` with keys the ROUTER does not admit, refreshing every 10 s
    keys = cli_keys(auth, refusal, "pub")
    # When it draws one frame
    started = time.monotonic()
    result = zbroker(*keys, "top", "--once", "--interval", "10", "--endpoint", secured.endpoint)
    # Then it ends at once with one line saying authentication failed (a broker that
    # is away is shown until it is back; refused keys never mend by waiting)
    assert time.monotonic() - started < QUICK_S
    assert "Traceback" not in result.stderr + result.stdout, result
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"zbroker: top: authentication with {secured.endpoint}"), line


# ----------------------------------------------------------- the right keys


def test_a_task_goes_round_trip_with_the_right_keys(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given a worker and a client, each with its own principal's key
    start_worker(stack, secured, "echo.roundtrip", upper, credentials=auth.credentials("wrk"))
    client = open_client(stack, secured, credentials=auth.credentials("alice"))
    # When the client enqueues a task, and makes a request
    task_id = client.enqueue("echo.roundtrip", b"hello")
    # Then the worker serves both and the client gets the results
    assert client.result(task_id, timeout_s=10) == b"HELLO"
    assert client.request("echo.roundtrip", b"again", timeout_s=10) == b"AGAIN"
    assert client.status(task_id).owner == "alice"


def test_an_async_client_goes_round_trip_with_the_right_keys(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given a worker with its key
    start_worker(stack, secured, "echo.async", upper, credentials=auth.credentials("wrk"))

    # When an AsyncClient with alice's key enqueues and waits for the result
    async def round_trip() -> bytes:
        async with AsyncClient(secured.endpoint, credentials=auth.credentials("alice")) as client:
            task_id = await client.enqueue("echo.async", b"hello")
            return await client.result(task_id, timeout_s=10)

    # Then it gets it
    assert asyncio.run(round_trip()) == b"HELLO"


def test_a_service_serves_and_follows_topics_with_its_keys(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given a Service whose one principal has the worker, publisher and subscriber roles
    heard: list[Event] = []
    service = Service(
        "svc.upper",
        endpoint=secured.endpoint,
        events_in=secured.events_in,
        events_out=secured.events_out,
        heartbeat_s=None,
        credentials=auth.credentials("svc"),
    )
    service.task("svc.upper")(upper)
    service.on("fs.svc")(heard.append)
    stack.enter_context(service)
    # When it is ready (its subscriptions are in place: it heard its own probe)
    assert service.wait_ready(10), service.error
    # Then it serves its queue to a client with its own key
    client = open_client(stack, secured, credentials=auth.credentials("alice"))
    assert client.request("svc.upper", b"hi", timeout_s=10) == b"HI"
    # And it receives what a publisher publishes on its topic
    pub = stack.enter_context(Publisher(secured.events_in, credentials=auth.credentials("pub")))

    def heard_it() -> bool:
        pub.publish("fs.svc.created", {"path": "a.txt"})
        return bool(heard)

    wait_until(heard_it, timeout_s=10, step_s=0.05)
    assert heard[0].payload == {"path": "a.txt"}


def test_a_publisher_reaches_a_subscriber_with_their_keys(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given a subscriber and a publisher, each with its key
    sub = stack.enter_context(
        Subscriber(secured.events_out, "fs.", credentials=auth.credentials("sub"))
    )
    pub = stack.enter_context(
        Publisher(secured.events_in, source="watcher", credentials=auth.credentials("pub"))
    )
    synced(pub, sub)
    # When the publisher publishes on its topic
    pub.publish("fs.changed", {"path": "b.txt"})
    # Then the subscriber receives it
    [event] = receive_until(sub, of_type("fs.changed"))
    assert event.source == "watcher" and event.payload == {"path": "b.txt"}


def test_the_cli_and_top_work_with_an_observers_keys(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given a queue with a task in it
    client = open_client(stack, secured, credentials=auth.credentials("alice"))
    client.enqueue("echo.cli", b"x")
    # When an observer lists the queues and draws top (its broker key given as a
    # file, and as the Z85 text the broker's log prints)
    server_z85 = zmq.auth.load_certificate(auth.server_key)[0].decode()
    as_text = ["--server-key", server_z85, "--key", str(auth.secret("observer"))]
    queues = zbroker(*auth.cli_args("observer"), "queues", "--json", "--endpoint", secured.endpoint)
    queues_z85 = zbroker(*as_text, "queues", "--json", "--endpoint", secured.endpoint)
    top = zbroker(*auth.cli_args("observer"), "top", "--once", "--endpoint", secured.endpoint)
    # Then each shows the queue
    for result in (queues, queues_z85):
        assert result.returncode == 0, result.stderr
        assert '"service": "echo.cli"' in result.stdout
    assert top.returncode == 0 and "zbroker top" in top.stdout and "echo.cli" in top.stdout


def test_the_cli_and_top_are_forbidden_the_figures_to_a_client(
    secured: BrokerProcess, auth: AuthKeys
) -> None:
    # When a client (not an observer) lists the queues, and draws top
    queues = zbroker(*auth.cli_args("alice"), "queues", "--endpoint", secured.endpoint)
    top = zbroker(*auth.cli_args("alice"), "top", "--once", "--endpoint", secured.endpoint)
    # Then both say the broker refused: forbidden
    assert queues.returncode == 1 and "Traceback" not in queues.stderr
    [line] = queues.stderr.splitlines()
    assert line.startswith("zbroker: ") and "forbidden" in line
    assert top.returncode == 1 and "forbidden" in top.stderr


# --------------------------------------------------- roles past the handshake

FIGURES: dict[str, Callable[[Client], object]] = {
    "queues": lambda c: c.queues(),
    "workers": lambda c: c.workers(),
    "stats": lambda c: c.broker_stats(),
}
CONTROLS: dict[str, Callable[[Client], object]] = {
    "purge": lambda c: c.purge("echo.controls"),
    "pause": lambda c: c.pause("echo.controls"),
    "resume": lambda c: c.resume("echo.controls"),
    "limit": lambda c: c.limit("echo.controls", 1),
    "drain": lambda c: c.drain("0011223344"),
    "dead letters": lambda c: c.dead_letters("echo.controls"),
    "redrive": lambda c: c.redrive("echo.controls"),
    "drop dead letters": lambda c: c.drop_dead_letters("echo.controls"),
    "tasks": lambda c: c.tasks("echo.controls", "ready"),
}


@pytest.mark.parametrize(
    ("who", "call"),
    [("alice", name) for name in [*FIGURES, *CONTROLS]]
    + [("observer", name) for name in CONTROLS]
    + [("wrk", name) for name in [*FIGURES, *CONTROLS]],
)
def test_calls_outside_a_principals_roles_are_forbidden(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, who: str, call: str
) -> None:
    # Given a principal without the observer or admin role the call needs
    client = open_client(stack, secured, credentials=auth.credentials(who))
    # When it makes the call
    with pytest.raises(Forbidden) as refused:
        {**FIGURES, **CONTROLS}[call](client)
    # Then the broker refused it with `forbidden`
    assert refused.value.code == "forbidden"


def test_an_observer_reads_the_figures(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given an observer and a queue with a task
    open_client(stack, secured, credentials=auth.credentials("alice")).enqueue("echo.seen", b"x")
    observer = open_client(stack, secured, credentials=auth.credentials("observer"))
    # When it reads the figures, Then it gets them
    assert any(row["service"] == "echo.seen" for row in observer.queues())
    assert isinstance(observer.workers(), list)
    assert observer.broker_stats()["stats"]["tasks_enqueued"] >= 1


def test_an_admin_may_make_every_control_call(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given a queue of alice's tasks
    alice = open_client(stack, secured, credentials=auth.credentials("alice"))
    alice.enqueue_many("echo.controls", [b"a", b"b"])
    admin = open_client(stack, secured, credentials=auth.credentials("admin"))
    # When an admin makes every control call, Then none is forbidden
    for name, call in CONTROLS.items():
        if name == "drain":
            with pytest.raises(TaskNotFound):  # no such worker: past the guard
                call(admin)
        elif name != "purge":
            call(admin)
    # And purging takes alice's tasks
    assert admin.purge("echo.controls") >= 2


@pytest.mark.parametrize(
    ("who", "service"),
    [("alice", "other.x"), ("bob", "svc.x"), ("wrk", "echo.x"), ("observer", "echo.x")],
)
def test_enqueue_and_request_outside_the_services_globs_are_forbidden(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, who: str, service: str
) -> None:
    # Given a principal whose client grants do not name the service
    client = open_client(stack, secured, credentials=auth.credentials(who))
    # When it enqueues or requests to it, Then each call is forbidden
    for call in (
        lambda: client.enqueue(service, b"x"),
        lambda: client.enqueue_many(service, [b"x", b"y"]),
        lambda: client.request(service, b"x", timeout_s=5),
    ):
        with pytest.raises(Forbidden):
            call()

    # And so from an AsyncClient
    async def enqueue() -> str:
        async with AsyncClient(secured.endpoint, credentials=auth.credentials(who)) as aclient:
            return await aclient.enqueue(service, b"x")

    with pytest.raises(Forbidden):
        asyncio.run(enqueue())


@pytest.mark.parametrize(("who", "service"), [("wrk", "other.work"), ("alice", "echo.work")])
def test_a_worker_of_a_service_it_may_not_serve_stops_with_forbidden(
    secured: BrokerProcess, auth: AuthKeys, who: str, service: str
) -> None:
    # Given a worker whose principal may not serve the service (not in its globs; not
    # a worker at all)
    worker = Worker(
        secured.endpoint,
        service,
        upper,
        heartbeat_interval_s=HEARTBEAT_S,
        credentials=auth.credentials(who),
    )
    # When it runs, Then run() raises Forbidden at once instead of registering again
    error = raised_by(worker.run)
    assert isinstance(error, Forbidden), repr(error)
    assert service in str(error)


def test_a_service_with_a_queue_it_may_not_serve_stops_with_forbidden(
    secured: BrokerProcess, auth: AuthKeys
) -> None:
    # Given a Service whose principal's globs do not name one of its queues
    service = Service(
        "svc.mixed",
        endpoint=secured.endpoint,
        events_in=secured.events_in,
        events_out=secured.events_out,
        heartbeat_s=None,
        credentials=auth.credentials("svc"),
    )
    service.task("svc.mixed")(upper)
    service.task("other.mixed")(upper)
    # When it runs, Then run() raises Forbidden itself: its worker of that queue was
    # refused, which registering again cannot mend
    error = raised_by(service.run)
    assert isinstance(error, Forbidden), repr(error)
    assert "may not serve 'other.mixed'" in str(error)


# ------------------------------------------------------------- task ownership


def test_a_task_belongs_to_the_principal_that_enqueued_it(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given two tasks alice enqueued (nobody serves the queue: they wait)
    alice = open_client(stack, secured, credentials=auth.credentials("alice"))
    bob = open_client(stack, secured, credentials=auth.credentials("bob"))
    admin = open_client(stack, secured, credentials=auth.credentials("admin"))
    first, second = alice.enqueue_many("echo.owned", [b"1", b"2"])
    # Then their ids cannot be guessed from one another: t<seq>-<64 random bits>
    parts = [TASK_ID.fullmatch(task_id) for task_id in (first, second)]
    assert parts[0] is not None and parts[1] is not None, (first, second)
    assert parts[0][2] != parts[1][2]
    # When bob asks for the status or result of alice's task, or cancels it
    for call in (
        lambda: bob.status(first),
        lambda: bob.result(first, timeout_s=0),
        lambda: bob.cancel(first),
    ):
        # Then each call is forbidden
        with pytest.raises(Forbidden) as refused:
            call()
        assert refused.value.code == "forbidden"
    # And the task is untouched: alice reads it, an admin reads and cancels it
    assert alice.status(first).state is TaskState.READY
    status = admin.status(first)
    assert status.state is TaskState.READY and status.owner == "alice"
    assert admin.cancel(second) is TaskState.READY  # the state it was in
    assert alice.status(second).state is TaskState.CANCELLED


# ------------------------------------------------------------ the event bus


def test_a_publisher_publishes_only_within_its_topics(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack
) -> None:
    # Given a subscriber of fs. and secret. (both within its topics), a publisher
    # whose topics do not include secret., and an admin publisher
    sub = stack.enter_context(
        Subscriber(secured.events_out, "fs.", "secret.", credentials=auth.credentials("sub"))
    )
    pub = stack.enter_context(
        Publisher(secured.events_in, source="pub", credentials=auth.credentials("pub"))
    )
    admin = stack.enter_context(
        Publisher(secured.events_in, source="admin", credentials=auth.credentials("admin"))
    )
    synced(pub, sub)
    synced(admin, sub)
    # When the publisher publishes on secret., then on its own fs.
    pub.publish("secret.plans", {"from": "pub"})
    pub.publish("fs.after", None)
    # Then only fs.after arrives
    events = receive_until(sub, of_type("fs.after"))
    assert [e.type for e in events if not e.type.startswith("fs.sync.")] == ["fs.after"]
    # while an admin's event on secret. does: the topic is not closed to everyone
    admin.publish("secret.allowed", None)
    assert receive_until(sub, of_type("secret.allowed"))[-1].source == "admin"


@pytest.mark.parametrize("publisher", ["pub", "admin"])
def test_no_peer_publishes_the_brokers_lifecycle_events(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, publisher: str
) -> None:
    # Given a subscriber of the broker's task.done. and worker. events (and fs.)
    sub = stack.enter_context(
        Subscriber(
            secured.events_out,
            "task.done.",
            "worker.",
            "fs.",
            credentials=auth.credentials("sub"),
        )
    )
    wait_until(lambda: {"task.done.", "worker."} <= set(subscribed(secured)), timeout_s=10)
    forger = stack.enter_context(
        Publisher(secured.events_in, source="mallory", credentials=auth.credentials(publisher))
    )
    synced(forger, sub)
    # When a peer (one whose topics name task. and worker., or an admin) publishes them
    forger.publish("task.done.echo.events", {"id": "t1-0000000000000000", "result": "forged"})
    forger.publish("worker.ready", {"service": "echo.events"})
    forger.publish("fs.forged", None)
    # Then none of them reaches the subscriber
    forged = receive_until(sub, of_type("fs.forged"))
    assert [e.type for e in forged if e.source == "mallory" and not e.type.startswith("fs.")] == []
    # While the broker's own events for a task a worker serves still do, from `zbroker`
    start_worker(stack, secured, "echo.events", upper, credentials=auth.credentials("wrk"))
    client = open_client(stack, secured, credentials=auth.credentials("alice"))
    task_id = client.enqueue("echo.events", b"x")
    assert client.result(task_id, timeout_s=10) == b"X"
    events = receive_until(
        sub, lambda e: e.type == "task.done.echo.events" and e.payload.get("id") == task_id
    )
    assert events[-1].source == "zbroker"
    assert all(e.source == "zbroker" for e in events if not e.type.startswith("fs."))


@pytest.mark.parametrize("outside", ["transcript.", ""])
def test_a_subscription_outside_the_subscribers_topics_receives_nothing(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, outside: str
) -> None:
    # Given a subscriber that asks for a prefix outside its topics (and for fs.), and
    # an admin that asks for the same
    sub = stack.enter_context(
        Subscriber(secured.events_out, outside, "fs.", credentials=auth.credentials("sub"))
    )
    watcher = stack.enter_context(
        Subscriber(secured.events_out, outside, "fs.", credentials=auth.credentials("admin"))
    )
    pub = stack.enter_context(Publisher(secured.events_in, credentials=auth.credentials("pub")))
    synced(pub, sub, watcher)
    # When an event is published there
    pub.publish("transcript.ready", {"text": "private"})
    pub.publish("fs.end", None)
    # Then the admin receives it and the subscriber does not
    assert "transcript.ready" in [e.type for e in receive_until(watcher, of_type("fs.end"))]
    assert "transcript.ready" not in [e.type for e in receive_until(sub, of_type("fs.end"))]


@pytest.mark.parametrize("with_auth", [False, True], ids=["without auth", "with auth"])
def test_a_subscriber_that_leaves_takes_its_subscriptions_with_it(
    broker_factory: Callable[..., BrokerProcess], auth: AuthKeys, with_auth: bool
) -> None:
    # Given a broker (with or without --auth) and a subscriber of task.done.
    if with_auth:
        broker = broker_factory("--auth", str(auth.path), credentials=auth.credentials("admin"))
        credentials: Credentials | None = auth.credentials("sub")
    else:
        broker = broker_factory()
        credentials = None
    sub = Subscriber(broker.events_out, "task.done.", credentials=credentials)
    sub.recv(timeout_s=0)
    wait_until(lambda: subscribed(broker) == ["task.done."], timeout_s=10)
    # When the subscriber closes its connection
    sub.close()
    # Then the broker stops building those events: nobody wants them
    wait_until(lambda: subscribed(broker) == [], timeout_s=5)


# ------------------------------------------------------------------- raw 7/MDP


def test_a_raw_mdp_request_outside_the_globs_is_dropped(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, zmq_ctx: Ctx
) -> None:
    # Given a worker of other.mdp (an admin may serve any service) and one of echo.mdp
    served: list[bytes] = []

    def record(task: Task) -> bytes:
        served.append(task.payload)
        return b"leaked"

    start_worker(stack, secured, "other.mdp", record, credentials=auth.credentials("admin"))
    start_worker(stack, secured, "echo.mdp", upper, credentials=auth.credentials("wrk"))
    client = curve_dealer(zmq_ctx, secured.endpoint, auth.credentials("alice"))
    # When alice's raw MDP client asks for other.mdp (outside her globs), then echo.mdp
    client.send_multipart(mdp.client_request(b"other.mdp", [b"secret"]))
    client.send_multipart(mdp.client_request(b"echo.mdp", [b"hello"]))
    # Then echo.mdp answers, and the first request was dropped: no reply, never served
    assert mdp.decode_reply_to_client(recv(client)) == (b"echo.mdp", (b"HELLO",))
    assert not client.poll(300)
    assert served == []


@pytest.mark.parametrize("who", ["wrk", "alice"])
def test_a_raw_mdp_worker_for_a_service_it_may_not_serve_is_disconnected(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, zmq_ctx: Ctx, who: str
) -> None:
    # Given a raw MDP worker whose principal may not serve other.raw (a worker of other
    # services; a client)
    worker = curve_dealer(zmq_ctx, secured.endpoint, auth.credentials(who))
    # When it sends READY for it
    worker.send_multipart(mdp.worker_ready(b"other.raw"))
    # Then the broker answers DISCONNECT, and nobody serves other.raw
    assert isinstance(mdp.decode_from_broker_to_worker(recv(worker)), mdp.BrokerDisconnect)
    admin = open_client(stack, secured, credentials=auth.credentials("admin"))
    assert admin.mmi_service("other.raw") is False


# ------------------------------------------ a connection's routing id and its principal


def test_a_connection_that_chose_its_routing_id_is_not_served(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, zmq_ctx: Ctx
) -> None:
    # A principal could otherwise wait for another's worker (or client) with a chosen
    # routing id to disconnect, connect under that id, and receive what was sent to
    # it before the broker noticed. With --auth only ids the ROUTER gives are served,
    # and those are never revealed, so no connection can be taken over.
    admin = open_client(stack, secured, credentials=auth.credentials("admin"))
    # Given a raw MDP worker of wrk's that set ZMQ_ROUTING_ID
    mdp_worker = curve_dealer(zmq_ctx, secured.endpoint, auth.credentials("wrk"), b"echo-worker-1")
    # When it sends READY, then it gets DISCONNECT and nobody serves the service
    mdp_worker.send_multipart(mdp.worker_ready(b"echo.taken"))
    assert isinstance(mdp.decode_from_broker_to_worker(recv(mdp_worker)), mdp.BrokerDisconnect)
    assert admin.mmi_service("echo.taken") is False
    # And a ZBW01 worker that did the same hears why
    zbw_worker = curve_dealer(zmq_ctx, secured.endpoint, auth.credentials("wrk"), b"echo-worker-2")
    zbw_worker.send_multipart(ext.ready("echo.taken", 1))
    bye = recv(zbw_worker)
    assert bye[1:3] == [ext.ZBW01, ext.DISCONNECT]
    assert ext.unpack_meta(bye[3])["reason"].startswith("forbidden: this connection chose")
    # And a ZBC01 client that chose its id gets forbidden, with the reason
    client = curve_dealer(zmq_ctx, secured.endpoint, auth.credentials("alice"), b"alice-1")
    client.send_multipart(zbc.enqueue(1, "echo", [[b"x"]]))
    answer = zbc.decode_answer(recv(client))
    assert (answer.ok, answer.meta["code"]) == (False, "forbidden")
    assert "routing id" in answer.meta["message"]


# --------------------------------------------------------------------- STATS


def test_every_refusal_is_counted_in_stats(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, zmq_ctx: Ctx
) -> None:
    admin = open_client(stack, secured, credentials=auth.credentials("admin"))
    alice = open_client(stack, secured, credentials=auth.credentials("alice"))
    before = forbidden(admin)
    # When alice makes a call outside her grants, a raw MDP request outside her
    # globs, and a worker READY (she is no worker)
    with pytest.raises(Forbidden):
        alice.purge("echo.counted")
    raw = curve_dealer(zmq_ctx, secured.endpoint, auth.credentials("alice"))
    raw.send_multipart(mdp.client_request(b"other.counted", [b"x"]))
    worker = curve_dealer(zmq_ctx, secured.endpoint, auth.credentials("alice"))
    worker.send_multipart(mdp.worker_ready(b"echo.counted"))
    assert isinstance(mdp.decode_from_broker_to_worker(recv(worker)), mdp.BrokerDisconnect)
    # Then STATS counts each refusal under `forbidden`
    wait_until(lambda: forbidden(admin) == before + 3, timeout_s=5)


def test_stats_and_metrics_show_what_was_refused_by_kind(
    secured: BrokerProcess, auth: AuthKeys, stack: ExitStack, zmq_ctx: Ctx
) -> None:
    admin = open_client(stack, secured, credentials=auth.credentials("admin"))

    def refused() -> dict[str, int]:
        counts: dict[str, int] = admin.broker_stats()["auth"]["refused"]
        return counts

    before = refused()
    # When a stranger's handshake is refused and alice makes a call outside her grants
    stranger = Client(secured.endpoint, timeout_s=10, credentials=auth.credentials("stranger"))
    stack.callback(stranger.close)
    with pytest.raises(AuthenticationFailed):
        stranger.queues()
    with pytest.raises(Forbidden):
        open_client(stack, secured, credentials=auth.credentials("alice")).purge("echo.kinds")
    # Then STATS `auth` counts each under its kind, beside the handshakes admitted
    kind = "handshake: unknown key"
    wait_until(lambda: refused().get(kind, 0) > before.get(kind, 0), timeout_s=5)
    assert refused()["call"] > before.get("call", 0)
    assert admin.broker_stats()["auth"]["admitted"] >= 2
