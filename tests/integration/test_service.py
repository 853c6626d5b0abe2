"""The Kafka service end to end: real Tansu, real tritonserver, real Avro on the wire."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import struct
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from PIL import Image

from orchestrator.adapters.avro import AvroCodec
from orchestrator.adapters.kafka import (
    DLQ_ATTEMPTS,
    DLQ_CONSUMER_GROUP,
    DLQ_ERROR_CLASS,
    DLQ_ERROR_MESSAGE,
    DLQ_ERROR_REASON,
    DLQ_ORIGINAL_OFFSET,
    DLQ_ORIGINAL_PARTITION,
    DLQ_ORIGINAL_TIMESTAMP,
    DLQ_ORIGINAL_TOPIC,
    header_str,
)
from orchestrator.adapters.triton import TritonClient
from orchestrator.core.pipeline import start_job
from orchestrator.domain import GenerationRequest
from orchestrator.executor import run_job
from orchestrator.imagefile import decode_png
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration


async def direct(triton: Any, request: GenerationRequest) -> list[np.ndarray[Any, Any]]:
    """What `orchestrator generate` makes for the same request (no Kafka)."""
    async with TritonClient(triton.grpc_url) as client:
        job = start_job(request, await client.model_info())
        return list((await run_job(job, client)).images)


def png_bytes(seed: int, w: int = 64, h: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


async def test_text_to_image_and_img2img_round_trips_equal_generate(
    kafka: Any, triton: Any
) -> None:
    settings = make_settings(kafka, triton)
    t2i = GenerationRequest(
        prompt="a harbour at dawn", seed=7, steps=5, scheduler="euler", request_id="t2i-1"
    )
    i2i = GenerationRequest(
        prompt="the same, in autumn",
        seed=8,
        steps=6,
        strength=0.5,
        scheduler="ddim",
        init_image=png_bytes(3),
        request_id="i2i-1",
        num_images=2,
        metadata={"user": "test"},
    )
    async with running_service(settings), client_for(settings) as client:
        answers = await asyncio.gather(client.generate(t2i, 120), client.generate(i2i, 120))
    for request, answer in zip([t2i, i2i], answers, strict=True):
        assert answer.ok, answer.reason
        assert answer.result is not None
        assert answer.result.request_id == request.request_id
        assert answer.result.seed == request.seed
        assert {"unet", "total"} <= set(answer.result.timings_ms)
        expected = await direct(triton, request)
        got = [decode_png(img.png or b"") for img in answer.result.images]
        assert len(got) == request.num_images
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)
    assert answers[1].result is not None and answers[1].result.metadata == {"user": "test"}


async def test_fifty_concurrent_requests_each_answered_exactly_once(
    kafka: Any, triton: Any
) -> None:
    settings = make_settings(kafka, triton, max_in_flight=32)
    schedulers = ["pndm", "euler", "ddim", "dpmpp_2m", "euler_a"]
    requests = [
        GenerationRequest(
            prompt=f"prompt number {i}",
            seed=i,
            steps=3 + i % 4,
            scheduler=schedulers[i % 5],
            request_id=f"conc-{i}",
        )
        for i in range(50)
    ]
    async with running_service(settings) as service, client_for(settings) as client:
        ids = [await client.send(r) for r in requests]
        answers = await asyncio.gather(*(client.wait(i, 300) for i in ids))
        await asyncio.sleep(1.0)  # anything duplicated would arrive now
        batches = list(service.stats.batches)
    assert [a.request_id for a in answers] == ids
    assert all(a.ok for a in answers), [a.reason for a in answers if not a.ok]
    assert len(client.watcher.answered) == 50
    assert client.watcher.duplicates == {}
    unet = [b for b in batches if b.model == "unet"]
    assert max(b.members for b in unet) > 1, "step batching never put two jobs in one call"


def _frame(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + body


async def test_bad_input_is_dead_lettered_with_headers_good_input_answered(
    kafka: Any, triton: Any
) -> None:
    settings = make_settings(kafka, triton, max_num_images=64)
    codec = AvroCodec()
    good = GenerationRequest(prompt="fine", seed=1, steps=3)
    valid = codec.encode_request(dataclasses.replace(good, request_id="x"))
    bad: dict[str, tuple[bytes, str, str]] = {
        # id: (bytes, reason, stage)
        "bad-magic": (b'{"prompt": "json is not avro"}', "malformed_record", "decode"),
        "truncated": (valid[: len(valid) // 2], "malformed_record", "decode"),
        "garbage-body": (_frame(2, b"\xff\xfe\xfd\xfc"), "malformed_record", "decode"),
        "unknown-schema": (_frame(9999, valid[5:]), "unknown_schema", "decode"),
        "steps-zero": (
            codec.encode_request(dataclasses.replace(good, steps=0, request_id="steps-zero")),
            "invalid_request",
            "validate",
        ),
        "width-63": (
            codec.encode_request(dataclasses.replace(good, width=63, request_id="width-63")),
            "invalid_request",
            "validate",
        ),
        "no-scheduler": (
            codec.encode_request(
                dataclasses.replace(good, scheduler="nope", request_id="no-scheduler")
            ),
            "invalid_request",
            "validate",
        ),
        "bad-image": (
            codec.encode_request(
                dataclasses.replace(good, init_image=b"GIF89a broken", request_id="bad-image")
            ),
            "invalid_request",
            "validate",
        ),
        # 40 images x 2 (guidance) = 80 rows > the UNet's max_batch_size 64: refused before
        # any model call (tests/integration/test_model_limits.py checks the message)
        "model-error": (
            codec.encode_request(
                dataclasses.replace(good, num_images=40, request_id="model-error")
            ),
            "invalid_request",
            "validate",
        ),
    }
    async with running_service(settings) as service, client_for(settings) as client:
        good_ids = []
        for i, (rid, (value, _, _)) in enumerate(bad.items()):
            await client.send_raw(value, rid)
            good_ids.append(
                await client.send(dataclasses.replace(good, seed=i, request_id=f"good-{i}"))
            )
        answers = {rid: await client.wait(rid, 180) for rid in [*bad, *good_ids]}
        stats = service.stats
    for rid in good_ids:
        assert answers[rid].ok, answers[rid].reason
    for rid, (_, reason, stage) in bad.items():
        a = answers[rid]
        assert not a.ok, rid
        assert a.failure is not None
        assert a.failure["reason"] == reason, (rid, a.failure)
        assert a.failure["stage"] == stage, (rid, a.failure)
        assert a.failure["message"], rid
    assert stats.dead_lettered == len(bad)

    # the dead letters carry the original bytes unchanged and the full set of headers
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [
            TopicPartition(settings.dlq_topic, p)
            for p in consumer.partitions_for_topic(settings.dlq_topic)
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = []
        while len(records) < len(bad):
            got = await consumer.getmany(timeout_ms=2000)
            assert got, "dead letters missing"
            for batch in got.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    by_id = {header_str(r.headers, "correlation_id"): r for r in records}
    for rid, (value, reason, _) in bad.items():
        r = by_id[rid]
        assert r.value == value
        h = {k: v.decode() for k, v in r.headers}
        assert h[DLQ_ERROR_REASON] == reason
        assert h[DLQ_ORIGINAL_TOPIC] == settings.request_topic
        assert int(h[DLQ_ORIGINAL_PARTITION]) in (0, 1)
        assert int(h[DLQ_ORIGINAL_OFFSET]) >= 0
        assert int(h[DLQ_ORIGINAL_TIMESTAMP]) > 0
        assert h[DLQ_CONSUMER_GROUP] == settings.group_id
        assert int(h[DLQ_ATTEMPTS]) >= 1
        assert h[DLQ_ERROR_CLASS].startswith("orchestrator.errors.")
        assert h[DLQ_ERROR_MESSAGE]


async def test_offsets_committed_restarted_consumer_gets_nothing_old(
    kafka: Any, triton: Any
) -> None:
    settings = make_settings(kafka, triton)
    async with running_service(settings), client_for(settings) as client:
        ids = [
            await client.send(GenerationRequest(prompt=f"p{i}", steps=2, seed=i)) for i in range(6)
        ]
        await client.send_raw(b"junk", "junk-1")
        for rid in [*ids, "junk-1"]:
            await client.wait(rid, 120)
    # the service has stopped; a new member of its group starts at the committed offsets
    consumer = AIOKafkaConsumer(
        settings.request_topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=2000,
        heartbeat_interval_ms=300,
        rebalance_timeout_ms=2000,
    )
    await consumer.start()
    try:
        got = await consumer.getmany(timeout_ms=6000)
        assert sum(len(v) for v in got.values()) == 0, "old requests were delivered again"
        assignment = consumer.assignment()
        assert assignment
        ends = await consumer.end_offsets(list(assignment))
        total = 0
        for tp in assignment:
            committed = await consumer.committed(tp)
            assert committed == ends[tp], (tp, committed, ends[tp])
            total += ends[tp]
        assert total == 7
    finally:
        await consumer.stop()


async def test_long_prompt_is_truncated_and_the_result_says_so(kafka: Any, triton: Any) -> None:
    settings = make_settings(kafka, triton)
    long = GenerationRequest(prompt=" ".join(["lighthouse"] * 120), steps=2, request_id="long-1")
    short = GenerationRequest(prompt="lighthouse", steps=2, request_id="short-1")
    async with running_service(settings), client_for(settings) as client:
        a_long, a_short = await asyncio.gather(
            client.generate(long, 120), client.generate(short, 120)
        )
    assert a_long.result is not None and a_long.result.prompt_truncated is True
    assert a_short.result is not None and a_short.result.prompt_truncated is False


async def test_large_images_go_to_the_output_dir_and_reply_topic_routing(
    kafka: Any, triton: Any, tmp_path: Any
) -> None:
    from orchestrator.adapters.kafka import REPLY_TOPIC_HEADER
    from orchestrator.adapters.kafka_broker import create_topics
    from orchestrator.client import Client
    from orchestrator.service import kafka_settings

    custom = f"diffusion.replies.{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka, triton, inline_image_max_bytes=0, output_dir=tmp_path / "img")
    request = GenerationRequest(prompt="stored", steps=2, num_images=2, request_id="uri-1")
    async with running_service(settings):
        await create_topics(settings.bootstrap_servers, [custom])
        client = Client(
            kafka_settings(settings),
            request_topic=settings.request_topic,
            response_topic=custom,
            dlq_topic=settings.dlq_topic,
        )
        await client.start()
        try:
            rid = await client.send(request, headers=[(REPLY_TOPIC_HEADER, custom.encode())])
            answer = await client.wait(rid, 120)
        finally:
            await client.stop()
    assert answer.ok and answer.result is not None
    expected = await direct(triton, request)
    for image, want in zip(answer.result.images, expected, strict=True):
        assert image.png is None and image.uri is not None
        path = Path(url2pathname(urlparse(image.uri).path))
        assert path.is_file() and path.is_relative_to(tmp_path / "img")
        np.testing.assert_array_equal(decode_png(path.read_bytes()), want)


async def test_answer_the_broker_did_not_take_is_retried_not_lost(kafka: Any, triton: Any) -> None:
    from orchestrator.errors import PublishError

    settings = make_settings(kafka, triton)
    async with running_service(settings) as service, client_for(settings) as client:
        real_publish = service.producer.publish
        failures = {"left": 2}  # the answer, then its dead letter: neither reaches the broker

        async def flaky_publish(*args: Any, **kwargs: Any) -> Any:
            if failures["left"] > 0:
                failures["left"] -= 1
                raise PublishError("injected: broker did not acknowledge")
            return await real_publish(*args, **kwargs)

        service.producer.publish = flaky_publish  # type: ignore[method-assign]
        answer = await client.generate(GenerationRequest(prompt="retry me", steps=2), 120)
        await asyncio.sleep(0.5)
        stats = service.stats
    assert answer.ok, answer.reason
    assert failures["left"] == 0
    assert stats.answered == 1 and stats.dead_lettered == 0
    assert client.watcher.duplicates == {}
