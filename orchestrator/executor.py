"""Run jobs against a stage runner (Triton, the step batcher, or an in-memory fake).

A transient failure of a call is retried alone, with exponential backoff and jitter (tenacity):
`plan(job)` is idempotent until `advance`, so the job keeps its latents and resumes at the same
step. While the circuit breaker says Triton is down, a job waits (within its deadline) without
spending its retry budget.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy.typing as npt
from opentelemetry import trace
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from orchestrator.breaker import CircuitBreaker
from orchestrator.core.pipeline import UNET, Job, Phase, advance, finish, plan
from orchestrator.domain import GeneratedImages, StageCall
from orchestrator.errors import DeadlineExceeded, Disposition, disposition

_NOOP_TRACER = trace.NoOpTracer()


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
    #: retries that happened while the breaker was closed (these count against the budget)
    counted_retries: int = 0


class _Stop(stop_base):
    """Stop after N attempts made while Triton was up, or at the request's deadline."""

    def __init__(
        self, attempts: int, deadline: float | None, breaker: CircuitBreaker | None
    ) -> None:
        self.attempts = stop_after_attempt(attempts)
        self.deadline = deadline
        self.breaker = breaker

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self.deadline is not None and time.time() >= self.deadline:
            return True
        if self.breaker is not None and self.breaker.is_open:
            return False
        return bool(self.attempts(retry_state))


_STAGE_SPANS = {
    Phase.ENCODE_PROMPT: "encode prompt",
    Phase.ENCODE_IMAGE: "encode image",
    Phase.DENOISE: "denoise",
    Phase.DECODE: "decode",
}


async def run_job(
    job: Job,
    runner: StageRunner,
    retry: RetryPolicy | None = None,
    on_retry: Callable[[StageCall, BaseException], None] | None = None,
    stats: JobStats | None = None,
    *,
    breaker: CircuitBreaker | None = None,
    tracer: trace.Tracer | None = None,
    on_step: Callable[[Job, int, int], None] | None = None,
    checkpoint: Callable[[Job], Awaitable[None]] | None = None,
) -> GeneratedImages:
    """Drive a job to its images, one model call after another (`run_phases` through every
    phase, then `finish`); the keywords are `run_phases`'."""
    timings = await run_phases(
        job,
        runner,
        retry,
        on_retry,
        stats,
        breaker=breaker,
        tracer=tracer,
        on_step=on_step,
        checkpoint=checkpoint,
    )
    return finish(job, timings)


async def run_phases(
    job: Job,
    runner: StageRunner,
    retry: RetryPolicy | None = None,
    on_retry: Callable[[StageCall, BaseException], None] | None = None,
    stats: JobStats | None = None,
    *,
    breaker: CircuitBreaker | None = None,
    tracer: trace.Tracer | None = None,
    on_step: Callable[[Job, int, int], None] | None = None,
    checkpoint: Callable[[Job], Awaitable[None]] | None = None,
    phases: frozenset[Phase] | None = None,
) -> dict[str, float]:
    """Drive a job through `phases` (a stage role's, `Role.phases`; None: every phase up to
    done), one model call after another; the job stops at the first phase outside them, where
    the next role resumes it. Returns the milliseconds spent per model, and "total".

    `on_step(job, k, n)`, when given, is called after each denoising step's advance: step `k`
    of the `n` UNet calls the job makes (img2img: those after its start step). It must be
    quick and must not raise (progress is advisory): an exception from it is not caught.

    `checkpoint(job)`, when given, is awaited before each denoising step (a step boundary: the
    job's state is complete and untouched while it waits); it may suspend the job there, e.g.
    to yield its admission slot to a higher priority (preemption), and resume it later."""
    policy = retry or RetryPolicy()
    stats = stats if stats is not None else JobStats()
    tracer = tracer or _NOOP_TRACER
    deadline = job.request.deadline
    timings: dict[str, float] = defaultdict(float)
    start = time.perf_counter()
    stage_span: trace.Span | None = None
    stage_phase: Phase | None = None

    def retriable(exc: BaseException) -> bool:
        if disposition(exc) is not Disposition.RETRY:
            return False
        if breaker is not None and breaker.is_open:
            return True
        return stats.counted_retries < policy.max_retries_per_job

    async def backoff(seconds: float) -> None:
        if breaker is not None and breaker.is_open:
            await breaker.wait_closed(deadline)
            return
        await asyncio.sleep(seconds)

    try:
        while not job.done and (phases is None or job.phase in phases):
            if checkpoint is not None and job.phase is Phase.DENOISE:
                await checkpoint(job)
            if deadline is not None and time.time() >= deadline:
                raise DeadlineExceeded(
                    f"deadline passed after {job.unet_calls} denoising steps",
                    stage=job.phase.value,
                )
            if job.phase is not stage_phase:
                if stage_span is not None:
                    stage_span.end()
                stage_phase = job.phase
                stage_span = tracer.start_span(_STAGE_SPANS[job.phase])
            call = plan(job)
            t0 = time.perf_counter()
            step_name = f"unet step {job.unet_calls}" if job.phase is Phase.DENOISE else call.model
            parent = trace.set_span_in_context(stage_span) if stage_span is not None else None

            def count_retry(exc: BaseException, call: StageCall = call) -> None:
                stats.retries += 1
                if breaker is None or not breaker.is_open:
                    stats.counted_retries += 1
                if on_retry is not None:
                    on_retry(call, exc)

            def before_sleep(state: RetryCallState) -> None:
                exc = state.outcome.exception() if state.outcome else None
                if exc is not None:
                    count_retry(exc)

            with tracer.start_as_current_span(step_name, context=parent) as step_span:
                if job.phase is Phase.DENOISE:
                    step_span.set_attribute(
                        "diffusion.timestep", float(job.timesteps[job.step_index])
                    )

                async def attempt_call(call: StageCall = call) -> dict[str, npt.NDArray[Any]]:
                    if breaker is not None and breaker.is_open:
                        await breaker.wait_closed(deadline)
                    stats.calls += 1
                    try:
                        result = await runner.infer(call)
                    except Exception as exc:
                        if breaker is not None and disposition(exc) is Disposition.RETRY:
                            breaker.failure()
                        raise
                    if breaker is not None:
                        breaker.success()
                    return result

                try:
                    # the common case pays for no retry machinery
                    outputs = await attempt_call()
                except Exception as first:
                    if not retriable(first) or policy.attempts_per_call <= 1:
                        raise
                    count_retry(first)
                    await backoff(policy.initial_backoff_s)
                    async for attempt in AsyncRetrying(
                        stop=_Stop(policy.attempts_per_call - 1, deadline, breaker),
                        wait=wait_exponential_jitter(
                            multiplier=policy.initial_backoff_s * 2,
                            max=policy.max_backoff_s,
                            jitter=policy.initial_backoff_s,
                        ),
                        sleep=backoff,
                        retry=retry_if_exception(retriable),
                        before_sleep=before_sleep,
                        reraise=True,
                    ):
                        with attempt:
                            outputs = await attempt_call()
            timings[call.model] += (time.perf_counter() - t0) * 1000.0
            advance(job, outputs)
            if on_step is not None and call.model == UNET:
                on_step(job, job.unet_calls, job.total_unet_calls)
    except BaseException as exc:
        if stage_span is not None:
            stage_span.record_exception(exc)
            stage_span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        raise
    finally:
        if stage_span is not None:
            stage_span.end()
    timings["total"] = (time.perf_counter() - start) * 1000.0
    return dict(timings)
