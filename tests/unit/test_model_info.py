"""ModelInfo from the Triton configs: declared limits are read, and their absence means none."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator.adapters.triton import model_info_from_configs
from orchestrator.errors import ModelConfigError
from orchestrator.models.presets import SD15_SCHEDULER

FACTS = {
    "latent_channels": "4",
    "vae_scale_factor": "4",
    "scaling_factor": "0.18215",
    "size_multiple": "8",
    "default_height": "64",
    "default_width": "64",
    "text_max_length": "77",
    "text_embed_dim": "64",
    "scheduler_config": json.dumps(SD15_SCHEDULER),
    "source": "tiny",
}


def config(params: dict[str, str], max_batch_size: int = 64) -> dict[str, Any]:
    """A model config as tritonclient's get_model_config(as_json=True) returns it."""
    return {
        "max_batch_size": max_batch_size,
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }


def test_declared_limits_and_every_stages_batch_size_are_read() -> None:
    unet = config({**FACTS, "max_width": "128", "max_height": "96"})
    stages = {
        "unet": unet,
        "encode_prompt": config({}, 32),
        "vae_encoder": config({}, 4),
        "vae_decoder": config({}, 8),
    }
    info = model_info_from_configs(unet, stages)
    assert (info.max_width, info.max_height) == (128, 96)
    assert info.unet_max_batch_size == 64
    assert {m: info.max_rows(m) for m in stages} == {
        "unet": 64,
        "encode_prompt": 32,
        "vae_encoder": 4,
        "vae_decoder": 8,
    }
    assert info.max_rows("no_such_model") == 0


def test_an_older_repository_without_limits_still_loads() -> None:
    info = model_info_from_configs(config(FACTS, 16))
    assert info.max_width is None and info.max_height is None
    assert info.max_rows("unet") == 16  # from the unet's own max_batch_size
    assert info.max_rows("vae_decoder") == 0  # unknown: not checked
    assert info.default_width == 64


@pytest.mark.parametrize("bad", ["0", "-8", "wide"])
def test_a_garbled_limit_is_a_config_error(bad: str) -> None:
    with pytest.raises(ModelConfigError, match="rebuild the repository"):
        model_info_from_configs(config({**FACTS, "max_width": bad, "max_height": "64"}))
