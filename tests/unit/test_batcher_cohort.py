"""StepBatcher keeps a cohort together: jobs woken by one batch that spend CPU time before they
submit again still land in one batch, even when that time exceeds the flush wait."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.batcher import BatchRecord, StepBatcher
from orchestrator.core.batching import FlushPolicy
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
