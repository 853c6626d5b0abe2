"""OpenTelemetry: provider set-up from the standard OTEL_* variables, W3C context on Kafka headers.

Everything else uses only the OpenTelemetry API; with tracing off, the API's no-op tracer makes
every span free.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, MutableSequence

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "orchestrator"
_PROPAGATOR = TraceContextTextMapPropagator()

#: Kafka header values may be null
KafkaHeaders = list[tuple[str, bytes | None]]


class _HeaderGetter(Getter[Iterable[tuple[str, bytes | None]]]):
    def get(self, carrier: Iterable[tuple[str, bytes | None]], key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier if k.lower() == key.lower() and v]
        return values or None

    def keys(self, carrier: Iterable[tuple[str, bytes | None]]) -> list[str]:
        return [k for k, _ in carrier]


class _HeaderSetter(Setter[MutableSequence[tuple[str, bytes | None]]]):
    def set(
        self, carrier: MutableSequence[tuple[str, bytes | None]], key: str, value: str
    ) -> None:
        carrier[:] = [(k, v) for k, v in carrier if k.lower() != key.lower()]
        carrier.append((key, value.encode("latin-1")))


class _DictSetter(Setter[dict[str, str]]):
    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


def extract(headers: Iterable[tuple[str, bytes | None]] | None) -> otel_context.Context:
    """The trace context a record's `traceparent` header carries (empty if none)."""
    return _PROPAGATOR.extract(list(headers or []), getter=_HeaderGetter())


def inject(headers: MutableSequence[tuple[str, bytes | None]]) -> None:
    """Write the current span's context into Kafka headers (`traceparent`, `tracestate`)."""
    _PROPAGATOR.inject(headers, setter=_HeaderSetter())


def grpc_metadata() -> dict[str, str]:
    """The current context as gRPC metadata, so Triton's own traces join ours."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, setter=_DictSetter())
    return carrier


@contextlib.contextmanager
def producer_span(
    tracer: trace.Tracer,
    topic: str,
    headers: Iterable[tuple[str, bytes | None]],
    message_id: str | None = None,
) -> Iterator[KafkaHeaders]:
    """A `publish <topic>` producer span; yields the headers with its context injected, so the
    consumer of the record continues this trace."""
    attributes: dict[str, str] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "publish",
        "messaging.destination.name": topic,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    with tracer.start_as_current_span(
        f"publish {topic}", kind=trace.SpanKind.PRODUCER, attributes=attributes
    ):
        out = list(headers)
        inject(out)
        yield out


def tracing_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"


def setup_tracing(service_name: str = "diffusion-orchestrator") -> TracerProvider | None:
    """Install a global provider exporting over OTLP (endpoint etc. from OTEL_* variables).

    Returns None when tracing is switched off (`OTEL_SDK_DISABLED=true`, or
    `OTEL_TRACES_EXPORTER=none`).
    """
    if tracing_disabled() or os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    if provider is not None:
        return provider.get_tracer(TRACER_NAME)
    return trace.get_tracer(TRACER_NAME)
