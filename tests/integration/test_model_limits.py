"""What the deployed models declare they serve, enforced through the real service.

The tiny repository declares 128x128 pixels (unet parameters max_width/max_height) and 64 rows
per call (max_batch_size). Requests over either are dead-lettered `invalid_request` with a
message naming the limit and where it comes from; a request at the limit is answered. A job
large enough to grow the UNet's ONNX Runtime arena past `ort_arena_keep_mb` leaves the UNet's
Python-backend process near the size it had before.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from orchestrator.domain import GenerationRequest
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def stub_pid(server_pid: int, model: str) -> int:
    """The Python-backend stub process of `model`: a child of tritonserver whose arguments
    name the model's folder."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if (
            args[0].endswith(b"triton_python_backend_stub")
            and any(f"/{model}/".encode() in a for a in args)
            and f"\nPPid:\t{server_pid}\n" in status
        ):
            found.append(int(proc.name))
    assert len(found) == 1, f"stub processes of {model} under tritonserver {server_pid}: {found}"
    return found[0]


def status_bytes(pid: int, key: str) -> int:
    """VmRSS or VmHWM (the peak resident size) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no {key}")


async def test_requests_over_the_declared_limits_are_dead_lettered_by_name(
    kafka: Any, triton: Any
) -> None:
    # the setting allows 40 images, the models 64 rows per call; the height setting (64) is
    # below the model's declared 128, so there the setting binds
    settings = make_settings(kafka, triton, max_num_images=40, max_height=64)
    good = GenerationRequest(prompt="a lighthouse in fog", seed=3, steps=3)
    refused = {
        "too-wide": (
            dataclasses.replace(good, width=256),
            "width: 256 is over the deployed model's max_width 128 "
            "(declared by the model repository)",
        ),
        "too-many-rows": (
            dataclasses.replace(good, num_images=33),
            "num_images: 33 with guidance_scale 7.5 (> 1: guidance) needs 66 rows in one unet "
            "call, over the deployed model's unet max_batch_size 64 "
            "(declared by the model repository)",
        ),
        "setting-binds": (
            dataclasses.replace(good, height=96),
            "height: 96 is over the service's max_height 64 (setting ORCHESTRATOR_MAX_HEIGHT)",
        ),
    }
    at_limit = dataclasses.replace(good, width=128, height=64, request_id="at-limit")
    async with running_service(settings), client_for(settings) as client:
        for rid, (request, _) in refused.items():
            await client.send(dataclasses.replace(request, request_id=rid))
        answered = await client.generate(at_limit, 180)
        answers = {rid: await client.wait(rid, 120) for rid in refused}

    assert answered.ok, answered.reason
    assert answered.result is not None
    image = answered.result.images[0]
    assert (image.width, image.height) == (128, 64)
    for rid, (_, message) in refused.items():
        answer = answers[rid]
        assert not answer.ok, rid
        assert answer.failure is not None
        assert answer.failure["reason"] == "invalid_request", (rid, answer.failure)
        assert answer.failure["stage"] == "validate", (rid, answer.failure)
        assert answer.failure["message"] == message, rid


async def test_a_large_job_hands_the_unets_memory_back(kafka: Any, triton: Any) -> None:
    settings = make_settings(kafka, triton, max_num_images=8, triton_timeout_s=120.0)
    unet = stub_pid(triton.pid, "unet")
    small = GenerationRequest(prompt="warm up", seed=1, steps=2, request_id="small")
    # the largest size the tiny models declare, 8 images with guidance: 16 rows per UNet call,
    # whose arena grows about 1.5 GB, past the 1024 MiB the stage may keep
    large = GenerationRequest(
        prompt="a crowded market",
        seed=2,
        steps=3,
        width=128,
        height=128,
        num_images=8,
        request_id="large",
    )
    async with running_service(settings), client_for(settings) as client:
        warm = await client.generate(small, 180)
        before = status_bytes(unet, "VmRSS")
        answer = await client.generate(large, 600)
        after = status_bytes(unet, "VmRSS")
        peak = status_bytes(unet, "VmHWM")
    print(
        f"unet stub {unet}: RSS before {before / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, "
        f"after the large job {after / MIB:.0f} MiB"
    )
    assert warm.ok, warm.reason
    assert answer.ok, answer.reason
    assert answer.result is not None and len(answer.result.images) == 8
    # the job really was large: the process grew well past where it started ...
    assert peak - before > 512 * MIB
    # ... and gave it back: within 200 MiB of its size before the job
    assert after - before < 200 * MIB
