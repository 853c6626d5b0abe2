"""The service loop: Kafka records in, jobs through Triton, results and dead letters out.

One way in, one way out: record -> decode -> validate -> job (through the step batcher) ->
result record -> publish (acknowledged) -> mark done -> commit. Any failure on that way becomes a
dead-letter record carrying the original bytes and the reason, then the offset is committed. A
record whose answer the broker did not acknowledge stays uncommitted and is delivered again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka.structs import ConsumerRecord
from opentelemetry import trace

from orchestrator.adapters.avro import (
    AvroCodec,
    GenerationResultRecord,
    HttpSchemaRegistry,
    ImageRecord,
    LocalSchemaDirectory,
)
from orchestrator.adapters.http import HealthServer
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    REPLY_TOPIC_HEADER,
    Headers,
    KafkaConsumerAdapter,
    KafkaProducerAdapter,
    KafkaSettings,
    dead_letter_headers,
    header_str,
)
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.tracing import extract, get_tracer, producer_span
from orchestrator.adapters.triton import TritonClient, grpc_code
from orchestrator.batcher import BatchRecord, StepBatcher
from orchestrator.breaker import CircuitBreaker
from orchestrator.config import Settings
from orchestrator.core.batching import FlushPolicy
from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER, Job, start_job
from orchestrator.domain import GeneratedImages, GenerationRequest, ModelInfo, StageCall
from orchestrator.errors import DeadlineExceeded, OrchestratorError, PublishError
from orchestrator.executor import JobStats, StageRunner, run_job
from orchestrator.imagefile import encode_png
from orchestrator.logs import request_context

log = logging.getLogger("orchestrator.service")


def kafka_settings(settings: Settings) -> KafkaSettings:
    return settings.kafka()


def make_codec(settings: Settings) -> AvroCodec:
    schemas = LocalSchemaDirectory(settings.schema_dir) if settings.schema_dir else None
    registry = (
        HttpSchemaRegistry(settings.schema_registry_url) if settings.schema_registry_url else None
    )
    return AvroCodec(registry=registry, schemas=schemas)


class RecordTooLarge(OrchestratorError):
    reason = "record_too_large"


@dataclasses.dataclass
class ServiceStats:
    """Counters the tests read (the metrics endpoint has the same and more)."""

    received: int = 0
    answered: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    retries: int = 0
    dead_letters_by_reason: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    batches: list[BatchRecord] = dataclasses.field(default_factory=list)
    max_in_flight_seen: int = 0
    max_buffered_bytes_seen: int = 0


@dataclasses.dataclass(frozen=True)
class Answer:
    topic: str
    value: bytes
    key: bytes | None
    headers: Headers


_STAGE_OF_MODEL = {
    ENCODE_PROMPT: "encode_prompt",
    VAE_ENCODER: "encode_image",
    UNET: "denoise",
    VAE_DECODER: "decode",
}


class Service:
    """Wires Kafka, the core and Triton. `run()` until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_ready: Callable[[], None] | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.codec = make_codec(settings)
        self.kafka = kafka_settings(settings)
        self.stats = ServiceStats()
        self.metrics = metrics or Metrics()
        self.on_ready = on_ready
        self.tracer = get_tracer(tracer_provider) if settings.tracing else trace.NoOpTracer()
        self.triton = TritonClient(
            settings.triton_url,
            timeout_s=settings.triton_timeout_s,
            ssl=settings.triton_ssl,
            on_error=self._on_triton_error,
            propagate_trace=settings.tracing,
        )
        self.breaker = CircuitBreaker(
            self.triton.is_ready,
            failure_threshold=settings.breaker_failure_threshold,
            probe_interval_s=settings.breaker_probe_interval_s,
            on_change=lambda is_open: self.metrics.breaker_open.set(1 if is_open else 0),
        )
        self.producer = KafkaProducerAdapter(self.kafka, max_record_bytes=settings.max_record_bytes)
        self.consumer = KafkaConsumerAdapter(
            self.kafka,
            [settings.request_topic],
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            before_revoke=self._drain_partitions,
            consumer_options={
                "rebalance_timeout_ms": settings.rebalance_timeout_ms,
                "fetch_max_wait_ms": settings.fetch_max_wait_ms,
            },
        )
        self.http = HealthServer(
            settings.http_host,
            settings.http_port,
            metrics=self.metrics.render,
            liveness=self._liveness,
            readiness=self._readiness,
        )
        self.info: ModelInfo | None = None
        self.runner: StageRunner = self.triton
        self.batcher: StepBatcher | None = None
        self.retry = settings.retry_policy()
        self._stopping = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._task_partition: dict[asyncio.Task[None], tuple[str, int]] = {}
        self._buffered = 0
        #: request_id -> its answer, for redelivered or repeated requests (bounded, LRU)
        self._answers: collections.OrderedDict[str, Answer] = collections.OrderedDict()
        self._in_progress: dict[str, asyncio.Future[Answer | None]] = {}
        self._last_loop = time.monotonic()
        self._broker_ok = False
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _wait_for_models(self) -> ModelInfo:
        delay = 0.2
        while True:
            try:
                return await self.triton.model_info()
            except OrchestratorError as exc:
                if not exc.retriable or self._stopping.is_set():
                    raise
                log.warning("waiting for Triton at %s: %s", self.settings.triton_url, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run(self) -> None:
        await self.http.start()
        try:
            await asyncio.to_thread(self.codec.prepare)
            self.info = await self._wait_for_models()
            if self.settings.batching == "step":
                max_rows = {
                    UNET: self.info.unet_max_batch_size or 64,
                    ENCODE_PROMPT: 64,
                    VAE_ENCODER: 64,
                    VAE_DECODER: 64,
                }
                self.batcher = StepBatcher(
                    self.triton,
                    max_rows,
                    FlushPolicy(self.settings.batch_max_wait_ms / 1000.0),
                    on_batch=self._on_batch,
                    tracer=self.tracer,
                )
                self.runner = self.batcher
            await self.producer.start()
            await self.consumer.start()
            self._broker_ok = True
            self._running = True
            log.info(
                "consuming %s as group %s (metrics and probes on :%d)",
                self.settings.request_topic,
                self.consumer.group_id,
                self.http.port,
            )
            if self.on_ready is not None:
                self.on_ready()
            try:
                await self._consume_loop()
            finally:
                self._running = False
                await self._drain()
                await self.consumer.stop(commit=True)
                await self.producer.stop()
        finally:
            await self.breaker.close()
            await self.triton.close()
            await self.http.stop()

    async def _consume_loop(self) -> None:
        paused_for: str | None = None
        last_probe = 0.0
        while not self._stopping.is_set():
            self._last_loop = time.monotonic()
            cause = self._pause_cause()
            if cause != paused_for:
                assignment = self.consumer.assignment()
                if cause is not None:
                    self.consumer.pause(assignment)
                    log.info("pausing consumption: %s", cause)
                else:
                    self.consumer.resume(assignment)
                    log.info("resuming consumption")
                if paused_for is not None:
                    self.metrics.paused.labels(paused_for).set(0)
                if cause is not None:
                    self.metrics.paused.labels(cause).set(1)
                paused_for = cause
            elif cause is not None:
                # partitions assigned by a rebalance while paused start unpaused: pause them too
                self.consumer.pause(self.consumer.assignment())
            free = self.settings.max_in_flight - len(self._tasks)
            try:
                records = await self.consumer.getmany(
                    timeout_ms=100 if cause else 200, max_records=max(1, free)
                )
            except Exception as exc:
                log.warning("fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for record in records:
                self._spawn(record)
            await self._commit()
            now = time.monotonic()
            if now - last_probe > 5.0:
                last_probe = now
                await self._observe()

    def _pause_cause(self) -> str | None:
        if self.breaker.is_open:
            return "triton_down"
        if len(self._tasks) >= self.settings.max_in_flight:
            return "in_flight"
        if self._buffered >= self.settings.max_buffered_bytes:
            return "buffered_bytes"
        return None

    def _spawn(self, record: ConsumerRecord[bytes, bytes]) -> None:
        size = len(record.value or b"")
        self._buffered += size
        task = asyncio.create_task(self._handle(record))
        self._tasks[task] = size
        self._task_partition[task] = (record.topic, record.partition)
        task.add_done_callback(self._task_done)
        self.metrics.in_flight.set(len(self._tasks))
        self.metrics.buffered_bytes.set(self._buffered)
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, len(self._tasks))
        self.stats.max_buffered_bytes_seen = max(self.stats.max_buffered_bytes_seen, self._buffered)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._buffered -= self._tasks.pop(task, 0)
        self._task_partition.pop(task, None)
        self.metrics.in_flight.set(len(self._tasks))
        self.metrics.buffered_bytes.set(self._buffered)

    async def _observe(self) -> None:
        self._broker_ok = await self.consumer.broker_reachable(timeout_s=3.0)
        with contextlib.suppress(Exception):
            for (topic, partition), lag in (await self.consumer.lag()).items():
                self.metrics.consumer_lag.labels(topic, str(partition)).set(lag)

    async def _commit(self) -> None:
        try:
            await self.consumer.commit_done()
        except Exception as exc:  # a rebalance in progress; the next round commits
            log.warning("commit failed, will retry: %r", exc)

    async def _drain(self) -> None:
        """Give in-flight work the grace period; what is unfinished stays uncommitted."""
        if not self._tasks:
            return
        log.info(
            "draining %d jobs (grace %.0f s)", len(self._tasks), self.settings.shutdown_grace_s
        )
        _, pending = await asyncio.wait(list(self._tasks), timeout=self.settings.shutdown_grace_s)
        if pending:
            log.warning("%d jobs unfinished at the deadline: left for redelivery", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _drain_partitions(self, revoked: set[tuple[str, int]]) -> None:
        """Before partitions go to another member, let their in-flight jobs finish (within
        half the rebalance timeout), so their answers are committed here and not recomputed."""
        tasks = [t for t, tp in self._task_partition.items() if tp in revoked]
        if not tasks:
            return
        budget = self.settings.rebalance_timeout_ms / 2000.0
        log.info(
            "rebalance: finishing %d jobs of revoked partitions (up to %.1f s)", len(tasks), budget
        )
        _, pending = await asyncio.wait(tasks, timeout=budget)
        if pending:
            log.info(
                "rebalance: %d jobs unfinished, their records will be redelivered", len(pending)
            )

    # -- probes ------------------------------------------------------------------------------

    def _liveness(self) -> tuple[bool, dict[str, object]]:
        stalled = time.monotonic() - self._last_loop
        ok = not self._running or stalled < self.settings.stall_timeout_s
        return ok, {"consume_loop_idle_s": round(stalled, 3)}

    def _readiness(self) -> tuple[bool, dict[str, object]]:
        triton_up = not self.breaker.is_open
        ok = self._running and not self.stopping and self._broker_ok and triton_up
        return ok, {
            "consuming": self._running and not self.stopping,
            "broker": self._broker_ok,
            "triton": triton_up,
            "in_flight": len(self._tasks),
        }

    # -- one record --------------------------------------------------------------------------

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        started = time.monotonic()
        delay = 1.0
        try:
            # neither the answer nor a dead letter reached the broker: try again (the slot
            # stays taken, so a broker outage also holds back fetching) until it does, or
            # until shutdown leaves the record uncommitted for redelivery
            while not await self._process(record):
                if self.stopping:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            self.consumer.mark_done(record)
            self.metrics.request_duration.observe(time.monotonic() - started)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "unexpected failure handling %s/%s@%s",
                record.topic,
                record.partition,
                record.offset,
            )

    def _process_span(self, record: ConsumerRecord[bytes, bytes]) -> Any:
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": self.consumer.group_id,
            "messaging.message.body.size": len(record.value or b""),
        }
        if record.key is not None:
            attributes["messaging.kafka.message.key"] = record.key.decode("utf-8", "replace")
        return self.tracer.start_as_current_span(
            f"process {record.topic}",
            context=extract(record.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )

    async def _process(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        with self._process_span(record) as span:
            return await self._process_in_span(record, span)

    async def _process_in_span(self, record: ConsumerRecord[bytes, bytes], span: Any) -> bool:
        """Answer one record; True once its answer is acknowledged by the broker."""
        self.stats.received += 1
        headers: Headers = list(record.headers or [])
        correlation = header_str(headers, CORRELATION_ID_HEADER)
        request: GenerationRequest | None = None
        stage = "decode"
        stats = JobStats()
        try:
            if len(record.value or b"") > self.settings.max_request_bytes:
                raise RecordTooLarge(
                    f"request record is {len(record.value or b'')} bytes, more than the "
                    f"{self.settings.max_request_bytes} allowed",
                    stage="decode",
                )
            decoded = self.codec.decode_request_record(record.value or b"")
            request = decoded.request
            span.set_attribute("request.id", request.request_id)
            span.set_attribute("messaging.message.id", request.request_id)
            reply_topic = (
                header_str(headers, REPLY_TOPIC_HEADER)
                or decoded.reply_topic
                or self.settings.response_topic
            )
            with request_context(request.request_id):
                duplicate = await self._duplicate_answer(request.request_id)
                if duplicate is not None:
                    self.stats.duplicates += 1
                    self.metrics.duplicates.inc()
                    self.metrics.requests.labels("duplicate").inc()
                    span.set_attribute("request.duplicate", True)
                    await self._publish(duplicate)
                    return True
                answer = await self._generate_and_publish(
                    request, reply_topic, correlation, stats, span
                )
                self._remember(request.request_id, answer)
            self.stats.answered += 1
            self.metrics.requests.labels("answered").inc()
            self.stats.retries += stats.retries
            return True
        except _Failed as failed:
            exc = failed.error
            stage = failed.stage
        except Exception as e:
            exc = e
        self.stats.retries += stats.retries
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        if isinstance(exc, PublishError) and exc.retriable:
            # the producer's own retries gave up on the answer (an unknown reply topic, say):
            # dead-letter it rather than hold the partition's commits back; if the dead-letter
            # topic cannot take it either, the offset stays uncommitted and it comes again
            log.error("could not publish the answer to offset %s: %s", record.offset, exc)
        return await self._dead_letter(record, exc, stage, request, correlation, stats)

    async def _generate_and_publish(
        self,
        request: GenerationRequest,
        reply_topic: str,
        correlation: str | None,
        stats: JobStats,
        span: Any,
    ) -> Answer:
        fut: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        if request.request_id:
            self._in_progress[request.request_id] = fut
        stage = "validate"
        try:
            if request.deadline is not None and time.time() >= request.deadline:
                raise DeadlineExceeded("the request's deadline passed before it was started")
            assert self.info is not None
            job = start_job(request, self.info, self.settings.limits())
            span.set_attribute("diffusion.steps", request.steps)
            span.set_attribute("diffusion.scheduler", request.scheduler)
            stage = "generate"
            generated = await self._run(job, stats)
            for model, ms in generated.timings_ms.items():
                if model in _STAGE_OF_MODEL:
                    self.metrics.stage_duration.labels(_STAGE_OF_MODEL[model]).observe(ms / 1000)
            stage = "encode_image_file"
            t0 = time.perf_counter()
            with self.tracer.start_as_current_span("encode image file"):
                record = self._result_record(request, generated)
                value = self.codec.encode_result(record)
            self.metrics.stage_duration.labels("encode_png").observe(time.perf_counter() - t0)
            stage = "publish"
            answer = Answer(
                topic=reply_topic,
                value=value,
                key=request.request_id.encode() if request.request_id else None,
                headers=self._answer_headers(correlation or request.request_id),
            )
            t0 = time.perf_counter()
            answer = await self._publish(answer)
            self.metrics.stage_duration.labels("publish").observe(time.perf_counter() - t0)
            fut.set_result(answer)
            return answer
        except Exception as exc:
            raise _Failed(exc, stage) from exc
        finally:
            if not fut.done():
                fut.set_result(None)
            self._in_progress.pop(request.request_id, None)

    async def _run(self, job: Job, stats: JobStats) -> GeneratedImages:
        def on_retry(call: StageCall, exc: BaseException) -> None:
            self.metrics.retries.labels(call.model).inc()
            log.warning("retrying %s for %s: %s", call.model, job.request.request_id, exc)

        kwargs: dict[str, Any] = {"breaker": self.breaker, "tracer": self.tracer}
        with self.tracer.start_as_current_span("generate"):
            if self.batcher is not None:
                async with self.batcher.job():
                    return await run_job(job, self.batcher, self.retry, on_retry, stats, **kwargs)
            return await run_job(job, self.runner, self.retry, on_retry, stats, **kwargs)

    async def _duplicate_answer(self, request_id: str) -> Answer | None:
        if not request_id:
            return None
        cached = self._answers.get(request_id)
        if cached is not None:
            self._answers.move_to_end(request_id)
            return cached
        pending = self._in_progress.get(request_id)
        if pending is not None:
            return await asyncio.shield(pending)
        return None

    def _remember(self, request_id: str, answer: Answer) -> None:
        if not request_id or self.settings.answer_cache_size == 0:
            return
        self._answers[request_id] = answer
        while len(self._answers) > self.settings.answer_cache_size:
            self._answers.popitem(last=False)

    def _answer_headers(self, correlation: str | None) -> Headers:
        return [(CORRELATION_ID_HEADER, correlation.encode())] if correlation else []

    def _result_record(
        self, request: GenerationRequest, generated: GeneratedImages
    ) -> GenerationResultRecord:
        images = []
        for i, img in enumerate(generated.images):
            png = encode_png(img)
            height, width = int(img.shape[0]), int(img.shape[1])
            if len(png) <= self.settings.inline_image_max_bytes:
                images.append(ImageRecord(index=i, width=width, height=height, png=png))
            else:
                path = self._store(request.request_id, i, png)
                images.append(ImageRecord(index=i, width=width, height=height, uri=path.as_uri()))
        return GenerationResultRecord(
            request_id=request.request_id,
            images=tuple(images),
            seed=generated.seed,
            timings_ms=dict(generated.timings_ms),
            model_versions=dict(generated.model_versions),
            prompt_truncated=generated.prompt_truncated,
            metadata=dict(request.metadata),
        )

    def _store(self, request_id: str, index: int, png: bytes) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in request_id) or "anonymous"
        folder = self.settings.output_dir.resolve() / safe
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        return path

    async def _publish(self, answer: Answer) -> Answer:
        """Publish and await the broker's acknowledgement, inside a producer span."""
        with producer_span(self.tracer, answer.topic, answer.headers) as headers:
            # the trace goes on with the answer
            await self.producer.publish(answer.topic, answer.value, key=answer.key, headers=headers)
        return dataclasses.replace(answer, headers=headers)

    async def _dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        exc: BaseException,
        stage: str,
        request: GenerationRequest | None,
        correlation: str | None,
        stats: JobStats,
    ) -> bool:
        reason = exc.reason if isinstance(exc, OrchestratorError) else "internal_error"
        if isinstance(exc, OrchestratorError) and exc.stage is None:
            exc.stage = stage
        if not isinstance(exc, OrchestratorError):
            log.error("internal error on %s@%s", record.partition, record.offset, exc_info=exc)
        code = grpc_code(exc)
        headers = dead_letter_headers(
            exc,
            original_topic=record.topic,
            original_partition=record.partition,
            original_offset=record.offset,
            original_timestamp=record.timestamp if (record.timestamp or 0) >= 0 else None,
            consumer_group=self.consumer.group_id,
            attempts=stats.retries + 1,
            original_headers=list(record.headers or []),
        )
        if code is not None:
            headers.append(("dlq.error.grpc_code", code.encode()))
        if correlation is None and request is not None and request.request_id:
            headers.append((CORRELATION_ID_HEADER, request.request_id.encode()))
        try:
            await self._publish(
                Answer(self.settings.dlq_topic, record.value or b"", record.key, headers)
            )
        except PublishError as perr:
            log.error("could not dead-letter offset %s: %s", record.offset, perr)
            return False
        self.stats.dead_lettered += 1
        self.stats.dead_letters_by_reason[reason] += 1
        self.metrics.dead_letters.labels(reason).inc()
        self.metrics.requests.labels("dead_lettered").inc()
        log.info(
            "dead-lettered %s@%s: %s: %s",
            record.partition,
            record.offset,
            reason,
            exc,
            extra={"request_id": request.request_id if request else None},
        )
        return True

    def _on_batch(self, rec: BatchRecord) -> None:
        self.metrics.batch_size.labels(rec.model).observe(rec.rows)
        self.stats.batches.append(rec)
        if len(self.stats.batches) > 10_000:
            del self.stats.batches[:5_000]

    def _on_triton_error(self, model: str, code: str) -> None:
        self.metrics.triton_errors.labels(model, code).inc()


class _Failed(Exception):
    """Carries the stage a failure happened in out of the generation path."""

    def __init__(self, error: Exception, stage: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.stage = stage


async def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    """Run the service until SIGINT/SIGTERM, then finish in-flight work and exit."""
    import signal

    from orchestrator.adapters.tracing import setup_tracing

    provider = setup_tracing() if settings.tracing else None
    service = Service(settings, on_ready=on_ready, tracer_provider=provider)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, service.stop)
    try:
        await service.run()
    finally:
        if provider is not None:
            provider.shutdown()
