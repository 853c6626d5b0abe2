"""Step batching against naive per-job calls at Stable Diffusion 1.5 scale on a GPU.

The orchestrator's own core and StepBatcher drive SD-1.5-shaped components (random weights:
CLIP text encoder 768x12, UNet 320/640/1280/1280, VAE 128/256/512/512; 512x512 images, 64x64
latents) run in process by torch on CUDA in fp16 (`orchestrator.testing.TorchStageRunner`).
No Triton and no gRPC here: this isolates what batching the UNet calls of concurrent requests
buys on a GPU. "naive" = one model call per job per step, each executed alone.

    python bench/gpu_step_batching.py --tokenizer DIR/diffusers/tokenizer [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import torch


def sd15_components(small: bool) -> tuple[Any, Any, Any]:
    """Random-weight (text encoder, UNet, VAE) at SD-1.5 shapes, or tiny ones for a CPU smoke
    run; seeded, built on torch's current default device (bench/gpu_triton.py reuses them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    if small:  # a CPU smoke test of this script
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            layers_per_block=1,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
        )
    else:
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            latent_channels=4,
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    return text.eval(), unet.eval(), vae.eval()


def sd15_runner(tokenizer_dir: str, device: str, small: bool) -> Any:
    from transformers import CLIPTokenizer

    from orchestrator.testing import TorchStageRunner

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text, unet, vae = sd15_components(small)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return TorchStageRunner(tokenizer, text, vae, unet, device=device, dtype=dtype)


class Timed:
    """Counts calls and rows that reach the runner (for the mean batch size)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.unet_calls = 0
        self.unet_rows = 0

    async def infer(self, call: Any) -> Any:
        if call.model == "unet":
            self.unet_calls += 1
            self.unet_rows += int(call.inputs["sample"].shape[0])
        out = self.inner.run(call)
        if self.inner.device.type == "cuda":
            torch.cuda.synchronize()
        await asyncio.sleep(0)
        return out


async def run(runner: Any, mode: str, conc: int, n: int, steps: int, sched: str) -> dict[str, Any]:
    from orchestrator.batcher import StepBatcher
    from orchestrator.core.pipeline import start_job
    from orchestrator.domain import GenerationRequest
    from orchestrator.executor import run_job
    from orchestrator.models.presets import SD15_SCHEDULER

    info = runner.inner.model_info(SD15_SCHEDULER)
    batcher = StepBatcher(runner, {"unet": 64, "encode_prompt": 64, "vae_decoder": 16})
    sem = asyncio.Semaphore(conc)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with sem:
            job = start_job(
                GenerationRequest(
                    prompt=f"a photo number {i}", seed=i, steps=steps, scheduler=sched
                ),
                info,
            )
            t0 = time.perf_counter()
            if mode == "step":
                async with batcher.job():
                    await run_job(job, batcher)
            else:
                await run_job(job, runner)
            latencies.append(time.perf_counter() - t0)

    runner.unet_calls = runner.unet_rows = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "mode": mode,
        "concurrency": conc,
        "n": n,
        "img_s": n / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
        "unet_rows_per_call": runner.unet_rows / max(1, runner.unet_calls),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--small", action="store_true", help="tiny models on the CPU (smoke)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cpu" if args.small else "cuda"
    runner = Timed(sd15_runner(args.tokenizer, device, args.small))
    if device == "cuda":
        print(torch.cuda.get_device_name(0), flush=True)
    # warm-up (kernels, allocator)
    asyncio.run(run(runner, "step", 2, 2, 2, args.scheduler))
    rows = []
    for conc in [int(c) for c in args.concurrency.split(",")]:
        for mode in ("naive", "step"):
            n = max(2 * conc, 4)
            r = asyncio.run(run(runner, mode, conc, n, args.steps, args.scheduler))
            rows.append(r)
            print(
                f"{mode:5s} conc {conc:3d} n {n:3d}: {r['img_s']:7.2f} img/s  p50 "
                f"{r['p50_s']:6.2f} s  p95 {r['p95_s']:6.2f} s  unet rows/call "
                f"{r['unet_rows_per_call']:5.1f}",
                flush=True,
            )
    for conc in sorted({r["concurrency"] for r in rows}):
        naive = next(r for r in rows if r["concurrency"] == conc and r["mode"] == "naive")
        step = next(r for r in rows if r["concurrency"] == conc and r["mode"] == "step")
        print(
            f"conc {conc:3d}: step/naive throughput x{step['img_s'] / naive['img_s']:.2f}, "
            f"p50 x{step['p50_s'] / naive['p50_s']:.2f}"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
