"""The route table's vocabulary and the OpenAPI 3.1 document made from it.

Each Route says its method, path, parameters, body and answer schemas, the role
it needs and its handler; zbroker.web.api holds the table, the server registers
it and `openapi()` describes it, so the document cannot drift from the routes.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from zbroker import __version__
from zbroker.web.errors import HTTP_STATUS, bad_request

API_PREFIX: Final = "/api/v1"

Schema = dict[str, Any]

# Who may call a route, before any per-service or per-task check of its handler.
PUBLIC: Final = "public"  # anyone, even without a token (GET /health)
CALLER: Final = "caller"  # any holder of a token: the handler checks the rest
OBSERVE: Final = "observe"  # the observer role (or admin)
ADMIN_ONLY: Final = "admin"


@dataclass(frozen=True, slots=True)
class Param:
    """A path or query parameter: its JSON Schema type decides how it is parsed."""

    name: str
    where: str  # "path" or "query"
    kind: str  # "string", "integer", "number"
    description: str
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    default: Any = None

    def schema(self) -> Schema:
        out: Schema = {"type": self.kind}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.default is not None:
            out["default"] = self.default
        return out

    def parse(self, raw: str | None) -> Any:
        """The value of `raw` (None: absent), or ApiError bad_request."""
        if raw is None:
            if self.required:
                raise bad_request(f"{self.name} is required")
            return self.default
        if self.kind == "string":
            return raw
        what = "an integer" if self.kind == "integer" else "a finite number"
        try:
            value: float = int(raw) if self.kind == "integer" else float(raw)
        except ValueError:
            raise bad_request(f"{self.name} must be {what}") from None
        if not math.isfinite(value):
            raise bad_request(f"{self.name} must be {what}")
        if self.minimum is not None and value < self.minimum:
            raise bad_request(f"{self.name} must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise bad_request(f"{self.name} must be at most {self.maximum:g}")
        return value


@dataclass(frozen=True, slots=True)
class Route:
    """One operation of the API."""

    method: str
    path: str  # below API_PREFIX, with {name} path parameters
    name: str  # the OpenAPI operationId
    summary: str
    access: str  # PUBLIC, CALLER, OBSERVE or ADMIN_ONLY
    handler: Callable[..., Awaitable[Any]]
    params: tuple[Param, ...] = ()
    body: Schema | None = None
    answer: Schema = field(default_factory=dict)
    events: bool = False  # answers text/event-stream
    errors: tuple[str, ...] = ()  # error codes beyond those every route may answer

    def arguments(self, path: Mapping[str, str], query: Mapping[str, str]) -> dict[str, Any]:
        """Every parameter parsed from the request's path and query."""
        out: dict[str, Any] = {}
        for param in self.params:
            source = path if param.where == "path" else query
            out[param.name] = param.parse(source.get(param.name))
        return out


# Errors any route may answer (bad input, auth, the broker being away).
COMMON_ERRORS: Final = ("bad_request", "unauthorized", "forbidden", "broker_unreachable")

ERROR_SCHEMA: Final[Schema] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "enum": sorted(HTTP_STATUS)},
                "message": {"type": "string"},
            },
        }
    },
}


def _operation(route: Route) -> Schema:
    op: Schema = {"operationId": route.name, "summary": route.summary}
    if route.access != PUBLIC:
        op["security"] = [{"bearer": []}]
    else:
        op["security"] = []
    op["x-zbroker-access"] = route.access
    if route.params:
        op["parameters"] = [
            {
                "name": p.name,
                "in": p.where,
                "required": p.required or p.where == "path",
                "description": p.description,
                "schema": p.schema(),
            }
            for p in route.params
        ]
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": route.body}},
        }
    ok: Schema
    if route.events:
        ok = {
            "description": "Server-Sent Events",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": route.answer}}}
    responses: Schema = {"200": ok}
    for code in (*COMMON_ERRORS, *route.errors):
        status = str(HTTP_STATUS[code])
        entry = responses.setdefault(
            status,
            {
                "description": "",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        )
        entry["description"] = ", ".join(filter(None, [entry["description"], code]))
    op["responses"] = responses
    return op


def openapi(routes: tuple[Route, ...]) -> Schema:
    """The OpenAPI 3.1 document of `routes`."""
    paths: Schema = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "zbroker web gateway",
            "version": __version__,
            "description": "The broker's task queues, inspection, administration and event "
            "bus over HTTP (docs/web.md). WebSocket at /ws.",
        },
        "servers": [{"url": API_PREFIX}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": ERROR_SCHEMA},
        },
    }
