"""Load diffusers components from a folder and export each stage to ONNX.

The same code path serves the random-weight presets (saved, then loaded back) and a user's real
Stable Diffusion folder (`--from PATH`). Tensor names in the ONNX files are the Triton tensor
names of docs/model-repository.md, so the Python backend can feed them through unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

OPSET = 17
STAGES = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
#: above this many weight bytes an ONNX file keeps its tensors in a side file (2 GB protobuf cap)
_EXTERNAL_DATA_THRESHOLD = 1_500_000_000


class ModelSourceError(Exception):
    """The source folder is missing or does not hold a diffusers Stable Diffusion model."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage's ONNX tensors: names with their dynamic axes, in call order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]


STAGE_SPECS: dict[str, StageSpec] = {
    "text_encoder": StageSpec(
        inputs=("input_ids",),
        outputs=("text_embeds",),
        dynamic_axes={"input_ids": {0: "batch"}, "text_embeds": {0: "batch"}},
    ),
    "vae_encoder": StageSpec(
        inputs=("image",),
        outputs=("latent_mean",),
        dynamic_axes={
            "image": {0: "batch", 2: "height", 3: "width"},
            "latent_mean": {0: "batch", 2: "latent_height", 3: "latent_width"},
        },
    ),
    "unet": StageSpec(
        inputs=("sample", "timestep", "encoder_hidden_states"),
        outputs=("noise_pred",),
        dynamic_axes={
            "sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
            "timestep": {0: "batch"},
            "encoder_hidden_states": {0: "batch"},
            "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"},
        },
    ),
    "vae_decoder": StageSpec(
        inputs=("latent",),
        outputs=("image",),
        dynamic_axes={
            "latent": {0: "batch", 2: "latent_height", 3: "latent_width"},
            "image": {0: "batch", 2: "height", 3: "width"},
        },
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the orchestrator must know about the models; becomes Triton config parameters."""

    latent_channels: int
    sample_size: int
    vae_scale_factor: int
    size_multiple: int
    scaling_factor: float
    text_max_length: int
    text_embed_dim: int
    scheduler_config: Mapping[str, Any]

    @property
    def default_height(self) -> int:
        return self.sample_size * self.vae_scale_factor

    @property
    def default_width(self) -> int:
        return self.sample_size * self.vae_scale_factor


@dataclasses.dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    facts: ModelFacts


def check_source(folder: Path) -> None:
    """Raise ModelSourceError unless `folder` looks like a diffusers SD model folder."""
    if not folder.exists():
        raise ModelSourceError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelSourceError(f"model source {folder} is not a folder")
    needed = {
        "unet": "config.json",
        "vae": "config.json",
        "text_encoder": "config.json",
        "tokenizer": None,
        "scheduler": "scheduler_config.json",
    }
    missing = []
    for sub, file in needed.items():
        path = folder / sub if file is None else folder / sub / file
        if not path.exists():
            missing.append(str(path.relative_to(folder)))
    if missing:
        raise ModelSourceError(
            f"{folder} is not a diffusers Stable Diffusion folder; missing: {', '.join(missing)}"
        )


def load_components(folder: Path) -> Components:
    """Load unet, vae, text encoder, tokenizer and scheduler config with `from_pretrained`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_source(folder)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(
            folder / "text_encoder", torch_dtype=torch.float32, attn_implementation="eager"
        )
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler_config = json.loads(
            (folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")
        )
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"cannot load the model in {folder}: {exc}") from exc
    for module in (unet, vae, text_encoder):
        module.eval()
        module.requires_grad_(False)

    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    downsamplers = len(unet.config.block_out_channels) - 1
    text_embed_dim = int(text_encoder.config.hidden_size)
    if int(unet.config.cross_attention_dim) != text_embed_dim:
        raise ModelSourceError(
            f"unet cross_attention_dim {unet.config.cross_attention_dim} does not match the text"
            f" encoder width {text_embed_dim}"
        )
    max_length = int(tokenizer.model_max_length)
    if max_length > int(text_encoder.config.max_position_embeddings):
        max_length = int(text_encoder.config.max_position_embeddings)
    sample_size = unet.config.sample_size
    if isinstance(sample_size, list | tuple):
        sample_size = sample_size[0]
    facts = ModelFacts(
        latent_channels=int(unet.config.in_channels),
        sample_size=int(sample_size),
        vae_scale_factor=vae_scale_factor,
        size_multiple=vae_scale_factor * 2**downsamplers,
        scaling_factor=float(vae.config.scaling_factor),
        text_max_length=max_length,
        text_embed_dim=text_embed_dim,
        scheduler_config=scheduler_config,
    )
    return Components(unet, vae, text_encoder, tokenizer, scheduler_config, facts)


#: the diffusers component (subfolder) each stage runs
STAGE_COMPONENT: Mapping[str, str] = {
    "text_encoder": "text_encoder",
    "vae_encoder": "vae",
    "unet": "unet",
    "vae_decoder": "vae",
}


def stage_module(stage: str, component: Any) -> torch.nn.Module:
    """The module that runs `stage` on its diffusers component with the Triton tensor names'
    signature (STAGE_SPECS): what is exported to ONNX and what a torch stage model runs."""
    import torch

    class TextEncoder(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return component(input_ids=input_ids).last_hidden_state  # type: ignore[no-any-return]

    class VaeEncoder(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return component.encode(image).latent_dist.mean  # type: ignore[no-any-return]

    class Unet(torch.nn.Module):
        def forward(
            self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
        ) -> torch.Tensor:
            # one float timestep per sample ([batch, 1]); fractional values pass unchanged
            t = timestep.reshape(-1).to(torch.float32)
            out = component(
                sample, t, encoder_hidden_states=encoder_hidden_states, return_dict=False
            )
            return out[0]  # type: ignore[no-any-return]

    class VaeDecoder(torch.nn.Module):
        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            return component.decode(latent, return_dict=False)[0]  # type: ignore[no-any-return]

    modules: dict[str, type[torch.nn.Module]] = {
        "text_encoder": TextEncoder,
        "vae_encoder": VaeEncoder,
        "unet": Unet,
        "vae_decoder": VaeDecoder,
    }
    if stage not in modules:
        raise ValueError(f"unknown stage {stage!r}")
    return modules[stage]().eval()


def load_stage(folder: Path, stage: str, dtype: torch.dtype) -> torch.nn.Module:
    """One stage's module with only its own component loaded from a diffusers folder (what a
    torch stage model serves), in `dtype`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    sub = Path(folder) / STAGE_COMPONENT[stage]
    component: Any
    if stage == "unet":
        component = UNet2DConditionModel.from_pretrained(sub, torch_dtype=dtype)
    elif stage == "text_encoder":
        component = CLIPTextModel.from_pretrained(
            sub, torch_dtype=dtype, attn_implementation="eager"
        )
    else:
        component = AutoencoderKL.from_pretrained(sub, torch_dtype=dtype)
    component.eval()
    component.requires_grad_(False)
    return stage_module(stage, component)


def _wrappers(components: Components) -> dict[str, torch.nn.Module]:
    return {
        stage: stage_module(stage, getattr(components, STAGE_COMPONENT[stage])) for stage in STAGES
    }


def sample_inputs(
    facts: ModelFacts,
    stage: str,
    batch: int,
    *,
    latent_hw: tuple[int, int] | None = None,
    seed: int = 0,
) -> dict[str, npt.NDArray[Any]]:
    """Deterministic example inputs for a stage, in Triton tensor layout (batch first)."""
    rng = np.random.default_rng(seed)
    h, w = latent_hw if latent_hw is not None else (facts.sample_size, facts.sample_size)
    c, f = facts.latent_channels, facts.vae_scale_factor
    if stage == "text_encoder":
        ids = rng.integers(0, 49406, size=(batch, facts.text_max_length), dtype=np.int64)
        ids[:, 0] = 49406
        ids[:, -1] = 49407
        return {"input_ids": ids}
    if stage == "vae_encoder":
        img = rng.uniform(-1.0, 1.0, size=(batch, 3, h * f, w * f)).astype(np.float32)
        return {"image": img}
    if stage == "unet":
        return {
            "sample": rng.standard_normal((batch, c, h, w)).astype(np.float32),
            "timestep": rng.uniform(0.0, 999.0, size=(batch, 1)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal(
                (batch, facts.text_max_length, facts.text_embed_dim)
            ).astype(np.float32),
        }
    if stage == "vae_decoder":
        return {"latent": rng.standard_normal((batch, c, h, w)).astype(np.float32)}
    raise ValueError(f"unknown stage {stage!r}")


def export_latent_hw(facts: ModelFacts) -> tuple[int, int]:
    """Latent size to trace with: divisible by the UNet's total downsampling, small but real."""
    unit = facts.size_multiple // facts.vae_scale_factor
    side = max(unit, (facts.sample_size // unit) * unit)
    return side, side


def run_torch(
    components: Components, stage: str, inputs: Mapping[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[Any]]:
    """Run a stage in PyTorch with the same wrapper that was exported (for parity checks)."""
    import torch

    module = _wrappers(components)[stage]
    spec = STAGE_SPECS[stage]
    with torch.no_grad():
        out = module(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in spec.inputs))
    return {spec.outputs[0]: out.numpy()}


def export_stage(components: Components, stage: str, path: Path) -> Path:
    """Export one stage to `path` (opset 17, dynamic batch and spatial axes)."""
    import onnx
    import torch
    from torch.jit._trace import TracerWarning

    spec = STAGE_SPECS[stage]
    module = _wrappers(components)[stage]
    hw = export_latent_hw(components.facts)
    example = sample_inputs(components.facts, stage, 1, latent_hw=hw)
    args = tuple(torch.from_numpy(example[n]) for n in spec.inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # shape checks in diffusers become constants when traced; expected and harmless
            warnings.simplefilter("ignore", TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        model = onnx.load(str(raw), load_external_data=True)
        model.producer_name = "orchestrator"
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        for old in path.parent.glob(path.name + "*"):
            old.unlink()
        if weight_bytes > _EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
            )
        else:
            onnx.save_model(model, str(path))
    return path


def export_all(components: Components, onnx_dir: Path) -> dict[str, Path]:
    return {stage: export_stage(components, stage, onnx_dir / f"{stage}.onnx") for stage in STAGES}


def onnx_files(path: Path) -> list[Path]:
    """The ONNX file plus its external-data side file, if it has one."""
    return sorted(p for p in path.parent.glob(path.name + "*") if p.is_file())


def run_onnx(
    path: Path, inputs: Mapping[str, npt.NDArray[Any]], threads: int = 1
) -> dict[str, npt.NDArray[Any]]:
    """Run an exported stage directly with ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, dict(inputs))
    return dict(zip(names, results, strict=True))
