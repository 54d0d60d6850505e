"""`vsearch bench search-quality`: the search-time features, measured through the service.

A throwaway catalogue (the CLI opens one on SQLite in a temporary data directory) is filled from a
protocol's gallery with the service's own ingest (one product per `product_id`, all of
its images), each query is decoded and embedded by the service's worker as is and
mirrored (`app.catalogue.rerank.mirrored`), and every configuration is run through
`SearchService.search_vector`, the function behind `POST /search`. What comes back is
what a client gets: products, one entry each; so the figures are product-level: top-1/3/5
and the mean reciprocal rank of the true product in the first `k` (MRR@k, which is the
product-level mAP when each query has one true product), plus the time of the search step
per query.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from app.catalogue.ingest import CsvColumns, ingest, read_products
from app.catalogue.rerank import SearchQuality, combine_views, mirrored
from app.catalogue.search import SearchService
from app.catalogue.service import CatalogueService
from app.core.files import scratch_directory
from app.evaluation.protocols import load_protocol

Say = Callable[[str], None]

# Named configurations; each is measured on the same embeddings.
CONFIGS: dict[str, SearchQuality] = {
    "best image (baseline)": SearchQuality(),
    "flip": SearchQuality(flip=True),
    "alpha-QE n=1": SearchQuality(expansion=1),
    "alpha-QE n=3": SearchQuality(expansion=3),
    "alpha-QE n=5": SearchQuality(expansion=5),
    "product m=3 w=0.25": SearchQuality(product_images=3, product_weight=0.25),
    "product m=3 w=0.5": SearchQuality(product_images=3, product_weight=0.5),
    "product m=5 w=0.5": SearchQuality(product_images=5, product_weight=0.5),
    "product m=10 w=0.5": SearchQuality(product_images=10, product_weight=0.5),
    "flip + product m=5 w=0.5": SearchQuality(flip=True, product_images=5, product_weight=0.5),
    "flip + alpha-QE n=3 + product m=5 w=0.5": SearchQuality(
        flip=True, expansion=3, product_images=5, product_weight=0.5
    ),
}


async def _embed_queries(
    search: SearchService, paths: list[Path], boxes: list[Any], say: Say, chunk: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Each query as is and mirrored, decoded and embedded the way `POST /search` does."""
    dim = search.worker.embedder.embedding_dim
    plain = np.zeros((len(paths), dim), np.float32)
    flipped = np.zeros((len(paths), dim), np.float32)

    async def one(n: int) -> None:
        image = await search.decoder.decode(paths[n].read_bytes())
        other, other_box = mirrored(image, boxes[n])
        rows = await search.worker.embed([image, other], [boxes[n], other_box])
        plain[n], flipped[n] = rows[0], rows[1]

    for start in range(0, len(paths), chunk):
        await asyncio.gather(*(one(n) for n in range(start, min(start + chunk, len(paths)))))
        say(f"queries embedded: {min(start + chunk, len(paths))}/{len(paths)}")
    return plain, flipped


def _measure(
    search: SearchService,
    plain: np.ndarray,
    flipped: np.ndarray,
    truth: list[str],
    configs: dict[str, SearchQuality],
    k: int,
) -> dict[str, dict[str, Any]]:
    """Every configuration on every query, interleaved per query so that a busy machine
    slows each configuration alike; the search step is timed (not the embedding)."""
    ranks: dict[str, list[int | None]] = {name: [] for name in configs}
    millis: dict[str, list[float]] = {name: [] for name in configs}
    for n in range(len(plain)):
        for name, quality in configs.items():
            views = np.stack([plain[n], flipped[n]]) if quality.flip else plain[n : n + 1]
            started = time.perf_counter()
            vector = combine_views(views)
            hits = search.search_vector(vector, k, quality=quality)
            millis[name].append((time.perf_counter() - started) * 1000)
            found = [h.id for h in hits]
            ranks[name].append(found.index(truth[n]) + 1 if truth[n] in found else None)
    out = {}
    for name in configs:
        r = ranks[name]
        out[name] = {
            "top1": round(float(np.mean([x == 1 for x in r])), 4),
            "top3": round(float(np.mean([x is not None and x <= 3 for x in r])), 4),
            "top5": round(float(np.mean([x is not None and x <= 5 for x in r])), 4),
            f"mrr_at_{k}": round(float(np.mean([1.0 / x if x else 0.0 for x in r])), 4),
            "search_ms_p50": round(float(np.percentile(millis[name], 50)), 3),
            "search_ms_p99": round(float(np.percentile(millis[name], 99)), 3),
        }
    return out


async def run_search_quality(
    catalogue: CatalogueService,
    search: SearchService,
    gallery_csv: Path,
    queries_csv: Path,
    images_root: Path,
    *,
    k: int = 20,
    configs: dict[str, SearchQuality] | None = None,
    say: Say = lambda _msg: None,
) -> dict[str, Any]:
    """Ingest the gallery into the (empty, throwaway) catalogue behind `catalogue` and
    `search`, then measure each configuration."""
    configs = configs or CONFIGS
    protocol = load_protocol(gallery_csv, queries_csv, images_root)
    started = time.perf_counter()
    columns = CsvColumns(
        id="product_id", image="img_path", title=None, category=None, attributes=None
    )
    summary = await ingest(
        catalogue, read_products(gallery_csv, images_root=images_root, columns=columns)
    )
    say(f"gallery ingested: {summary.as_dict()}")
    ingest_s = time.perf_counter() - started
    plain, flipped = await _embed_queries(
        search, [q.path for q in protocol.queries], [q.box for q in protocol.queries], say
    )
    truth = [q.label for q in protocol.queries]
    measured = await asyncio.to_thread(_measure, search, plain, flipped, truth, configs, k)
    rows = {name: {**asdict(configs[name]), **measured[name]} for name in configs}
    for name, row in rows.items():
        say(f"{name}: {row}")
    embedder = search.worker.embedder
    return {
        "model_id": embedder.model_id,
        "precision": embedder.precision,
        "gallery_images": len(protocol.gallery),
        "gallery_products": len({g.label for g in protocol.gallery}),
        "queries": len(protocol.queries),
        "k": k,
        "ingest_seconds": round(ingest_s, 1),
        "configs": rows,
    }


def _percentiles(millis: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(millis, 50)), 3),
        "p99_ms": round(float(np.percentile(millis, 99)), 3),
    }


def run_search_latency(
    *,
    n: int = 1_000_000,
    dim: int = 512,
    queries: int = 500,
    images_per_product: int = 8,
    k: int = 10,
    shards: int = 4,
    workdir: Path | None = None,
    say: Say = lambda _msg: None,
) -> dict[str, Any]:
    """What each feature adds to the index side of a search at `n` vectors.

    The index benchmark's clustered synthetic vectors in the service's IVF-PQ shards
    (factory, nprobe and refine as the service picks them), products of
    `images_per_product` consecutive ids, and per query the same steps
    `SearchService.search_vector` takes: the candidate search (depth max(4k, 16)), the
    expansion search and `expand_query`, the product candidates and `product_scores` over
    all their images' exact vectors. The catalogue lookups (image owners, a product's
    images) are database queries and are not in these figures.
    """
    from app.benchmarks.synthetic import EmbeddingMixture
    from app.catalogue.rerank import expand_query, product_scores
    from app.core.config import IndexSettings
    from app.index.build import ivfpq_factory, train_template
    from app.index.sharded import SearchKnobs, ShardedIndex
    from app.index.vectors import ExactVectors

    settings = IndexSettings()
    mixture = EmbeddingMixture(dim, seed=0)
    factory, params = ivfpq_factory(n, dim, settings)
    started = time.perf_counter()
    say(f"{factory}: training")
    template = train_template(mixture.sample(min(n, params["nlist"] * 40), stream=7), factory)
    rows: dict[str, Any] = {}
    with scratch_directory(workdir) as tmp:
        vectors = ExactVectors(Path(tmp) / "v.f16", dim)
        index = ShardedIndex.from_template(
            template, shards, vectors, knobs=SearchKnobs(settings.nprobe, settings.refine)
        )
        chunk = 100_000
        for c, start in enumerate(range(0, n, chunk)):
            block = mixture.chunk(c, chunk)[: min(chunk, n - start)]
            index.upsert(np.arange(start, start + len(block), dtype=np.int64), block)
            say(f"added {start + len(block)}/{n}")
        build_s = time.perf_counter() - started
        qs = mixture.sample(queries, stream=5)

        def candidates(q: np.ndarray, wanted: int) -> np.ndarray:
            _, found = index.search(q[None, :], max(4 * wanted, 16))
            products = found[0][found[0] >= 0] // images_per_product
            _, first = np.unique(products, return_index=True)
            return np.asarray(products[np.sort(first)][:wanted])

        def baseline(q: np.ndarray) -> None:
            candidates(q, k)

        def expansion(q: np.ndarray, neighbours: int = 3) -> None:
            scores, found = index.search(q[None, :], neighbours)
            expanded = expand_query(
                q, scores[0], found[0], vectors, neighbours=neighbours, alpha=3.0
            )
            candidates(expanded, k)

        def products(q: np.ndarray, wanted: int = 20) -> None:
            chosen = candidates(q, max(k, wanted))
            images = {
                int(p): list(range(int(p) * images_per_product, (int(p) + 1) * images_per_product))
                for p in chosen
            }
            product_scores(q, images, vectors, images=5, weight=0.5)

        steps: dict[str, Callable[[np.ndarray], None]] = {
            "best image (baseline)": baseline,
            "alpha-QE n=3": expansion,
            "product scoring, 20 candidates x 8 images": products,
        }
        for q in qs[:5]:
            for step in steps.values():
                step(q)  # warm
        # Interleaved per query, so a busy machine slows every configuration alike.
        millis: dict[str, list[float]] = {name: [] for name in steps}
        for q in qs:
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(q)
                millis[name].append((time.perf_counter() - t0) * 1000)
        base = np.asarray(millis["best image (baseline)"])
        for name, values in millis.items():
            added = np.asarray(values) - base
            rows[name] = {
                **_percentiles(values),
                "added_p50_ms": round(float(np.percentile(added, 50)), 3),
            }
            say(f"{name}: {rows[name]}")
        index.close()
        vectors.close()
    return {
        "n": n,
        "dim": dim,
        "queries": queries,
        "k": k,
        "shards": shards,
        "factory": factory,
        "nprobe": index.default_nprobe,
        "refine": settings.refine,
        "images_per_product": images_per_product,
        "build_seconds": round(build_s, 1),
        "rows": rows,
    }


def run_flip_latency(model: str, *, repeats: int = 30) -> dict[str, Any]:
    """Forward-pass time of one query image against the same image and its mirror (a
    batch of two), on the service's embedder at its precision."""
    import torch

    from app.inference.runtime import load_model

    embedder = load_model(model, device="auto", precision="auto")
    size = embedder.config.input_size
    out: dict[str, Any] = {"model_id": embedder.model_id, "precision": embedder.precision}
    for views in (1, 2):
        batch = torch.rand(views, 3, size, size)
        for _ in range(3):
            embedder.forward(batch)
        millis = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            embedder.forward(batch)
            millis.append((time.perf_counter() - t0) * 1000)
        out["one view" if views == 1 else "flip (two views)"] = _percentiles(millis)
    return out
