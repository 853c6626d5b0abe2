"""Stage roles: which phases of a job each per-stage service runs, and the hand-offs between them.

`--role all` runs a job straight through (today's service). `encode`, `denoise` and `decode` each
run part of it and hand the job on in a record: `handoff_after_encode` / `job_from_encoded` and
`handoff_after_denoise` / `job_from_denoised` cut a job and resume it exactly, so that chaining
the roles gives the same image bits as running the job through in one place.

What travels is data only. The scheduler never does: the denoise role builds it from the request
(as `start_job` does), and since nothing before the first denoising step draws from its generator
or moves its step index, that scheduler is the one `--role all` would be stepping.

Pure: no I/O. The wire form of the hand-offs is `orchestrator.adapters.avro` (EncodedRequest,
DenoisedLatents); these functions accept any object with the fields they read, so the decoded
records feed them directly.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch

from orchestrator.core.pipeline import Job, Phase, advance, start_job
from orchestrator.core.validation import Limits
from orchestrator.domain import FloatArray, GenerationRequest, ModelInfo
from orchestrator.errors import InferenceError


class Role(enum.StrEnum):
    """What one service process does with the jobs it holds."""

    ALL = "all"
    ENCODE = "encode"
    DENOISE = "denoise"
    DECODE = "decode"

    @property
    def phases(self) -> frozenset[Phase]:
        """The job phases this role runs (a job in any other phase is handed on)."""
        return _PHASES[self]

    def runs(self, job: Job) -> bool:
        """True while `job` is in a phase this role runs: plan and advance it here."""
        return job.phase in self.phases


_PHASES: Mapping[Role, frozenset[Phase]] = {
    Role.ALL: frozenset({Phase.ENCODE_PROMPT, Phase.ENCODE_IMAGE, Phase.DENOISE, Phase.DECODE}),
    Role.ENCODE: frozenset({Phase.ENCODE_PROMPT, Phase.ENCODE_IMAGE}),
    Role.DENOISE: frozenset({Phase.DENOISE}),
    Role.DECODE: frozenset({Phase.DECODE}),
}


# ---------------------------------------------------------------------------------------------
# hand-offs


class EncodedFields(Protocol):
    """What the denoise role resumes from (EncodedState, or the decoded EncodedRequest)."""

    @property
    def request(self) -> GenerationRequest: ...
    @property
    def text_embeds(self) -> FloatArray: ...
    @property
    def init_latents(self) -> FloatArray | None: ...
    @property
    def prompt_truncated(self) -> bool: ...


class DenoisedFields(Protocol):
    """What the decode role resumes from (DenoisedState, or the decoded DenoisedLatents)."""

    @property
    def request(self) -> GenerationRequest: ...
    @property
    def latents(self) -> FloatArray: ...
    @property
    def prompt_truncated(self) -> bool: ...
    @property
    def unet_calls(self) -> int: ...


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedState:
    """A job after the encode role, about to take its first denoising step."""

    #: the request with its size resolved and without its init image
    request: GenerationRequest
    #: the text encoder's rows, [negative, positive] when guided else [positive] (not repeated)
    text_embeds: FloatArray
    #: img2img: the latents denoising starts from, one per image; None for text-to-image
    init_latents: FloatArray | None
    prompt_truncated: bool


@dataclasses.dataclass(frozen=True, eq=False)
class DenoisedState:
    """A job after the denoise role: every sampling step taken, its latents to decode."""

    request: GenerationRequest
    #: [num_images, channels, height / f, width / f], before 1 / scaling_factor
    latents: FloatArray
    prompt_truncated: bool
    unet_calls: int


def handoff_request(job: Job) -> GenerationRequest:
    """The request as it travels between roles: size resolved, no init image (its latents, or
    nothing, stand for it)."""
    return dataclasses.replace(
        job.request, width=job.valid.width, height=job.valid.height, init_image=None
    )


def handoff_after_encode(job: Job) -> EncodedState:
    """Cut a job the encode role finished (it is at its first denoising step)."""
    if job.phase is not Phase.DENOISE or job.unet_calls or job.latents is None:
        raise RuntimeError(f"job in phase {job.phase.value} is not at its first denoising step")
    assert job.text_embeds is not None
    rows = 2 if job.guided else 1
    n = job.n
    # text_embeds holds each prompt's row repeated per image: one of each travels
    embeds = np.ascontiguousarray(job.text_embeds[::n][:rows])
    init = None
    if job.valid.init_image is not None:
        init = np.array(job.latents.numpy(), dtype=np.float32)
    return EncodedState(
        request=handoff_request(job),
        text_embeds=embeds,
        init_latents=init,
        prompt_truncated=job.prompt_truncated,
    )


def job_from_encoded(state: EncodedFields, info: ModelInfo, limits: Limits | None = None) -> Job:
    """The job the denoise role resumes, at its first denoising step.

    The request is validated again against this role's limits and models; the pipeline's own
    `advance` takes the text embeddings (so guidance's row count is checked as for a live text
    encoder). Raises ValidationError, or InferenceError for tensors of the wrong shape."""
    job = start_job(state.request, info, limits)
    if state.init_latents is not None:
        start = img2img_start_index(state.request, job.scheduler.order)
        job.scheduler.set_begin_index(start)
        job.step_index = start
    advance(job, {"text_embeds": state.text_embeds})
    job.prompt_truncated = state.prompt_truncated
    if state.init_latents is not None:
        job.latents = _latents(state.init_latents, job, "init_latents")
    return job


def img2img_start_index(request: GenerationRequest, order: int) -> int:
    """Index into the timesteps where img2img denoising starts (StableDiffusionImg2ImgPipeline
    .get_timesteps; the same arithmetic as `start_job`)."""
    init_timestep = min(int(request.steps * request.strength), request.steps)
    return max(request.steps - init_timestep, 0) * order


def handoff_after_denoise(job: Job) -> DenoisedState:
    """Cut a job the denoise role finished (every step taken, about to decode)."""
    if job.phase is not Phase.DECODE or job.latents is None:
        raise RuntimeError(f"job in phase {job.phase.value} has not finished denoising")
    return DenoisedState(
        request=handoff_request(job),
        latents=np.array(job.latents.numpy(), dtype=np.float32),
        prompt_truncated=job.prompt_truncated,
        unet_calls=job.unet_calls,
    )


def job_from_denoised(state: DenoisedFields, info: ModelInfo, limits: Limits | None = None) -> Job:
    """The job the decode role resumes, at its decoding call (validated again, as above)."""
    job = start_job(state.request, info, limits)
    job.latents = _latents(state.latents, job, "latents")
    job.step_index = len(job.timesteps)
    job.unet_calls = state.unet_calls
    job.prompt_truncated = state.prompt_truncated
    job.phase = Phase.DECODE
    return job


def _latents(array: FloatArray, job: Job, field: str) -> torch.Tensor:
    if tuple(array.shape) != job.latent_shape:
        raise InferenceError(
            f"{field} of shape {tuple(array.shape)} do not fit this role's model, which expects "
            f"{job.latent_shape}: are the roles serving different models?",
            stage=field,
        )
    return torch.from_numpy(np.array(array, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# sizes


@dataclasses.dataclass(frozen=True)
class HandoffShapes:
    """The model facts a hand-off's size depends on."""

    name: str
    latent_channels: int
    vae_scale_factor: int
    text_max_length: int
    text_embed_dim: int
    #: bytes per text-embedding value on the wire: 2 for an fp16 text encoder, else 4
    text_itemsize: int = 2


#: Stable Diffusion 1.5: CLIP ViT-L/14 (77 x 768), 4 latent channels, VAE factor 8
SD15 = HandoffShapes("sd15", 4, 8, 77, 768)
#: SDXL's shapes: both text encoders' hidden states side by side (77 x 2048); its pooled
#: embedding and time ids (a few KiB) would travel too once the pipeline carries them
SDXL = HandoffShapes("sdxl", 4, 8, 77, 2048)

#: per Tensor record: dtype string, shape array and the bytes' length prefixes
_TENSOR_OVERHEAD = 32
#: every field of the records but the tensors, prompts and metadata, with room for the timings
#: and model versions maps (a few dozen short entries)
_FIXED_OVERHEAD = 4096


def handoff_sizes(
    shapes: HandoffShapes, limits: Limits, *, metadata_bytes: int = 0
) -> dict[str, int]:
    """An upper bound on each hand-off record's size (framing included) for the largest request
    `limits` allow: max width and height, max num_images, guided, img2img, both prompts at
    max_prompt_chars of 4-byte characters, and `metadata_bytes` of metadata (the request's
    metadata is bounded by the request record's size only)."""
    f = shapes.vae_scale_factor
    n = limits.max_num_images
    latents = n * shapes.latent_channels * (limits.max_height // f) * (limits.max_width // f) * 4
    text = 2 * shapes.text_max_length * shapes.text_embed_dim * shapes.text_itemsize
    prompts = 2 * 4 * limits.max_prompt_chars
    common = _FIXED_OVERHEAD + prompts + metadata_bytes
    return {
        "EncodedRequest": common + text + latents + 2 * _TENSOR_OVERHEAD,
        "DenoisedLatents": common + latents + _TENSOR_OVERHEAD,
    }
