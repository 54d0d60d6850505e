"""Turn untrusted bytes into an upright RGB `PIL.Image`, or fail with a 4xx error.

Only JPEG, PNG, WebP and GIF (first frame) are accepted. The pixel cap is checked on
the header, before any pixel is decoded, so a tiny file that claims huge dimensions
costs nothing. Decompression-bomb warnings are errors.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from app.core.errors import ImageTooLarge, ImageUndecodable

LOG = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

# Truncated files must fail, not decode to grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SRGB: Any
try:
    _SRGB = ImageCms.createProfile("sRGB")
except (OSError, ImageCms.PyCMSError):  # pragma: no cover - littlecms always ships with Pillow
    _SRGB = None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode image bytes into an upright RGB image.

    Args:
        data: The file's bytes.
        max_pixels: Largest width * height accepted.

    Returns:
        An RGB image with its EXIF orientation applied.

    Raises:
        ImageTooLarge: The image has more than `max_pixels` pixels.
        ImageUndecodable: The bytes are not a complete JPEG/PNG/WebP/GIF image.
    """
    if not data:
        raise ImageUndecodable("The image is empty.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": not fatal
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except UnidentifiedImageError:
            raise ImageUndecodable(
                "The image is not a JPEG, PNG, WebP or GIF file, or it is corrupt."
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(f"The image has more than {max_pixels} pixels.") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageUndecodable(f"The image could not be read: {exc}") from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageUndecodable("The image has no pixels.")
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"The image is {width}x{height} pixels; at most {max_pixels} pixels are accepted."
            )
        try:
            # Frame 0 is current after open; `n_frames` would walk every frame of an
            # animation (thousands in a hostile GIF), so it is never asked for.
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(f"The image has more than {max_pixels} pixels.") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
            raise ImageUndecodable(f"The image data is truncated or corrupt: {exc}") from None
    return to_rgb(apply_exif_orientation(image))


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip the image as its EXIF orientation says; corrupt EXIF is ignored."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data"
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - hostile EXIF must not fail an otherwise good image
        LOG.debug("ignoring unreadable EXIF block")
        return image
    if orientation in (None, 1):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        LOG.debug("ignoring invalid EXIF orientation %r", orientation)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or black backgrounds.

    Transparent pixels are composited on white (product photos are shot on white),
    16-bit images are scaled to 8 bits rather than clipped, and CMYK uses the embedded
    ICC profile when there is one.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.size and float(np.nanmax(values)) <= 1.0 else 1.0
        grey = np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if mode == "CMYK":
        icc = image.info.get("icc_profile")
        if icc and _SRGB is not None:
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                converted = ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
                if converted is not None:
                    return converted
            except (OSError, ImageCms.PyCMSError, ValueError):
                LOG.debug("CMYK image has an unusable ICC profile; converting without it")
        return image.convert("RGB")
    return image.convert("RGB")
