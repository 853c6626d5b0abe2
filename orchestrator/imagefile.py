"""PNG encoding of generated images and the file names multi-image outputs get."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> npt.NDArray[np.uint8]:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def output_paths(out: Path, count: int) -> list[Path]:
    """x.png for one image; x.png, x-1.png, x-2.png ... for several."""
    if count == 1:
        return [out]
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count)]
