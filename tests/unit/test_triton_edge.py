"""The Triton edge's conversions (issue 14): declared dtypes read from a config, fp32 <-> fp16 at
the edge equal to numpy's rounding, and the per-job sources a merged call carries."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.adapters import triton
from orchestrator.adapters.triton_shm import cast, is_lost_region
from orchestrator.core.batching import merge
from orchestrator.domain import StageCall


def test_declared_dtypes_come_from_the_config() -> None:
    cfg = {
        "input": [
            {"name": "sample", "data_type": "TYPE_FP16"},
            {"name": "timestep", "data_type": "TYPE_FP32"},
            {"name": "prompt", "data_type": "TYPE_STRING"},
        ],
        "output": [{"name": "noise_pred", "data_type": "TYPE_FP16"}],
    }
    assert triton.declared_dtypes(cfg) == {
        "sample": np.dtype(np.float16),
        "timestep": np.dtype(np.float32),
        "noise_pred": np.dtype(np.float16),
    }


def test_edge_casts_round_like_numpy_and_come_back_fp32() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 4, 8, 8)) * 1e3).astype(np.float32)
    x[0, 0, 0, :3] = [np.inf, -np.inf, 7e4]  # overflow rounds to inf like numpy's
    with np.errstate(over="ignore"):  # numpy's reference cast warns on 7e4 -> inf
        want = x.astype(np.float16)
    wire = triton._to_wire(x, np.dtype(np.float16))
    assert wire.dtype == np.float16
    np.testing.assert_array_equal(wire, want)
    back = triton._from_wire(wire)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, want.astype(np.float32))
    # fp32 declared, non-float, and unknown inputs pass through untouched
    assert triton._to_wire(x, np.dtype(np.float32)) is x
    ids = np.arange(6, dtype=np.int64)
    assert triton._to_wire(ids, np.dtype(np.float16)) is ids
    assert triton._to_wire(x, None) is x
    f64 = np.ones(2)
    assert triton._from_wire(f64) is f64
    assert cast(x[:, :, ::2], np.dtype(np.float16)).shape == (3, 4, 4, 8)


def test_a_merged_call_names_its_members_arrays() -> None:
    jobs = [
        StageCall("unet", {"sample": np.ones((2, 1)), "encoder_hidden_states": np.ones((2, 3))}, ())
        for _ in range(3)
    ]
    call = merge(jobs, [2, 0]).call
    got = triton._sources(call)["encoder_hidden_states"]
    assert len(got) == 2
    assert got[0] is jobs[2].inputs["encoder_hidden_states"]
    assert got[1] is jobs[0].inputs["encoder_hidden_states"]
    # a call without sources (or whose sources do not add up) stands for itself
    alone = StageCall("unet", {"encoder_hidden_states": np.ones((4, 3))}, ())
    assert (
        triton._sources(alone)["encoder_hidden_states"][0] is alone.inputs["encoder_hidden_states"]
    )


@pytest.mark.parametrize(
    ("message", "lost"),
    [
        ("Unable to find shared memory region: 'orch-1-ab-2'", True),
        ("Unable to open shared memory region: '/orch-1'", False),
        ("unexpected shape for input 'sample'", False),
    ],
)
def test_lost_registrations_are_recognised(message: str, lost: bool) -> None:
    assert is_lost_region(message) is lost


def test_shared_memory_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="shared_memory"):
        triton.TritonClient("127.0.0.1:1", shared_memory="sometimes")
