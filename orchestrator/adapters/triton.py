"""The Triton edge: the only module that imports tritonclient.

One async gRPC channel, reused for every call; a deadline on every call; gRPC status codes
mapped once, here, to errors that say whether a retry may help.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from orchestrator.adapters.tracing import grpc_metadata
from orchestrator.domain import ModelInfo, StageCall
from orchestrator.errors import InferenceError, ModelConfigError, TransientInferenceError

#: gRPC status codes after which the same call may succeed
TRANSIENT_CODES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED", "UNKNOWN"}
    # a stage model that start-up found is gone: the server is unloading it (shutting down,
    # a rolling restart) or loading it again; another endpoint, or the same one later, serves
    | {"NOT_FOUND"}
)
#: codes that say this endpoint cannot serve now (another one may): the pool skips it at once
ENDPOINT_DOWN_CODES = frozenset({"UNAVAILABLE", "NOT_FOUND"})


#: the models whose configs `model_info` reads (the unet's parameters, every max_batch_size)
STAGE_MODELS = ("unet", "encode_prompt", "vae_encoder", "vae_decoder")


def _status_code(exc: InferenceServerException) -> str:
    status = str(exc.status() or "")
    return status.rsplit(".", 1)[-1] if status else "UNKNOWN"


def map_error(exc: Exception, model: str) -> InferenceError:
    """Map a tritonclient/gRPC failure to our typed errors."""
    if isinstance(exc, InferenceServerException):
        code = _status_code(exc)
        msg = f"{model}: {code}: {exc.message()}"
        if code in TRANSIENT_CODES:
            err: InferenceError = TransientInferenceError(msg, stage=model)
        else:
            err = InferenceError(msg, stage=model)
        err.grpc_code = code  # type: ignore[attr-defined]
        return err
    return TransientInferenceError(f"{model}: {type(exc).__name__}: {exc}", stage=model)


def grpc_code(exc: BaseException) -> str | None:
    code = getattr(exc, "grpc_code", None)
    return str(code) if code is not None else None


class TritonClient:
    """Async client for the stage models."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 60.0,
        ssl: bool = False,
        on_error: Callable[[str, str], None] | None = None,
        propagate_trace: bool = True,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.propagate_trace = propagate_trace
        self._client = aioclient.InferenceServerClient(url, ssl=ssl)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def is_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout_s))
        except Exception:
            return False

    async def infer(
        self,
        call: StageCall,
        *,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """Run one call; inputs and outputs carry the batch dimension first."""
        inputs = []
        for name, arr in call.inputs.items():
            dtype = "BYTES" if arr.dtype == np.object_ else np_to_triton_dtype(arr.dtype)
            inp = grpcclient.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        outputs = [grpcclient.InferRequestedOutput(name) for name in call.outputs]
        metadata = dict(headers or {})
        if self.propagate_trace:
            # W3C traceparent in the gRPC metadata: Triton's own OpenTelemetry spans join ours
            metadata.update(grpc_metadata())
        try:
            result = await self._client.infer(
                call.model,
                inputs,
                outputs=outputs,
                client_timeout=timeout_s or self.timeout_s,
                headers=metadata or None,
            )
        except Exception as exc:
            err = map_error(exc, call.model)
            if self.on_error is not None:
                self.on_error(call.model, grpc_code(err) or "CLIENT")
            raise err from exc
        out: dict[str, npt.NDArray[Any]] = {}
        for name in call.outputs:
            arr = result.as_numpy(name)
            if arr is None:
                raise InferenceError(f"{call.model} returned no output {name!r}", stage=call.model)
            out[name] = arr
        return out

    async def model_config(self, model: str) -> dict[str, Any]:
        try:
            resp = await self._client.get_model_config(
                model, as_json=True, client_timeout=self.timeout_s
            )
        except Exception as exc:
            raise map_error(exc, model) from exc
        cfg: dict[str, Any] = resp.get("config", resp)
        return cfg

    async def inference_statistics(self, models: Sequence[str] = ()) -> dict[str, dict[str, int]]:
        """Per model: inference_count, execution_count and compute time (ns) so far."""
        stats: dict[str, dict[str, int]] = {}
        try:
            resp = await self._client.get_inference_statistics(as_json=True)
        except Exception as exc:
            raise map_error(exc, "statistics") from exc
        for m in resp.get("model_stats", []):
            if models and m["name"] not in models:
                continue
            s = m.get("inference_stats", {})
            stats[m["name"]] = {
                "inference_count": int(m.get("inference_count", 0)),
                "execution_count": int(m.get("execution_count", 0)),
                "compute_infer_ns": int(s.get("compute_infer", {}).get("ns", 0)),
                "queue_ns": int(s.get("queue", {}).get("ns", 0)),
                "success_count": int(s.get("success", {}).get("count", 0)),
            }
        return stats

    async def model_info(self) -> ModelInfo:
        """Learn what the orchestrator needs from the models' configs: the unet's parameters
        (model facts and declared size limits) and every stage's max_batch_size."""
        configs = {model: await self.model_config(model) for model in STAGE_MODELS}
        outputs = {o.get("name") for o in configs["encode_prompt"].get("output", [])}
        if "num_tokens" not in outputs:
            raise ModelConfigError(
                "the encode_prompt model has no num_tokens output: the repository was built by "
                "an older version; rebuild it with `orchestrator models build`"
            )
        return model_info_from_configs(configs["unet"], configs)


def _params(cfg: Mapping[str, Any]) -> dict[str, str]:
    raw = cfg.get("parameters", {}) or {}
    return {k: str(v.get("string_value", "")) for k, v in raw.items()}


def model_info_from_configs(
    unet: Mapping[str, Any], stages: Mapping[str, Mapping[str, Any]] | None = None
) -> ModelInfo:
    """ModelInfo from the unet's config and (optionally) every stage's, for their batch sizes."""
    p = _params(unet)
    rows = {name: int(cfg.get("max_batch_size", 0)) for name, cfg in (stages or {}).items()}
    try:
        return ModelInfo.from_parameters(p, int(unet.get("max_batch_size", 0)), rows)
    except (KeyError, ValueError) as exc:
        raise ModelConfigError(
            f"the unet model's config lacks or garbles parameter {exc}; rebuild the repository "
            "with `orchestrator models build`"
        ) from exc
