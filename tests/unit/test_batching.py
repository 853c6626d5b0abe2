"""Batching policy (pure) and the async step batcher, with hand-made calls and a fake runner."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from orchestrator.batcher import BatchRecord, StepBatcher
from orchestrator.core.batching import CohortPolicy, FlushPolicy, busy_time, merge, pack, split
from orchestrator.domain import StageCall
from orchestrator.errors import InferenceError, TransientInferenceError


def unet_call(rows: int, hw: int = 8, t: float = 10.0, fill: float = 0.0) -> StageCall:
    return StageCall(
        "unet",
        {
            "sample": np.full((rows, 4, hw, hw), fill, dtype=np.float32),
            "timestep": np.full((rows, 1), t, dtype=np.float32),
            "encoder_hidden_states": np.zeros((rows, 77, 8), dtype=np.float32),
        },
        ("noise_pred",),
    )


def decode_call(rows: int) -> StageCall:
    return StageCall("vae_decoder", {"latent": np.zeros((rows, 4, 8, 8), np.float32)}, ("image",))


def test_pack_groups_same_model_and_shape_only() -> None:
    calls = [
        unet_call(2),
        unet_call(2, hw=16),
        decode_call(1),
        unet_call(1, t=500.5),
        decode_call(1),
    ]
    groups = pack(calls, {"unet": 64, "vae_decoder": 64})
    assert sorted(map(sorted, groups)) == [[0, 3], [1], [2, 4]]


def test_pack_respects_max_batch_rows() -> None:
    calls = [unet_call(2) for _ in range(5)]
    groups = pack(calls, {"unet": 4})
    assert groups == [[0, 1], [2, 3], [4]]
    # a single call over the bound still travels (alone)
    assert pack([unet_call(6)], {"unet": 4}) == [[0]]


def test_merge_and_split_round_trip_rows_to_their_owner() -> None:
    calls = [unet_call(2, fill=1.0), unet_call(1, fill=2.0, t=3.5), unet_call(2, fill=3.0)]
    batch = merge(calls, [0, 1, 2])
    assert batch.call.inputs["sample"].shape[0] == 5
    np.testing.assert_array_equal(batch.call.inputs["timestep"][:, 0], [10, 10, 3.5, 10, 10])
    outs = split(batch, {"noise_pred": batch.call.inputs["sample"] * 2})
    assert [o["noise_pred"][0, 0, 0, 0] for o in outs] == [2.0, 4.0, 6.0]
    assert [o["noise_pred"].shape[0] for o in outs] == [2, 1, 2]


@pytest.mark.parametrize(
    ("waiting", "active", "oldest", "flush"),
    [
        (0, 3, 1.0, False),
        (3, 3, 0.0, True),
        (4, 3, 0.0, True),
        (2, 3, 0.0, False),
        (2, 3, 0.01, True),
    ],
)
def test_flush_rules(waiting: int, active: int, oldest: float, flush: bool) -> None:
    assert FlushPolicy(max_wait_s=0.005).should_flush(waiting, active, oldest) is flush


class EchoRunner:
    """Doubles the sample; records each call's rows; can fail rows whose sample is negative."""

    def __init__(self, transient: bool = False) -> None:
        self.calls: list[int] = []
        self.transient = transient

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        await asyncio.sleep(0.001)
        self.calls.append(call.inputs["sample"].shape[0])
        if (call.inputs["sample"] < 0).any():
            cls = TransientInferenceError if self.transient else InferenceError
            raise cls("unet: INVALID_ARGUMENT: bad rows", stage="unet")
        return {"noise_pred": call.inputs["sample"] * 2}


async def _job(batcher: StepBatcher, steps: int, fill: float, t: float) -> list[float]:
    seen = []
    async with batcher.job():
        await asyncio.sleep(0)  # let every job of the test be admitted first
        for _ in range(steps):
            out = await batcher.infer(unet_call(2, fill=fill, t=t))
            seen.append(float(out["noise_pred"][0, 0, 0, 0]))
            await asyncio.sleep(0)
    return seen


async def test_jobs_at_different_steps_share_calls_and_get_their_own_rows() -> None:
    runner = EchoRunner()
    records: list[BatchRecord] = []
    batcher = StepBatcher(runner, {"unet": 64}, FlushPolicy(max_wait_s=1.0), records.append)
    results = await asyncio.gather(
        *(_job(batcher, steps, float(i), t=float(100 * i)) for i, steps in enumerate([3, 5, 4, 5]))
    )
    assert results == [[2.0 * i] * s for i, s in enumerate([3, 5, 4, 5])]
    # flushed as soon as every active job had submitted: no call waited for the 1 s timer
    assert len(runner.calls) == 5
    assert runner.calls[:3] == [8, 8, 8]
    assert runner.calls[3:] == [6, 4]
    assert sum(r.members for r in records) == 17


async def test_lone_job_is_not_taxed_by_the_timer() -> None:
    batcher = StepBatcher(EchoRunner(), {"unet": 64}, FlushPolicy(max_wait_s=10.0))
    loop = asyncio.get_running_loop()
    start = loop.time()
    await _job(batcher, 5, 1.0, 1.0)
    assert loop.time() - start < 1.0


async def test_timer_flushes_when_an_active_job_does_not_submit() -> None:
    runner = EchoRunner()
    batcher = StepBatcher(runner, {"unet": 64}, FlushPolicy(max_wait_s=0.02))
    idle_done = asyncio.Event()

    async def idle() -> None:
        async with batcher.job():
            await idle_done.wait()

    idle_task = asyncio.create_task(idle())
    await asyncio.sleep(0)
    out = await asyncio.wait_for(batcher.infer(unet_call(1, fill=1.0)), 2.0)
    assert out["noise_pred"][0, 0, 0, 0] == 2.0
    idle_done.set()
    await idle_task


async def test_batch_bounded_by_max_batch_size() -> None:
    runner = EchoRunner()
    batcher = StepBatcher(runner, {"unet": 4}, FlushPolicy(max_wait_s=1.0))
    await asyncio.gather(*(_job(batcher, 1, 1.0, 1.0) for _ in range(5)))
    assert sorted(runner.calls) == [2, 4, 4]


async def test_one_jobs_bad_input_does_not_fail_the_others() -> None:
    runner = EchoRunner()
    batcher = StepBatcher(runner, {"unet": 64}, FlushPolicy(max_wait_s=1.0))
    results = await asyncio.gather(
        _job(batcher, 2, 1.0, 1.0),
        _job(batcher, 2, -1.0, 1.0),
        _job(batcher, 2, 3.0, 1.0),
        return_exceptions=True,
    )
    assert results[0] == [2.0, 2.0]
    assert isinstance(results[1], InferenceError)
    assert results[2] == [6.0, 6.0]


async def test_transient_failure_reaches_every_member_for_retry() -> None:
    runner = EchoRunner(transient=True)
    batcher = StepBatcher(runner, {"unet": 64}, FlushPolicy(max_wait_s=1.0))
    results = await asyncio.gather(
        _job(batcher, 1, 1.0, 1.0), _job(batcher, 1, -1.0, 1.0), return_exceptions=True
    )
    assert all(isinstance(r, TransientInferenceError) for r in results)
    assert runner.calls == [4]


@pytest.mark.parametrize(
    ("cohorts", "active", "joins"),
    [
        (1, [0], 0),
        (1, [31], 0),
        (2, [0, 0], 0),
        (2, [1, 0], 1),
        (2, [3, 3], 0),
        (2, [5, 2], 1),  # jobs left cohort 1: new jobs refill it first
        (3, [2, 1, 1], 1),
    ],
)
def test_new_job_joins_the_smallest_cohort(cohorts: int, active: list[int], joins: int) -> None:
    assert CohortPolicy(cohorts).assign(active) == joins


def test_cohorts_stay_balanced_as_jobs_arrive() -> None:
    policy = CohortPolicy(2)
    sizes = [0, 0]
    for _ in range(33):
        sizes[policy.assign(sizes)] += 1
    assert sizes == [17, 16]


def test_cohort_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        CohortPolicy(0)
    with pytest.raises(ValueError, match="expected 2 cohort sizes"):
        CohortPolicy(2).assign([1])


@pytest.mark.parametrize(
    ("intervals", "busy"),
    [
        ([], 0.0),
        ([(0.0, 1.0)], 1.0),
        ([(0.0, 1.0), (2.0, 3.5)], 2.5),
        ([(0.0, 2.0), (1.0, 3.0)], 3.0),  # overlap counted once
        ([(1.0, 3.0), (0.0, 4.0), (5.0, 6.0)], 5.0),  # nested, unsorted
        ([(0.0, 1.0), (1.0, 2.0)], 2.0),
    ],
)
def test_busy_time_is_the_union_of_intervals(
    intervals: list[tuple[float, float]], busy: float
) -> None:
    assert busy_time(intervals) == pytest.approx(busy)
