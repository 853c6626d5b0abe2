"""Previews: a small RGB picture of a job's current latents, with no model call.

A linear map from the latent channels to RGB (``rgb = latents^T @ factors + bias``, per pixel)
approximates what the VAE decoder would make, at the latents' own resolution (1/8 of the image
for Stable Diffusion), thousands of times cheaper than decoding. Pure: numpy and torch only; the
progress adapter encodes the pictures (JPEG) and bounds their bytes.

Coefficients:

- 4 latent channels (Stable Diffusion 1.x/2.x VAE, ``scaling_factor`` 0.18215): the per-channel
  RGB factors keturn measured for SD v1.4 by comparing the pipeline's latents with the VAE's
  decoded colours ("Decoding latents to RGB without upscaling", Hugging Face forum, thread
  23204, 2022). They have no bias: the map gives colours in about [-1, 1], as the decoder does.
  A 4-channel VAE trained apart from SD gets SD-like colours: an approximation, only a preview.
- Any other channel count (no published factors we rely on): the fallback shows the first three
  channels (fewer are repeated) as R, G, B, each stretched to [0, 1] over the picture
  (min-max per channel and image), so structure is visible whatever the latents' scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

#: (factors: channels x 3, bias: 3) by latent channel count
_SD1_FACTORS: tuple[tuple[float, float, float], ...] = (
    #  R       G       B
    (0.298, 0.207, 0.208),  # latent channel 0
    (0.187, 0.286, 0.173),  # latent channel 1
    (-0.158, 0.189, 0.264),  # latent channel 2
    (-0.184, -0.271, -0.473),  # latent channel 3
)
LINEAR_MAPS: dict[int, tuple[Sequence[Sequence[float]], Sequence[float]]] = {
    4: (_SD1_FACTORS, (0.0, 0.0, 0.0)),
}


def preview_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """The preview's (height, width): the latents' own size, scaled down (aspect kept) so its
    longer side is at most `max_side` pixels; never upscaled, never below 1."""
    if max_side < 1:
        raise ValueError("max_side must be at least 1")
    longest = max(height, width)
    if longest <= max_side:
        return height, width
    scale = max_side / longest
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def latents_to_rgb(latents: torch.Tensor, max_side: int) -> list[npt.NDArray[np.uint8]]:
    """One uint8 HxWx3 picture per row of `latents` (N, C, h, w), at most `max_side` px a side."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be (N, C, h, w), not {tuple(latents.shape)}")
    x = latents.detach().to(torch.float32)
    _, channels, h, w = x.shape
    size = preview_size(int(h), int(w), max_side)
    if size != (h, w):
        # averaging commutes with the linear map: shrink first, map fewer pixels
        x = F.interpolate(x, size=size, mode="area")
    linear = LINEAR_MAPS.get(int(channels))
    if linear is not None:
        factors = torch.tensor(linear[0], dtype=torch.float32)
        bias = torch.tensor(linear[1], dtype=torch.float32)
        rgb = torch.einsum("nchw,ck->nhwk", x, factors) + bias
        unit = (rgb.clamp(-1.0, 1.0) + 1.0) / 2.0
    else:
        unit = _first_channels(x)
    out = (unit * 255.0).round().to(torch.uint8).numpy()
    return [np.ascontiguousarray(img) for img in out]


def _first_channels(x: torch.Tensor) -> torch.Tensor:
    """The fallback: channels 0, 1, 2 (repeated when fewer) as RGB, min-max stretched per
    channel and picture; a flat channel is mid-grey."""
    idx = [min(i, x.shape[1] - 1) for i in range(3)]
    rgb = x[:, idx].permute(0, 2, 3, 1)  # N, h, w, 3
    lo = rgb.amin(dim=(1, 2), keepdim=True)
    hi = rgb.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    flat = span <= 1e-12
    unit = (rgb - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.full_like(unit, 0.5), unit)
