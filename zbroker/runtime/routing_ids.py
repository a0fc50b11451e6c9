"""Routing ids a peer cannot predict, so that no peer can make libzmq abort.

libzmq names each peer of a ROUTER that sets no routing id of its own with a
5-byte id, a zero byte and a 32-bit counter. The counter starts at libc's
rand(), which libzmq never seeds: every broker hands out 00 6b 8b 45 67 first,
then counts up. A peer that sets ZMQ_ROUTING_ID to the next such id makes
libzmq's ROUTER abort (an assertion in its map of peers) when the next ordinary
peer connects: one small peer could stop the broker.

Seeding libc's generator from the operating system's randomness before any
ROUTER exists starts that counter anywhere in 2**32. A peer then has one
guess per connection it holds open, against four billion values.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import secrets

log = logging.getLogger("zbroker.runtime")


def seed_routing_ids() -> bool:
    """Seed libc's rand() (which libzmq draws its first routing id from) with 32
    random bits. False, with a warning, where libc cannot be reached."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.srand(ctypes.c_uint(secrets.randbits(32)))
    except (OSError, AttributeError) as exc:
        log.warning("cannot seed libzmq's routing ids (%s): they are predictable", exc)
        return False
    return True
