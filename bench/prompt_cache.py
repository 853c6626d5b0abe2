"""Prompt-embedding cache (issue 14): the encode stage of a burst of guided requests, with and
without the cache, against the real tritonserver (direct: StepBatcher + run_job, no Kafka).

Each round runs three bursts of `--burst` guided requests (empty negative prompt, one step),
all started at once through one StepBatcher, as the service does:

- `off`: no cache, every job sends [negative, prompt]: 2 text-encoder rows per request;
- `warm`: the cache holds the empty negative prompt, the prompts are new: 1 row per request;
- `repeat`: the same burst again, every prompt cached: no row at all.

Reported per condition: text-encoder rows (Triton's inference_count), the encode stage per job
(the job's own `encode_prompt` timing: waiting for the batch, the Triton call, the split) as
median and mean over every job of every round, the burst's encode wall time (the slowest job's
encode stage, since all start together) and the text encoder's compute time in Triton per burst
(its statistics' compute_infer), medians over rounds.

    .venv/bin/python bench/prompt_cache.py [--preset tiny] [--burst 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.adapters.triton_pool import TritonPool
from orchestrator.adapters.triton_server import TritonServer
from orchestrator.batcher import StepBatcher
from orchestrator.core.pipeline import ENCODE_PROMPT, UNET, VAE_DECODER, VAE_ENCODER, start_job
from orchestrator.core.prompt_cache import EmbeddingCache
from orchestrator.domain import GenerationRequest, ModelInfo
from orchestrator.executor import StageRunner, run_job
from orchestrator.models.build import ensure_preset
from orchestrator.prompt_cache import PromptCacheRunner, triton_identity

CONDITIONS = ("off", "warm", "repeat")


def burst_requests(n: int, tag: str) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=f"{tag} prompt {i}",
            negative_prompt="",
            seed=i,
            steps=1,
            scheduler="euler",
            guidance_scale=7.5,
            request_id=f"{tag}-{i}",
        )
        for i in range(n)
    ]


async def run_burst(
    runner: StageRunner, info: ModelInfo, requests: Sequence[GenerationRequest]
) -> list[float]:
    """Every job's encode_prompt time (ms), the burst started at once through one batcher."""
    max_rows = {m: info.max_rows(m) or 64 for m in (UNET, ENCODE_PROMPT, VAE_ENCODER, VAE_DECODER)}
    batcher = StepBatcher(runner, max_rows)

    async def one(r: GenerationRequest) -> float:
        async with batcher.job():
            return (await run_job(start_job(r, info), batcher)).timings_ms[ENCODE_PROMPT]

    return list(await asyncio.gather(*(one(r) for r in requests)))


async def encoder_stats(pool: TritonPool) -> tuple[int, float]:
    """The text encoder's rows so far and its compute time (ms) so far."""
    stats = (await pool.inference_statistics(["text_encoder"]))["text_encoder"]
    return stats["inference_count"], stats["compute_infer_ns"] / 1e6


async def main_async(args: argparse.Namespace) -> int:
    models = Path(args.models_dir)
    ensure_preset(args.preset, models)
    work = Path(tempfile.mkdtemp(prefix="bench-prompt-cache-"))
    per_job: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    walls: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    rows: dict[str, list[int]] = {c: [] for c in CONDITIONS}
    compute: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    with TritonServer(models / "repository", work_dir=work, startup_timeout=180) as server:
        async with TritonPool(server.grpc_url, timeout_s=120) as pool:
            info = await pool.model_info()
            cache = PromptCacheRunner(
                pool, EmbeddingCache(1024, 256 * 1024**2), triton_identity(pool.describe_models)
            )
            # warm-up: load every model, and put the empty negative prompt in the cache
            await run_burst(pool, info, burst_requests(args.burst, "warm-up"))
            await run_burst(cache, info, burst_requests(args.burst, "warm-up-cached"))
            for k in range(args.rounds):
                fresh = burst_requests(args.burst, f"round {k}")
                runs: list[tuple[str, Any, list[GenerationRequest]]] = [
                    ("off", pool, burst_requests(args.burst, f"round {k} off")),
                    ("warm", cache, fresh),
                    ("repeat", cache, fresh),
                ]
                for condition, runner, requests in runs:
                    rows_before, ms_before = await encoder_stats(pool)
                    times = await run_burst(runner, info, requests)
                    rows_after, ms_after = await encoder_stats(pool)
                    rows[condition].append(rows_after - rows_before)
                    compute[condition].append(ms_after - ms_before)
                    per_job[condition] += times
                    walls[condition].append(max(times))
                print(
                    f"  round {k}: "
                    + ", ".join(
                        f"{c} {rows[c][-1]} rows {walls[c][-1]:.1f} ms" for c in CONDITIONS
                    ),
                    flush=True,
                )
    print(
        f"\nprompt-embedding cache, preset {args.preset}, bursts of {args.burst} guided requests "
        f"(empty negative prompt), {args.rounds} rounds"
    )
    print(
        f"{'cache':8s} {'rows':>5s} {'encode/job p50':>15s} {'mean':>8s} {'burst p50':>10s} "
        f"{'encoder compute/burst':>22s}"
    )
    for c in CONDITIONS:
        print(
            f"{c:8s} {statistics.median(rows[c]):5.0f} {statistics.median(per_job[c]):12.1f} ms "
            f"{statistics.fmean(per_job[c]):5.1f} ms {statistics.median(walls[c]):7.1f} ms "
            f"{statistics.median(compute[c]):19.1f} ms"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=["micro", "tiny"])
    parser.add_argument("--models-dir", default="build/models/tiny")
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
