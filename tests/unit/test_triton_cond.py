"""The conditioning cache (issue 14, Triton remote): the Triton model's row cache, the
orchestrator's per-endpoint record of what it sent, and the batcher's merge that leaves the
conditioning unconcatenated until a transport reads it. No servers."""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from orchestrator.adapters.triton import _sources
from orchestrator.adapters.triton_cond import CondState, RowIds, is_miss, sources_of
from orchestrator.core.batching import Concatenated, merge
from orchestrator.domain import StageCall

TEMPLATE = Path(__file__).resolve().parents[2] / "triton_models" / "unet_cached" / "model.py"


def load_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tpl_unet_cached", TEMPLATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(value: float) -> tuple[np.ndarray[Any, Any], ...]:
    return (np.full((3, 4), value, np.float32),)


def test_row_cache_assembles_misses_evicts_and_expires() -> None:
    m = load_model()
    now = [0.0]
    cache = m.RowCache(max_bytes=2 * 48, ttl_s=10.0, clock=lambda: now[0])
    given = {1: row(1.0), 2: row(2.0)}
    [batch] = cache.assemble([2, 1], given, 1)
    assert batch[:, 0, 0].tolist() == [2.0, 1.0]
    for i, r in given.items():
        cache.put(i, r)
    with pytest.raises(m.Miss) as miss:
        cache.assemble([1, 3], {}, 1)
    assert miss.value.ids == [3] and is_miss(str(miss.value))
    cache.assemble([1], {}, 1)  # 1 is now the most recent: 2 goes first
    cache.put(3, row(3.0))
    assert list(cache.rows) == [1, 3] and cache.bytes == 96 and cache.evicted == 1
    # rows the call brings serve it even when the cache cannot keep them all
    [batch] = cache.assemble([4, 5, 6], {4: row(4), 5: row(5), 6: row(6)}, 1)
    assert batch[:, 0, 0].tolist() == [4.0, 5.0, 6.0]
    cache.drop([1, 99])
    assert list(cache.rows) == [3]
    now[0] = 11.0
    cache.expire()
    assert not cache.rows and cache.bytes == 0


def job(rows: int = 2, value: float = 0.0) -> np.ndarray[Any, Any]:
    return np.full((rows, 77, 8), value, np.float32)


def unet(cond: np.ndarray[Any, Any]) -> StageCall:
    rows = cond.shape[0]
    return StageCall(
        "unet",
        {
            "sample": np.zeros((rows, 4, 8, 8), np.float32),
            "timestep": np.ones((rows, 1), np.float32),
            "encoder_hidden_states": cond,
        },
        ("noise_pred",),
    )


def test_merge_leaves_the_conditioning_unconcatenated_until_read() -> None:
    a, b = job(2, 1.0), job(2, 2.0)
    batch = merge([unet(a), unet(b)], [0, 1])
    inputs = batch.call.inputs
    assert isinstance(inputs, Concatenated)
    assert inputs.rows("encoder_hidden_states") == 4
    assert not inputs.made("encoder_hidden_states")
    assert batch.call.sources["encoder_hidden_states"][1] is b
    assert "encoder_hidden_states" in inputs and "noise" not in inputs
    assert not inputs.made("encoder_hidden_states")
    parts = _sources(batch.call)  # the shared-memory path's view of the call
    assert [p is q for p, q in zip(parts["encoder_hidden_states"], (a, b), strict=True)] == [
        True,
        True,
    ]
    assert not inputs.made("encoder_hidden_states")
    assert inputs["encoder_hidden_states"][2:, 0, 0].tolist() == [2.0, 2.0]
    assert inputs.made("encoder_hidden_states")
    assert inputs["encoder_hidden_states"] is inputs["encoder_hidden_states"]  # once


def test_each_job_is_sent_once_per_endpoint_and_released_when_it_ends() -> None:
    ids = RowIds()
    one, two = CondState(ids), CondState(ids)
    a, b = job(2, 1.0), job(2, 2.0)
    batch = merge([unet(a), unet(b)], [0, 1]).call
    sources = sources_of(batch.inputs, batch.sources)
    assert sources is not None
    first = one.plan(batch.inputs, sources, resend=False)
    assert first.inputs["new_encoder_hidden_states"].shape == (4, 77, 8)
    assert len(set(first.inputs["cond_ids"].tolist())) == 4
    assert "encoder_hidden_states" not in first.inputs
    one.done(first)
    # the transport read the members' own arrays: the merged conditioning was never built
    assert isinstance(batch.inputs, Concatenated)
    assert not batch.inputs.made("encoder_hidden_states")
    steady = one.plan(batch.inputs, sources, resend=False)
    assert set(steady.inputs) == {"sample", "timestep", "cond_ids"}
    assert steady.inputs["cond_ids"].tolist() == first.inputs["cond_ids"].tolist()
    # another endpoint was sent nothing yet; a resend carries every row
    assert two.plan(batch.inputs, sources, resend=False).new == first.new
    assert one.plan(batch.inputs, sources, resend=True).inputs["new_ids"].shape == (4,)
    # a job that ends (its arrays collected) is released with the endpoint's next call
    c = job(2, 3.0)
    gone = first.new[1]
    del batch, sources, b, first, steady
    gc.collect()
    assert one.releases == [gone]
    later = one.plan(unet(c).inputs, {"encoder_hidden_states": (c,)}, resend=False)
    assert later.inputs["release_ids"].tolist() == [gone.base, gone.base + 1]
    one.done(later)
    assert one.releases == []
    one.forget("test")
    assert not one.sent
    assert a is not None
