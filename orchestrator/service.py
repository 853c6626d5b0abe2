"""The service loop: Kafka records in, jobs through Triton, results and dead letters out.

One way in, one way out: record -> decode -> validate -> job (through the step batcher) ->
result record -> publish (acknowledged) -> mark done -> commit. Any failure on that way becomes a
dead-letter record carrying the original bytes and the reason, then the offset is committed.
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

from orchestrator.adapters.avro import (
    AvroCodec,
    GenerationResultRecord,
    HttpSchemaRegistry,
    ImageRecord,
    LocalSchemaDirectory,
)
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
from orchestrator.adapters.triton import TritonClient
from orchestrator.batcher import BatchRecord, StepBatcher
from orchestrator.config import Settings
from orchestrator.core.batching import FlushPolicy
from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER, start_job
from orchestrator.domain import GeneratedImages, GenerationRequest, ModelInfo, StageCall
from orchestrator.errors import DeadlineExceeded, OrchestratorError, PublishError
from orchestrator.executor import JobStats, RetryPolicy, StageRunner, run_job
from orchestrator.imagefile import encode_png

log = logging.getLogger("orchestrator.service")


def kafka_settings(settings: Settings) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=settings.bootstrap_servers,
        security_protocol=settings.security_protocol,
        sasl_mechanism=settings.sasl_mechanism,
        sasl_username=settings.sasl_username,
        sasl_password=settings.sasl_password,
        ssl_cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        client_id=settings.client_id,
        group_id=settings.group_id,
    )


def make_codec(settings: Settings) -> AvroCodec:
    schemas = LocalSchemaDirectory(settings.schema_dir) if settings.schema_dir else None
    registry = (
        HttpSchemaRegistry(settings.schema_registry_url) if settings.schema_registry_url else None
    )
    return AvroCodec(registry=registry, schemas=schemas)


@dataclasses.dataclass
class ServiceStats:
    """Counters the tests and the metrics endpoint read."""

    received: int = 0
    answered: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    retries: int = 0
    dead_letters_by_reason: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    batches: list[BatchRecord] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Answer:
    topic: str
    value: bytes
    key: bytes | None
    headers: Headers


class Service:
    """Wires Kafka, the core and Triton. `run()` until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_ready: Callable[[], None] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.codec = make_codec(settings)
        self.kafka = kafka_settings(settings)
        self.stats = ServiceStats()
        self.on_ready = on_ready
        self.on_event = on_event
        self.triton = TritonClient(
            settings.triton_url, timeout_s=settings.triton_timeout_s, ssl=settings.triton_ssl
        )
        self.producer = KafkaProducerAdapter(self.kafka, max_record_bytes=settings.max_record_bytes)
        self.consumer = KafkaConsumerAdapter(
            self.kafka,
            [settings.request_topic],
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            consumer_options={"rebalance_timeout_ms": settings.rebalance_timeout_ms},
        )
        self.info: ModelInfo | None = None
        self.runner: StageRunner = self.triton
        self.batcher: StepBatcher | None = None
        self.retry = RetryPolicy()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: request_id -> its answer, for redelivered or repeated requests (bounded, LRU)
        self._answers: collections.OrderedDict[str, Answer] = collections.OrderedDict()
        self._answer_cache_size = 10_000
        self._in_progress: dict[str, asyncio.Future[Answer | None]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

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
        self.codec.prepare()
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
            )
            self.runner = self.batcher
        await self.producer.start()
        await self.consumer.start()
        log.info("consuming %s as group %s", self.settings.request_topic, self.consumer.group_id)
        if self.on_ready is not None:
            self.on_ready()
        try:
            await self._consume_loop()
        finally:
            await self._drain()
            await self.consumer.stop(commit=True)
            await self.producer.stop()
            await self.triton.close()

    async def _consume_loop(self) -> None:
        paused = False
        while not self._stopping.is_set():
            free = self.settings.max_in_flight - len(self._tasks)
            if free <= 0:
                # back-pressure: keep the group membership alive, fetch nothing new
                if not paused:
                    self.consumer.pause(self.consumer.assignment())
                    paused = True
                await self.consumer.getmany(timeout_ms=100)
                await self._commit()
                continue
            if paused:
                self.consumer.resume(self.consumer.assignment())
                paused = False
            records = await self.consumer.getmany(timeout_ms=200, max_records=free)
            for record in records:
                task = asyncio.create_task(self._handle(record))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await self._commit()

    async def _commit(self) -> None:
        try:
            await self.consumer.commit_done()
        except Exception as exc:  # a rebalance in progress; the next round commits
            log.warning("commit failed, will retry: %r", exc)

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- one record --------------------------------------------------------------------------

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            answered = await self._process(record)
            if answered:
                self.consumer.mark_done(record)
        except Exception:
            log.exception(
                "unexpected failure handling %s/%s@%s",
                record.topic,
                record.partition,
                record.offset,
            )

    async def _process(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """Answer one record; True once its answer is acknowledged by the broker."""
        self.stats.received += 1
        headers: Headers = list(record.headers or [])
        correlation = header_str(headers, CORRELATION_ID_HEADER)
        request: GenerationRequest | None = None
        stage = "decode"
        stats = JobStats()
        try:
            decoded = self.codec.decode_request_record(record.value or b"")
            request = decoded.request
            reply_topic = (
                header_str(headers, REPLY_TOPIC_HEADER)
                or decoded.reply_topic
                or self.settings.response_topic
            )
            duplicate = await self._duplicate_answer(request.request_id)
            if duplicate is not None:
                self.stats.duplicates += 1
                await self._publish(duplicate)
                return True
            fut: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
            if request.request_id:
                self._in_progress[request.request_id] = fut
            try:
                stage = "validate"
                if request.deadline is not None and time.time() >= request.deadline:
                    raise DeadlineExceeded("the request's deadline passed before it was started")
                assert self.info is not None
                job = start_job(request, self.info, self.settings.limits())
                stage = "generate"
                generated = await self._run(job, stats)
                stage = "publish"
                answer = Answer(
                    topic=reply_topic,
                    value=self.codec.encode_result(self._result_record(request, generated)),
                    key=request.request_id.encode() if request.request_id else None,
                    headers=self._answer_headers(correlation or request.request_id),
                )
                await self._publish(answer)
                self._remember(request.request_id, answer)
                fut.set_result(answer)
            finally:
                if not fut.done():
                    fut.set_result(None)
                self._in_progress.pop(request.request_id, None)
            self.stats.answered += 1
            self.stats.retries += stats.retries
            self._event("answered", request_id=request.request_id)
            return True
        except PublishError as exc:
            if not exc.retriable:  # e.g. the result is larger than a record may be
                return await self._dead_letter(record, exc, stage, request, correlation, stats)
            # the broker did not take the answer: leave the offset uncommitted (redelivery)
            log.error("could not publish the answer to %s: %s", record.offset, exc)
            return False
        except Exception as exc:
            self.stats.retries += stats.retries
            return await self._dead_letter(record, exc, stage, request, correlation, stats)

    async def _run(self, job: Any, stats: JobStats) -> GeneratedImages:
        def on_retry(call: StageCall, exc: BaseException) -> None:
            log.warning("retrying %s for %s: %s", call.model, job.request.request_id, exc)

        if self.batcher is not None:
            async with self.batcher.job():
                return await run_job(job, self.batcher, self.retry, on_retry, stats)
        return await run_job(job, self.runner, self.retry, on_retry, stats)

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
        if not request_id:
            return
        self._answers[request_id] = answer
        while len(self._answers) > self._answer_cache_size:
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

    async def _publish(self, answer: Answer) -> None:
        await self.producer.publish(
            answer.topic, answer.value, key=answer.key, headers=answer.headers
        )

    async def _dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        exc: BaseException,
        stage: str,
        request: GenerationRequest | None,
        correlation: str | None,
        stats: JobStats,
    ) -> bool:
        err_stage = exc.stage if isinstance(exc, OrchestratorError) and exc.stage else stage
        reason = exc.reason if isinstance(exc, OrchestratorError) else "internal_error"
        if not isinstance(exc, OrchestratorError):
            log.exception("internal error on %s@%s", record.partition, record.offset, exc_info=exc)
        if isinstance(exc, OrchestratorError) and exc.stage is None:
            exc.stage = err_stage
        headers = dead_letter_headers(
            exc,
            original_topic=record.topic,
            original_partition=record.partition,
            original_offset=record.offset,
            original_timestamp=record.timestamp,
            consumer_group=self.consumer.group_id,
            attempts=stats.retries + 1,
            original_headers=list(record.headers or []),
        )
        if correlation is None and request is not None and request.request_id:
            headers.append((CORRELATION_ID_HEADER, request.request_id.encode()))
        try:
            await self.producer.publish(
                self.settings.dlq_topic, record.value or b"", key=record.key, headers=headers
            )
        except PublishError as perr:
            log.error("could not dead-letter offset %s: %s", record.offset, perr)
            return False
        self.stats.dead_lettered += 1
        self.stats.dead_letters_by_reason[reason] += 1
        self._event(
            "dead_lettered",
            request_id=request.request_id if request else None,
            reason=reason,
            message=str(exc),
        )
        log.info("dead-lettered %s@%s: %s: %s", record.partition, record.offset, reason, exc)
        return True

    def _on_batch(self, rec: BatchRecord) -> None:
        self.stats.batches.append(rec)
        if len(self.stats.batches) > 10_000:
            del self.stats.batches[:5_000]

    def _event(self, name: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(name, fields)


async def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> None:
    """Run the service until SIGINT/SIGTERM, then finish in-flight work and exit."""
    import signal

    service = Service(settings, on_ready=on_ready)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, service.stop)
    await service.run()
