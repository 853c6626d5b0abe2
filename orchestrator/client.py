"""Client side: send requests, follow their progress, cancel them, wait for their answers.

`ReplyWatcher` reads the response and dead-letter topics from their current end and delivers one
answer per request id: a duplicate (a redelivered request answered twice) is counted, not
delivered again. `ProgressWatcher` tails the progress topic the same way (no consumer group, from
its end when the client starts) and hands each request's events to whoever follows it.
`Client.submit` and `Client.watch` return a `JobHandle`: an async iterator of the request's
progress events that ends with its terminal event (or one made from the answer: events are
advisory and may be dropped, the answer is not), `result()` and `cancel()`. Used by `orchestrator
submit/cancel/watch`, the tests, the benchmark and the load test.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition
from opentelemetry import trace

from orchestrator.adapters.avro import (
    COMMAND_CANCEL,
    OUTCOME_CANCELLED,
    AvroCodec,
    ControlCommandRecord,
    GenerationResultRecord,
    ProgressEventRecord,
)
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
    stop_client,
)
from orchestrator.adapters.tracing import get_tracer, producer_span
from orchestrator.domain import GenerationRequest, JobEvent

if TYPE_CHECKING:
    from orchestrator.config import Settings

log = logging.getLogger("orchestrator.client")


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
        """True when it succeeded (a result with images, not a cancelled one)."""
        return self.result is not None and self.result.outcome != OUTCOME_CANCELLED

    @property
    def cancelled(self) -> bool:
        """True for a `cancelled` answer: a result record without images."""
        return self.result is not None and self.result.outcome == OUTCOME_CANCELLED

    @property
    def event(self) -> JobEvent:
        """The terminal event this answer means: finished, cancelled or failed."""
        if self.cancelled:
            return JobEvent.CANCELLED
        return JobEvent.FINISHED if self.result is not None else JobEvent.FAILED

    @property
    def reason(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.failure is None:
            return ""
        return (
            f"{self.failure.get('reason', '?')} at {self.failure.get('stage') or '?'}: "
            f"{self.failure.get('message', '')}"
        )


async def tail(
    settings: KafkaSettings, topics: Sequence[str], fetch_max_wait_ms: int = 20
) -> tuple[Any, list[TopicPartition]]:
    """A started consumer without a group, assigned every partition of `topics` that exists and
    positioned at their current end (resolved now, so nothing produced after this returns is
    missed). The partition list is empty when none of the topics exists."""
    consumer = AIOKafkaConsumer(
        **settings.client_kwargs(),
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        partitions = []
        await consumer.topics()  # fetches the cluster metadata
        for topic in topics:
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                partitions.append(TopicPartition(topic, p))
        if partitions:
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
    except BaseException:
        await stop_client(consumer)
        raise
    return consumer, partitions


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
        consumer, partitions = await tail(self.settings, self.topics, self.fetch_max_wait_ms)
        if not partitions:
            await stop_client(consumer)
            raise RuntimeError(f"none of the topics {self.topics} exist on the broker")
        self._consumer = consumer
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await stop_client(self._consumer)

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
            answered = self.answered.get(request_id)
            if answered is not None:
                fut.set_result(answered)
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


class _Subscription:
    """The events of one request, as the watcher received them, for one follower."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.events: collections.deque[ProgressEventRecord] = collections.deque()
        self.arrived = asyncio.Event()

    def put(self, event: ProgressEventRecord) -> None:
        self.events.append(event)
        self.arrived.set()


class ProgressWatcher:
    """Tails the progress topic (no consumer group, every partition, from its end at start) and
    hands each request's events, in the order they were produced, to its subscriptions.

    Records are keyed by request id: a record whose key names no subscribed request is skipped
    without being decoded (previews make some records kilobytes). Events of requests nobody
    follows are not kept. A progress topic that does not exist is not an error (a service
    without progress events): the watcher then delivers nothing and `available` is False.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topic: str,
        codec: AvroCodec,
        fetch_max_wait_ms: int = 20,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.codec = codec
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.available = False
        self.undecodable = 0
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._subs: dict[str, list[_Subscription]] = {}

    async def start(self) -> None:
        consumer, partitions = await tail(self.settings, [self.topic], self.fetch_max_wait_ms)
        if not partitions:
            log.warning("progress topic %s does not exist: no progress events", self.topic)
            await stop_client(consumer)
            return
        self.available = True
        self._consumer = consumer
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await stop_client(self._consumer)
            self._consumer = None

    def subscribe(self, request_id: str) -> _Subscription:
        sub = _Subscription(request_id)
        self._subs.setdefault(request_id, []).append(sub)
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
        subs = self._subs.get(sub.request_id, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subs.pop(sub.request_id, None)

    async def _loop(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    await self._on_record(record)

    async def _on_record(self, record: Any) -> None:
        key = record.key
        if key is not None:
            rid = bytes(key).decode("utf-8", "replace")
            if rid not in self._subs:
                return
        elif not self._subs:
            return
        try:
            await self.codec.resolve(record.value)
            event = self.codec.decode_progress(record.value)
        except Exception:
            self.undecodable += 1
            return
        for sub in self._subs.get(event.request_id, ()):
            sub.put(event)


def _is_terminal(event: ProgressEventRecord) -> bool:
    try:
        return JobEvent(event.event).terminal
    except ValueError:  # an event a newer service knows and this client does not
        return False


class JobHandle:
    """One request followed by a client: its progress events, its answer, its cancellation.

    `async for event in handle` yields the request's progress events as they arrive and ends
    after a terminal one (finished, failed, cancelled). Progress is advisory: when the answer
    arrives first and no terminal event follows within `grace_s`, the iteration ends with a
    terminal event made from the answer (its `message` says so), so it always ends once the
    request is answered. Close the handle (or use it as a context manager) to stop following.
    """

    #: seconds the event iterator waits, once the answer is in, for the terminal progress event
    grace_s = 0.5

    def __init__(self, client: Client, request_id: str, sub: _Subscription | None) -> None:
        self.client = client
        self.request_id = request_id
        self._sub = sub
        self._answer = client.watcher.expect(request_id)
        #: the last event the iterator yielded
        self.last: ProgressEventRecord | None = None
        self.cancel_sent = False

    def __aiter__(self) -> AsyncIterator[ProgressEventRecord]:
        return self.events()

    async def __aenter__(self) -> JobHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving this request's progress events."""
        sub, self._sub = self._sub, None
        if sub is not None and self.client.progress is not None:
            self.client.progress.unsubscribe(sub)

    @property
    def answered(self) -> bool:
        return self._answer.done()

    async def events(self) -> AsyncIterator[ProgressEventRecord]:
        """The request's progress events, ending with a terminal one (see the class)."""
        loop = asyncio.get_running_loop()
        sub = self._sub
        grace_until: float | None = None
        while True:
            while sub is not None and sub.events:
                event = sub.events.popleft()
                self.last = event
                yield event
                if _is_terminal(event):
                    return
            if self._answer.done():
                if grace_until is None:
                    grace_until = loop.time() + self.grace_s
                left = grace_until - loop.time()
                if sub is None or left <= 0:
                    event = self._from_answer(self._answer.result())
                    self.last = event
                    yield event
                    return
                sub.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.arrived.wait(), left)
                continue
            waits: set[asyncio.Future[Any]] = {self._answer}
            arrived: asyncio.Task[bool] | None = None
            if sub is not None:
                sub.arrived.clear()
                arrived = asyncio.create_task(sub.arrived.wait())
                waits.add(arrived)
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if arrived is not None:
                    arrived.cancel()

    def _from_answer(self, answer: Answer) -> ProgressEventRecord:
        last = self.last
        steps = last.steps if last is not None else 0
        event = answer.event
        step = steps if event is JobEvent.FINISHED else (last.step if last is not None else 0)
        failure = answer.failure or {}
        return ProgressEventRecord(
            request_id=self.request_id,
            event=event.value,
            timestamp_ms=int(time.time() * 1000),
            step=step,
            steps=steps,
            elapsed_ms=last.elapsed_ms if last is not None else 0.0,
            reason=failure.get("reason") or None,
            message=failure.get("message") or "from the answer (no terminal progress event)",
        )

    async def result(self, timeout: float | None = None) -> Answer:
        """The answer: a result, a `cancelled` result (`answer.cancelled`) or a dead letter
        (`answer.failure`). Raises TimeoutError after `timeout` seconds (None: no limit)."""
        return await asyncio.wait_for(asyncio.shield(self._answer), timeout)

    async def cancel(
        self, reason: str | None = None, *, wait: bool = False, timeout: float | None = 30.0
    ) -> Answer | None:
        """Produce a `cancel` command for this request; with `wait`, return its final answer
        (`cancelled`, or the result or dead letter that won the race). Cancelling is
        idempotent: a finished request stays answered as it was."""
        await self.client.cancel(self.request_id, reason)
        self.cancel_sent = True
        if not wait:
            return None
        return await self.result(timeout)


class Client:
    """Produce requests and await their answers; with `progress_topic`, follow their progress
    (`submit`, `watch`); with `control_topic`, cancel them (`cancel`)."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        request_topic: str = "diffusion.requests",
        response_topic: str = "diffusion.responses",
        dlq_topic: str = "diffusion.requests.dlq",
        progress_topic: str | None = None,
        control_topic: str | None = None,
        codec: AvroCodec | None = None,
        max_record_bytes: int = 16 * 1024 * 1024,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.tracer = get_tracer(tracer_provider)
        self._owns_codec = codec is None
        self.codec = codec or AvroCodec()
        self.request_topic = request_topic
        self.response_topic = response_topic
        self.control_topic = control_topic
        self.producer = KafkaProducerAdapter(settings, max_record_bytes=max_record_bytes)
        self.watcher = ReplyWatcher(settings, [response_topic], dlq_topic, self.codec)
        self.progress = (
            ProgressWatcher(settings, progress_topic, self.codec) if progress_topic else None
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, codec: AvroCodec | None = None, **kwargs: Any
    ) -> Client:
        """A client of the service these settings describe: its Kafka connection, topics and
        (unless `codec` is given) its schema ids, local or its registry's."""
        if codec is None:
            from orchestrator.adapters.avro import make_codec

            codec = make_codec(settings)
        return cls(
            settings.kafka("-client"),
            request_topic=settings.request_topic,
            response_topic=settings.response_topic,
            dlq_topic=settings.dlq_topic,
            progress_topic=settings.progress_topic,
            control_topic=settings.control_topic,
            codec=codec,
            **kwargs,
        )

    async def start(self) -> None:
        await self.codec.prepare()  # the writer schema ids (a registry call, or local ids)
        await self.watcher.start()
        if self.progress is not None:
            await self.progress.start()
        await self.producer.start()

    async def stop(self) -> None:
        await stop_client(self.producer)
        if self.progress is not None:
            await self.progress.stop()
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

    async def submit(
        self, request: GenerationRequest, *, headers: Headers | None = None
    ) -> JobHandle:
        """Produce one request and follow it: the handle's events start with the first one the
        service emits after this call (the client's watchers were positioned when it started)."""
        rid = request.request_id or uuid.uuid4().hex
        if rid != request.request_id:
            request = dataclasses.replace(request, request_id=rid)
        handle = self.watch(rid)
        try:
            await self.send(request, headers=headers)
        except BaseException:
            handle.close()
            raise
        return handle

    def watch(self, request_id: str) -> JobHandle:
        """Follow a request submitted elsewhere: its events from now on, and its answer if it
        arrives after this client started."""
        progress = self.progress
        sub = (
            progress.subscribe(request_id) if progress is not None and progress.available else None
        )
        return JobHandle(self, request_id, sub)

    async def cancel(self, request_id: str, reason: str | None = None) -> None:
        """Produce a `cancel` command for `request_id` to the control topic (keyed by the id,
        with its correlation id and a `traceparent`); returns once the broker has it."""
        if not self.control_topic:
            raise RuntimeError("this client has no control topic: pass control_topic")
        command = ControlCommandRecord(
            command=COMMAND_CANCEL,
            request_id=request_id,
            issued_ms=int(time.time() * 1000),
            reason=reason,
        )
        with producer_span(
            self.tracer,
            self.control_topic,
            [(CORRELATION_ID_HEADER, request_id.encode())],
            message_id=request_id,
        ) as out:
            await self.producer.publish(
                self.control_topic,
                self.codec.encode_control(command),
                key=request_id.encode(),
                headers=out,
            )
