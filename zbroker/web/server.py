"""`zbroker web`: the HTTP, SSE and WebSocket gateway, an ordinary client of the broker.

It owns one AsyncClient (ZBC01 over the broker's ROUTER, with the gateway's own
key), one event hub (a SUB socket shared by every SSE and WebSocket follower, a
PUB socket for what callers publish), the route table of zbroker.web.api, the
WebSocket of zbroker.web.ws and the console's static files. It never touches
the broker's state except through the broker's protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from zbroker.client.errors import ClientError
from zbroker.web import api, ws
from zbroker.web.errors import E_INTERNAL, E_METHOD, ApiError, from_client_error
from zbroker.web.gateway import (
    DEFAULT_MAX_BODY_BYTES,
    GATEWAY,
    Gateway,
    ListenRefused,
    WebSettings,
    check_listen,
)
from zbroker.web.routes import API_PREFIX, Route, openapi

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ListenRefused", "WebSettings", "make_app", "run"]

log = logging.getLogger("zbroker.web")

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
PARENT_CHECK_S: Final = 0.5
# On SIGTERM, open responses (event followers, streams) get this long to end.
SHUTDOWN_S: Final = 3.0


def error_response(error: ApiError) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return web.json_response(error.document(), status=error.status, headers=headers)


# Statuses aiohttp raises itself (unknown path, wrong method, body too large...).
_HTTP_CODES: Final = {404: "not_found", 405: E_METHOD, 413: "too_large"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as the JSON error document; never a bare 500 page."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        return error_response(exc)
    except ClientError as exc:
        return error_response(from_client_error(exc))
    except (ValueError, TypeError) as exc:
        # What the client library refuses before sending (a malformed worker id, an
        # option out of range): the caller's input, never the gateway's fault.
        return error_response(ApiError("bad_request", str(exc)))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else E_INTERNAL)
        return error_response(ApiError(code, exc.reason))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(ApiError(E_INTERNAL, "the gateway failed; see its log"))


def _route_handler(route: Route) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        principal = gateway.authorize(request, route.access)
        args = route.arguments(request.match_info, request.query)
        answer = await route.handler(gateway, request, principal, **args)
        if isinstance(answer, web.StreamResponse):
            return answer
        return web.json_response(answer, dumps=_dumps)

    return handle


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi(api.ROUTES), dumps=_dumps)


async def _static(request: web.Request) -> web.StreamResponse:
    """The console's files (zbroker/web/static): `/` is index.html."""
    name = request.match_info.get("name", "") or "index.html"
    root = STATIC_DIR.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError("not_found", f"no file {name!r}")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


def _watch_parent(pid: int) -> Any:
    """A cleanup context that stops the gateway (SIGTERM to itself) once the process
    that started it is gone: a broker killed with -9 leaves no gateway behind."""

    async def watch() -> None:
        while os.getppid() == pid:
            await asyncio.sleep(PARENT_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(watch())
        yield
        task.cancel()

    return context


def make_app(settings: WebSettings) -> web.Application:
    """The aiohttp application of the gateway (started and stopped with it)."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=settings.max_body_bytes)
    app[ws.SOCKETS] = weakref.WeakSet()
    app.router.add_get(f"{API_PREFIX}/openapi.json", _openapi)
    for route in api.ROUTES:
        app.router.add_route(route.method, API_PREFIX + route.path, _route_handler(route))
    app.router.add_get("/ws", ws.handle)
    app.router.add_get("/", _static)
    app.router.add_get("/{name:.+}", _static)

    async def gateway(app: web.Application) -> AsyncIterator[None]:
        # Made on the server's loop, when it starts: the client's sockets belong to it.
        app[GATEWAY] = Gateway(settings)
        yield
        await app[GATEWAY].close()

    app.cleanup_ctx.append(gateway)
    if settings.parent_pid is not None:
        app.cleanup_ctx.append(_watch_parent(settings.parent_pid))
    app.on_shutdown.append(ws.close_all)
    return app


def run(settings: WebSettings) -> None:
    """Serve until SIGINT or SIGTERM."""
    check_listen(settings)
    app = make_app(settings)
    log.info(
        "zbroker web on http://%s:%d (broker %s, %s)",
        settings.host,
        settings.port,
        settings.endpoint,
        "tokens required" if settings.tokens else "no tokens: loopback only",
    )
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=SHUTDOWN_S,
    )
