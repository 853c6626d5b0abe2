"""Plain data the whole orchestrator speaks: requests, model facts, stage calls, results."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


class Priority(enum.StrEnum):
    """Admission class of a request: among records fetched and not started, higher first."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for high, 1 for normal, 2 for low."""
        return _PRIORITY_RANK[self]


_PRIORITY_RANK = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}


class JobEvent(enum.StrEnum):
    """What a progress event says happened to a request."""

    QUEUED = "queued"
    STARTED = "started"
    STEP = "step"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for the events that end a request (finished, failed, cancelled)."""
        return self in (JobEvent.FINISHED, JobEvent.FAILED, JobEvent.CANCELLED)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One image-generation request, independent of how it arrived (CLI, Kafka)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    scheduler: str = "pndm"
    guidance_scale: float = 7.5
    #: None means the model's default size
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    #: encoded image file (PNG/JPEG) for img2img; None for text-to-image
    init_image: bytes | None = None
    strength: float = 0.8
    request_id: str = ""
    #: absolute deadline, seconds since the epoch; None means no deadline
    deadline: float | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: admission class, a Priority value (validated with the request)
    priority: str = "normal"
    #: send previews of the latents with the progress events
    preview: bool = False


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the orchestrator knows about the deployed models, read from Triton configs."""

    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    #: pixel sizes must be multiples of this
    size_multiple: int
    default_height: int
    default_width: int
    text_max_length: int
    text_embed_dim: int
    scheduler_config: Mapping[str, Any]
    #: model name -> version string, reported in results
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)
    unet_max_batch_size: int = 0
    #: largest image (pixels) the deployment serves, declared by the model repository;
    #: None: no declared limit (repositories built before the limits existed)
    max_width: int | None = None
    max_height: int | None = None
    #: stage model name -> its config's max_batch_size (rows one call may carry); 0: unknown
    max_batch_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def max_rows(self, model: str) -> int:
        """Rows one call to `model` may carry (its max_batch_size); 0 when not known."""
        rows = self.max_batch_sizes.get(model, 0)
        if not rows and model == "unet":
            rows = self.unet_max_batch_size
        return rows

    @classmethod
    def from_parameters(
        cls,
        p: Mapping[str, str],
        max_batch_size: int = 0,
        max_batch_sizes: Mapping[str, int] | None = None,
    ) -> ModelInfo:
        """From the unet model's config `parameters` (see docs/model-repository.md).

        `max_width`/`max_height` are optional (absent: no declared limit). Raises KeyError or
        ValueError for a missing or garbled parameter."""
        return cls(
            latent_channels=int(p["latent_channels"]),
            vae_scale_factor=int(p["vae_scale_factor"]),
            scaling_factor=float(p["scaling_factor"]),
            size_multiple=int(p["size_multiple"]),
            default_height=int(p["default_height"]),
            default_width=int(p["default_width"]),
            text_max_length=int(p["text_max_length"]),
            text_embed_dim=int(p["text_embed_dim"]),
            scheduler_config=json.loads(p["scheduler_config"]),
            versions={"source": p.get("source", "")},
            unet_max_batch_size=max_batch_size,
            max_width=_optional_size(p, "max_width"),
            max_height=_optional_size(p, "max_height"),
            max_batch_sizes=dict(max_batch_sizes or {}),
        )


def _optional_size(p: Mapping[str, str], key: str) -> int | None:
    """A positive integer parameter, or None when the repository does not declare it."""
    raw = p.get(key, "").strip()
    if not raw:
        return None
    value = int(raw)
    if value < 1:
        raise ValueError(f"{key} must be a positive number of pixels, not {raw!r}")
    return value


@dataclasses.dataclass(frozen=True)
class StageCall:
    """One call a job needs from a stage model: inputs carry a leading batch dimension."""

    model: str
    inputs: Mapping[str, npt.NDArray[Any]]
    outputs: tuple[str, ...]
    #: per input of a merged call, the members' own arrays its rows were concatenated from, in
    #: order (the Triton edge keeps a batch's conditioning resident while these stay the same
    #: objects: they must not be changed in place)
    sources: Mapping[str, tuple[npt.NDArray[Any], ...]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )


@dataclasses.dataclass(frozen=True)
class GeneratedImages:
    """The finished output of a job: uint8 HWC images plus facts for the result record."""

    images: tuple[npt.NDArray[np.uint8], ...]
    seed: int
    timings_ms: Mapping[str, float]
    model_versions: Mapping[str, str]
    prompt_truncated: bool = False
