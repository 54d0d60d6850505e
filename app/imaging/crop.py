"""Bounding-box crops in the Products-10K convention: `(x, y, w, h)` in pixels of the
upright image, origin at the top-left corner.

Images may be decoded at a reduced size (`app.imaging.decode`); such an image carries the
upright size of the original file under `ORIGINAL_SIZE` in its `info`, and boxes are
validated against that size and scaled to the pixels actually held.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from PIL import Image

from app.core.errors import InvalidBox

ORIGINAL_SIZE = "vsearch.original_size"


class Box(NamedTuple):
    """A box in pixels of the upright image."""

    x: float
    y: float
    w: float
    h: float


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the upright file the image was decoded from."""
    size = image.info.get(ORIGINAL_SIZE)
    if isinstance(size, tuple) and len(size) == 2:
        return int(size[0]), int(size[1])
    return image.size


def validate_box(box: tuple[float, float, float, float], width: int, height: int) -> Box:
    """Check that `box` has a positive size and lies inside a `width` x `height` image.

    Raises:
        InvalidBox: The box is empty, not finite, or reaches outside the image.
    """
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError, OverflowError):
        raise InvalidBox("The box must be four finite numbers x, y, w, h.") from None
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
    the crop always covers the box; a crop is never empty.
    """
    if box is None:
        return image
    width, height = original_size(image)
    b = validate_box(box, width, height)
    sx, sy = image.width / width, image.height / height
    left = min(image.width - 1, math.floor(b.x * sx))
    top = min(image.height - 1, math.floor(b.y * sy))
    right = max(left + 1, min(image.width, math.ceil((b.x + b.w) * sx)))
    bottom = max(top + 1, min(image.height, math.ceil((b.y + b.h) * sy)))
    return image.crop((left, top, right, bottom))
