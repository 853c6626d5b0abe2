"""Random-weight presets, saved in the diffusers folder layout.

A preset is a set of diffusers/transformers configs plus a fixed seed. `save_preset` builds the
components, saves them with `save_pretrained` (the same layout as a real Stable Diffusion folder),
so the exporter can load them back exactly as it loads user weights.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.models import tokenizer_vocab

#: Stable Diffusion 1.5's PNDM scheduler settings
SD15_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    seed: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    #: largest width and height (pixels) the repository declares: measured on a 2-core, 24 GiB
    #: CPU through tritonserver (docs/model-repository.md has the figures); a full batch of
    #: max_batch_size rows at this size still fits with room to spare
    max_size: int


def _text_config(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "vocab_size": tokenizer_vocab.VOCAB_SIZE,
        "max_position_embeddings": tokenizer_vocab.MAX_LENGTH,
        "projection_dim": hidden,
        "hidden_act": "quick_gelu",
        "pad_token_id": 1,
        "bos_token_id": tokenizer_vocab.BOS_ID,
        "eos_token_id": tokenizer_vocab.EOS_ID,
    }


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        seed=0,
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        vae={
            "sample_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (32, 64, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 3,
            "up_block_types": ("UpDecoderBlock2D",) * 3,
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 32,
            "scaling_factor": 0.18215,
        },
        text_encoder=_text_config(hidden=64, intermediate=128, layers=2, heads=4),
        scheduler=SD15_SCHEDULER,
        # 2x the default 64: one UNet call of 64 rows at 128x128 peaks at 5.6 GB and 7.6 s
        max_size=128,
    ),
    "micro": Preset(
        name="micro",
        seed=0,
        unet={
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (16, 32),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
        },
        vae={
            "sample_size": 32,
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (16, 16),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "scaling_factor": 0.18215,
        },
        text_encoder=_text_config(hidden=32, intermediate=64, layers=1, heads=4),
        scheduler=SD15_SCHEDULER,
        # 2x the default 32: one UNet call of 64 rows at 64x64 peaks at 3.7 GB and 2.3 s
        max_size=64,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def save_tokenizer(folder: Path) -> None:
    """Write a real CLIP tokenizer (BPE vocabulary rebuilt from open_clip's merges)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = tokenizer_vocab.write_vocab_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=tokenizer_vocab.MAX_LENGTH)
        ids = tokenizer("a photo of a cat").input_ids
        if ids[0] != tokenizer_vocab.BOS_ID or ids[-1] != tokenizer_vocab.EOS_ID:
            raise RuntimeError(f"CLIP tokenizer does not round-trip: {ids}")
        tokenizer.save_pretrained(folder)
        # the classic files too, so older loaders (and humans) find them
        shutil.copyfile(vocab_path, folder / "vocab.json")
        shutil.copyfile(merges_path, folder / "merges.txt")


def save_preset(preset: Preset, folder: Path) -> Path:
    """Build the preset's random-weight components and save them in the diffusers layout."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    torch.manual_seed(preset.seed)
    unet = UNet2DConditionModel(**preset.unet)
    torch.manual_seed(preset.seed + 1)
    vae = AutoencoderKL(**preset.vae)
    torch.manual_seed(preset.seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
    return save_components(folder, unet, vae, text_encoder, preset.scheduler)


def save_components(
    folder: Path,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    scheduler_config: dict[str, Any],
    tokenizer_dir: Path | None = None,
) -> Path:
    """Save components in the diffusers layout; the tokenizer is copied from `tokenizer_dir`,
    else written from open_clip's vocabulary (save_tokenizer)."""
    from diffusers import PNDMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    PNDMScheduler.from_config(scheduler_config).save_pretrained(folder / "scheduler")
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)
    else:
        save_tokenizer(folder / "tokenizer")
    _write_model_index(folder)
    return folder


def _write_model_index(folder: Path) -> None:
    import json

    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
