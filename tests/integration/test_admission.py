"""Priority admission and deadlines end to end (issue 10): real Tansu, real tritonserver, the
real Service in-process with one active job at a time, so the order jobs hold the slot is the
order the gate admitted them (read from the gate's slot-freed callback)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from orchestrator.adapters.avro import AvroCodec
from orchestrator.adapters.triton import TritonClient
from orchestrator.client import Answer, Client
from orchestrator.config import Settings
from orchestrator.core.pipeline import start_job
from orchestrator.domain import GenerationRequest
from orchestrator.executor import run_job
from orchestrator.imagefile import decode_png
from orchestrator.service import Service
from tests.integration.service_harness import make_settings, running_service

pytestmark = pytest.mark.integration


def client_of(settings: Settings) -> Client:
    return Client.from_settings(settings, codec=AvroCodec())


def req(rid: str, priority: str = "normal", steps: int = 12, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt=f"prompt {rid}", request_id=rid, priority=priority, steps=steps, seed=1, **kw
    )


async def until(check: Any, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.01)


def freed_order(service: Service) -> list[str]:
    order: list[str] = []
    service.admission.on_slot_freed(order.append)
    return order


async def test_highs_overtake_a_burst_of_lows_and_commits_wait_for_the_lows(
    kafka: Any, triton: Any
) -> None:
    # queue order alone: preemption (tested below) would let the highs overtake the blocker too
    settings = make_settings(
        kafka, triton, max_active_jobs=1, max_in_flight=64, admission_preempt=False
    )
    topic = settings.request_topic
    async with running_service(settings, partitions=1) as service, client_of(settings) as client:
        order = freed_order(service)
        ids = ["blocker"] + [f"low-{i}" for i in range(4)] + [f"high-{i}" for i in range(3)]
        await client.send(req("blocker", steps=120))  # offset 0: holds the only slot
        await until(lambda: service.admission.active == 1, what="the blocker to start")
        for rid in ids[1:]:  # offsets 1..7: lows first, then highs
            await client.send(req(rid, priority=rid.split("-")[0]))
        await until(lambda: sum(service.admission.waiting().values()) == 7, what="7 waiting")
        assert service.admission.position("high-0") == 1
        assert service.admission.position("low-0") == 4

        # the committed offset never passes a record without an answer
        held_back: list[tuple[int, int]] = []

        async def watch_commits() -> None:
            while True:
                committed = await service.consumer.committed_offset((topic, 0)) or 0
                answered = set(service.answering.answers)
                unanswered = [i for i, rid in enumerate(ids[:committed]) if rid not in answered]
                assert not unanswered, f"committed {committed} past unanswered {unanswered}"
                highs = sum(1 for r in answered if r.startswith("high"))
                held_back.append((committed, highs))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_commits())
        try:
            answers = await asyncio.gather(*(client.wait(r, 120) for r in ids))
            assert all(a.ok for a in answers), [a.reason for a in answers]
            await until(lambda: watcher.done() or held_back[-1][0] == len(ids), what="commit")
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
        assert order == ["blocker", *ids[5:], *ids[1:5]]  # the highs, then the lows
        # every high answered while the partition's commit still waited at the first low
        assert (1, 3) in held_back, held_back
        waits = service.metrics.registry.get_sample_value(
            "orchestrator_admission_wait_seconds_count", {"priority": "low"}
        )
        assert waits == 4


async def test_aging_lets_a_low_in_under_a_steady_stream_of_highs(kafka: Any, triton: Any) -> None:
    aging_s = 0.5
    settings = make_settings(
        kafka, triton, max_active_jobs=1, max_in_flight=256, admission_aging_s=aging_s
    )
    async with running_service(settings, partitions=1) as service, client_of(settings) as client:
        order = freed_order(service)
        await client.send(req("first", priority="high", steps=40))
        await until(lambda: service.admission.active == 1, what="the first job to start")
        await client.send(req("low", priority="low"))
        low_sent = time.monotonic()
        sent_at: dict[str, float] = {}
        # highs arrive faster than one slot serves them: without aging the low would wait
        # for the end of the stream and the whole backlog of highs
        for i in range(40):
            rid = f"high-{i}"
            await client.send(req(rid, priority="high"))
            sent_at[rid] = time.monotonic() - low_sent
            await asyncio.sleep(0.12)
        answers: list[Answer] = await asyncio.gather(
            *(client.wait(r, 300) for r in ["first", "low", *sent_at])
        )
        assert all(a.ok for a in answers), [a.reason for a in answers]
        before_low = order[: order.index("low")]
        assert order.index("low") < len(order) - 1, "the low waited for every high"
        # bound: admitted before every high that reached the service 3 aging intervals after
        # it (1 s of slack for fetch batching between the client's clock and the gate's)
        late = [r for r in before_low if r in sent_at and sent_at[r] > 3 * aging_s + 1.0]
        assert not late, f"highs sent well after the low went first: {late}"
        backlog_after_low = [r for r in order[order.index("low") + 1 :] if r in sent_at]
        assert backlog_after_low, "no high was still waiting: the stream did not overload"


async def test_a_deadline_that_cannot_be_met_is_refused_at_once(kafka: Any, triton: Any) -> None:
    settings = make_settings(kafka, triton, max_active_jobs=1, max_in_flight=64)
    async with running_service(settings, partitions=1) as service, client_of(settings) as client:
        order = freed_order(service)
        warm = await client.generate(req("warm", steps=20), timeout=120)  # gives the estimate
        assert warm.ok, warm.reason
        expected = service.admission.queue.expected_run_s(20)
        assert expected > 0
        # a high blocker: the late high cannot preempt it (only a worse class yields)
        await client.send(req("blocker", priority="high", steps=150))
        await until(lambda: service.admission.active == 1, what="the blocker to start")
        slack = 1.0
        deadline = time.time() + expected + slack  # met only if started within `slack`
        sent = time.monotonic()
        late = await client.generate(
            req("late", priority="high", steps=20, deadline=deadline), timeout=120
        )
        refused_after = time.monotonic() - sent
        assert late.failure is not None and late.failure.get("reason") == "deadline_exceeded", (
            late.reason
        )
        assert late.failure.get("stage") == "admission"
        # woken by its timer about `slack` after it came, while the blocker still runs
        assert refused_after < slack + 1.5, refused_after
        assert order == ["warm"], order
        assert service.admission.active == 1
        refused = service.metrics.registry.get_sample_value(
            "orchestrator_admission_refused_total", {"priority": "high"}
        )
        assert refused == 1
        blocker = await client.wait("blocker", 120)
        assert blocker.ok
        assert order == ["warm", "blocker"]


async def solo_image(triton: Any, request: GenerationRequest) -> np.ndarray[Any, Any]:
    """The request's first image when it runs alone, straight against Triton."""
    async with TritonClient(triton.grpc_url) as client:
        job = start_job(request, await client.model_info())
        return (await run_job(job, client)).images[0]


async def test_a_high_preempts_a_long_low_at_a_step_and_the_low_image_is_unchanged(
    kafka: Any, triton: Any
) -> None:
    settings = make_settings(kafka, triton, max_active_jobs=1, max_in_flight=64)
    assert settings.admission_preempt
    low = GenerationRequest(
        prompt="a long low job", request_id="low", priority="low", steps=150, seed=7
    )
    solo = await solo_image(triton, low)
    async with running_service(settings, partitions=1) as service, client_of(settings) as client:
        order = freed_order(service)
        done_at: dict[str, float] = {}

        async def wait(rid: str) -> Answer:
            answer = await client.wait(rid, 180)
            done_at[rid] = time.monotonic()
            return answer

        await client.send(low)
        low_answer = asyncio.create_task(wait("low"))
        await until(lambda: service.admission.active == 1, what="the low to start")
        await asyncio.sleep(0.5)  # well into its denoising loop
        sent = time.monotonic()
        await client.send(req("high", priority="high", steps=12))
        high = await wait("high")
        assert high.ok, high.reason
        assert not low_answer.done(), "the low finished before the high: nothing to preempt"
        assert service.admission.preemptions == 1
        answer = await low_answer
        assert answer.ok and answer.result is not None, answer.reason
        assert order == ["high", "low"]  # the low yielded (no release) and finished after
        high_s, low_left_s = done_at["high"] - sent, done_at["low"] - done_at["high"]
        assert high_s < low_left_s, (high_s, low_left_s)  # well before: the low had most to go
        # resumed from the same step with its state untouched: the very image of its solo run
        assert np.array_equal(decode_png(answer.result.images[0].png), solo)
        assert service.admission.active == 0 and service.batcher is not None
        assert service.batcher.active == 0
