"""The executor's retry and circuit-breaker behaviour, with fake runners (no servers)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from orchestrator.breaker import CircuitBreaker
from orchestrator.core.pipeline import start_job
from orchestrator.domain import GenerationRequest, StageCall
from orchestrator.errors import DeadlineExceeded, InferenceError, TransientInferenceError
from orchestrator.executor import JobStats, RetryPolicy, run_job
from orchestrator.testing import FlakyRunner
from tests.unit.test_validation import INFO

FAST = RetryPolicy(attempts_per_call=3, initial_backoff_s=0.001, max_backoff_s=0.002)


class Echo:
    """Deterministic stand-in for the models: outputs depend only on the inputs."""

    def __init__(self) -> None:
        self.calls: list[StageCall] = []

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        self.calls.append(call)
        x = call.inputs
        if call.model == "encode_prompt":
            return {"text_embeds": np.ones((x["prompt"].shape[0], 77, 64), np.float32)}
        if call.model == "unet":
            return {"noise_pred": (x["sample"] * 0.1 + x["timestep"][:, :, None, None] * 1e-4)}
        # the image shows the latents (three channels, each latent pixel as an f x f block),
        # so whatever changes the latents changes the pixels
        f = INFO.vae_scale_factor
        shown = np.tanh(x["latent"][:, :3] / 32.0).repeat(f, axis=2).repeat(f, axis=3)
        return {"image": shown.astype(np.float32)}


REQ = GenerationRequest(prompt="x", steps=5, scheduler="euler", seed=3)


async def test_transient_failure_is_retried_and_the_job_resumes_at_that_step() -> None:
    clean = await run_job(start_job(REQ, INFO), Echo())
    inner = Echo()
    unet_calls = {"n": 0}

    def fail(call: StageCall) -> bool:
        if call.model != "unet":
            return False
        unet_calls["n"] += 1
        return unet_calls["n"] in (3, 4)  # the third step fails twice, then passes

    stats = JobStats()
    retried: list[str] = []
    result = await run_job(
        start_job(REQ, INFO),
        FlakyRunner(inner, fail),
        FAST,
        lambda c, e: retried.append(c.model),
        stats,
    )
    assert stats.retries == 2 and retried == ["unet", "unet"]
    # the image has content that depends on the latents, so "the same image" below means the
    # same latents: they were kept, and no step was repeated or skipped
    assert clean.images[0].shape == (64, 64, 3) and clean.images[0].std() > 20
    np.testing.assert_array_equal(result.images[0], clean.images[0])
    assert sum(c.model == "unet" for c in inner.calls) == 5


async def test_retries_are_bounded_per_call() -> None:
    runner = FlakyRunner(Echo(), lambda c: c.model == "unet")
    with pytest.raises(TransientInferenceError):
        await run_job(start_job(REQ, INFO), runner, FAST)
    assert runner.failures == FAST.attempts_per_call


async def test_non_retriable_error_fails_at_once() -> None:
    class Bad(Echo):
        async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
            self.calls.append(call)
            raise InferenceError("unet: INVALID_ARGUMENT", stage="unet")

    bad = Bad()
    with pytest.raises(InferenceError):
        await run_job(start_job(REQ, INFO), bad, FAST)
    assert len(bad.calls) == 1


async def test_open_breaker_makes_jobs_wait_without_spending_their_budget() -> None:
    up = asyncio.Event()

    async def probe() -> bool:
        return up.is_set()

    breaker = CircuitBreaker(probe, failure_threshold=1, probe_interval_s=0.01)
    down_until = time.monotonic() + 0.3
    runner = FlakyRunner(Echo(), lambda c: time.monotonic() < down_until)
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, up.set)
    stats = JobStats()
    result = await run_job(start_job(REQ, INFO), runner, FAST, stats=stats, breaker=breaker)
    assert result.images
    assert breaker.openings >= 1 and not breaker.is_open
    assert stats.counted_retries < FAST.attempts_per_call


async def test_deadline_ends_the_wait_for_triton() -> None:
    async def probe() -> bool:
        return False

    breaker = CircuitBreaker(probe, failure_threshold=1, probe_interval_s=0.01)
    runner = FlakyRunner(Echo(), lambda c: True)
    req = GenerationRequest(prompt="x", steps=5, deadline=time.time() + 0.3)
    with pytest.raises(DeadlineExceeded):
        await run_job(start_job(req, INFO), runner, FAST, breaker=breaker)
    await breaker.close()
