"""Progress events end to end: real Tansu, real tritonserver, the real service in-process."""

from __future__ import annotations

import asyncio
import collections
import io
import itertools
import socket
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from opentelemetry.sdk.trace import TracerProvider
from PIL import Image

from orchestrator.adapters.avro import AvroCodec, ProgressEventRecord, make_codec
from orchestrator.adapters.kafka import CORRELATION_ID_HEADER, KafkaSettings, header_str
from orchestrator.adapters.metrics import Metrics
from orchestrator.adapters.progress import ProgressPublisher
from orchestrator.config import Settings
from orchestrator.domain import GenerationRequest
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration

Event = tuple[ProgressEventRecord, dict[str, bytes | None], bytes | None]


def progress_settings(kafka: Any, triton: Any, **overrides: Any) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return make_settings(
        kafka,
        triton,
        progress_topic=f"prog-{tag}",
        control_topic=f"ctl-{tag}",
        max_in_flight=8,
        **overrides,
    )


async def read_events(
    settings: Settings, request_ids: set[str], timeout_s: float = 60.0
) -> dict[str, list[Event]]:
    """Every progress event of `request_ids` from the start of the topic, until each has its
    terminal event (then a short while more, for anything that would come after it)."""
    codec = AvroCodec()
    consumer = AIOKafkaConsumer(
        settings.progress_topic,
        bootstrap_servers=settings.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
    )
    events: dict[str, list[Event]] = collections.defaultdict(list)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        ended_at: float | None = None
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    event = codec.decode_progress(record.value or b"")
                    if event.request_id in request_ids:
                        events[event.request_id].append(
                            (event, dict(record.headers or []), record.key)
                        )
            done = all(
                any(e.event in ("finished", "failed") for e, _, _ in events[r]) for r in request_ids
            )
            if done and ended_at is None:
                ended_at = time.monotonic()
            if ended_at is not None and time.monotonic() - ended_at > 1.0:
                return events
        raise AssertionError(
            f"no terminal event in {timeout_s} s: "
            f"{ {r: [e.event for e, _, _ in events[r]] for r in request_ids} }"
        )
    finally:
        await consumer.stop()
        await codec.aclose()


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def wait_for_count(
    metrics: Metrics, name: str, at_least: float, timeout_s: float = 5.0, **labels: str
) -> float:
    """Counters move when the broker acknowledges, a little after the consumer sees the
    record: wait (bounded) for `at_least`."""
    for _ in range(int(timeout_s * 10)):
        value = sample(metrics, name, **labels)
        if value >= at_least:
            return value
        await asyncio.sleep(0.1)
    return sample(metrics, name, **labels)


async def test_progress_order_and_throttling_for_jobs_of_different_lengths(
    kafka: Any, triton: Any
) -> None:
    rate = 4.0
    settings = progress_settings(kafka, triton, progress_step_events_per_s=rate)
    requests = [
        GenerationRequest(
            prompt=f"a lighthouse {n}", seed=n, steps=n, scheduler="euler", request_id=f"p-{n}"
        )
        for n in (4, 12, 30)
    ]
    async with (
        running_service(settings, tracer_provider=TracerProvider()) as service,
        client_for(settings) as client,
    ):
        # sent together (one produce batch, so one fetch of the service's): sent one after
        # another, a fetch boundary (100 ms here) could fall between them and the short jobs end
        # before the next is read (CI saw the three never share a UNet call once)
        ids = await asyncio.gather(*(client.send(r) for r in requests))
        answers = await asyncio.gather(*(client.wait(i, 180) for i in ids))
        assert all(a.ok for a in answers), [a.reason for a in answers]
        events = await read_events(settings, {r.request_id for r in requests})
        steps_seen = sum(1 for evs in events.values() for e, _, _ in evs if e.event == "step")
        published = await wait_for_count(
            service.metrics, "orchestrator_progress_events_total", steps_seen, event="step"
        )
        finished = await wait_for_count(
            service.metrics, "orchestrator_progress_events_total", 3, event="finished"
        )
        unet = [b for b in service.stats.batches if b.model == "unet"]
    assert max(b.members for b in unet) > 1, "the three jobs never shared a UNet call"
    assert published == steps_seen and finished == 3
    for request in requests:
        evs = events[request.request_id]
        kinds = [e.event for e, _, _ in evs]
        n = request.steps
        assert kinds[:2] == ["queued", "started"] and kinds[-1] == "finished", kinds
        assert set(kinds[2:-1]) == {"step"}, kinds
        steps = [e for e, _, _ in evs if e.event == "step"]
        numbers = [e.step for e in steps]
        assert numbers[0] == 1 and numbers[-1] == n, numbers
        assert numbers == sorted(set(numbers))
        assert all(e.steps == n for e in steps)
        assert evs[1][0].steps == n  # started says how many steps come
        # apart from the last (always sent), step events are 1/rate apart
        times = [e.timestamp_ms for e in steps]
        for a, b in itertools.pairwise(times[:-1]):
            assert b - a >= 1000 / rate - 5, times
        for t in times:
            assert sum(1 for u in times if t <= u < t + 1000) <= rate + 1, times
        elapsed = [e.elapsed_ms for e in steps]
        assert elapsed == sorted(elapsed) and elapsed[-1] > 0
        for event, headers, key in evs:
            assert key == request.request_id.encode()
            assert header_str(list(headers.items()), CORRELATION_ID_HEADER) == request.request_id
            assert headers.get("traceparent"), "no trace context on a progress event"
            assert event.previews == ()
        # one trace: every event of the job carries the same trace id
        assert len({h["traceparent"][3:35] for _, h, _ in evs}) == 1  # type: ignore[index]


async def test_previews_only_when_asked_bounded_and_decodable(kafka: Any, triton: Any) -> None:
    settings = progress_settings(
        kafka,
        triton,
        progress_step_events_per_s=1000.0,
        preview_interval_s=0.001,
        preview_max_side=8,
        preview_max_bytes=1024,
    )
    asked = GenerationRequest(
        prompt="a red barn", seed=1, steps=6, num_images=2, preview=True, request_id="pv-yes"
    )
    plain = GenerationRequest(prompt="a red barn", seed=1, steps=6, request_id="pv-no")
    async with running_service(settings), client_for(settings) as client:
        answers = await asyncio.gather(client.generate(asked, 180), client.generate(plain, 180))
        assert all(a.ok for a in answers), [a.reason for a in answers]
        events = await read_events(settings, {"pv-yes", "pv-no"})
    assert all(e.previews == () for e, _, _ in events["pv-no"])
    with_previews = [e for e, _, _ in events["pv-yes"] if e.previews]
    assert with_previews, "a request that asked for previews got none"
    assert all(e.event == "step" for e in with_previews)
    assert with_previews[0].step == 1
    for event in with_previews:
        assert [p.index for p in event.previews] == [0, 1]  # one per image of the request
        for p in event.previews:
            assert p.media_type == "image/jpeg"
            assert len(p.data) <= 1024
            assert max(p.width, p.height) <= 8
            with Image.open(io.BytesIO(p.data)) as img:
                img.load()
                assert (img.width, img.height) == (p.width, p.height)
                assert img.mode == "RGB"


async def test_failed_event_carries_the_dead_letter_reason(kafka: Any, triton: Any) -> None:
    settings = progress_settings(kafka, triton)
    bad = GenerationRequest(prompt="x", steps=4, scheduler="no_such_scheduler", request_id="f-1")
    async with running_service(settings) as service, client_for(settings) as client:
        answer = await client.generate(bad, 120)
        assert answer.failure is not None and answer.failure["reason"] == "invalid_request"
        events = await read_events(settings, {"f-1"})
        failed = await wait_for_count(
            service.metrics, "orchestrator_progress_events_total", 1, event="failed"
        )
    kinds = [e.event for e, _, _ in events["f-1"]]
    assert kinds == ["queued", "failed"]
    last = events["f-1"][-1][0]
    assert last.reason == "invalid_request"
    assert last.message and "scheduler" in last.message
    assert failed == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("where", ["dead_broker", "unknown_topic"])
async def test_progress_that_cannot_be_published_never_holds_the_answer(
    kafka: Any, triton: Any, where: str
) -> None:
    settings = progress_settings(kafka, triton)
    metrics = Metrics()
    if where == "dead_broker":
        # nothing listens there: every connection attempt is refused
        target = KafkaSettings(bootstrap_servers=f"127.0.0.1:{_closed_port()}")
        topic = settings.progress_topic
    else:
        # a topic the broker cannot have (as a cluster without auto-creation answers for an
        # unknown one): metadata never names it
        target = settings.kafka("-progress")
        topic = "no such topic!"
    publisher = ProgressPublisher(
        target, topic, make_codec(settings), metrics, send_timeout_s=6.0, flush_timeout_s=0.5
    )
    request = GenerationRequest(prompt="x", steps=8, seed=2, request_id=f"d-{where}")
    async with (
        running_service(settings, metrics=metrics, progress=publisher),
        client_for(settings) as client,
    ):
        t0 = time.monotonic()
        answer = await client.generate(request, 120)
        took = time.monotonic() - t0
        assert answer.ok, answer.reason
        dropped_reason = "unavailable" if where == "dead_broker" else "unknown_topic"
        dropped = await wait_for_count(
            metrics, "orchestrator_progress_dropped_total", 1, 12.0, reason=dropped_reason
        )
    assert dropped >= 1, dict(publisher.dropped)
    assert sample(metrics, "orchestrator_progress_events_total", event="finished") == 0
    # the answer did not wait for the progress producer's 6 s timeouts
    assert took < 4.0, took
    # every event offered ended somewhere: dropped (any reason), none published
    assert sum(publisher.published.values()) == 0
    assert sum(publisher.dropped.values()) >= 4  # queued, started, >= 1 step, finished
