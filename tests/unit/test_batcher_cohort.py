"""StepBatcher keeps a cohort together: jobs woken by one batch that spend CPU time before they
submit again still land in one batch, even when that time exceeds the flush wait. With two
cohorts, one cohort's scheduler steps run while the other's call computes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.batcher import BatchRecord, StepBatcher
from orchestrator.core.batching import CohortPolicy, FlushPolicy
from orchestrator.domain import StageCall


class SlowEcho:
    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        await asyncio.sleep(0.005)
        return {"noise_pred": call.inputs["sample"]}


def call() -> StageCall:
    return StageCall("unet", {"sample": np.zeros((1, 4), np.float32)}, ("noise_pred",))


async def test_cpu_busy_cohort_is_not_cut_by_the_wait() -> None:
    records: list[BatchRecord] = []
    batcher = StepBatcher(SlowEcho(), {"unet": 64}, FlushPolicy(max_wait_s=0.002), records.append)
    jobs, steps = 8, 3

    async def job() -> None:
        async with batcher.job():
            for _ in range(steps):
                await batcher.infer(call())
                time.sleep(0.001)  # the scheduler step: CPU work, no await

    # one outsider keeps `active` above the cohort, so only the wait can flush the cohort
    async def outsider() -> None:
        async with batcher.job():
            await asyncio.sleep(0.3)

    await asyncio.gather(outsider(), *(job() for _ in range(jobs)))
    assert [r.members for r in records] == [jobs] * steps


class OneInstanceModel:
    """A model server with one instance: calls run one at a time in another thread (as Triton
    computes in another process), so the event loop's CPU work can overlap them."""

    def __init__(self, compute_s: float) -> None:
        self.compute_s = compute_s
        self.in_flight = 0
        self.lock = threading.Lock()

    def _compute(self) -> None:
        with self.lock:
            time.sleep(self.compute_s)

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        self.in_flight += 1
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._compute)
        finally:
            self.in_flight -= 1
        return {"noise_pred": call.inputs["sample"]}


async def run_steps(cohorts: int, jobs: int = 16, steps: int = 6) -> tuple[list[int], int]:
    """Jobs stepping through the batcher; returns batch sizes and how many scheduler steps ran
    while a model call was in flight."""
    model = OneInstanceModel(0.005)
    records: list[BatchRecord] = []
    batcher = StepBatcher(
        model,
        {"unet": 64},
        FlushPolicy(max_wait_s=0.002),
        records.append,
        None,
        CohortPolicy(cohorts),
    )
    overlapped = 0

    async def job() -> None:
        nonlocal overlapped
        async with batcher.job():
            await asyncio.sleep(0)  # every job registers before the first call
            for _ in range(steps):
                await batcher.infer(call())
                overlapped += model.in_flight > 0
                time.sleep(0.001)  # the scheduler step: CPU work, no await

    await asyncio.gather(*(job() for _ in range(jobs)))
    assert batcher.active == 0
    return [r.members for r in records], overlapped


async def test_one_cohort_runs_in_lockstep() -> None:
    sizes, overlapped = await run_steps(cohorts=1)
    assert sizes == [16] * 6
    assert overlapped == 0  # every step ran while the model idled


async def test_two_cohorts_step_while_the_other_computes() -> None:
    sizes, overlapped = await run_steps(cohorts=2)
    assert sizes == [8] * 12
    # all but the last round's steps (and the first cohort's first) overlap a call
    assert overlapped >= 16 * 6 - 16, overlapped


async def test_a_cohort_does_not_wait_for_another_cohorts_jobs() -> None:
    batcher = StepBatcher(
        SlowEcho(), {"unet": 64}, FlushPolicy(max_wait_s=5.0), None, None, CohortPolicy(2)
    )
    release = asyncio.Event()

    async def idle_job() -> None:  # cohort 0: active, never submits until released
        async with batcher.job():
            await release.wait()

    async def busy_job() -> float:  # cohort 1: alone, flushes at once
        async with batcher.job():
            t0 = time.monotonic()
            await batcher.infer(call())
            return time.monotonic() - t0

    idle = asyncio.create_task(idle_job())
    await asyncio.sleep(0)
    assert batcher.cohort_sizes == (1, 0)
    waited = await busy_job()
    release.set()
    await idle
    assert waited < 1.0  # not the 5 s wait that one cohort of both jobs would impose
    assert batcher.cohort_sizes == (0, 0)


async def test_calls_from_outside_a_job_still_go() -> None:
    batcher = StepBatcher(SlowEcho(), {"unet": 64}, cohorts=CohortPolicy(2))
    out = await asyncio.wait_for(batcher.infer(call()), 1.0)
    assert out["noise_pred"].shape == (1, 4)


async def test_a_suspended_job_does_not_hold_its_cohorts_flush() -> None:
    batcher = StepBatcher(SlowEcho(), {"unet": 64}, FlushPolicy(max_wait_s=5.0))
    resume = asyncio.Event()
    suspended = asyncio.Event()
    records: list[BatchRecord] = []
    batcher.on_batch = records.append

    async def yielding_job() -> None:  # suspends at a step boundary (e.g. gave its slot up)
        async with batcher.job():
            async with batcher.suspended():
                suspended.set()
                await resume.wait()
            await batcher.infer(call())  # counted again after: flushes with the others

    async def stepping_job() -> float:
        async with batcher.job():
            await suspended.wait()
            t0 = time.monotonic()
            await batcher.infer(call())
            return time.monotonic() - t0

    other = asyncio.create_task(yielding_job())
    waited = await asyncio.wait_for(stepping_job(), 2.0)
    assert waited < 1.0  # not the 5 s wait for a member that is not going to submit
    assert batcher.active == 0  # the suspended job is still in its block, but not counted
    resume.set()
    await asyncio.wait_for(other, 2.0)
    assert batcher.active == 0 and [r.members for r in records] == [1, 1]


async def test_suspending_while_the_others_wait_flushes_them_at_once() -> None:
    batcher = StepBatcher(SlowEcho(), {"unet": 64}, FlushPolicy(max_wait_s=5.0))
    go = asyncio.Event()
    resume = asyncio.Event()

    async def yielding_job() -> None:
        async with batcher.job():
            await go.wait()
            async with batcher.suspended():
                await resume.wait()

    async def stepping_job() -> None:
        async with batcher.job():
            await batcher.infer(call())

    other = asyncio.create_task(yielding_job())
    steppers = [asyncio.create_task(stepping_job()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in steppers)  # 3 of 4 members wait for the 4th
    go.set()  # the 4th suspends: the 3 waiting go without waiting out the 5 s
    await asyncio.wait_for(asyncio.gather(*steppers), 2.0)
    resume.set()
    await other
    assert batcher.active == 0
