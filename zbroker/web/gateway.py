"""The state every handler of `zbroker web` shares: its settings, the broker client,
the event hub, and who each caller is.

The Gateway is made on the server's loop when it starts (zbroker.web.server); the
route handlers (zbroker.web.api) and the WebSocket (zbroker.web.ws) find it in the
application under GATEWAY.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from aiohttp import web

from zbroker.client.aclient import AsyncClient
from zbroker.client.keys import Credentials
from zbroker.protocol.access import Principal, is_local_host
from zbroker.web.bus import EventHub
from zbroker.web.errors import E_UNAUTHORIZED, ApiError
from zbroker.web.routes import ADMIN_ONLY, OBSERVE, PUBLIC
from zbroker.web.tokens import LOCAL, Tokens

# Request bodies (and WebSocket messages) above this are refused (413).
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024


class ListenRefused(ValueError):
    """`zbroker web` was asked to listen beyond loopback without a token file."""


@dataclass(frozen=True, slots=True)
class WebSettings:
    """Everything `zbroker web` is started with."""

    host: str = "127.0.0.1"
    port: int = 8080
    endpoint: str = "tcp://127.0.0.1:5555"
    events_in: str = "tcp://127.0.0.1:5556"
    events_out: str = "tcp://127.0.0.1:5557"
    credentials: Credentials | None = None
    tokens: Tokens | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    call_timeout_s: float = 5.0
    # `zbroker start --web`: the broker's pid; the gateway stops when it is gone.
    parent_pid: int | None = None


def check_listen(settings: WebSettings) -> None:
    """Refuse a non-loopback address unless callers must show a token."""
    if settings.tokens is None and not is_local_host(settings.host):
        raise ListenRefused(
            f"refusing to listen on {settings.host}: without --tokens every caller would be"
            " an administrator; give a token file, or listen on 127.0.0.1"
        )


class Gateway:
    """The state every handler shares: the broker client, the event hub, the settings."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.client = AsyncClient(
            settings.endpoint,
            timeout_s=settings.call_timeout_s,
            retries=1,
            credentials=settings.credentials,
            max_message_bytes=max(settings.max_body_bytes * 2, 1 << 20),
        )
        self.hub = EventHub(settings.events_in, settings.events_out, settings.credentials)
        # Now, not at the first publish: the bus's subscriptions take a moment to come.
        self.hub.start()

    def principal(self, request: web.Request) -> Principal | None:
        """The caller's principal: LOCAL without a token file, else its token's, or None."""
        tokens = self.settings.tokens
        if tokens is None:
            return LOCAL
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token:
            return tokens.principal(token.strip())
        # Browsers cannot put headers on an EventSource or a WebSocket: a query token.
        query_token = request.query.get("access_token")
        return tokens.principal(query_token) if query_token else None

    def authorize(self, request: web.Request, access: str) -> Principal:
        """The caller's principal if it may call a route of `access`, else ApiError."""
        principal = self.principal(request)
        if access == PUBLIC:
            return principal or LOCAL
        if principal is None:
            raise ApiError(E_UNAUTHORIZED, "a bearer token is required (Authorization: Bearer ...)")
        self.authorize_principal(principal, access)
        return principal

    @staticmethod
    def authorize_principal(principal: Principal, access: str) -> None:
        """ApiError forbidden unless `principal` holds the role `access` asks for."""
        if access == OBSERVE and not principal.may_observe():
            raise ApiError("forbidden", f"principal {principal.name!r} lacks the observer role")
        if access == ADMIN_ONLY and not principal.admin:
            raise ApiError("forbidden", f"principal {principal.name!r} lacks the admin role")

    async def close(self) -> None:
        await self.hub.close()
        await self.client.aclose()


GATEWAY: Final = web.AppKey("gateway", Gateway)
