from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core.errors import ImageTooLarge, ImageUndecodable, InvalidBox
from app.imaging.crop import crop
from app.imaging.decode import decode_image, to_rgb
from tests.images import encode, pattern

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
