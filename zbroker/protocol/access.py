"""Who may do what on an authenticated broker: roles, principals and the policy.

The one home of the trust rules (docs/security.md, "Roles"). The broker core
checks every message against its sender's principal with these functions; the
ZAP handler and the event bus use them for their endpoints; the auth file
(`zbroker start --auth FILE`) is read into a `Policy` by zbroker.runtime.auth.
Pure: no I/O, no sockets.

A principal is a name, one CURVE public key and its roles:

  client      enqueue and request (ZBC01 ENQUEUE/REQUEST, 7/MDP requests) to the
              services its `services` globs name; RESULT, STATUS and CANCEL of the
              tasks it enqueued; 8/MMI queries
  worker      serve (READY, then everything a worker sends) the services its
              `services` globs name
  publisher   publish events whose topic starts with one of its `topics`
  subscriber  subscribe to prefixes that start with one of its `topics`
  observer    the read-only figures: QUEUES, WORKERS, STATS (`zbroker top`)
  admin       everything, on every task and service

Topics that begin with one of BROKER_TOPICS are the broker's own lifecycle
events: on an authenticated broker no peer may publish them, whatever its
`topics` say, so a subscriber can trust that they come from the broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Final

CLIENT: Final = "client"
WORKER: Final = "worker"
PUBLISHER: Final = "publisher"
SUBSCRIBER: Final = "subscriber"
OBSERVER: Final = "observer"
ADMIN: Final = "admin"
ROLES: Final = (CLIENT, WORKER, PUBLISHER, SUBSCRIBER, OBSERVER, ADMIN)

# Roles that may connect to each endpoint; the ZAP handler refuses the handshake of
# a known key with none of them (the peer sees an authentication failure at once).
ROUTER_ROLES: Final = frozenset({CLIENT, WORKER, OBSERVER, ADMIN})
EVENTS_IN_ROLES: Final = frozenset({PUBLISHER, ADMIN})
EVENTS_OUT_ROLES: Final = frozenset({SUBSCRIBER, ADMIN})

# ZAP domains of the broker's three server sockets (RFC 27): the handler knows by
# the domain which endpoint a handshake is for, and refuses any other domain.
DOMAIN_ROUTER: Final = "zbroker"
DOMAIN_EVENTS_IN: Final = "zbroker.events.in"
DOMAIN_EVENTS_OUT: Final = "zbroker.events.out"
DOMAIN_ROLES: Final = {
    DOMAIN_ROUTER: ROUTER_ROLES,
    DOMAIN_EVENTS_IN: EVENTS_IN_ROLES,
    DOMAIN_EVENTS_OUT: EVENTS_OUT_ROLES,
}

# Topic prefixes only the broker publishes on (its lifecycle events).
BROKER_TOPICS: Final = ("task.", "worker.", "schedule.")

# How the reason of a DISCONNECT the broker sends a worker it refused begins: the
# worker stops (registering again cannot help) instead of reconnecting.
FORBIDDEN_PREFIX: Final = "forbidden:"

# Longest principal name: it is the ZAP User-Id on every frame and is written into
# every task the principal enqueues.
MAX_NAME_BYTES: Final = 64


def broker_given(routing_id: bytes) -> bool:
    """`routing_id` is one the ROUTER made for the connection (libzmq's: five bytes,
    a zero byte first, from a counter the broker seeds at random and never reveals),
    not one the peer chose with ZMQ_ROUTING_ID. An authenticated broker serves
    only those: a principal could otherwise connect, once another's connection
    closed, under the id it had chosen, and receive what was meant for it."""
    return len(routing_id) == 5 and routing_id[0] == 0


CHOSEN_ID = (
    "this connection chose its own routing id (ZMQ_ROUTING_ID): a broker with --auth"
    " serves only the ids it gives"
)


class PolicyError(ValueError):
    """The auth file cannot make a policy: the message names the principal and field."""


@dataclass(frozen=True, slots=True)
class Principal:
    """One authenticated identity: its name (the ZAP User-Id), key and grants."""

    name: str
    key: str  # the CURVE public key, Z85 (40 characters)
    roles: frozenset[str]
    services: tuple[str, ...] = ()  # globs (fnmatch, case-sensitive): client and worker
    topics: tuple[str, ...] = ()  # prefixes: publisher and subscriber
    admin: bool = field(init=False)
    topic_bytes: tuple[bytes, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "admin", ADMIN in self.roles)
        object.__setattr__(self, "topic_bytes", tuple(t.encode() for t in self.topics))

    def may(self, role: str) -> bool:
        return self.admin or role in self.roles

    def serves_name(self, service: str) -> bool:
        """`service` is named by one of this principal's globs."""
        return any(fnmatchcase(service, glob) for glob in self.services)

    def may_request(self, service: str) -> bool:
        """Enqueue or request to `service`."""
        return self.admin or (CLIENT in self.roles and self.serves_name(service))

    def may_serve(self, service: str) -> bool:
        """Register as a worker of `service`."""
        return self.admin or (WORKER in self.roles and self.serves_name(service))

    def may_publish(self, topic: bytes) -> bool:
        """Publish an event on `topic` (the broker's own topic space is never allowed)."""
        if topic.startswith(_BROKER_TOPICS_B):
            return False
        return self.admin or (PUBLISHER in self.roles and topic.startswith(self.topic_bytes))

    def may_subscribe(self, prefix: bytes) -> bool:
        """Subscribe to `prefix`: it must lie within one of the granted prefixes."""
        return self.admin or (SUBSCRIBER in self.roles and prefix.startswith(self.topic_bytes))

    def may_observe(self) -> bool:
        return self.admin or OBSERVER in self.roles


_BROKER_TOPICS_B = tuple(t.encode() for t in BROKER_TOPICS)


def check_principal(principal: Principal) -> None:
    """Raise PolicyError if `principal` is not one an auth file may declare."""
    name = principal.name
    where = f"principal {name!r}"
    if not name or len(name.encode()) > MAX_NAME_BYTES or not name.isprintable():
        raise PolicyError(f"{where}: a name must be 1..{MAX_NAME_BYTES} printable bytes")
    unknown = sorted(principal.roles - set(ROLES))
    if unknown:
        raise PolicyError(f"{where}: unknown role(s) {unknown}; roles are {', '.join(ROLES)}")
    if not principal.roles:
        raise PolicyError(f"{where}: no roles; give at least one of {', '.join(ROLES)}")
    if principal.roles & {CLIENT, WORKER} and not principal.services and not principal.admin:
        raise PolicyError(f"{where}: roles client and worker need `services` (globs)")
    if principal.roles & {PUBLISHER, SUBSCRIBER} and not principal.topics and not principal.admin:
        raise PolicyError(f"{where}: roles publisher and subscriber need `topics` (prefixes)")
    for value in (*principal.services, *principal.topics):
        if type(value) is not str:
            raise PolicyError(f"{where}: services and topics must be strings, got {value!r}")


@dataclass(frozen=True, slots=True)
class Policy:
    """Every principal of a broker, by key and by name; checked when made."""

    principals: tuple[Principal, ...]
    by_key: dict[str, Principal] = field(init=False)
    by_name: dict[str, Principal] = field(init=False)

    def __post_init__(self) -> None:
        by_key: dict[str, Principal] = {}
        by_name: dict[str, Principal] = {}
        for principal in self.principals:
            check_principal(principal)
            if principal.name in by_name:
                raise PolicyError(f"principal {principal.name!r} is declared twice")
            if principal.key in by_key:
                other = by_key[principal.key].name
                raise PolicyError(f"principals {other!r} and {principal.name!r} have the same key")
            by_key[principal.key] = principal
            by_name[principal.name] = principal
        object.__setattr__(self, "by_key", by_key)
        object.__setattr__(self, "by_name", by_name)

    def admit(self, domain: str, key: str) -> Principal | str:
        """The ZAP decision for a CURVE handshake: the principal, or why not."""
        principal = self.by_key.get(key)
        if principal is None:
            return "unknown key"
        wanted = DOMAIN_ROLES.get(domain)
        if wanted is None:
            return f"unknown ZAP domain {domain!r}"
        if not principal.roles & wanted:
            return f"principal {principal.name!r} has no role for this endpoint"
        return principal


_LOOPBACK_HOSTS = frozenset({"localhost", "[::1]", "::1"})


def is_local_endpoint(endpoint: str) -> bool:
    """`endpoint` can be reached only from this machine: ipc://, inproc://, or tcp://
    on a loopback address. A wildcard (`*`, 0.0.0.0), an interface name or any
    other host is reachable from other machines, so it needs authentication."""
    transport, sep, address = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport not in ("tcp", "ws"):
        return False
    if address.startswith("["):
        host = address[: address.find("]") + 1]
    else:
        host = address.rpartition(":")[0]
    return is_local_host(host)


def is_local_host(host: str) -> bool:
    """An HTTP or TCP listening address that only this machine reaches."""
    return host in _LOOPBACK_HOSTS or host.startswith("127.")
