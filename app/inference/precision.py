"""Which number format the backbone runs in, and the check that keeps it honest.

`auto` tries fp16 on CUDA and bf16 on a CPU with native bf16 instructions (AVX512-BF16 or
AMX), and keeps that precision only when its embeddings agree with fp32 to cosine >=
`PRECISION_MIN_COSINE` on a fixed set of structured images and, on a CPU, when it is
faster than fp32 on those images: a CPU can list bf16 instructions and still multiply bf16
matrices slower than fp32 (measured: 169 against 320 GFLOP/s on a virtual machine whose
Xeon's AMX units were not exposed). Otherwise the backbone goes back to its exact fp32
weights. The head always runs in fp32 (`TYArcFace.forward_head`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image

from app.core.errors import ModelLoadError

if TYPE_CHECKING:
    from app.inference.runtime import Embedder

LOG = logging.getLogger(__name__)

PRECISION_MIN_COSINE = 0.999

Precision = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def candidate_precision(device: torch.device, precision: str) -> Precision:
    """The precision to try first; `auto` picks fp16 on CUDA, bf16 on capable CPUs."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ModelLoadError("fp16 is not supported on CPU; use bf16 or fp32")
        return precision  # type: ignore[return-value]
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def calibration_images(size: int, count: int = 8, seed: int = 1234) -> list[Image.Image]:
    """A fixed set of structured images (gradients, blocks, noise) for precision checks."""
    rng = np.random.default_rng(seed)
    images = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    for i in range(count):
        base = np.stack(
            [
                np.sin(xx * (i + 1) * math.pi) * 0.5 + 0.5,
                np.cos(yy * (i + 2) * math.pi) * 0.5 + 0.5,
                (xx + yy) / 2,
            ],
            axis=-1,
        )
        blocks = rng.random((4, 4, 3)).repeat(size // 4 + 1, 0).repeat(size // 4 + 1, 1)
        noise = rng.random((size, size, 3)) * 0.15
        arr = np.clip(0.55 * base + 0.35 * blocks[:size, :size] + noise, 0, 1)
        images.append(Image.fromarray((arr * 255).astype(np.uint8), "RGB"))
    return images


def timed_pass(run: Callable[[], object]) -> float:
    """Seconds one call of `run` takes (a warm pass: callers run it once before)."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def settle_precision(embedder: Embedder, wanted: Precision, *, auto: bool) -> None:
    """Move an fp32 `embedder` to `wanted`, measuring how far it strays from fp32.

    With `auto`, a precision that disagrees with fp32 (min cosine < PRECISION_MIN_COSINE)
    or, on a CPU, is not faster than fp32 (one warm pass over the calibration images each,
    a few seconds for a large model) is dropped for the exact fp32 weights; an explicitly
    requested one is kept, with a warning when it disagrees.
    """
    if wanted == "fp32":
        return
    images = calibration_images(embedder.config.input_size)
    reference = embedder.embed(images)
    timing = auto and embedder.device.type == "cpu"
    fp32_s = timed_pass(lambda: embedder.embed(images)) if timing else 0.0
    # Keep the fp32 weights so that a failed check can go back to them exactly.
    backbone = embedder.module.backbone
    fp32_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    embedder.set_precision(wanted)
    cos = float(np.min(np.sum(embedder.embed(images) * reference, axis=1)))
    embedder.precision_cosine = cos
    if timing:
        embedder.precision_speedup = round(fp32_s / timed_pass(lambda: embedder.embed(images)), 3)
    slower = timing and (embedder.precision_speedup or 0.0) < 1.0
    if auto and (cos < PRECISION_MIN_COSINE or slower):
        if cos < PRECISION_MIN_COSINE:
            LOG.warning(
                "%s embeddings agree with fp32 only to cosine %.5f (< %.3f); using fp32",
                wanted,
                cos,
                PRECISION_MIN_COSINE,
            )
        else:
            LOG.warning(
                "%s runs at %.2fx the speed of fp32 on this CPU; using fp32",
                wanted,
                embedder.precision_speedup,
            )
        backbone.to(torch.float32)
        backbone.load_state_dict(fp32_state)
        embedder.set_precision("fp32")
        embedder.precision_cosine = 1.0
    elif cos >= PRECISION_MIN_COSINE:
        LOG.info("%s embeddings agree with fp32: min cosine %.6f", wanted, cos)
    else:
        LOG.warning(
            "%s was requested; its embeddings agree with fp32 only to cosine %.5f", wanted, cos
        )
