"""Bad input to the core raises a typed ValidationError naming the field, never a numpy crash."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

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
    with pytest.raises(ValidationError, match="width: must be at most 32"):
        start_job(dataclasses.replace(GOOD, width=64), INFO, Limits(max_width=32))
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
