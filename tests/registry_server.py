"""A schema registry for tests, written here: the part of the Confluent REST API we use.

``GET /schemas/ids/{id}`` and ``POST /subjects/{subject}/versions``, Confluent-style error bodies
(``{"error_code": 40403, ...}``), HTTP basic auth required on every call, and counters of what
was asked. It runs in-process on aiohttp's server and can be stopped and started again on the
same port to play a registry outage.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import ssl
from typing import Any

from aiohttp import web

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"


def canonical_text(schema: Any) -> str:
    """One text per schema, so registering it twice gives one id (as the real registry does)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


class RegistryServer:
    def __init__(
        self,
        username: str = "registry-user",
        password: str = "registry-secret",
        *,
        first_id: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.credentials = (username, password)
        self.ssl_context = ssl_context
        self.schemas: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = collections.defaultdict(list)
        self._next_id = first_id
        #: GET /schemas/ids/{id} calls per id (authorized ones), POST calls per subject
        self.gets: collections.Counter[int] = collections.Counter()
        self.posts: collections.Counter[str] = collections.Counter()
        self.unauthorized = 0
        self.auth_headers: set[str] = set()
        #: seconds every GET waits before answering; a status every call answers instead
        self.delay_s = 0.0
        self.fail_with: int | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def add(self, schema: Any, subject: str | None = None) -> int:
        """Register ``schema`` directly (no HTTP); returns its id."""
        text = canonical_text(schema)
        for schema_id, known in self.schemas.items():
            if known == text:
                return schema_id
        schema_id = self._next_id
        self._next_id += 1
        self.schemas[schema_id] = text
        if subject is not None:
            self.subjects[subject].append(schema_id)
        return schema_id

    async def start(self, port: int | None = None) -> None:
        """Listen on ``port`` (default: the port of the last run, else a free one)."""
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/schemas/ids/{id}", self._get_schema)
        app.router.add_post("/subjects/{subject}/versions", self._register)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(
            runner,
            "127.0.0.1",
            self.port if port is None else port,
            ssl_context=self.ssl_context,
            reuse_address=True,
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> RegistryServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers ----------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        body = json.dumps({"error_code": code, "message": message})
        return web.Response(status=status, text=body, content_type=MEDIA_TYPE)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        if header != f"Basic {expected}":
            self.unauthorized += 1
            return self._error(401, 40101, "Unauthorized")
        self.auth_headers.add(header)
        response: web.StreamResponse = await handler(request)
        return response

    async def _get_schema(self, request: web.Request) -> web.Response:
        try:
            schema_id = int(request.match_info["id"])
        except ValueError:
            return self._error(404, 40403, "Schema not found")
        self.gets[schema_id] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_with is not None:
            return self._error(self.fail_with, self.fail_with * 100, "failing on purpose")
        if schema_id not in self.schemas:
            return self._error(404, 40403, f"Schema {schema_id} not found")
        body = json.dumps({"schema": self.schemas[schema_id]})
        return web.Response(text=body, content_type=MEDIA_TYPE)

    async def _register(self, request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        self.posts[subject] += 1
        if self.fail_with is not None:
            return self._error(self.fail_with, self.fail_with * 100, "failing on purpose")
        try:
            schema = json.loads(json.loads(await request.text())["schema"])
        except (ValueError, KeyError, TypeError):
            return self._error(422, 42201, "Invalid schema")
        return web.json_response({"id": self.add(schema, subject)}, content_type=MEDIA_TYPE)
