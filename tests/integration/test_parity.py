"""Images made through the real tritonserver equal diffusers' own pipeline's, within 2/255."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from PIL import Image

from orchestrator.adapters.triton import TritonClient
from orchestrator.core.pipeline import start_job
from orchestrator.core.schedulers import STOCHASTIC_ALIASES, initial_noise, resolve
from orchestrator.domain import GenerationRequest, ModelInfo
from orchestrator.executor import run_job
from orchestrator.testing import to_uint8

pytestmark = pytest.mark.integration

TOLERANCE = 2  # per pixel, out of 255


@pytest.fixture(scope="module")
def pipe(tiny_models: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        tiny_models / "diffusers", safety_checker=None, requires_safety_checker=False
    )
    p.set_progress_bar_config(disable=True)
    # every case builds its scheduler from the model's own config, never a previous case's
    p.base_scheduler_config = dict(p.scheduler.config)
    return p


async def generate(url: str, request: GenerationRequest) -> tuple[ModelInfo, list[Any]]:
    async with TritonClient(url) as client:
        info = await client.model_info()
        job = start_job(request, info)
        result = await run_job(job, client)
    return info, list(result.images)


def reference(pipe: Any, info: ModelInfo, request: GenerationRequest) -> npt.NDArray[np.uint8]:
    cls, overrides = resolve(request.scheduler)
    pipe.scheduler = cls.from_config(pipe.base_scheduler_config, **overrides)
    width = request.width or info.default_width
    height = request.height or info.default_height
    f = info.vae_scale_factor
    shape = (request.num_images, info.latent_channels, height // f, width // f)
    latents = torch.from_numpy(initial_noise(request.seed, shape))
    with torch.no_grad():
        out = pipe(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            height=height,
            width=width,
            num_images_per_prompt=request.num_images,
            latents=latents,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
        ).images
    return to_uint8(out)


CASES = [
    GenerationRequest(prompt="a photo of a cat", seed=1, steps=4, scheduler="pndm"),
    GenerationRequest(
        prompt="a red bicycle", seed=2, steps=5, scheduler="ddim", guidance_scale=5.0
    ),
    GenerationRequest(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry, low quality",
        seed=3,
        steps=4,
        scheduler="euler",
        width=96,
        height=64,
    ),
    GenerationRequest(prompt="an astronaut", seed=4, steps=6, scheduler="dpmpp_2m"),
    GenerationRequest(
        prompt="a castle", seed=5, steps=5, scheduler="dpmpp_2m_karras", guidance_scale=9.0
    ),
    GenerationRequest(prompt="mountains in fog", seed=6, steps=3, scheduler="heun", height=48),
    GenerationRequest(prompt="a bowl of fruit", seed=7, steps=4, scheduler="lms"),
    GenerationRequest(prompt="a city at night", seed=8, steps=5, scheduler="unipc", width=32),
    GenerationRequest(
        prompt="no guidance at all", seed=9, steps=4, scheduler="ddim", guidance_scale=1.0
    ),
    GenerationRequest(
        prompt="two of them", seed=10, steps=3, scheduler="euler", num_images=2, guidance_scale=3.0
    ),
    # past the text encoder's 77-token window: truncated exactly as diffusers truncates
    GenerationRequest(
        prompt=" ".join(["a very long prompt about a quiet harbour town at dawn"] * 12),
        seed=12,
        steps=3,
        scheduler="ddim",
    ),
    # ancestral: the per-step noise comes from torch.Generator seeded with the request's seed
    GenerationRequest(prompt="a watercolor fox", seed=11, steps=4, scheduler="euler_a"),
    # the other two stochastic schedulers: DDPM's variance noise and the SDE solver's noise
    # come from the same generator
    GenerationRequest(prompt="a harbour at noon", seed=13, steps=5, scheduler="ddpm"),
    GenerationRequest(
        prompt="a forest path",
        negative_prompt="blurry",
        seed=14,
        steps=6,
        scheduler="dpmpp_sde",
        guidance_scale=6.0,
        width=48,
    ),
]


@pytest.mark.parametrize("request_", CASES, ids=lambda r: f"{r.scheduler}-s{r.steps}-seed{r.seed}")
async def test_text_to_image_matches_diffusers(
    triton: Any, pipe: Any, request_: GenerationRequest
) -> None:
    info, images = await generate(triton.grpc_url, request_)
    expected = reference(pipe, info, request_)
    assert len(images) == request_.num_images
    for got, want in zip(images, expected, strict=True):
        assert got.shape == want.shape
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= TOLERANCE, f"max diff {diff.max()}, mean {diff.mean():.3f}"
        # a random-weight model still makes a non-constant image
        assert got.std() > 1.0


@pytest.mark.parametrize("scheduler", sorted(STOCHASTIC_ALIASES))
async def test_stochastic_scheduler_same_seed_same_image_different_seed_differs(
    triton: Any, scheduler: str
) -> None:
    base = GenerationRequest(prompt="a stormy sea", seed=21, steps=5, scheduler=scheduler)
    _, first = await generate(triton.grpc_url, base)
    _, again = await generate(triton.grpc_url, base)
    _, other = await generate(triton.grpc_url, dataclasses.replace(base, seed=22))
    np.testing.assert_array_equal(first[0], again[0])
    assert np.abs(first[0].astype(np.int16) - other[0].astype(np.int16)).max() > 10


def _flat_png(value: int, w: int = 64, h: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png(seed: int, w: int, h: int) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth colour gradients plus noise: something a VAE encoder can chew on
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def img2img_pipe(tiny_models: Path) -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    p = StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_models / "diffusers", safety_checker=None, requires_safety_checker=False
    )
    p.set_progress_bar_config(disable=True)
    p.base_scheduler_config = dict(p.scheduler.config)
    return p


def img2img_reference(
    pipe: Any, info: ModelInfo, request: GenerationRequest, monkeypatch: pytest.MonkeyPatch
) -> npt.NDArray[np.uint8]:
    """diffusers' StableDiffusionImg2ImgPipeline itself, given the seed contract's two inputs.

    The contract (README, "Reproducible seeds") differs from diffusers' defaults in two places,
    and both are handed to the pipeline rather than re-implemented: the initial latents are the
    VAE encoder's mean (diffusers would sample the latent distribution), passed as `image`
    (the pipeline takes latents as they are); the noise added at the start step is
    `initial_noise(seed)`, given to the pipeline's one draw of initial noise. Everything else
    (timesteps for `strength`, add_noise, the loop, guidance, decoding) is the pipeline's own.
    """
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    cls, overrides = resolve(request.scheduler)
    pipe.scheduler = cls.from_config(pipe.base_scheduler_config, **overrides)
    assert request.init_image is not None
    pil = Image.open(io.BytesIO(request.init_image)).convert("RGB")
    # the documented default: the init image's size, rounded down to the model's multiple
    m = info.size_multiple
    width = request.width or pil.width // m * m
    height = request.height or pil.height // m * m
    image = pipe.image_processor.preprocess(pil, height=height, width=width)
    with torch.no_grad():
        mean = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
    latents = mean.repeat(request.num_images, 1, 1, 1)
    noise = torch.from_numpy(initial_noise(request.seed, tuple(latents.shape)))
    draws: list[tuple[int, ...]] = []

    def contract_noise(shape: Any, **kwargs: Any) -> torch.Tensor:
        draws.append(tuple(shape))
        return noise.to(kwargs.get("dtype") or noise.dtype)

    monkeypatch.setattr(module, "randn_tensor", contract_noise)
    n = request.num_images
    with torch.no_grad():
        out = pipe(
            # one prompt (and init latent) per image: the pipeline's batch is ours, row for row
            prompt=[request.prompt] * n,
            negative_prompt=[request.negative_prompt] * n if request.negative_prompt else None,
            image=latents,
            strength=request.strength,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=1,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
        ).images
    monkeypatch.undo()
    assert draws == [tuple(latents.shape)], "the pipeline drew its initial noise once"
    return to_uint8(out)


IMG2IMG = [
    GenerationRequest(
        prompt="a painting of the same scene",
        seed=31,
        steps=6,
        strength=0.6,
        scheduler="pndm",
        init_image=_png(1, 64, 64),
    ),
    GenerationRequest(
        prompt="sunset colours",
        seed=32,
        steps=5,
        strength=0.8,
        scheduler="euler",
        init_image=_png(2, 80, 64),
        width=64,
        height=64,
    ),
    GenerationRequest(
        prompt="winter",
        seed=33,
        steps=4,
        strength=1.0,
        scheduler="dpmpp_2m",
        guidance_scale=1.0,
        init_image=_png(3, 64, 48),
    ),
    GenerationRequest(
        prompt="heun img2img",
        seed=34,
        steps=4,
        strength=0.5,
        scheduler="heun",
        init_image=_png(4, 64, 64),
    ),
    # ancestral, two images, a negative prompt: the per-step noise and the rows of the batch
    GenerationRequest(
        prompt="two variations",
        negative_prompt="dull",
        seed=35,
        steps=5,
        strength=0.7,
        scheduler="euler_a",
        num_images=2,
        guidance_scale=4.0,
        init_image=_png(5, 64, 64),
    ),
]


@pytest.mark.parametrize("request_", IMG2IMG, ids=lambda r: f"{r.scheduler}-strength{r.strength}")
async def test_img2img_matches_diffusers_img2img_pipeline(
    triton: Any, img2img_pipe: Any, request_: GenerationRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    info, images = await generate(triton.grpc_url, request_)
    expected = img2img_reference(img2img_pipe, info, request_, monkeypatch)
    assert len(images) == len(expected) == request_.num_images
    for got, want in zip(images, expected, strict=True):
        assert got.shape == want.shape
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= TOLERANCE, f"max diff {diff.max()}, mean {diff.mean():.3f}"


async def test_img2img_depends_on_the_init_image(triton: Any) -> None:
    a = GenerationRequest(prompt="x", seed=5, steps=4, strength=0.3, init_image=_flat_png(0))
    b = GenerationRequest(prompt="x", seed=5, steps=4, strength=0.3, init_image=_flat_png(255))
    _, ia = await generate(triton.grpc_url, a)
    _, ib = await generate(triton.grpc_url, b)
    diff = np.abs(ia[0].astype(np.int16) - ib[0].astype(np.int16))
    print("img2img black vs white init: max diff", diff.max(), "mean", diff.mean())
    assert diff.max() > 2 * TOLERANCE
