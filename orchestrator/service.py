"""The service: wires Kafka, the core and Triton into one process. `run()` until `stop()`.

One way in, one way out: record -> decode -> validate -> job (through the step batcher) ->
result record -> publish (acknowledged) -> mark done -> commit. Any failure on that way becomes a
dead-letter record carrying the original bytes and the reason, then the offset is committed. A
record whose answer the broker did not acknowledge stays uncommitted and is delivered again.

The rooms: `orchestrator.intake` (consume, admit, pause, commit, drain, probes), `orchestrator.
handling` (what a record becomes), `orchestrator.answering` (results, stored images, the answer
cache, dead letters), `orchestrator.cancelling` (cancel commands and cancellable jobs),
`orchestrator.handoff` (what a stage role reads and hands on). This module builds them and runs
their lifecycle. With `role` encode, denoise or decode (issue 12) the same service runs one
stage: it consumes that stage's topic as its own group and hands the job on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from opentelemetry import trace

from orchestrator.adapters.avro import make_codec
from orchestrator.adapters.control import ControlListener
from orchestrator.adapters.http import HealthServer
from orchestrator.adapters.kafka import KafkaProducerAdapter, KafkaSettings
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.progress import ProgressPublisher, ProgressReporter
from orchestrator.adapters.tracing import get_tracer
from orchestrator.adapters.triton_pool import TritonPool
from orchestrator.admission import AdmissionGate
from orchestrator.answering import Answering, ServiceStats
from orchestrator.batcher import BatchRecord, StepBatcher
from orchestrator.breaker import CircuitBreaker
from orchestrator.config import Settings
from orchestrator.core.admission import AdmissionPolicy
from orchestrator.core.batching import CohortPolicy, FlushPolicy
from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER
from orchestrator.core.roles import Role
from orchestrator.domain import ModelInfo, Priority
from orchestrator.errors import OrchestratorError
from orchestrator.handling import Handling
from orchestrator.handoff import Handoffs
from orchestrator.intake import Intake
from orchestrator.prompt_cache import prompt_cache_runner

log = logging.getLogger("orchestrator.service")

__all__ = ["Service", "ServiceStats", "kafka_settings", "serve"]


def kafka_settings(settings: Settings) -> KafkaSettings:
    return settings.kafka()


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
        role = Role(settings.role)
        self.metrics = metrics or Metrics(labels={} if role is Role.ALL else {"role": role.value})
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
        self.handoffs = Handoffs(role, self.codec, settings)
        group_id = self.handoffs.group_id
        self.answering = Answering(
            settings,
            self.codec,
            self.producer,
            tracer=self.tracer,
            metrics=self.metrics,
            stats=self.stats,
            progress=self.progress,
            group_id=group_id,
            role=role,
        )
        self.handling = Handling(
            settings,
            self.codec,
            self.answering,
            tracer=self.tracer,
            metrics=self.metrics,
            stats=self.stats,
            admission=self.admission,
            breaker=self.breaker,
            progress=self.progress,
            handoffs=self.handoffs,
        )
        self.cancels = self.handling.cancels
        self.control = ControlListener(
            settings.kafka("-control"),
            settings.control_topic,
            self.codec,
            self.handling.cancelling.on_cancel,
            self.metrics,
            lookback_s=settings.cancel_remember_s,
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        self.intake = Intake(
            settings,
            [self.handoffs.input_topic],
            self.handling.process,
            metrics=self.metrics,
            stats=self.stats,
            group_id=group_id,
            blocked=lambda: "triton_down" if self.breaker.is_open else None,
            facts=self._facts,
        )
        self.consumer = self.intake.consumer
        self.http = HealthServer(
            settings.http_host,
            settings.http_port,
            metrics=self.metrics.render,
            liveness=self.intake.liveness,
            readiness=self.intake.readiness,
        )

    @property
    def info(self) -> ModelInfo | None:
        return self.handling.info

    @property
    def batcher(self) -> StepBatcher | None:
        return self.handling.batcher

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        self.intake.stop()

    @property
    def stopping(self) -> bool:
        return self.intake.stopping

    async def _wait_for_models(self) -> ModelInfo | None:
        """The models' facts, once Triton answers; None when told to stop meanwhile."""
        delay = 0.2
        while True:
            try:
                return await self.triton.model_info()
            except OrchestratorError as exc:
                if not exc.retriable:
                    raise
                if self.stopping:
                    return None
                log.warning("waiting for Triton at %s: %s", self.settings.triton_url, exc)
                await self.intake.wait_stopping(delay)
                delay = min(delay * 2, 5.0)

    def _runner(self, info: ModelInfo) -> None:
        """The handling's runner: the prompt-embedding cache before Triton, and the step
        batcher before both when batching is "step"."""
        # encode_prompt rows from the prompt-embedding cache; Triton computes the rest
        runner = prompt_cache_runner(self.triton, self.settings, self.metrics)
        self.handling.runner = runner
        if self.settings.batching == "step":
            # each stage's rows per call, as its Triton config declares (the smallest over
            # the endpoints); a repository without max_batch_size gets 64
            max_rows = {
                model: info.max_rows(model) or 64
                for model in (UNET, ENCODE_PROMPT, VAE_ENCODER, VAE_DECODER)
            }
            self.handling.batcher = StepBatcher(
                runner,
                max_rows,
                FlushPolicy(self.settings.batch_max_wait_ms / 1000.0),
                on_batch=self._on_batch,
                tracer=self.tracer,
                cohorts=CohortPolicy(self.settings.batch_cohorts),
            )
            self.handling.runner = self.handling.batcher

    async def run(self) -> None:
        await self.http.start()
        try:
            await self.codec.prepare()
            info = await self._wait_for_models()
            if info is None:
                log.info("stopped before Triton answered")
                return
            self.handling.info = info
            self.triton.start()
            self._runner(info)
            await self.producer.start()
            await self.intake.start()
            if self.progress is not None:
                await self.progress_publisher.start()
            await self.control.start()
            log.info(
                "role %s consuming %s as group %s (metrics and probes on :%d)",
                self.handoffs.role.value,
                self.handoffs.input_topic,
                self.consumer.group_id,
                self.http.port,
            )
            if self.on_ready is not None:
                self.on_ready()
            try:
                await self.intake.consume()
            finally:
                await self.producer.stop()
                await self.progress_publisher.stop()
                await self.control.stop()
        finally:
            await self.breaker.close()
            await self.triton.close()
            await self.codec.aclose()
            await self.http.stop()

    # -- probes and metrics ------------------------------------------------------------------

    def _facts(self) -> tuple[bool, dict[str, object]]:
        triton_up = not self.breaker.is_open
        return triton_up, {
            "role": self.handoffs.role.value,
            "triton": triton_up,
            "active_jobs": self.admission.active,
            "admission_waiting": {p.value: n for p, n in self.admission.waiting().items()},
        }

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
