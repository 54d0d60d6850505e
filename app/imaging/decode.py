"""Turn untrusted bytes into an upright RGB `PIL.Image`, or fail with a 4xx error.

Only JPEG, PNG, WebP and GIF (first frame) are accepted. What one image may cost is
bounded before and while it is decoded:

- the pixel cap is checked on the header, before any pixel is decoded, so a tiny file
  that claims huge dimensions costs nothing; decompression-bomb warnings are errors;
- a JPEG with more scans than `max_scans` is refused before decoding: each scan walks
  the whole coefficient buffer, so a 100 KB progressive file of thousands of tiny scans
  would otherwise cost seconds of CPU;
- with `decode_size`, JPEGs are decoded at a reduced DCT scale (`Image.draft`) and other
  formats are box-reduced right after decoding, per axis, to no less than `decode_size`
  pixels (the model looks at 224), so what is kept in memory is small; the original's
  upright size travels in `info` for boxes (`app.imaging.crop`);
- 16-bit and float images are brought to 8 bits a strip at a time, never through a
  full-size float64 copy;
- a `PixelBudget` caps the pixels decoded for one request, whatever the number of images.

`ImageDecoder` runs decodes on a small pool of its own, so hostile files queue among
themselves instead of occupying the executor that database calls share, and a caller
waits at most `timeout_s` for its result.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from app.core.errors import ImageTooLarge, ImageUndecodable, Overloaded
from app.imaging.crop import ORIGINAL_SIZE

if TYPE_CHECKING:
    from app.core.config import ImageSettings

LOG = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
DEFAULT_MAX_SCANS = 32
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK"})
_JPEG_SOS = b"\xff\xda"
_STRIP_ROWS = 256

# Truncated files must fail, not decode to grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SRGB: Any
try:
    _SRGB = ImageCms.createProfile("sRGB")
except (OSError, ImageCms.PyCMSError):  # pragma: no cover - littlecms always ships with Pillow
    _SRGB = None


class PixelBudget:
    """Pixels one request may decode, over all of its images (thread-safe)."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.used = 0
        self._lock = threading.Lock()

    def charge(self, pixels: int) -> None:
        """Count `pixels` about to be decoded, or raise ImageTooLarge past the budget."""
        with self._lock:
            if self.used + pixels > self.max_pixels:
                raise ImageTooLarge(
                    f"The images of this request would decode to more than {self.max_pixels} "
                    "pixels in total; send fewer or smaller images per request."
                )
            self.used += pixels


# The budget of the request being served; set per HTTP request by `app.api.limits`.
request_pixel_budget: ContextVar[PixelBudget | None] = ContextVar(
    "request_pixel_budget", default=None
)


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000
    max_scans: int = DEFAULT_MAX_SCANS
    decode_size: int | None = 512
    timeout_s: float = 10.0
    threads: int = 2

    @classmethod
    def from_settings(cls, image: ImageSettings) -> DecodeLimits:
        return cls(
            max_pixels=image.max_pixels,
            max_scans=image.max_jpeg_scans,
            decode_size=image.decode_size,
            timeout_s=image.decode_timeout_s,
            threads=image.decode_threads,
        )


class ImageDecoder:
    """Decodes on its own bounded thread pool, with deadlines for queueing and decoding.

    The pool's threads run at a lower CPU priority (nice +10, per thread on Linux): a
    burst of expensive but legal images then slows other decodes, not the event loop or
    the threads that answer `GET /products`.
    """

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self._pool = ThreadPoolExecutor(
            limits.threads, thread_name_prefix="image-decode", initializer=_lower_priority
        )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def decode_all(self, payloads: Sequence[bytes]) -> list[Image.Image]:
        """Decode several images; the first failure cancels the decodes not yet started."""
        tasks = [asyncio.ensure_future(self.decode(data)) for data in payloads]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def decode(self, data: bytes) -> Image.Image:
        """`decode_image` on the decode pool, charged to the current request's budget.

        Raises:
            ImageTooLarge, ImageUndecodable: As `decode_image`; ImageUndecodable also when
                decoding took longer than `timeout_s`.
            Overloaded: The decode pool was too busy to start within `timeout_s`.
        """
        limits = self.limits
        budget = request_pixel_budget.get()  # read here: pool threads do not see contextvars
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def run() -> Image.Image:
            loop.call_soon_threadsafe(_settle, started)
            return decode_image(
                data,
                max_pixels=limits.max_pixels,
                max_scans=limits.max_scans,
                decode_size=limits.decode_size,
                budget=budget,
            )

        future = loop.run_in_executor(self._pool, run)
        try:
            # Queueing and decoding each get `timeout_s`: a decode is not charged for the
            # time it waited behind others.
            try:
                await asyncio.wait_for(asyncio.shield(started), limits.timeout_s)
            except TimeoutError:
                raise Overloaded("The image decoder is busy; try again shortly.") from None
            try:
                return await asyncio.wait_for(asyncio.shield(future), limits.timeout_s)
            except TimeoutError:
                raise ImageUndecodable(
                    f"The image took longer than {limits.timeout_s:g} s to decode."
                ) from None
        finally:
            future.cancel()  # a no-op once it has run; drops it from the queue otherwise


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # pragma: no cover - not Linux, or not permitted
        LOG.debug("could not lower the decode threads' priority")


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    max_scans: int = DEFAULT_MAX_SCANS,
    decode_size: int | None = None,
    budget: PixelBudget | None = None,
) -> Image.Image:
    """Decode image bytes into an upright RGB image.

    Args:
        data: The file's bytes.
        max_pixels: Largest width * height accepted.
        max_scans: Most JPEG scans accepted.
        decode_size: Reduce while decoding, per axis, to no less than this many pixels
            (None: full resolution). A reduced image records its original upright size.
        budget: Charged with the pixels actually decoded.

    Returns:
        An RGB image with its EXIF orientation applied.

    Raises:
        ImageTooLarge: The image has more than `max_pixels` pixels, or the budget is spent.
        ImageUndecodable: The bytes are not a complete JPEG/PNG/WebP/GIF image, or a JPEG
            has more than `max_scans` scans.
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
        if image.format == "JPEG":
            # Every scan starts with an SOS marker, and entropy-coded data never contains
            # FF DA (0xFF is stuffed), so this count is an upper bound of the scans.
            scans = data.count(_JPEG_SOS)
            if scans > max_scans:
                raise ImageUndecodable(
                    f"The JPEG has {scans} scans; at most {max_scans} are accepted."
                )
            if decode_size is not None:
                image.draft(image.mode, (decode_size, decode_size))
        if budget is not None:
            budget.charge(image.width * image.height)
        try:
            # Frame 0 is current after open; `n_frames` would walk every frame of an
            # animation (thousands in a hostile GIF), so it is never asked for.
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(f"The image has more than {max_pixels} pixels.") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
            raise ImageUndecodable(f"The image data is truncated or corrupt: {exc}") from None
    orientation = _orientation(image)
    held: Image.Image = image if decode_size is None else _reduce(image, decode_size)
    upright = apply_exif_orientation(held)
    rgb = to_rgb(upright)
    if rgb.size != (width, height):
        swapped = upright is not held and orientation in _TRANSPOSING_ORIENTATIONS
        rgb.info[ORIGINAL_SIZE] = (height, width) if swapped else (width, height)
    return rgb


def _reduce(image: Image.Image, size: int) -> Image.Image:
    """Box-reduce by whole factors per axis, keeping at least `size` pixels on each."""
    fx, fy = max(1, image.width // size), max(1, image.height // size)
    if fx == 1 and fy == 1:
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        image = _to_grey8(image)
    elif image.mode not in _REDUCIBLE_MODES:
        image = to_rgb(image)
    reduced = image.reduce((fx, fy))
    reduced.info = dict(image.info)
    return reduced


def _orientation(image: Image.Image) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data"
            value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - hostile EXIF must not fail an otherwise good image
        return 1
    return value if isinstance(value, int) else 1


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip the image as its EXIF orientation says; corrupt EXIF is ignored."""
    orientation = _orientation(image)
    if orientation == 1:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        LOG.debug("ignoring invalid EXIF orientation %r", orientation)
        return image


def _to_grey8(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float grey to 8-bit "L", a strip of rows at a time.

    Integer images are scaled (65535 -> 255, rounded), not clipped; float images in [0, 1]
    are scaled by 255, others clipped. Memory beyond the output is one strip.
    """
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    scale = 255.0 if image.mode == "F" and _float_max(image) <= 1.0 else 1.0
    for top in range(0, height, _STRIP_ROWS):
        strip = np.asarray(image.crop((0, top, width, min(height, top + _STRIP_ROWS))))
        if image.mode == "F":
            values = np.nan_to_num(strip.astype(np.float32, copy=False)) * scale
            out[top : top + strip.shape[0]] = np.clip(np.rint(values), 0, 255)
        else:
            # round(v / 257) without floats: v / 257 is never exactly k + 0.5.
            levels = (strip.astype(np.int64) + 128) // 257
            out[top : top + strip.shape[0]] = np.clip(levels, 0, 255)
    grey = Image.fromarray(out, "L")
    grey.info = dict(image.info)
    return grey


def _float_max(image: Image.Image) -> float:
    extrema = image.getextrema()
    high = extrema[1] if isinstance(extrema, tuple) else extrema
    return float(high) if isinstance(high, int | float) else 0.0


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or black backgrounds.

    Transparent pixels are composited on white (product photos are shot on white),
    16-bit images are scaled to 8 bits rather than clipped, and CMYK uses the embedded
    ICC profile when there is one.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return _to_grey8(image).convert("RGB")
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
