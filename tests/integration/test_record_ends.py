"""Every record ends answered or dead-lettered, in the place it asked for (issue 15), through the
real service on the real broker and the real Triton.

Each test fails on the service as it was before: oversized records and null headers stalled
their partition, an unexpected exception left its record unanswered, a repeated id was answered
on the first request's topic, any reply topic was written to, ids named files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

import orchestrator.handling as handling_module
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    REPLY_TOPIC_HEADER,
    header_str,
)
from orchestrator.adapters.kafka_broker import create_topics
from orchestrator.client import Client
from orchestrator.domain import GenerationRequest
from orchestrator.errors import PublishError
from orchestrator.service import Service, kafka_settings
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration


async def read_topic(
    bootstrap: str, topic: str, n: int, timeout: float = 60, settle: float = 0.0
) -> list[Any]:
    """At least n records of a topic (all partitions), read without a group; with `settle`,
    whatever else arrives that long after the n-th."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[ConsumerRecord[bytes, bytes]] = []
    try:
        end = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < end:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
        end = time.monotonic() + settle
        while time.monotonic() < end:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    assert len(out) >= n, f"{topic}: {len(out)} records of the {n} expected"
    return out


async def produce_raw(
    bootstrap: str, topic: str, value: bytes, headers: list[Any], key: bytes | None = None
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=False, max_request_size=64 << 20
    )
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def all_committed(service: Service, topic: str, partitions: int, timeout: float = 30) -> None:
    """Wait until the group's committed offsets reach each partition's end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=service.settings.bootstrap_servers)
    await consumer.start()
    try:
        from aiokafka.structs import TopicPartition

        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    deadline = time.monotonic() + timeout
    while True:
        committed = {
            tp: await service.consumer.committed_offset((tp.topic, tp.partition)) or 0
            for tp in tps
        }
        if all(committed[tp] == ends[tp] for tp in tps):
            return
        assert time.monotonic() < deadline, f"commits stalled: {committed} of {ends}"
        await asyncio.sleep(0.2)


def request_bytes(client: Client, request: GenerationRequest) -> bytes:
    return client.codec.encode_request(request)


async def test_oversized_and_null_header_records_end_in_the_dlq_and_commits_move(
    kafka: Any, triton: Any
) -> None:
    settings = make_settings(kafka, triton, max_record_bytes=8192, max_request_bytes=16384)
    async with running_service(settings, partitions=1) as service, client_for(settings) as client:
        # over max_request_bytes: record_too_large, and its dead letter cannot carry it
        huge = request_bytes(
            client,
            GenerationRequest(prompt="x", request_id="huge-1", metadata={"pad": "p" * 20000}),
        )
        # under max_request_bytes but over max_record_bytes, and invalid: the dead letter
        # cannot carry the original either
        big_bad = request_bytes(
            client,
            GenerationRequest(
                prompt="x", steps=0, request_id="bigbad-1", metadata={"pad": "p" * 900}
            ),
        )
        bigger_bad = request_bytes(
            client,
            GenerationRequest(
                prompt="y" * 4000,
                steps=0,
                request_id="bigbad-2",
                metadata={f"p{i}": "q" * 1000 for i in range(10)},
            ),
        )
        # a null header value (legal in Kafka) on a failing and on a good record
        bad_null = request_bytes(client, GenerationRequest(prompt="x", steps=0, request_id="n-1"))
        good_null = request_bytes(client, GenerationRequest(prompt="ok", steps=2, request_id="n-2"))
        for rid, value in [
            ("huge-1", huge),
            ("bigbad-1", big_bad),
            ("bigbad-2", bigger_bad),
            ("n-1", bad_null),
            ("n-2", good_null),
        ]:
            client.watcher.expect(rid)
            await produce_raw(
                settings.bootstrap_servers,
                settings.request_topic,
                value,
                [(CORRELATION_ID_HEADER, rid.encode()), ("nullable", None)],
            )
        answers = {rid: await client.wait(rid, 120) for rid in client.watcher._waiters}
        await all_committed(service, settings.request_topic, 1)
        ready = json.loads((await _get(service, "/readyz"))[1])
    assert answers["n-2"].ok, answers["n-2"].failure
    assert answers["huge-1"].failure and answers["huge-1"].failure["reason"] == "record_too_large"
    for rid in ("bigbad-1", "bigbad-2", "n-1"):
        assert answers[rid].failure and answers[rid].failure["reason"] == "invalid_request", rid
    assert ready["stuck_records"] == 0 and ready["waiting_records"] == 0
    dead = {
        header_str(r.headers, CORRELATION_ID_HEADER): r
        for r in await read_topic(settings.bootstrap_servers, settings.dlq_topic, 4)
    }
    for rid, original in (("huge-1", huge), ("bigbad-2", bigger_bad)):
        record = dead[rid]
        assert record.value == b"", rid
        assert header_str(record.headers, "dlq.original.size") == str(len(original))
        assert header_str(record.headers, "dlq.original.sha256") == (
            hashlib.sha256(original).hexdigest()
        )
        assert "over the limit" in (header_str(record.headers, "dlq.original.omitted.reason") or "")
    # small enough: the dead letter keeps the original bytes and the null header as it was
    assert dead["n-1"].value == bad_null
    assert ("nullable", None) in list(dead["n-1"].headers)


async def _get(service: Service, path: str) -> tuple[int, bytes]:
    """GET one of the service's HTTP endpoints (from a thread: the server shares this loop)."""
    return await asyncio.to_thread(_get_blocking, service, path)


def _get_blocking(service: Service, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http.port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


STEPS = ("decode", "validate", "run", "encode", "store", "publish")


async def test_an_exception_at_each_step_of_handling_ends_in_a_dead_letter(
    kafka: Any, triton: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(kafka, triton, inline_image_max_bytes=0, output_dir=tmp_path)
    async with running_service(settings, partitions=2) as service, client_for(settings) as client:
        victims = {f"{step}-{uuid.uuid4().hex[:6]}": step for step in STEPS}

        def fail(step: str, rid: str) -> None:
            if victims.get(rid) == step:
                raise TypeError(f"injected at {step}")

        decode, encode, store, run = (
            service.codec.decode_request_record,
            service.codec.encode_result,
            service.answering.store,
            service.handling.run,
        )
        start_job, publish = handling_module.start_job, service.producer.publish

        def decode_failing(data: bytes) -> Any:
            decoded = decode(data)
            fail("decode", decoded.request.request_id)
            return decoded

        def start_failing(request: GenerationRequest, *args: Any) -> Any:
            fail("validate", request.request_id)
            return start_job(request, *args)

        async def run_failing(job: Any, stats: Any) -> Any:
            fail("run", job.request.request_id)
            return await run(job, stats)

        def encode_failing(result: Any) -> bytes:
            fail("encode", result.request_id)
            return encode(result)

        def store_failing(rid: str, index: int, png: bytes) -> Path:
            fail("store", rid)
            return store(rid, index, png)

        async def publish_failing(topic: str, value: Any, **kwargs: Any) -> Any:
            if topic == settings.response_topic:
                fail("publish", (kwargs.get("key") or b"").decode())
            return await publish(topic, value, **kwargs)

        monkeypatch.setattr(service.codec, "decode_request_record", decode_failing)
        monkeypatch.setattr(service.codec, "encode_result", encode_failing)
        monkeypatch.setattr(service.answering, "store", store_failing)
        monkeypatch.setattr(service.handling, "run", run_failing)
        monkeypatch.setattr(service.producer, "publish", publish_failing)
        monkeypatch.setattr(handling_module, "start_job", start_failing)
        good = [f"good-{i}" for i in range(3)]
        for rid in [*victims, *good]:
            await client.send(GenerationRequest(prompt=rid, steps=2, request_id=rid))
        answers = {rid: await client.wait(rid, 120) for rid in [*victims, *good]}
        await all_committed(service, settings.request_topic, 2)
        health = (await _get(service, "/healthz"))[0]
    for rid, step in victims.items():
        failure = answers[rid].failure
        assert failure is not None, f"{step}: answered despite the injected failure"
        assert failure["reason"] == "internal_error", (step, failure)
        assert "TypeError" in failure["message"] and step in failure["message"], failure
        stage = header_str(answers[rid].headers, "dlq.error.stage")
        assert stage == ("generate" if step == "run" else step), (step, stage)
    assert all(answers[rid].ok for rid in good)
    assert health == 200


async def test_a_repeated_id_is_answered_where_the_repeat_asked(kafka: Any, triton: Any) -> None:
    settings = make_settings(kafka, triton)
    other = f"diffusion.replies.{uuid.uuid4().hex[:8]}"
    async with running_service(settings) as service:
        await create_topics(settings.bootstrap_servers, [other])
        first = Client(kafka_settings(settings), request_topic=settings.request_topic,
                       response_topic=settings.response_topic, dlq_topic=settings.dlq_topic)
        second = Client(kafka_settings(settings), request_topic=settings.request_topic,
                        response_topic=other, dlq_topic=settings.dlq_topic)
        await first.start()
        await second.start()
        try:
            request = GenerationRequest(prompt="once", steps=2, request_id="rep-1")
            await first.send(request)
            one = await first.wait("rep-1", 120)
            # the repeat: another reply topic and another correlation id
            second.watcher.expect("corr-2")
            await second.producer.publish(
                settings.request_topic,
                second.codec.encode_request(request),
                key=b"rep-1",
                headers=[(CORRELATION_ID_HEADER, b"corr-2"), (REPLY_TOPIC_HEADER, other.encode())],
            )
            two = await second.wait("corr-2", 60)
        finally:
            await first.stop()
            await second.stop()
        duplicates = service.stats.duplicates
    assert one.ok and two.ok
    assert duplicates == 1  # from the cache, not generated again
    assert header_str(two.headers, CORRELATION_ID_HEADER) == "corr-2"
    assert one.result is not None and two.result is not None
    assert [i.png for i in one.result.images] == [i.png for i in two.result.images]
    assert first.watcher.duplicates == {}  # the first topic did not get a second answer


async def test_reply_topics_must_be_allowed(kafka: Any, triton: Any) -> None:
    extra = f"extra-{uuid.uuid4().hex[:8]}"
    settings = make_settings(kafka, triton, reply_topics=extra)
    allowed = [extra, f"diffusion.replies.{uuid.uuid4().hex[:8]}"]
    refused = [
        settings.request_topic,
        settings.dlq_topic,
        "elsewhere",
        "diffusion.replies.",
        "bad topic name",
    ]
    async with running_service(settings), client_for(settings) as client:
        await create_topics(settings.bootstrap_servers, allowed)
        ids = {}
        for topic in [*allowed, *refused]:
            rid = f"rt-{uuid.uuid4().hex[:8]}"
            ids[rid] = topic
            await client.send(
                GenerationRequest(prompt="where", steps=2, request_id=rid),
                headers=[(REPLY_TOPIC_HEADER, topic.encode())],
            )
        refusals = {}
        for rid, topic in ids.items():
            if topic in refused:
                refusals[topic] = await client.wait(rid, 60)
        answered = {
            header_str(r.headers, CORRELATION_ID_HEADER)
            for topic in allowed
            for r in await read_topic(settings.bootstrap_servers, topic, 1)
        }
        # nothing was written where it was refused
        stray = await read_topic(
            settings.bootstrap_servers, settings.request_topic, len(ids), settle=1.0
        )
    for topic, answer in refusals.items():
        assert answer.failure and answer.failure["reason"] == "reply_topic_not_allowed", topic
    assert answered == {rid for rid, t in ids.items() if t in allowed}
    assert len(stray) == len(ids)  # only the requests themselves


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("request_id", {"request_id": ".."}),
        ("request_id", {"request_id": "."}),
        ("request_id", {"request_id": ""}),
        ("request_id", {"request_id": "../../etc/x"}),
        ("request_id", {"request_id": "a" * 129}),
        ("metadata", {"metadata": {f"k{i}": "v" for i in range(33)}}),
        ("metadata", {"metadata": {"k": "v" * 1025}}),
        ("deadline_ms", {"deadline": 5.0}),
        ("deadline_ms", {"deadline": time.time() + 30 * 24 * 3600}),
    ],
)
async def test_envelope_fields_are_bounded(
    kafka: Any, triton: Any, field: str, change: dict[str, Any], shared_service: Any
) -> None:
    settings, client = shared_service
    corr = f"env-{uuid.uuid4().hex[:8]}"
    base = GenerationRequest(prompt="x", steps=2, request_id=corr)
    request = dataclasses.replace(base, **change)
    client.watcher.expect(corr)
    await client.producer.publish(
        settings.request_topic,
        client.codec.encode_request(request),
        headers=[(CORRELATION_ID_HEADER, corr.encode())],
    )
    answer = await client.wait(corr, 60)
    assert answer.failure is not None
    assert answer.failure["reason"] == "invalid_request"
    assert answer.failure["message"].startswith(field), answer.failure


@pytest.fixture(scope="module")
async def shared_service(kafka: Any, triton: Any) -> Any:
    settings = make_settings(kafka, triton)
    async with running_service(settings), client_for(settings) as client:
        yield settings, client


async def test_stored_files_are_named_by_digest_inside_output_dir(
    kafka: Any, triton: Any, tmp_path: Path
) -> None:
    out = tmp_path / "images"
    settings = make_settings(kafka, triton, inline_image_max_bytes=0, output_dir=out)
    async with running_service(settings), client_for(settings) as client:
        answer = await client.generate(
            GenerationRequest(prompt="stored", steps=2, request_id="a.b:c@d"), 120
        )
    assert answer.ok and answer.result is not None
    (image,) = answer.result.images
    assert image.uri is not None
    path = Path(url2pathname(urlparse(image.uri).path))
    digest = hashlib.sha256(b"a.b:c@d").hexdigest()
    assert path == out.resolve() / digest[:2] / digest / "0.png"
    assert path.is_file()


async def test_a_record_waiting_on_the_broker_shows_in_readyz_then_ends(
    kafka: Any, triton: Any
) -> None:
    settings = make_settings(
        kafka, triton, stuck_record_after_s=0.5, record_retry_initial_s=0.2, record_retry_max_s=0.5
    )
    async with running_service(settings) as service, client_for(settings) as client:
        real = service.producer.publish
        down = {"on": True, "tries": 0}

        async def unavailable(topic: str, value: Any, **kwargs: Any) -> Any:
            if down["on"] and topic in (settings.response_topic, settings.dlq_topic):
                down["tries"] += 1
                raise PublishError("injected: broker unavailable")
            return await real(topic, value, **kwargs)

        service.producer.publish = unavailable  # type: ignore[method-assign]
        rid = await client.send(GenerationRequest(prompt="wait", steps=2))
        deadline = time.monotonic() + 60
        while True:
            status, body = await _get(service, "/readyz")
            # stuck, and retried at least once (answer and dead letter refused twice): a job
            # slower than stuck_record_after_s shows as stuck after its first attempt already
            if status == 503 and json.loads(body)["stuck_records"] == 1 and down["tries"] >= 4:
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.2)
        metrics = (await _get(service, "/metrics"))[1].decode()
        assert "orchestrator_stuck_records 1.0" in metrics
        down["on"] = False
        answer = await client.wait(rid, 60)
        await asyncio.sleep(0.5)
        after = await _get(service, "/readyz")
    assert answer.ok
    assert down["tries"] >= 4
    assert after[0] == 200 and json.loads(after[1])["stuck_records"] == 0
