"""A corpus of broken and malicious image files, built from bytes at test time.

Each entry: name -> (bytes, the statuses the service may answer). Everything must be a
4xx (or a 200 for the few valid-but-odd files), in bounded time and memory.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Any

from PIL import Image

from tests.images import encode, pattern

UNDECODABLE = {422}
TOO_LARGE = {413}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int, rows: int = 1) -> bytes:
    """A PNG claiming width x height pixels whose data holds only `rows` rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = (b"\x00" + b"\x00" * width) * rows
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def png_text_bomb() -> bytes:
    """A valid 8x8 PNG with a zTXt chunk that inflates to 256 MB."""
    base = encode(Image.new("L", (8, 8)), "PNG")
    bomb = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (256 * 1024 * 1024), 9))
    return base[:-12] + bomb + base[-12:]


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims another size."""
    data = bytearray(encode(pattern(32, 32), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_frames(frames: int) -> bytes:
    images = [Image.new("P", (8, 8), i % 256) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=1, loop=0)
    return buf.getvalue()


def apng_frames(frames: int) -> bytes:
    images = [Image.new("RGB", (8, 8), (i % 256, 0, 0)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "PNG", save_all=True, append_images=images[1:])
    return buf.getvalue()


def webp_canvas(width: int, height: int) -> bytes:
    """A WebP (VP8X) header announcing a huge canvas."""
    vp8x = (
        bytes([0, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    )
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


def build_corpus() -> dict[str, tuple[bytes, set[int]]]:
    jpeg = encode(pattern(200, 150), "JPEG", quality=90)
    png = encode(pattern(200, 150), "PNG")
    return {
        "png_10k_x_10k_tiny_file": (
            encode(Image.new("L", (10_000, 10_000)), "PNG", optimize=True),
            TOO_LARGE,
        ),
        "png_header_65535_square": (png_with_header(65_535, 65_535), TOO_LARGE),
        "png_header_1_x_2_billion": (png_with_header(1, 2_000_000_000), TOO_LARGE),
        # A complete zlib stream that ends after 3 of 2,000 rows: Pillow reads the rest as
        # zeros, so this one may also be accepted (a valid, mostly black image).
        "png_rows_missing": (png_with_header(2_000, 2_000, rows=3), UNDECODABLE | {200}),
        "png_ztxt_bomb": (png_text_bomb(), UNDECODABLE),
        "jpeg_header_65500_square": (jpeg_with_size(65_500, 65_500), TOO_LARGE),
        "jpeg_truncated": (jpeg[: len(jpeg) // 2], UNDECODABLE),
        "jpeg_only_magic": (b"\xff\xd8\xff\xe0" + os.urandom(2000), UNDECODABLE),
        "jpeg_corrupt_exif": (
            encode(
                pattern(64, 64), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x00" * 64
            ),
            {200},
        ),
        "png_truncated": (png[: len(png) * 2 // 3], UNDECODABLE),
        "gif_3000_frames": (gif_frames(3000), {200}),
        "apng_2000_frames": (apng_frames(2000), {200}),
        "gif_header_65535_square": (
            b"GIF89a" + struct.pack("<HH", 65_535, 65_535) + b"\x00\x00\x00" + b";",
            TOO_LARGE | UNDECODABLE,
        ),
        "webp_canvas_16383_square": (webp_canvas(16_383, 16_383), TOO_LARGE | UNDECODABLE),
        "png_named_jpg": (png, {200}),
        "html_named_jpg": (b"<html><body>not an image</body></html>", UNDECODABLE),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>', UNDECODABLE),
        "bmp": (encode(pattern(32, 32), "BMP"), UNDECODABLE),
        "tiff": (encode(pattern(32, 32), "TIFF"), UNDECODABLE),
        "empty": (b"", UNDECODABLE),
        "one_byte": (b"\xff", UNDECODABLE),
        "random_1mb": (os.urandom(1_000_000), UNDECODABLE),
    }


async def run_corpus(client: Any) -> dict[str, Any]:
    """Send every file through POST /search and POST /products while another client
    probes /health; returns per-file statuses and times, probe latencies, memory growth."""
    import asyncio
    import resource
    import time

    corpus = build_corpus()
    probes: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            await client.get("/health")
            probes.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)

    prober = asyncio.create_task(probe())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    files: dict[str, dict[str, Any]] = {}
    try:
        for n, (name, (data, allowed)) in enumerate(corpus.items()):
            t0 = time.perf_counter()
            upload = {"image": (f"{name}.jpg", data, "image/jpeg")}
            search = await client.post("/search", files=upload)
            ingest = await client.post("/products", data={"id": f"h{n}"}, files=upload)
            elapsed = time.perf_counter() - t0
            status = ingest.status_code
            if status == 200:
                result = ingest.json()["results"][0]
                if result["status"] == "failed":
                    codes = {"image_undecodable": 422, "image_too_large": 413}
                    status = codes.get(result["error"]["code"], 500)
            files[name] = {
                "bytes": len(data),
                "search": search.status_code,
                "ingest": status,
                "allowed": sorted(allowed),
                "seconds": round(elapsed, 3),
            }
    finally:
        stop.set()
        await prober
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - peak_before
    return {
        "files": files,
        "max_seconds": max(f["seconds"] for f in files.values()),
        "peak_memory_growth_mb": round(growth, 1),
        "health_probes": len(probes),
        "max_probe_ms": round(max(probes) * 1000, 1) if probes else None,
        "unexpected": [
            n
            for n, f in files.items()
            if f["search"] not in f["allowed"] or f["ingest"] not in f["allowed"]
        ],
    }


def main() -> None:
    """python -m tests.reliability.hostile_images: the corpus against the in-process app."""
    import asyncio
    import json
    import tempfile
    from pathlib import Path

    import httpx

    from app.core.config import Settings
    from app.inference.builders import init_random
    from app.main import create_app

    async def run(tmp: Path) -> dict[str, Any]:
        model = init_random(tmp / "model", backbone="convnext_atto", input_size=64)
        app = create_app(Settings(model=str(model), data_dir=tmp / "data", precision="fp32"))
        app.state.vs.exit_on_start_failure = False
        async with app.router.lifespan_context(app):
            await app.state.vs.wait_started()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await run_corpus(client)

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run(Path(tmp))), indent=2))


if __name__ == "__main__":
    main()
