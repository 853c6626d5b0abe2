"""Cancellation end to end (issue 10): real Tansu, real tritonserver, the real Service.

A cancel command on the control topic stops a running job at its next step boundary (the
others of its batch finish, with exactly their solo images), a request cancelled before it
arrives is answered cancelled without a UNet call, cancels of finished, unknown or already
cancelled ids change nothing; every cancelled request is answered (outcome ``cancelled``), its
offset committed, the cancel an event on its span, and the metrics count it all."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.adapters.avro import AvroCodec, ControlCommandRecord
from orchestrator.adapters.kafka_broker import create_topics
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.triton import TritonClient
from orchestrator.client import Client
from orchestrator.config import Settings
from orchestrator.core.pipeline import UNET, start_job
from orchestrator.domain import GenerationRequest
from orchestrator.executor import run_job
from orchestrator.imagefile import decode_png
from orchestrator.service import Service
from tests.integration.service_harness import make_settings, running_service

pytestmark = pytest.mark.integration


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def cancels(service: Service, where: str) -> float:
    return sample(service.metrics, "orchestrator_cancels_total", where=where)


def control(service: Service, outcome: str) -> float:
    return sample(service.metrics, "orchestrator_control_records_total", outcome=outcome)


async def until(check: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.01)


async def solo_image(triton: Any, request: GenerationRequest) -> np.ndarray[Any, Any]:
    """The request's first image when it runs alone, straight against Triton."""
    async with TritonClient(triton.grpc_url) as client:
        job = start_job(request, await client.model_info())
        return (await run_job(job, client)).images[0]


async def all_committed(service: Service, topic: str, partitions: int) -> None:
    """Wait until the service's committed offsets reach the end of each request partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=service.settings.bootstrap_servers)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    committed: dict[TopicPartition, int] = {}

    async def read() -> None:
        for tp in tps:
            committed[tp] = await service.consumer.committed_offset((topic, tp.partition)) or 0

    deadline = time.monotonic() + 30
    await read()
    while committed != ends:
        assert time.monotonic() < deadline, f"commits stalled at {committed}, ends {ends}"
        await asyncio.sleep(0.2)
        await read()


def client_of(settings: Settings) -> Client:
    return Client.from_settings(settings, codec=AvroCodec())


async def records_on(topic: str, settings: Settings) -> list[tuple[str, bytes]]:
    """(key, value) of every record of `topic`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[tuple[str, bytes]] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    out.append(((r.key or b"").decode(), r.value or b""))
        return out
    finally:
        await consumer.stop()


def unet_members(service: Service) -> int:
    return sum(rec.members for rec in service.stats.batches if rec.model == UNET)


async def test_cancel_mid_denoise_others_equal_solo_and_late_cancels_change_nothing(
    kafka: Any, triton: Any
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = make_settings(kafka, triton, batch_cohorts=1)
    long = GenerationRequest(
        prompt="a very long job", seed=1, steps=150, scheduler="euler", request_id="long-1"
    )
    others = [
        GenerationRequest(
            prompt=f"neighbour {i}",
            seed=10 + i,
            steps=40 + 10 * i,
            scheduler=s,
            request_id=f"other-{i}",
        )
        for i, s in enumerate(("ddim", "dpmpp_2m"))
    ]
    solo = {r.request_id: await solo_image(triton, r) for r in others}

    async with running_service(settings, tracer_provider=provider) as service:
        assert service.info is not None
        others_unet = sum(start_job(r, service.info).total_unet_calls for r in others)
        long_unet = start_job(long, service.info).total_unet_calls
        async with client_of(settings) as client:
            for r in (long, *others):
                await client.send(r)
            # the long job runs and shares UNet batches with the others
            await until(
                lambda: (e := service.cancels.job("long-1")) is not None and e.running,
                what="the long job to start",
            )
            await until(lambda: unet_members(service) >= 6, what="a few shared UNet steps")
            await client.cancel("long-1", reason="test")
            answer = await client.wait("long-1", 60)
            assert answer.cancelled, answer.reason
            assert answer.result is not None and answer.result.images == ()
            assert answer.result.outcome == "cancelled"
            done = [await client.wait(r.request_id, 120) for r in others]
            for r, a in zip(others, done, strict=True):
                assert a.ok, a.reason
                assert a.result is not None
                image = a.result.images[0].png
                assert image is not None
                assert np.array_equal(decode_png(image), solo[r.request_id]), r.request_id
            # the long job stopped early: its UNet calls fell well short of its total
            assert unet_members(service) - others_unet < long_unet
            assert cancels(service, "running") == 1
            assert "long-1" in service.stats.cancel_freed_at
            # nothing is waiting for the cancelled job: no active job is left in the batcher
            assert service.batcher is not None
            await until(lambda: service.batcher is not None and service.batcher.active == 0)

            # the cancel is an event on the job's span
            spans = [
                s
                for s in exporter.get_finished_spans()
                if (s.attributes or {}).get("request.id") == "long-1"
            ]
            assert spans, "no span for the cancelled request"
            events = [e for s in spans for e in s.events if e.name == "cancelled"]
            assert len(events) == 1
            attrs = dict(events[0].attributes or {})
            assert attrs["cancel.where"] == "running"
            assert isinstance(attrs["cancel.latency_ms"], float)
            assert 0 <= attrs["cancel.latency_ms"] < 30_000

            # again, after a finished job, and an unknown id: nothing changes, nothing published
            applied = control(service, "applied")
            await client.cancel("long-1")
            await client.cancel("other-0")
            await client.cancel("never-sent")
            await until(lambda: control(service, "applied") == applied + 3, what="3 cancels")
            assert cancels(service, "unknown_or_finished") == 3
            assert cancels(service, "running") == 1
            # a repeat of the cancelled id gets the same (cancelled) answer, from the cache
            await client.send(long)
            await until(lambda: service.stats.duplicates == 1, what="the repeat's answer")
            await all_committed(service, settings.request_topic, 2)
            await asyncio.sleep(0.5)  # anything published late would show now
        codec = AvroCodec()
        outcomes: dict[str, list[str]] = {}
        for key, value in await records_on(settings.response_topic, settings):
            outcomes.setdefault(key, []).append(codec.decode_result(value).outcome)
        progress_events = [
            codec.decode_progress(value).event
            for key, value in await records_on(settings.progress_topic, settings)
            if key == "long-1"
        ]
    # its progress: queued, started, steps, then cancelled (the last, once)
    assert progress_events[:2] == ["queued", "started"], progress_events
    assert progress_events[-1] == "cancelled", progress_events
    assert progress_events.count("cancelled") == 1, progress_events
    assert "finished" not in progress_events
    # one answer per request, and the repeat's (the same): the late cancels published nothing
    assert outcomes == {
        "long-1": ["cancelled", "cancelled"],
        "other-0": ["succeeded"],
        "other-1": ["succeeded"],
    }


async def test_cancel_before_the_request_even_across_a_restart(kafka: Any, triton: Any) -> None:
    """A cancel produced while no instance runs is read back at start (the lookback), and the
    request arriving later is answered cancelled at once: no UNet call for it."""
    settings = make_settings(kafka, triton)
    await create_topics(settings.bootstrap_servers, settings.service_topics(), partitions=2)
    early = GenerationRequest(prompt="never made", seed=3, steps=20, request_id="early-1")
    async with client_of(settings) as client:
        await client.cancel("early-1")
        async with running_service(settings) as service:
            assert control(service, "applied") == 1  # read while the service started
            assert cancels(service, "unknown_or_finished") == 1
            await client.send(early)
            answer = await client.wait("early-1", 60)
            assert answer.cancelled
            assert unet_members(service) == 0
            assert service.stats.batches == []  # no model call at all
            assert cancels(service, "before_request") == 1
            # cancelling it twice more changes nothing
            await client.cancel("early-1")
            await client.cancel("early-1")
            await until(lambda: control(service, "applied") == 3)
            assert cancels(service, "unknown_or_finished") == 3
            await all_committed(service, settings.request_topic, 2)


async def test_cancel_while_waiting_for_admission_and_undecodable_control_records(
    kafka: Any, triton: Any
) -> None:
    """One job at a time (max_active_jobs=1): the second request waits in the admission gate;
    cancelled there, it is answered at once, while the first still runs, and never starts."""
    settings = make_settings(kafka, triton, max_active_jobs=1)
    first = GenerationRequest(prompt="first", seed=5, steps=150, request_id="first-1")
    second = GenerationRequest(prompt="second", seed=6, steps=60, request_id="second-1")
    async with running_service(settings, partitions=1) as service, client_of(settings) as client:
        await client.send(first)
        await until(
            lambda: (e := service.cancels.job("first-1")) is not None and e.running,
            what="the first job to start",
        )
        await client.send(second)
        await until(lambda: service.admission.position("second-1") == 1, what="second waits")
        # garbage on the control topic: counted, never fatal
        await client.producer.publish(settings.control_topic, b"\x00garbage", key=b"x")
        await client.cancel("second-1")
        answer = await client.wait("second-1", 60)
        assert answer.cancelled
        assert cancels(service, "waiting") == 1
        assert control(service, "applied") == 1
        assert control(service, "undecodable") == 1
        # answered while the first job still runs: the second never took its slot
        first_entry = service.cancels.job("first-1")
        assert first_entry is not None and first_entry.running
        assert service.admission.position("second-1") is None
        ok = await client.wait("first-1", 120)
        assert ok.ok, ok.reason
        first_unet = start_job(first, service.info).total_unet_calls if service.info else -1
        # every UNet call was the first job's: none for the cancelled one
        assert unet_members(service) == first_unet
        await all_committed(service, settings.request_topic, 1)


async def test_the_listener_survives_a_broker_restart_and_skips_garbage() -> None:
    """A broker of its own, stopped and started again on the same port: the listener goes on
    reading and sees a command produced after. (Tansu keeps its log in memory here, so the new
    broker's log starts empty, behind what the listener had read: one partition and a filler
    record make the command's offset one the listener reaches either way.)"""
    from orchestrator.adapters.control import ControlListener
    from orchestrator.adapters.kafka import KafkaProducerAdapter, KafkaSettings
    from orchestrator.adapters.kafka_broker import TansuBroker

    codec = AvroCodec()
    metrics = Metrics()
    seen: list[str] = []
    topic = "control-restart"

    def command(rid: str) -> bytes:
        return codec.encode_control(
            ControlCommandRecord(command="cancel", request_id=rid, issued_ms=int(time.time() * 1e3))
        )

    async def produce(kafka: KafkaSettings, *values: bytes) -> None:
        producer = KafkaProducerAdapter(kafka)
        await producer.start()
        try:
            for value in values:
                await producer.publish(topic, value, key=b"k")
        finally:
            await producer.stop()

    def count(outcome: str) -> float:
        return sample(metrics, "orchestrator_control_records_total", outcome=outcome)

    broker = TansuBroker(0)
    broker.start()
    try:
        broker.wait_ready(30)
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        await create_topics(broker.bootstrap_servers, [topic], partitions=1)
        await produce(kafka, command("before-start"), b"not avro at all", command("after-junk"))
        listener = ControlListener(
            kafka,
            topic,
            codec,
            lambda c: seen.append(c.request_id),
            metrics,
            lookback_s=600,
            reconnect_s=0.2,
        )
        await listener.start()
        try:
            # read back at start (offsets_for_times), the garbage counted and skipped
            assert seen == ["before-start", "after-junk"]
            assert count("undecodable") == 1
            port = broker.port
            broker.stop()
            await asyncio.sleep(1.0)
            broker = TansuBroker(port)
            broker.start()
            broker.wait_ready(30)
            await create_topics(broker.bootstrap_servers, [topic], partitions=1)
            await produce(kafka, *(command(f"filler-{i}") for i in range(3)))
            await produce(kafka, command("after-restart"))
            await until(lambda: "after-restart" in seen, timeout=60, what="the later command")
            assert seen[:2] == ["before-start", "after-junk"]
            assert seen[-1] == "after-restart"
            assert count("applied") == len(seen)
            assert count("undecodable") == 1
        finally:
            await listener.stop()
    finally:
        broker.stop()
