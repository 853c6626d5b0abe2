"""`orchestrator gateway`: the app under uvicorn."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn
from opentelemetry.trace import TracerProvider

from orchestrator.config import Settings
from orchestrator.gateway.app import create_app
from orchestrator.gateway.settings import GatewaySettings


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves the signals to its host (`orchestrator dev`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server(
    settings: Settings,
    gateway: GatewaySettings,
    *,
    embedded: bool = False,
    tracer_provider: TracerProvider | None = None,
) -> uvicorn.Server:
    app = create_app(settings, gateway, tracer_provider=tracer_provider)
    config = uvicorn.Config(
        app,
        host=gateway.host,
        port=gateway.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    return EmbeddedServer(config) if embedded else uvicorn.Server(config)


async def serve(settings: Settings, gateway: GatewaySettings) -> None:
    """Serve until SIGINT/SIGTERM; spans go out over OTLP as `orchestrator serve`'s do (when
    the `tracing` setting is on and the OTEL_* variables do not switch them off)."""
    from orchestrator.adapters.tracing import setup_tracing

    provider = setup_tracing("diffusion-gateway") if settings.tracing else None
    srv = server(settings, gateway, tracer_provider=provider)
    try:
        await srv.serve()
    finally:
        if provider is not None:
            provider.shutdown()
    if not srv.started:
        raise SystemExit(1)


def serve_command(settings: Settings, *, host: str | None, port: int | None) -> int:
    """`orchestrator gateway`: exit status 2 for bad gateway settings."""
    import asyncio
    import sys

    from pydantic import ValidationError

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    try:
        gateway = GatewaySettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        print(f"error: gateway settings: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings, gateway))
    return 0
