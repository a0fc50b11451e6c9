"""The OpenAPI document, the routes the server registers and docs/web.md agree."""

from __future__ import annotations

import re
from pathlib import Path

from zbroker.web import api
from zbroker.web.errors import HTTP_STATUS
from zbroker.web.routes import API_PREFIX, openapi
from zbroker.web.server import WebSettings, make_app

DOC = Path(__file__).resolve().parents[2] / "docs" / "web.md"


def test_the_document_describes_exactly_the_registered_routes() -> None:
    # Given the application as the server builds it
    app = make_app(WebSettings())
    registered = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith(API_PREFIX) and route.method != "HEAD":
            registered.add((route.method, path.removeprefix(API_PREFIX)))
    registered.discard(("GET", "/openapi.json"))
    # Then the OpenAPI document names the same operations, each with its parameters
    spec = openapi(api.ROUTES)
    described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert described == registered
    for path, ops in spec["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for op in ops.values():
            given = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert given == names, (path, op["operationId"])


def test_every_error_code_is_documented_with_its_status() -> None:
    text = DOC.read_text()
    for code, status in HTTP_STATUS.items():
        row = next((line for line in text.splitlines() if f"`{code}`" in line and "|" in line), "")
        assert f"| {status} |" in row, code
