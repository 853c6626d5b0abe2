"""Request validation: every bad field becomes a ValidationError that names it."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from orchestrator.core.schedulers import resolve
from orchestrator.domain import FloatArray, GenerationRequest, ModelInfo
from orchestrator.errors import ValidationError


@dataclasses.dataclass(frozen=True)
class Limits:
    """Operator-configured bounds on what a request may ask for."""

    max_steps: int = 150
    max_width: int = 1024
    max_height: int = 1024
    max_num_images: int = 4
    max_prompt_chars: int = 4096
    max_init_image_bytes: int = 8 * 1024 * 1024
    max_init_image_pixels: int = 4096 * 4096


@dataclasses.dataclass(frozen=True)
class ValidRequest:
    """A request whose every field was checked, with the model defaults filled in."""

    request: GenerationRequest
    width: int
    height: int
    #: CHW float32 in [-1, 1] at (height, width), for img2img
    init_image: FloatArray | None


#: where a model-declared limit comes from, as the refusal says it
MODEL_SOURCE = "declared by the model repository"


def guided(request: GenerationRequest) -> bool:
    """diffusers: classifier-free guidance only when guidance_scale > 1."""
    return request.guidance_scale > 1.0


def _check_size(field: str, value: int, multiple: int, setting: int, declared: int | None) -> None:
    """Positive, a multiple of the model's size unit, and within the smaller of the service's
    setting and the deployed model's declared maximum (the refusal names the one that binds)."""
    if value <= 0:
        raise ValidationError(field, f"must be positive, got {value}")
    if value % multiple:
        raise ValidationError(
            field, f"must be a multiple of {multiple} for this model, got {value}"
        )
    if declared is not None and declared <= setting:
        if value > declared:
            raise ValidationError(
                field,
                f"{value} is over the deployed model's max_{field} {declared} ({MODEL_SOURCE})",
            )
    elif value > setting:
        raise ValidationError(
            field,
            f"{value} is over the service's max_{field} {setting} "
            f"(setting ORCHESTRATOR_MAX_{field.upper()})",
        )


def stage_rows(request: GenerationRequest, img2img: bool) -> dict[str, int]:
    """Rows each stage call of this request carries (its own, before any batching)."""
    text = 2 if guided(request) else 1
    rows = {
        "unet": request.num_images * text,
        "vae_decoder": request.num_images,
        "encode_prompt": text,
    }
    if img2img:
        rows["vae_encoder"] = 1
    return rows


def _check_rows(request: GenerationRequest, info: ModelInfo) -> None:
    """Each call of the request must fit its stage's max_batch_size (Triton refuses more)."""
    for model, rows in stage_rows(request, request.init_image is not None).items():
        limit = info.max_rows(model)
        if not limit or rows <= limit:
            continue
        guidance = f"guidance_scale {request.guidance_scale:g} (> 1: guidance)"
        if model == "encode_prompt":
            field, asked = "guidance_scale", guidance
        elif model == "vae_encoder":
            field, asked = "init_image", "an init image"
        elif model == "unet" and guided(request):
            field, asked = "num_images", f"{request.num_images} with {guidance}"
        else:
            field, asked = "num_images", str(request.num_images)
        raise ValidationError(
            field,
            f"{asked} needs {rows} rows in one {model} call, over the deployed model's "
            f"{model} max_batch_size {limit} ({MODEL_SOURCE})",
        )


def decode_init_image(data: bytes, width: int, height: int, limits: Limits) -> FloatArray:
    """Decode an image file to CHW float32 in [-1, 1], resized (Lanczos) to width x height."""
    if not data:
        raise ValidationError("init_image", "is empty")
    if len(data) > limits.max_init_image_bytes:
        raise ValidationError(
            "init_image",
            f"is {len(data)} bytes, more than the {limits.max_init_image_bytes} allowed",
        )
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > limits.max_init_image_pixels:
                raise ValidationError(
                    "init_image", f"is {img.width}x{img.height}, more pixels than allowed"
                )
            rgb = img.convert("RGB")
    except ValidationError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValidationError("init_image", f"is not a readable image file ({exc})") from exc
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.LANCZOS)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    out: FloatArray = (arr.transpose(2, 0, 1) * 2.0 - 1.0).astype(np.float32)
    return out


def init_image_size(data: bytes) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValidationError("init_image", f"is not a readable image file ({exc})") from exc


def validate(request: GenerationRequest, info: ModelInfo, limits: Limits) -> ValidRequest:
    """Check every field of a request against the model and the operator's limits.

    The effective size limit is the smaller of the service's setting and the deployed model's
    declared maximum; each stage call must fit that stage's max_batch_size."""
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise ValidationError("prompt", "must be a non-empty string")
    if len(request.prompt) > limits.max_prompt_chars:
        raise ValidationError(
            "prompt", f"is {len(request.prompt)} characters, more than {limits.max_prompt_chars}"
        )
    if len(request.negative_prompt) > limits.max_prompt_chars:
        raise ValidationError(
            "negative_prompt",
            f"is {len(request.negative_prompt)} characters, more than {limits.max_prompt_chars}",
        )
    if not 1 <= request.steps <= limits.max_steps:
        raise ValidationError(
            "steps", f"must be between 1 and {limits.max_steps}, got {request.steps}"
        )
    if not (math.isfinite(request.guidance_scale) and 0.0 <= request.guidance_scale <= 100.0):
        raise ValidationError(
            "guidance_scale", f"must be a finite number in [0, 100], got {request.guidance_scale}"
        )
    if not 1 <= request.num_images <= limits.max_num_images:
        raise ValidationError(
            "num_images", f"must be between 1 and {limits.max_num_images}, got {request.num_images}"
        )
    if not 0 <= request.seed < 2**63:
        raise ValidationError("seed", f"must be in [0, 2^63), got {request.seed}")
    resolve(request.scheduler)

    init: FloatArray | None = None
    if request.init_image is not None:
        if not (math.isfinite(request.strength) and 0.0 < request.strength <= 1.0):
            raise ValidationError("strength", f"must be in (0, 1], got {request.strength}")
        if int(request.steps * request.strength) < 1:
            raise ValidationError(
                "strength",
                f"steps x strength must leave at least one step, got {request.steps} x "
                f"{request.strength}",
            )
        if not request.init_image:
            raise ValidationError("init_image", "is empty")
        img_w, img_h = init_image_size(request.init_image)
        m = info.size_multiple
        width = request.width if request.width is not None else max(m, img_w // m * m)
        height = request.height if request.height is not None else max(m, img_h // m * m)
    else:
        width = request.width if request.width is not None else info.default_width
        height = request.height if request.height is not None else info.default_height
    _check_size("width", width, info.size_multiple, limits.max_width, info.max_width)
    _check_size("height", height, info.size_multiple, limits.max_height, info.max_height)
    _check_rows(request, info)
    if request.init_image is not None:
        init = decode_init_image(request.init_image, width, height, limits)
    return ValidRequest(request=request, width=width, height=height, init_image=init)
