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
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka.structs import ConsumerRecord
from opentelemetry import trace

from orchestrator.adapters.avro import (
    OUTCOME_CANCELLED,
    ControlCommandRecord,
    GenerationResultRecord,
    ImageRecord,
    make_codec,
)
from orchestrator.adapters.control import ControlListener
from orchestrator.adapters.http import HealthServer
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    DLQ_ERROR_STAGE,
    DLQ_ORIGINAL_OMITTED,
    DLQ_ORIGINAL_OMITTED_REASON,
    DLQ_ORIGINAL_SHA256,
    DLQ_ORIGINAL_SIZE,
    DLQ_PREFIX,
    REPLY_TOPIC_HEADER,
    Headers,
    KafkaConsumerAdapter,
    KafkaProducerAdapter,
    KafkaSettings,
    dead_letter_headers,
    header_str,
)
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.progress import ProgressPublisher, ProgressReporter
from orchestrator.adapters.tracing import extract, get_tracer, producer_span
from orchestrator.adapters.triton import grpc_code
from orchestrator.adapters.triton_pool import TritonPool
from orchestrator.admission import AdmissionGate
from orchestrator.batcher import BatchRecord, StepBatcher
from orchestrator.breaker import CircuitBreaker
from orchestrator.config import Settings
from orchestrator.core.admission import AdmissionPolicy
from orchestrator.core.batching import CohortPolicy, FlushPolicy
from orchestrator.core.cancellation import CancelRegistry, Tracked, Where
from orchestrator.core.envelope import check_envelope
from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER, Job, start_job
from orchestrator.domain import (
    GeneratedImages,
    GenerationRequest,
    JobEvent,
    ModelInfo,
    Priority,
    StageCall,
)
from orchestrator.errors import (
    DeadlineExceeded,
    OrchestratorError,
    PublishError,
)
from orchestrator.executor import JobStats, StageRunner, run_job
from orchestrator.imagefile import encode_png
from orchestrator.logs import request_context
from orchestrator.prompt_cache import prompt_cache_runner

log = logging.getLogger("orchestrator.service")


def kafka_settings(settings: Settings) -> KafkaSettings:
    return settings.kafka()


class RecordTooLarge(OrchestratorError):
    reason = "record_too_large"


class StoreError(OrchestratorError):
    """An image could not be written to the output directory."""

    reason = "store_failed"


#: room kept in a result record for everything but the inline PNGs
_RESULT_RECORD_OVERHEAD = 64 * 1024


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
    #: request id -> wall-clock time its cancelled job ended (slot free), newest last
    cancel_freed_at: dict[str, float] = dataclasses.field(default_factory=dict)
    max_buffered_bytes_seen: int = 0


@dataclasses.dataclass(frozen=True)
class Answer:
    topic: str
    value: bytes | None
    key: bytes | None
    headers: Headers


@dataclasses.dataclass
class _Progress:
    """How far the handling of one record got: the stage a failure is reported in, the
    request once decoded, and whether its answer is already with the broker."""

    stage: str = "decode"
    request: GenerationRequest | None = None
    stats: JobStats = dataclasses.field(default_factory=JobStats)
    acknowledged: bool = False
    #: answered with outcome cancelled (a cancel command stopped it)
    cancelled: bool = False


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
        progress: ProgressPublisher | None = None,
    ) -> None:
        self.settings = settings
        self.codec = make_codec(settings)
        self.kafka = kafka_settings(settings)
        self.stats = ServiceStats()
        self.metrics = metrics or Metrics()
        self.on_ready = on_ready
        self.tracer = get_tracer(tracer_provider) if settings.tracing else trace.NoOpTracer()
        self.triton = TritonPool(
            settings.triton_url,
            timeout_s=settings.triton_timeout_s,
            ssl=settings.triton_ssl,
            on_error=self._on_triton_error,
            propagate_trace=settings.tracing,
            failure_threshold=settings.breaker_failure_threshold,
            probe_interval_s=settings.breaker_probe_interval_s,
            resolve_interval_s=settings.triton_resolve_interval_s,
            shared_memory=settings.triton_shared_memory,
            conditioning_cache=settings.triton_conditioning_cache,
        )
        self.breaker = CircuitBreaker(
            self.triton.is_ready,
            failure_threshold=settings.breaker_failure_threshold,
            probe_interval_s=settings.breaker_probe_interval_s,
            on_change=lambda is_open: self.metrics.breaker_open.set(1 if is_open else 0),
        )
        self.producer = KafkaProducerAdapter(self.kafka, max_record_bytes=settings.max_record_bytes)
        # progress events: their own producer and queue, never waited for (adapters/progress.py)
        self.progress_publisher = progress or ProgressPublisher(
            settings.kafka("-progress"),
            settings.progress_topic,
            self.codec,
            self.metrics,
            queue_size=settings.progress_queue_size,
            send_timeout_s=settings.progress_send_timeout_s,
            flush_timeout_s=settings.progress_flush_timeout_s,
            preview_max_bytes=settings.preview_max_bytes,
            max_record_bytes=settings.max_record_bytes,
        )
        self.progress: ProgressReporter | None = (
            ProgressReporter(self.progress_publisher, settings)
            if settings.progress_events
            else None
        )
        # cancels: every instance reads every control record (adapters/control.py)
        self.cancels: CancelRegistry[asyncio.Task[GeneratedImages]] = CancelRegistry(
            settings.cancel_remember_s, settings.cancel_remember_max
        )
        self.control = ControlListener(
            settings.kafka("-control"),
            settings.control_topic,
            self.codec,
            self._on_cancel,
            self.metrics,
            lookback_s=settings.cancel_remember_s,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
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
        # jobs fetched (read-ahead: max_in_flight) start in priority order, max_active_jobs at once
        self.admission = AdmissionGate(
            settings.max_active_jobs,
            AdmissionPolicy(aging_s=settings.admission_aging_s),
            on_queue=self._on_admission_queue,
            on_admit=lambda p, s: self.metrics.admission_wait.labels(p.value).observe(s),
            on_refuse=lambda p: self.metrics.admission_refused.labels(p.value).inc(),
            preempt=settings.admission_preempt,
            max_preemptions=settings.admission_max_preemptions,
        )
        self._stopping = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._task_partition: dict[asyncio.Task[None], tuple[str, int]] = {}
        self._buffered = 0
        #: request_id -> its answer, for redelivered or repeated requests (bounded, LRU)
        self._answers: collections.OrderedDict[str, Answer] = collections.OrderedDict()
        self._in_progress: dict[str, asyncio.Future[Answer | None]] = {}
        #: records waiting to be tried again: (topic, partition, offset) -> (since, cause)
        self._waiting: dict[tuple[str, int, int], tuple[float, str]] = {}
        self.envelope_limits = settings.envelope_limits()
        self.reply_topics = settings.reply_topic_rule()
        self._last_loop = time.monotonic()
        self._broker_ok = False
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _wait_for_models(self) -> ModelInfo | None:
        """The models' facts, once Triton answers; None when told to stop meanwhile."""
        delay = 0.2
        while True:
            try:
                return await self.triton.model_info()
            except OrchestratorError as exc:
                if not exc.retriable:
                    raise
                if self._stopping.is_set():
                    return None
                log.warning("waiting for Triton at %s: %s", self.settings.triton_url, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                delay = min(delay * 2, 5.0)

    async def run(self) -> None:
        await self.http.start()
        try:
            await self.codec.prepare()
            self.info = await self._wait_for_models()
            if self.info is None:
                log.info("stopped before Triton answered")
                return
            self.triton.start()
            # encode_prompt rows from the prompt-embedding cache; Triton computes the rest
            self.runner = prompt_cache_runner(self.triton, self.settings, self.metrics)
            if self.settings.batching == "step":
                # each stage's rows per call, as its Triton config declares (the smallest over
                # the endpoints); a repository without max_batch_size gets 64
                max_rows = {
                    model: self.info.max_rows(model) or 64
                    for model in (UNET, ENCODE_PROMPT, VAE_ENCODER, VAE_DECODER)
                }
                self.batcher = StepBatcher(
                    self.runner,
                    max_rows,
                    FlushPolicy(self.settings.batch_max_wait_ms / 1000.0),
                    on_batch=self._on_batch,
                    tracer=self.tracer,
                    cohorts=CohortPolicy(self.settings.batch_cohorts),
                )
                self.runner = self.batcher
            await self.producer.start()
            await self.consumer.start()
            if self.progress is not None:
                await self.progress_publisher.start()
            await self.control.start()
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
                await self.progress_publisher.stop()
                await self.control.stop()
        finally:
            await self.breaker.close()
            await self.triton.close()
            await self.codec.aclose()
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
            self.metrics.stuck_records.set(self._stuck_records())
            now = time.monotonic()
            if now - last_probe > 5.0:
                last_probe = now
                await self._observe()

    def _registry_down(self) -> bool:
        return any(cause == "schema_registry_down" for _, cause in self._waiting.values())

    def _pause_cause(self) -> str | None:
        if self.breaker.is_open:
            return "triton_down"
        if self._registry_down():
            return "schema_registry_down"
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
        registry_up = not self._registry_down()
        stuck = self._stuck_records()
        self.metrics.stuck_records.set(stuck)
        ok = (
            self._running
            and not self.stopping
            and self._broker_ok
            and triton_up
            and registry_up
            and stuck == 0
        )
        return ok, {
            "consuming": self._running and not self.stopping,
            "broker": self._broker_ok,
            "triton": triton_up,
            "schema_registry": registry_up,
            "in_flight": len(self._tasks),
            "waiting_records": len(self._waiting),
            "active_jobs": self.admission.active,
            "admission_waiting": {p.value: n for p, n in self.admission.waiting().items()},
            "stuck_records": stuck,
        }

    # -- one record --------------------------------------------------------------------------

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Bring one record to its end: an acknowledged answer or dead letter, then mark it
        done. Whatever the handling raises ends in a dead letter (``internal_error``); only a
        broker that acknowledges neither (or a schema registry that is down) makes the record
        wait and try again, with backoff, visible in /readyz once it waits too long."""
        started = time.monotonic()
        key = (record.topic, record.partition, record.offset)
        delay = self.settings.record_retry_initial_s
        try:
            while True:
                try:
                    if await self._process(record):
                        break
                    cause = "broker_unavailable"
                except _RetryLater as later:
                    cause = later.cause
                    log.warning(
                        "%s@%s waits: %s: %s", record.partition, record.offset, cause, later.error
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:  # a failure inside the dead-letter path itself
                    log.exception("could not end %s@%s", record.partition, record.offset)
                    cause = "internal_error"
                since = self._waiting.get(key, (started, cause))[0]
                self._waiting[key] = (since, cause)
                if self.stopping:
                    return  # left uncommitted: redelivered after the restart
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.record_retry_max_s)
            self.consumer.mark_done(record)
            self.metrics.request_duration.observe(time.monotonic() - started)
        finally:
            self._waiting.pop(key, None)

    def _stuck_records(self) -> int:
        bound = time.monotonic() - self.settings.stuck_record_after_s
        return sum(1 for since, _ in self._waiting.values() if since < bound)

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
        """True once the record's answer or dead letter is acknowledged. Never raises but
        :class:`_RetryLater` (and cancellation): an exception nobody expected is dead-lettered
        as ``internal_error``, with its type in the message."""
        progress = _Progress()
        try:
            with self._process_span(record) as span:
                return await self._process_in_span(record, span, progress)
        except (_RetryLater, asyncio.CancelledError):
            raise
        except Exception as exc:
            if progress.acknowledged:
                # the answer is with the broker: dead-lettering too would answer twice
                log.exception("after answering %s@%s", record.partition, record.offset)
                return True
            self.metrics.unexpected_errors.labels(progress.stage).inc()
            return await self._dead_letter(
                record, exc, progress.stage, progress.request, None, progress.stats
            )

    async def _process_in_span(
        self, record: ConsumerRecord[bytes, bytes], span: Any, progress: _Progress
    ) -> bool:
        """Answer one record; True once its answer is acknowledged by the broker."""
        self.stats.received += 1
        headers: Headers = list(record.headers or [])
        correlation = header_str(headers, CORRELATION_ID_HEADER)
        request: GenerationRequest | None = None
        stats = progress.stats
        try:
            value = record.value or b""
            if len(value) > self.settings.max_request_bytes:
                raise RecordTooLarge(
                    f"request record is {len(value)} bytes, more than the "
                    f"{self.settings.max_request_bytes} allowed",
                    stage="decode",
                )
            try:
                await self.codec.resolve(value)
            except OrchestratorError as lookup:
                if lookup.retriable:  # the schema registry is down: wait, do not dead-letter
                    raise _RetryLater("schema_registry_down", lookup) from lookup
                raise
            decoded = self.codec.decode_request_record(value)
            request = progress.request = decoded.request
            progress.stage = "validate"
            span.set_attribute("request.id", request.request_id[:256])
            span.set_attribute("messaging.message.id", request.request_id[:256])
            check_envelope(request, self.envelope_limits, time.time())
            reply_topic = (
                header_str(headers, REPLY_TOPIC_HEADER)
                or decoded.reply_topic
                or self.settings.response_topic
            )
            self.reply_topics.check(reply_topic)
            answer_headers = self._answer_headers(correlation or request.request_id)
            with request_context(request.request_id):
                duplicate = await self._duplicate_answer(request.request_id)
                if duplicate is not None:
                    self.stats.duplicates += 1
                    self.metrics.duplicates.inc()
                    self.metrics.requests.labels("duplicate").inc()
                    span.set_attribute("request.duplicate", True)
                    # the repeat gets the answer where it asked for it, with its own correlation
                    progress.stage = "publish"
                    await self._publish(
                        Answer(reply_topic, duplicate.value, duplicate.key, answer_headers)
                    )
                    progress.acknowledged = True
                    return True
                if self.progress is not None:
                    self.progress.queued(request, correlation)
                answer = await self._generate_and_publish(
                    request, reply_topic, answer_headers, progress, span
                )
                self._remember(request.request_id, answer)
            self.stats.answered += 1
            self.metrics.requests.labels("cancelled" if progress.cancelled else "answered").inc()
            self.stats.retries += stats.retries
            return True
        except _RetryLater:
            raise
        except Exception as failure:
            if progress.acknowledged:
                raise  # _process logs it; the record is answered
            exc = failure
        self.stats.retries += stats.retries
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        if isinstance(exc, PublishError):
            # the producer gave up on the answer (an unknown reply topic, say, or a record the
            # broker refuses): dead-letter it rather than hold the partition's commits back;
            # if the dead-letter topic cannot take it either, the record waits and comes again
            log.error("could not publish the answer to offset %s: %s", record.offset, exc)
        return await self._dead_letter(record, exc, progress.stage, request, correlation, stats)

    async def _generate_and_publish(
        self,
        request: GenerationRequest,
        reply_topic: str,
        answer_headers: Headers,
        progress: _Progress,
        span: Any,
    ) -> Answer:
        fut: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        self._in_progress[request.request_id] = fut
        try:
            if request.deadline is not None and time.time() >= request.deadline:
                raise DeadlineExceeded("the request's deadline passed before it was started")
            generated = await self._cancellable_job(request, progress, span)
            if generated is None:  # cancelled by a command: answered, not dead-lettered
                answer = await self._publish_cancelled(request, reply_topic, answer_headers)
                progress.acknowledged = progress.cancelled = True
                self._progress_event(request, JobEvent.CANCELLED, reason="cancelled")
                fut.set_result(answer)
                return answer
            for model, ms in generated.timings_ms.items():
                if model in _STAGE_OF_MODEL:
                    self.metrics.stage_duration.labels(_STAGE_OF_MODEL[model]).observe(ms / 1000)
            progress.stage = "encode"
            t0 = time.perf_counter()
            with self.tracer.start_as_current_span("encode image file"):
                record = self._result_record(request, generated, progress)
                progress.stage = "encode"
                value = self.codec.encode_result(record)
            self.metrics.stage_duration.labels("encode_png").observe(time.perf_counter() - t0)
            progress.stage = "publish"
            answer = Answer(
                topic=reply_topic,
                value=value,
                key=request.request_id.encode(),
                headers=answer_headers,
            )
            t0 = time.perf_counter()
            answer = await self._publish(answer)
            progress.acknowledged = True
            self._progress_event(request, JobEvent.FINISHED)
            self.metrics.stage_duration.labels("publish").observe(time.perf_counter() - t0)
            fut.set_result(answer)
            return answer
        finally:
            if not fut.done():
                fut.set_result(None)
            self._in_progress.pop(request.request_id, None)

    async def _admitted_job(
        self, request: GenerationRequest, progress: _Progress, span: Any
    ) -> GeneratedImages:
        """The job from admission to its images: runs as the request's inner task, which a
        cancel command cancels (waiting: it never starts; running: it leaves its batch at the
        next step boundary)."""
        async with self.admission.slot(request):  # priority order; deadline_exceeded at once
            if not self.cancels.started(request.request_id):
                raise asyncio.CancelledError  # cancelled before it could start
            assert self.info is not None
            job = start_job(request, self.info, self.settings.limits())
            span.set_attribute("diffusion.steps", request.steps)
            span.set_attribute("diffusion.scheduler", request.scheduler)
            progress.stage = "generate"
            return await self._run(job, progress.stats)

    async def _cancellable_job(
        self, request: GenerationRequest, progress: _Progress, span: Any
    ) -> GeneratedImages | None:
        """Run `_admitted_job` as an inner task registered under the request id; None when a
        cancel command stopped it (or came before the request). Any other cancellation (shutdown,
        rebalance) propagates as before."""
        inner = asyncio.create_task(self._admitted_job(request, progress, span))
        entry = self.cancels.register(request.request_id, inner, time.time())
        if entry.cancelled:  # its cancel came first: never started
            inner.cancel()
            self.metrics.cancels.labels(Where.BEFORE_REQUEST).inc()
        inner.add_done_callback(lambda _: self._cancel_freed(entry))
        try:
            return await inner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not entry.cancelled or (current is not None and current.cancelling()):
                raise
        finally:
            self.cancels.finish(request.request_id, time.time())
        self._record_cancel(request, entry, span)
        return None

    def _on_cancel(self, command: ControlCommandRecord) -> None:
        """A cancel command from the control topic (never blocks)."""
        decision = self.cancels.cancel(
            command.request_id, time.time(), issued_at=command.issued_ms / 1000.0
        )
        where = decision.where
        if decision.handle is not None and not decision.handle.cancel():
            where = Where.UNKNOWN_OR_FINISHED  # it had just finished: its answer stands
        self.metrics.cancels.labels(where).inc()
        log.info(
            "cancel of %s: %s",
            command.request_id[:256],
            where,
            extra={"request_id": command.request_id[:256]},
        )

    def _cancel_freed(self, entry: Tracked[asyncio.Task[GeneratedImages]]) -> None:
        if entry.cancelled:
            freed = self.stats.cancel_freed_at
            freed[entry.request_id] = time.time()
            while len(freed) > 10_000:
                del freed[next(iter(freed))]

    def _record_cancel(
        self, request: GenerationRequest, entry: Tracked[asyncio.Task[GeneratedImages]], span: Any
    ) -> None:
        freed = self.stats.cancel_freed_at.get(request.request_id, time.time())
        where = Where.RUNNING if entry.running else Where.WAITING
        if entry.cancelled_at is not None and entry.cancelled_at <= entry.registered_at:
            where = Where.BEFORE_REQUEST  # remembered before the request was registered
        attributes: dict[str, Any] = {"cancel.where": str(where)}
        if entry.issued_at is not None:
            attributes["cancel.issued_ms"] = int(entry.issued_at * 1000)
            attributes["cancel.latency_ms"] = round((freed - entry.issued_at) * 1000.0, 3)
        span.add_event("cancelled", attributes)
        span.set_attribute("request.cancelled", True)
        log.info("cancelled %s", request.request_id[:256])

    async def _publish_cancelled(
        self, request: GenerationRequest, reply_topic: str, answer_headers: Headers
    ) -> Answer:
        """The answer of a cancelled request: a result with outcome ``cancelled``, no images."""
        record = GenerationResultRecord(
            request_id=request.request_id,
            images=(),
            seed=request.seed,
            metadata=dict(request.metadata),
            outcome=OUTCOME_CANCELLED,
        )
        answer = Answer(
            topic=reply_topic,
            value=self.codec.encode_result(record),
            key=request.request_id.encode(),
            headers=answer_headers,
        )
        return await self._publish(answer)

    async def _run(self, job: Job, stats: JobStats) -> GeneratedImages:
        def on_retry(call: StageCall, exc: BaseException) -> None:
            self.metrics.retries.labels(call.model).inc()
            log.warning("retrying %s for %s: %s", call.model, job.request.request_id, exc)

        kwargs: dict[str, Any] = {"breaker": self.breaker, "tracer": self.tracer}
        if self.progress is not None:
            self.progress.started(job.request, job.total_unet_calls)
            kwargs["on_step"] = self.progress.on_step
        if self.admission.preempt:
            kwargs["checkpoint"] = self._checkpoint
        with self.tracer.start_as_current_span("generate"):
            if self.batcher is not None:
                async with self.batcher.job():
                    return await run_job(job, self.batcher, self.retry, on_retry, stats, **kwargs)
            return await run_job(job, self.runner, self.retry, on_retry, stats, **kwargs)

    async def _checkpoint(self, job: Job) -> None:
        """A step boundary: yield the slot here when a waiting high asked for it (preemption)."""
        suspend = self.batcher.suspended if self.batcher is not None else None
        steps_left = job.total_unet_calls - job.unet_calls
        await self.admission.checkpoint(job.request.request_id, steps_left, suspend)

    def _progress_event(
        self,
        request: GenerationRequest,
        event: JobEvent,
        *,
        correlation: str | None = None,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        """Offer a progress event about `request` (finished, failed, cancelled, ...): never
        blocks, never raises. `correlation` gives the headers of a request never queued."""
        if self.progress is None or len(request.request_id) > self.settings.max_request_id_chars:
            return
        try:
            self.progress.event(
                request,
                event,
                correlation=correlation or request.request_id,
                reason=reason,
                message=message,
            )
        except Exception:
            log.exception("progress event %s of %s failed", event, request.request_id)

    async def _duplicate_answer(self, request_id: str) -> Answer | None:
        cached = self._answers.get(request_id)
        if cached is not None:
            self._answers.move_to_end(request_id)
            return cached
        pending = self._in_progress.get(request_id)
        if pending is not None:
            return await asyncio.shield(pending)
        return None

    def _remember(self, request_id: str, answer: Answer) -> None:
        if self.settings.answer_cache_size == 0:
            return
        self._answers[request_id] = answer
        while len(self._answers) > self.settings.answer_cache_size:
            self._answers.popitem(last=False)

    def _answer_headers(self, correlation: str | None) -> Headers:
        return [(CORRELATION_ID_HEADER, correlation.encode())] if correlation else []

    def _result_record(
        self, request: GenerationRequest, generated: GeneratedImages, progress: _Progress
    ) -> GenerationResultRecord:
        """Images travel inline while each is under the inline limit and all of them fit in
        one record; the others are stored in output_dir and travel as URIs."""
        room = self.settings.max_record_bytes - _RESULT_RECORD_OVERHEAD
        images = []
        for i, img in enumerate(generated.images):
            progress.stage = "encode"
            png = encode_png(img)
            height, width = int(img.shape[0]), int(img.shape[1])
            if len(png) <= min(self.settings.inline_image_max_bytes, room):
                room -= len(png)
                images.append(ImageRecord(index=i, width=width, height=height, png=png))
            else:
                progress.stage = "store"
                path = self._store(request.request_id, i, png)
                images.append(
                    ImageRecord(index=i, width=width, height=height, uri=self._uri(path))
                )
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
        """Write one image under output_dir, named by a digest of the request id (never by
        the id itself), atomically."""
        root = self.settings.output_dir.resolve()
        root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()
        folder = root / digest[:2] / digest
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index}.png"
        if not path.resolve().is_relative_to(root):  # a symlink planted in output_dir
            raise StoreError(f"{path} resolves outside {root}", stage="store")
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_bytes(png)
            tmp.replace(path)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}", stage="store") from exc
        return path

    def _uri(self, path: Path) -> str:
        """Where a consumer finds a stored image: under output_uri_base when one is set (an
        HTTP server or bucket serving output_dir), else a file:// URI of the shared volume."""
        base = self.settings.output_uri_base
        if not base:
            return path.as_uri()
        relative = path.relative_to(self.settings.output_dir.resolve()).as_posix()
        return f"{base.rstrip('/')}/{relative}"

    async def _publish(self, answer: Answer) -> Answer:
        """Publish and await the broker's acknowledgement, inside a producer span."""
        with producer_span(self.tracer, answer.topic, answer.headers) as headers:
            # the trace goes on with the answer
            await self.producer.publish(answer.topic, answer.value, key=answer.key, headers=headers)
        return dataclasses.replace(answer, headers=headers)

    def _dead_letter_headers(
        self,
        record: ConsumerRecord[bytes, bytes],
        exc: BaseException,
        request: GenerationRequest | None,
        correlation: str | None,
        stats: JobStats,
    ) -> Headers:
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
        code = grpc_code(exc)
        if code is not None:
            headers.append(("dlq.error.grpc_code", code.encode()))
        if correlation is None and request is not None and request.request_id:
            headers.append((CORRELATION_ID_HEADER, request.request_id[:256].encode()))
        return headers

    async def _dead_letter(
        self,
        record: ConsumerRecord[bytes, bytes],
        exc: BaseException,
        stage: str,
        request: GenerationRequest | None,
        correlation: str | None,
        stats: JobStats,
    ) -> bool:
        """Publish the dead letter; True once acknowledged. A dead letter the broker refuses
        for what it is (too large, say) goes again without the original value (its size and
        sha256 in headers); False only while the broker may take it later."""
        reason = exc.reason if isinstance(exc, OrchestratorError) else "internal_error"
        if isinstance(exc, OrchestratorError) and exc.stage is None:
            exc.stage = stage
        if not isinstance(exc, OrchestratorError):
            log.error("internal error on %s@%s", record.partition, record.offset, exc_info=exc)
        headers = self._dead_letter_headers(record, exc, request, correlation, stats)
        if not isinstance(exc, OrchestratorError):
            headers = [(k, v) for k, v in headers if k != DLQ_ERROR_STAGE]
            headers.append((DLQ_ERROR_STAGE, stage.encode()))
        refused: BaseException | None = None
        try:
            try:
                await self._publish(
                    Answer(self.settings.dlq_topic, record.value, record.key, headers)
                )
            except PublishError as failed:
                if failed.retriable:
                    raise
                refused = failed
            except Exception as failed:
                # refused by the client before sending (a value it cannot take): the same way
                # out as a record too large
                refused = failed
            if refused is not None:
                log.warning(
                    "dead letter of %s@%s refused (%s): sending it without the original value",
                    record.partition,
                    record.offset,
                    refused,
                )
                await self._publish(self._without_original(record, headers, refused))
        except PublishError as perr:
            log.error("could not dead-letter offset %s: %s", record.offset, perr)
            return False
        self.stats.dead_lettered += 1
        if request is not None:
            self._progress_event(
                request, JobEvent.FAILED, correlation=correlation, reason=reason, message=str(exc)
            )
        self.stats.dead_letters_by_reason[reason] += 1
        self.metrics.dead_letters.labels(reason).inc()
        self.metrics.requests.labels("dead_lettered").inc()
        log.info(
            "dead-lettered %s@%s: %s: %s",
            record.partition,
            record.offset,
            reason,
            exc,
            extra={"request_id": request.request_id[:256] if request else None},
        )
        return True

    def _without_original(
        self, record: ConsumerRecord[bytes, bytes], headers: Headers, refused: BaseException
    ) -> Answer:
        """The dead letter with the original value, key and headers left out: only the
        ``dlq.*`` headers and the correlation id stay, and headers say what was omitted."""
        value = record.value or b""
        kept: Headers = [
            (k, v)
            for k, v in headers
            if k.startswith(DLQ_PREFIX) or (k == CORRELATION_ID_HEADER and len(v or b"") <= 256)
        ]
        kept += [
            (DLQ_ORIGINAL_OMITTED, b"value,key,headers"),
            (DLQ_ORIGINAL_SIZE, str(len(value)).encode()),
            (DLQ_ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode()),
            (DLQ_ORIGINAL_OMITTED_REASON, str(refused)[:1000].encode()),
        ]
        # Kafka needs a key or a value: an empty value, the headers say what it was
        return Answer(self.settings.dlq_topic, b"", None, kept)

    def _on_admission_queue(self, counts: dict[Priority, int]) -> None:
        for priority, n in counts.items():
            self.metrics.admission_waiting.labels(priority.value).set(n)

    def _on_batch(self, rec: BatchRecord) -> None:
        self.metrics.batch_size.labels(rec.model).observe(rec.rows)
        self.stats.batches.append(rec)
        if len(self.stats.batches) > 10_000:
            del self.stats.batches[:5_000]

    def _on_triton_error(self, model: str, code: str) -> None:
        self.metrics.triton_errors.labels(model, code).inc()


class _RetryLater(Exception):
    """The record can be neither answered nor dead-lettered now (a dependency is down): it
    keeps its slot and is processed again after a backoff."""

    def __init__(self, cause: str, error: BaseException) -> None:
        super().__init__(f"{cause}: {error}")
        self.cause = cause
        self.error = error


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
