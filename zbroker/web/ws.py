"""The WebSocket at /ws (filled in below)."""

from __future__ import annotations

from aiohttp import web


async def handle(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotImplemented()


async def close_all(app: web.Application) -> None:
    return None
