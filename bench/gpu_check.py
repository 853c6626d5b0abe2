"""GPU check (run on a machine with CUDA): does the sampling loop keep its parity on a GPU, in
fp32 and in fp16 (as TensorRT fp16 engines would run it), and how does a UNet call's cost grow
with its batch size on a GPU (the case for step batching at production scale)?

    python bench/gpu_check.py --models DIR/diffusers [--out results.json]

1. Parity: our pipeline (orchestrator.core, stage calls run by torch on CUDA) against diffusers'
   StableDiffusionPipeline on the CPU in fp32, same seed contract; max/mean |diff| in 1/255.
2. UNet cost vs batch: the tiny preset and an SD-1.5-sized UNet (random weights, 64x64 latents,
   77x768 text), fp16, CUDA-synchronised timings of one call at batch 1..64.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import numpy as np
import torch


def parity(models: str, device: str = "cuda") -> list[dict[str, Any]]:
    from diffusers import StableDiffusionPipeline

    from orchestrator.core.pipeline import start_job
    from orchestrator.core.schedulers import initial_noise, resolve
    from orchestrator.domain import GenerationRequest
    from orchestrator.executor import run_job
    from orchestrator.testing import TorchStageRunner, to_uint8

    pipe = StableDiffusionPipeline.from_pretrained(
        models, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    base = dict(pipe.scheduler.config)
    runners = {
        f"{device}-fp32": TorchStageRunner.from_pretrained(models, device=device),
        f"{device}-fp16": TorchStageRunner.from_pretrained(
            models, device=device, dtype=torch.float16
        ),
    }
    info = runners[f"{device}-fp32"].model_info(base)
    cases = [
        GenerationRequest(prompt="a photo of a cat", seed=1, steps=20, scheduler="pndm"),
        GenerationRequest(prompt="a red bicycle", seed=2, steps=20, scheduler="euler"),
        GenerationRequest(prompt="an astronaut", seed=3, steps=20, scheduler="dpmpp_2m_karras"),
        GenerationRequest(prompt="a watercolor fox", seed=4, steps=20, scheduler="euler_a"),
    ]
    rows = []
    for req in cases:
        cls, overrides = resolve(req.scheduler)
        pipe.scheduler = cls.from_config(base, **overrides)
        f = info.vae_scale_factor
        shape = (1, info.latent_channels, info.default_height // f, info.default_width // f)
        with torch.no_grad():
            ref = to_uint8(
                pipe(
                    prompt=req.prompt,
                    num_inference_steps=req.steps,
                    guidance_scale=req.guidance_scale,
                    latents=torch.from_numpy(initial_noise(req.seed, shape)),
                    generator=torch.Generator("cpu").manual_seed(req.seed),
                    output_type="np",
                ).images
            )[0]
        for name, runner in runners.items():
            job = start_job(req, info)
            got = asyncio.run(run_job(job, runner)).images[0]
            diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
            rows.append(
                {
                    "scheduler": req.scheduler,
                    "runner": name,
                    "max_diff": int(diff.max()),
                    "mean_diff": float(diff.mean()),
                }
            )
            print(f"parity {req.scheduler:16s} {name}: max {diff.max()} mean {diff.mean():.3f}")
    return rows


def unet_cost(name: str, unet: Any, latent: int, text: tuple[int, int]) -> list[dict[str, Any]]:
    unet = unet.to("cuda", torch.float16).eval()
    rows = []
    for batch in (1, 2, 4, 8, 16, 32, 64):
        sample = torch.randn(batch, unet.config.in_channels, latent, latent, device="cuda").half()
        t = torch.full((batch,), 500.0, device="cuda")
        ctx = torch.randn(batch, *text, device="cuda").half()
        try:
            with torch.no_grad():
                for _ in range(3):
                    unet(sample, t, encoder_hidden_states=ctx)
                torch.cuda.synchronize()
                n = 10
                t0 = time.perf_counter()
                for _ in range(n):
                    unet(sample, t, encoder_hidden_states=ctx)
                torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            break
        ms = (time.perf_counter() - t0) / n * 1000
        rows.append({"unet": name, "batch": batch, "ms_per_call": ms, "ms_per_row": ms / batch})
        print(f"unet {name:8s} batch {batch:3d}: {ms:8.2f} ms/call {ms / batch:7.3f} ms/row")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", required=True, help="the tiny preset's diffusers folder")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    results["parity"] = parity(args.models)
    from diffusers import UNet2DConditionModel

    tiny = UNet2DConditionModel.from_pretrained(args.models, subfolder="unet")
    results["unet"] = unet_cost(
        "tiny", tiny, tiny.config.sample_size, (77, tiny.config.cross_attention_dim)
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        sd15 = UNet2DConditionModel(  # Stable Diffusion 1.5's UNet shape, random weights
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
        )
    results["unet"] += unet_cost("sd15", sd15, 64, (77, 768))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
