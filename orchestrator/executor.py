"""Run jobs against a stage runner (Triton, or an in-memory fake): one call at a time per job."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Protocol

import numpy.typing as npt

from orchestrator.core.pipeline import Job, advance, finish, plan
from orchestrator.domain import GeneratedImages, StageCall


class StageRunner(Protocol):
    """The port every model executor implements."""

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]: ...


async def run_job(job: Job, runner: StageRunner) -> GeneratedImages:
    """Drive a job to its images, one model call after another (no cross-job batching)."""
    timings: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    while not job.done:
        call = plan(job)
        t0 = time.perf_counter()
        outputs = await runner.infer(call)
        timings[call.model] += (time.perf_counter() - t0) * 1000.0
        advance(job, outputs)
    timings["total"] = (time.perf_counter() - start) * 1000.0
    return finish(job, timings)
