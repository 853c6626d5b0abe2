"""The service's invariant, as a property: for every consumed record, exactly one answer or
dead letter is acknowledged by the broker before its offset is committed, whatever the handling
raises and wherever.

The real Service loop and the real Kafka adapters (offset tracking, commit, error mapping) run
against in-memory doubles of aiokafka's consumer and producer, so hypothesis can try hundreds of
failure plans in seconds; tests/integration/test_record_ends.py checks the same on the real broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from aiokafka.structs import ConsumerRecord, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orchestrator.handling as handling_module
from orchestrator.adapters.kafka import DLQ_ORIGINAL_OFFSET, DLQ_ORIGINAL_PARTITION, header_str
from orchestrator.config import load_settings
from orchestrator.domain import GeneratedImages, GenerationRequest
from orchestrator.errors import InferenceError
from orchestrator.service import Service
from tests.unit.test_validation import INFO

TOPIC = "requests"
PARTITIONS = 2
STEPS = ("decode", "validate", "run", "encode", "store", "publish")
ERRORS: dict[str, Callable[[], BaseException]] = {
    "TypeError": lambda: TypeError("injected"),
    "KeyError": lambda: KeyError("injected"),
    "RuntimeError": lambda: RuntimeError("injected"),
    "ZeroDivisionError": lambda: ZeroDivisionError("injected"),
    "InferenceError": lambda: InferenceError("injected"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What happens to one record."""

    kind: str  # good | garbage | invalid
    null_header: bool
    fail_at: str | None
    error: str
    #: KafkaConnectionError answers for the answer / dead letter before the broker takes them
    answer_unavailable: int
    dlq_unavailable: int
    #: the dead-letter topic refuses the record with its original value (too large)
    dlq_refuses_original: bool
    #: the answer topic refuses the answer (too large)
    answer_refused: bool


plans = st.builds(
    Plan,
    kind=st.sampled_from(["good", "good", "good", "garbage", "invalid"]),
    null_header=st.booleans(),
    fail_at=st.one_of(st.none(), st.sampled_from(STEPS)),
    error=st.sampled_from(sorted(ERRORS)),
    answer_unavailable=st.integers(0, 2),
    dlq_unavailable=st.integers(0, 2),
    dlq_refuses_original=st.booleans(),
    answer_refused=st.booleans(),
)


class Log:
    """What the broker saw, in order: acknowledged records and commits."""

    def __init__(self) -> None:
        self.seq = itertools.count()
        self.acks: list[tuple[int, str, bytes | None, bytes | None, list[Any]]] = []
        self.commits: list[tuple[int, dict[tuple[str, int], int]]] = []


class FakeAioProducer:
    def __init__(self, log: Log, answer_topic: str, dlq_topic: str, plans: dict[str, Plan]):
        self.log = log
        self.answer_topic = answer_topic
        self.dlq_topic = dlq_topic
        self.plans = plans
        self.unavailable: dict[tuple[str, str], int] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = ()
    ) -> None:
        await asyncio.sleep(0)
        assert not (value is None and key is None), "Need at least one: key or value"  # aiokafka
        rid = (key or b"").decode() if topic == self.answer_topic else _dlq_rid(headers)
        plan = self.plans.get(rid)
        if plan is not None:
            kind = "answer" if topic == self.answer_topic else "dlq"
            budget = plan.answer_unavailable if kind == "answer" else plan.dlq_unavailable
            used = self.unavailable.get((kind, rid), 0)
            if used < budget:
                self.unavailable[(kind, rid)] = used + 1
                raise KafkaConnectionError("injected: broker unavailable")
            if kind == "answer" and plan.fail_at == "publish":
                raise ERRORS[plan.error]()
            if kind == "answer" and plan.answer_refused:
                raise MessageSizeTooLargeError("injected: answer too large")
            if kind == "dlq" and plan.dlq_refuses_original and value:
                raise MessageSizeTooLargeError("injected: dead letter too large")
        self.log.acks.append((next(self.log.seq), topic, key, value, list(headers)))


def _dlq_rid(headers: Any) -> str:
    return header_str(headers, "correlation_id") or ""


class FakeClient:
    async def fetch_all_metadata(self) -> None:
        pass


class FakeAioConsumer:
    def __init__(self, log: Log, records: dict[int, list[ConsumerRecord[bytes, bytes]]]):
        self.log = log
        self.records = records
        self.position_of = {p: 0 for p in records}
        self._paused: set[TopicPartition] = set()
        self._client = FakeClient()

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in self.records}

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    async def getmany(
        self, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        out: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        left = max_records or 1_000
        for p, records in self.records.items():
            tp = TopicPartition(TOPIC, p)
            if tp in self._paused or left <= 0:
                continue
            batch = records[self.position_of[p] : self.position_of[p] + left]
            if batch:
                out[tp] = batch
                self.position_of[p] += len(batch)
                left -= len(batch)
        if not out:
            await asyncio.sleep(0.005)
        return out

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.log.commits.append(
            (next(self.log.seq), {(tp.topic, tp.partition): o for tp, o in offsets.items()})
        )

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.records[tp.partition])

    async def position(self, tp: TopicPartition) -> int:
        return self.position_of[tp.partition]

    async def stop(self) -> None:
        pass


class FakeTriton:
    def start(self) -> None:
        pass

    async def model_info(self) -> Any:
        return INFO

    async def is_ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def _record(partition: int, offset: int, value: bytes, headers: list[Any]) -> Any:
    return ConsumerRecord(
        TOPIC, partition, offset, 1_700_000_000_000, 0, None, value, None, 0, len(value), headers
    )


async def _run(plan_list: list[Plan], tmp: Path) -> tuple[Log, list[Any], dict[str, Plan]]:
    cfg = load_settings(
        None,
        bootstrap_servers="127.0.0.1:1",
        triton_url="127.0.0.1:1",
        request_topic=TOPIC,
        response_topic="answers",
        dlq_topic="dead",
        http_port=0,
        http_host="127.0.0.1",
        tracing=False,
        batching="naive",
        inline_image_max_bytes=0,
        output_dir=tmp,
        record_retry_initial_s=0.005,
        record_retry_max_s=0.02,
        prompt_cache_entries=0,  # the run step is replaced: no model call to cache
    )
    service = Service(cfg)
    log = Log()
    plans: dict[str, Plan] = {}
    records: dict[int, list[Any]] = {p: [] for p in range(PARTITIONS)}
    for i, plan in enumerate(plan_list):
        rid = f"r{i}"
        plans[rid] = plan
        request = GenerationRequest(prompt="p", steps=2 if plan.kind != "invalid" else 0)
        request = dataclasses.replace(request, request_id=rid)
        value = b"\x07garbage" if plan.kind == "garbage" else service.codec.encode_request(request)
        headers: list[Any] = [("correlation_id", rid.encode())]
        if plan.null_header:
            headers.append(("nullable", None))
        partition = i % PARTITIONS
        records[partition].append(_record(partition, len(records[partition]), value, headers))

    def failing(step: str, rid: str) -> None:
        plan = plans.get(rid)
        if plan is not None and plan.fail_at == step:
            raise ERRORS[plan.error]()

    decode = service.codec.decode_request_record
    encode = service.codec.encode_result
    store = service.answering.store
    start_job = handling_module.start_job

    def decode_failing(data: bytes) -> Any:
        decoded = decode(data)
        failing("decode", decoded.request.request_id)
        return decoded

    def start_job_failing(request: GenerationRequest, *args: Any) -> Any:
        failing("validate", request.request_id)
        return start_job(request, *args)

    async def run(job: Any, stats: Any) -> GeneratedImages:
        await asyncio.sleep(0)
        failing("run", job.request.request_id)
        image = np.full((8, 8, 3), 7, np.uint8)
        return GeneratedImages(images=(image,), seed=0, timings_ms={}, model_versions={})

    def encode_failing(result: Any) -> bytes:
        failing("encode", result.request_id)
        return encode(result)

    def store_failing(request_id: str, index: int, png: bytes) -> Path:
        failing("store", request_id)
        return store(request_id, index, png)

    service.codec.decode_request_record = decode_failing  # type: ignore[method-assign]
    service.codec.encode_result = encode_failing  # type: ignore[method-assign]
    service.answering.store = store_failing  # type: ignore[method-assign]
    service.handling.run = run  # type: ignore[method-assign]
    handling_module.start_job = start_job_failing  # type: ignore[assignment]
    try:
        await run_until_committed(service, log, records, plans)
    finally:
        handling_module.start_job = start_job
    flat = [r for p in sorted(records) for r in records[p]]
    return log, flat, plans


async def run_until_committed(
    service: Any, log: Log, records: dict[int, list[Any]], plans: dict[str, Plan]
) -> None:
    """Run `service` on the in-memory broker (fake Triton, `records` per partition of TOPIC)
    until every record's offset is committed, then stop it."""
    service.triton = FakeTriton()
    service.consumer._consumer = FakeAioConsumer(log, records)
    service.producer._producer = FakeAioProducer(log, "answers", "dead", plans)
    task = asyncio.create_task(service.run())
    try:
        want = {(TOPIC, p): len(r) for p, r in records.items() if r}
        for _ in range(2_000):
            committed: dict[tuple[str, int], int] = {}
            for _, offsets in log.commits:
                committed.update(offsets)
            if all(committed.get(k) == v for k, v in want.items()):
                break
            assert not task.done(), task
            await asyncio.sleep(0.005)
        else:
            raise AssertionError(f"not every record ended: committed {committed}, want {want}")
    finally:
        service.stop()
        await asyncio.wait_for(task, 10)


def check_invariant(log: Log, records: list[Any], plans: dict[str, Plan]) -> None:
    for record in records:
        rid = header_str(record.headers, "correlation_id")
        ends = [
            seq
            for seq, topic, key, _, headers in log.acks
            if (topic == "answers" and key == (rid or "").encode())
            or (
                topic == "dead"
                and header_str(headers, DLQ_ORIGINAL_OFFSET) == str(record.offset)
                and header_str(headers, DLQ_ORIGINAL_PARTITION) == str(record.partition)
            )
        ]
        assert len(ends) == 1, (rid, plans.get(rid or ""), ends)
        (acked,) = ends
        covering = [
            seq
            for seq, offsets in log.commits
            if offsets.get((record.topic, record.partition), -1) > record.offset
        ]
        assert covering and min(covering) > acked, (rid, "committed before its answer", acked)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan_list=st.lists(plans, min_size=1, max_size=8))
def test_every_record_ends_once_before_its_commit(plan_list: list[Plan], tmp_path: Path) -> None:
    log, records, by_rid = asyncio.run(_run(plan_list, tmp_path))
    check_invariant(log, records, by_rid)
    for rid, plan in by_rid.items():
        dead = [h for _, t, _, _, h in log.acks if t == "dead" and _dlq_rid(h) == rid]
        reached = plan.fail_at != "publish" or plan.answer_unavailable == 0
        if plan.kind == "good" and reached and plan.fail_at and plan.error != "InferenceError":
            # an exception nobody expected: internal_error, with its type in the message
            assert dead, (rid, plan)
            assert header_str(dead[0], "dlq.error.reason") == "internal_error"
            assert plan.error in (header_str(dead[0], "dlq.error.message") or "")
            assert header_str(dead[0], "dlq.error.stage") == (
                "generate" if plan.fail_at == "run" else plan.fail_at
            )
        if plan.null_header and dead and not plan.dlq_refuses_original:
            assert ("nullable", None) in dead[0], "null header lost on the way to the DLQ"


@pytest.mark.parametrize("step", STEPS)
def test_an_unexpected_exception_at_each_step_ends_in_a_dead_letter(
    step: str, tmp_path: Path
) -> None:
    plan = Plan("good", True, step, "TypeError", 0, 0, False, False)
    good = Plan("good", False, None, "TypeError", 0, 0, False, False)
    log, records, by_rid = asyncio.run(_run([plan, good, good], tmp_path))
    check_invariant(log, records, by_rid)
    dead = [h for _, t, _, _, h in log.acks if t == "dead"]
    assert len(dead) == 1 and _dlq_rid(dead[0]) == "r0"
    assert header_str(dead[0], "dlq.error.reason") == "internal_error"
    assert "TypeError" in (header_str(dead[0], "dlq.error.message") or "")
    assert sum(1 for _, t, *_ in log.acks if t == "answers") == 2


def test_a_dead_letter_refused_for_its_size_goes_without_the_original(tmp_path: Path) -> None:
    plan = Plan("invalid", False, None, "TypeError", 0, 1, True, False)
    log, records, by_rid = asyncio.run(_run([plan], tmp_path))
    check_invariant(log, records, by_rid)
    ((_, _, key, value, headers),) = [a for a in log.acks if a[1] == "dead"]
    original = records[0].value
    assert value == b"" and key is None
    assert header_str(headers, "dlq.original.size") == str(len(original))
    assert header_str(headers, "dlq.original.sha256") == hashlib.sha256(original).hexdigest()
    assert "MessageSizeTooLarge" in (header_str(headers, "dlq.original.omitted.reason") or "")
    assert header_str(headers, "dlq.error.reason") == "invalid_request"


async def test_stored_image_uris_follow_output_uri_base(tmp_path: Path) -> None:
    cfg = dict(bootstrap_servers="127.0.0.1:1", triton_url="127.0.0.1:1", output_dir=tmp_path)
    plain = Service(load_settings(None, **cfg))
    path = plain.answering.store("req-1", 0, b"png")
    assert plain.answering.uri(path) == path.as_uri() and path.is_relative_to(tmp_path.resolve())
    served = Service(load_settings(None, output_uri_base="https://img.example/v1/", **cfg))
    digest = hashlib.sha256(b"req-1").hexdigest()
    assert served.answering.uri(path) == f"https://img.example/v1/{digest[:2]}/{digest}/0.png"
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="output_uri_base"):
        load_settings(None, output_uri_base="not a uri", **cfg)
