"""Echo UNet models: the UNet's tensors at production shapes, and no compute at all.

For measuring what moving a step's tensors costs (bench/transport.py, issue 14). Each echo model
declares the UNet's inputs at one shape family (SD 1.5, SDXL, or the micro preset's tiny
tensors) in one wire dtype, answers `noise_pred` = `sample`, and, when asked for `echo_<input>`,
returns that input too, so a caller can check that every tensor made the round trip intact.
The configs mirror the real repository's UNet (orchestrator/models/repository.py): a Python
backend model, `max_batch_size`, dynamic batching with the same queue delay, one CPU instance.

`timestep` stays fp32 in every variant (rows x 4 bytes; fp16 would round non-integer
timesteps); the latents and the conditioning follow the wire dtype.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.models.repository import (
    DEFAULT_QUEUE_DELAY_US,
    ModelSpec,
    TensorSpec,
    render_cond_cache_config,
    template_dir,
)

#: wire dtype name -> numpy dtype of the latents and conditioning on the wire
WIRE_DTYPES: Mapping[str, type[np.floating[Any]]] = {"fp32": np.float32, "fp16": np.float16}
_CONFIG_TYPES = {np.dtype(np.float32): "TYPE_FP32", np.dtype(np.float16): "TYPE_FP16"}
#: prefix of the optional outputs that return an input unchanged
ECHO_PREFIX = "echo_"
OUTPUT = "noise_pred"
DEFAULT_MAX_BATCH_SIZE = 64


@dataclasses.dataclass(frozen=True)
class EchoShape:
    """The per-row tensor shapes of one model family's UNet call."""

    name: str
    label: str
    #: latent channels, height, width
    latent: tuple[int, int, int]
    #: text tokens, embedding width
    text: tuple[int, int]
    #: added conditions (SDXL's pooled text embeddings and time ids): name -> per-row dims
    added: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)


SHAPES: Mapping[str, EchoShape] = {
    "sd15": EchoShape("sd15", "SD 1.5", (4, 64, 64), (77, 768)),
    "sdxl": EchoShape(
        "sdxl", "SDXL", (4, 128, 128), (77, 2048), {"text_embeds": (1280,), "time_ids": (6,)}
    ),
    # the micro preset's UNet (orchestrator/models/presets.py): the floor of a call
    "tiny": EchoShape("tiny", "tiny (micro preset)", (4, 16, 16), (77, 32)),
}


@dataclasses.dataclass(frozen=True)
class EchoTensor:
    name: str
    dtype: np.dtype[Any]
    #: per-row dims (the batch dimension is implicit, as in Triton configs)
    dims: tuple[int, ...]

    def nbytes(self, rows: int) -> int:
        return rows * int(np.prod(self.dims)) * self.dtype.itemsize


def model_name(shape: str, wire: str) -> str:
    return f"unet_echo_{shape}_{wire}"


def unet_inputs(shape: EchoShape, wire: str) -> tuple[EchoTensor, ...]:
    """The UNet's inputs as the echo model declares them, in wire dtypes."""
    dtype = np.dtype(WIRE_DTYPES[wire])
    return (
        EchoTensor("sample", dtype, shape.latent),
        EchoTensor("timestep", np.dtype(np.float32), (1,)),
        EchoTensor("encoder_hidden_states", dtype, shape.text),
        *(EchoTensor(name, dtype, dims) for name, dims in shape.added.items()),
    )


def echo_sources(shape: EchoShape, wire: str) -> dict[str, str]:
    """Output name -> the input it returns."""
    sources = {OUTPUT: "sample"}
    sources.update({ECHO_PREFIX + t.name: t.name for t in unet_inputs(shape, wire)})
    return sources


def unet_outputs(shape: EchoShape, wire: str) -> tuple[EchoTensor, ...]:
    inputs = {t.name: t for t in unet_inputs(shape, wire)}
    return tuple(
        dataclasses.replace(inputs[src], name=out) for out, src in echo_sources(shape, wire).items()
    )


def orchestrator_inputs(
    shape: EchoShape, rows: int, rng: np.random.Generator
) -> dict[str, npt.NDArray[np.float32]]:
    """One call's inputs as the orchestrator holds them (fp32), random but finite."""
    out: dict[str, npt.NDArray[np.float32]] = {}
    for t in unet_inputs(shape, "fp32"):
        out[t.name] = rng.standard_normal((rows, *t.dims), dtype=np.float32)
    out["timestep"] = np.full((rows, 1), 981.0, dtype=np.float32)
    return out


def _quote(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid protobuf text-format string


def _tensor_block(kind: str, tensors: Sequence[EchoTensor]) -> list[str]:
    items = [
        f"  {{ name: {_quote(t.name)} data_type: {_CONFIG_TYPES[t.dtype]} "
        f"dims: [ {', '.join(str(d) for d in t.dims)} ] }}"
        for t in tensors
    ]
    return [f"{kind} [", ",\n".join(items), "]"]


def render_config(
    shape: EchoShape,
    wire: str,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
) -> str:
    """config.pbtxt of one echo model."""
    sources = json.dumps(echo_sources(shape, wire), sort_keys=True)
    lines = [
        f"name: {_quote(model_name(shape.name, wire))}",
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        *_tensor_block("input", unet_inputs(shape, wire)),
        *_tensor_block("output", unet_outputs(shape, wire)),
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
        f'parameters [ {{ key: "echo_sources" value: {{ string_value: {_quote(sources)} }} }} ]',
    ]
    return "\n".join(lines) + "\n"


#: the Python-backend model: every requested output is the input it names, unchanged
MODEL_PY = '''\
"""Echo UNet (orchestrator/models/echo.py): returns inputs unchanged, computes nothing."""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.sources = json.loads(config["parameters"]["echo_sources"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            wanted = request.requested_output_names()
            tensors = [
                pb_utils.Tensor(out, pb_utils.get_input_tensor_by_name(request, src).as_numpy())
                for out, src in self.sources.items()
                if out in wanted
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
'''


def cached_name(shape: str, wire: str) -> str:
    """The conditioning-cache wrapper in front of an echo model (issue 14, Triton remote)."""
    return model_name(shape, wire) + "_cached"


def render_cached_config(shape: EchoShape, wire: str) -> str:
    """config.pbtxt of `cached_name`: the real repository's `unet_cached`, around the echo."""

    def spec(t: EchoTensor) -> TensorSpec:
        return TensorSpec(t.name, _CONFIG_TYPES[t.dtype], t.dims)

    unet = ModelSpec(
        model_name(shape.name, wire),
        tuple(spec(t) for t in unet_inputs(shape, wire)),
        tuple(spec(t) for t in unet_outputs(shape, wire)),
        {},
    )
    return render_cond_cache_config(
        unet, name=cached_name(shape.name, wire), target_model=unet.name
    )


def write_repository(
    repo: Path,
    models: Iterable[tuple[str, str]],
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    cached: bool = False,
) -> list[str]:
    """Write one echo model per (shape, wire dtype) pair into `repo` (replaced), and with
    `cached` its conditioning-cache wrapper; returns the model names."""
    if repo.exists():
        shutil.rmtree(repo)
    names = []
    for shape_name, wire in dict.fromkeys(models):
        shape = SHAPES[shape_name]
        name = model_name(shape_name, wire)
        version = repo / name / "1"
        version.mkdir(parents=True)
        config = render_config(
            shape, wire, max_batch_size=max_batch_size, queue_delay_us=queue_delay_us
        )
        (repo / name / "config.pbtxt").write_text(config, encoding="utf-8")
        (version / "model.py").write_text(MODEL_PY, encoding="utf-8")
        names.append(name)
        if cached:
            wrapper = repo / cached_name(shape_name, wire)
            (wrapper / "1").mkdir(parents=True)
            text = render_cached_config(shape, wire)
            (wrapper / "config.pbtxt").write_text(text, encoding="utf-8")
            shutil.copyfile(template_dir() / "unet_cached" / "model.py", wrapper / "1" / "model.py")
            names.append(wrapper.name)
    return names
