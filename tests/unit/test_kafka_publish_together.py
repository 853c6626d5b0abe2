"""`KafkaProducerAdapter.publish_together`: every record appended in the caller's own step (no
task started), then one bounded wait for all acknowledgements, one outcome per record. The
aiokafka producer is replaced by a stand-in whose `send` hands out delivery futures the test
settles (the real one is exercised by tests/integration/test_gateway.py through the gateway)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, RequestTimedOutError, TopicAuthorizationFailedError

from orchestrator.adapters.kafka import (
    KafkaProducerAdapter,
    KafkaSettings,
    OutgoingRecord,
    RecordTooLargeError,
)
from orchestrator.errors import PermanentPublishError, PublishError


class _Producer:
    """aiokafka's producer as `publish_together` uses it: `send` appends and returns the
    record's delivery future; topics in `stuck` wait for metadata that never comes."""

    def __init__(self, stuck: frozenset[str] = frozenset()) -> None:
        self.stuck = stuck
        self.sent: dict[str, asyncio.Future[Any]] = {}
        #: tasks alive when each record was appended
        self.tasks_at_send: list[int] = []

    async def send(
        self, topic: str, value: Any = None, key: Any = None, headers: Any = None
    ) -> Any:
        if topic in self.stuck:
            await asyncio.Event().wait()
        if topic == "full":
            raise KafkaTimeoutError()
        self.tasks_at_send.append(len(asyncio.all_tasks()))
        self.sent[topic] = asyncio.get_running_loop().create_future()
        return self.sent[topic]


def _adapter(producer: _Producer) -> KafkaProducerAdapter:
    adapter = KafkaProducerAdapter(KafkaSettings(), max_record_bytes=100)
    adapter._producer = producer
    return adapter


def _records(*topics: str) -> list[OutgoingRecord]:
    return [OutgoingRecord(t, b"v", t.encode()) for t in topics]


async def test_all_are_appended_before_the_caller_yields_and_no_task_is_started() -> None:
    producer = _Producer()
    adapter = _adapter(producer)
    call = asyncio.ensure_future(adapter.publish_together(_records("a", "b"), timeout_s=5.0))
    await asyncio.sleep(0)  # one step of `call`
    assert list(producer.sent) == ["a", "b"] and not call.done()
    tasks_before = len(asyncio.all_tasks())
    assert producer.tasks_at_send == [tasks_before, tasks_before]  # this test's and `call`
    producer.sent["b"].set_result("meta-b")
    await asyncio.sleep(0.01)
    assert not call.done()  # both acknowledgements are awaited
    producer.sent["a"].set_result("meta-a")
    assert await asyncio.wait_for(call, 1.0) == ["meta-a", "meta-b"]


async def test_each_record_gets_its_own_outcome() -> None:
    producer = _Producer()
    adapter = _adapter(producer)
    records = [*_records("ok", "down", "refused", "full"), OutgoingRecord("big", b"x" * 101)]
    call = asyncio.ensure_future(adapter.publish_together(records, timeout_s=5.0))
    await asyncio.sleep(0)
    assert list(producer.sent) == ["ok", "down", "refused"]  # the too large one is not sent
    producer.sent["ok"].set_result("meta")
    producer.sent["down"].set_exception(RequestTimedOutError())
    producer.sent["refused"].set_exception(TopicAuthorizationFailedError())
    ok, down, refused, full, big = await asyncio.wait_for(call, 1.0)
    assert ok == "meta"
    assert isinstance(down, PublishError) and down.retriable
    assert isinstance(refused, PermanentPublishError) and not refused.retriable
    assert isinstance(full, PublishError) and full.retriable
    assert isinstance(big, RecordTooLargeError)


async def test_one_bound_for_all_and_late_failures_are_not_reported_as_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = _Producer()
    adapter = _adapter(producer)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    call = asyncio.ensure_future(adapter.publish_together(_records("acked", "late"), 0.2))
    await asyncio.sleep(0)
    producer.sent["acked"].set_result("meta")
    acked, late = await call
    assert 0.15 <= loop.time() - t0 < 1.0
    assert acked == "meta"
    assert isinstance(late, PublishError) and "timed out" in str(late)
    with caplog.at_level("ERROR", logger="asyncio"):
        producer.sent.pop("late").set_exception(RequestTimedOutError())
        await asyncio.sleep(0)
        gc.collect()  # an unretrieved exception is logged when its future is collected
    assert "never retrieved" not in caplog.text


async def test_a_send_waiting_for_metadata_is_bounded_too() -> None:
    producer = _Producer(stuck=frozenset({"unknown"}))
    adapter = _adapter(producer)
    first, stuck, never = await asyncio.wait_for(
        adapter.publish_together(_records("first", "unknown", "never"), timeout_s=0.2), 2.0
    )
    assert all(isinstance(o, PublishError) for o in (first, stuck, never))
    assert list(producer.sent) == ["first"]  # appended, but unacknowledged within the bound


async def test_not_started_is_a_runtime_error() -> None:
    adapter = KafkaProducerAdapter(KafkaSettings())
    with pytest.raises(RuntimeError):
        await adapter.publish_together(_records("a"), timeout_s=1.0)
