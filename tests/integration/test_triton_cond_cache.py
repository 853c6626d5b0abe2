"""Issue 14 over plain gRPC (Triton remote, no shared memory), through the real service (real
broker, real tritonserver, tiny models): each job's conditioning goes to `unet_cached` once per
endpoint, and the images are bit for bit those of the plain path (conditioning in every call);
a tritonserver restart mid-job (its cache is lost), a cache too small to keep a batch's rows
(every call misses) and a job's calls spread over two endpoints all end in the same images, with
no dead letter. Steady-state calls carry the latents, the timesteps and the row ids only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator.adapters.triton_cond import CondCounters
from orchestrator.adapters.triton_server import TritonServer, free_port
from orchestrator.client import Answer
from orchestrator.domain import GenerationRequest
from orchestrator.imagefile import decode_png
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration

STEPS = 6
JOBS = 8
Image = np.ndarray[Any, Any]


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
        for i in range(JOBS)
    ]


def pngs(answers: Sequence[Answer]) -> list[Image]:
    out = []
    for a in answers:
        assert a.ok and a.result is not None, a.reason
        out.append(decode_png(a.result.images[0].png or b""))
    return out


def counters(service: Any) -> dict[str, CondCounters]:
    return {e.client.url: e.client.cond.counters for e in service.triton._endpoints.values()}


def once_per_job(text_dim: int) -> int:
    """Conditioning bytes of every job sent once: 2 rows (guided) x 77 tokens x dim x fp32."""
    return JOBS * 2 * 77 * text_dim * 4


async def run(settings: Any, tag: str) -> tuple[list[Image], dict[str, CondCounters]]:
    async with running_service(settings) as service, client_for(settings) as client:
        answers = await asyncio.gather(*(client.generate(r, 240) for r in requests(tag)))
        return pngs(answers), counters(service)


@pytest.fixture(scope="module")
def plain(kafka: Any, triton: Any) -> list[Image]:
    """The reference: conditioning in every step's call."""
    settings = make_settings(
        kafka, triton, triton_shared_memory="off", triton_conditioning_cache="off"
    )
    images, stats = asyncio.run(run(settings, "plain"))
    assert all(c.calls == 0 for c in stats.values())
    return images


def text_dim(triton: Any) -> int:
    config = Path(triton.repository) / "unet" / "config.pbtxt"
    text = config.read_text()
    return int(text.split('key: "text_embed_dim" value: { string_value: "')[1].split('"')[0])


async def test_images_identical_and_steady_steps_carry_no_conditioning(
    kafka: Any, triton: Any, plain: list[Image]
) -> None:
    settings = make_settings(
        kafka, triton, triton_shared_memory="off", triton_conditioning_cache="on"
    )
    images, stats = await run(settings, "cached")
    for a, b in zip(plain, images, strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit
    [c] = stats.values()
    assert c.misses == 0
    assert c.calls >= STEPS
    # every job's conditioning crossed the wire exactly once
    assert c.conditioning_bytes == once_per_job(text_dim(triton))
    steady = [r for r in c.recent if not any(n.startswith("new_") for n in r)]
    assert len(steady) >= STEPS - 1, c.recent
    for r in steady:
        # what a step carries: latents (rows x 4 x h x w fp32), timesteps (fp32), ids (int64)
        rows = r["cond_ids"] // 8
        assert set(r) <= {"sample", "timestep", "cond_ids", "release_ids"}, r
        assert r["timestep"] == rows * 4
        assert r["sample"] == rows * 4 * 16 * 16 * 4  # tiny preset: 64 px, 16 x 16 latents
        print(f"[cond-cache] steady step, {rows} rows: {r}")


@pytest.fixture(scope="module")
def own_triton(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A tritonserver only the restart test stops and starts (fixed ports across restarts)."""
    with TritonServer(
        tiny_models / "repository",
        work_dir=tmp_path_factory.mktemp("cond-own"),
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        startup_timeout=180,
    ) as server:
        yield server


async def test_a_restart_mid_job_resends_and_keeps_images(
    kafka: Any, own_triton: TritonServer, triton: Any, plain: list[Image]
) -> None:
    settings = make_settings(
        kafka,
        own_triton,
        triton_shared_memory="off",
        triton_conditioning_cache="on",
        max_in_flight=JOBS,
    )
    async with running_service(settings) as service, client_for(settings) as client:
        [c] = counters(service).values()
        waiting = [asyncio.create_task(client.generate(r, 240)) for r in requests("restart")]
        for _ in range(600):
            if c.calls >= 2:
                break
            await asyncio.sleep(0.05)
        assert c.calls >= 2 and not any(t.done() for t in waiting), "jobs ended too soon"
        sent_before = c.conditioning_bytes
        own_triton.stop()  # the cache in it is lost with it
        own_triton.start()
        await asyncio.to_thread(own_triton.wait_ready, 180)
        answers = await asyncio.gather(*waiting)
        dead = service.stats.dead_lettered
    for a, b in zip(plain, pngs(answers), strict=True):
        np.testing.assert_array_equal(a, b)
    assert dead == 0
    # the jobs' conditioning went again after the restart (a miss, or forgotten on the outage)
    assert c.conditioning_bytes > sent_before
    print(f"[cond-cache] restart: {c.calls} calls, {c.misses} misses, {c.conditioning_bytes} B")


@pytest.fixture(scope="module")
def tiny_cache_triton(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A tritonserver whose conditioning cache holds about one job's rows: calls miss."""
    with TritonServer(
        tiny_models / "repository",
        work_dir=tmp_path_factory.mktemp("cond-small"),
        env={"ORCH_COND_CACHE_MAX_BYTES": str(2 * 77 * 64 * 4)},
        startup_timeout=180,
    ) as server:
        yield server


async def test_evicted_rows_are_resent_on_a_miss(
    kafka: Any, tiny_cache_triton: TritonServer, plain: list[Image]
) -> None:
    settings = make_settings(
        kafka, tiny_cache_triton, triton_shared_memory="off", triton_conditioning_cache="on"
    )
    images, stats = await run(settings, "evicted")
    for a, b in zip(plain, images, strict=True):
        np.testing.assert_array_equal(a, b)
    [c] = stats.values()
    assert c.misses >= 1
    assert c.conditioning_bytes > once_per_job(text_dim(tiny_cache_triton))


async def test_calls_spread_over_two_endpoints_each_sent_its_jobs_rows(
    kafka: Any, triton: Any, plain: list[Image]
) -> None:
    # two endpoints (the same server by two names): each keeps its own record of what it holds
    other = "localhost:" + triton.grpc_url.rsplit(":", 1)[1]
    settings = make_settings(
        kafka,
        triton,
        triton_shared_memory="off",
        triton_conditioning_cache="on",
        triton_url=f"{triton.grpc_url},{other}",
    )
    images, stats = await run(settings, "two")
    for a, b in zip(plain, images, strict=True):
        np.testing.assert_array_equal(a, b)
    assert set(stats) == {triton.grpc_url, other}
    assert all(c.calls > 0 for c in stats.values()), stats
    once = once_per_job(text_dim(triton))
    # a job met on both endpoints was sent to each once; never more without a miss
    total = sum(c.conditioning_bytes for c in stats.values())
    assert all(c.misses == 0 for c in stats.values())
    assert once <= total <= 2 * once
