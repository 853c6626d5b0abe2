"""The Triton edge: the only module that imports tritonclient.

One async gRPC channel, reused for every call; a deadline on every call; gRPC status codes
mapped once, here, to errors that say whether a retry may help.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from orchestrator.adapters import triton_cond
from orchestrator.adapters.tracing import grpc_metadata
from orchestrator.adapters.triton_shm import (
    MODES,
    RESIDENT_INPUTS,
    ShmChannel,
    cast,
    is_lost_region,
)
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


log = logging.getLogger(__name__)

_F32 = np.dtype(np.float32)

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
        shared_memory: str = "off",
        conditioning_cache: str = "off",
    ) -> None:
        if shared_memory not in MODES:
            raise ValueError(f"shared_memory must be one of {MODES}, not {shared_memory!r}")
        if conditioning_cache not in triton_cond.MODES:
            raise ValueError(
                f"conditioning_cache must be one of {triton_cond.MODES}, not {conditioning_cache!r}"
            )
        self.url = url
        self.timeout_s = timeout_s
        self.on_error = on_error
        self.propagate_trace = propagate_trace
        self.shared_memory = shared_memory
        self._client = aioclient.InferenceServerClient(url, ssl=ssl)
        #: per model, its declared input/output dtypes (the wire dtypes), read once from its config
        self._dtypes: dict[str, dict[str, np.dtype[Any]]] = {}
        #: this endpoint's shared memory (None: not probed yet, or plain gRPC after `disable`)
        self.shm: ShmChannel | None = None
        #: "unprobed", "on" (conditioning through shared memory) or "off" (plain gRPC)
        self.shm_state = "off" if shared_memory == "off" else "unprobed"
        self._shm_lock = asyncio.Lock()
        #: conditioning kept by this endpoint's `unet_cached` (when plain gRPC carries the call)
        self.conditioning_cache = conditioning_cache
        self.cond = triton_cond.CondState()
        if conditioning_cache == "off":
            self.cond.state = "off"
        self._cond_lock = asyncio.Lock()

    async def close(self) -> None:
        if self.shm is not None:
            await self.shm.close()
            self.shm = None
        await self._client.close()

    @property
    def uses_shared_memory(self) -> bool:
        """Whether calls with conditioning go through this endpoint's shared memory."""
        return self.shm_state == "on"

    def _disable_shm(self, why: str) -> None:
        log.warning("Triton %s: plain gRPC from now on (shared memory: %s)", self.url, why)
        self.shm_state = "off"

    async def _channel(self, call: StageCall) -> ShmChannel | None:
        """This endpoint's shared memory for `call`, probing it once (`auto`: an endpoint that
        cannot open our regions, e.g. a remote Triton, is served by plain gRPC)."""
        if self.shm_state == "off" or not RESIDENT_INPUTS.intersection(call.inputs):
            return None
        async with self._shm_lock:
            if self.shm_state == "unprobed":
                channel = ShmChannel(self._client, timeout_s=self.timeout_s, url=self.url)
                try:
                    await channel.probe()
                except Exception as exc:
                    err = map_error(exc, "shared memory")
                    if self.shared_memory == "on":
                        raise err from exc
                    if isinstance(err, TransientInferenceError):
                        return None  # the endpoint is down: ask again next call
                    self._disable_shm(str(err))
                    return None
                self.shm, self.shm_state = channel, "on"
                log.info("Triton %s: conditioning through system shared memory", self.url)
        return self.shm if self.shm_state == "on" else None

    async def wire_dtypes(self, model: str) -> dict[str, np.dtype[Any]]:
        """The dtypes `model` declares for its numeric inputs and outputs (read once)."""
        if model not in self._dtypes:
            self._remember_dtypes(model, await self.model_config(model))
        return self._dtypes[model]

    def _remember_dtypes(self, model: str, cfg: Mapping[str, Any]) -> None:
        self._dtypes[model] = declared_dtypes(cfg)

    def _fail(self, exc: Exception, model: str) -> InferenceError:
        err = map_error(exc, model)
        if self.on_error is not None:
            self.on_error(model, grpc_code(err) or "CLIENT")
        return err

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
        """Run one call; inputs and outputs carry the batch dimension first.

        Inputs are converted to the dtypes the model declares (fp16 on a half-precision
        repository) and outputs come back fp32, whatever travelled."""
        metadata = dict(headers or {})
        if self.propagate_trace:
            # W3C traceparent in the gRPC metadata: Triton's own OpenTelemetry spans join ours
            metadata.update(grpc_metadata())
        client_timeout = timeout_s or self.timeout_s
        try:
            dtypes = await self.wire_dtypes(call.model)
        except InferenceError as exc:
            if self.on_error is not None:
                self.on_error(call.model, grpc_code(exc) or "CLIENT")
            raise
        channel = await self._channel(call)
        if channel is not None:
            answer = await self._infer_shm(channel, call, dtypes, metadata, client_timeout)
            if answer is not None:
                return answer
        elif self.cond.state != "off" and await self._cond_ready(call):
            cached = await self._infer_cached(call, metadata, client_timeout)
            if cached is not None:
                return cached
        inputs = []
        for name, arr in call.inputs.items():
            wire = arr if arr.dtype == np.object_ else _to_wire(arr, dtypes.get(name))
            dtype = "BYTES" if wire.dtype == np.object_ else np_to_triton_dtype(wire.dtype)
            inp = grpcclient.InferInput(name, list(wire.shape), dtype)
            inp.set_data_from_numpy(wire)
            inputs.append(inp)
        outputs = [grpcclient.InferRequestedOutput(name) for name in call.outputs]
        try:
            result = await self._client.infer(
                call.model,
                inputs,
                outputs=outputs,
                client_timeout=client_timeout,
                headers=metadata or None,
            )
        except Exception as exc:
            raise self._fail(exc, call.model) from exc
        out: dict[str, npt.NDArray[Any]] = {}
        for name in call.outputs:
            arr = result.as_numpy(name)
            if arr is None:
                raise InferenceError(f"{call.model} returned no output {name!r}", stage=call.model)
            out[name] = _from_wire(arr)
        return out

    async def _infer_shm(
        self,
        channel: ShmChannel,
        call: StageCall,
        dtypes: Mapping[str, np.dtype[Any]],
        metadata: Mapping[str, str],
        client_timeout: float,
    ) -> dict[str, npt.NDArray[Any]] | None:
        """One call through `channel`; None when it must go by plain gRPC after all."""
        for attempt in range(2):
            generation = channel.generation
            try:
                inputs, outputs, lease = await channel.prepare(
                    call.inputs, _sources(call), call.outputs, dtypes
                )
            except Exception as exc:
                self._shm_failed(exc, call)
                return None
            try:
                result = await self._client.infer(
                    call.model,
                    inputs,
                    outputs=outputs,
                    client_timeout=client_timeout,
                    headers=dict(metadata) or None,
                )
                out: dict[str, npt.NDArray[Any]] = {}
                for name in call.outputs:
                    view = lease.outputs.get(name)
                    arr = result.as_numpy(name) if view is None else view
                    if arr is None:
                        raise InferenceError(
                            f"{call.model} returned no output {name!r}", stage=call.model
                        )
                    # a region's view is overwritten by the next call: always a copy
                    out[name] = _from_wire(arr, copy=view is not None)
                return out
            except InferenceServerException as exc:
                if attempt == 0 and is_lost_region(str(exc.message())):
                    # Triton restarted and forgot the registrations: register again, resend
                    log.info("Triton %s lost its shared memory registrations", self.url)
                    try:
                        await channel.reregister(generation)
                    except Exception as again:
                        self._shm_failed(again, call)
                        return None
                    continue
                raise self._fail(exc, call.model) from exc
            except InferenceError:
                raise
            except Exception as exc:
                raise self._fail(exc, call.model) from exc
            finally:
                channel.release(lease)
        return None

    async def _cond_ready(self, call: StageCall) -> bool:
        """Whether `call` goes to this endpoint's conditioning cache (its repository declares
        `<model>_cached`; asked once per endpoint, again after a transient failure)."""
        if not triton_cond.RESIDENT.intersection(call.inputs):
            return False
        async with self._cond_lock:
            if self.cond.state == "unprobed":
                wanted = triton_cond.cached_model(call.model)
                try:
                    index = await self._client.get_model_repository_index(
                        as_json=True, client_timeout=self.timeout_s
                    )
                except Exception as exc:
                    err = map_error(exc, "repository index")
                    if isinstance(err, TransientInferenceError):
                        return False  # down: ask again with a later call
                    raise err from exc
                ready = {
                    str(m.get("name"))
                    for m in index.get("models", [])
                    if m.get("state", "READY") == "READY"
                }
                if wanted in ready:
                    self.cond.state = "on"
                    log.info("Triton %s: conditioning cached there (%s)", self.url, wanted)
                elif self.conditioning_cache == "on":
                    raise ModelConfigError(
                        f"ORCHESTRATOR_TRITON_CONDITIONING_CACHE=on but Triton {self.url} serves "
                        f"no {wanted!r}: rebuild the repository with `orchestrator models build`"
                    )
                else:
                    self.cond.state = "off"
                    log.info("Triton %s: no %s, conditioning sent every step", self.url, wanted)
        return self.cond.state == "on"

    async def _infer_cached(
        self, call: StageCall, metadata: Mapping[str, str], client_timeout: float
    ) -> dict[str, npt.NDArray[Any]] | None:
        """One call through `<model>_cached`, carrying only the conditioning this endpoint was
        not sent; a miss is answered by the same call carrying all of it."""
        sources = triton_cond.sources_of(call.inputs, getattr(call, "sources", None) or {})
        if sources is None:
            return None
        model = triton_cond.cached_model(call.model)
        try:
            dtypes = await self.wire_dtypes(model)
        except InferenceError as exc:
            if self.on_error is not None:
                self.on_error(model, grpc_code(exc) or "CLIENT")
            raise
        for attempt in range(2):
            planned = self.cond.plan(call.inputs, sources, resend=attempt > 0)
            wire = {n: _to_wire(a, dtypes.get(n)) for n, a in planned.inputs.items()}
            inputs = []
            for name, arr in wire.items():
                inp = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
                inp.set_data_from_numpy(arr)
                inputs.append(inp)
            outputs = [grpcclient.InferRequestedOutput(name) for name in call.outputs]
            try:
                result = await self._client.infer(
                    model,
                    inputs,
                    outputs=outputs,
                    client_timeout=client_timeout,
                    headers=dict(metadata) or None,
                )
            except InferenceServerException as exc:
                if attempt == 0 and triton_cond.is_miss(str(exc.message())):
                    # restarted, evicted or released there: this call again, with every row
                    self.cond.counters.misses += 1
                    self.cond.forget("a miss")
                    continue
                err = self._fail(exc, model)
                if grpc_code(err) in ENDPOINT_DOWN_CODES:
                    self.cond.forget(f"endpoint down: {grpc_code(err)}")
                raise err from exc
            except Exception as exc:
                raise self._fail(exc, model) from exc
            self.cond.count(wire)
            self.cond.done(planned)
            out: dict[str, npt.NDArray[Any]] = {}
            for name in call.outputs:
                arr = result.as_numpy(name)
                if arr is None:
                    raise InferenceError(f"{model} returned no output {name!r}", stage=model)
                out[name] = _from_wire(arr)
            return out
        return None

    def _shm_failed(self, exc: Exception, call: StageCall) -> None:
        """Setting up shared memory failed: a transient error is the call's; anything else ends
        shared memory for this endpoint (`auto`) and the call goes by plain gRPC."""
        err = map_error(exc, call.model)
        if isinstance(err, TransientInferenceError) or self.shared_memory == "on":
            if self.on_error is not None:
                self.on_error(call.model, grpc_code(err) or "CLIENT")
            raise err from exc
        self._disable_shm(str(err))

    async def model_config(self, model: str) -> dict[str, Any]:
        try:
            resp = await self._client.get_model_config(
                model, as_json=True, client_timeout=self.timeout_s
            )
        except Exception as exc:
            raise map_error(exc, model) from exc
        cfg: dict[str, Any] = resp.get("config", resp)
        return cfg

    async def model_versions(self, model: str) -> list[str]:
        """The versions of `model` Triton has ready (its metadata's `versions`)."""
        try:
            resp = await self._client.get_model_metadata(
                model, as_json=True, client_timeout=self.timeout_s
            )
        except Exception as exc:
            raise map_error(exc, model) from exc
        return [str(v) for v in resp.get("versions", [])]

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
        for model, cfg in configs.items():
            self._remember_dtypes(model, cfg)
        outputs = {o.get("name") for o in configs["encode_prompt"].get("output", [])}
        if "num_tokens" not in outputs:
            raise ModelConfigError(
                "the encode_prompt model has no num_tokens output: the repository was built by "
                "an older version; rebuild it with `orchestrator models build`"
            )
        return model_info_from_configs(configs["unet"], configs)


def declared_dtypes(cfg: Mapping[str, Any]) -> dict[str, np.dtype[Any]]:
    """A model config's numeric input and output dtypes by tensor name (strings left out)."""
    out: dict[str, np.dtype[Any]] = {}
    for tensor in [*cfg.get("input", []), *cfg.get("output", [])]:
        name, data_type = tensor.get("name"), str(tensor.get("data_type", ""))
        if not name or data_type in ("", "TYPE_STRING"):
            continue
        dtype = triton_to_np_dtype(data_type.removeprefix("TYPE_"))
        if dtype is not None:
            out[str(name)] = np.dtype(dtype)
    return out


def _to_wire(arr: npt.NDArray[Any], declared: np.dtype[Any] | None) -> npt.NDArray[Any]:
    """An input in its declared float dtype (fp32 -> fp16 on a half-precision model)."""
    if declared is None or declared == arr.dtype or arr.dtype.kind != "f" or declared.kind != "f":
        return arr
    return cast(arr, declared)


def _from_wire(arr: npt.NDArray[Any], *, copy: bool = False) -> npt.NDArray[Any]:
    """An output as the orchestrator computes with it: half precision back to fp32."""
    if arr.dtype == np.float16:
        return cast(arr, _F32)
    return np.array(arr) if copy else arr


def _sources(call: StageCall) -> dict[str, Sequence[npt.NDArray[Any]]]:
    """Per resident input, the arrays its rows were gathered from (each job's own), when the
    call says and they add up; else the input itself."""
    given = getattr(call, "sources", None) or {}
    out: dict[str, Sequence[npt.NDArray[Any]]] = {}
    # the call's rows from a per-call input, so a merged conditioning is not concatenated
    per_call = [n for n in call.inputs if n not in RESIDENT_INPUTS]
    rows = int(call.inputs[per_call[0]].shape[0]) if per_call else None
    for name in RESIDENT_INPUTS.intersection(call.inputs):
        parts = given.get(name)
        if parts and rows is not None and sum(int(p.shape[0]) for p in parts) == rows:
            out[name] = tuple(parts)
        else:
            out[name] = (call.inputs[name],)
    return out


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
