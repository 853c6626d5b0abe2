"""The gateway's HTTP application: `create_app(settings, gateway)` gives a fresh FastAPI app.

Routes: the OpenAI-shaped synchronous `POST /v1/images/generations`; the async jobs API
(`POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events` as Server-Sent Events,
`POST /v1/jobs/{id}/cancel`); `GET /v1/images/{id}/{index}.png`; `/healthz`, `/readyz`,
`/metrics`; the playground at `/`. Every job route needs a bearer API key; a job is visible to
the key that created it only (404 for any other).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.adapters.avro import AvroCodec
from orchestrator.adapters.kafka import CORRELATION_ID_HEADER
from orchestrator.adapters.tracing import get_tracer, producer_span
from orchestrator.config import Settings
from orchestrator.core.envelope import check_envelope
from orchestrator.core.schedulers import resolve as resolve_scheduler
from orchestrator.domain import GenerationRequest
from orchestrator.errors import ValidationError
from orchestrator.gateway import webhook
from orchestrator.gateway.auth import ApiKey, KeyStore, TokenBucket, retry_after_header
from orchestrator.gateway.backend import Backend, KafkaUnavailable
from orchestrator.gateway.jobs import (
    FAILED,
    JOB_ID_PREFIX,
    SUCCEEDED,
    Job,
    Registration,
    progress_data,
)
from orchestrator.gateway.settings import GatewaySettings

log = logging.getLogger("orchestrator.gateway")

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
_SCHEDULER = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_RETRY_KAFKA_S = 5


# ---------------------------------------------------------------------------------------------
# request bodies


class GenerationBody(BaseModel):
    """The OpenAI Images request shape plus the orchestrator's own fields (strict JSON types:
    `"n": "2"` or `"n": true` is a 422 naming `n`, not a silent cast)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=100_000)
    n: int = Field(1, ge=1, le=64)
    size: str | None = Field(None, max_length=11, description='"WxH", e.g. "512x512"')
    response_format: Literal["b64_json", "url"] = "url"
    user: str | None = Field(None, max_length=256)
    negative_prompt: str = Field("", max_length=100_000)
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int | None = Field(None, ge=1, le=10_000)
    scheduler: str | None = Field(None, max_length=64)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    priority: Literal["high", "normal", "low"] = "normal"


class JobBody(GenerationBody):
    webhook: str | None = Field(
        None,
        max_length=2048,
        description="http(s) URL that gets one POST of the job's JSON when it ends, signed "
        "`Orchestrator-Signature: t=<unix seconds>,v1=<hex>`, `<hex>` = HMAC-SHA256 with the "
        'webhook secret over `"<t>." + body`; retried with doubling backoff until a 2xx',
    )
    preview: bool = False


def _field_error(field: str, message: str, where: str = "body") -> JSONResponse:
    return JSONResponse(
        status_code=422,
        content={"detail": [{"loc": [where, field], "msg": message, "type": "value_error"}]},
    )


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _to_request(
    body: GenerationBody, job_id: str, settings: Settings, size_multiple: int
) -> GenerationRequest:
    """The service's request, checked against the service's limits and the model's size unit
    (ValidationError)."""
    limits = settings.limits()
    width = height = None
    if body.size is not None:
        m = _SIZE.fullmatch(body.size)  # fullmatch: "$" alone lets "64x64\n" in
        if m is None:
            raise ValidationError("size", f'must be "WxH", e.g. "512x512", got {body.size!r}')
        width, height = int(m[1]), int(m[2])
        if width % size_multiple or height % size_multiple:
            raise ValidationError(
                "size", f"width and height must be multiples of {size_multiple}, got {body.size}"
            )
        if width > limits.max_width or height > limits.max_height:
            raise ValidationError(
                "size", f"at most {limits.max_width}x{limits.max_height}, got {body.size}"
            )
    if not body.prompt.strip():
        raise ValidationError("prompt", "must not be blank")
    if len(body.prompt) > limits.max_prompt_chars:
        raise ValidationError(
            "prompt", f"is {len(body.prompt)} characters, over {limits.max_prompt_chars}"
        )
    if len(body.negative_prompt) > limits.max_prompt_chars:
        raise ValidationError("negative_prompt", f"over {limits.max_prompt_chars} characters")
    if body.n > limits.max_num_images:
        raise ValidationError("n", f"must be between 1 and {limits.max_num_images}")
    if body.steps is not None and body.steps > limits.max_steps:
        raise ValidationError("steps", f"must be between 1 and {limits.max_steps}")
    if body.scheduler is not None:
        if not _SCHEDULER.match(body.scheduler):
            raise ValidationError("scheduler", "letters, digits and _ only")
        resolve_scheduler(body.scheduler)  # the service's own check (ValidationError)
    defaults = GenerationRequest(prompt="")
    request = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        seed=body.seed if body.seed is not None else uuid.uuid4().int % 2**31,
        steps=body.steps or defaults.steps,
        scheduler=body.scheduler or defaults.scheduler,
        guidance_scale=(
            body.guidance_scale if body.guidance_scale is not None else defaults.guidance_scale
        ),
        width=width,
        height=height,
        num_images=body.n,
        request_id=job_id,
        metadata={"gateway.user": body.user} if body.user else {},
        priority=body.priority,
        preview=bool(getattr(body, "preview", False)),
    )
    check_envelope(request, settings.envelope_limits(), time.time())
    return request


def _body_hash(body: BaseModel) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# body size limit (pure ASGI, before anything reads the body)


class _TooLarge(HTTPException):
    """Raised as the body is read past the limit: an HTTPException, which FastAPI passes on
    as it is (any other error while it reads the body becomes a 400), so a chunked body with
    no Content-Length gets its 413 too."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"body over {limit} bytes")


class BodyLimit:
    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    await self._too_large()(scope, receive, send)
                    return
        seen = 0
        started = False

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        async def tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._too_large()(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        """The 413, built only when it is sent (not for every request)."""
        return JSONResponse(status_code=413, content={"detail": f"body over {self.limit} bytes"})


class RouteMetrics:
    """Requests by route, method and status, and their latency to the response's start (pure
    ASGI: Starlette's `BaseHTTPMiddleware` would run every response, and every chunk of an
    events stream, through a task group and a memory stream of its own)."""

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            recorded = True
            path = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.gateway.requests.labels(path, method, str(status)).inc()
            self.gateway.latency.labels(path, method).observe(time.perf_counter() - start)

        async def started(message: MutableMapping[str, Any]) -> None:
            if not recorded and message["type"] == "http.response.start":
                record(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, started)
        finally:
            if not recorded:
                record(500)


# ---------------------------------------------------------------------------------------------
# the app


class _Turn:
    """A lock and how many requests hold or await it (the last one out removes it)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Gateway:
    """What the routes share: settings, keys, the Kafka backend, limits, metrics."""

    def __init__(
        self,
        settings: Settings,
        gateway: GatewaySettings,
        keys: KeyStore,
        backend: Backend,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.gw = gateway
        self.keys = keys
        self.backend = backend
        self.replica = uuid.uuid4().hex[:12]
        self.buckets: dict[str, TokenBucket] = {}
        self.in_flight: dict[str, int] = {}
        #: (key id, Idempotency-Key) -> the turn its requests take
        self.idempotency_turns: dict[tuple[str, str], _Turn] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.tracer = get_tracer(tracer_provider) if settings.tracing else trace.NoOpTracer()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_http_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_http_request_seconds",
            "HTTP request latency by route (to the response's start; streams excluded)",
            ["route", "method"],
            registry=self.registry,
        )

    # -- keys and limits ---------------------------------------------------------------------

    def authorize(self, request: Request, route: str) -> ApiKey:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        key = self.keys.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise _Refused(
                JSONResponse(
                    status_code=401,
                    content={"detail": "a valid API key is needed: Authorization: Bearer KEY"},
                    headers={"WWW-Authenticate": "Bearer"},
                )
            )
        if not key.allows(route):
            raise _Refused(
                JSONResponse(status_code=403, content={"detail": f"key not allowed {route}"})
            )
        now = time.monotonic()
        bucket = self.buckets.get(key.key_id)
        if bucket is None:
            bucket = self.buckets[key.key_id] = TokenBucket(key.rate_per_s, key.burst, now)
        wait = bucket.take(now)
        if wait > 0:
            raise _Refused(
                JSONResponse(
                    status_code=429,
                    content={"detail": "rate limit"},
                    headers={"Retry-After": retry_after_header(wait)},
                )
            )
        return key

    @contextlib.contextmanager
    def slot(self, key: ApiKey) -> Any:
        """One of the key's concurrent requests (429 when all are taken)."""
        if self.in_flight.get(key.key_id, 0) >= key.max_concurrent:
            raise _Refused(
                JSONResponse(
                    status_code=429,
                    content={"detail": f"more than {key.max_concurrent} requests in flight"},
                    headers={"Retry-After": "1"},
                )
            )
        self.in_flight[key.key_id] = self.in_flight.get(key.key_id, 0) + 1
        try:
            yield
        finally:
            self.in_flight[key.key_id] -= 1

    # -- jobs --------------------------------------------------------------------------------

    async def job_for(self, key: ApiKey, job_id: str) -> Job:
        """The job if `key` created it; 404 otherwise (waiting briefly for the tail); 503 when
        the job is not known here and the broker does not answer (not "no such job": it may
        well be on the topics)."""
        job = self.backend.book.get(job_id)
        if job is None or job.registration is None:
            caught_up = await self.backend.catch_up(self.gw.catchup_wait_s)
            job = self.backend.book.get(job_id)
            unknown = job is None or job.registration is None
            if unknown and not caught_up and not await self.backend.reachable():
                raise KafkaUnavailable(f"cannot read the topics for job {job_id[:80]!r}")
        if job is None or job.registration is None or job.registration.owner != key.key_id:
            raise _Refused(JSONResponse(status_code=404, content={"detail": "no such job"}))
        return job

    def image_url(self, job_id: str, index: int) -> str:
        return f"{self.gw.image_base_url.rstrip('/')}/v1/images/{job_id}/{index}.png"

    def job_json(self, job: Job) -> dict[str, Any]:
        reg = job.registration
        out: dict[str, Any] = {
            "id": job.job_id,
            "status": job.status,
            "created_at": reg.created_ms if reg else None,
            "started_at": job.started_ms,
            "finished_at": job.finished_ms,
            "progress": {"step": job.step, "steps": job.steps},
            "queue_position": job.queue_position,
            "error": (
                {"reason": job.reason, "message": job.message} if job.status == FAILED else None
            ),
            "images": [
                {
                    "index": img.index,
                    "width": img.width,
                    "height": img.height,
                    "url": self.image_url(job.job_id, img.index),
                }
                for img in job.images
            ],
            "seed": job.result.seed if job.result is not None else None,
            "urls": {
                "self": f"/v1/jobs/{job.job_id}",
                "events": f"/v1/jobs/{job.job_id}/events",
                "cancel": f"/v1/jobs/{job.job_id}/cancel",
            },
        }
        return out

    async def image_bytes(self, job: Job, index: int) -> bytes | None:
        for img in job.images:
            if img.index != index:
                continue
            if img.png is not None:
                return img.png
            if img.uri is not None:
                path = self._stored_path(img.uri)
                if path is not None:
                    with contextlib.suppress(OSError):
                        return await asyncio.to_thread(path.read_bytes)
        return None

    def _stored_path(self, uri: str) -> Path | None:
        """The file under the service's output_dir that `uri` names, or None."""
        root = self.settings.output_dir.resolve()
        base = self.settings.output_uri_base
        if base and uri.startswith(base.rstrip("/") + "/"):
            path = root / uri[len(base.rstrip("/")) + 1 :]
        elif uri.startswith("file://"):
            path = Path(uri[len("file://") :])
        else:
            return None
        path = path.resolve()
        return path if path.is_relative_to(root) and path.suffix == ".png" else None

    async def submit(
        self, request: Request, key: ApiKey, body: GenerationBody, idem: str | None
    ) -> tuple[Job, bool]:
        """Register and send a job; (job, created). An Idempotency-Key seen before with the same
        body gives its job again (created False); with another body, 422. Requests with the same
        key's same Idempotency-Key take turns on this replica, so those sent at once make one
        job (across replicas, see docs/gateway.md "Limits today")."""
        if idem is None:
            return await self._submit(request, key, body, None)
        turn = self.idempotency_turns.setdefault((key.key_id, idem), _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                return await self._submit(request, key, body, idem)
        finally:
            turn.users -= 1
            if not turn.users:
                del self.idempotency_turns[(key.key_id, idem)]

    async def _submit(
        self, request: Request, key: ApiKey, body: GenerationBody, idem: str | None
    ) -> tuple[Job, bool]:
        digest = _body_hash(body)
        now_ms = int(time.time() * 1000)
        ttl_ms = int(self.gw.idempotency_ttl_s * 1000)
        if idem is not None:
            if not 1 <= len(idem) <= 255:
                raise _Refused(_field_error("Idempotency-Key", "1 to 255 characters", "header"))
            await self.backend.catch_up(self.gw.catchup_wait_s)
            seen = self.backend.book.by_idempotency_key(key.key_id, idem, now_ms, ttl_ms)
            if seen is not None:
                if seen.body_sha256 != digest:
                    raise _Refused(
                        _field_error("Idempotency-Key", "already used with another body", "header")
                    )
                job = self.backend.book.get(seen.job_id)
                assert job is not None
                return job, False
        webhook_url = getattr(body, "webhook", None)
        if webhook_url is not None:
            if not re.match(r"^https?://[^\s/]+", webhook_url):
                raise _Refused(_field_error("webhook", "must be an http(s) URL"))
            if self.gw.webhook_secret is None:
                raise _Refused(_field_error("webhook", "webhooks are not enabled on this gateway"))
        job_id = f"{JOB_ID_PREFIX}{uuid.uuid4().hex}"
        try:
            gen = _to_request(body, job_id, self.settings, self.gw.size_multiple)
        except ValidationError as exc:
            raise _Refused(_field_error(exc.field, str(exc))) from exc
        reg = Registration(
            job_id=job_id,
            owner=key.key_id,
            created_ms=now_ms,
            body_sha256=digest,
            idempotency_key=idem,
            webhook=webhook_url,
            response_format=body.response_format,
            preview=gen.preview,
            replica=self.replica,
        )
        # the request's server span is current: the record carries it on
        with producer_span(
            self.tracer,
            self.backend.request_topic,
            [(CORRELATION_ID_HEADER, job_id.encode())],
            message_id=job_id,
        ) as headers:
            await self.backend.submit(reg, gen, list(headers))
        if webhook_url is not None and self.gw.webhook_secret is not None:
            task = asyncio.create_task(self._webhook(job_id, webhook_url))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        job = self.backend.book.get(job_id)
        assert job is not None
        return job, True

    async def _webhook(self, job_id: str, url: str) -> None:
        job = await self.backend.wait_job(job_id, timeout_s=7 * 86_400.0)
        if job is None or not job.terminal or self.gw.webhook_secret is None:
            return
        body = json.dumps(self.job_json(job)).encode()
        await webhook.deliver(
            url,
            body,
            self.gw.webhook_secret.get_secret_value().encode(),
            attempts=self.gw.webhook_attempts,
            backoff_s=self.gw.webhook_backoff_s,
        )


#: not traced: probes and scrapes, many a minute, say nothing about a request
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


class _KeyFor(HTTPBearer):
    """A dependency: the request's API key, allowed `route` and within its rate (401 without a
    valid key, 403 for a key not allowed the route, 429 over its rate).

    An HTTPBearer, so the OpenAPI document declares the bearer scheme on every route that
    needs a key; but one dependency with the request as its only parameter, not HTTPBearer's
    credentials nested in a dependency of ours: FastAPI solves each level and parameter per
    request, which was a fifth of the gateway's CPU per POST."""

    def __init__(self, route: str) -> None:
        super().__init__(
            auto_error=False,
            scheme_name="HTTPBearer",
            description="an API key: `Authorization: Bearer KEY`",
        )
        self.route = route

    # async: a plain `def` dependency would run in a worker thread (a hop out and back, per
    # request) though it never blocks
    async def __call__(self, request: Request) -> ApiKey:  # type: ignore[override]
        gateway: Gateway = request.app.state.gateway
        return gateway.authorize(request, self.route)


GenKey = Annotated[ApiKey, Depends(_KeyFor("generations"))]
JobsKey = Annotated[ApiKey, Depends(_KeyFor("jobs"))]
ImagesKey = Annotated[ApiKey, Depends(_KeyFor("images"))]


#: RFC 7240's `wait` preference: a case-insensitive token, optional whitespace around "=", the
#: delta-seconds bare or quoted
_PREFER_WAIT = re.compile(r'(?:^|,)\s*wait\s*=\s*("?)([0-9]+)\1\s*(?=$|[,;])', re.IGNORECASE)


def _prefer_wait(prefer: str | None, most: float) -> float | None:
    """The seconds `Prefer: wait=N` asks for, at most `most`; None without a valid one."""
    m = _PREFER_WAIT.search(prefer or "")
    return min(float(m[2]), most) if m else None


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110's weak comparison of `If-None-Match` (a list of tags, or *) with `etag`."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def create_app(
    settings: Settings,
    gateway: GatewaySettings,
    *,
    keys: KeyStore | None = None,
    backend: Backend | None = None,
    codec: AvroCodec | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """A fresh gateway app; its lifespan starts and stops the Kafka backend. Each request but
    the probes and scrapes is a server span (FastAPI's), the root of its trace unless a
    `traceparent` header continues one; the Kafka request carries it on (`tracer_provider`:
    default the global one)."""
    if keys is None:
        keys = KeyStore.load(
            gateway.keys_file,
            rate_per_s=gateway.rate_per_s,
            burst=gateway.burst,
            max_concurrent=gateway.max_concurrent,
            extra_plain_keys=(
                {"dev": gateway.dev_key.get_secret_value()} if gateway.dev_key else None
            ),
        )
    if backend is None:
        backend = Backend(
            settings.kafka(".gateway"),
            codec or AvroCodec(),
            request_topic=settings.request_topic,
            reply_topic=gateway.reply_topic or settings.response_topic,
            response_topics=[settings.response_topic],
            dlq_topic=settings.dlq_topic,
            progress_topic=settings.progress_topic,
            control_topic=settings.control_topic,
            registry_topic=gateway.registry_topic,
            lookback_s=gateway.lookback_s,
            timeout_ms=gateway.kafka_timeout_ms,
            fetch_wait_ms=gateway.fetch_wait_ms,
        )
    gw = Gateway(settings, gateway, keys, backend, tracer_provider)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # diffusers' scheduler classes are looked up once (about a second), not in a request
        await asyncio.to_thread(resolve_scheduler, "euler")
        await gw.backend.start()
        try:
            yield
        finally:
            for task in list(gw.tasks):
                task.cancel()
            await gw.backend.stop()

    # /docs: Swagger UI from files the fastapi-offline package ships, served under /docs/assets
    # (FastAPI's own page loads them from a CDN: blank where the gateway has no internet)
    app = FastAPIOffline(
        redoc_url=None,
        static_url="/docs/assets",
        title="orchestrator gateway",
        version="1",
        lifespan=lifespan,
        # FastAPI's own server span (and its dependency and endpoint spans) is the request's
        # trace root, or continues an incoming `traceparent`; metrics are Prometheus's above
        telemetry={
            "tracing": settings.tracing,
            "tracer_provider": tracer_provider,
            "metrics": False,
            "logs": False,
            "exclude": lambda scope: scope.get("path") in _UNTRACED,
        },
        description="HTTP front door of the diffusion orchestrator (requests go through Kafka).",
    )
    app.state.gateway = gw

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> Response:
        return exc.response

    @app.exception_handler(KafkaUnavailable)
    async def kafka_down(request: Request, exc: KafkaUnavailable) -> Response:
        log.warning("%s", exc)
        return JSONResponse(
            status_code=503,
            content={"detail": "Kafka unavailable, try again later"},
            headers={"Retry-After": str(_RETRY_KAFKA_S)},
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("gateway: unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(status_code=500, content={"detail": "internal error"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    app.add_middleware(BodyLimit, limit=gateway.max_body_bytes)
    # outermost: counts the body limit's 413s too (route "unmatched" when refused before routing)
    app.add_middleware(RouteMetrics, gateway=gw)

    @app.post("/v1/images/generations", tags=["openai"])
    async def generations(request: Request, body: GenerationBody, key: GenKey) -> Response:
        with gw.slot(key):
            job, _ = await gw.submit(request, key, body, None)
            job = await gw.backend.wait_job(job.job_id, gateway.sync_wait_s) or job
        if not job.terminal:
            return JSONResponse(
                status_code=504,
                content={
                    "error": {"message": "not done in time; follow the job", "type": "timeout"},
                    "id": job.job_id,
                    "urls": gw.job_json(job)["urls"],
                },
            )
        if job.status != SUCCEEDED:
            code = 409 if job.status == "cancelled" else 502
            if job.reason == "invalid_request":
                code = 422
            return JSONResponse(
                status_code=code,
                content={
                    "error": {"message": job.message or job.status, "type": job.reason},
                    "id": job.job_id,
                },
            )
        data: list[dict[str, Any]] = []
        for img in job.images:
            if body.response_format == "b64_json":
                png = await gw.image_bytes(job, img.index)
                data.append({"b64_json": base64.b64encode(png or b"").decode("ascii")})
            else:
                data.append({"url": gw.image_url(job.job_id, img.index)})
        return JSONResponse({"created": int(time.time()), "id": job.job_id, "data": data})

    @app.post("/v1/jobs", status_code=202, tags=["jobs"])
    async def create_job(
        request: Request,
        body: JobBody,
        key: JobsKey,
        idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
        prefer: Annotated[str | None, Header(max_length=200)] = None,
    ) -> Response:
        with gw.slot(key):
            job, created = await gw.submit(request, key, body, idempotency_key)
            wait = _prefer_wait(prefer, gateway.max_prefer_wait_s)
            headers = {"Location": f"/v1/jobs/{job.job_id}"}
            if wait is not None:
                headers["Preference-Applied"] = f"wait={wait:g}"  # the wait applied: bounded
                job = await gw.backend.wait_job(job.job_id, wait) or job
        code = 200 if job.terminal or not created else 202
        return JSONResponse(gw.job_json(job), status_code=code, headers=headers)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str, key: JobsKey) -> Response:
        job = await gw.job_for(key, job_id)
        return JSONResponse(gw.job_json(job))

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, tags=["jobs"])
    async def cancel_job(job_id: str, key: JobsKey) -> Response:
        job = await gw.job_for(key, job_id)
        if not job.terminal:
            await gw.backend.cancel(job_id, f"cancelled over HTTP by {key.key_id}")
        return JSONResponse(gw.job_json(job), status_code=200 if job.terminal else 202)

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["jobs"],
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}},
            204: {"description": "`Last-Event-ID` is the outcome's: the stream has ended"},
        },
    )
    async def job_events(
        job_id: str,
        key: JobsKey,
        previews: bool = False,
        last_event_id: Annotated[str | None, Header(max_length=32)] = None,
    ) -> Response:
        job = await gw.job_for(key, job_id)
        # an id this stream did not send (not ASCII digits: "abc", "-1", "²") replays it all
        resumed = re.fullmatch(r"[0-9]{1,18}", last_event_id or "")
        after = int(resumed[0]) if resumed else 0
        if job.terminal and after > len(job.events):
            # the client has the outcome (its id is one past the progress events): a 204 tells
            # an EventSource to stop reconnecting, not to get the outcome again every few seconds
            return Response(status_code=204)

        async def stream() -> AsyncIterator[bytes]:
            sent = after
            current = job
            while True:
                # what came since the last wake-up goes out in one write, the outcome with it
                chunk = [
                    f"id: {ev.seq}\nevent: progress\n"
                    f"data: {json.dumps(progress_data(ev.record, previews))}\n\n"
                    for ev in current.events[sent:]
                ]
                sent = max(sent, len(current.events))
                if current.terminal:
                    chunk.append(
                        f"id: {sent + 1}\nevent: outcome\n"
                        f"data: {json.dumps(gw.job_json(current))}\n\n"
                    )
                    yield "".join(chunk).encode()
                    return
                if chunk:
                    yield "".join(chunk).encode()
                version = current.version
                got = await gw.backend.wait_job(job_id, 15.0, version=version)
                if got is not None:
                    current = got
                if current.version == version:
                    yield b": keep-alive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/v1/images/{job_id}/{index}.png",
        tags=["images"],
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}},
            304: {"description": "`If-None-Match` names the image's ETag"},
        },
    )
    async def get_image(request: Request, job_id: str, index: int, key: ImagesKey) -> Response:
        job = await gw.job_for(key, job_id)
        png = await gw.image_bytes(job, index)
        if png is None and not job.terminal:
            # another replica may have answered already: read up to now first
            await gw.backend.catch_up(gateway.catchup_wait_s)
            png = await gw.image_bytes(job, index)
        if png is None:
            return JSONResponse(status_code=404, content={"detail": "no such image"})
        cache = {
            "Cache-Control": "private, max-age=31536000, immutable",
            "ETag": f'"{hashlib.sha256(png).hexdigest()[:32]}"',
        }
        if _etag_matches(request.headers.get("if-none-match"), cache["ETag"]):
            return Response(status_code=304, headers=cache)
        return Response(png, media_type="image/png", headers=cache)

    # HEAD: the same headers without the body (caches, link checkers); kept out of the OpenAPI
    # document, where it would repeat the GET's operation id
    app.add_api_route(
        "/v1/images/{job_id}/{index}.png",
        get_image,
        methods=["HEAD"],
        response_class=Response,
        include_in_schema=False,
    )

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        if await gw.backend.reachable():
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            status_code=503, content={"status": "kafka unreachable"}, headers={"Retry-After": "5"}
        )

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics_route() -> Response:
        return Response(generate_latest(gw.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files("orchestrator.gateway").joinpath("static/index.html")
        return HTMLResponse(page.read_text("utf-8"), headers={"Cache-Control": "no-cache"})

    return app
