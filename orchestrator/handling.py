"""Handling one record: decode, validate, admit, run the job (cancellable), answer.

`Handling.process(record)` is the intake's handler: True once the record's answer (or dead
letter) is acknowledged by the broker. Whatever goes wrong on the way ends in a dead letter
naming the stage; only a dependency that is down (the schema registry) raises RetryLater.

Every stage role handles its records here, the same way; `orchestrator.handoff` says what the
role reads and, for encode and denoise, what it hands on instead of answering. The job runs the
role's phases only (`Role.phases`); a cancel stops it in whichever role holds it, and that role
answers `outcome=cancelled` on the reply topic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from aiokafka.structs import ConsumerRecord
from opentelemetry import trace

from orchestrator.adapters.avro import AvroCodec
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    REPLY_TOPIC_HEADER,
    Headers,
    header_str,
)
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.progress import ProgressReporter
from orchestrator.adapters.tracing import extract
from orchestrator.admission import AdmissionGate
from orchestrator.answering import (
    Answer,
    Answering,
    Attempt,
    RecordTooLarge,
    ServiceStats,
    answer_headers,
)
from orchestrator.batcher import StepBatcher
from orchestrator.breaker import CircuitBreaker
from orchestrator.cancelling import Cancelling
from orchestrator.config import Settings
from orchestrator.core.envelope import check_envelope
from orchestrator.core.pipeline import (
    ENCODE_PROMPT,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Job,
    Phase,
    finish,
    start_job,
)
from orchestrator.core.roles import Role
from orchestrator.domain import GeneratedImages, GenerationRequest, JobEvent, ModelInfo, StageCall
from orchestrator.errors import DeadlineExceeded, OrchestratorError, PublishError
from orchestrator.executor import JobStats, StageRunner, run_phases
from orchestrator.handoff import HandedOn, Handoffs, Incoming, merge_timings
from orchestrator.intake import RetryLater
from orchestrator.logs import request_context

log = logging.getLogger("orchestrator.service")

_STAGE_OF_MODEL = {
    ENCODE_PROMPT: "encode_prompt",
    VAE_ENCODER: "encode_image",
    UNET: "denoise",
    VAE_DECODER: "decode",
}


class Handling:
    """What the service does with a record. `info` and `runner` are set once Triton answers."""

    def __init__(
        self,
        settings: Settings,
        codec: AvroCodec,
        answering: Answering,
        *,
        tracer: trace.Tracer,
        metrics: Metrics,
        stats: ServiceStats,
        admission: AdmissionGate,
        breaker: CircuitBreaker,
        progress: ProgressReporter | None,
        handoffs: Handoffs,
    ) -> None:
        self.settings = settings
        self.handoffs = handoffs
        self.role = handoffs.role
        self.group_id = handoffs.group_id
        self.codec = codec
        self.answering = answering
        self.tracer = tracer
        self.metrics = metrics
        self.stats = stats
        self.admission = admission
        self.breaker = breaker
        self.progress = progress
        self.retry = settings.retry_policy()
        self.envelope_limits = settings.envelope_limits()
        self.reply_topics = settings.reply_topic_rule()
        # cancels: every instance reads every control record (adapters/control.py)
        self.cancelling = Cancelling(settings, metrics=metrics, stats=stats)
        self.cancels = self.cancelling.registry
        self.info: ModelInfo | None = None
        self.runner: StageRunner | None = None
        self.batcher: StepBatcher | None = None

    # -- one record --------------------------------------------------------------------------

    def _process_span(self, record: ConsumerRecord[bytes, bytes]) -> Any:
        attributes: dict[str, Any] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": record.topic,
            "messaging.destination.partition.id": str(record.partition),
            "messaging.kafka.offset": record.offset,
            "messaging.consumer.group.name": self.group_id,
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

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> bool:
        """True once the record's answer or dead letter is acknowledged. Never raises but
        :class:`RetryLater` (and cancellation): an exception nobody expected is dead-lettered
        as ``internal_error``, with its type in the message."""
        attempt = Attempt()
        try:
            with self._process_span(record) as span:
                return await self._process_in_span(record, span, attempt)
        except (RetryLater, asyncio.CancelledError):
            raise
        except Exception as exc:
            if attempt.acknowledged:
                # the answer is with the broker: dead-lettering too would answer twice
                log.exception("after answering %s@%s", record.partition, record.offset)
                return True
            self.metrics.unexpected_errors.labels(attempt.stage).inc()
            return await self.answering.dead_letter(
                record, exc, attempt.stage, attempt.request, None, attempt.stats
            )

    async def _process_in_span(
        self, record: ConsumerRecord[bytes, bytes], span: Any, attempt: Attempt
    ) -> bool:
        """Answer one record; True once its answer is acknowledged by the broker."""
        self.stats.received += 1
        headers: Headers = list(record.headers or [])
        correlation = header_str(headers, CORRELATION_ID_HEADER)
        request: GenerationRequest | None = None
        stats = attempt.stats
        try:
            value = record.value or b""
            if len(value) > self.handoffs.max_input_bytes:
                raise RecordTooLarge(
                    f"{record.topic} record is {len(value)} bytes, more than the "
                    f"{self.handoffs.max_input_bytes} allowed",
                    stage="decode",
                )
            try:
                await self.codec.resolve(value)
            except OrchestratorError as lookup:
                if lookup.retriable:  # the schema registry is down: wait, do not dead-letter
                    raise RetryLater("schema_registry_down", lookup) from lookup
                raise
            incoming = self.handoffs.read(value)
            request = attempt.request = incoming.request
            attempt.stage = "validate"
            span.set_attribute("request.id", request.request_id[:256])
            span.set_attribute("messaging.message.id", request.request_id[:256])
            check_envelope(request, self.envelope_limits, time.time())
            reply_topic = (
                header_str(headers, REPLY_TOPIC_HEADER)
                or incoming.reply_topic
                or self.settings.response_topic
            )
            self.reply_topics.check(reply_topic)
            out_headers = answer_headers(correlation or request.request_id)
            with request_context(request.request_id):
                duplicate = await self.answering.duplicate(request.request_id)
                if duplicate is not None:
                    self.stats.duplicates += 1
                    self.metrics.duplicates.inc()
                    self.metrics.requests.labels("duplicate").inc()
                    span.set_attribute("request.duplicate", True)
                    if self.role is not Role.ALL:
                        # a hand-off delivered again (at least once between roles), or a
                        # request repeated: its answer or hand-off is with the broker already
                        attempt.acknowledged = True
                        return True
                    # the repeat gets the answer where it asked for it, with its own correlation
                    attempt.stage = "publish"
                    await self.answering.publish(
                        Answer(reply_topic, duplicate.value, duplicate.key, out_headers)
                    )
                    attempt.acknowledged = True
                    return True
                if self.progress is not None:
                    if self.role in (Role.ALL, Role.ENCODE):
                        self.progress.queued(request, correlation)
                    else:
                        self.progress.track(request, correlation)
                answer = await self._generate_and_publish(
                    incoming, reply_topic, out_headers, attempt, span
                )
                if self.role is not Role.ALL:  # never published again: the id is enough
                    answer = dataclasses.replace(answer, value=None, headers=[])
                self.answering.remember(request.request_id, answer)
            self.stats.answered += 1
            outcome = "answered" if self.handoffs.answers else "handed_on"
            self.metrics.requests.labels("cancelled" if attempt.cancelled else outcome).inc()
            self.stats.retries += stats.retries
            return True
        except RetryLater:
            raise
        except Exception as failure:
            if attempt.acknowledged:
                raise  # process() logs it; the record is answered
            exc = failure
        self.stats.retries += stats.retries
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        if isinstance(exc, PublishError):
            # the producer gave up on the answer (an unknown reply topic, say, or a record the
            # broker refuses): dead-letter it rather than hold the partition's commits back;
            # if the dead-letter topic cannot take it either, the record waits and comes again
            log.error("could not publish the answer to offset %s: %s", record.offset, exc)
        return await self.answering.dead_letter(
            record, exc, attempt.stage, request, correlation, stats
        )

    async def _generate_and_publish(
        self,
        incoming: Incoming,
        reply_topic: str,
        out_headers: Headers,
        attempt: Attempt,
        span: Any,
    ) -> Answer:
        request = incoming.request
        with self.answering.answering(request.request_id) as fut:
            if request.deadline is not None and time.time() >= request.deadline:
                raise DeadlineExceeded("the request's deadline passed before it was started")
            generated = await self.cancelling.run(
                request.request_id, self._admitted_job(incoming, reply_topic, attempt, span), span
            )
            if generated is None:  # cancelled by a command: answered, not dead-lettered
                answer = await self.answering.publish_cancelled(request, reply_topic, out_headers)
                attempt.acknowledged = attempt.cancelled = True
                self.answering.progress_event(request, JobEvent.CANCELLED, reason="cancelled")
                fut.set_result(answer)
                return answer
            for model, ms in generated.timings_ms.items():
                if model in _STAGE_OF_MODEL:
                    self.metrics.stage_duration.labels(_STAGE_OF_MODEL[model]).observe(ms / 1000)
            if isinstance(generated, HandedOn):
                answer = await self._hand_on(request, generated, out_headers, attempt)
                fut.set_result(answer)
                return answer
            attempt.stage = "encode"
            t0 = time.perf_counter()
            with self.tracer.start_as_current_span("encode image file"):
                record = self.answering.result_record(request, generated, attempt)
                attempt.stage = "encode"
                value = self.codec.encode_result(record)
            self.metrics.stage_duration.labels("encode_png").observe(time.perf_counter() - t0)
            attempt.stage = "publish"
            answer = Answer(
                topic=reply_topic,
                value=value,
                key=request.request_id.encode(),
                headers=out_headers,
            )
            t0 = time.perf_counter()
            answer = await self.answering.publish(answer)
            attempt.acknowledged = True
            self.answering.progress_event(request, JobEvent.FINISHED)
            self.metrics.stage_duration.labels("publish").observe(time.perf_counter() - t0)
            fut.set_result(answer)
            return answer

    async def _hand_on(
        self, request: GenerationRequest, handed: HandedOn, out_headers: Headers, attempt: Attempt
    ) -> Answer:
        """Publish the next role's record, keyed by request id, with the correlation id (and
        the trace, added by the producer span)."""
        attempt.stage = "handoff"
        if len(handed.value) > self.settings.max_record_bytes:
            raise RecordTooLarge(
                f"the {handed.topic} record is {len(handed.value)} bytes, more than "
                f"max_record_bytes ({self.settings.max_record_bytes})",
                stage="handoff",
            )
        answer = Answer(handed.topic, handed.value, request.request_id.encode(), out_headers)
        answer = await self.answering.publish(answer)
        attempt.acknowledged = True
        return answer

    # -- the job -----------------------------------------------------------------------------

    async def _admitted_job(
        self, incoming: Incoming, reply_topic: str, attempt: Attempt, span: Any
    ) -> GeneratedImages | HandedOn:
        """The job from admission to its images (or, in a stage role, to its hand-off): runs as
        the request's inner task, which a cancel command cancels (waiting: it never starts;
        running: it leaves its batch at the next step boundary)."""
        request = incoming.request
        async with self.admission.slot(request):  # priority order; deadline_exceeded at once
            if not self.cancels.started(request.request_id):
                raise asyncio.CancelledError  # cancelled before it could start
            assert self.info is not None
            limits = self.settings.limits()
            if incoming.resume is None:
                job = start_job(request, self.info, limits)
            else:
                job = incoming.resume(self.info, limits)
            self.handoffs.check_fits(job)
            span.set_attribute("diffusion.steps", request.steps)
            span.set_attribute("diffusion.scheduler", request.scheduler)
            attempt.stage = "generate"
            if not self.handoffs.answers:
                timings = await self.run_stage(job, attempt.stats)
                attempt.stage = "handoff"
                return self.handoffs.hand_on(job, incoming, reply_topic, timings)
            generated = await self.run(job, attempt.stats)
            if incoming.resume is None:
                return generated
            return dataclasses.replace(
                generated,
                timings_ms=merge_timings(incoming.timings_ms, generated.timings_ms),
                model_versions={**incoming.model_versions, **generated.model_versions},
            )

    async def run(self, job: Job, stats: JobStats) -> GeneratedImages:
        """Run the job to its images (role all, or decode from its hand-off)."""
        return finish(job, await self.run_stage(job, stats))

    async def run_stage(self, job: Job, stats: JobStats) -> dict[str, float]:
        """Run the job through this role's phases; the milliseconds per model."""

        def on_retry(call: StageCall, exc: BaseException) -> None:
            self.metrics.retries.labels(call.model).inc()
            log.warning("retrying %s for %s: %s", call.model, job.request.request_id, exc)

        runner = self.batcher or self.runner
        assert runner is not None
        kwargs: dict[str, Any] = {"breaker": self.breaker, "tracer": self.tracer}
        if self.progress is not None and Phase.DENOISE in self.role.phases:
            self.progress.started(job.request, job.total_unet_calls)
            kwargs["on_step"] = self.progress.on_step
        if self.admission.preempt:
            kwargs["checkpoint"] = self._checkpoint
        if self.role is not Role.ALL:
            kwargs["phases"] = self.role.phases
        with self.tracer.start_as_current_span("generate"):
            if self.batcher is not None:
                async with self.batcher.job():
                    return await run_phases(job, runner, self.retry, on_retry, stats, **kwargs)
            return await run_phases(job, runner, self.retry, on_retry, stats, **kwargs)

    async def _checkpoint(self, job: Job) -> None:
        """A step boundary: yield the slot here when a waiting high asked for it (preemption)."""
        suspend = self.batcher.suspended if self.batcher is not None else None
        steps_left = job.total_unet_calls - job.unet_calls
        await self.admission.checkpoint(job.request.request_id, steps_left, suspend)
