"""The gateway's traces (issue 11): its server span is the root of a request's trace, or
continues an incoming `traceparent`, and the Kafka request carries it on to the service.

Real Tansu and tritonserver, the real service in-process with an in-memory span exporter; the
gateway in-process (same exporter) and as a real `orchestrator gateway` process exporting over
OTLP/gRPC to a local receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.adapters.child_process import free_port, spawn, stop_process_group
from orchestrator.adapters.kafka_broker import create_topics
from orchestrator.config import Settings
from orchestrator.gateway.server import server
from orchestrator.gateway.settings import GatewaySettings
from orchestrator.testing import OtlpReceiver
from tests.integration.service_harness import make_settings, running_service

pytestmark = pytest.mark.integration

KEY = "trace-key-1"
BODY = {"prompt": "traced through the gateway", "steps": 2, "seed": 7}


def _provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@contextlib.asynccontextmanager
async def _inprocess_gateway(
    settings: Settings, registry: str, provider: TracerProvider
) -> AsyncIterator[str]:
    gateway = GatewaySettings(
        port=free_port(), registry_topic=registry, dev_key=KEY, sync_wait_s=120
    )
    srv = server(settings, gateway, embedded=True, tracer_provider=provider)
    task = asyncio.create_task(srv.serve())
    try:
        deadline = time.monotonic() + 60
        while not srv.started:
            assert not task.done(), "gateway stopped at start"
            assert time.monotonic() < deadline, "gateway not started in 60 s"
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{gateway.port}"
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 30)


async def _post_job(url: str, headers: dict[str, str]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http,
        http.post(
            f"{url}/v1/jobs",
            json=BODY,
            headers={"Authorization": f"Bearer {KEY}", "Prefer": "wait=120", **headers},
        ) as r,
    ):
        job: dict[str, Any] = await r.json()
        assert r.status == 200, job
    assert job["status"] == "succeeded", job
    return job


def _process_span(spans: list[ReadableSpan], settings: Settings, job_id: str) -> ReadableSpan:
    return next(
        s
        for s in spans
        if s.name == f"process {settings.request_topic}"
        and s.attributes is not None
        and s.attributes.get("messaging.message.id") == job_id
    )


async def test_gateway_span_is_the_root_and_the_service_continues_it(
    kafka: Any, triton: Any
) -> None:
    provider, exporter = _provider()
    settings = make_settings(kafka, triton)
    registry = f"gwjobs-{uuid.uuid4().hex[:8]}"
    await create_topics(settings.bootstrap_servers, [registry])
    async with (
        running_service(settings, tracer_provider=provider),
        _inprocess_gateway(settings, registry, provider) as url,
    ):
        job = await _post_job(url, {})
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as r:
            assert r.status == 200
    provider.force_flush()
    spans = list(exporter.get_finished_spans())
    by_id = {s.context.span_id: s for s in spans}

    (server_span,) = [
        s for s in spans if s.kind is trace.SpanKind.SERVER and s.name == "POST /v1/jobs"
    ]
    assert server_span.parent is None  # no traceparent came in: the gateway starts the trace
    assert server_span.attributes is not None
    assert server_span.attributes["http.route"] == "/v1/jobs"
    assert server_span.attributes["http.response.status_code"] == 200

    process = _process_span(spans, settings, job["id"])
    assert process.context.trace_id == server_span.context.trace_id
    # service `process` <- gateway `publish` <- ... <- gateway `POST /v1/jobs`
    assert process.parent is not None
    publish = by_id[process.parent.span_id]
    assert publish.kind is trace.SpanKind.PRODUCER
    assert publish.name == f"publish {settings.request_topic}"
    chain = [publish]
    while chain[-1].parent is not None:
        chain.append(by_id[chain[-1].parent.span_id])
    assert chain[-1] is server_span, [s.name for s in chain]
    # probes are not traced
    assert not [s for s in spans if "/healthz" in s.name]


async def test_gateway_process_continues_a_traceparent_and_exports_over_otlp(
    kafka: Any, triton: Any, tmp_path: Path
) -> None:
    provider, exporter = _provider()
    settings = make_settings(kafka, triton, output_dir=tmp_path / "images")
    registry = f"gwjobs-{uuid.uuid4().hex[:8]}"
    await create_topics(settings.bootstrap_servers, [registry])
    trace_id = uuid.uuid4().int & (2**128 - 1)
    parent_id = uuid.uuid4().int & (2**64 - 1)
    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01"
    port = free_port()
    log = tmp_path / "gateway.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCHESTRATOR_", "OTEL_"))}
    with OtlpReceiver() as receiver:
        env.update(
            {
                "ORCHESTRATOR_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
                "ORCHESTRATOR_REQUEST_TOPIC": settings.request_topic,
                "ORCHESTRATOR_RESPONSE_TOPIC": settings.response_topic,
                "ORCHESTRATOR_DLQ_TOPIC": settings.dlq_topic,
                "ORCHESTRATOR_PROGRESS_TOPIC": settings.progress_topic,
                "ORCHESTRATOR_CONTROL_TOPIC": settings.control_topic,
                "ORCHESTRATOR_OUTPUT_DIR": str(settings.output_dir),
                "ORCHESTRATOR_TRACING": "true",
                "ORCHESTRATOR_GATEWAY_REGISTRY_TOPIC": registry,
                "ORCHESTRATOR_GATEWAY_DEV_KEY": KEY,
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.endpoint}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                # nothing goes out before the shutdown: the spans must be flushed on SIGTERM
                # (uvicorn re-raises the signal, which ends the process, once it has stopped)
                "OTEL_BSP_SCHEDULE_DELAY": "600000",
            }
        )
        command = [sys.executable, "-m", "orchestrator", "gateway", "--port", str(port)]
        async with running_service(settings, tracer_provider=provider):
            with log.open("ab") as out:
                process = spawn(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
            try:
                url = f"http://127.0.0.1:{port}"
                deadline = time.monotonic() + 90
                async with aiohttp.ClientSession() as http:
                    while True:
                        assert process.poll() is None, log.read_text(errors="replace")
                        with contextlib.suppress(aiohttp.ClientError):
                            async with http.get(f"{url}/readyz") as r:
                                if r.status == 200:
                                    break
                        assert time.monotonic() < deadline, log.read_text(errors="replace")
                        await asyncio.sleep(0.1)
                job = await _post_job(url, {"traceparent": traceparent})
            finally:
                # SIGTERM: the gateway shuts its provider down, which sends what is left
                code = stop_process_group(process, timeout=15)
        # uvicorn re-raises the signal once it has shut down cleanly
        assert code in (0, -signal.SIGTERM), log.read_text(errors="replace")
        assert "Finished server process" in log.read_text(errors="replace")
    provider.force_flush()

    exported = [span for service, span in receiver.spans() if service == "diffusion-gateway"]
    (server_span,) = [s for s in exported if s.name == "POST /v1/jobs"]
    assert int.from_bytes(server_span.trace_id, "big") == trace_id
    assert int.from_bytes(server_span.parent_span_id, "big") == parent_id
    publish = next(s for s in exported if s.name == f"publish {settings.request_topic}")
    by_id = {s.span_id: s for s in exported}
    chain = [publish]
    while chain[-1].parent_span_id in by_id:
        chain.append(by_id[chain[-1].parent_span_id])
    assert chain[-1] is server_span, [s.name for s in chain]
    assert not [s for s in exported if s.name.endswith("/readyz")], "probes are not traced"

    process_span = _process_span(list(exporter.get_finished_spans()), settings, job["id"])
    assert process_span.context.trace_id == trace_id
    assert process_span.parent is not None
    assert process_span.parent.span_id == int.from_bytes(publish.span_id, "big")
