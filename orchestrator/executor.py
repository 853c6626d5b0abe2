"""Run jobs against a stage runner (Triton, the step batcher, or an in-memory fake).

A transient failure of a call is retried alone, with exponential backoff and jitter: `plan(job)`
is idempotent until `advance`, so the job keeps its latents and resumes at the same step.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import numpy.typing as npt
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from orchestrator.core.pipeline import Job, advance, finish, plan
from orchestrator.domain import GeneratedImages, StageCall
from orchestrator.errors import DeadlineExceeded, Disposition, disposition


class StageRunner(Protocol):
    """The port every model executor implements."""

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]: ...


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounds on retrying transient failures: per call, and per job over its whole life."""

    attempts_per_call: int = 6
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    max_retries_per_job: int = 30


@dataclasses.dataclass
class JobStats:
    retries: int = 0
    calls: int = 0


class _StopAtDeadline(stop_base):
    """Stop retrying once the request's own deadline has passed."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


async def run_job(
    job: Job,
    runner: StageRunner,
    retry: RetryPolicy | None = None,
    on_retry: Callable[[StageCall, BaseException], None] | None = None,
    stats: JobStats | None = None,
) -> GeneratedImages:
    """Drive a job to its images, one model call after another."""
    policy = retry or RetryPolicy()
    stats = stats if stats is not None else JobStats()
    deadline = job.request.deadline
    timings: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    while not job.done:
        if deadline is not None and time.time() >= deadline:
            raise DeadlineExceeded(
                f"deadline passed at step {job.unet_calls} of the denoising loop",
                stage=job.phase.value,
            )
        call = plan(job)
        t0 = time.perf_counter()

        def before_sleep(state: RetryCallState, call: StageCall = call) -> None:
            stats.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            if on_retry is not None and exc is not None:
                on_retry(call, exc)

        def retriable(exc: BaseException) -> bool:
            return (
                disposition(exc) is Disposition.RETRY and stats.retries < policy.max_retries_per_job
            )

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(policy.attempts_per_call) | _StopAtDeadline(deadline),
            wait=wait_exponential_jitter(
                initial=policy.initial_backoff_s, max=policy.max_backoff_s
            ),
            retry=retry_if_exception(retriable),
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                stats.calls += 1
                outputs = await runner.infer(call)
        timings[call.model] += (time.perf_counter() - t0) * 1000.0
        advance(job, outputs)
    timings["total"] = (time.perf_counter() - start) * 1000.0
    return finish(job, timings)
