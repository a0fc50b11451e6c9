"""The broker's event loop: moves frames between the ROUTER socket and the core.

Each pass: poll, drain up to a batch of messages into the core, run its timers
when due, commit the journal once (group commit), then send everything the
core queued. Sending only after the commit is what makes a confirmation
durable. This is the only module that talks to the ROUTER socket; it holds no
broker state of its own.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections import deque
from types import FrameType
from typing import Any

import msgpack
import zmq
import zmq.backend

from zbroker import __version__, native
from zbroker.config import DEFAULT_JOURNAL_MAX_BYTES, BrokerConfig
from zbroker.core import Broker
from zbroker.core.stopping import Drain, halt_deliveries
from zbroker.journal import Fenced, Journal, JournalError, open_journal
from zbroker.protocol import zbc
from zbroker.protocol.access import DOMAIN_ROUTER
from zbroker.protocol.events import encode_runs
from zbroker.runtime.auth import Auth, ZapHandler, load_auth, serve_curve, user_id
from zbroker.runtime.connections import WAITING_CALLS, Connections, raise_file_limit
from zbroker.runtime.errors import BindError
from zbroker.runtime.metrics import MetricsServer
from zbroker.runtime.proxy import EventProxy
from zbroker.runtime.routing_ids import seed_routing_ids

log = logging.getLogger("zbroker.runtime")

# Messages read per pass before timers and sends get their turn.
RECV_BATCH = 512
# A loop that has skipped the poll this many passes in a row (it always had a full
# batch) looks at its other sockets anyway: signals, subscriptions, connections.
BUSY_LOOK_EVERY = 64
_ZBC01 = zbc.ZBC01
# A frame over this many times --max-message-bytes is never read (see frame_cap).
FRAME_CAP_FACTOR = 4


def _text_prefix(prefix: bytes) -> str:
    """A subscription's byte prefix as the text prefix the core matches topics with:
    its longest part that is whole UTF-8. A prefix that ends inside a character then
    still covers every topic that libzmq's byte match lets through (the core may build
    a few events nobody gets; it never misses one somebody wants)."""
    try:
        return prefix.decode()
    except UnicodeDecodeError as exc:
        return prefix[: exc.start].decode()


def frame_cap(max_message_bytes: int) -> int:
    """The largest frame a peer may send (ZMQ_MAXMSGSIZE, which libzmq checks per frame
    before reading it: a larger one disconnects its sender). Messages between the cap
    and this are still read, and refused with a too_large the sender can read."""
    return FRAME_CAP_FACTOR * max_message_bytes


# The hot path calls pyzmq's backend methods with plain int flags: the friendly
# wrappers (send_multipart, recv_multipart, enum flags) cost 3-5x more per frame,
# which is most of a broker hop's CPU (see bench/results/HISTORY.md, "what was optimized").
_backend_send = zmq.backend.Socket.send
_backend_recv = zmq.backend.Socket.recv
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
POLLIN = int(zmq.POLLIN)


def memory_budget(config: BrokerConfig) -> int:
    """The most a journal in PostgreSQL may hold in memory (its copy of the journal):
    --journal-max-mib when given, else a quarter of the machine's memory."""
    if config.journal_max_bytes != DEFAULT_JOURNAL_MAX_BYTES:
        return config.journal_max_bytes
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return config.journal_max_bytes
    return max(1 << 20, physical // 4)


def _open_journal(config: BrokerConfig, lease: Any) -> Journal:
    options: dict[str, int] = {}
    if config.journal is not None:
        budget = memory_budget(config)
        log.info("journal in PostgreSQL: its copy in memory holds at most %d MiB", budget >> 20)
        options = {"max_map_size": budget}
    elif config.durability.value != "memory":
        options = {
            "max_map_size": config.journal_max_bytes,
            "map_size": min(256 << 20, config.journal_max_bytes),
        }
    return open_journal(
        config.durability, config.data_dir, url=config.journal, lease=lease, **options
    )


def _log_journal_failure(exc: JournalError) -> None:
    if isinstance(exc, Fenced):
        log.error("stepping down, serving nothing more: %s", exc)
    else:
        log.critical("journal failure, stopping the broker: %s", exc)


def journal_place(config: BrokerConfig) -> str:
    """Where the journal is, for the log: a directory, a database (no password), memory."""
    if config.journal is not None:
        return redact_url(config.journal)
    return str(config.data_dir) if config.durability.value != "memory" else "in memory"


def redact_url(url: str) -> str:
    """`url` without the password it may carry."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


class BrokerServer:
    """A running broker: ROUTER socket + event proxy + core. `serve_forever()` blocks."""

    def __init__(
        self,
        config: BrokerConfig,
        ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
        lease: Any = None,
    ):
        """`lease`: with a journal in PostgreSQL (config.journal), the lease this broker
        holds as the active one of its group (zbroker/runtime/lease.py); the journal
        refuses every commit once it is lost, and the loop then stops."""
        self.config = config
        self.lease = lease
        # Read before anything opens: a bad auth file stops the start (AuthFileError).
        self.auth: Auth | None = None if config.auth_file is None else load_auth(config.auth_file)
        self._ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.journal: Journal = _open_journal(config, lease)
        try:
            started = time.monotonic()
            self.core = Broker(
                config.core,
                started,
                self.journal,
                epoch_offset=time.time() - started,
                policy=None if self.auth is None else self.auth.policy,
            )
            self.core.build = {
                "version": __version__,
                "compiled": native.compiled(),
                "core": native.describe(),
            }
            self.journal.commit()  # what recovery changed
        except BaseException:
            self.journal.close()
            raise
        log.info(
            "journal: %s (%s), %d tasks waiting, recovered in %.3fs",
            journal_place(config),
            config.durability.value,
            sum(s.waiting_count for s in self.core.services.values()),
            time.monotonic() - started,
        )
        self._stopping = False
        self.file_limit = raise_file_limit()  # each connection takes a descriptor
        # SIGTERM/SIGINT asked for a drain (runtime/server.py `on_signal`), and the drain.
        self._drain_asked = False
        self._drain: Drain | None = None
        # What passes decided and the store has not made durable yet (a `sync` LMDB
        # store flushes a commit's meta page with the next commit): each pass's
        # messages and events, with the commit count they wait for, oldest first.
        self._unsent: deque[tuple[int, list[list[bytes]], list[Any]]] = deque()
        self._last_commits = 0
        # Before the ROUTER exists: the first id libzmq gives a peer must not be
        # known in advance (zbroker/runtime/routing_ids.py says why).
        seed_routing_ids()
        # Before any endpoint binds: no handshake is ever decided without it.
        self.zap = None if self.auth is None else ZapHandler(self._ctx, self.auth.policy)
        self.core.runtime_figures = self._runtime_figures
        self.router = self._open_router()
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        # For the broker's own clients (the metrics server): no handshake, no port.
        self.inside = f"inproc://zbroker-inside-{id(self)}"
        self.router.bind(self.inside)
        try:
            self.events = EventProxy(
                self._ctx,
                config.events_in,
                config.events_out,
                config.events_hwm,
                frame_cap(config.core.max_message_bytes),
                self.auth,
            )
        except BindError:
            self.router.close()
            self._close_zap()
            self.journal.close()
            raise
        # The broker's own lifecycle events enter the bus here. An XPUB (not a PUB)
        # so that it hears which prefixes subscribers want, and the core builds
        # only those events: with nobody listening, events cost nothing.
        self.lifecycle = self._ctx.socket(zmq.XPUB)
        self.lifecycle.linger = 0
        self.lifecycle.sndhwm = config.events_hwm
        self.lifecycle.connect(self.events.inproc_in)
        self._subscriptions: set[bytes] = set()
        self.events_dropped = 0
        self._packb = msgpack.Packer(use_bin_type=True).pack  # the loop's, for _publish
        self.metrics: MetricsServer | None = None
        if config.metrics_port is not None:
            try:
                self.metrics = MetricsServer(
                    self._ctx,
                    self.inside,
                    config.metrics_host,
                    config.metrics_port,
                    MetricsServer.read_token(config.metrics_token_file),
                )
            except OSError as exc:
                self.lifecycle.close()
                self.events.stop()
                self.router.close()
                self._close_zap()
                self.journal.close()
                raise BindError(
                    f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}"
                ) from exc
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        if lease is not None:
            lease.on_lost = self._wake  # its next commit (which checks the lease) stops it

    def _open_router(self) -> zmq.Socket[bytes]:
        config = self.config
        router = self._ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.sndhwm = config.router_hwm
        router.rcvhwm = config.router_hwm
        # Refuse (instead of silently dropping) sends to peers that are gone or full,
        # so the core learns that a worker's connection is gone.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # The core refuses a message over --max-message-bytes with a readable
        # too_large, but only once it has been read whole. A frame far over the cap
        # is never read: libzmq disconnects its sender (memory stays bounded).
        router.maxmsgsize = frame_cap(config.core.max_message_bytes)
        if self.auth is not None:
            serve_curve(router, self.auth, DOMAIN_ROUTER)
        try:
            router.bind(config.bind)
        except zmq.ZMQError as exc:
            router.close()
            self._close_zap()
            self.journal.close()
            raise BindError(f"cannot bind {config.bind}: {exc}") from exc
        return router

    def stop(self) -> None:
        """Ask the loop to finish its pass and return (safe from signal handlers)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _wake(self, why: object = None) -> None:
        """Wake the loop for a pass (safe from any thread)."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def drain_and_stop(self) -> None:
        """Stop delivering, wait up to --drain-timeout for the results in flight, then
        stop; called again (or with a drain timeout of 0), stop at once. Safe from
        signal handlers."""
        if self._drain_asked or self.config.drain_timeout_s <= 0:
            self.stop()
            return
        self._drain_asked = True
        halt_deliveries(self.core)  # at once: the drain itself begins between two passes
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._drain_asked or self.config.drain_timeout_s <= 0:
                log.info("received %s: shutting down now", name)
            else:
                log.info(
                    "received %s: shutting down, draining for up to %gs (again: stop now)",
                    name,
                    self.config.drain_timeout_s,
                )
            self.drain_and_stop()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def _runtime_figures(self) -> dict[str, Any]:
        """What STATS shows of the runtime: handshakes and refusals, and the lease of a
        broker of a group."""
        figures = self._auth_figures()
        lease = self.lease
        if lease is not None:
            figures["group"] = {
                "role": "active",
                "holder": lease.holder,
                "epoch": lease.epoch,
                "lease_s": lease.term_s,
                "renewals": lease.renewals,
                "journal": journal_place(self.config),
            }
        return figures

    def _auth_figures(self) -> dict[str, Any]:
        """Handshakes admitted, and what the ZAP handler and the event bus refused, by
        kind (`handshake: <reason>`, `publish`, `subscribe`): STATS `auth`."""
        refused: dict[str, int] = {}
        if self.zap is not None:
            for reason, count in list(self.zap.refused.items()):
                refused[f"handshake: {reason}"] = count
        events = getattr(self, "events", None)
        if events is not None:
            refused.update(dict(events.refused))
        return {"admitted": 0 if self.zap is None else self.zap.admitted, "refused": refused}

    def _close_zap(self) -> None:
        if self.zap is not None:
            self.zap.stop()

    _connections: Connections  # made when the loop starts (serve_forever)

    def _start_threads(self) -> None:
        """The ZAP handler, the event proxy and the metrics server, each in its
        thread; say where, and how peers are trusted."""
        if self.zap is not None:
            self.zap.start()
            assert self.auth is not None
            log.info(
                "authentication: CURVE, %d principals from %s; broker public key %s",
                len(self.auth.policy.principals),
                self.auth.path,
                self.auth.public_key.decode(),
            )
        unprotected = self.config.unprotected()
        if unprotected:
            log.warning(
                "INSECURE: serving %s without authentication (--insecure): anyone who"
                " reaches them can read and change every task; see docs/security.md",
                ", ".join(unprotected),
            )
        self.events.start()
        if self.metrics is not None:
            self.metrics.start()
            log.info(
                "metrics: http://%s:%d/metrics and /health",
                self.config.metrics_host,
                self.metrics.port,
            )
        log.info(
            "broker listening on %s (MDP clients and workers; up to %d open files)",
            self.endpoint,
            self.file_limit,
        )
        log.info("events: publishers connect to %s (XSUB)", self.events.events_in)
        log.info("events: subscribers connect to %s (XPUB)", self.events.events_out)

    def serve_forever(self) -> None:
        self._start_threads()
        router = self.router
        poll_items: list[tuple[Any, int]] = [
            (router, POLLIN),
            (self._wake_r, POLLIN),
            (self.lifecycle, POLLIN),
        ]
        connections = self._connections = Connections(router)
        poll_items.append((connections.monitor, POLLIN))
        busy = 0  # passes in a row that skipped the poll
        core = self.core
        receive_many = core.receive_many
        commit = self.journal.commit
        monotonic = time.monotonic
        # One pass's messages (and with --auth each one's sender).
        read = self._read_plain if self.auth is None else self._read_guarded
        try:
            while not self._stopping:
                now = monotonic()
                messages, senders = read()
                received = len(messages)
                if received:
                    # Deliveries are decided once for the whole pass: requests that
                    # came in together go to a worker together (one TASKS).
                    receive_many(messages, now, senders)
                if now >= core.next_tick_at:
                    core.tick(now)
                # One commit for the whole pass, before anything of it is sent; sent
                # once durable (at once, but for `sync`: _confirm).
                commit()
                if core.outbox or core.events or self._unsent:
                    self._confirm(now)
                if self._drain_asked:
                    self._drain_pass(now)
                if received == RECV_BATCH:
                    busy += 1
                    if busy % BUSY_LOOK_EVERY == 0:
                        self._on_side_sockets()
                    continue  # more may be waiting: skip the poll
                busy = 0
                if self._unsent:
                    # More to read now: the next pass's commit flushes this one's
                    # meta page with its own pages. Else flush it before waiting.
                    ready = zmq.zmq_poll(poll_items, 0)
                    if not ready:
                        self._settle(monotonic())
                else:
                    ready = []
                if not ready:
                    timeout_ms = max(0, int((self._wake_at() - monotonic()) * 1000.0) + 1)
                    ready = zmq.zmq_poll(poll_items, timeout_ms)
                if len(ready) > 1 or (ready and ready[0][0] is not router):
                    self._on_side_sockets()
            self._settle(monotonic())  # a stop sends what its last passes decided
        except JournalError as exc:
            # Nothing of this pass was sent; the store holds the last commit, which
            # is what a restart recovers. Stopping is the only safe answer.
            _log_journal_failure(exc)
            core.outbox.clear()
            self._unsent.clear()
            raise
        finally:
            connections.close()
            self._close()

    def _read_plain(self) -> tuple[list[list[bytes]], None]:
        """The pass's messages: what is already queued, without polling (poll, a
        system call, only once the socket is empty, so a busy broker polls rarely)."""
        router = self.router
        recv_frame = _backend_recv
        note = self._connections.note
        messages: list[list[bytes]] = []
        while len(messages) < RECV_BATCH:
            try:
                frame = recv_frame(router, NOBLOCK, False)
            except zmq.Again:
                break
            frames = [frame.bytes]
            while frame.more:
                frame = recv_frame(router, NOBLOCK, False)
                frames.append(frame.bytes)
            messages.append(frames)
            if len(frames) > 3 and frames[3] in WAITING_CALLS and frames[2] == _ZBC01:
                note(frame, frames[0])
        return messages, None

    def _read_guarded(self) -> tuple[list[list[bytes]], list[str | None]]:
        """The pass's messages on a broker with --auth, and each one's sender: the
        principal its connection authenticated as (the ZAP User-Id, which libzmq
        attaches to every frame a peer sends; the routing id frame is the ROUTER's)."""
        router = self.router
        messages: list[list[bytes]] = []
        senders: list[str | None] = []
        while len(messages) < RECV_BATCH:
            try:
                frame = _backend_recv(router, NOBLOCK, False)
            except zmq.Again:
                break
            frames = [frame.bytes]
            frame = _backend_recv(router, NOBLOCK, False)
            frames.append(frame.bytes)
            senders.append(user_id(frame))
            while frame.more:
                frame = _backend_recv(router, NOBLOCK, False)
                frames.append(frame.bytes)
            messages.append(frames)
            if len(frames) > 3 and frames[3] in WAITING_CALLS and frames[2] == _ZBC01:
                self._connections.note(frame, frames[0])
        return messages, senders

    def _confirm(self, now: float) -> None:
        """Send what passes decided, oldest first, as far as the store made it
        durable. A pass that wrote nothing flushes what waits (nothing else would)."""
        core = self.core
        journal = self.journal
        made = journal.stats.commits
        if made == self._last_commits:
            journal.settle()
        self._last_commits = made
        durable = journal.durable_commits()
        if not self._unsent and made == durable:
            # Nothing waits and this pass's commit is durable (every store but a
            # busy `sync` one): sent at once, as before there was anything to hold.
            if core.outbox:
                self._flush(now)
            if core.events:
                self._publish()
            return
        if core.outbox or core.events:
            self._unsent.append((made, core.outbox, core.events))
            core.outbox = []
            core.events = []
        self._send_durable(now, durable)

    def _settle(self, now: float) -> None:
        """Flush what the store deferred and send everything decided."""
        self.journal.settle()
        self._send_durable(now, self.journal.durable_commits())

    def _send_durable(self, now: float, durable: int) -> None:
        core = self.core
        unsent = self._unsent
        while unsent and unsent[0][0] <= durable:
            _, outbox, events = unsent.popleft()
            if outbox:
                core.outbox = outbox
                self._flush(now)
            if events:
                core.events = events
                self._publish()

    def _drain_pass(self, now: float) -> None:
        """The drain's part of a pass, after its commit: begin the drain or tell the
        workers that registered since (STOPPING goes out at once), then end the loop
        once nothing is in flight or the drain timed out."""
        drain = self._drain
        if drain is None:
            drain = self._drain = Drain(self.core, now, self.config.drain_timeout_s)
        else:
            drain.tell(now)
        if self.core.outbox or self._unsent:
            self._confirm(now)
            self._settle(now)
        if drain.over(time.monotonic()):
            self._stopping = True

    def _wake_at(self) -> float:
        """When the loop must look again without a message: the next timer, the end
        of the drain, or at once when it is to stop."""
        if self._stopping:
            return 0.0
        if self._drain is not None:
            return min(self.core.next_tick_at, self._drain.deadline)
        return self.core.next_tick_at

    def _flush(self, now: float) -> None:
        core = self.core
        router = self.router
        send_frame = _backend_send
        while core.outbox:
            batch = core.outbox
            core.outbox = []
            refused = False
            for frames in batch:
                last = len(frames) - 1
                try:
                    # The routing id goes first: with ROUTER_MANDATORY a refused peer
                    # fails here, before any frame of the message is queued.
                    for i in range(last):
                        send_frame(router, frames[i], SNDMORE_NOBLOCK)
                    send_frame(router, frames[last], NOBLOCK)
                except zmq.Again:
                    core.undeliverable(frames, now)
                    refused = True
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    core.undeliverable(frames, now)
                    refused = True
            if refused:
                # A refused send took a worker's tasks back, and may have handed them
                # to another worker or ended them: what that wrote is committed (and
                # flushed: a rare path) before any message or event that follows
                # from it goes out.
                self.journal.commit()
                self.journal.settle()

    def _publish(self) -> None:
        """Lifecycle events of this pass, after its commit: one message per entry of
        `core.events` (a batch when it holds several). A full bus drops a message
        whole (pub/sub's contract); the events in it are counted."""
        events = self.core.events
        self.core.events = []
        lifecycle = self.lifecycle
        send_frame = _backend_send  # as in _flush: no per-call flag arithmetic
        for topic, envelope, count in encode_runs(events, "zbroker", time.time(), self._packb):
            try:
                # Two frames to the proxy's inproc XSUB: once the first is queued the
                # second always is (a message is admitted or refused whole).
                send_frame(lifecycle, topic, SNDMORE_NOBLOCK)
                send_frame(lifecycle, envelope, NOBLOCK)
            except zmq.Again:
                self.events_dropped += count

    def _read_subscriptions(self) -> None:
        """What subscribers of the bus want, as the proxy forwards it: b"\x01prefix" to
        subscribe, b"\x00prefix" to unsubscribe (the last subscriber of it left)."""
        changed = False
        while True:
            try:
                message = self.lifecycle.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not message or message[0] not in (0, 1):
                continue
            prefix = message[1:]
            if message[0] == 1:
                self._subscriptions.add(prefix)
            else:
                self._subscriptions.discard(prefix)
            changed = True
        if changed:
            wanted = frozenset(map(_text_prefix, self._subscriptions))
            log.debug("lifecycle events: subscribers want %s", sorted(wanted))
            self.core.set_subscriptions(wanted)

    def _on_side_sockets(self) -> None:
        """Something other than the ROUTER woke the poll (or the loop has been busy
        for a while): a signal, subscriptions, connections closed."""
        self._drain_wakeups()
        if self._drain_asked and self._drain is None:
            # Before the next pass reads anything: what arrives after the signal is
            # stored and answered, never delivered.
            self._drain = Drain(self.core, time.monotonic(), self.config.drain_timeout_s)
        self._read_subscriptions()
        gone = self._connections.closed()
        if gone:
            now = time.monotonic()
            for identity in gone:
                self.core.connection_closed(identity, now)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def _close(self) -> None:
        stats = self.core.stats
        log.info(
            "broker stopped: %d requests, %d replies, %d requeued, %d expired, "
            "%d refused (queue full), %d malformed dropped %s",
            stats.requests,
            stats.replies,
            stats.requeued,
            stats.expired,
            stats.refused_queue_full,
            stats.malformed_total,
            dict(stats.malformed or {}),
        )
        log.info(
            "tasks: %d enqueued (%d deduplicated), %d done, %d retried, %d timed out, "
            "%d dead, %d cancelled, %d expired, %d upstream failed, %d redriven, "
            "%d recovered at start; %d calls refused",
            stats.tasks_enqueued,
            stats.tasks_deduplicated,
            stats.tasks_done,
            stats.tasks_retried,
            stats.tasks_timed_out,
            stats.tasks_dead,
            stats.tasks_cancelled,
            stats.tasks_expired,
            stats.tasks_upstream_failed,
            stats.tasks_redriven,
            stats.tasks_recovered,
            stats.calls_refused,
        )
        if self.metrics is not None:
            self.metrics.stop()
        self.lifecycle.close(linger=0)
        self.events.stop()
        self._close_zap()
        self.journal.close()
        self.router.close(linger=0)
        self._wake_r.close()
        self._wake_w.close()
        if self._own_ctx:
            self._ctx.term()
