"""In-memory fakes of the orchestrator's ports, shipped for users' own tests.

`TorchStageRunner` executes the same StageCalls the Triton models answer, with the diffusers
components themselves, in process: the pipeline can be tested against diffusers without servers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from orchestrator.domain import ModelInfo, StageCall
from orchestrator.errors import InferenceError, TransientInferenceError


class TorchStageRunner:
    """Runs stage calls with diffusers/transformers components (CPU, float32)."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        vae: Any,
        unet: Any,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_encoder = text_encoder.to(self.device, dtype)
        self.vae = vae.to(self.device, dtype)
        self.unet = unet.to(self.device, dtype)
        self.calls: list[StageCall] = []

    @classmethod
    def from_pretrained(
        cls, path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> TorchStageRunner:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        return cls(
            CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval(),
            AutoencoderKL.from_pretrained(path, subfolder="vae").eval(),
            UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval(),
            device=device,
            dtype=dtype,
        )

    def _in(self, arr: npt.NDArray[Any]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, self.dtype)

    @staticmethod
    def _out(t: torch.Tensor) -> npt.NDArray[Any]:
        out: npt.NDArray[Any] = t.float().cpu().numpy()
        return out

    def model_info(self, scheduler_config: dict[str, Any]) -> ModelInfo:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        ups = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return ModelInfo(
            latent_channels=int(self.unet.config.in_channels),
            vae_scale_factor=f,
            scaling_factor=float(self.vae.config.scaling_factor),
            size_multiple=f * ups,
            default_height=int(self.unet.config.sample_size) * f,
            default_width=int(self.unet.config.sample_size) * f,
            text_max_length=int(self.tokenizer.model_max_length),
            text_embed_dim=int(self.text_encoder.config.hidden_size),
            scheduler_config=json.loads(json.dumps(scheduler_config)),
        )

    @torch.no_grad()
    def run(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        self.calls.append(call)
        x = call.inputs
        if call.model == "encode_prompt":
            prompts = [row[0].decode("utf-8") for row in x["prompt"]]
            ids = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            lengths = [len(t) for t in self.tokenizer(prompts, truncation=False).input_ids]
            return {
                "text_embeds": self._out(self.text_encoder(ids.to(self.device))[0]),
                "num_tokens": np.array([[n] for n in lengths], dtype=np.int64),
            }
        if call.model == "vae_encoder":
            return {
                "latent_mean": self._out(self.vae.encode(self._in(x["image"])).latent_dist.mean)
            }
        if call.model == "unet":
            out = self.unet(
                self._in(x["sample"]),
                # timesteps stay float32: fp16 would round fractional ones (749.25 -> 749.0)
                torch.from_numpy(x["timestep"]).to(self.device).reshape(-1),
                encoder_hidden_states=self._in(x["encoder_hidden_states"]),
            ).sample
            return {"noise_pred": self._out(out)}
        if call.model == "vae_decoder":
            return {"image": self._out(self.vae.decode(self._in(x["latent"])).sample)}
        raise InferenceError(f"unknown model {call.model}", stage=call.model)

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        return self.run(call)


class FlakyRunner:
    """Wraps a runner; `fail(call)` decides, per call, whether to raise a transient error."""

    def __init__(self, inner: Any, fail: Callable[[StageCall], bool]) -> None:
        self.inner = inner
        self.fail = fail
        self.failures = 0

    async def infer(self, call: StageCall) -> dict[str, npt.NDArray[Any]]:
        await asyncio.sleep(0)
        if self.fail(call):
            self.failures += 1
            raise TransientInferenceError(f"{call.model}: injected UNAVAILABLE", stage=call.model)
        result: dict[str, npt.NDArray[Any]] = await self.inner.infer(call)
        return result


def to_uint8(images: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """diffusers' numpy output ([0, 1] floats, NHWC) to uint8 the way its PIL output does."""
    out: npt.NDArray[np.uint8] = (images * 255.0).round().astype(np.uint8)
    return out


class OtlpReceiver:
    """An OTLP/gRPC trace receiver (what a collector or Jaeger listens with), for tests and
    benchmarks: `endpoint` for the exporter; spans received are collected."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.requests: list[Any] = []
        receiver = self

        class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                receiver.requests.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(1)

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spans(self) -> list[tuple[str, Any]]:
        """(service.name, span) of every span received."""
        out: list[tuple[str, Any]] = []
        for req in self.requests:
            for rs in req.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in rs.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for ss in rs.scope_spans:
                    out.extend((service, span) for span in ss.spans)
        return out
