"""`vsearch bench embed`: the inference path against the model card's loop, side by side.

All figures come from one run on the same images:

- `reference`: the card's code, one image at a time, fp32 (decode included);
- `worker_bs{N}`: the service's own path with max batch N and C concurrent callers: its
  image decoder (decode pool at lowered priority, reduced decoding) and its BatchWorker,
  warmed up at batch 1 and N as the service starts; plus the worst cosine of its
  embeddings against the reference;
- `model_bs{N}`: the forward pass alone on ready tensors at the fastest worker row's batch
  size: that row's ceiling;
- `worker_bs{N}_openvino`, `model_bs{N}_openvino`: the same with the forward pass on
  OpenVINO's CPU runtime (`VS_RUNTIME=openvino`), where OpenVINO is installed;
- `machine`: the model's GFLOPs per image and, unless skipped, measured GEMM throughput
  (fp32, bf16; fp32 also through OpenVINO where installed, the roofline then being the
  faster of the two), so each throughput is also given as a fraction of the roofline for
  its precision.

Every model the CLI writes runs: the card's flatten head through the card's own class, the
pooled heads (`init-pretrained`, trained pooled models) through the service's module in the
card's loop.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from app.core.errors import InvalidRequest
from app.imaging.decode import DecodeLimits, ImageDecoder
from app.inference.architecture import ModelConfig, TYArcFace
from app.inference.loading import CONFIG_FILE, load_module, resolve_model_dir
from app.inference.openvino_runtime import openvino_gemm_gflops, openvino_version
from app.inference.precision import cpu_supports_bf16
from app.inference.runtime import Embedder, load_model
from app.inference.worker import BatchWorker

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def image_files(root: Path) -> list[Path]:
    """Image files under `root` (recursively, sorted); an error when there are none."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidRequest(
            f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def load_image_bytes(count: int, images_dir: Path | None) -> list[bytes]:
    """`count` encoded images: files from `images_dir` (sorted, cycled) or synthetic JPEGs."""
    if images_dir is not None:
        files = image_files(images_dir)
        return [files[i % len(files)].read_bytes() for i in range(count)]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        h, w = int(rng.integers(300, 700)), int(rng.integers(300, 700))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        arr = np.stack(
            [
                127 + 120 * np.sin(xx / (7 + i % 13)),
                127 + 120 * np.cos(yy / (5 + i % 11)),
                rng.random((h, w)) * 255,
            ],
            axis=-1,
        )
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def gemm_gflops(dtype: torch.dtype, seconds: float = 1.5) -> float:
    """Sustained matrix-multiply GFLOP/s on this machine (best of sizes 1024/2048/4096)."""
    best = 0.0
    for n in (1024, 2048, 4096):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def model_gflops(config: ModelConfig) -> float:
    """Forward-pass GFLOPs per image (multiply-add counted as 2).

    Counted on a copy built on the meta device: shapes only, so no weights are initialised
    (half a minute for ConvNeXt-Base on two cores) and the served module is left alone.
    """
    with torch.device("meta"):
        module = TYArcFace(config).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            module(torch.zeros(1, 3, config.input_size, config.input_size))
    return counter.get_total_flops() / 1e9


def run_reference(model_dir: Path, images: list[bytes]) -> tuple[float, np.ndarray]:
    """The card's one-image fp32 loop: images/s and its embeddings."""
    from app.benchmarks.reference import CardPipeline

    config = ModelConfig.from_file(model_dir / CONFIG_FILE)
    pipe = CardPipeline(
        model_dir, None if config.head == "flatten" else load_module(model_dir).module
    )
    pipe.embed_one(Image.open(io.BytesIO(images[0])))
    rows = []
    start = time.perf_counter()
    for data in images:
        rows.append(pipe.embed_one(Image.open(io.BytesIO(data))).numpy())
    elapsed = time.perf_counter() - start
    return len(images) / elapsed, np.stack(rows)


def run_worker(
    embedder: Embedder,
    images: list[bytes],
    *,
    max_size: int,
    callers: int,
    max_wait_ms: float,
    preprocess_threads: int,
) -> tuple[float, np.ndarray, float]:
    """Throughput with `callers` concurrent requests, as the service runs them: an event
    loop, the service's image decoder, one image per request through `BatchWorker.embed`,
    after the service's start-up warm-up (batch 1 and `max_size`: a compiled model
    specialises some batch ranges on first use)."""
    embedder.warmup(sorted({1, max_size}))
    worker = BatchWorker(
        embedder,
        max_size=max_size,
        max_wait_ms=max_wait_ms,
        queue_size=max(len(images), 1024),
        preprocess_threads=preprocess_threads,
    )
    decoder = ImageDecoder(DecodeLimits())
    worker.start()
    out = np.zeros((len(images), embedder.embedding_dim), dtype=np.float32)

    async def request(i: int, limit: asyncio.Semaphore) -> None:
        async with limit:
            image = await decoder.decode(images[i])
            out[i] = (await worker.embed([image]))[0]

    async def load() -> float:
        limit = asyncio.Semaphore(callers)
        await asyncio.gather(*(request(i, limit) for i in range(min(max_size, 4))))
        worker.stats.batch_sizes.clear()
        start = time.perf_counter()
        await asyncio.gather(*(request(i, limit) for i in range(len(images))))
        return time.perf_counter() - start

    try:
        elapsed = asyncio.run(load())
        sizes = worker.stats.batch_sizes
        mean_batch = float(np.mean(sizes)) if sizes else 0.0
    finally:
        worker.shutdown()
        decoder.shutdown()
    return len(images) / elapsed, out, mean_batch


def run_model_only(embedder: Embedder, batch_size: int, n_images: int) -> float:
    """Images/s of the forward pass alone on ready tensors, `n_images` in batches."""
    size = embedder.config.input_size
    batch = torch.randn(batch_size, 3, size, size)
    embedder.forward(batch)
    rounds = max(1, -(-n_images // batch_size))
    start = time.perf_counter()
    for _ in range(rounds):
        embedder.forward(batch)
    return rounds * batch_size / (time.perf_counter() - start)


def run_embed_benchmark(
    model: str | Path,
    *,
    n_images: int = 64,
    images_dir: Path | None = None,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    callers: int = 16,
    device: str = "auto",
    precision: str = "auto",
    max_wait_ms: float = 5.0,
    preprocess_threads: int = 2,
    compile_model: bool = True,
    openvino: bool = True,
    roofline: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark on `model` (a model directory or hub id); returns the figures.

    Raises:
        InvalidRequest: An image count, batch size or caller count below 1, or no images.
        ModelLoadError: The model cannot be loaded.
    """
    if n_images < 1 or callers < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise InvalidRequest(
            "images, callers and every batch size must be at least 1 (got "
            f"{n_images} images, {callers} callers, batch sizes {list(batch_sizes)})"
        )
    say = progress or (lambda _msg: None)
    images = load_image_bytes(n_images, images_dir)
    model_dir, _ = resolve_model_dir(str(model))
    embedder = load_model(model_dir, device=device, precision=precision)
    say(f"reference loop on {n_images} images")
    ref_ips, ref_rows = run_reference(model_dir, images)
    rows: list[dict[str, Any]] = [
        {"name": "reference", "precision": "fp32", "images_per_s": round(ref_ips, 3)}
    ]

    def measure(suffix: str, embedder: Embedder) -> None:
        fastest = (0.0, batch_sizes[0])
        for bs in batch_sizes:
            say(f"worker{suffix}, batch {bs}, {callers} callers")
            ips, out, mean_batch = run_worker(
                embedder,
                images,
                max_size=bs,
                callers=callers,
                max_wait_ms=max_wait_ms,
                preprocess_threads=preprocess_threads,
            )
            rows.append(
                {
                    "name": f"worker_bs{bs}{suffix}",
                    "precision": embedder.precision,
                    "images_per_s": round(ips, 3),
                    "speedup_vs_reference": round(ips / ref_ips, 3),
                    "mean_batch": round(mean_batch, 2),
                    "min_cosine_vs_reference": round(float(np.min(np.sum(out * ref_rows, 1))), 6),
                }
            )
            fastest = max(fastest, (ips, bs))
        # the ceiling of the fastest worker row: the same batch size without the service
        bs = fastest[1]
        say(f"model only{suffix}, batch {bs}")
        ips = run_model_only(embedder, bs, n_images)
        rows.append(
            {
                "name": f"model_bs{bs}{suffix}",
                "precision": embedder.precision,
                "images_per_s": round(ips, 3),
                "speedup_vs_reference": round(ips / ref_ips, 3),
                "mean_batch": bs,
            }
        )

    measure("", embedder)
    compile_s: float | None = None
    if compile_model:
        say("torch.compile (about a minute for large models)")
        started = time.perf_counter()
        if embedder.compile():
            compile_s = round(time.perf_counter() - started, 1)
            measure("_compiled", embedder)
    openvino_s: float | None = None
    openvino_model: dict[str, Any] | None = None
    if openvino and embedder.device.type == "cpu" and openvino_version() is not None:
        say("OpenVINO conversion (seconds; longer on a busy machine)")
        # a model of its own, converted from exact fp32 weights, its precision settled on
        # OpenVINO's timings (as the service does with VS_RUNTIME=openvino)
        started = time.perf_counter()
        on_openvino = load_model(model_dir, device=device, precision=precision, runtime="openvino")
        if on_openvino.runtime == "openvino":
            openvino_s = round(time.perf_counter() - started, 1)
            openvino_model = on_openvino.describe()
            measure("_openvino", on_openvino)
    flops = model_gflops(embedder.config)
    machine: dict[str, float] = {"model_gflops_per_image": round(flops, 3)}
    if roofline:
        say("machine roofline")
        gemm = {"fp32": gemm_gflops(torch.float32)}
        machine["gemm_gflops_fp32_torch"] = round(gemm["fp32"], 1)
        # Without native bf16 (AVX2 only) a bf16 GEMM is emulated: minutes for the 4096
        # size, and no row runs in bf16 unless asked for.
        if cpu_supports_bf16() or any(row["precision"] == "bf16" for row in rows):
            gemm["bf16"] = gemm_gflops(torch.bfloat16)
            machine["gemm_gflops_bf16"] = round(gemm["bf16"], 1)
        if openvino_s is not None:
            ov_fp32 = openvino_gemm_gflops()
            machine["gemm_gflops_fp32_openvino"] = round(ov_fp32, 1)
            gemm["fp32"] = max(gemm["fp32"], ov_fp32)
        machine["gemm_gflops_fp32"] = round(gemm["fp32"], 1)
        for row in rows:
            peak = gemm.get(row["precision"], gemm["fp32"])
            row["roofline_images_per_s"] = round(peak / flops, 3)
            row["fraction_of_roofline"] = round(row["images_per_s"] * flops / peak, 3)
    best = max((r for r in rows if r["name"].startswith("worker")), key=lambda r: r["images_per_s"])
    return {
        "model": embedder.describe(),
        "images": n_images,
        "callers": callers,
        "torch_threads": torch.get_num_threads(),
        "compile_s": compile_s,
        "openvino_convert_s": openvino_s,
        "model_openvino": openvino_model,
        "machine": machine,
        "rows": rows,
        "best": {
            "name": best["name"],
            "speedup_vs_reference": best["speedup_vs_reference"],
            "fraction_of_roofline": best.get("fraction_of_roofline"),
        },
    }
