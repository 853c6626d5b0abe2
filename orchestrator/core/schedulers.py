"""diffusers' own scheduler classes behind a small port.

One `JobScheduler` per job: diffusers schedulers keep per-instance state (step index, the
multistep solvers' history), so an instance is never shared between jobs.

Ancestral and other stochastic schedulers draw their per-step noise from
``torch.Generator("cpu").manual_seed(seed)``: the request's own seed, a generator private to
the job (see README, "Reproducible seeds").
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import diffusers
import numpy as np
import torch

from orchestrator.errors import ValidationError


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


#: Short names users may give; any diffusers scheduler class name works too.
ALIASES: Mapping[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler"),
    "ddpm": SchedulerSpec("DDPMScheduler"),
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": SchedulerSpec(
        "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}
    ),
    "dpmpp_2m_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_sde": SchedulerSpec(
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
    ),
    "pndm": SchedulerSpec("PNDMScheduler"),
    "heun": SchedulerSpec("HeunDiscreteScheduler"),
    "lms": SchedulerSpec("LMSDiscreteScheduler"),
    "unipc": SchedulerSpec("UniPCMultistepScheduler"),
}

#: Aliases whose images depend on the per-step generator (same seed: same image).
STOCHASTIC_ALIASES = frozenset({"euler_a", "ddpm", "dpmpp_sde"})


@functools.cache
def _scheduler_classes() -> dict[str, type[Any]]:
    """diffusers' scheduler classes by name (looked up once: diffusers imports them lazily)."""
    classes: dict[str, type[Any]] = {}
    for name in dir(diffusers):
        if not name.endswith("Scheduler"):
            continue
        try:
            obj = getattr(diffusers, name)
            usable = inspect.isclass(obj) and hasattr(obj, "from_config") and hasattr(obj, "step")
        except (ImportError, AttributeError):  # optional backends (flax, torchsde) missing
            continue
        if usable:
            classes[name] = obj
    return classes


def resolve(name: str) -> tuple[type[Any], Mapping[str, Any]]:
    """Map an alias or a diffusers class name to (class, config overrides)."""
    spec = ALIASES.get(name.lower()) if name else None
    if spec is None:
        spec = SchedulerSpec(name)
    cls = _scheduler_classes().get(spec.class_name)
    if cls is None:
        raise ValidationError(
            "scheduler",
            f"unknown scheduler {name!r}; use one of {', '.join(sorted(ALIASES))} "
            "or a diffusers scheduler class name",
        )
    return cls, spec.overrides


def _accepts(fn: Any, param: str) -> bool:
    return param in inspect.signature(fn).parameters


class JobScheduler:
    """A diffusers scheduler owned by exactly one job."""

    def __init__(self, name: str, base_config: Mapping[str, Any], seed: int) -> None:
        cls, overrides = resolve(name)
        config = {k: v for k, v in base_config.items() if not k.startswith("_")}
        config.update(overrides)
        try:
            self._impl: Any = cls.from_config(config)
        except Exception as exc:  # a class that cannot take this model's config
            raise ValidationError(
                "scheduler", f"scheduler {name!r} cannot be built from the model's config: {exc}"
            ) from exc
        self.name = name
        self._generator = torch.Generator("cpu").manual_seed(seed)
        step = self._impl.step
        self._step_kwargs: dict[str, Any] = {}
        if _accepts(step, "eta"):
            self._step_kwargs["eta"] = 0.0
        if _accepts(step, "generator"):
            self._step_kwargs["generator"] = self._generator

    @property
    def order(self) -> int:
        return int(getattr(self._impl, "order", 1))

    @property
    def init_noise_sigma(self) -> float:
        return float(self._impl.init_noise_sigma)

    def set_timesteps(self, steps: int) -> list[float]:
        self._impl.set_timesteps(steps)
        return [float(t) for t in self._impl.timesteps]

    def timesteps_tensor(self) -> torch.Tensor:
        ts: torch.Tensor = self._impl.timesteps
        return ts

    def set_begin_index(self, index: int) -> None:
        if hasattr(self._impl, "set_begin_index"):
            self._impl.set_begin_index(index)

    def scale_model_input(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._impl.scale_model_input(latents, t)
        return out

    def step(
        self, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        out: torch.Tensor = self._impl.step(
            noise_pred, t, latents, **self._step_kwargs, return_dict=False
        )[0]
        return out

    def add_noise(self, init: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._impl.add_noise(init, noise, t)
        return out


def initial_noise(
    seed: int, shape: tuple[int, int, int, int]
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The public seed contract: the request's initial latent noise, before scheduler scaling."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
