"""A job cancelled inside StepBatcher.job(): it leaves its cohort at once, its waiting call is
dropped, and the other members neither wait for it nor flush early because of it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.batcher import BatchRecord, StepBatcher
from orchestrator.core.batching import FlushPolicy
from orchestrator.domain import StageCall


class Echo:
    def __init__(self, compute_s: float = 0.0) -> None:
        self.compute_s = compute_s
        self.rows: list[int] = []

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        self.rows.append(int(call.inputs["sample"].shape[0]))
        await asyncio.sleep(self.compute_s)
        return {"noise_pred": call.inputs["sample"] + 1}


def call(value: float) -> StageCall:
    return StageCall("unet", {"sample": np.full((1, 4), value, np.float32)}, ("noise_pred",))


async def test_a_cancelled_waiting_job_frees_its_slot_and_does_not_hold_the_others() -> None:
    records: list[BatchRecord] = []
    runner = Echo()
    # a long wait: only "every active member submitted" can flush within the test's time
    batcher = StepBatcher(runner, {"unet": 64}, FlushPolicy(max_wait_s=30.0), records.append)
    b_may_submit = asyncio.Event()
    c_may_submit = asyncio.Event()
    results: dict[str, float] = {}

    async def a() -> None:
        async with batcher.job():
            await asyncio.sleep(0)  # B and C enter first: A's call waits for theirs
            await batcher.infer(call(0.0))

    async def member(name: str, value: float, go: asyncio.Event) -> None:
        async with batcher.job():
            await go.wait()
            out = await batcher.infer(call(value))
            results[name] = float(out["noise_pred"][0, 0])

    task_a = asyncio.create_task(a())
    task_b = asyncio.create_task(member("b", 10.0, b_may_submit))
    task_c = asyncio.create_task(member("c", 20.0, c_may_submit))
    await asyncio.sleep(0.01)
    assert batcher.active == 3
    task_a.cancel()  # A waits for B and C: its call never goes
    await asyncio.gather(task_a, return_exceptions=True)
    assert task_a.cancelled()
    assert batcher.active == 2  # its slot is free at once
    # B submits: the cancelled A must not count as a member that submitted, so B waits for C
    b_may_submit.set()
    await asyncio.sleep(0.05)
    assert records == [] and runner.rows == []
    c_may_submit.set()
    await asyncio.wait_for(asyncio.gather(task_b, task_c), 5.0)
    assert results == {"b": 11.0, "c": 21.0}
    assert [(r.rows, r.members) for r in records] == [(2, 2)]
    assert batcher.active == 0


async def test_a_job_cancelled_while_its_batch_runs_leaves_the_others_their_outputs() -> None:
    records: list[BatchRecord] = []
    runner = Echo(compute_s=0.2)
    batcher = StepBatcher(runner, {"unet": 64}, FlushPolicy(max_wait_s=30.0), records.append)
    results: dict[str, float] = {}
    in_batch = asyncio.Event()

    async def member(name: str, value: float, steps: int) -> None:
        async with batcher.job():
            await asyncio.sleep(0)  # both enter before either submits
            for step in range(steps):
                out = await batcher.infer(call(value + step))
                results[name] = float(out["noise_pred"][0, 0])
                in_batch.set()

    task_a = asyncio.create_task(member("a", 0.0, 5))
    task_b = asyncio.create_task(member("b", 100.0, 3))
    await asyncio.wait_for(in_batch.wait(), 5.0)  # after the first batch; the second runs
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    task_a.cancel()
    await asyncio.gather(task_a, return_exceptions=True)
    freed_after = loop.time() - t0
    assert task_a.cancelled()
    assert freed_after < 0.1  # not the rest of the 0.2 s call
    assert batcher.active == 1
    await asyncio.wait_for(task_b, 5.0)
    assert results["b"] == 103.0  # its three steps, with nothing waiting for A
    assert [r.members for r in records] == [2, 2, 1]
