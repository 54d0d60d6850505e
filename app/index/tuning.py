"""Search parameters that reach a target recall, measured on the live catalogue.

The recall of IVF-PQ search depends on the data and its size as much as on `nprobe` and
the re-ranking depth, so fixed defaults drift (0.95 at 1M synthetic vectors was 0.91 at
10M). After every (re)build, and again as the index grows, `tune` measures recall@k of
the service's own search path against exact search on a sample of catalogue vectors
(each query's own vector left out of both lists) and keeps the cheapest parameters that
reach the target. Ground truth and recall come from `faiss.contrib`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure
from faiss.contrib.exhaustive_search import knn_ground_truth

from app.index.sharded import ShardedIndex

LOG = logging.getLogger(__name__)

REFINES = (4, 8, 16, 32, 64, 128)
_BLOCK = 131_072  # catalogue vectors per ground-truth block (~256 MB as float32 at 512-d)


@dataclass(frozen=True)
class Tuning:
    """What a tuning run measured and chose."""

    target: float
    recall: float
    """recall@k of the chosen parameters on the sample (its own vector left out)."""
    recall_lower_bound: float
    """One-sided lower confidence bound of that recall (what must reach the target)."""
    reached: bool
    nprobe: int
    refine: int
    k: int
    queries: int
    ntotal: int
    ms_per_query: float
    took_s: float
    tuned_at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nprobes(nlist: int) -> list[int]:
    values, n = [], 4
    while n < nlist:
        values.append(n)
        n *= 2
    return [*values, nlist]


def tune(
    index: ShardedIndex,
    target: float,
    *,
    k: int = 10,
    queries: int = 512,
    fixed_nprobe: int = 0,
    fixed_refine: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> Tuning | None:
    """Measure and pick `(nprobe, refine)`; None for exact (flat) or tiny indexes.

    For each nprobe (ascending) the smallest refine that reaches `target` is found;
    among those that do, the one with the lowest cost wins: bytes read per query, codes
    scanned in the probed lists plus float16 vectors re-ranked (a deterministic measure,
    unlike timings on a busy machine; the measured time is reported beside it). When none
    reaches the target, the most accurate pair is kept and `reached` is False. A fixed
    (configured) nprobe or refine is kept as it is.

    "Reach" means the one-sided `confidence` lower bound of the sample's recall (mean
    minus z times the standard error of the per-query recalls) is at least `target`: at
    1M vectors, parameters whose 256-query estimate was 0.955 gave 0.943 on other queries.
    """
    if index.kind == "flat" or index.ntotal < 20 * (k + 1):
        return None
    started = time.perf_counter()
    ids = index.all_ids()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(ids, size=min(queries, len(ids)), replace=False)
    xq = index.vectors.get(chosen).astype(np.float32)
    truth = _exact(index, ids, xq, chosen, k)
    nprobes = [fixed_nprobe] if fixed_nprobe else _nprobes(index.nlist)
    refines = [fixed_refine] if fixed_refine else list(REFINES)
    per_list = index.ntotal / max(index.nlist, 1) * index.code_size

    def cost(nprobe: int, refine: int) -> float:
        return nprobe * per_list + k * refine * index.dim * 2

    z = NormalDist().inv_cdf(confidence)
    # (cost, recall, nprobe, refine, ms per query, lower bound)
    Point = tuple[float, float, int, int, float, float]
    passing: list[Point] = []
    best: Point | None = None  # highest recall seen

    def measure(nprobe: int, refine: int) -> Point:
        nonlocal best
        t0 = time.perf_counter()
        _, found = index.search(xq, k + 1, nprobe=nprobe, refine=refine)
        ms = (time.perf_counter() - t0) * 1000 / len(xq)
        found = _drop_self(found, chosen, k)
        recall = float(knn_intersection_measure(found, truth))
        per_query = [
            knn_intersection_measure(found[i : i + 1], truth[i : i + 1]) for i in range(len(xq))
        ]
        bound = recall - z * float(np.std(per_query, ddof=1)) / np.sqrt(len(per_query))
        point = (cost(nprobe, refine), recall, nprobe, refine, ms, bound)
        if best is None or recall > best[1]:
            best = point
        return point

    # Recall grows with both parameters, so the cheapest passing pairs lie on a staircase:
    # walk nprobe up, and at each step lower refine while the target still holds. Each
    # parameter is stepped through once: about len(nprobes) + len(refines) measurements.
    r = len(refines) - 1
    for nprobe in nprobes:
        point = measure(nprobe, refines[r])
        if point[5] < target:
            continue  # even the deepest re-rank misses at this nprobe: probe more lists
        passing.append(point)
        while r > 0:
            lower = measure(nprobe, refines[r - 1])
            if lower[5] < target:
                break
            r -= 1
            passing.append(lower)
        if r == 0 or nprobe >= 4 * passing[0][2]:
            break  # refine at its floor, or far past the first passing nprobe
    pick = min(passing) if passing else best
    assert pick is not None
    _, recall, nprobe, refine, ms, bound = pick
    tuning = Tuning(
        target=target,
        recall=round(recall, 4),
        recall_lower_bound=round(bound, 4),
        reached=bool(passing),
        nprobe=nprobe,
        refine=refine,
        k=k,
        queries=len(xq),
        ntotal=len(ids),
        ms_per_query=round(ms, 3),
        took_s=round(time.perf_counter() - started, 2),
        tuned_at=time.time(),
    )
    log = LOG.info if tuning.reached else LOG.warning
    log(
        "index search tuned on %d vectors: nprobe %d, refine %d, recall@%d %.3f, lower "
        "bound %.3f (target %.2f%s)",
        tuning.ntotal,
        nprobe,
        refine,
        k,
        recall,
        bound,
        target,
        "" if tuning.reached else ", NOT reached: raise nlist or pq_m, or lower the target",
    )
    return tuning


def _exact(
    index: ShardedIndex, ids: np.ndarray, xq: np.ndarray, chosen: np.ndarray, k: int
) -> np.ndarray:
    """Exact top-k ids per query over every catalogue vector, the query's own left out."""

    def blocks() -> Iterator[np.ndarray]:
        for i in range(0, len(ids), _BLOCK):
            yield index.vectors.get(ids[i : i + _BLOCK]).astype(np.float32)

    _, positions = knn_ground_truth(xq, blocks(), k + 1, metric_type=faiss.METRIC_INNER_PRODUCT)
    found = np.where(positions >= 0, ids[np.clip(positions, 0, None)], -1)
    return _drop_self(found, chosen, k)


def _drop_self(found: np.ndarray, chosen: np.ndarray, k: int) -> np.ndarray:
    """Each row's first k ids other than the query's own (-1 padded)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for row, (ids, own) in enumerate(zip(found, chosen, strict=True)):
        kept = ids[ids != own][:k]
        out[row, : len(kept)] = kept
    return out
