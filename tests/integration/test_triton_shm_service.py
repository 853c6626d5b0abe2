"""Issue 14 through the real service (real broker, real tritonserver, tiny models): with the UNet's
conditioning resident in Triton system shared memory the images are exactly those of plain gRPC,
the conditioning is staged once per batch composition rather than at every step, and a second
endpoint that refuses registration (a remote Triton) is served by plain gRPC in the same run."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from orchestrator.adapters import triton_shm
from orchestrator.client import Answer
from orchestrator.domain import GenerationRequest
from orchestrator.imagefile import decode_png
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration

STEPS = 4


def requests(tag: str) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=f"a lighthouse number {i}",
            negative_prompt="",
            seed=i,
            steps=STEPS,
            scheduler="euler",
            guidance_scale=7.5,
            request_id=f"{tag}-{i}",
        )
        for i in range(8)
    ]


async def images(settings: Any, tag: str) -> tuple[list[np.ndarray[Any, Any]], list[Any]]:
    async with running_service(settings) as service, client_for(settings) as client:
        answers: Sequence[Answer] = await asyncio.gather(
            *(client.generate(r, 180) for r in requests(tag))
        )
        clients = [e.client for e in service.triton._endpoints.values()]
        channels = [(c.uses_shared_memory, c.shm) for c in clients]
        stats = [(on, shm.calls, shm.bytes_staged) if shm else (on, 0, 0) for on, shm in channels]
    out = []
    for a in answers:
        assert a.ok and a.result is not None, a.reason
        out.append(decode_png(a.result.images[0].png or b""))
    return out, stats


async def test_resident_conditioning_keeps_images_identical(kafka: Any, triton: Any) -> None:
    plain, plain_stats = await images(make_settings(kafka, triton, triton_shared_memory="off"), "o")
    assert plain_stats == [(False, 0, 0)]
    shared, shm_stats = await images(make_settings(kafka, triton, triton_shared_memory="on"), "s")
    [(on, calls, staged)] = shm_stats
    assert on and calls >= STEPS
    for a, b in zip(plain, shared, strict=True):
        np.testing.assert_array_equal(a, b)
    # 8 guided jobs: 16 rows of 77 x text_embed_dim fp32 per full batch; staged far less often
    # than once per UNet call (lockstep batches keep their composition between steps)
    assert 0 < staged < calls * 16 * 77 * 4 * 64 // 2


async def test_an_endpoint_refusing_registration_is_served_over_grpc(
    kafka: Any, triton: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two endpoints naming the same server; the second "remote": it cannot open our regions
    real_key = triton_shm.ShmChannel._key
    remote = "localhost:" + triton.grpc_url.rsplit(":", 1)[1]

    def key(self: triton_shm.ShmChannel, region: triton_shm.Region) -> str:
        return f"/absent-{region.name}" if self.url == remote else real_key(self, region)

    monkeypatch.setattr(triton_shm.ShmChannel, "_key", key)
    settings = make_settings(
        kafka, triton, triton_shared_memory="auto", triton_url=f"{triton.grpc_url},{remote}"
    )
    async with running_service(settings) as service, client_for(settings) as client:
        answers = await asyncio.gather(*(client.generate(r, 180) for r in requests("a")))
        by_url = {e.client.url: e.client for e in service.triton._endpoints.values()}
        states = {url: c.shm_state for url, c in by_url.items()}
    for a in answers:
        assert a.ok, a.reason
    # both endpoints served UNet calls; each decided for itself
    assert states == {triton.grpc_url: "on", remote: "off"}
