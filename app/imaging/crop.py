"""Bounding-box crops in the Products-10K convention: `(x, y, w, h)` in pixels of the
upright image, origin at the top-left corner."""

from __future__ import annotations

import math
from typing import NamedTuple

from PIL import Image

from app.core.errors import InvalidBox


class Box(NamedTuple):
    """A box in pixels of the upright image."""

    x: float
    y: float
    w: float
    h: float


def validate_box(box: tuple[float, float, float, float], width: int, height: int) -> Box:
    """Check that `box` has a positive size and lies inside a `width` x `height` image.

    Raises:
        InvalidBox: The box is empty, not finite, or reaches outside the image.
    """
    x, y, w, h = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise InvalidBox("The box must be four finite numbers x, y, w, h.")
    if w <= 0 or h <= 0:
        raise InvalidBox(f"The box must have a positive width and height, got w={w:g}, h={h:g}.")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise InvalidBox(
            f"The box (x={x:g}, y={y:g}, w={w:g}, h={h:g}) reaches outside the "
            f"{width}x{height} image."
        )
    return Box(x, y, w, h)


def crop(image: Image.Image, box: tuple[float, float, float, float] | None) -> Image.Image:
    """Crop `image` to `box`; `None` returns the image unchanged.

    Fractional boxes are widened to whole pixels (floor of the start, ceil of the end), so
    the crop always covers the box.
    """
    if box is None:
        return image
    b = validate_box(box, image.width, image.height)
    left, top = math.floor(b.x), math.floor(b.y)
    right = min(image.width, math.ceil(b.x + b.w))
    bottom = min(image.height, math.ceil(b.y + b.h))
    return image.crop((left, top, right, bottom))
