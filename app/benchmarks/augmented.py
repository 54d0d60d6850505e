"""Real image embeddings for the index benchmark: a model run over product photos under
random crops, flips and colour jitter.

Synthetic clusters are one test of an index; real embeddings are often far easier or
harder for product quantisation. Each row of the output is one augmented view of one
image (row `i` is a view of image `i % images`, in a shuffled image order), so every image
has several rows, like several photos of one listing. The augmentations are the training
pipeline's; the views then go through the service's own preprocessing and forward pass.

Output: `OUT` (an (n, d) float32 .npy) and `OUT.images.npy` (the source image of each row,
int32), written to temporary names and renamed at the end, so an interrupted run leaves
nothing that looks complete.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T

from app.benchmarks.embed import image_files
from app.imaging.decode import decode_image
from app.inference.runtime import Embedder

Progress = Callable[[int, int], None]


def augmentation(size: int, seed: int) -> Callable[[Any], Any]:
    """Random crop, flip and colour jitter on a PIL image.

    These were the training pipeline's augmentations when the 101k-vector workload was
    made (docs/benchmarks.md); training has since dropped hue and saturation jitter, and
    the workload keeps its own so that its figures stay reproducible.
    """
    torch.manual_seed(seed)
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.35, 1.0), ratio=(0.75, 1.333)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2, hue=0.02),
        ]
    )


def write_augmented_embeddings(
    embedder: Embedder,
    images_root: Path,
    n: int,
    out: Path,
    *,
    seed: int = 0,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Embed `n` augmented views of the images under `images_root` into `out`."""
    files = image_files(images_root)
    order = np.random.default_rng(seed).permutation(len(files))
    sources = order[np.arange(n) % len(files)].astype(np.int32)
    augment = augmentation(embedder.config.input_size, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.npy")
    matrix = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.float32, shape=(n, embedder.embedding_dim)
    )

    def views(start: int) -> torch.Tensor:
        tensors = []
        for image_no in sources[start : start + batch_size]:
            image = decode_image(files[int(image_no)].read_bytes(), max_pixels=10**9)
            tensors.append(embedder.preprocess(augment(image)))
        return torch.stack(tensors)

    started = time.perf_counter()
    forward_s = 0.0
    # Decoding and augmenting the next batch overlaps the forward pass of this one.
    with ThreadPoolExecutor(1, thread_name_prefix="vs-augment") as pool:
        pending = pool.submit(views, 0)
        for start in range(0, n, batch_size):
            batch = pending.result()
            if start + batch_size < n:
                pending = pool.submit(views, start + batch_size)
            t0 = time.perf_counter()
            matrix[start : start + len(batch)] = embedder.forward(batch)
            forward_s += time.perf_counter() - t0
            if progress is not None:
                progress(min(start + batch_size, n), n)
    matrix.flush()
    del matrix
    images_tmp = out.with_name(out.name + ".images.partial.npy")
    np.save(images_tmp, sources)
    os.replace(images_tmp, images_path(out))
    os.replace(tmp, out)
    took = time.perf_counter() - started
    return {
        "out": str(out),
        "rows": n,
        "dim": embedder.embedding_dim,
        "images": len(files),
        "views_per_image": round(n / len(files), 1),
        "model": embedder.describe(),
        "seconds": round(took, 1),
        "forward_s": round(forward_s, 1),
        "images_per_s": round(n / took, 1),
    }


def images_path(out: Path) -> Path:
    """Where the source image of each row is saved beside `out`."""
    return out.with_name(out.stem + ".images.npy")
