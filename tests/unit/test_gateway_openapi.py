"""The gateway's OpenAPI document declares its bearer keys (issue 11): every /v1 operation
needs the HTTPBearer scheme, the operations routes need nothing. No server: the app's document."""

from __future__ import annotations

from typing import Any

from orchestrator.config import Settings
from orchestrator.gateway.app import create_app
from orchestrator.gateway.settings import GatewaySettings


def _document() -> dict[str, Any]:
    doc: dict[str, Any] = create_app(Settings(), GatewaySettings()).openapi()
    return doc


def test_every_v1_route_needs_the_bearer_scheme() -> None:
    doc = _document()
    schemes = doc["components"]["securitySchemes"]
    (name,) = [n for n, s in schemes.items() if s == {**s, "type": "http", "scheme": "bearer"}]
    v1 = {
        (method, path): op.get("security")
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if path.startswith("/v1/")
    }
    assert len(v1) >= 6
    assert all(security == [{name: []}] for security in v1.values()), v1
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in doc["paths"][path]["get"], path
