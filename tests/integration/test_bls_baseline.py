"""The pure-Triton baseline: `pipeline_bls` runs the whole pipeline inside Triton (BLS calls to
the stage models) and returns the same image as the orchestrator for the same request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.adapters.triton import TritonClient
from orchestrator.bench import bls_call
from orchestrator.core.pipeline import start_job
from orchestrator.domain import GenerationRequest
from orchestrator.errors import Disposition, InferenceError, disposition
from orchestrator.executor import run_job
from orchestrator.models.repository import BLS_MODEL

pytestmark = pytest.mark.integration

TOLERANCE = 2  # per pixel, out of 255

CASES = [
    GenerationRequest(prompt="a red fox in the snow", seed=11, steps=4, scheduler="ddim"),
    GenerationRequest(
        prompt="a lighthouse",
        negative_prompt="blurry",
        seed=5,
        steps=3,
        scheduler="euler_a",
        guidance_scale=5.0,
        width=48,
        height=64,
    ),
    GenerationRequest(prompt="no guidance", seed=2, steps=2, scheduler="euler", guidance_scale=1.0),
]


def test_repository_has_the_bls_model(tiny_models: Path) -> None:
    model = tiny_models / "repository" / BLS_MODEL
    assert (model / "1" / "model.py").is_file()
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "dynamic_batching" not in config


@pytest.mark.parametrize("request_", CASES, ids=["ddim", "euler_a-48x64", "no-guidance"])
async def test_bls_image_equals_orchestrator_image(
    triton: Any, request_: GenerationRequest
) -> None:
    async with TritonClient(triton.grpc_url, timeout_s=120) as client:
        info = await client.model_info()
        ours = (await run_job(start_job(request_, info), client)).images[0]
        out = await client.infer(bls_call(request_))
    image = out["image"]
    assert image.dtype == np.uint8
    assert image.shape == (1, *ours.shape)
    diff = np.abs(image[0].astype(np.int16) - ours.astype(np.int16))
    assert int(diff.max()) <= TOLERANCE


async def test_bls_reports_a_bad_request_as_an_error(triton: Any) -> None:
    bad = GenerationRequest(prompt="x", steps=2, scheduler="no_such_scheduler")
    async with TritonClient(triton.grpc_url, timeout_s=120) as client:
        with pytest.raises(InferenceError, match="no_such_scheduler") as info:
            await client.infer(bls_call(bad))
    # a bad request is never worth retrying: exactly InferenceError, not its retriable subclass
    assert type(info.value) is InferenceError
    assert info.value.retriable is False
    assert disposition(info.value) is Disposition.DEAD_LETTER
