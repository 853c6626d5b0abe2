"""Commands about requests (cancel), read from the control topic by every service instance.

A request's job runs on whichever instance owns its request partition, and a cancel is
produced without knowing which one that is: so every instance reads every control record. The
listener is a consumer without a group (``group_id=None``): it is assigned all partitions of
the topic itself, commits nothing, and at start seeks each partition to the first record of
the last ``lookback_s`` seconds (``offsets_for_times``; the end where none is that recent),
so that a cancel produced before its request, or while this instance restarted, is still
seen. See docs/operations.md, "Cancellation".

Undecodable records are logged and counted, never fatal. After a broker error the listener
reconnects and goes on from the records it had read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from orchestrator.adapters.avro import AvroCodec, ControlCommandRecord
from orchestrator.adapters.kafka import KafkaSettings, stop_client
from orchestrator.adapters.metrics import Metrics
from orchestrator.errors import OrchestratorError

log = logging.getLogger("orchestrator.control")

#: the commands the listener knows; any other is counted as ``ignored``
CANCEL = "cancel"


class ControlListener:
    """Reads the control topic from every partition and hands each cancel to `on_cancel`
    (called on the event loop; it must not block)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        codec: AvroCodec,
        on_cancel: Callable[[ControlCommandRecord], None],
        metrics: Metrics,
        *,
        lookback_s: float,
        fetch_max_wait_ms: int = 50,
        reconnect_s: float = 1.0,
        catch_up_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.codec = codec
        self.on_cancel = on_cancel
        self.metrics = metrics
        self.lookback_s = lookback_s
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.reconnect_s = reconnect_s
        self.catch_up_s = catch_up_s
        self.clock = clock
        #: next offset to read per partition (kept across reconnects)
        self._next: dict[TopicPartition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0

    async def start(self) -> None:
        """Connect, seek, and read what the topic holds now (for up to `catch_up_s`), so
        that requests fetched after this see the cancels produced before; then go on
        reading in the background. A broker error here is not fatal: the background loop
        keeps trying."""
        if self._task is not None:
            return
        try:
            self._consumer = await self._connect()
            await asyncio.wait_for(self._catch_up(self._consumer), self.catch_up_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # TimeoutError included: the loop goes on from there
            log.warning("control topic %s: start incomplete (%r); reading on", self.topic, exc)
        self._task = asyncio.create_task(self._loop(), name="control-listener")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    # -- the loop ----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                if self._consumer is None:
                    self._consumer = await self._connect()
                while True:
                    batches = await self._consumer.getmany(timeout_ms=200, max_records=500)
                    for tp, records in batches.items():
                        for record in records:
                            await self._apply(record)
                            self._next[tp] = record.offset + 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                self.reconnects += 1
                log.warning(
                    "control topic %s: %r; reconnecting in %.1f s",
                    self.topic,
                    exc,
                    self.reconnect_s,
                )
                await self._close()
                await asyncio.sleep(self.reconnect_s)

    async def _connect(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            **self.kafka.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            # a position the log no longer has (retention, a broker that lost its log): read
            # what it has rather than skip to its end (applying a cancel twice changes nothing)
            auto_offset_reset="earliest",
            # a broker that does not answer a fetch early holds each one this long: the bound
            # on how late a command is seen
            fetch_max_wait_ms=self.fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            await consumer.topics()  # loads the cluster's metadata
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                raise OrchestratorError(f"control topic {self.topic} has no partitions (yet)")
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            await self._seek(consumer, tps)
        except BaseException:
            await stop_client(consumer)
            raise
        self.connected.set()
        log.info("reading control topic %s (%d partitions)", self.topic, len(tps))
        return consumer

    async def _seek(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        """Where this instance read before: on from there; else the first record of the last
        `lookback_s` seconds, or the end when there is none."""
        known = [tp for tp in tps if tp in self._next]
        ends = await consumer.end_offsets(known) if known else {}
        for tp in known:
            if self._next[tp] > ends[tp]:
                del self._next[tp]  # the log is shorter than what was read: a new log
            else:
                consumer.seek(tp, self._next[tp])
        fresh = [tp for tp in tps if tp not in self._next]
        if not fresh:
            return
        since_ms = int((self.clock() - self.lookback_s) * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in fresh})
        at_end = []
        for tp in fresh:
            hit = found.get(tp)
            if hit is None:
                at_end.append(tp)
            else:
                consumer.seek(tp, hit.offset)
        if at_end:
            await consumer.seek_to_end(*at_end)

    async def _catch_up(self, consumer: AIOKafkaConsumer) -> None:
        tps = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        ends = await consumer.end_offsets(tps)
        while True:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                return
            batches = await consumer.getmany(timeout_ms=200, max_records=500)
            for tp, records in batches.items():
                for record in records:
                    await self._apply(record)
                    self._next[tp] = record.offset + 1

    async def _apply(self, record: ConsumerRecord[bytes, bytes]) -> None:
        value = record.value or b""
        try:
            await self.codec.resolve(value)
            command = self.codec.decode_control(value)
        except OrchestratorError as exc:
            if exc.retriable:
                raise  # the schema registry is down: reconnect, then read the record again
            self.metrics.control_records.labels("undecodable").inc()
            log.warning(
                "control record %s@%s undecodable: %s", record.partition, record.offset, exc
            )
            return
        except Exception as exc:
            self.metrics.control_records.labels("undecodable").inc()
            log.warning(
                "control record %s@%s undecodable: %r", record.partition, record.offset, exc
            )
            return
        if command.command != CANCEL or not command.request_id:
            self.metrics.control_records.labels("ignored").inc()
            log.info("control record %s@%s ignored: %r", record.partition, record.offset, command)
            return
        try:
            self.on_cancel(command)
        except Exception:
            log.exception("applying the cancel of %s failed", command.request_id[:256])
            self.metrics.control_records.labels("failed").inc()
            return
        self.metrics.control_records.labels("applied").inc()

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await stop_client(consumer)
