"""A small HTTP endpoint for Prometheus and Kubernetes probes: /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

Check = Callable[[], tuple[bool, dict[str, object]]]


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Callable[[], bytes],
        liveness: Check,
        readiness: Check,
    ) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.liveness = liveness
        self.readiness = readiness
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass  # headers are not needed
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            if path == "/metrics":
                status, ctype, body = 200, "text/plain; version=0.0.4", self.metrics()
            elif path in ("/healthz", "/readyz"):
                ok, detail = (self.liveness if path == "/healthz" else self.readiness)()
                status, ctype = (200 if ok else 503), "application/json"
                body = json.dumps({"ok": ok, **detail}).encode()
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
