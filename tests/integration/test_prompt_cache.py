"""The prompt-embedding cache through the real service, on the real broker and tritonserver:
images equal those made with the cache off, the text encoder computes one row per guided request
with an empty negative prompt once warm (Triton's own statistics), and the metrics say so."""

from __future__ import annotations

import asyncio
import shutil
import statistics
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.adapters.triton_pool import TritonPool
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.client import Answer
from orchestrator.domain import GenerationRequest
from orchestrator.imagefile import decode_png
from orchestrator.prompt_cache import triton_identity
from tests.integration.service_harness import client_for, make_settings, running_service

pytestmark = pytest.mark.integration

#: 16 guided requests (empty negative prompt) with 7 distinct prompts among them
REPEATED = [
    *("a red fox", "a blue bird", "a red fox", "a green tree"),
    *("a lone tower", "a red fox", "a grey sea", "a blue bird"),
    *("a tall ship", "a fox", "a red fox", "a green tree"),
    *("a red fox", "a blue bird", "a red fox", "a green tree"),
]


def guided(prompts: Sequence[str], tag: str) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=p,
            negative_prompt="",
            seed=i,
            steps=2,
            scheduler="euler",
            guidance_scale=7.5,
            request_id=f"{tag}-{i}",
        )
        for i, p in enumerate(prompts)
    ]


async def encoder_rows(pool: TritonPool) -> int:
    """Rows the text encoder has computed so far (Triton's inference_count)."""
    stats = await pool.inference_statistics(["text_encoder"])
    return stats["text_encoder"]["inference_count"]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("orchestrator_prompt_cache_")
    }


async def burst(client: Any, requests: Sequence[GenerationRequest]) -> list[Answer]:
    answers = await asyncio.gather(*(client.generate(r, 180) for r in requests))
    for a in answers:
        assert a.ok, a.reason
    return list(answers)


def pixels(answers: Sequence[Answer]) -> list[np.ndarray[Any, Any]]:
    out = []
    for a in answers:
        assert a.result is not None
        out.append(decode_png(a.result.images[0].png or b""))
    return out


def encode_ms(answers: Sequence[Answer]) -> str:
    ms = [a.result.timings_ms["encode_prompt"] for a in answers if a.result is not None]
    return f"mean {statistics.fmean(ms):.1f} ms, median {statistics.median(ms):.1f} ms"


async def test_cached_prompts_keep_images_and_halve_text_encoder_rows(
    kafka: Any, triton: Any
) -> None:
    new_prompts = [f"a new prompt number {i}" for i in range(16)]
    async with TritonPool(triton.grpc_url) as pool:
        # the identity Triton gives is stable, and follows the ensemble to its steps
        identity = triton_identity(pool.describe_models)
        first = await identity()
        assert first is not None and first == await identity()

        off = make_settings(kafka, triton, prompt_cache_entries=0)
        async with running_service(off) as service, client_for(off) as client:
            before = await encoder_rows(pool)
            plain = await burst(client, guided(REPEATED, "off"))
            plain_rows = await encoder_rows(pool) - before
            plain_new = await burst(client, guided(new_prompts, "off-new"))
            metrics_off = await asyncio.to_thread(scrape, service.http.port)
        assert plain_rows == 32  # 2 rows per guided request without the cache
        assert metrics_off.get("orchestrator_prompt_cache_misses_total", 0) == 0

        on = make_settings(kafka, triton)
        async with running_service(on) as service, client_for(on) as client:
            before = await encoder_rows(pool)
            cold = await burst(client, guided(REPEATED, "on"))
            cold_rows = await encoder_rows(pool) - before
            m_cold = await asyncio.to_thread(scrape, service.http.port)
            before = await encoder_rows(pool)
            warm = await burst(client, guided(new_prompts, "on-new"))
            warm_rows = await encoder_rows(pool) - before
            m_warm = await asyncio.to_thread(scrape, service.http.port)

    distinct = len(set(REPEATED)) + 1  # and the empty negative prompt
    assert cold_rows == distinct
    assert m_cold["orchestrator_prompt_cache_misses_total"] == distinct
    assert m_cold["orchestrator_prompt_cache_hits_total"] == 32 - distinct
    # once warm: one text-encoder row per guided request (its prompt), not two
    assert warm_rows == 16
    assert m_warm["orchestrator_prompt_cache_misses_total"] - distinct == 16
    assert m_warm["orchestrator_prompt_cache_hits_total"] - (32 - distinct) == 16
    assert m_warm["orchestrator_prompt_cache_entries"] == distinct + 16
    assert m_warm["orchestrator_prompt_cache_bytes"] > 0

    for off_answers, on_answers in ((plain, cold), (plain_new, warm)):
        for a, b, x, y in zip(
            off_answers, on_answers, pixels(off_answers), pixels(on_answers), strict=True
        ):
            assert a.result is not None and b.result is not None
            np.testing.assert_array_equal(x, y)
            assert a.result.images[0].png == b.result.images[0].png
    # the images are not all alike (a wrong embedding would show)
    assert len({p.tobytes() for p in pixels(plain)}) == len(plain)

    print(
        "\nencode_prompt stage per job, burst of 16 guided requests (tiny preset, Kafka path):"
        f"\n  cache off:            {encode_ms(plain_new)}  (32 text-encoder rows)"
        f"\n  cache on, cold:       {encode_ms(cold)}  ({cold_rows} rows, repeated prompts)"
        f"\n  cache on, warm '':    {encode_ms(warm)}  ({warm_rows} rows, new prompts)"
    )


async def test_a_redeployed_text_encoder_has_another_identity(
    triton: Any, tiny_models: Path, tmp_path: Path
) -> None:
    """The same repository with a new text_encoder version (what a redeployment of other weights
    looks like to Triton) is another identity; endpoints that differ give none (cache bypassed)."""
    repo = tmp_path / "repository"
    shutil.copytree(tiny_models / "repository", repo, ignore=shutil.ignore_patterns("pipeline_bls"))
    shutil.copytree(repo / "text_encoder" / "1", repo / "text_encoder" / "2")
    with TritonServer(repo, work_dir=tmp_path / "work", startup_timeout=180) as other:
        async with (
            TritonPool(triton.grpc_url) as a,
            TritonPool(other.grpc_url) as b,
            TritonPool(f"{triton.grpc_url},{other.grpc_url}") as both,
        ):
            id_a = await triton_identity(a.describe_models)()
            id_b = await triton_identity(b.describe_models)()
            assert id_a is not None and id_b is not None and id_a != id_b
            assert await triton_identity(both.describe_models)() is None
            # what differs is the version Triton serves; the configs themselves are the same
            # on both servers (so endpoints serving one repository agree)
            models = ["encode_prompt", "tokenizer", "text_encoder"]
            (desc_a,) = (await a.describe_models(models)).values()
            (desc_b,) = (await b.describe_models(models)).values()
            assert desc_a["text_encoder"]["versions"] == ["1"]
            assert desc_b["text_encoder"]["versions"] == ["2"]
            assert {m: d["config"] for m, d in desc_a.items()} == {
                m: d["config"] for m, d in desc_b.items()
            }
