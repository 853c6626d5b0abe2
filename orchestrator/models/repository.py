"""Write the Triton model repository of docs/model-repository.md from one description.

Both variants come from the same `ModelSpec` list: the CPU variant runs every stage as a
Python-backend model around ONNX Runtime (the `triton_models/onnx_stage/model.py` template); the
GPU variant uses TensorRT plans (`convert.sh` builds them from the ONNX files with trtexec). The
tokenizer is a Python-backend model in both. With `torch_folder` (a diffusers folder) either
variant runs its stages as Python-backend models around torch instead (the same template,
`runtime: torch`): fp16 on the instance's GPU for "gpu", fp32 on the CPU for "cpu"; this serves
`bench/gpu_triton.py` where the tritonserver at hand has no TensorRT backend.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import orchestrator
from orchestrator.models.export import ModelFacts, onnx_files
from orchestrator.resources import triton_models_dir

TARGETS = ("cpu", "gpu")
ENSEMBLE = "encode_prompt"
#: the pure-Triton baseline: a Python BLS model running the whole pipeline for one request
BLS_MODEL = "pipeline_bls"
MODEL_NAMES = (
    "tokenizer",
    "text_encoder",
    ENSEMBLE,
    "vae_encoder",
    "unet",
    "vae_decoder",
    BLS_MODEL,
    "unet_cached",
)
#: instances of the BLS model: how many whole-pipeline requests Triton runs at once
DEFAULT_BLS_INSTANCES = 4
ONNX_STAGES = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
DEFAULT_QUEUE_DELAY_US = 1000
#: ONNX Runtime intra-op threads per CPU stage model; kept low so six models share a few cores
DEFAULT_ORT_THREADS: Mapping[str, int] = {
    "text_encoder": 1,
    "vae_encoder": 1,
    "unet": 1,
    "vae_decoder": 1,
}
#: MiB over the loaded model a CPU stage's ONNX Runtime arena may keep between calls; after a
#: call leaves more, the stage hands the free memory back (triton_models/onnx_stage/model.py)
DEFAULT_ARENA_KEEP_MB = 1024


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """What the repository declares the deployment serves: the unet's `max_width` and
    `max_height` parameters (pixels). Rows per call are each model's `max_batch_size`."""

    max_width: int
    max_height: int


def serving_limits(
    facts: ModelFacts, target: str, preset_max_size: int | None = None
) -> ServingLimits:
    """The declared limits: a preset's measured size; a model from a folder gets its native
    size (sample_size x VAE factor, 512 for SD 1.5) on CPU and twice that on GPU (the largest
    latent of the TensorRT optimization profile). Rounded down to the size multiple."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    if preset_max_size is not None:
        size = preset_max_size
    elif target == "cpu":
        size = facts.default_height
    else:
        size = 2 * facts.default_height
    unit = facts.size_multiple
    size = max(unit, size // unit * unit)
    return ServingLimits(max_width=size, max_height=size)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: Mapping[str, str]


def template_dir() -> Path:
    """The `triton_models/` folder shipped with the package (model.py templates)."""
    root = triton_models_dir()
    if not (root / "onnx_stage" / "model.py").is_file():
        raise FileNotFoundError(f"Triton model templates not found under {root}")
    return root


def read_limits(repo: Path) -> ServingLimits | None:
    """The limits a written repository's unet declares; None when it declares none."""
    text = (repo / "unet" / "config.pbtxt").read_text(encoding="utf-8")
    found = {
        key: int(m.group(1))
        for key in ("max_width", "max_height")
        if (m := re.search(rf'key: "{key}" value: {{ string_value: "(\d+)" }}', text))
    }
    if len(found) < 2:
        return None
    return ServingLimits(max_width=found["max_width"], max_height=found["max_height"])


def model_specs(
    facts: ModelFacts, source: str, limits: ServingLimits, *, half: bool = False
) -> list[ModelSpec]:
    """Tensors and parameters of every model, in dependency order. `half`: the engines run in
    fp16 and so do their float inputs and outputs on the wire (the GPU variant); `timestep`
    stays fp32 (fp16 would round non-integer timesteps, and it is 4 bytes a row)."""
    c, length, dim = facts.latent_channels, facts.text_max_length, facts.text_embed_dim
    fp = "TYPE_FP16" if half else "TYPE_FP32"
    vae_params = {
        "vae_scale_factor": str(facts.vae_scale_factor),
        "scaling_factor": repr(float(facts.scaling_factor)),
    }
    unet_params = {
        "latent_channels": str(c),
        "sample_size": str(facts.sample_size),
        "size_multiple": str(facts.size_multiple),
        "default_height": str(facts.default_height),
        "default_width": str(facts.default_width),
        "scheduler_config": json.dumps(dict(facts.scheduler_config), sort_keys=True),
        "text_max_length": str(length),
        "text_embed_dim": str(dim),
        "max_width": str(limits.max_width),
        "max_height": str(limits.max_height),
        **vae_params,
    }
    prompt = TensorSpec("prompt", "TYPE_STRING", (1,))
    ids = TensorSpec("input_ids", "TYPE_INT64", (length,))
    embeds = TensorSpec("text_embeds", fp, (length, dim))
    num_tokens = TensorSpec("num_tokens", "TYPE_INT64", (1,))
    specs = [
        ModelSpec("tokenizer", (prompt,), (ids, num_tokens), {"max_length": str(length)}),
        ModelSpec("text_encoder", (ids,), (embeds,), {}),
        ModelSpec(ENSEMBLE, (prompt,), (embeds, num_tokens), {}),
        ModelSpec(
            "vae_encoder",
            (TensorSpec("image", fp, (3, -1, -1)),),
            (TensorSpec("latent_mean", fp, (c, -1, -1)),),
            vae_params,
        ),
        ModelSpec(
            "unet",
            (
                TensorSpec("sample", fp, (c, -1, -1)),
                TensorSpec("timestep", "TYPE_FP32", (1,)),
                TensorSpec("encoder_hidden_states", fp, (length, dim)),
            ),
            (TensorSpec("noise_pred", fp, (c, -1, -1)),),
            unet_params,
        ),
        ModelSpec(
            "vae_decoder",
            (TensorSpec("latent", fp, (c, -1, -1)),),
            (TensorSpec("image", fp, (3, -1, -1)),),
            vae_params,
        ),
    ]
    return [dataclasses.replace(s, parameters={**s.parameters, "source": source}) for s in specs]


def _quote(value: str) -> str:
    """A protobuf text-format string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _tensors(kind: str, tensors: Sequence[TensorSpec]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in t.dims)
        comma = "," if i < len(tensors) - 1 else ""
        lines += [
            "  {",
            f"    name: {_quote(t.name)}",
            f"    data_type: {t.data_type}",
            f"    dims: [ {dims} ]",
            "  }" + comma,
        ]
    lines.append("]")
    return lines


def _parameters(params: Mapping[str, str]) -> list[str]:
    if not params:
        return []
    lines = ["parameters ["]
    items = sorted(params.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        lines.append(
            f"  {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}{comma}"
        )
    lines.append("]")
    return lines


def _ensemble_steps() -> list[str]:
    return [
        "ensemble_scheduling {",
        "  step [",
        "    {",
        '      model_name: "tokenizer"',
        "      model_version: -1",
        '      input_map { key: "prompt" value: "prompt" }',
        '      output_map { key: "input_ids" value: "input_ids" }',
        '      output_map { key: "num_tokens" value: "num_tokens" }',
        "    },",
        "    {",
        '      model_name: "text_encoder"',
        "      model_version: -1",
        '      input_map { key: "input_ids" value: "input_ids" }',
        '      output_map { key: "text_embeds" value: "text_embeds" }',
        "    }",
        "  ]",
        "}",
    ]


def render_config(
    spec: ModelSpec,
    target: str,
    max_batch_size: int,
    *,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    ort_threads: Mapping[str, int] = DEFAULT_ORT_THREADS,
    torch_stages: bool = False,
) -> str:
    """The config.pbtxt text of one model for `target` ("cpu" or "gpu"); `torch_stages`: the
    stages are Python-backend torch models (their parameters come with `spec`)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    params = dict(spec.parameters)
    lines = [f"name: {_quote(spec.name)}"]
    if spec.name == ENSEMBLE:
        lines.append('platform: "ensemble"')
    elif spec.name == "tokenizer" or target == "cpu" or torch_stages:
        lines.append('backend: "python"')
        if spec.name in ort_threads and not torch_stages:
            params["ort_intra_op_threads"] = str(ort_threads[spec.name])
            params["ort_arena_keep_mb"] = str(DEFAULT_ARENA_KEEP_MB)
    else:
        lines.append('platform: "tensorrt_plan"')
        lines.append('default_model_filename: "model.plan"')
    lines.append(f"max_batch_size: {max_batch_size}")
    lines += _tensors("input", spec.inputs)
    lines += _tensors("output", spec.outputs)
    if spec.name == ENSEMBLE:
        lines += _ensemble_steps()
    else:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}")
        kind = "KIND_GPU" if target == "gpu" and spec.name != "tokenizer" else "KIND_CPU"
        lines.append(f"instance_group [ {{ count: 1 kind: {kind} }} ]")
    lines += _parameters(params)
    return "\n".join(lines) + "\n"


def bls_spec(facts: ModelFacts, source: str, limits: ServingLimits) -> ModelSpec:
    """The BLS baseline's tensors; its parameters are the unet's (the pipeline needs them all)."""
    unet = next(s for s in model_specs(facts, source, limits) if s.name == "unet")
    scalar = (1,)
    return ModelSpec(
        BLS_MODEL,
        (
            TensorSpec("prompt", "TYPE_STRING", scalar),
            TensorSpec("negative_prompt", "TYPE_STRING", scalar),
            TensorSpec("seed", "TYPE_INT64", scalar),
            TensorSpec("steps", "TYPE_INT32", scalar),
            TensorSpec("guidance_scale", "TYPE_FP32", scalar),
            TensorSpec("scheduler", "TYPE_STRING", scalar),
            TensorSpec("width", "TYPE_INT32", scalar),
            TensorSpec("height", "TYPE_INT32", scalar),
        ),
        (TensorSpec("image", "TYPE_UINT8", (-1, -1, 3)),),
        {
            **unet.parameters,
            # where `orchestrator` lives, in case the stub's sys.path lacks it
            "orchestrator_src": str(Path(orchestrator.__file__).resolve().parent.parent),
        },
    )


def render_bls_config(
    facts: ModelFacts,
    max_batch_size: int,
    *,
    source: str,
    instances: int,
    limits: ServingLimits,
    half: bool = False,
) -> str:
    """config.pbtxt of the BLS baseline: a CPU Python model for both targets (it orchestrates;
    the stage models it calls run wherever their own configs say). No dynamic batching: each
    request runs its whole pipeline alone, `instances` of them at a time."""
    if instances < 1:
        raise ValueError("the BLS model needs at least one instance")
    spec = bls_spec(facts, source, limits)
    if half:  # the stage models take and give fp16 floats (timestep stays fp32)
        spec = dataclasses.replace(spec, parameters={**spec.parameters, "stage_floats": "fp16"})
    lines = [f"name: {_quote(spec.name)}", 'backend: "python"', f"max_batch_size: {max_batch_size}"]
    lines += _tensors("input", spec.inputs)
    lines += _tensors("output", spec.outputs)
    lines.append(f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]")
    lines += _parameters(spec.parameters)
    return "\n".join(lines) + "\n"


def torch_parameters(folder: Path, target: str) -> dict[str, str]:
    """Parameters of a torch stage model (triton_models/onnx_stage/model.py, runtime torch)."""
    return {
        "runtime": "torch",
        "model_folder": str(Path(folder).resolve()),
        "torch_device": "cuda" if target == "gpu" else "cpu",
        "torch_dtype": "float16" if target == "gpu" else "float32",
        "orchestrator_src": str(Path(orchestrator.__file__).resolve().parent.parent),
    }


#: the UNet with each job's conditioning kept inside Triton (triton_models/unet_cached/model.py)
COND_CACHE_MODEL = "unet_cached"
#: the UNet inputs that stay the same for a job's every step (kept by COND_CACHE_MODEL)
CONDITIONING_INPUTS = ("encoder_hidden_states", "text_embeds", "time_ids")


def render_cond_cache_config(
    unet: ModelSpec, *, name: str = COND_CACHE_MODEL, target_model: str = "unet"
) -> str:
    """config.pbtxt of the conditioning-cache wrapper in front of `unet` (a CPU Python model
    for both targets: it keeps rows in host memory and calls the UNet through BLS). Its
    conditioning keeps the UNet's dtypes (fp16 where the UNet is fp16). No batch dimension of
    Triton's: the orchestrator's batcher has merged the call already."""
    conditioning = [t for t in unet.inputs if t.name in CONDITIONING_INPUTS]
    rest = [t for t in unet.inputs if t.name not in CONDITIONING_INPUTS]

    def block(t: TensorSpec, optional: bool = False) -> list[str]:
        dims = ", ".join(str(d) for d in (-1, *t.dims))
        extra = ["    optional: true"] if optional else []
        return [
            "  {",
            f"    name: {_quote(t.name)}",
            f"    data_type: {t.data_type}",
            f"    dims: [ {dims} ]",
            *extra,
            "  }",
        ]

    inputs = [block(t) for t in rest] + [block(TensorSpec("cond_ids", "TYPE_INT64", ()))]
    inputs.append(block(TensorSpec("new_ids", "TYPE_INT64", ()), optional=True))
    inputs += [block(dataclasses.replace(t, name=f"new_{t.name}"), True) for t in conditioning]
    inputs.append(block(TensorSpec("release_ids", "TYPE_INT64", ()), optional=True))
    lines = [f"name: {_quote(name)}", 'backend: "python"', "max_batch_size: 0", "input ["]
    for i, b in enumerate(inputs):
        lines += [*b[:-1], b[-1] + ("," if i < len(inputs) - 1 else "")]
    lines.append("]")
    outputs = [block(t) for t in unet.outputs]
    lines.append("output [")
    for i, b in enumerate(outputs):
        lines += [*b[:-1], b[-1] + ("," if i < len(outputs) - 1 else "")]
    lines.append("]")
    lines.append("instance_group [ { count: 1 kind: KIND_CPU } ]")
    params = {"target_model": target_model}
    if "source" in unet.parameters:
        params["source"] = unet.parameters["source"]
    lines += _parameters(params)
    return "\n".join(lines) + "\n"


#: GPU (TensorRT) engines: the most elements the largest activation of one call may have. An
#: engine's memory is sized for its profile's largest shapes, and a tensor of 2^31 elements or
#: more cannot be built at all; SD's VAEs at 1024x1024 and batch 64 would need 8.6e9.
TRT_MAX_ACTIVATION_ELEMENTS = 2**30
#: channels of each stage's widest full-resolution activation in Stable Diffusion 1.x/2.x/XL:
#: the VAE's outermost blocks (128, at image resolution) and the UNet's first block (320, at
#: latent resolution); smaller models are bounded as if they were this wide
TRT_WIDEST_CHANNELS: Mapping[str, int] = {"vae_encoder": 128, "vae_decoder": 128, "unet": 320}
#: the TensorRT optimum batch: for the UNet, the rows of a step-batched call in steady state
#: (many jobs at different steps in one call, two rows each with guidance)
TRT_OPT_BATCH: Mapping[str, int] = {
    "text_encoder": 8,
    "vae_encoder": 4,
    "unet": 32,
    "vae_decoder": 4,
}


@dataclasses.dataclass(frozen=True)
class StageProfile:
    """One GPU stage's TensorRT optimization profile in rows: its config declares `max_batch`
    as max_batch_size (the service reads it from Triton), and its largest shape is the declared
    size limit."""

    opt_batch: int
    max_batch: int


def gpu_stage_profile(
    facts: ModelFacts, stage: str, max_batch_size: int, limits: ServingLimits
) -> StageProfile:
    """Rows per call of `stage` on the GPU: at most `max_batch_size`, and few enough that its
    widest activation at the largest declared size stays within TRT_MAX_ACTIVATION_ELEMENTS."""
    max_batch = max_batch_size
    if stage in TRT_WIDEST_CHANNELS:
        # the VAEs' widest activations are at image resolution, the UNet's at latent resolution
        f = 1 if stage != "unet" else facts.vae_scale_factor
        height, width = max(limits.max_height // f, 1), max(limits.max_width // f, 1)
        row = TRT_WIDEST_CHANNELS[stage] * height * width
        max_batch = max(1, min(max_batch_size, TRT_MAX_ACTIVATION_ELEMENTS // row))
    return StageProfile(opt_batch=min(max_batch, TRT_OPT_BATCH.get(stage, 4)), max_batch=max_batch)


def _trt_shapes(
    facts: ModelFacts, stage: str, max_batch_size: int, limits: ServingLimits
) -> tuple[str, str, str]:
    """trtexec --minShapes/--optShapes/--maxShapes values for one stage; the largest shape is
    the declared limit, so every request the service admits fits the engine's profile, at the
    stage's own batch bound (gpu_stage_profile)."""
    unit = facts.size_multiple // facts.vae_scale_factor
    f = facts.vae_scale_factor
    low = (unit, unit)
    opt = (facts.sample_size, facts.sample_size)
    high = (max(limits.max_height // f, unit), max(limits.max_width // f, unit))
    c, length, dim = (facts.latent_channels, facts.text_max_length, facts.text_embed_dim)
    profile = gpu_stage_profile(facts, stage, max_batch_size, limits)

    def shapes(batch: int, lat: tuple[int, int]) -> str:
        h, w = lat
        if stage == "text_encoder":
            return f"input_ids:{batch}x{length}"
        if stage == "vae_encoder":
            return f"image:{batch}x3x{h * f}x{w * f}"
        if stage == "unet":
            return (
                f"sample:{batch}x{c}x{h}x{w},timestep:{batch}x1,"
                f"encoder_hidden_states:{batch}x{length}x{dim}"
            )
        return f"latent:{batch}x{c}x{h}x{w}"

    return shapes(1, low), shapes(profile.opt_batch, opt), shapes(profile.max_batch, high)


#: config data types -> trtexec I/O formats (linear layout)
_TRT_IO = {"TYPE_FP16": "fp16:chw", "TYPE_FP32": "fp32:chw", "TYPE_INT64": "int64:chw"}


def _io_formats(tensors: Sequence[TensorSpec]) -> str:
    """trtexec's --inputIOFormats/--outputIOFormats: one entry per tensor, in config order."""
    return ",".join(_TRT_IO[t.data_type] for t in tensors)


def render_convert_script(facts: ModelFacts, max_batch_size: int, limits: ServingLimits) -> str:
    lines = [
        "#!/usr/bin/env bash",
        "# Turn each stage's ONNX file into the TensorRT engine Triton loads (model.plan).",
        "# Run inside the NGC TensorRT container of Triton's release, on the GPU that will serve",
        "# the models, in half precision with fp16 inputs and outputs as the configs declare",
        "# (timestep fp32). Extra trtexec flags (e.g. --best) can be passed in TRTEXEC_FLAGS;",
        "# TRTEXEC names the binary, else it is looked for on PATH and in the containers' folders.",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
        'if [ -z "${TRTEXEC:-}" ]; then',
        "  for candidate in trtexec /usr/src/tensorrt/bin/trtexec /opt/tensorrt/bin/trtexec; do",
        '    if command -v "$candidate" >/dev/null 2>&1; then TRTEXEC="$candidate"; break; fi',
        "  done",
        "fi",
        'if [ -z "${TRTEXEC:-}" ]; then',
        '  echo "trtexec not found: set TRTEXEC=/path/to/trtexec" >&2',
        "  exit 2",
        "fi",
        "",
    ]
    specs = {s.name: s for s in model_specs(facts, "", limits, half=True)}
    for stage in ONNX_STAGES:
        low, opt, high = _trt_shapes(facts, stage, max_batch_size, limits)
        spec = specs[stage]
        lines += [
            f'echo "building {stage}/1/model.plan"',
            '"$TRTEXEC" \\',
            f'  --onnx="$HERE/{stage}/1/model.onnx" \\',
            f'  --saveEngine="$HERE/{stage}/1/model.plan" \\',
            f"  --minShapes={low} \\",
            f"  --optShapes={opt} \\",
            f"  --maxShapes={high} \\",
            "  --fp16 \\",
            f"  --inputIOFormats={_io_formats(spec.inputs)} \\",
            f"  --outputIOFormats={_io_formats(spec.outputs)} \\",
            "  ${TRTEXEC_FLAGS:-}",
            "",
        ]
    return "\n".join(lines)


def render_gpu_readme(facts: ModelFacts, max_batch_size: int, limits: ServingLimits) -> str:
    rows = ", ".join(
        f"{stage} {p.max_batch} (optimum {p.opt_batch})"
        for stage in ONNX_STAGES
        for p in [gpu_stage_profile(facts, stage, max_batch_size, limits)]
    )
    return f"""# Triton model repository (GPU, TensorRT)

Same model names and tensors as the CPU variant (see docs/model-repository.md).
`text_encoder`, `vae_encoder`, `unet` and `vae_decoder` are `tensorrt_plan` models on
`KIND_GPU`; `tokenizer` stays a Python-backend model on the CPU and `encode_prompt` is the
ensemble tokenizer -> text_encoder.

Each stage's ONNX file (a copy of `DIR/onnx/<stage>.onnx`) lies at `<stage>/1/model.onnx`.
Before serving, build the engines on the target GPU inside the NGC container:

    bash convert.sh            # extra trtexec flags: TRTEXEC_FLAGS="--best" bash convert.sh

The engines run in fp16 and so do their float inputs and outputs (the configs declare
`TYPE_FP16`; `timestep` stays fp32): the orchestrator converts at the edge and keeps its
scheduler math in fp32.

Optimization profiles, rows per call (each config's max_batch_size): {rows}; latent side
{facts.size_multiple // facts.vae_scale_factor}..{limits.max_height // facts.vae_scale_factor}
(optimum {facts.sample_size}), i.e. images up to {limits.max_width}x{limits.max_height} pixels,
the size the unet's `max_width`/`max_height` parameters declare (the orchestrator refuses
larger requests). For larger images, edit both `convert.sh` and those parameters. Then start
Triton with `--model-repository` pointing here.
"""


def write_repository(
    repo: Path,
    facts: ModelFacts,
    onnx_paths: Mapping[str, Path],
    tokenizer_dir: Path,
    *,
    target: str,
    max_batch_size: int,
    source: str,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    bls_instances: int = DEFAULT_BLS_INSTANCES,
    limits: ServingLimits | None = None,
    torch_folder: Path | None = None,
) -> list[Path]:
    """Write the whole repository (replacing any old one); returns the files written.

    `limits` (default: `serving_limits(facts, target)`) become the unet's declared sizes.
    `torch_folder`: a diffusers folder the stages run with torch (no ONNX files needed)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    limits = limits or serving_limits(facts, target)
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    templates = template_dir()
    if repo.exists():
        shutil.rmtree(repo)
    written: list[Path] = []
    half = target == "gpu"
    python_stages = target == "cpu" or torch_folder is not None
    for spec in model_specs(facts, source, limits, half=half):
        if torch_folder is not None and spec.name in ONNX_STAGES:
            spec = dataclasses.replace(
                spec, parameters={**spec.parameters, **torch_parameters(torch_folder, target)}
            )
        model_dir = repo / spec.name
        version = model_dir / "1"
        version.mkdir(parents=True)
        config = model_dir / "config.pbtxt"
        rows = max_batch_size
        if target == "gpu" and spec.name in ONNX_STAGES:
            # the engine's own bound (torch stages keep it: the same activations must fit)
            rows = gpu_stage_profile(facts, spec.name, max_batch_size, limits).max_batch
        config.write_text(
            render_config(
                spec,
                target,
                rows,
                queue_delay_us=queue_delay_us,
                torch_stages=torch_folder is not None,
            ),
            encoding="utf-8",
        )
        written.append(config)
        if spec.name == "tokenizer":
            shutil.copyfile(templates / "tokenizer" / "model.py", version / "model.py")
            shutil.copytree(tokenizer_dir, version / "tokenizer")
            written += [version / "model.py", version / "tokenizer"]
        elif torch_folder is not None and spec.name in ONNX_STAGES:
            shutil.copyfile(templates / "onnx_stage" / "model.py", version / "model.py")
            written.append(version / "model.py")
        elif spec.name in onnx_paths:
            src = onnx_paths[spec.name]
            for file in onnx_files(src):
                # the graph itself becomes model.onnx; external data keeps the name it refers to
                dest = version / ("model.onnx" if file == src else file.name)
                shutil.copyfile(file, dest)
                written.append(dest)
            if target == "cpu":
                shutil.copyfile(templates / "onnx_stage" / "model.py", version / "model.py")
                written.append(version / "model.py")
    unet_spec = next(s for s in model_specs(facts, source, limits, half=half) if s.name == "unet")
    cached = repo / COND_CACHE_MODEL
    (cached / "1").mkdir(parents=True)
    (cached / "config.pbtxt").write_text(render_cond_cache_config(unet_spec), encoding="utf-8")
    shutil.copyfile(templates / COND_CACHE_MODEL / "model.py", cached / "1" / "model.py")
    written += [cached / "config.pbtxt", cached / "1" / "model.py"]
    if python_stages:
        # the benchmark's baseline only: it imports the build machine's `orchestrator` (its
        # source path is a parameter), torch and diffusers, none of which a GPU server has
        config = repo / BLS_MODEL / "config.pbtxt"
        (repo / BLS_MODEL / "1").mkdir(parents=True)
        config.write_text(
            render_bls_config(
                facts,
                max_batch_size,
                source=source,
                instances=bls_instances,
                limits=limits,
                half=half,
            ),
            encoding="utf-8",
        )
        model = repo / BLS_MODEL / "1" / "model.py"
        shutil.copyfile(templates / BLS_MODEL / "model.py", model)
        written += [config, model]
    if target == "gpu" and torch_folder is None:
        script = repo / "convert.sh"
        script.write_text(render_convert_script(facts, max_batch_size, limits), encoding="utf-8")
        script.chmod(0o755)
        readme = repo / "README.md"
        readme.write_text(render_gpu_readme(facts, max_batch_size, limits), encoding="utf-8")
        written += [script, readme]
    return written
