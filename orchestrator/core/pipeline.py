"""The sampling pipeline as a pure state machine: plan the next model call, advance on its output.

No I/O here. An executor (naive, or the step batcher) asks `plan(job)` for the next call, runs
it wherever it likes, and hands the outputs to `advance(job, outputs)`. The math follows
diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline step for step, so that for
the same components, seed and scheduler our images equal theirs.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from orchestrator.core.schedulers import JobScheduler, initial_noise
from orchestrator.core.validation import Limits, ValidRequest, guided, validate
from orchestrator.domain import FloatArray, GeneratedImages, GenerationRequest, ModelInfo, StageCall
from orchestrator.errors import InferenceError

ENCODE_PROMPT = "encode_prompt"
VAE_ENCODER = "vae_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"


class Phase(enum.Enum):
    ENCODE_PROMPT = "encode_prompt"
    ENCODE_IMAGE = "encode_image"
    DENOISE = "denoise"
    DECODE = "decode"
    DONE = "done"


@dataclasses.dataclass(eq=False)
class Job:
    """One request's progress. Mutable: the scheduler inside it is stateful anyway."""

    valid: ValidRequest
    info: ModelInfo
    scheduler: JobScheduler
    phase: Phase
    #: the full schedule's timesteps (img2img starts part-way)
    timesteps: torch.Tensor
    #: index into `timesteps` of the next UNet call
    step_index: int = 0
    latents: torch.Tensor | None = None
    #: [negative x n, positive x n] under guidance, else [positive x n]
    text_embeds: FloatArray | None = None
    images: tuple[npt.NDArray[np.uint8], ...] = ()
    unet_calls: int = 0
    #: the prompt had more tokens than the text encoder's window (it was truncated)
    prompt_truncated: bool = False

    @property
    def request(self) -> GenerationRequest:
        return self.valid.request

    @property
    def n(self) -> int:
        return self.valid.request.num_images

    @property
    def guided(self) -> bool:
        """diffusers: classifier-free guidance only when guidance_scale > 1."""
        return guided(self.valid.request)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        f = self.info.vae_scale_factor
        return (self.n, self.info.latent_channels, self.valid.height // f, self.valid.width // f)

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def total_unet_calls(self) -> int:
        return len(self.timesteps) - self.step_index + self.unet_calls


def start_job(request: GenerationRequest, info: ModelInfo, limits: Limits | None = None) -> Job:
    """Validate a request and build its job; raises ValidationError naming the bad field.

    Enforces `limits` (the service's settings) and what `info` says the deployed models serve
    (declared max width/height, each stage's max_batch_size), whichever is smaller."""
    valid = validate(request, info, limits or Limits())
    scheduler = JobScheduler(request.scheduler, info.scheduler_config, request.seed)
    scheduler.set_timesteps(request.steps)
    timesteps = scheduler.timesteps_tensor()
    start = 0
    if valid.init_image is not None:
        # StableDiffusionImg2ImgPipeline.get_timesteps
        init_timestep = min(int(request.steps * request.strength), request.steps)
        t_start = max(request.steps - init_timestep, 0)
        start = t_start * scheduler.order
        scheduler.set_begin_index(start)
    return Job(
        valid=valid,
        info=info,
        scheduler=scheduler,
        phase=Phase.ENCODE_PROMPT,
        timesteps=timesteps,
        step_index=start,
    )


def plan(job: Job) -> StageCall:
    """The next model call this job needs. Inputs carry the job's own batch dimension."""
    if job.phase is Phase.ENCODE_PROMPT:
        prompts = (
            [job.request.negative_prompt, job.request.prompt]
            if job.guided
            else [job.request.prompt]
        )
        arr = np.array([[p.encode("utf-8")] for p in prompts], dtype=np.object_)
        return StageCall(ENCODE_PROMPT, {"prompt": arr}, ("text_embeds", "num_tokens"))
    if job.phase is Phase.ENCODE_IMAGE:
        assert job.valid.init_image is not None
        return StageCall(VAE_ENCODER, {"image": job.valid.init_image[None]}, ("latent_mean",))
    if job.phase is Phase.DENOISE:
        assert job.latents is not None and job.text_embeds is not None
        t = job.timesteps[job.step_index]
        model_in = torch.cat([job.latents] * 2) if job.guided else job.latents
        model_in = job.scheduler.scale_model_input(model_in, t)
        rows = model_in.shape[0]
        timestep = np.full((rows, 1), float(t), dtype=np.float32)
        return StageCall(
            UNET,
            {
                "sample": model_in.numpy().astype(np.float32, copy=False),
                "timestep": timestep,
                "encoder_hidden_states": job.text_embeds,
            },
            ("noise_pred",),
        )
    if job.phase is Phase.DECODE:
        assert job.latents is not None
        latent = (job.latents / job.info.scaling_factor).numpy().astype(np.float32, copy=False)
        return StageCall(VAE_DECODER, {"latent": latent}, ("image",))
    raise RuntimeError(f"job in phase {job.phase} has no call to make")


def _expect(
    outputs: Mapping[str, npt.NDArray[Any]], name: str, rows: int, stage: str
) -> FloatArray:
    arr = outputs.get(name)
    if arr is None:
        raise InferenceError(f"{stage} returned no output {name!r}", stage=stage)
    if arr.shape[0] != rows:
        raise InferenceError(
            f"{stage} output {name!r} has {arr.shape[0]} rows, expected {rows}", stage=stage
        )
    # a private, writable copy: torch must not alias a buffer the transport owns
    out: FloatArray = np.array(arr, dtype=np.float32)
    return out


def _begin_denoise(job: Job) -> None:
    noise = torch.from_numpy(initial_noise(job.request.seed, job.latent_shape))
    job.latents = noise * job.scheduler.init_noise_sigma
    job.phase = Phase.DENOISE


def advance(job: Job, outputs: Mapping[str, npt.NDArray[Any]]) -> None:
    """Apply the outputs of the call `plan(job)` returned, moving the job on."""
    n = job.n
    if job.phase is Phase.ENCODE_PROMPT:
        embeds = _expect(outputs, "text_embeds", 2 if job.guided else 1, ENCODE_PROMPT)
        job.text_embeds = np.ascontiguousarray(np.repeat(embeds, n, axis=0))
        tokens = outputs.get("num_tokens")
        if tokens is not None:
            # the positive prompt is the last row; tokens past the window were cut, as diffusers
            # does, and the result says so
            job.prompt_truncated = (
                int(np.asarray(tokens).reshape(-1)[-1]) > job.info.text_max_length
            )
        if job.valid.init_image is not None:
            job.phase = Phase.ENCODE_IMAGE
        else:
            _begin_denoise(job)
        return
    if job.phase is Phase.ENCODE_IMAGE:
        mean = _expect(outputs, "latent_mean", 1, VAE_ENCODER)
        init = torch.from_numpy(np.repeat(mean, n, axis=0)) * job.info.scaling_factor
        if tuple(init.shape) != job.latent_shape:
            raise InferenceError(
                f"vae_encoder returned latents of shape {tuple(init.shape)}, expected "
                f"{job.latent_shape}",
                stage=VAE_ENCODER,
            )
        noise = torch.from_numpy(initial_noise(job.request.seed, job.latent_shape))
        t0 = job.timesteps[job.step_index : job.step_index + 1].repeat(n)
        job.latents = job.scheduler.add_noise(init, noise, t0)
        job.phase = Phase.DENOISE
        return
    if job.phase is Phase.DENOISE:
        assert job.latents is not None
        rows = 2 * n if job.guided else n
        pred = torch.from_numpy(_expect(outputs, "noise_pred", rows, UNET))
        if job.guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + job.request.guidance_scale * (cond - uncond)
        t = job.timesteps[job.step_index]
        job.latents = job.scheduler.step(pred, t, job.latents)
        job.step_index += 1
        job.unet_calls += 1
        if job.step_index >= len(job.timesteps):
            job.phase = Phase.DECODE
        return
    if job.phase is Phase.DECODE:
        image = _expect(outputs, "image", n, VAE_DECODER)
        # VaeImageProcessor.postprocess(output_type="pil"): denormalize, clamp, round to uint8
        x = np.clip(image / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        job.images = tuple((img * 255.0).round().astype(np.uint8) for img in x)
        job.phase = Phase.DONE
        return
    raise RuntimeError(f"job in phase {job.phase} cannot advance")


def finish(job: Job, timings_ms: Mapping[str, float] | None = None) -> GeneratedImages:
    if not job.done:
        raise RuntimeError("job is not done")
    return GeneratedImages(
        images=job.images,
        seed=job.request.seed,
        timings_ms=dict(timings_ms or {}),
        model_versions=dict(job.info.versions),
        prompt_truncated=job.prompt_truncated,
    )
