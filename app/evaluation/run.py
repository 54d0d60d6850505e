"""`vsearch eval`: embed a protocol's gallery and queries with the service's own decode,
preprocessing and model code, then score exactly and/or through the sharded index."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.core.config import IndexSettings
from app.evaluation.metrics import (
    MAP_DEPTH,
    delta_similarity,
    evaluate_rankings,
    evaluate_scores,
    group_breakdown,
)
from app.evaluation.protocols import Item, load_protocol
from app.evaluation.report import (
    confusion_summary,
    hardest_queries_sheet,
    query_results,
    write_query_results,
)
from app.imaging.decode import decode_image
from app.index.build import ivfpq_factory, train_template
from app.index.sharded import SearchKnobs, ShardedIndex
from app.index.vectors import ExactVectors
from app.inference.runtime import Embedder, load_model

Progress = Callable[[str, int, int], None]


def embed_items(
    embedder: Embedder,
    items: list[Item],
    *,
    batch_size: int = 32,
    threads: int = 2,
    progress: Progress | None = None,
    label: str = "embed",
) -> np.ndarray:
    """Decode (as the service does, from the file's bytes), crop, embed."""
    out = np.zeros((len(items), embedder.embedding_dim), dtype=np.float32)

    def prepare(item: Item) -> Any:
        image = decode_image(item.path.read_bytes(), max_pixels=10**9)
        return embedder.preprocess(image, item.box)

    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            tensors = list(pool.map(prepare, chunk))
            out[start : start + len(chunk)] = embedder.forward(torch.stack(tensors))
            if progress is not None:
                progress(label, start + len(chunk), len(items))
    return out


def index_rankings(
    gallery: np.ndarray, queries: np.ndarray, settings: IndexSettings, *, ivf: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """Rank through the service's ShardedIndex (exact shards, or IVF-PQ when `ivf`)."""
    depth = min(MAP_DEPTH, len(gallery))
    with tempfile.TemporaryDirectory() as tmp:
        vectors = ExactVectors(Path(tmp) / "v.f16", gallery.shape[1])
        info: dict[str, Any] = {}
        if ivf:
            factory, params = ivfpq_factory(len(gallery), gallery.shape[1], settings)
            template = train_template(gallery, factory)
            index = ShardedIndex.from_template(
                template,
                settings.shards,
                vectors,
                knobs=SearchKnobs(nprobe=settings.nprobe, refine=settings.refine),
            )
            info = {
                "factory": factory,
                **params,
                "nprobe": index.default_nprobe,
                "refine": index.knobs.refine,
            }
        else:
            index = ShardedIndex.new_flat(gallery.shape[1], settings.shards, vectors)
            info = {"kind": "flat"}
        index.upsert(np.arange(len(gallery), dtype=np.int64), gallery)
        _, found = index.search(queries, depth)
        index.close()
        vectors.close()
    return found, {"shards": settings.shards, **info}


def run_evaluation(
    model: str | Path,
    gallery_csv: Path,
    queries_csv: Path,
    images_root: Path,
    *,
    device: str = "auto",
    precision: str = "auto",
    through_index: bool = False,
    exact: bool = True,
    index_settings: IndexSettings | None = None,
    submission: Path | None = None,
    per_query: Path | None = None,
    hardest_sheet: Path | None = None,
    hardest_count: int = 12,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Embed, rank and score a protocol; optionally write what `app.evaluation.report`
    makes of the exact ranking (per-query rows, a sheet of the hardest queries). The
    confusion summary is always in the result."""
    protocol = load_protocol(gallery_csv, queries_csv, images_root)
    embedder = load_model(model, device=device, precision=precision)
    started = time.perf_counter()
    gallery = embed_items(
        embedder, protocol.gallery, batch_size=batch_size, progress=progress, label="gallery"
    )
    queries = embed_items(
        embedder, protocol.queries, batch_size=batch_size, progress=progress, label="queries"
    )
    seconds = time.perf_counter() - started
    labels = {
        label: n
        for n, label in enumerate(sorted({i.label for i in protocol.gallery + protocol.queries}))
    }
    g_labels = np.asarray([labels[i.label] for i in protocol.gallery])
    q_labels = np.asarray([labels[i.label] for i in protocol.queries])
    scores = queries @ gallery.T
    result: dict[str, Any] = {
        "model_id": embedder.model_id,
        "precision": embedder.precision,
        "images_per_s": round((len(gallery) + len(queries)) / seconds, 2),
    }
    if exact:
        result.update(evaluate_scores(scores, q_labels, g_labels).as_dict())
        groups = np.asarray([i.group or "" for i in protocol.queries])
        if any(groups):
            result["groups"] = group_breakdown(scores, q_labels, g_labels, groups)
    if through_index:
        settings = index_settings or IndexSettings()
        found, info = index_rankings(gallery, queries, settings, ivf=True)
        delta = delta_similarity(scores, q_labels, g_labels)
        ranked = np.where(found >= 0, g_labels[np.maximum(found, 0)], -1)
        approx = evaluate_rankings(ranked, q_labels, g_labels, delta=delta).as_dict()
        result["index"] = {
            **info,
            **{k: approx[k] for k in ("map_at_1000", "top1", "top3", "top5")},
        }
        if not exact:
            result.update(approx)
    results = query_results(scores, protocol.queries, protocol.gallery)
    result["confusions"] = confusion_summary(results, protocol.gallery)
    if per_query is not None:
        write_query_results(results, per_query)
        result["per_query"] = str(per_query)
    if hardest_sheet is not None:
        drawn = hardest_queries_sheet(
            results, protocol.queries, protocol.gallery, hardest_sheet, count=hardest_count
        )
        result["hardest_sheet"] = {"path": str(hardest_sheet), "queries": drawn}
    if submission is not None:
        order = np.argsort(-scores, axis=1, kind="stable")[:, :MAP_DEPTH]
        gallery_ids = [item.id for item in protocol.gallery]
        rows = {q.id: [gallery_ids[j] for j in order[n]] for n, q in enumerate(protocol.queries)}
        submission.write_text(json.dumps(rows))
        result["submission"] = str(submission)
    return result
