"""The intake: records in from Kafka, each to its end, offsets committed only behind the ends.

One consumer loop fetches within the read-ahead (max_in_flight, max_buffered_bytes), pauses while
something downstream is down (Triton, the schema registry) and resumes after, gives each record
to the handler as its own task, retries a record the handler could not end (a broker or registry
outage) with backoff and counts those waiting too long (stuck, in /readyz), commits what is done,
and drains in-flight work on SIGTERM and before a rebalance takes partitions away. What a record
means is the handler's business: every stage role shares this intake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka.structs import ConsumerRecord

from orchestrator.adapters.kafka import KafkaConsumerAdapter
from orchestrator.adapters.metrics import Metrics
from orchestrator.answering import ServiceStats
from orchestrator.config import Settings

log = logging.getLogger("orchestrator.service")

#: ends one record: True once its answer or dead letter is acknowledged, False while the
#: broker takes neither; raises RetryLater while a dependency is down
Handler = Callable[[ConsumerRecord[bytes, bytes]], Awaitable[bool]]
#: the readiness facts a part beside the intake adds: (ready, details)
Facts = Callable[[], tuple[bool, dict[str, object]]]


class RetryLater(Exception):
    """The record can be neither answered nor dead-lettered now (a dependency is down): it
    keeps its slot and is processed again after a backoff."""

    def __init__(self, cause: str, error: BaseException) -> None:
        super().__init__(f"{cause}: {error}")
        self.cause = cause
        self.error = error


class Intake:
    """Consumes `topics` as `group_id` and hands each record to `handler`."""

    def __init__(
        self,
        settings: Settings,
        topics: list[str],
        handler: Handler,
        *,
        metrics: Metrics,
        stats: ServiceStats,
        group_id: str | None = None,
        blocked: Callable[[], str | None] = lambda: None,
        facts: Facts = lambda: (True, {}),
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.metrics = metrics
        self.stats = stats
        self.blocked = blocked
        self.facts = facts
        self.consumer = KafkaConsumerAdapter(
            settings.kafka(),
            topics,
            group_id=group_id,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            before_revoke=self._drain_partitions,
            consumer_options={
                "rebalance_timeout_ms": settings.rebalance_timeout_ms,
                "fetch_max_wait_ms": settings.fetch_max_wait_ms,
            },
        )
        self._stopping = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._task_partition: dict[asyncio.Task[None], tuple[str, int]] = {}
        self._buffered = 0
        #: records waiting to be tried again: (topic, partition, offset) -> (since, cause)
        self._waiting: dict[tuple[str, int, int], tuple[float, str]] = {}
        self._last_loop = time.monotonic()
        self.broker_ok = False
        self.running = False

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def wait_stopping(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout_s)

    async def start(self) -> None:
        await self.consumer.start()
        self.broker_ok = True

    async def consume(self) -> None:
        """The loop, until `stop()`; then drain and leave the group with what is done
        committed."""
        self.running = True
        try:
            await self._consume_loop()
        finally:
            self.running = False
            await self._drain()
            await self.consumer.stop(commit=True)

    async def _consume_loop(self) -> None:
        paused_for: str | None = None
        last_probe = 0.0
        while not self._stopping.is_set():
            self._last_loop = time.monotonic()
            cause = self._pause_cause()
            if cause != paused_for:
                assignment = self.consumer.assignment()
                if cause is not None:
                    self.consumer.pause(assignment)
                    log.info("pausing consumption: %s", cause)
                else:
                    self.consumer.resume(assignment)
                    log.info("resuming consumption")
                if paused_for is not None:
                    self.metrics.paused.labels(paused_for).set(0)
                if cause is not None:
                    self.metrics.paused.labels(cause).set(1)
                paused_for = cause
            elif cause is not None:
                # partitions assigned by a rebalance while paused start unpaused: pause them too
                self.consumer.pause(self.consumer.assignment())
            free = self.settings.max_in_flight - len(self._tasks)
            try:
                records = await self.consumer.getmany(
                    timeout_ms=100 if cause else 200, max_records=max(1, free)
                )
            except Exception as exc:
                log.warning("fetch failed: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for record in records:
                self._spawn(record)
            await self._commit()
            self.metrics.stuck_records.set(self.stuck_records())
            now = time.monotonic()
            if now - last_probe > 5.0:
                last_probe = now
                await self._observe()

    def registry_down(self) -> bool:
        return any(cause == "schema_registry_down" for _, cause in self._waiting.values())

    def _pause_cause(self) -> str | None:
        blocked = self.blocked()
        if blocked is not None:
            return blocked
        if self.registry_down():
            return "schema_registry_down"
        if len(self._tasks) >= self.settings.max_in_flight:
            return "in_flight"
        if self._buffered >= self.settings.max_buffered_bytes:
            return "buffered_bytes"
        return None

    def _spawn(self, record: ConsumerRecord[bytes, bytes]) -> None:
        size = len(record.value or b"")
        self._buffered += size
        task = asyncio.create_task(self._handle(record))
        self._tasks[task] = size
        self._task_partition[task] = (record.topic, record.partition)
        task.add_done_callback(self._task_done)
        self.metrics.in_flight.set(len(self._tasks))
        self.metrics.buffered_bytes.set(self._buffered)
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, len(self._tasks))
        self.stats.max_buffered_bytes_seen = max(self.stats.max_buffered_bytes_seen, self._buffered)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._buffered -= self._tasks.pop(task, 0)
        self._task_partition.pop(task, None)
        self.metrics.in_flight.set(len(self._tasks))
        self.metrics.buffered_bytes.set(self._buffered)

    async def _observe(self) -> None:
        self.broker_ok = await self.consumer.broker_reachable(timeout_s=3.0)
        with contextlib.suppress(Exception):
            for (topic, partition), lag in (await self.consumer.lag()).items():
                self.metrics.consumer_lag.labels(topic, str(partition)).set(lag)

    async def _commit(self) -> None:
        try:
            await self.consumer.commit_done()
        except Exception as exc:  # a rebalance in progress; the next round commits
            log.warning("commit failed, will retry: %r", exc)

    async def _drain(self) -> None:
        """Give in-flight work the grace period; what is unfinished stays uncommitted."""
        if not self._tasks:
            return
        log.info(
            "draining %d jobs (grace %.0f s)", len(self._tasks), self.settings.shutdown_grace_s
        )
        _, pending = await asyncio.wait(list(self._tasks), timeout=self.settings.shutdown_grace_s)
        if pending:
            log.warning("%d jobs unfinished at the deadline: left for redelivery", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _drain_partitions(self, revoked: set[tuple[str, int]]) -> None:
        """Before partitions go to another member, let their in-flight jobs finish (within
        half the rebalance timeout), so their answers are committed here and not recomputed."""
        tasks = [t for t, tp in self._task_partition.items() if tp in revoked]
        if not tasks:
            return
        budget = self.settings.rebalance_timeout_ms / 2000.0
        log.info(
            "rebalance: finishing %d jobs of revoked partitions (up to %.1f s)", len(tasks), budget
        )
        _, pending = await asyncio.wait(tasks, timeout=budget)
        if pending:
            log.info(
                "rebalance: %d jobs unfinished, their records will be redelivered", len(pending)
            )

    # -- one record --------------------------------------------------------------------------

    async def _handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Bring one record to its end: an acknowledged answer or dead letter, then mark it
        done. Whatever the handling raises ends in a dead letter (``internal_error``); only a
        broker that acknowledges neither (or a schema registry that is down) makes the record
        wait and try again, with backoff, visible in /readyz once it waits too long."""
        started = time.monotonic()
        key = (record.topic, record.partition, record.offset)
        delay = self.settings.record_retry_initial_s
        try:
            while True:
                try:
                    if await self.handler(record):
                        break
                    cause = "broker_unavailable"
                except RetryLater as later:
                    cause = later.cause
                    log.warning(
                        "%s@%s waits: %s: %s", record.partition, record.offset, cause, later.error
                    )
                except asyncio.CancelledError:
                    raise
                except Exception:  # a failure inside the dead-letter path itself
                    log.exception("could not end %s@%s", record.partition, record.offset)
                    cause = "internal_error"
                since = self._waiting.get(key, (started, cause))[0]
                self._waiting[key] = (since, cause)
                if self.stopping:
                    return  # left uncommitted: redelivered after the restart
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.record_retry_max_s)
            self.consumer.mark_done(record)
            self.metrics.request_duration.observe(time.monotonic() - started)
        finally:
            self._waiting.pop(key, None)

    def stuck_records(self) -> int:
        bound = time.monotonic() - self.settings.stuck_record_after_s
        return sum(1 for since, _ in self._waiting.values() if since < bound)

    # -- probes ------------------------------------------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, object]]:
        stalled = time.monotonic() - self._last_loop
        ok = not self.running or stalled < self.settings.stall_timeout_s
        return ok, {"consume_loop_idle_s": round(stalled, 3)}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        registry_up = not self.registry_down()
        stuck = self.stuck_records()
        self.metrics.stuck_records.set(stuck)
        facts_ok, facts = self.facts()
        ok = (
            self.running
            and not self.stopping
            and self.broker_ok
            and facts_ok
            and registry_up
            and stuck == 0
        )
        return ok, {
            "consuming": self.running and not self.stopping,
            "broker": self.broker_ok,
            "schema_registry": registry_up,
            "in_flight": len(self._tasks),
            "waiting_records": len(self._waiting),
            "stuck_records": stuck,
            **facts,
        }
