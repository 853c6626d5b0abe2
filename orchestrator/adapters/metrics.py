"""Prometheus metrics of one service instance (its own registry, so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Labelled:
    """Every sample of `registry` with `labels` added (a stage role's ``role``)."""

    def __init__(self, registry: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self.registry = registry
        self.labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            family.samples = [
                sample._replace(labels={**self.labels, **sample.labels})
                for sample in family.samples
            ]
            yield family


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, labels: Mapping[str, str] = {}
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._exposed = self.registry
        if labels:
            # the same metrics, each sample labelled (e.g. role="denoise") when rendered
            self._exposed = CollectorRegistry(auto_describe=False)
            self._exposed.register(_Labelled(self.registry, labels))
        r = self.registry
        self.requests = Counter(
            "orchestrator_requests", "Requests by outcome", ["outcome"], registry=r
        )
        self.request_duration = Histogram(
            "orchestrator_request_duration_seconds",
            "End-to-end time from consuming a request to its acknowledged answer",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "orchestrator_stage_duration_seconds",
            "Time a job spent in each stage (model calls included)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "orchestrator_batch_size",
            "Rows per Triton call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("orchestrator_jobs_in_flight", "Jobs being processed", registry=r)
        self.buffered_bytes = Gauge(
            "orchestrator_buffered_bytes", "Bytes of request records in flight", registry=r
        )
        self.retries = Counter("orchestrator_retries", "Retried model calls", ["model"], registry=r)
        self.dead_letters = Counter(
            "orchestrator_dead_letters", "Dead-lettered requests", ["reason"], registry=r
        )
        self.duplicates = Counter(
            "orchestrator_duplicates", "Requests whose id was already answered", registry=r
        )
        self.consumer_lag = Gauge(
            "orchestrator_consumer_lag",
            "Records behind the partition's end",
            ["topic", "partition"],
            registry=r,
        )
        self.triton_errors = Counter(
            "orchestrator_triton_errors", "Failed Triton calls", ["model", "code"], registry=r
        )
        self.paused = Gauge(
            "orchestrator_consumption_paused", "1 while fetching is paused", ["cause"], registry=r
        )
        self.stuck_records = Gauge(
            "orchestrator_stuck_records",
            "Records retried for longer than stuck_record_after_s (neither answered nor "
            "dead-lettered yet; their partitions' commits wait)",
            registry=r,
        )
        self.unexpected_errors = Counter(
            "orchestrator_unexpected_errors",
            "Exceptions the handling path did not expect (each ends in a dead letter)",
            ["stage"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "orchestrator_triton_circuit_open", "1 while Triton is considered down", registry=r
        )
        self.prompt_cache_hits = Counter(
            "orchestrator_prompt_cache_hits",
            "encode_prompt rows answered without a text-encoder row of their own (from the "
            "prompt-embedding cache, or shared with the same prompt's encoding under way)",
            registry=r,
        )
        self.prompt_cache_misses = Counter(
            "orchestrator_prompt_cache_misses",
            "encode_prompt rows sent to Triton by the prompt-embedding cache (one per distinct "
            "prompt not cached)",
            registry=r,
        )
        self.prompt_cache_bytes = Gauge(
            "orchestrator_prompt_cache_bytes",
            "Bytes held by the prompt-embedding cache",
            registry=r,
        )
        self.prompt_cache_entries = Gauge(
            "orchestrator_prompt_cache_entries",
            "Prompts held by the prompt-embedding cache",
            registry=r,
        )

        self.progress_events = Counter(
            "orchestrator_progress_events",
            "Progress events acknowledged by the broker, by event",
            ["event"],
            registry=r,
        )
        self.progress_dropped = Counter(
            "orchestrator_progress_dropped",
            "Progress events dropped (queue_full, timeout, unknown_topic, broker_error, "
            "too_large, encode_error, unavailable, shutdown)",
            ["reason"],
            registry=r,
        )
        self.previews_dropped = Counter(
            "orchestrator_previews_dropped",
            "Previews left out of their event because no encoding fit preview_max_bytes",
            registry=r,
        )
        self.cancels = Counter(
            "orchestrator_cancels",
            "Cancel commands by where they found their request (waiting, running, "
            "before_request, unknown_or_finished)",
            ["where"],
            registry=r,
        )
        self.control_records = Counter(
            "orchestrator_control_records",
            "Records read from the control topic, by outcome (applied, ignored, undecodable)",
            ["outcome"],
            registry=r,
        )
        self.admission_waiting = Gauge(
            "orchestrator_admission_waiting",
            "Jobs fetched and waiting for a slot, by priority",
            ["priority"],
            registry=r,
        )
        self.admission_wait = Histogram(
            "orchestrator_admission_wait_seconds",
            "Time a job waited for its slot, by priority",
            ["priority"],
            buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=r,
        )
        self.admission_refused = Counter(
            "orchestrator_admission_refused",
            "Jobs answered deadline_exceeded at admission (deadline passed or cannot be met), "
            "by priority",
            ["priority"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self._exposed)
