"""Triton Python-backend model that runs one stage's `model.onnx` with ONNX Runtime, or the
stage's diffusers component with torch (the `runtime` parameter: "onnxruntime", the default, or
"torch").

Copied unchanged into `<model>/1/model.py` for every stage (text_encoder, vae_encoder, unet,
vae_decoder) by `orchestrator models build`. Input and output names come from the model's
config.pbtxt and equal the ONNX tensor names.

Batching: Triton's dynamic batcher hands `execute` several requests; requests whose inputs agree
in every non-batch dimension (and dtype) are concatenated along the batch dimension and run as
one ONNX Runtime call, then the outputs are split back per request. Requests of other shapes form
their own groups. A failure answers every affected request with a TritonError; it never raises.

Threads: the `ort_intra_op_threads` parameter (default 1); the environment variable
`ORCH_ORT_INTRA_OP_THREADS`, when set, overrides it for every model of the server.

Torch: the `model_folder` parameter names a diffusers folder; only this stage's component is
loaded (`orchestrator.models.export.load_stage`, imported from the `orchestrator_src` parameter
when the stub's sys.path lacks it) in `torch_dtype` (float16 or float32) on `torch_device`
("cpu" or "cuda"; a KIND_GPU instance runs on its own GPU). Inputs are cast to that dtype
(`timestep` stays float32), outputs come back in the config's declared dtype.

Memory: ONNX Runtime's CPU arena keeps every buffer it ever grew to, so one large shape would
hold its peak for the life of the process. After a call that leaves this process more than the
`ort_arena_keep_mb` parameter (default 1024) above its size once the model was loaded, one
single-row run of the smallest input seen so far is made with the
`memory.enable_memory_arena_shrinkage` run option, which hands the arena's free regions back to
the operating system. Calls within the bound keep the arena warm (no page faults on reuse).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

try:  # present inside the Triton Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by unit tests for the pure helpers
    pb_utils = None

THREADS_ENV = "ORCH_ORT_INTRA_OP_THREADS"
#: growth over the loaded model, in MiB, that the arena may keep between calls
DEFAULT_ARENA_KEEP_MB = 1024
SHRINK_ENTRY = "memory.enable_memory_arena_shrinkage"


def group_requests(
    shapes: list[tuple[tuple[Any, ...], ...]],
) -> list[list[int]]:
    """Indices of requests that can share one batch: same non-batch shape and dtype per input.

    `shapes[i]` holds, per input, a key such as (dims after the batch dim..., dtype). Groups keep
    request order.
    """
    groups: dict[tuple[tuple[Any, ...], ...], list[int]] = {}
    for index, key in enumerate(shapes):
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def split_points(batch_sizes: list[int]) -> list[int]:
    """Offsets at which a concatenated output is cut back into per-request pieces."""
    return [int(x) for x in np.cumsum(batch_sizes)[:-1]]


def one_row(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first row of every input: a valid call of the same shape, as small as it gets."""
    return {name: np.ascontiguousarray(array[:1]) for name, array in feed.items()}


def feed_bytes(feed: dict[str, np.ndarray]) -> int:
    return sum(int(array.nbytes) for array in feed.values())


def resident_kib() -> int:
    """This process's resident set size in KiB (Linux /proc/self/statm)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


#: config data types of outputs -> numpy
_NUMPY_TYPES = {"TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_INT64": np.int64}


class TorchSession:
    """ONNX Runtime's `run(output_names, feed)` over a torch stage module (one output)."""

    def __init__(self, params: dict[str, str], config: dict[str, Any], args: dict[str, str]):
        import sys

        import torch

        try:
            from orchestrator.models.export import STAGE_SPECS, load_stage
        except ImportError:
            src = params.get("orchestrator_src", "")
            if src and src not in sys.path:
                sys.path.append(src)
            from orchestrator.models.export import STAGE_SPECS, load_stage

        self.torch = torch
        stage = config.get("name", "")
        self.dtype = getattr(torch, params.get("torch_dtype") or "float32")
        device = params.get("torch_device") or "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.device = torch.device(device)
        self.module = load_stage(Path(params["model_folder"]), stage, self.dtype).to(self.device)
        self.inputs = STAGE_SPECS[stage].inputs
        self.out_types = {o["name"]: _NUMPY_TYPES[o["data_type"]] for o in config["output"]}

    def run(self, output_names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        args = []
        for name in self.inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feed[name])).to(self.device)
            if tensor.is_floating_point() and name != "timestep":
                tensor = tensor.to(self.dtype)
            args.append(tensor)
        with torch.inference_mode():
            out = self.module(*args)
        name = output_names[0]
        return [out.to(torch.float32).cpu().numpy().astype(self.out_types[name], copy=False)]


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    params = config.get("parameters") or {}
    return {key: str(value.get("string_value", "")) for key, value in params.items()}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.model_name = config.get("name", "model")
        self.input_names = [spec["name"] for spec in config["input"]]
        self.output_names = [spec["name"] for spec in config["output"]]
        #: the smallest one-row input seen, replayed to shrink the arena (ONNX Runtime only)
        self.small_feed: dict[str, np.ndarray] | None = None
        self.shrinks = 0
        self.torch_runtime = params.get("runtime") == "torch"
        if self.torch_runtime:
            self.session: Any = TorchSession(params, config, args)
            return
        import onnxruntime as ort

        threads = int(os.environ.get(THREADS_ENV) or params.get("ort_intra_op_threads") or "1")

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(threads, 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / params.get("onnx_file", "model.onnx")
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.keep_kib = int(params.get("ort_arena_keep_mb") or DEFAULT_ARENA_KEEP_MB) * 1024
        self.loaded_kib = resident_kib()
        self.shrink_options = ort.RunOptions()
        self.shrink_options.add_run_config_entry(SHRINK_ENTRY, "cpu:0")
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        missing = [n for n in self.input_names if n not in onnx_inputs]
        if missing:
            raise RuntimeError(f"{onnx_path} lacks inputs {missing} (has {sorted(onnx_inputs)})")

    def _error(self, message: str) -> Any:
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {message}")
        )

    def _read(self, request: Any) -> tuple[dict[str, np.ndarray], int]:
        arrays: dict[str, np.ndarray] = {}
        batch = -1
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            array = tensor.as_numpy()
            if array.ndim == 0:
                raise ValueError(f"input {name!r} has no batch dimension")
            if batch >= 0 and array.shape[0] != batch:
                raise ValueError(
                    f"inputs disagree on the batch size ({name!r} has {array.shape[0]}, "
                    f"expected {batch})"
                )
            batch = int(array.shape[0])
            arrays[name] = array
        return arrays, batch

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        readable: list[int] = []
        inputs: list[dict[str, np.ndarray]] = []
        batches: list[int] = []
        keys: list[tuple[tuple[Any, ...], ...]] = []
        for index, request in enumerate(requests):
            try:
                arrays, batch = self._read(request)
            except Exception as exc:
                responses[index] = self._error(str(exc))
                continue
            readable.append(index)
            inputs.append(arrays)
            batches.append(batch)
            keys.append(
                tuple((*arrays[n].shape[1:], arrays[n].dtype.str) for n in self.input_names)
            )

        for group in group_requests(keys):
            members = [readable[g] for g in group]
            try:
                if len(group) == 1:
                    feed = inputs[group[0]]
                else:
                    feed = {
                        name: np.concatenate([inputs[g][name] for g in group], axis=0)
                        for name in self.input_names
                    }
                outputs = self.session.run(self.output_names, feed)
                if not self.torch_runtime:
                    self._remember(feed)
                cuts = split_points([batches[g] for g in group])
                pieces = [np.split(out, cuts, axis=0) for out in outputs]
                for position, request_index in enumerate(members):
                    tensors = [
                        pb_utils.Tensor(name, np.ascontiguousarray(pieces[k][position]))
                        for k, name in enumerate(self.output_names)
                    ]
                    responses[request_index] = pb_utils.InferenceResponse(output_tensors=tensors)
            except Exception as exc:
                for request_index in members:
                    responses[request_index] = self._error(f"{type(exc).__name__}: {exc}")
        self._release_memory()
        return responses

    def _remember(self, feed: dict[str, np.ndarray]) -> None:
        row = one_row(feed)
        if self.small_feed is None or feed_bytes(row) < feed_bytes(self.small_feed):
            self.small_feed = row

    def _release_memory(self) -> None:
        """Shrink the arena when the last calls left it holding more than the bound."""
        if self.small_feed is None or resident_kib() - self.loaded_kib <= self.keep_kib:
            return
        # a failed shrink costs memory, never an answer
        with contextlib.suppress(Exception):
            self.session.run(self.output_names, self.small_feed, self.shrink_options)
            self.shrinks += 1
        held = resident_kib()
        if held - self.loaded_kib > self.keep_kib:
            # what is still held is not the arena's to give back: measure growth from here on,
            # rather than paying a shrink after every call
            self.loaded_kib = held

    def finalize(self) -> None:
        self.session = None
