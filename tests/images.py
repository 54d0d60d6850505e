"""Real images made by the tests: structured pixels (not flat colours), in any format."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def pattern(width: int = 96, height: int = 80, seed: int = 0) -> Image.Image:
    """An RGB image with gradients, blocks and noise; different seeds differ clearly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    f1, f2 = rng.uniform(3, 15, size=2)
    base = np.stack(
        [
            127 + 100 * np.sin(xx / f1 + seed),
            127 + 100 * np.cos(yy / f2 - seed),
            255 * (xx + yy) / (width + height),
        ],
        axis=-1,
    )
    blocks = rng.integers(0, 255, size=(4, 4, 3)).repeat(height // 4 + 1, 0)
    blocks = blocks.repeat(width // 4 + 1, 1)[:height, :width]
    arr = 0.6 * base + 0.4 * blocks + rng.normal(0, 6, size=base.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()
