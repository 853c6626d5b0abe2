"""The Kafka edge: the only importer of aiokafka outside tests and the dev broker.

- :class:`KafkaSettings`: every broker setting (bootstrap, security protocol, SASL, TLS).
- :class:`KafkaProducerAdapter`: publishes and waits for the broker's acknowledgement
  (``acks="all"``), enforces a record size limit itself, maps Kafka errors to PublishError;
  ``publish_together`` appends several records in the caller's step and waits for all of them.
- :class:`KafkaConsumerAdapter`: a consumer group without auto-commit; every consumed record is
  tracked by an :class:`OffsetTracker` and only offsets whose result or dead letter was
  acknowledged (and all before them) are committed.
- :func:`dead_letter_headers`: DLQ headers in the spirit of Spring Kafka / Kafka Connect.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    BrokerResponseError,
    KafkaError,
    MessageSizeTooLargeError,
)
from aiokafka.errors import RecordTooLargeError as _KafkaRecordTooLarge
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition

from orchestrator.errors import (
    OrchestratorError,
    PermanentPublishError,
    PublishError,
    reason_of,
)

log = logging.getLogger(__name__)


async def stop_client(client: Any) -> None:
    """Stop an aiokafka consumer or producer.

    With the broker gone, aiokafka's `consumer.stop()` can raise the CancelledError of its own
    fetch task (it cancels the task while that sleeps in its retry backoff, then awaits it), and
    everything after the stop (the producer's, the rest of a shutdown) never runs. That error
    ends here, logged; a cancellation of the caller's own task still propagates, and so does any
    other error."""
    try:
        await client.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("%s stopped with its broker unreachable", type(client).__name__)


#: the request's correlation id, copied onto its result / dead letter
CORRELATION_ID_HEADER: Final = "correlation_id"
#: where the requester wants the answer (overrides the default result topic)
REPLY_TOPIC_HEADER: Final = "reply_topic"

DLQ_ERROR_CLASS: Final = "dlq.error.class"
DLQ_ERROR_REASON: Final = "dlq.error.reason"
DLQ_ERROR_MESSAGE: Final = "dlq.error.message"
DLQ_ERROR_STAGE: Final = "dlq.error.stage"
DLQ_ATTEMPTS: Final = "dlq.attempts"
DLQ_ORIGINAL_TOPIC: Final = "dlq.original.topic"
DLQ_ORIGINAL_PARTITION: Final = "dlq.original.partition"
DLQ_ORIGINAL_OFFSET: Final = "dlq.original.offset"
DLQ_ORIGINAL_TIMESTAMP: Final = "dlq.original.timestamp"
DLQ_CONSUMER_GROUP: Final = "dlq.consumer.group"
DLQ_PREFIX: Final = "dlq."
#: on a dead letter sent without the original (the broker refused it): what was left out,
#: the original value's size and sha256, and why
DLQ_ORIGINAL_OMITTED: Final = "dlq.original.omitted"
DLQ_ORIGINAL_SIZE: Final = "dlq.original.size"
DLQ_ORIGINAL_SHA256: Final = "dlq.original.sha256"
DLQ_ORIGINAL_OMITTED_REASON: Final = "dlq.original.omitted.reason"

#: Kafka header values may be null (a legal record header with no value)
Headers = list[tuple[str, bytes | None]]
#: (topic, partition); aiokafka's TopicPartition is a NamedTuple and compares equal to it
PartitionKey = tuple[str, int]


# ---------------------------------------------------------------------------------------------
# settings


@dataclasses.dataclass(frozen=True)
class KafkaSettings:
    """Connection settings shared by producer, consumer and admin client."""

    bootstrap_servers: str = "localhost:9092"
    #: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    security_protocol: str = "PLAINTEXT"
    #: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (None: no SASL)
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = dataclasses.field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "orchestrator"
    group_id: str = "orchestrator"

    def __post_init__(self) -> None:
        protocols = {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}
        if self.security_protocol not in protocols:
            raise ValueError(
                f"security_protocol must be one of {sorted(protocols)}, "
                f"got {self.security_protocol!r}"
            )
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments common to AIOKafkaProducer/Consumer/AdminClient."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.uses_ssl:
            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs


# ---------------------------------------------------------------------------------------------
# headers


def header_value(headers: Iterable[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    """The last value of header ``name`` (Kafka allows repeats), or None (absent or null)."""
    found: bytes | None = None
    for key, value in headers or ():
        if key == name:
            found = value
    return found


def header_str(headers: Iterable[tuple[str, bytes | None]] | None, name: str) -> str | None:
    value = header_value(headers, name)
    return None if value is None else value.decode("utf-8", errors="replace")


def dead_letter_headers(
    error: BaseException,
    *,
    original_topic: str,
    original_partition: int,
    original_offset: int,
    original_timestamp: int | None,
    consumer_group: str | None,
    attempts: int = 1,
    original_headers: Iterable[tuple[str, bytes | None]] | None = (),
    max_message_chars: int = 4000,
) -> Headers:
    """The original record's headers (minus earlier ``dlq.*`` ones, null values kept as they
    are) followed by ``dlq.*``.

    Values are UTF-8 text; the timestamp is epoch milliseconds ("" when unknown). For an
    exception that is not one of ours the message starts with its type.
    """
    error_type = type(error)
    stage = error.stage if isinstance(error, OrchestratorError) else None
    if isinstance(error, OrchestratorError):
        message = error.message
    else:
        message = f"{error_type.__name__}: {error}"
    if len(message) > max_message_chars:
        message = message[: max_message_chars - 3] + "..."
    kept: Headers = [
        (k, None if v is None else bytes(v))
        for k, v in original_headers or ()
        if not k.startswith(DLQ_PREFIX)
    ]
    fields = [
        (DLQ_ERROR_CLASS, f"{error_type.__module__}.{error_type.__qualname__}"),
        (DLQ_ERROR_REASON, reason_of(error)),
        (DLQ_ERROR_MESSAGE, message),
        (DLQ_ERROR_STAGE, stage or ""),
        (DLQ_ATTEMPTS, str(attempts)),
        (DLQ_ORIGINAL_TOPIC, original_topic),
        (DLQ_ORIGINAL_PARTITION, str(original_partition)),
        (DLQ_ORIGINAL_OFFSET, str(original_offset)),
        (DLQ_ORIGINAL_TIMESTAMP, "" if original_timestamp is None else str(original_timestamp)),
        (DLQ_CONSUMER_GROUP, consumer_group or ""),
    ]
    return kept + [(k, v.encode("utf-8")) for k, v in fields]


def record_size(
    value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> int:
    """Bytes of key, value and headers (the part of a record a size limit is about)."""
    size = len(value or b"") + len(key or b"")
    for name, header in headers:
        size += len(name.encode("utf-8")) + len(header or b"")
    return size


# ---------------------------------------------------------------------------------------------
# producer


class RecordTooLargeError(PermanentPublishError):
    """The record exceeds the configured size limit; retrying cannot help."""

    reason = "record_too_large"


#: broker answers that no retry can change (size, topic name, authorization, ...)
_PERMANENT_SIZE_ERRORS = (MessageSizeTooLargeError, _KafkaRecordTooLarge)


def publish_error(topic: str, exc: KafkaError) -> PublishError:
    """Map a producer failure: only a broker that may come back (connection, timeout, leader
    moving, not enough replicas) gives a retriable PublishError; a record the broker refuses
    for what it is (too large, invalid topic, not authorized) gives a permanent one."""
    message = f"broker did not acknowledge record for {topic}: {exc!r}"
    if isinstance(exc, _PERMANENT_SIZE_ERRORS):
        return RecordTooLargeError(message, stage="publish")
    if isinstance(exc, BrokerResponseError) and not exc.retriable:
        return PermanentPublishError(message, stage="publish")
    return PublishError(message, stage="publish")


class KafkaProducerAdapter:
    """Publishes records and waits for the broker's acknowledgement.

    ``acks="all"``; ``enable_idempotence`` is off (Tansu cannot do it; Apache Kafka users may
    turn it on through ``producer_options``). Records over ``max_record_bytes`` are refused
    here, before sending, because some brokers (Tansu) do not enforce ``max.message.bytes``.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        max_record_bytes: int = 1_000_000,
        linger_ms: int = 5,
        request_timeout_ms: int = 30_000,
        compression_type: str | None = None,
        producer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if max_record_bytes <= 0:
            raise ValueError("max_record_bytes must be positive")
        self.settings = settings
        self.max_record_bytes = max_record_bytes
        self._options: dict[str, Any] = {
            **settings.client_kwargs(),
            "acks": "all",
            "enable_idempotence": False,
            "linger_ms": linger_ms,
            "request_timeout_ms": request_timeout_ms,
            "compression_type": compression_type,
            # room for batch and record overhead above our own limit
            "max_request_size": max_record_bytes + 64 * 1024,
            **(producer_options or {}),
        }
        self._producer: Any = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(**self._options)
        try:
            await producer.start()
        except KafkaError as exc:
            await stop_client(producer)
            raise PublishError(
                f"cannot connect producer to {self.settings.bootstrap_servers}: {exc!r}"
            ) from exc
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_client(producer)

    def _check_size(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
    ) -> None:
        size = record_size(value, key, headers)
        if size > self.max_record_bytes:
            raise RecordTooLargeError(
                f"record for {topic} is {size} bytes, over the limit of "
                f"{self.max_record_bytes} bytes",
                stage="publish",
            )

    async def publish(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> RecordMetadata:
        """Send one record and wait until the broker acknowledged it (all in-sync replicas).

        Raises :class:`PublishError`: retriable when the broker may take it later,
        :class:`PermanentPublishError` (e.g. :class:`RecordTooLargeError`) when it never will.
        """
        if self._producer is None:
            raise RuntimeError("producer not started")
        self._check_size(topic, value, key, headers)
        try:
            return await self._producer.send_and_wait(
                topic, value=value, key=key, headers=list(headers)
            )
        except KafkaError as exc:
            raise publish_error(topic, exc) from exc
        except TimeoutError as exc:
            raise _timed_out(topic) from exc

    async def publish_together(
        self, records: Sequence[OutgoingRecord], timeout_s: float
    ) -> list[RecordMetadata | PublishError]:
        """Append every record in the caller's own step, then wait for all their
        acknowledgements, `timeout_s` at most in all. One outcome per record, in order: its
        metadata, or the :class:`PublishError` saying why it was not acknowledged in time (one
        that timed out here may still reach the broker later, as after any producer timeout).

        No task is started (no ``gather``, no ``wait_for``): with the topics' metadata known,
        the records are in the producer's batches before the caller first yields, so records
        for one broker usually leave in one produce request, and in a burst of callers none
        waits for a task's turn on the event loop before its records are even appended.
        """
        if self._producer is None:
            raise RuntimeError("producer not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending: list[asyncio.Future[RecordMetadata] | PublishError] = []
        try:
            async with asyncio.timeout_at(deadline):  # only if a send must wait for metadata
                for record in records:
                    pending.append(await self._append(record))
        except TimeoutError:
            pass
        for record in records[len(pending) :]:
            pending.append(_timed_out(record.topic))
        futures = [f for f in pending if isinstance(f, asyncio.Future)]
        if futures and deadline > loop.time():
            await asyncio.wait(futures, timeout=deadline - loop.time())
        return [_outcome(record.topic, f) for record, f in zip(records, pending, strict=True)]

    async def _append(
        self, record: OutgoingRecord
    ) -> asyncio.Future[RecordMetadata] | PublishError:
        try:
            self._check_size(record.topic, record.value, record.key, record.headers)
            future: asyncio.Future[RecordMetadata] = await self._producer.send(
                record.topic, value=record.value, key=record.key, headers=list(record.headers)
            )
        except PublishError as exc:
            return exc
        except KafkaError as exc:
            return publish_error(record.topic, exc)
        return future


@dataclasses.dataclass(frozen=True, slots=True)
class OutgoingRecord:
    """One record for :meth:`KafkaProducerAdapter.publish_together`."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes | None]] = ()


def _timed_out(topic: str) -> PublishError:
    return PublishError(f"timed out waiting for acknowledgement from {topic}", stage="publish")


def _outcome(
    topic: str, sent: asyncio.Future[RecordMetadata] | PublishError
) -> RecordMetadata | PublishError:
    if isinstance(sent, PublishError):
        return sent
    if not sent.done():
        # still in the producer's hands: its outcome comes later, and nobody asks for it
        sent.add_done_callback(_forget)
        return _timed_out(topic)
    if sent.cancelled():
        return PublishError(f"send to {topic} was cancelled", stage="publish")
    exc = sent.exception()
    if isinstance(exc, KafkaError):
        return publish_error(topic, exc)
    if exc is not None:
        return PublishError(
            f"broker did not acknowledge record for {topic}: {exc!r}", stage="publish"
        )
    return sent.result()


def _forget(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning


# ---------------------------------------------------------------------------------------------
# offset tracking (pure)


class _PartitionOffsets:
    __slots__ = ("committable", "committed", "done", "inflight", "last_tracked", "pending")

    def __init__(self) -> None:
        #: tracked offsets not yet folded into ``committable``, in consumption order
        self.inflight: collections.deque[int] = collections.deque()
        #: the same offsets as ``inflight``, for O(1) membership
        self.pending: set[int] = set()
        self.done: set[int] = set()
        self.last_tracked: int | None = None
        #: offset to commit (last contiguous done offset + 1), None before any is done
        self.committable: int | None = None
        self.committed: int | None = None


class OffsetTracker:
    """Which offsets may be committed, given records that finish out of order.

    Each consumed record is :meth:`track`-ed (in-flight) and later :meth:`done` once its result
    or dead letter was acknowledged. The committable offset of a partition is one past the last
    record of the longest finished prefix of the tracked records, so a commit never passes a
    record that is still being worked on. Offsets need not be consecutive (compaction,
    transaction markers); only the order of consumption matters.
    """

    def __init__(self) -> None:
        self._partitions: dict[PartitionKey, _PartitionOffsets] = {}

    def track(self, partition: PartitionKey, offset: int) -> None:
        state = self._partitions.setdefault(_key(partition), _PartitionOffsets())
        if state.last_tracked is not None and offset <= state.last_tracked:
            raise ValueError(
                f"offset {offset} of {partition} tracked after {state.last_tracked}; "
                "reset() the partition after a seek or rebalance"
            )
        state.inflight.append(offset)
        state.pending.add(offset)
        state.last_tracked = offset

    def done(self, partition: PartitionKey, offset: int) -> bool:
        """Mark a record finished. False if it is not tracked (e.g. its partition was revoked)."""
        state = self._partitions.get(_key(partition))
        if state is None or offset in state.done or offset not in state.pending:
            return False
        state.done.add(offset)
        while state.inflight and state.inflight[0] in state.done:
            finished = state.inflight.popleft()
            state.done.discard(finished)
            state.pending.discard(finished)
            state.committable = finished + 1
        return True

    def committable(
        self, partitions: Collection[PartitionKey] | None = None
    ) -> dict[PartitionKey, int]:
        """Offsets to commit now: those that moved past the last commit."""
        wanted = None if partitions is None else {_key(p) for p in partitions}
        offsets: dict[PartitionKey, int] = {}
        for key, state in self._partitions.items():
            if wanted is not None and key not in wanted:
                continue
            if state.committable is not None and state.committable != state.committed:
                offsets[key] = state.committable
        return offsets

    def committed(self, offsets: Mapping[PartitionKey, int]) -> None:
        """Record that ``offsets`` were committed."""
        for partition, offset in offsets.items():
            state = self._partitions.get(_key(partition))
            if state is not None:
                state.committed = offset

    def in_flight(self, partition: PartitionKey | None = None) -> int:
        """Records tracked and not yet finished (in one partition, or in all)."""
        if partition is not None:
            state = self._partitions.get(_key(partition))
            return 0 if state is None else len(state.inflight) - len(state.done)
        return sum(len(s.inflight) - len(s.done) for s in self._partitions.values())

    def reset(self, partitions: Iterable[PartitionKey]) -> None:
        """Forget partitions (revoked, or about to be re-read after a seek)."""
        for partition in partitions:
            self._partitions.pop(_key(partition), None)

    @property
    def partitions(self) -> list[PartitionKey]:
        return list(self._partitions)


def _key(partition: PartitionKey) -> PartitionKey:
    return (partition[0], partition[1])


# ---------------------------------------------------------------------------------------------
# consumer

PartitionsHook = Callable[[set[PartitionKey]], Awaitable[None]]


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, adapter: KafkaConsumerAdapter) -> None:
        self._adapter = adapter

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._adapter._on_revoked({_key(tp) for tp in revoked})

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._adapter._on_assigned({_key(tp) for tp in assigned})


class KafkaConsumerAdapter:
    """A consumer-group member that commits only finished work.

    ``enable_auto_commit=False``, ``auto_offset_reset="earliest"``. Records returned by
    :meth:`getmany` are tracked; call :meth:`mark_done` when a record's result or dead letter
    was acknowledged and :meth:`commit_done` to commit. On revocation, what is done is committed
    before the partitions go (``on_revoke`` runs after that).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        on_assign: PartitionsHook | None = None,
        on_revoke: PartitionsHook | None = None,
        before_revoke: PartitionsHook | None = None,
        max_poll_interval_ms: int = 300_000,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        fetch_max_bytes: int = 52_428_800,
        consumer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not topics:
            raise ValueError("at least one topic is needed")
        self.settings = settings
        self.topics = tuple(topics)
        self.group_id = group_id or settings.group_id
        self.tracker = OffsetTracker()
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        #: runs first on revocation: lets in-flight work of those partitions finish, so that
        #: its offsets are committed now rather than the records redelivered elsewhere
        self._before_revoke = before_revoke
        self._options: dict[str, Any] = {
            **settings.client_kwargs(),
            "group_id": self.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "max_poll_interval_ms": max_poll_interval_ms,
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": heartbeat_interval_ms,
            "fetch_max_bytes": fetch_max_bytes,
            **(consumer_options or {}),
        }
        self._consumer: Any = None
        self._commit_lock = asyncio.Lock()

    async def start(self) -> None:
        if self._consumer is not None:
            return
        consumer = AIOKafkaConsumer(**self._options)
        consumer.subscribe(topics=list(self.topics), listener=_RebalanceListener(self))
        await consumer.start()
        self._consumer = consumer

    async def stop(self, *, commit: bool = True) -> None:
        """Commit what is done (unless ``commit=False``), then leave the group."""
        consumer = self._consumer
        if consumer is None:
            return
        try:
            if commit:
                try:
                    await self.commit_done()
                except KafkaError as exc:
                    log.warning("final commit failed: %r", exc)
        finally:
            self._consumer = None
            await stop_client(consumer)

    def _require(self) -> Any:
        if self._consumer is None:
            raise RuntimeError("consumer not started")
        return self._consumer

    async def getmany(
        self, timeout_ms: int = 1000, max_records: int | None = None
    ) -> list[ConsumerRecord[bytes, bytes]]:
        """Fetch records (from unpaused partitions), tracking each as in-flight."""
        consumer = self._require()
        batches = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        records: list[ConsumerRecord[bytes, bytes]] = []
        for tp, batch in batches.items():
            for record in batch:
                try:
                    self.tracker.track(_key(tp), record.offset)
                except ValueError:
                    # the client moved the position back (offset reset): the records after it
                    # are delivered again, so start this partition's bookkeeping afresh
                    log.warning("offset of %s went back to %d; re-tracking", tp, record.offset)
                    self.tracker.reset([_key(tp)])
                    self.tracker.track(_key(tp), record.offset)
                records.append(record)
        return records

    def mark_done(self, record: ConsumerRecord[Any, Any]) -> bool:
        """The record's result or dead letter was acknowledged; its offset may be committed."""
        return self.tracker.done((record.topic, record.partition), record.offset)

    async def commit_done(
        self, partitions: Collection[PartitionKey] | None = None
    ) -> dict[PartitionKey, int]:
        """Commit exactly the committable offsets (of ``partitions``, or all); returns them."""
        consumer = self._require()
        async with self._commit_lock:
            offsets = self.tracker.committable(partitions)
            if offsets:
                await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
                self.tracker.committed(offsets)
            return offsets

    def assignment(self) -> set[PartitionKey]:
        return {_key(tp) for tp in self._require().assignment()}

    def pause(self, partitions: Iterable[PartitionKey]) -> None:
        self._require().pause(*[TopicPartition(t, p) for t, p in partitions])

    def resume(self, partitions: Iterable[PartitionKey]) -> None:
        self._require().resume(*[TopicPartition(t, p) for t, p in partitions])

    def paused(self) -> set[PartitionKey]:
        return {_key(tp) for tp in self._require().paused()}

    async def broker_reachable(self, timeout_s: float = 5.0) -> bool:
        """True when the cluster answers a metadata request within the timeout."""
        consumer = self._consumer
        if consumer is None:
            return False
        try:
            await asyncio.wait_for(consumer._client.fetch_all_metadata(), timeout_s)
        except Exception:
            return False
        return True

    async def lag(self) -> dict[PartitionKey, int]:
        """Records between the consumer's position and each assigned partition's end."""
        consumer = self._require()
        lags: dict[PartitionKey, int] = {}
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            if end is None:
                continue
            try:
                position = await consumer.position(tp)
            except Exception:
                continue
            lags[_key(tp)] = max(0, int(end) - int(position))
        return lags

    async def committed_offset(self, partition: PartitionKey) -> int | None:
        """The group's committed offset of a partition, as the broker has it."""
        offset = await self._require().committed(TopicPartition(*partition))
        return None if offset is None else int(offset)

    async def _on_revoked(self, revoked: set[PartitionKey]) -> None:
        if revoked and self._before_revoke is not None:
            try:
                await self._before_revoke(revoked)
            except Exception as exc:
                log.warning("draining %s before revocation failed: %r", sorted(revoked), exc)
        if revoked and self._consumer is not None:
            try:
                async with self._commit_lock:
                    offsets = self.tracker.committable(revoked)
                    if offsets:
                        await self._consumer.commit(
                            {TopicPartition(t, p): o for (t, p), o in offsets.items()}
                        )
                        self.tracker.committed(offsets)
            except KafkaError as exc:
                log.warning("commit on revocation of %s failed: %r", sorted(revoked), exc)
        self.tracker.reset(revoked)
        if self._on_revoke is not None:
            await self._on_revoke(revoked)

    async def _on_assigned(self, assigned: set[PartitionKey]) -> None:
        self.tracker.reset(assigned)
        if self._on_assign is not None:
            await self._on_assign(assigned)
