"""`vsearch bench filters`: filtered search through the service's sharded IVF-PQ index,
against exact filtered search, at three selectivities.

The catalogue is synthetic (`EmbeddingMixture`, clustered like real embeddings); a
filter passes a fixed random subset of the images (0.1%, 5%, 50% by default), chosen
independently of the vectors, as a label such as a brand is. For each filter, each
strategy of `app/index/filtered.py` is run on the same queries:

* `allow_list_exact`: exact scoring of every passing id (the service's choice up to
  `EXACT_SCAN_LIMIT` passing images);
* `allow_list_selector`: the IVF-PQ search restricted to the passing ids by a FAISS id
  selector (its choice up to `EXACT_FILTER_LIMIT`);
* `accept_deepen`: the ANN search checked against the filter, deepened until k pass
  (the service's choice above it);
* `post_filter_top40`: the naive way, for contrast: 40 ANN results, then the filter
  (short lists whenever fewer than 10 of them pass).

A fraction of 1 is no filter at all: the plain ANN search, for reference.

Each row: `recall_at_10` against exact filtered search (brute force over every passing
vector), `short_lists` (queries that got fewer than 10 results although 10 exist),
`p50_ms`/`p99_ms`/`mean_ms` per query (one query at a time, as the service searches) and
`mean_rounds` (searches per query). The index part only: the service adds one indexed SQL
query per search (the allow-list, or the check of the candidates).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.benchmarks.synthetic import EmbeddingMixture
from app.core.config import IndexSettings
from app.core.files import scratch_directory
from app.index.build import ivfpq_factory, train_template
from app.index.filtered import (
    EXACT_FILTER_LIMIT,
    EXACT_SCAN_LIMIT,
    search_accepting,
    search_allowed,
)
from app.index.sharded import ShardedIndex
from app.index.vectors import ExactVectors

Say = Callable[[str], None]

K = 10
WANTED = 4 * K  # images the service asks for per round when it wants k products


def exact_filtered(
    mixture: EmbeddingMixture, n: int, chunk: int, queries: np.ndarray, masks: list[np.ndarray]
) -> list[np.ndarray]:
    """Exact top-10 ids among the passing vectors, per filter, in one streamed pass."""
    heaps = [faiss.ResultHeap(len(queries), K, keep_max=True) for _ in masks]
    for c, start in enumerate(range(0, n, chunk)):
        block = mixture.chunk(c, chunk)[: min(chunk, n - start)]
        scores = queries @ block.T
        for heap, mask in zip(heaps, masks, strict=True):
            passing = np.flatnonzero(mask[start : start + len(block)])
            if len(passing) == 0:
                continue
            sub = scores[:, passing]
            top = min(K, len(passing))
            part = np.argpartition(-sub, top - 1, axis=1)[:, :top]
            heap.add_result(
                np.ascontiguousarray(np.take_along_axis(sub, part, 1), dtype=np.float32),
                np.ascontiguousarray(passing[part] + start, dtype=np.int64),
            )
    for heap in heaps:
        heap.finalize()
    return [heap.I for heap in heaps]


def _row(
    name: str,
    fraction: float,
    passing: int,
    found: list[np.ndarray],
    truth: np.ndarray,
    latencies: list[float],
    rounds: list[int],
) -> dict[str, Any]:
    hits = sum(
        len(set(f[:K].tolist()) & set(t[t >= 0].tolist()))
        for f, t in zip(found, truth, strict=True)
    )
    expected = int((truth >= 0).sum())
    lat = np.asarray(latencies) * 1000
    return {
        "filter": f"{fraction:.1%}",
        "passing_images": passing,
        "strategy": name,
        "recall_at_10": round(hits / max(expected, 1), 4),
        "short_lists": int(sum(len(f) < min(K, passing) for f in found)),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "mean_ms": round(float(lat.mean()), 2),
        "mean_rounds": round(float(np.mean(rounds)), 2),
    }


def run_filter_benchmark(
    *,
    n: int,
    dim: int = 512,
    n_queries: int = 100,
    fractions: tuple[float, ...] = (0.001, 0.05, 0.5, 1.0),
    shards: int = 4,
    chunk: int = 100_000,
    train_n: int | None = None,
    seed: int = 0,
    workdir: Path | None = None,
    keep: bool = False,
    progress: Say | None = None,
) -> dict[str, Any]:
    """`keep` (with a `workdir`) keeps the built index and the ground truth there and
    reuses them on the next run with the same parameters."""
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    mixture = EmbeddingMixture(dim, seed=seed)
    rng = np.random.default_rng((seed, 11))
    order = rng.permutation(n)
    masks = []
    for fraction in fractions:
        mask = np.zeros(n, dtype=bool)
        mask[order[: round(fraction * n)]] = True
        masks.append(mask)
    queries = mixture.sample(n_queries, stream=5)

    settings = IndexSettings()
    factory, params = ivfpq_factory(n, dim, settings)
    sample_n = train_n or min(n, max(params["nlist"] * 40, 20_000))
    rows: list[dict[str, Any]] = []
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    spec = "_".join(f"{f:g}" for f in fractions)
    key = f"n{n}-d{dim}-s{seed}-q{n_queries}-f{spec}-t{sample_n}-x{shards}-{factory}"
    key = key.replace(",", "_")
    cache = workdir / f"filters-{key}" if keep and workdir is not None else None
    truth_file = None if cache is None else cache / "truth.npz"
    build_s = truth_s = 0.0
    with scratch_directory(workdir) as tmp:
        home = cache or Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        if truth_file is not None and truth_file.exists():
            say(f"ground truth from {truth_file}")
            with np.load(truth_file) as saved:
                truths = [saved[f"arr_{i}"] for i in range(len(fractions))]
        else:
            say("exact filtered ground truth (streamed)")
            t0 = time.perf_counter()
            truths = exact_filtered(mixture, n, chunk, queries, masks)
            truth_s = time.perf_counter() - t0
            if truth_file is not None:
                np.savez(truth_file, *truths)
        vectors = ExactVectors(home / "vectors.f16", dim)
        names = [f"shard-{i:02d}.faiss" for i in range(shards)]
        if cache is not None and (cache / "built").exists():
            say(f"index from {cache}")
            index = ShardedIndex.read_shards(home, names, kind="ivfpq", dim=dim, vectors=vectors)
        else:
            say(f"{factory}: training on {sample_n}")
            t0 = time.perf_counter()
            template = train_template(mixture.sample(sample_n, stream=7), factory)
            index = ShardedIndex.from_template(template, shards, vectors)
            say(f"{factory}: adding {n}")
            for c, start in enumerate(range(0, n, chunk)):
                block = mixture.chunk(c, chunk)[: min(chunk, n - start)]
                index.upsert(np.arange(start, start + len(block), dtype=np.int64), block)
            build_s = time.perf_counter() - t0
            if cache is not None:
                vectors.flush()
                index.write_shards(home)
                (cache / "built").touch()
        try:
            for fraction, mask, truth in zip(fractions, masks, truths, strict=True):
                passing = int(mask.sum())
                allowed = np.flatnonzero(mask).astype(np.int64)
                chosen = service_choice(passing)
                if fraction >= 1.0:
                    chosen = "accept_deepen"  # no filter: the plain ANN search

                strategies = _strategies(index, mask, allowed, passing)
                for name, strategy in strategies.items():
                    strategy(queries[0])  # warm
                    found, latencies, rounds = [], [], []
                    for q in queries:
                        t1 = time.perf_counter()
                        ids, r = strategy(q)
                        latencies.append(time.perf_counter() - t1)
                        found.append(ids[:K])
                        rounds.append(r)
                    row = _row(name, fraction, passing, found, truth, latencies, rounds)
                    row["service_choice"] = name == chosen
                    rows.append(row)
                    say(
                        f"{row['filter']} {name}: recall {row['recall_at_10']}, "
                        f"p50 {row['p50_ms']} ms"
                    )
        finally:
            index.close()
            vectors.close()
    return {
        "n": n,
        "dim": dim,
        "queries": n_queries,
        "factory": factory,
        "shards": shards,
        "nprobe": index.default_nprobe,
        "refine": index.knobs.refine,
        "exact_scan_limit": EXACT_SCAN_LIMIT,
        "exact_filter_limit": EXACT_FILTER_LIMIT,
        "threads": faiss.omp_get_max_threads(),
        "build_s": round(build_s, 1),
        "ground_truth_s": round(truth_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }


Strategy = Callable[[np.ndarray], tuple[np.ndarray, int]]


def service_choice(passing: int) -> str:
    """The strategy `SearchService` takes for a filter passing `passing` images."""
    if passing <= EXACT_SCAN_LIMIT:
        return "allow_list_exact"
    return "allow_list_selector" if passing <= EXACT_FILTER_LIMIT else "accept_deepen"


def _strategies(
    index: ShardedIndex, mask: np.ndarray, allowed: np.ndarray, passing: int
) -> dict[str, Strategy]:
    """The strategies worth timing for a filter passing `passing` images: accept-and-
    deepen only where it may be chosen or compared (a selective filter would deepen
    through most of the index), the allow-list only where reading its vectors stays
    cheap."""

    def accept(ids: np.ndarray) -> np.ndarray:
        return mask[ids]

    def accept_deepen(q: np.ndarray) -> tuple[np.ndarray, int]:
        found = search_accepting(index, q, WANTED, accept)
        return found.ids, found.rounds

    def allow_list(q: np.ndarray) -> tuple[np.ndarray, int]:
        found = search_allowed(index, q, allowed)
        return found.ids, found.rounds

    def allow_list_selector(q: np.ndarray) -> tuple[np.ndarray, int]:
        found = search_allowed(index, q, allowed, WANTED)
        return found.ids, found.rounds

    def post_filter(q: np.ndarray) -> tuple[np.ndarray, int]:
        _, ids = index.search(q.reshape(1, -1), WANTED)
        ids = ids[0][ids[0] >= 0]
        return ids[mask[ids]], 1

    out: dict[str, Strategy] = {}
    if passing > EXACT_FILTER_LIMIT // 10:
        out["accept_deepen"] = accept_deepen
    out["post_filter_top40"] = post_filter
    if passing > EXACT_SCAN_LIMIT:
        out["allow_list_selector"] = allow_list_selector
    if passing <= 4 * EXACT_FILTER_LIMIT:
        out["allow_list_exact"] = allow_list
    return out
