"""The Worker's mailbox: reports from handler threads reach the I/O thread, none
stranded, however posts and the I/O thread's reads interleave.

The mailbox wakes the I/O thread once per batch of reports (a byte on a socket
pair) rather than once per report; these tests drive it the way the I/O thread
does (wait for the socket, clear the wakeups, read the queue until empty) against
many posting threads, and fail if a report is left in the queue with no wakeup
on its way."""

from __future__ import annotations

import queue
import select
import socket
import threading
import time

from zbroker.client.worker import _Mailbox

POSTERS = 8
PER_POSTER = 5_000


class _SlowReader:
    """The mailbox's reading end, slowed down: each read first yields for a moment,
    which widens the window in which a post can land while the I/O thread is
    clearing wakeups (where a lost wakeup would come from)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv(self, n: int) -> bytes:
        time.sleep(0.0002)
        return self._sock.recv(n)

    def close(self) -> None:
        self._sock.close()


def _io_loop(mailbox: _Mailbox, expected: int, got: list[object], stalled: threading.Event) -> None:
    while len(got) < expected:
        readable, _, _ = select.select([mailbox.reader], [], [], 2.0)
        if not readable:
            # Two seconds without a wakeup while reports are still due: if any of them
            # sits in the queue, its wakeup was lost.
            if not mailbox.queue.empty():
                stalled.set()
                return
            continue
        mailbox.clear_wakeups()
        while True:
            try:
                got.append(mailbox.queue.get_nowait())
            except queue.Empty:
                break


def test_every_report_wakes_the_io_thread_eventually() -> None:
    for slow in (False, True, True):  # interleavings vary run by run
        mailbox = _Mailbox()
        if slow:
            mailbox.reader = _SlowReader(mailbox.reader)  # type: ignore[assignment]
        got: list[object] = []
        stalled = threading.Event()
        expected = POSTERS * PER_POSTER
        io = threading.Thread(target=_io_loop, args=(mailbox, expected, got, stalled))
        io.start()

        def post(n: int, mailbox: _Mailbox = mailbox) -> None:
            for i in range(PER_POSTER):
                assert mailbox.post((n, i))  # type: ignore[arg-type]

        posters = [threading.Thread(target=post, args=(n,)) for n in range(POSTERS)]
        for t in posters:
            t.start()
        for t in posters:
            t.join()
        io.join(30.0)
        assert not stalled.is_set(), "a report sat in the queue with no wakeup pending"
        assert not io.is_alive()
        assert sorted(got) == sorted((n, i) for n in range(POSTERS) for i in range(PER_POSTER))  # type: ignore[type-var]
        assert mailbox.close() == []


def test_a_closed_mailbox_refuses_reports() -> None:
    mailbox = _Mailbox()
    assert mailbox.post("first")  # type: ignore[arg-type]
    assert mailbox.close() == ["first"]
    assert not mailbox.post("late")  # type: ignore[arg-type]
