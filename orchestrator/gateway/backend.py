"""The gateway's Kafka side: publish requests, registrations and cancels; tail every job.

`Backend.start` reads the registry, progress, reply and dead-letter topics from `lookback_s`
ago (no consumer group: every replica reads everything) into a `JobBook`, then keeps tailing
them. `catch_up()` waits until the tail has read up to the end offsets of now, so a replica
that has not seen a job yet can tell "not yet" from "no such job".

A waiter waits for one job (`wait_job`) or for the tail's position (`catch_up`); after each fetch
that brought records, only the waiters of the jobs those records changed are woken (and the
position waiters), not every request in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from orchestrator.adapters.avro import COMMAND_CANCEL, AvroCodec, ControlCommandRecord
from orchestrator.adapters.kafka import (
    CORRELATION_ID_HEADER,
    DLQ_ERROR_MESSAGE,
    DLQ_ERROR_REASON,
    DLQ_ERROR_STAGE,
    KafkaProducerAdapter,
    KafkaSettings,
    OutgoingRecord,
    header_str,
    stop_client,
)
from orchestrator.domain import GenerationRequest
from orchestrator.errors import PublishError
from orchestrator.gateway.jobs import JOB_ID_PREFIX, Job, JobBook, Registration

log = logging.getLogger("orchestrator.gateway")
_JOB_ID_PREFIX = JOB_ID_PREFIX.encode()


class KafkaUnavailable(RuntimeError):
    """The broker did not take or give a record in time (HTTP 503)."""


class Backend:
    def __init__(
        self,
        kafka: KafkaSettings,
        codec: AvroCodec,
        *,
        request_topic: str,
        reply_topic: str,
        response_topics: Sequence[str],
        dlq_topic: str,
        progress_topic: str,
        control_topic: str,
        registry_topic: str,
        lookback_s: float,
        timeout_ms: int = 5000,
        max_record_bytes: int = 1_000_000,
        fetch_wait_ms: int = 20,
    ) -> None:
        self.kafka = kafka
        self.codec = codec
        self.request_topic = request_topic
        self.reply_topic = reply_topic
        self.dlq_topic = dlq_topic
        self.progress_topic = progress_topic
        self.control_topic = control_topic
        self.registry_topic = registry_topic
        self.answer_topics = list(dict.fromkeys([*response_topics, reply_topic]))
        self.lookback_s = lookback_s
        self.timeout_ms = timeout_ms
        self.fetch_wait_ms = fetch_wait_ms
        self.book = JobBook()
        self.producer = KafkaProducerAdapter(
            kafka, linger_ms=0, request_timeout_ms=timeout_ms, max_record_bytes=max_record_bytes
        )
        self._consumer: Any = None
        self._partitions: list[TopicPartition] = []
        #: next offset the tail will read, per partition
        self._pos: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None
        #: futures to wake when a job changes, by job id; under None, after every fetch that
        #: brought records (`catch_up`)
        self._waiters: dict[str | None, list[asyncio.Future[None]]] = {}
        self.last_fetch_ok = 0.0
        self.caught_up = False

    # -- life --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.producer.start()
        consumer = AIOKafkaConsumer(
            **self.kafka.client_kwargs(),
            enable_auto_commit=False,
            group_id=None,
            # Apache Kafka answers a fetch as soon as a record is there, so this is only the
            # idle poll interval; a broker that holds every fetch its full wait (Tansu) adds up
            # to this much to every answer
            fetch_max_wait_ms=self.fetch_wait_ms,
            request_timeout_ms=max(self.timeout_ms, 5000) + 1000,
        )
        await consumer.start()
        try:
            await consumer.topics()
            topics = [self.registry_topic, self.progress_topic, *self.answer_topics, self.dlq_topic]
            missing = [t for t in topics if not consumer.partitions_for_topic(t)]
            if missing:
                raise RuntimeError(f"topics missing on the broker: {', '.join(missing)}")
            self._partitions = [
                TopicPartition(t, p)
                for t in dict.fromkeys(topics)
                for p in sorted(consumer.partitions_for_topic(t) or ())
            ]
            consumer.assign(self._partitions)
            since = int((time.time() - self.lookback_s) * 1000)
            offsets = await consumer.offsets_for_times({tp: since for tp in self._partitions})
            ends = await consumer.end_offsets(self._partitions)
            for tp in self._partitions:
                found = offsets.get(tp)
                start = found.offset if found is not None else ends[tp]
                consumer.seek(tp, start)
                self._pos[tp] = start
        except BaseException:
            await stop_client(consumer)
            await stop_client(self.producer)
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._loop(), name="gateway-tail")
        await self.catch_up(timeout_s=60.0)
        self.caught_up = True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await stop_client(self._consumer)
        await stop_client(self.producer)

    async def reachable(self, timeout_s: float = 2.0) -> bool:
        """Caught up at start, and the cluster answers a metadata request now."""
        if not self.caught_up or self._consumer is None:
            return False
        try:
            await asyncio.wait_for(self._consumer._client.fetch_all_metadata(), timeout_s)
        except Exception:
            return False
        return True

    # -- the tail ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200)
            except KafkaError as exc:
                log.warning("gateway tail: %r", exc)
                await asyncio.sleep(0.5)
                continue
            self.last_fetch_ok = time.monotonic()
            if not batches:
                continue  # nothing moved: no waiter's predicate can have changed
            touched: set[str] = set()
            for tp, records in batches.items():
                for record in records:
                    try:
                        job_id = await self._on_record(tp.topic, record)
                    except Exception:
                        log.warning("gateway tail: skipped a record of %s", tp.topic, exc_info=True)
                    else:
                        if job_id is not None:
                            touched.add(job_id)
                    self._pos[tp] = record.offset + 1
            self._wake(touched)

    def _wake(self, job_ids: set[str]) -> None:
        for key in (*job_ids, None):
            for fut in self._waiters.pop(key, ()):
                if not fut.done():
                    fut.set_result(None)

    async def _on_record(self, topic: str, record: Any) -> str | None:
        """Apply one record to the book; the id of the job it changed, if any."""
        if topic == self.registry_topic:
            if record.value is None:
                return None
            return self.book.register(Registration.decode(record.value)).job_id
        if topic == self.progress_topic:
            # keyed by request id: another client's job is not decoded (it is never visible)
            if record.key is not None and not bytes(record.key).startswith(_JOB_ID_PREFIX):
                return None
            await self.codec.resolve(record.value)
            return self.book.progress(self.codec.decode_progress(record.value)).job_id
        headers = [(k, None if v is None else bytes(v)) for k, v in record.headers or ()]
        rid = header_str(headers, CORRELATION_ID_HEADER)
        if rid is not None and not rid.startswith(JOB_ID_PREFIX):
            return None
        now_ms = int(record.timestamp) if record.timestamp else int(time.time() * 1000)
        if topic == self.dlq_topic:
            if rid is None:
                with contextlib.suppress(Exception):
                    await self.codec.resolve(record.value)
                    rid = self.codec.decode_request(record.value).request_id
            if rid is not None:
                failure = {
                    "reason": header_str(headers, DLQ_ERROR_REASON) or "",
                    "message": header_str(headers, DLQ_ERROR_MESSAGE) or "",
                    "stage": header_str(headers, DLQ_ERROR_STAGE) or "",
                }
                return self.book.dead_letter(rid, failure, now_ms).job_id
            return None
        await self.codec.resolve(record.value)
        result = self.codec.decode_result(record.value)
        return self.book.result(rid or result.request_id, result, now_ms).job_id

    async def catch_up(self, timeout_s: float) -> bool:
        """Wait until the tail has read every record on its topics as of now."""
        if self._consumer is None:
            return False
        try:
            ends = await asyncio.wait_for(
                self._consumer.end_offsets(self._partitions), timeout=timeout_s
            )
        except (KafkaError, TimeoutError):
            return False

        def reached() -> bool:
            return all(self._pos.get(tp, 0) >= end for tp, end in ends.items())

        return await self._wait(reached, timeout_s, None)

    async def _wait(self, predicate: Callable[[], bool], timeout_s: float, key: str | None) -> bool:
        """Until `predicate()` holds (True) or `timeout_s` passed (False), re-checking it each
        time the tail wakes `key` (a job id; None: any fetch that brought records)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(key, []).append(fut)
            handle = loop.call_later(remaining, _expire, fut)
            try:
                await fut
            finally:
                handle.cancel()
                waiting = self._waiters.get(key)
                if waiting is not None and fut in waiting:  # not woken: timed out, cancelled
                    waiting.remove(fut)
                    if not waiting:
                        del self._waiters[key]
        return True

    async def wait_job(self, job_id: str, timeout_s: float, version: int = -1) -> Job | None:
        """The job once it is terminal or changed past `version` (-1: terminal), or as it is
        after `timeout_s`."""

        def done() -> bool:
            job = self.book.get(job_id)
            return job is not None and (job.terminal or (version >= 0 and job.version > version))

        await self._wait(done, timeout_s, job_id)
        return self.book.get(job_id)

    # -- publishing --------------------------------------------------------------------------

    async def _publish(self, topic: str, value: bytes, key: str, headers: list[Any]) -> None:
        try:
            await asyncio.wait_for(
                self.producer.publish(topic, value, key=key.encode(), headers=headers),
                timeout=self.timeout_ms / 1000 + 1,
            )
        except (PublishError, KafkaError, TimeoutError, RuntimeError) as exc:
            raise KafkaUnavailable(f"cannot publish to {topic}: {exc}") from exc

    async def submit(
        self, reg: Registration, request: GenerationRequest, headers: list[Any]
    ) -> None:
        """Publish the job's registration and its request, both appended in this step (one
        produce round trip, not two in a row), and return when both are acknowledged: a GET on
        any replica after this returns finds both. The book takes records in any order, so an
        answer that overtakes the registration on another replica's tail is kept until it comes.

        If one is not acknowledged the caller answers 503: a request sent without its
        registration is cancelled (best effort: nobody could follow it); a registration whose
        request was not sent stays queued, as it would if the gateway died between the two."""
        value = self.codec.encode_request(request, reply_topic=self.reply_topic)
        try:
            registered, submitted = await self.producer.publish_together(
                [
                    OutgoingRecord(self.registry_topic, reg.encode(), reg.job_id.encode()),
                    OutgoingRecord(self.request_topic, value, request.request_id.encode(), headers),
                ],
                timeout_s=self.timeout_ms / 1000 + 1,
            )
        except RuntimeError as exc:  # not started, or stopped
            raise KafkaUnavailable(f"cannot publish: {exc}") from exc
        if not isinstance(registered, PublishError):
            self.book.register(reg)
        elif not isinstance(submitted, PublishError):
            with contextlib.suppress(KafkaUnavailable):
                await self.cancel(reg.job_id, "the gateway could not register the job")
        for topic, outcome in ((self.registry_topic, registered), (self.request_topic, submitted)):
            if isinstance(outcome, PublishError):
                raise KafkaUnavailable(f"cannot publish to {topic}: {outcome}") from outcome

    async def cancel(self, job_id: str, reason: str | None) -> None:
        record = ControlCommandRecord(COMMAND_CANCEL, job_id, int(time.time() * 1000), reason)
        headers = [(CORRELATION_ID_HEADER, job_id.encode())]
        await self._publish(self.control_topic, self.codec.encode_control(record), job_id, headers)


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
