"""Who an HTTP caller is: bearer tokens mapped to principals of the broker's own
vocabulary (zbroker.protocol.access: roles, service globs, topic prefixes).

The token file is TOML, written by the operator:

    [[token]]
    principal = "console"
    sha256 = "9f86d0..."       # hex SHA-256 of the token (or `token = "..."`, plain)
    roles = ["observer", "client"]
    services = ["tts", "llm.*"]
    topics = ["fs."]

A gateway without a token file treats every caller as the local administrator,
and refuses to listen beyond loopback (zbroker.web.server).
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zbroker.protocol.access import ADMIN, PolicyError, Principal, check_principal

_FIELDS = frozenset({"principal", "token", "sha256", "roles", "services", "topics"})

# The principal of every caller when no token file is given (loopback only).
LOCAL = Principal(name="local", key="", roles=frozenset({ADMIN}))


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file and the entry."""


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Tokens:
    """Principals by the SHA-256 of their token (hex)."""

    by_digest: dict[str, Principal]

    def principal(self, token: str) -> Principal | None:
        """The principal of `token`, or None. Compared in constant time per entry."""
        digest = token_digest(token)
        found = None
        for known, principal in self.by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def _strings(entry: dict[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = entry.get(name, [])
    if not isinstance(value, list) or not all(type(v) is str for v in value):
        raise TokenFileError(f"{where}: `{name}` must be a list of strings")
    return tuple(value)


def _digest(entry: dict[str, Any], where: str) -> str:
    plain, hashed = entry.get("token"), entry.get("sha256")
    if (plain is None) == (hashed is None):
        raise TokenFileError(f"{where}: give exactly one of `token` and `sha256`")
    if plain is not None:
        if type(plain) is not str or len(plain) < 16:
            raise TokenFileError(f"{where}: `token` must be a string of 16 characters or more")
        return token_digest(plain)
    if type(hashed) is not str or len(hashed) != 64:
        raise TokenFileError(f"{where}: `sha256` must be 64 hex digits")
    try:
        bytes.fromhex(hashed)
    except ValueError:
        raise TokenFileError(f"{where}: `sha256` must be 64 hex digits") from None
    return hashed.lower()


def load_tokens(path: Path) -> Tokens:
    """Read the token file at `path` (see the module docstring and docs/web.md)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc}") from None
    unknown = sorted(set(data) - {"token"})
    entries = data.get("token")
    if unknown or not isinstance(entries, list) or not entries:
        raise TokenFileError(f"{path}: expected [[token]] tables and nothing else")
    by_digest: dict[str, Principal] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: token {i + 1}"
        extra = sorted(set(entry) - _FIELDS)
        if extra:
            raise TokenFileError(f"{where}: unknown field(s) {extra}")
        name = entry.get("principal")
        if type(name) is not str:
            raise TokenFileError(f"{where}: `principal` must be a string")
        digest = _digest(entry, where)
        if digest in by_digest:
            raise TokenFileError(f"{where}: the same token is given twice")
        principal = Principal(
            name=name,
            key=digest[:16],
            roles=frozenset(_strings(entry, "roles", where)),
            services=_strings(entry, "services", where),
            topics=_strings(entry, "topics", where),
        )
        try:
            check_principal(principal)
        except PolicyError as exc:
            raise TokenFileError(f"{where}: {exc}") from None
        by_digest[digest] = principal
    return Tokens(by_digest)
