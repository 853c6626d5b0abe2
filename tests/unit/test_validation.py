"""Bad input to the core raises a typed ValidationError naming the field, never a numpy crash."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from orchestrator.core.envelope import EnvelopeLimits, check_envelope
from orchestrator.core.pipeline import start_job
from orchestrator.core.validation import Limits
from orchestrator.domain import GenerationRequest, ModelInfo
from orchestrator.errors import Disposition, ValidationError, disposition
from orchestrator.models.presets import SD15_SCHEDULER

INFO = ModelInfo(
    latent_channels=4,
    vae_scale_factor=4,
    scaling_factor=0.18215,
    size_multiple=8,
    default_height=64,
    default_width=64,
    text_max_length=77,
    text_embed_dim=64,
    scheduler_config=json.loads(json.dumps(SD15_SCHEDULER)),
)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


GOOD = GenerationRequest(prompt="a cat", steps=4)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"scheduler": "no_such_scheduler"}, "scheduler"),
        ({"steps": 0}, "steps"),
        ({"steps": 151}, "steps"),
        ({"width": 60}, "width"),
        ({"height": 12}, "height"),
        ({"width": 2048}, "width"),
        ({"height": -8}, "height"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 99}, "num_images"),
        ({"seed": -1}, "seed"),
        ({"init_image": png(64, 64), "strength": 0.0}, "strength"),
        ({"init_image": png(64, 64), "strength": 1.5}, "strength"),
        ({"init_image": png(64, 64), "strength": 0.1, "steps": 4}, "strength"),
        ({"init_image": b""}, "init_image"),
        ({"init_image": b"not an image at all"}, "init_image"),
        ({"init_image": png(64, 64)[:40]}, "init_image"),
    ],
)
def test_bad_fields_raise_validation_error_naming_the_field(
    changes: dict[str, object], field: str
) -> None:
    request = dataclasses.replace(GOOD, **changes)  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as info:
        start_job(request, INFO, Limits())
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")
    assert disposition(info.value) is Disposition.DEAD_LETTER


def test_limits_are_configurable() -> None:
    with pytest.raises(ValidationError) as info:
        start_job(dataclasses.replace(GOOD, width=64), INFO, Limits(max_width=32))
    assert str(info.value) == (
        "width: 64 is over the service's max_width 32 (setting ORCHESTRATOR_MAX_WIDTH)"
    )
    job = start_job(dataclasses.replace(GOOD, steps=150), INFO, Limits())
    assert len(job.timesteps) >= 150


def test_defaults_come_from_the_model() -> None:
    job = start_job(GOOD, INFO)
    assert (job.valid.width, job.valid.height) == (64, 64)
    assert job.latent_shape == (1, 4, 16, 16)


def test_img2img_size_defaults_to_the_init_image_rounded_down() -> None:
    job = start_job(dataclasses.replace(GOOD, init_image=png(70, 45), strength=0.5), INFO)
    assert (job.valid.width, job.valid.height) == (64, 40)
    assert job.valid.init_image is not None
    assert job.valid.init_image.shape == (3, 40, 64)
    assert job.valid.init_image.min() >= -1.0


def test_any_diffusers_class_name_is_accepted() -> None:
    job = start_job(dataclasses.replace(GOOD, scheduler="DDIMScheduler"), INFO)
    assert job.scheduler.name == "DDIMScheduler"


#: what a repository built now declares: 128 pixels, 64 rows per UNet call, 8 per VAE decode
DECLARED = dataclasses.replace(
    INFO,
    max_width=128,
    max_height=96,
    unet_max_batch_size=64,
    max_batch_sizes={"unet": 64, "encode_prompt": 64, "vae_encoder": 64, "vae_decoder": 8},
)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"width": 768},
            "width: 768 is over the deployed model's max_width 128 (declared by the model "
            "repository)",
        ),
        (
            {"height": 104},
            "height: 104 is over the deployed model's max_height 96 (declared by the model "
            "repository)",
        ),
        (
            # without width/height, img2img takes the init image's size: still bounded
            {"init_image": png(200, 64), "strength": 0.5},
            "width: 200 is over the deployed model's max_width 128 (declared by the model "
            "repository)",
        ),
        (
            {"num_images": 33},
            "num_images: 33 with guidance_scale 7.5 (> 1: guidance) needs 66 rows in one unet "
            "call, over the deployed model's unet max_batch_size 64 (declared by the model "
            "repository)",
        ),
        (
            {"num_images": 9, "guidance_scale": 1.0},
            "num_images: 9 needs 9 rows in one vae_decoder call, over the deployed model's "
            "vae_decoder max_batch_size 8 (declared by the model repository)",
        ),
    ],
)
def test_the_deployed_models_declared_limits_are_enforced(
    changes: dict[str, object], message: str
) -> None:
    request = dataclasses.replace(GOOD, **changes)  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as info:
        start_job(request, DECLARED, Limits(max_num_images=64))
    assert str(info.value) == message
    assert info.value.reason == "invalid_request"
    assert disposition(info.value) is Disposition.DEAD_LETTER


def test_the_smaller_of_setting_and_declared_limit_binds() -> None:
    at_limit = dataclasses.replace(GOOD, width=128, height=96, num_images=8)
    job = start_job(at_limit, DECLARED, Limits(max_num_images=64))
    assert job.latent_shape == (8, 4, 24, 32)
    wide = dataclasses.replace(DECLARED, max_batch_sizes={"unet": 64})
    # 32 images with guidance: exactly the UNet's 64 rows
    assert start_job(dataclasses.replace(GOOD, num_images=32), wide, Limits(max_num_images=64))
    # a setting below the model's declaration is the one named
    with pytest.raises(ValidationError) as info:
        start_job(dataclasses.replace(GOOD, width=96), DECLARED, Limits(max_width=64))
    assert "service's max_width 64" in str(info.value)
    # the settings' num_images bound still applies below the rows bound
    with pytest.raises(ValidationError, match="num_images: must be between 1 and 4"):
        start_job(dataclasses.replace(GOOD, num_images=5), DECLARED, Limits())


def test_a_repository_without_declared_limits_keeps_the_settings_limits() -> None:
    """Repositories built before the limits existed: no max_width/height, no batch sizes."""
    assert INFO.max_width is None and INFO.max_height is None and INFO.max_rows("unet") == 0
    job = start_job(
        dataclasses.replace(GOOD, width=1024, height=512, num_images=64),
        INFO,
        Limits(max_num_images=64),
    )
    assert (job.valid.width, job.valid.height) == (1024, 512)
    with pytest.raises(ValidationError, match="service's max_height 1024"):
        start_job(dataclasses.replace(GOOD, height=1032), INFO, Limits())


def test_guidance_needs_two_rows_in_the_text_encoder_call() -> None:
    one_row = dataclasses.replace(DECLARED, max_batch_sizes={"encode_prompt": 1})
    with pytest.raises(ValidationError) as info:
        start_job(GOOD, one_row)
    assert info.value.field == "guidance_scale"
    assert "needs 2 rows in one encode_prompt call" in str(info.value)
    assert start_job(dataclasses.replace(GOOD, guidance_scale=1.0), one_row).n == 1


@pytest.mark.parametrize("priority", ["high", "normal", "low"])
def test_the_three_priorities_pass_the_envelope(priority: str) -> None:
    request = dataclasses.replace(GOOD, request_id="r-1", priority=priority)
    check_envelope(request, EnvelopeLimits(), now=1_800_000_000.0)


@pytest.mark.parametrize("priority", ["urgent", "HIGH", "", "low "])
def test_an_unknown_priority_is_refused_naming_the_field(priority: str) -> None:
    request = dataclasses.replace(GOOD, request_id="r-1", priority=priority)
    with pytest.raises(ValidationError) as info:
        check_envelope(request, EnvelopeLimits(), now=1_800_000_000.0)
    assert info.value.field == "priority"
    assert "high, low, normal" in str(info.value)
