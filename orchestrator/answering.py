"""Answering: what goes out for a record, and only once the broker has it.

The result record (images inline while they fit, else stored under output_dir and sent as URIs),
the cancelled answer, the answer cache that answers a repeated request id once, progress events
about the outcome, and dead letters (with the original value, or without it when refused). Every
publish waits for the broker's acknowledgement inside a producer span, so the trace goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from aiokafka.structs import ConsumerRecord
from opentelemetry import trace

from orchestrator.adapters.avro import (
    OUTCOME_CANCELLED,
    AvroCodec,
    GenerationResultRecord,
    ImageRecord,
)
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    DLQ_ERROR_STAGE,
    DLQ_ORIGINAL_OMITTED,
    DLQ_ORIGINAL_OMITTED_REASON,
    DLQ_ORIGINAL_SHA256,
    DLQ_ORIGINAL_SIZE,
    DLQ_PREFIX,
    Headers,
    KafkaProducerAdapter,
    dead_letter_headers,
)
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.progress import ProgressReporter
from orchestrator.adapters.tracing import producer_span
from orchestrator.adapters.triton import grpc_code
from orchestrator.batcher import BatchRecord
from orchestrator.config import Settings
from orchestrator.core.roles import Role
from orchestrator.domain import GeneratedImages, GenerationRequest, JobEvent
from orchestrator.errors import OrchestratorError, PublishError
from orchestrator.executor import JobStats
from orchestrator.imagefile import encode_png

log = logging.getLogger("orchestrator.service")

#: room kept in a result record for everything but the inline PNGs
_RESULT_RECORD_OVERHEAD = 64 * 1024


class RecordTooLarge(OrchestratorError):
    reason = "record_too_large"


class StoreError(OrchestratorError):
    """An image could not be written to the output directory."""

    reason = "store_failed"


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
    """One record to publish: an answer, a hand-off to the next role, or a dead letter."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: Headers


@dataclasses.dataclass
class Attempt:
    """How far the handling of one record got: the stage a failure is reported in, the
    request once decoded, and whether its answer is already with the broker."""

    stage: str = "decode"
    request: GenerationRequest | None = None
    stats: JobStats = dataclasses.field(default_factory=JobStats)
    acknowledged: bool = False
    #: answered with outcome cancelled (a cancel command stopped it)
    cancelled: bool = False


def answer_headers(correlation: str | None) -> Headers:
    return [(CORRELATION_ID_HEADER, correlation.encode())] if correlation else []


class Answering:
    """Publishes answers and dead letters, and remembers answers by request id."""

    def __init__(
        self,
        settings: Settings,
        codec: AvroCodec,
        producer: KafkaProducerAdapter,
        *,
        tracer: trace.Tracer,
        metrics: Metrics,
        stats: ServiceStats,
        progress: ProgressReporter | None,
        group_id: str,
        role: Role = Role.ALL,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.producer = producer
        self.tracer = tracer
        self.metrics = metrics
        self.stats = stats
        self.progress = progress
        self.group_id = group_id
        self.role = role
        #: request_id -> its answer, for redelivered or repeated requests (bounded, LRU)
        self.answers: collections.OrderedDict[str, Answer] = collections.OrderedDict()
        self._in_progress: dict[str, asyncio.Future[Answer | None]] = {}

    # -- the answer cache --------------------------------------------------------------------

    async def duplicate(self, request_id: str) -> Answer | None:
        """The answer already given to `request_id`, or awaited while another record of the
        same id is being answered; None when it is new."""
        cached = self.answers.get(request_id)
        if cached is not None:
            self.answers.move_to_end(request_id)
            return cached
        pending = self._in_progress.get(request_id)
        if pending is not None:
            return await asyncio.shield(pending)
        return None

    @contextlib.contextmanager
    def answering(self, request_id: str) -> Iterator[asyncio.Future[Answer | None]]:
        """While a request is answered, repeats of it wait for its answer (set the future);
        on leaving, a future nobody set tells them there is none."""
        fut: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        self._in_progress[request_id] = fut
        try:
            yield fut
        finally:
            if not fut.done():
                fut.set_result(None)
            self._in_progress.pop(request_id, None)

    def remember(self, request_id: str, answer: Answer) -> None:
        if self.settings.answer_cache_size == 0:
            return
        self.answers[request_id] = answer
        while len(self.answers) > self.settings.answer_cache_size:
            self.answers.popitem(last=False)

    # -- answers -----------------------------------------------------------------------------

    async def publish(self, answer: Answer) -> Answer:
        """Publish and await the broker's acknowledgement, inside a producer span."""
        with producer_span(self.tracer, answer.topic, answer.headers) as headers:
            # the trace goes on with the answer
            await self.producer.publish(answer.topic, answer.value, key=answer.key, headers=headers)
        return dataclasses.replace(answer, headers=headers)

    def result_record(
        self, request: GenerationRequest, generated: GeneratedImages, attempt: Attempt
    ) -> GenerationResultRecord:
        """Images travel inline while each is under the inline limit and all of them fit in
        one record; the others are stored in output_dir and travel as URIs."""
        room = self.settings.max_record_bytes - _RESULT_RECORD_OVERHEAD
        images = []
        for i, img in enumerate(generated.images):
            attempt.stage = "encode"
            png = encode_png(img)
            height, width = int(img.shape[0]), int(img.shape[1])
            if len(png) <= min(self.settings.inline_image_max_bytes, room):
                room -= len(png)
                images.append(ImageRecord(index=i, width=width, height=height, png=png))
            else:
                attempt.stage = "store"
                path = self.store(request.request_id, i, png)
                images.append(ImageRecord(index=i, width=width, height=height, uri=self.uri(path)))
        return GenerationResultRecord(
            request_id=request.request_id,
            images=tuple(images),
            seed=generated.seed,
            timings_ms=dict(generated.timings_ms),
            model_versions=dict(generated.model_versions),
            prompt_truncated=generated.prompt_truncated,
            metadata=dict(request.metadata),
        )

    def store(self, request_id: str, index: int, png: bytes) -> Path:
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

    def uri(self, path: Path) -> str:
        """Where a consumer finds a stored image: under output_uri_base when one is set (an
        HTTP server or bucket serving output_dir), else a file:// URI of the shared volume."""
        base = self.settings.output_uri_base
        if not base:
            return path.as_uri()
        relative = path.relative_to(self.settings.output_dir.resolve()).as_posix()
        return f"{base.rstrip('/')}/{relative}"

    async def publish_cancelled(
        self, request: GenerationRequest, reply_topic: str, headers: Headers
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
            headers=headers,
        )
        return await self.publish(answer)

    def progress_event(
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

    # -- dead letters ------------------------------------------------------------------------

    async def dead_letter(
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
        if self.role is not Role.ALL:
            # a stage role names itself: "denoise.decode" is the denoise role decoding
            headers = [
                (k, f"{self.role.value}.{(v or b'').decode()}".encode())
                if k == DLQ_ERROR_STAGE
                else (k, v)
                for k, v in headers
            ]
        refused: BaseException | None = None
        try:
            try:
                await self.publish(
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
                await self.publish(self._without_original(record, headers, refused))
        except PublishError as perr:
            log.error("could not dead-letter offset %s: %s", record.offset, perr)
            return False
        self.stats.dead_lettered += 1
        if request is not None:
            self.progress_event(
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
            consumer_group=self.group_id,
            attempts=stats.retries + 1,
            original_headers=list(record.headers or []),
        )
        code = grpc_code(exc)
        if code is not None:
            headers.append(("dlq.error.grpc_code", code.encode()))
        if correlation is None and request is not None and request.request_id:
            headers.append((CORRELATION_ID_HEADER, request.request_id[:256].encode()))
        return headers

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
