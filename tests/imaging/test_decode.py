from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core.errors import ImageTooLarge, ImageUndecodable, InvalidBox, Overloaded
from app.imaging import decode as decode_mod
from app.imaging.crop import crop, original_size
from app.imaging.decode import DecodeLimits, ImageDecoder, PixelBudget, decode_image, to_rgb
from tests.images import encode, pattern
from tests.reliability.hostile_images import jpeg_many_scans

REPO = Path(__file__).resolve().parents[2]

MP40 = 40_000_000


def _exif_rotated_jpeg(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


class TestDecodeImage:
    @pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
    def test_accepted_formats(self, fmt: str) -> None:
        image = decode_image(encode(pattern(64, 48), fmt), max_pixels=MP40)
        assert image.mode == "RGB"
        assert image.size == (64, 48)

    @pytest.mark.parametrize("fmt", ["BMP", "TIFF", "ICO"])
    def test_other_formats_are_refused(self, fmt: str) -> None:
        with pytest.raises(ImageUndecodable):
            decode_image(encode(pattern(32, 32), fmt), max_pixels=MP40)

    def test_not_an_image(self) -> None:
        with pytest.raises(ImageUndecodable):
            decode_image(b"<html>hello</html>", max_pixels=MP40)
        with pytest.raises(ImageUndecodable):
            decode_image(b"", max_pixels=MP40)

    def test_truncated_jpeg(self) -> None:
        data = encode(pattern(256, 256), "JPEG", quality=95)
        with pytest.raises(ImageUndecodable, match="truncated or corrupt"):
            decode_image(data[: len(data) // 2], max_pixels=MP40)

    def test_huge_dimensions_in_a_tiny_png_are_refused_before_decoding(self) -> None:
        data = encode(Image.new("L", (10_000, 10_000)), "PNG", optimize=True)
        assert len(data) < 200_000
        started = time.perf_counter()
        with pytest.raises(ImageTooLarge, match="40000000 pixels"):
            decode_image(data, max_pixels=MP40)
        assert time.perf_counter() - started < 1.0

    def test_pixel_cap_is_configurable(self) -> None:
        data = encode(pattern(100, 100), "PNG")
        decode_image(data, max_pixels=10_000)
        with pytest.raises(ImageTooLarge):
            decode_image(data, max_pixels=9_999)

    def test_gif_uses_the_first_frame(self) -> None:
        frames = [Image.new("RGB", (40, 30), c) for c in ("red", "lime", "blue")]
        data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
        image = decode_image(data, max_pixels=MP40)
        assert image.getpixel((5, 5)) == (255, 0, 0)

    @pytest.mark.parametrize(
        ("orientation", "transpose"),
        [
            (3, Image.Transpose.ROTATE_180),
            (6, Image.Transpose.ROTATE_270),
            (8, Image.Transpose.ROTATE_90),
        ],
    )
    def test_exif_orientation_is_applied(self, orientation: int, transpose: int) -> None:
        source = pattern(80, 40, seed=2)
        image = decode_image(_exif_rotated_jpeg(source, orientation), max_pixels=MP40)
        upright = decode_image(encode(source, "JPEG", quality=95), max_pixels=MP40)
        expected = upright.transpose(Image.Transpose(transpose))
        assert image.size == expected.size
        assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 2

    def test_corrupt_exif_does_not_fail_a_good_image(self) -> None:
        data = encode(pattern(40, 40), "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
        assert decode_image(data, max_pixels=MP40).size == (40, 40)


class TestToRgb:
    def test_transparent_png_is_composited_on_white(self) -> None:
        rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
        rgba.putpixel((0, 0), (0, 0, 255, 255))
        image = decode_image(encode(rgba, "PNG"), max_pixels=MP40)
        assert image.getpixel((5, 5)) == (255, 255, 255)
        assert image.getpixel((0, 0)) == (0, 0, 255)

    def test_palette_with_transparency(self) -> None:
        palette = Image.new("P", (8, 8), 0)
        palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
        palette.putpixel((1, 1), 1)
        image = decode_image(encode(palette, "PNG", transparency=0), max_pixels=MP40)
        assert image.getpixel((0, 0)) == (255, 255, 255)
        assert image.getpixel((1, 1)) == (200, 10, 10)

    def test_sixteen_bit_grey_is_scaled_not_clipped(self) -> None:
        values = np.array([[0, 257 * 100, 65535, 30000]], dtype=np.uint16)
        png = encode(Image.fromarray(values), "PNG")
        image = decode_image(png, max_pixels=MP40)
        row = [image.getpixel((x, 0))[0] for x in range(4)]
        assert row == [0, 100, 255, round(30000 / 257)]

    def test_cmyk_jpeg(self) -> None:
        cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red ink
        image = decode_image(encode(cmyk, "JPEG", quality=100), max_pixels=MP40)
        r, g, b = image.getpixel((8, 8))
        assert r > 200
        assert g < 60
        assert b < 60

    def test_grey_and_bilevel(self) -> None:
        assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
        assert to_rgb(Image.new("1", (4, 4), 1)).getpixel((0, 0)) == (255, 255, 255)


class TestCrop:
    def test_crop_in_pixels_of_the_upright_image(self) -> None:
        image = pattern(100, 50)
        out = crop(image, (10, 20, 30, 25))
        assert out.size == (30, 25)
        assert out.getpixel((0, 0)) == image.getpixel((10, 20))

    def test_fractional_box_covers_the_box(self) -> None:
        assert crop(pattern(100, 50), (10.5, 0.2, 20.0, 10.0)).size == (21, 11)

    @pytest.mark.parametrize(
        "box", [(0, 0, 0, 5), (0, 0, 5, -1), (-1, 0, 5, 5), (96, 0, 5, 5), (0, 0, 100, 51)]
    )
    def test_invalid_boxes(self, box: tuple[float, float, float, float]) -> None:
        with pytest.raises(InvalidBox):
            crop(pattern(100, 50), box)

    def test_non_finite_box(self) -> None:
        with pytest.raises(InvalidBox, match="finite"):
            crop(pattern(100, 50), (float("nan"), 0, 5, 5))


def test_decode_accepts_bytes_from_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "x.webp"
    pattern(33, 21).save(path, "WEBP")
    assert decode_image(path.read_bytes(), max_pixels=MP40).size == (33, 21)


def _quadrants(width: int, height: int) -> Image.Image:
    """Four flat colours, one per quadrant, so a crop's colour says where it came from."""
    image = Image.new("RGB", (width, height), (220, 30, 30))
    image.paste((30, 200, 30), (width // 2, 0, width, height // 2))
    image.paste((30, 30, 220), (0, height // 2, width // 2, height))
    image.paste((240, 240, 240), (width // 2, height // 2, width, height))
    return image


def _mean(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0).round())


class TestBoundedWork:
    def test_jpeg_with_thousands_of_scans_is_refused_before_decoding(self) -> None:
        data = jpeg_many_scans(1500, 1500, 4000)
        assert len(data) < 100_000
        started = time.perf_counter()
        with pytest.raises(ImageUndecodable, match="scans"):
            decode_image(data, max_pixels=MP40)
        assert time.perf_counter() - started < 0.5

    def test_ordinary_progressive_jpeg_is_accepted(self) -> None:
        data = encode(pattern(300, 200), "JPEG", progressive=True)
        assert decode_image(data, max_pixels=MP40).size == (300, 200)

    def test_scan_cap_is_configurable(self) -> None:
        data = jpeg_many_scans(64, 64, 10)
        decode_image(data, max_pixels=MP40, max_scans=20)
        with pytest.raises(ImageUndecodable, match="at most 19"):
            decode_image(data, max_pixels=MP40, max_scans=19)


class TestReducedDecoding:
    @pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
    def test_large_images_are_kept_small_and_remember_their_size(self, fmt: str) -> None:
        image = decode_image(encode(_quadrants(3000, 1800), fmt), max_pixels=MP40, decode_size=512)
        assert 512 <= image.width < 1024
        assert 512 <= image.height < 1024
        assert original_size(image) == (3000, 1800)

    def test_small_images_are_untouched(self) -> None:
        image = decode_image(encode(pattern(600, 400), "PNG"), max_pixels=MP40, decode_size=512)
        assert image.size == (600, 400)
        assert original_size(image) == (600, 400)

    @pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
    def test_boxes_are_in_pixels_of_the_original(self, fmt: str) -> None:
        image = decode_image(encode(_quadrants(4000, 3000), fmt), max_pixels=MP40, decode_size=512)
        bottom_right = crop(image, (2100, 1600, 1800, 1300))
        top_left = crop(image, (0, 0, 1900, 1400))
        assert np.abs(np.subtract(_mean(bottom_right), (240, 240, 240))).max() < 12
        assert np.abs(np.subtract(_mean(top_left), (220, 30, 30))).max() < 12
        with pytest.raises(InvalidBox, match="4000x3000"):
            crop(image, (3900, 0, 200, 10))

    def test_exif_rotation_swaps_the_remembered_size(self) -> None:
        data = _exif_rotated_jpeg(_quadrants(3000, 2000), 6)  # 90 degrees clockwise
        image = decode_image(data, max_pixels=MP40, decode_size=512)
        assert original_size(image) == (2000, 3000)
        # After a clockwise turn the original top-left (red) is at the top right.
        assert _mean(crop(image, (1100, 0, 900, 1400)))[0] > 180

    def test_sixteen_bit_png_never_goes_through_float64(self) -> None:
        script = (
            "import sys; sys.path.insert(0, '.')\n"
            "from tests.reliability.hostile_images import png_sixteen_bit\n"
            "from app.imaging.decode import decode_image\n"
            "data = png_sixteen_bit(6000, 6000)\n"
            "def hwm():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status')"
            " if l.startswith('VmHWM')) // 1024\n"
            "base = hwm()\n"
            "image = decode_image(data, max_pixels=40_000_000, decode_size=512)\n"
            "print(hwm() - base, image.getpixel((0, 0))[0])\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
        )
        growth_mb, value = (int(v) for v in out.stdout.split())
        assert value == round(40_000 / 257)
        # 36 MP of 16-bit samples are 72 MB; a float64 copy alone would be 288 MB.
        assert growth_mb < 160, out.stdout


class TestPixelBudget:
    def test_budget_spans_images(self) -> None:
        budget = PixelBudget(250_000)
        data = encode(pattern(400, 400), "PNG")
        decode_image(data, max_pixels=MP40, budget=budget)
        assert budget.used == 160_000
        with pytest.raises(ImageTooLarge, match="in total"):
            decode_image(data, max_pixels=MP40, budget=budget)

    def test_jpeg_is_charged_at_its_reduced_size(self) -> None:
        budget = PixelBudget(MP40)
        decode_image(
            encode(pattern(4000, 4000), "JPEG"), max_pixels=MP40, decode_size=512, budget=budget
        )
        # DCT-scaled by 1/4 while decoding (1/8 would give 500 px, under 512).
        assert budget.used == 1000 * 1000


class TestImageDecoder:
    async def test_decodes_on_its_own_threads(self) -> None:
        decoder = ImageDecoder(DecodeLimits())
        threads: list[str] = []
        real = decode_mod.decode_image

        def spy(*args: object, **kwargs: object) -> Image.Image:
            threads.append(threading.current_thread().name)
            return real(*args, **kwargs)  # type: ignore[arg-type]

        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(decode_mod, "decode_image", spy)
                image = await decoder.decode(encode(pattern(64, 64), "PNG"))
        finally:
            decoder.shutdown()
        assert image.size == (64, 64)
        assert threads[0].startswith("image-decode")

    async def test_a_busy_pool_answers_503_instead_of_queueing_forever(self) -> None:
        decoder = ImageDecoder(DecodeLimits(threads=1, timeout_s=0.3))
        release = threading.Event()
        blocker = decoder._pool.submit(release.wait, 5)
        try:
            with pytest.raises(Overloaded):
                await decoder.decode(encode(pattern(64, 64), "PNG"))
        finally:
            release.set()
            blocker.result()
            decoder.shutdown()
