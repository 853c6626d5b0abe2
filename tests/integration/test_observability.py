"""Traces and metrics of real runs: in-memory spans, an OTLP/gRPC receiver, a metrics scrape."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.error
import urllib.request
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.adapters.kafka import header_str
from orchestrator.domain import GenerationRequest
from orchestrator.testing import OtlpReceiver
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _by_id(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


def _trace_of(spans: list[ReadableSpan], trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans if s.context.trace_id == trace_id]


async def test_span_tree_links_and_continuity(kafka: Any, triton: Any) -> None:
    provider, exporter = _provider()
    # one lockstep cohort: these 3 requests must share UNet calls (with two cohorts a request
    # may have a cohort to itself); the links are the same code whatever the cohorts
    settings = make_settings(kafka, triton, batch_cohorts=1)
    requests = [
        GenerationRequest(
            prompt=f"traced {i}", seed=i, steps=3 + i, scheduler="ddim", request_id=f"tr-{i}"
        )
        for i in range(3)
    ]
    bad = dataclasses.replace(requests[0], steps=0, request_id="tr-bad")
    from orchestrator.service import Service  # noqa: F401  (the harness builds it)

    async with (
        running_service(settings, tracer_provider=provider),
        client_for(settings, tracer_provider=provider) as client,
    ):
        ids = [await client.send(r) for r in [*requests, bad]]
        answers = [await client.wait(i, 120) for i in ids]
    provider.force_flush()
    spans = list(exporter.get_finished_spans())
    by_id = _by_id(spans)

    for request, answer in zip(requests, answers, strict=False):
        assert answer.ok, answer.reason
        # the producer span of `submit` starts the trace; the consumer span continues it
        producer = next(
            s
            for s in spans
            if s.kind is trace.SpanKind.PRODUCER
            and s.attributes.get("messaging.message.id") == request.request_id
        )
        tid = producer.context.trace_id
        mine = _trace_of(spans, tid)
        process = next(s for s in mine if s.name == f"process {settings.request_topic}")
        assert process.kind is trace.SpanKind.CONSUMER
        assert process.parent is not None and process.parent.span_id == producer.context.span_id
        attrs = process.attributes
        assert attrs["messaging.system"] == "kafka"
        assert attrs["messaging.destination.name"] == settings.request_topic
        assert attrs["messaging.consumer.group.name"] == settings.group_id
        assert attrs["messaging.kafka.message.key"] == request.request_id
        assert int(attrs["messaging.destination.partition.id"]) in (0, 1)
        assert attrs["messaging.kafka.offset"] >= 0
        names = {s.name for s in mine}
        assert {"generate", "encode prompt", "denoise", "decode", "encode image file"} <= names
        assert f"publish {settings.response_topic}" in names
        # stage spans hang under generate, which hangs under process
        generate = next(s for s in mine if s.name == "generate")
        assert generate.parent.span_id == process.context.span_id
        for stage in ("encode prompt", "denoise", "decode"):
            span = next(s for s in mine if s.name == stage)
            assert span.parent.span_id == generate.context.span_id, stage
        denoise = next(s for s in mine if s.name == "denoise")
        steps = [s for s in mine if s.name.startswith("unet step")]
        assert len(steps) == request.steps
        assert all(s.parent.span_id == denoise.context.span_id for s in steps)
        # each step links to the batched Triton call that served it, and that call links back
        for step in steps:
            assert step.links, step.name
            batch = by_id[step.links[0].context.span_id]
            assert batch.name == "batch unet"
            assert batch.attributes["batch.rows"] >= 2
            assert any(link.context.span_id == step.context.span_id for link in batch.links)
        # the result record carries the trace on
        traceparent = header_str(list(answer.headers), "traceparent")
        assert traceparent is not None and traceparent.split("-")[1] == f"{tid:032x}"

    # batched calls served several requests at once and link to each of them
    unet_batches = [s for s in spans if s.name == "batch unet"]
    shared = [s for s in unet_batches if s.attributes["batch.requests"] > 1]
    assert shared, "no UNet call was shared between requests"
    for b in shared:
        assert len(b.links) == b.attributes["batch.requests"]
        assert len({by_id[link.context.span_id].context.trace_id for link in b.links}) == len(
            b.links
        )

    # a dead-lettered request: error status on its process span, trace carried to the DLQ record
    failed = answers[-1]
    assert not failed.ok and failed.failure is not None
    tp = header_str(list(failed.headers), "traceparent")
    assert tp is not None
    tid = int(tp.split("-")[1], 16)
    process = next(s for s in _trace_of(spans, tid) if s.name.startswith("process "))
    assert process.status.status_code is trace.StatusCode.ERROR
    assert any(e.name == "exception" for e in process.events)


async def test_spans_exported_over_otlp_grpc(kafka: Any, triton: Any) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with OtlpReceiver() as receiver:
        provider = TracerProvider(resource=Resource.create({"service.name": "orchestrator-test"}))
        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
        )
        settings = make_settings(kafka, triton)
        async with (
            running_service(settings, tracer_provider=provider),
            client_for(settings) as client,
        ):
            answer = await client.generate(
                GenerationRequest(prompt="otlp", steps=2, request_id="otlp-1"), 120
            )
        assert answer.ok
        provider.force_flush()
        provider.shutdown()
    names = {span.name for _, span in receiver.spans()}
    services = {service for service, _ in receiver.spans()}
    assert "orchestrator-test" in services
    assert {f"process {settings.request_topic}", "denoise", "batch unet"} <= names


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _status(port: int, path: str) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_metrics_agree_with_what_was_sent(kafka: Any, triton: Any) -> None:
    settings = make_settings(kafka, triton)
    good = [
        GenerationRequest(prompt=f"m{i}", steps=2, seed=i, scheduler="ddim", request_id=f"m-{i}")
        for i in range(5)
    ]
    async with running_service(settings) as service, client_for(settings) as client:
        for r in good:
            await client.send(r)
        await client.send(dataclasses.replace(good[0], request_id="m-0"))  # a repeated id
        await client.send(dataclasses.replace(good[0], width=7, request_id="m-bad"))
        await client.send_raw(b"\x00\x00\x00\x00\x02garbage", "m-junk")
        for rid in [*(r.request_id for r in good), "m-bad", "m-junk"]:
            await client.wait(rid, 120)
        await asyncio.sleep(0.5)
        port = service.http.port
        # the endpoint lives on this event loop: fetch from a thread
        m = await asyncio.to_thread(_scrape, port)
        health = await asyncio.to_thread(_status, port, "/healthz")
        ready = await asyncio.to_thread(_status, port, "/readyz")
    assert health == 200 and ready == 200
    assert m[("orchestrator_requests_total", (("outcome", "answered"),))] == 5
    assert m[("orchestrator_requests_total", (("outcome", "duplicate"),))] == 1
    assert m[("orchestrator_requests_total", (("outcome", "dead_lettered"),))] == 2
    assert m[("orchestrator_dead_letters_total", (("reason", "invalid_request"),))] == 1
    assert m[("orchestrator_dead_letters_total", (("reason", "malformed_record"),))] == 1
    assert m[("orchestrator_duplicates_total", ())] == 1
    assert m[("orchestrator_request_duration_seconds_count", ())] == 8
    assert m[("orchestrator_stage_duration_seconds_count", (("stage", "denoise"),))] == 5
    unet_rows = m[("orchestrator_batch_size_sum", (("model", "unet"),))]
    assert unet_rows == 5 * 2 * 2  # 5 jobs x 2 steps x 2 rows (guided)
    assert m[("orchestrator_jobs_in_flight", ())] == 0
    assert sum(v for (name, _), v in m.items() if name == "orchestrator_retries_total") == 0
