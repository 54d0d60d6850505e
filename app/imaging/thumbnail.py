"""Small WebP thumbnails of catalogue images, made once at ingest.

The review and search pages show these instead of the original URLs: a page never
hot-links a third-party host (which would leak the reviewer's address and break when
the host goes away), and a queue of hundreds of pairs loads kilobytes, not megabytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

THUMBNAIL_SIZE = 256
THUMBNAIL_QUALITY = 80
THUMBNAIL_TYPE = "image/webp"


@dataclass(frozen=True)
class Thumbnail:
    webp: bytes
    width: int
    height: int


def make_thumbnail(image: Image.Image, size: int = THUMBNAIL_SIZE) -> Thumbnail:
    """A WebP copy whose longest side is at most `size` pixels (never enlarged)."""
    small = image.convert("RGB") if image.mode != "RGB" else image.copy()
    small.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, "WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return Thumbnail(buffer.getvalue(), small.width, small.height)
