"""`orchestrator gateway`: the app under uvicorn.

The HTTP parser and the event loop are chosen here, not left to uvicorn's guess: httptools and
uvloop (a C parser and a libuv loop) when they are installed, as they are with the project's
dependencies; h11 and asyncio's loop, with a warning, where they are not (the `http` and `loop`
settings force either). On the 2-core bench machine their gain was within its noise (see the
gateway section of docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator

import uvicorn
from opentelemetry.trace import TracerProvider

from orchestrator.config import Settings
from orchestrator.gateway.app import create_app
from orchestrator.gateway.settings import GatewaySettings

log = logging.getLogger("orchestrator.gateway")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def http_parser(gateway: GatewaySettings) -> str:
    """uvicorn's `http` implementation: httptools where it is installed (or asked for)."""
    if gateway.http != "auto":
        return gateway.http
    if _installed("httptools"):
        return "httptools"
    log.warning("gateway: httptools is not installed, parsing HTTP with h11 (slower)")
    return "h11"


def loop_factory(gateway: GatewaySettings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The gateway's event loop: uvloop's where it is installed (or asked for); None: asyncio's."""
    if gateway.loop == "asyncio":
        return None
    if gateway.loop == "auto" and not _installed("uvloop"):
        log.warning("gateway: uvloop is not installed, running on asyncio's own event loop")
        return None
    import uvloop

    return uvloop.new_event_loop


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves the signals to its host (`orchestrator dev`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class StandaloneServer(uvicorn.Server):
    """A uvicorn server that owns the process's signals and runs `on_stopped` once it has shut
    down, before uvicorn re-raises the SIGINT/SIGTERM it caught (which ends the process: code
    after `serve()` would never run, and spans still buffered would be lost)."""

    def __init__(self, config: uvicorn.Config, on_stopped: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stopped = on_stopped

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self.on_stopped()


def server(
    settings: Settings,
    gateway: GatewaySettings,
    *,
    embedded: bool = False,
    tracer_provider: TracerProvider | None = None,
    on_stopped: Callable[[], None] | None = None,
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
        http=http_parser(gateway),
        # the loop is the one this server is awaited on: `serve_command` makes it uvloop's
        loop="none",
    )
    if embedded:
        return EmbeddedServer(config)
    return StandaloneServer(config, on_stopped) if on_stopped else uvicorn.Server(config)


async def serve(settings: Settings, gateway: GatewaySettings) -> None:
    """Serve until SIGINT/SIGTERM; spans go out over OTLP as `orchestrator serve`'s do (when
    the `tracing` setting is on and the OTEL_* variables do not switch them off)."""
    from orchestrator.adapters.tracing import setup_tracing

    provider = setup_tracing("diffusion-gateway") if settings.tracing else None
    # the provider is shut down (its last spans sent) inside the server's signal capture:
    # after a SIGTERM, uvicorn re-raises it as soon as the capture ends
    stopped = provider.shutdown if provider is not None else None
    srv = server(settings, gateway, tracer_provider=provider, on_stopped=stopped)
    await srv.serve()
    if not srv.started:
        raise SystemExit(1)


def serve_command(settings: Settings, *, host: str | None, port: int | None) -> int:
    """`orchestrator gateway`: exit status 2 for bad gateway settings."""
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
    with asyncio.Runner(loop_factory=loop_factory(gateway)) as runner:
        runner.run(serve(settings, gateway))
    return 0
