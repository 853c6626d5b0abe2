"""Triton Python-backend BLS model that runs the WHOLE pipeline for one request inside Triton.

The "pure Triton" baseline of `orchestrator bench` (client -> Triton -> response): one gRPC call
per image; inside, this model calls the stage models (`encode_prompt`, `vae_encoder`, `unet`,
`vae_decoder`) one after another with `pb_utils.InferenceRequest(...).exec()`, each request on
its own. There is no batching across requests here beyond what Triton's dynamic batcher does
for the stage models when several instances of this model call them at the same moment.

The math is the orchestrator's own: `orchestrator.core.pipeline` (start_job / plan / advance) is
imported and driven with BLS calls instead of gRPC calls, so for the same request this model
returns the same image as `orchestrator generate`. The package is found on the stub's sys.path
(the venv), else under the `orchestrator_src` parameter written by the generator.

Inputs (batch dimension first, one row per image request; every input has dims [1]):
prompt, negative_prompt, scheduler (BYTES), seed (INT64), steps (INT32), guidance_scale (FP32),
width, height (INT32; 0 means the model's default size). Output: image UINT8 [H, W, 3].

Heavy imports (torch, diffusers) happen on the first request, not at load time, so adding this
model does not slow the server's start.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

try:  # present inside the Triton Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by unit tests for the pure helpers
    pb_utils = None

INPUTS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "scheduler",
    "width",
    "height",
)


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    params = config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in params.items()}


def _as_half(name: str, arr: np.ndarray) -> np.ndarray:
    """A float input as a half-precision stage declares it; `timestep` stays fp32."""
    if arr.dtype == np.float32 and name != "timestep":
        return arr.astype(np.float16)
    return arr


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _scalar(arrays: dict[str, np.ndarray], name: str, row: int) -> Any:
    return arrays[name].reshape(arrays[name].shape[0], -1)[row, 0]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config.get("name", "pipeline_bls")
        self.params = _parameters(config)
        self._pipeline: Any = None
        self._info: Any = None

    def _load(self) -> None:
        """Import the orchestrator's pipeline and learn the model facts (first request only)."""
        if self._pipeline is not None:
            return
        try:
            from orchestrator.core import pipeline
        except ImportError:
            src = self.params.get("orchestrator_src", "")
            if src and src not in sys.path:
                sys.path.append(src)
            from orchestrator.core import pipeline
        from orchestrator.domain import ModelInfo

        self._info = ModelInfo.from_parameters(self.params)
        self._pipeline = pipeline

    def _call(self, model: str, inputs: Any, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """One BLS call to a stage model; outputs copied to host numpy arrays."""
        if self.params.get("stage_floats") == "fp16":  # the stages' declared float type
            inputs = {name: _as_half(name, arr) for name, arr in inputs.items()}
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(arr)) for name, arr in inputs.items()]
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=list(outputs), inputs=tensors
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        result: dict[str, np.ndarray] = {}
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise RuntimeError(f"{model} returned no output {name!r}")
            if tensor.is_cpu():
                result[name] = tensor.as_numpy()
            else:  # GPU stage models (TensorRT): bring the tensor to the host
                from torch.utils.dlpack import from_dlpack

                result[name] = from_dlpack(tensor.to_dlpack()).cpu().numpy()
            if result[name].dtype == np.float16:  # the pipeline's math stays fp32
                result[name] = result[name].astype(np.float32)
        return result

    def _generate(self, arrays: dict[str, np.ndarray], row: int) -> np.ndarray:
        from orchestrator.domain import GenerationRequest

        pipeline = self._pipeline
        width = int(_scalar(arrays, "width", row))
        height = int(_scalar(arrays, "height", row))
        request = GenerationRequest(
            prompt=_text(_scalar(arrays, "prompt", row)),
            negative_prompt=_text(_scalar(arrays, "negative_prompt", row)),
            seed=int(_scalar(arrays, "seed", row)),
            steps=int(_scalar(arrays, "steps", row)),
            guidance_scale=float(_scalar(arrays, "guidance_scale", row)),
            scheduler=_text(_scalar(arrays, "scheduler", row)),
            width=width or None,
            height=height or None,
        )
        job = pipeline.start_job(request, self._info)
        while not job.done:
            call = pipeline.plan(job)
            pipeline.advance(job, self._call(call.model, call.inputs, call.outputs))
        image: np.ndarray = job.images[0]
        return image

    def _execute_one(self, request: Any) -> Any:
        arrays: dict[str, np.ndarray] = {}
        for name in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            arrays[name] = tensor.as_numpy()
        rows = {int(a.shape[0]) for a in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"inputs disagree on the batch size: {sorted(rows)}")
        self._load()
        images = [self._generate(arrays, row) for row in range(rows.pop())]
        if len({img.shape for img in images}) != 1:
            raise ValueError("rows of one request must ask for the same image size")
        out = pb_utils.Tensor("image", np.ascontiguousarray(np.stack(images)))
        return pb_utils.InferenceResponse(output_tensors=[out])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._execute_one(request))
            except Exception as exc:
                message = f"{self.model_name}: {type(exc).__name__}: {exc}"
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(message)
                    )
                )
        return responses

    def finalize(self) -> None:
        self._pipeline = None
