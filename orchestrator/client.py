"""Client side: send requests and wait for their answers (result or dead letter).

`ReplyWatcher` reads the response and dead-letter topics from their current end and delivers one
answer per request id: a duplicate (a redelivered request answered twice) is counted, not
delivered again. Used by `orchestrator submit`, the tests, the benchmark and the load test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from opentelemetry import trace

from orchestrator.adapters.avro import AvroCodec, GenerationResultRecord
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    DLQ_ERROR_CLASS,
    DLQ_ERROR_MESSAGE,
    DLQ_ERROR_REASON,
    DLQ_ERROR_STAGE,
    Headers,
    KafkaProducerAdapter,
    KafkaSettings,
    header_str,
)
from orchestrator.adapters.tracing import get_tracer, producer_span
from orchestrator.domain import GenerationRequest


@dataclasses.dataclass(frozen=True)
class Answer:
    """What came back for one request."""

    request_id: str
    result: GenerationResultRecord | None = None
    #: dead-letter headers (reason, message, stage...) when it failed
    failure: dict[str, str] | None = None
    latency_s: float = 0.0
    #: the answer record's headers (correlation id, traceparent, dlq.*)
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def reason(self) -> str:
        if self.failure is None:
            return ""
        return (
            f"{self.failure.get('reason', '?')} at {self.failure.get('stage') or '?'}: "
            f"{self.failure.get('message', '')}"
        )


class ReplyWatcher:
    """Consumes the answer topics (no consumer group) and matches answers by correlation id."""

    def __init__(
        self,
        settings: KafkaSettings,
        response_topics: Sequence[str],
        dlq_topic: str,
        codec: AvroCodec,
        fetch_max_wait_ms: int = 20,
    ) -> None:
        self.settings = settings
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.topics = [*dict.fromkeys(response_topics), dlq_topic]
        self.dlq_topic = dlq_topic
        self.codec = codec
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._waiters: dict[str, asyncio.Future[Answer]] = {}
        self._sent_at: dict[str, float] = {}
        self.answered: dict[str, Answer] = {}
        self.duplicates: dict[str, int] = {}
        self.unmatched = 0

    async def start(self) -> None:
        kwargs = self.settings.client_kwargs()
        consumer = AIOKafkaConsumer(
            **kwargs,
            enable_auto_commit=False,
            group_id=None,
            fetch_max_wait_ms=self.fetch_max_wait_ms,
        )
        await consumer.start()
        partitions = []
        await consumer.topics()  # fetches the cluster metadata
        for topic in self.topics:
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                partitions.append(TopicPartition(topic, p))
        if not partitions:
            await consumer.stop()
            raise RuntimeError(f"none of the topics {self.topics} exist on the broker")
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        # resolve the end positions now, so nothing produced after start() is missed
        for tp in partitions:
            await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def __aenter__(self) -> ReplyWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def expect(self, request_id: str) -> asyncio.Future[Answer]:
        fut = self._waiters.get(request_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._waiters[request_id] = fut
            self._sent_at[request_id] = time.monotonic()
        return fut

    async def _loop(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    await self._on_record(tp.topic, record)

    async def _on_record(self, topic: str, record: Any) -> None:
        headers: Headers = [(k, None if v is None else bytes(v)) for k, v in record.headers or ()]
        rid = header_str(headers, CORRELATION_ID_HEADER)
        if topic == self.dlq_topic:
            failure = {
                "error_class": header_str(headers, DLQ_ERROR_CLASS) or "",
                "reason": header_str(headers, DLQ_ERROR_REASON) or "",
                "message": header_str(headers, DLQ_ERROR_MESSAGE) or "",
                "stage": header_str(headers, DLQ_ERROR_STAGE) or "",
            }
            if rid is None:
                with contextlib.suppress(Exception):
                    await self.codec.resolve(record.value)
                    rid = self.codec.decode_request(record.value).request_id
            self._deliver(rid, None, failure, headers)
            return
        try:
            await self.codec.resolve(record.value)
            result = self.codec.decode_result(record.value)
        except Exception:
            self.unmatched += 1
            return
        self._deliver(rid or result.request_id, result, None, headers)

    def _deliver(
        self,
        rid: str | None,
        result: GenerationResultRecord | None,
        failure: dict[str, str] | None,
        headers: Headers,
    ) -> None:
        if not rid:
            self.unmatched += 1
            return
        if rid in self.answered:
            self.duplicates[rid] = self.duplicates.get(rid, 0) + 1
            return
        sent = self._sent_at.get(rid)
        latency = time.monotonic() - sent if sent is not None else 0.0
        answer = Answer(rid, result, failure, latency, tuple(headers))
        self.answered[rid] = answer
        fut = self._waiters.get(rid)
        if fut is not None and not fut.done():
            fut.set_result(answer)


class Client:
    """Produce requests and await their answers."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        request_topic: str = "diffusion.requests",
        response_topic: str = "diffusion.responses",
        dlq_topic: str = "diffusion.requests.dlq",
        codec: AvroCodec | None = None,
        max_record_bytes: int = 16 * 1024 * 1024,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.tracer = get_tracer(tracer_provider)
        self._owns_codec = codec is None
        self.codec = codec or AvroCodec()
        self.request_topic = request_topic
        self.response_topic = response_topic
        self.producer = KafkaProducerAdapter(settings, max_record_bytes=max_record_bytes)
        self.watcher = ReplyWatcher(settings, [response_topic], dlq_topic, self.codec)

    async def start(self) -> None:
        await self.codec.prepare()  # the writer schema ids (a registry call, or local ids)
        await self.watcher.start()
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()
        await self.watcher.stop()
        if self._owns_codec:
            await self.codec.aclose()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def send(self, request: GenerationRequest, *, headers: Headers | None = None) -> str:
        """Produce one request (a request id is made if it has none); returns its id."""
        rid = request.request_id or uuid.uuid4().hex
        if rid != request.request_id:
            request = dataclasses.replace(request, request_id=rid)
        self.watcher.expect(rid)
        with producer_span(
            self.tracer,
            self.request_topic,
            [(CORRELATION_ID_HEADER, rid.encode()), *(headers or [])],
            message_id=rid,
        ) as out:  # the service's process span continues this trace
            await self.producer.publish(
                self.request_topic,
                self.codec.encode_request(request),
                key=rid.encode(),
                headers=out,
            )
        return rid

    async def send_raw(self, value: bytes, request_id: str, key: bytes | None = None) -> None:
        """Produce arbitrary bytes (tests of bad input) with a correlation id to wait on."""
        self.watcher.expect(request_id)
        await self.producer.publish(
            self.request_topic,
            value,
            key=key,
            headers=[(CORRELATION_ID_HEADER, request_id.encode())],
        )

    async def wait(self, request_id: str, timeout: float) -> Answer:
        return await asyncio.wait_for(asyncio.shield(self.watcher.expect(request_id)), timeout)

    async def generate(self, request: GenerationRequest, timeout: float = 300.0) -> Answer:
        rid = await self.send(request)
        return await self.wait(rid, timeout)
