"""Where a peer connects: one broker, or several of which one is active.

The one rule for what every client object (Client, AsyncClient, Worker, Service,
Publisher, Subscriber), the CLI's endpoint options and the web gateway accept as an
endpoint: a string ("tcp://a:5555"), a comma-separated string ("tcp://a:5555,
tcp://b:5555") or a sequence of strings. `parse_endpoints` turns any of them into a
tuple, or raises EndpointError (a ValueError) saying what is wrong.

With several endpoints a socket connects to all of them and only queues messages to
a connection whose handshake completed (ZMQ_IMMEDIATE): the broker that is bound and
alive. See docs/python-client.md, "Several brokers: following the active one".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from zbroker.client.errors import EndpointError

# What a caller may give wherever an endpoint goes.
Endpoints = str | Sequence[str]

_FORM = re.compile(r"[a-z][a-z0-9+.-]*://\S+")


def parse_endpoints(value: Endpoints) -> tuple[str, ...]:
    """The endpoints `value` names, in order: each "transport://address", none twice,
    at least one. A string with commas names several."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        items = list(value)
        for item in items:
            if not isinstance(item, str):
                raise EndpointError(f"an endpoint must be a str, not {type(item).__name__}")
            if "," in item:
                raise EndpointError(f"{item!r}: give several endpoints as a list or 'a,b'")
    else:
        raise EndpointError(
            "endpoint must be a str ('tcp://host:port', or 'a,b' for several) or a list of"
            f" str, not {type(value).__name__}"
        )
    found: list[str] = []
    for item in items:
        endpoint = item.strip()
        if not endpoint:
            raise EndpointError(
                f"empty endpoint in {value!r}: expected transport://address[,transport://address]"
            )
        if not _FORM.fullmatch(endpoint):
            raise EndpointError(
                f"{endpoint!r} is not an endpoint: expected transport://address"
                " (e.g. tcp://host:port)"
            )
        if endpoint in found:
            raise EndpointError(f"{endpoint!r} is given twice")
        found.append(endpoint)
    if not found:
        raise EndpointError("no endpoint given")
    return tuple(found)


def joined(endpoints: Sequence[str]) -> str:
    """Endpoints as one comma-separated string (a single endpoint as it is)."""
    return ",".join(endpoints)


def describe(endpoints: Sequence[str]) -> str:
    """How messages name the endpoints: the endpoint, or "any of the N endpoints (a, b)"."""
    if len(endpoints) == 1:
        return endpoints[0]
    return f"any of the {len(endpoints)} endpoints ({', '.join(endpoints)})"
