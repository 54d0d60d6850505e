"""ShardedIndex: S FAISS shards behind one add/remove/search interface.

Image ids go to a shard by a stable hash (splitmix64), so an id always lands in the same
shard across processes and restarts. IVF-PQ queries are assigned to their lists once for
all shards (clones of one trained template share its quantizer); a batch then fans out
to the shards on a thread pool (FAISS releases the GIL), a few IVF-PQ queries visit them
in turn, and the results merge with `faiss.ResultHeap` (keep max: inner product).
IVF-PQ shards return `k * refine` candidates that are re-scored with the exact vectors,
so every returned score is a true cosine (to float16 storage precision).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.core.files import atomic_write
from app.index.shard import Shard, new_flat, prepare_ivf
from app.index.vectors import ExactVectors

LOG = logging.getLogger(__name__)

# From this many queries on, the shards are searched in parallel on the pool.
_POOL_FROM = 32
# Exact vectors fetched per re-ranking step (16 MB as float32): buffers this small are
# reused by the allocator, where a 0.5 GB step page-faulted fresh memory every batch (1M
# scan batch of 4,096 x 40 candidates: 0.18-0.2 s in 8k-row steps, 0.3-1.9 s in 256k).
_RERANK_ROWS = 8_192


def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Stable shard number of each id (splitmix64 finaliser, then modulo)."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n_shards)).astype(np.int64)


DEFAULT_REFINE = 32
"""Re-ranking depth until the index is tuned (measured at 1M: docs/benchmarks.md)."""


@dataclass
class SearchKnobs:
    """Search-time settings of IVF-PQ shards; nprobe 0 = 1/64 of the lists (>= 16),
    refine 0 = DEFAULT_REFINE."""

    nprobe: int = 0
    refine: int = DEFAULT_REFINE


class ShardedIndex:
    def __init__(
        self,
        shards: list[Shard],
        *,
        kind: str,
        dim: int,
        vectors: ExactVectors,
        knobs: SearchKnobs | None = None,
        params: dict[str, Any] | None = None,
        template: faiss.Index | None = None,
    ) -> None:
        if not shards:
            raise ValueError("a ShardedIndex needs at least one shard")
        self.shards = shards
        self.kind = kind
        self.dim = dim
        self.vectors = vectors
        self.knobs = knobs or SearchKnobs()
        self.params = params or {}
        self.template = template
        self._pool = ThreadPoolExecutor(len(shards), thread_name_prefix="vs-shard")

    # construction -----------------------------------------------------------------------
    @classmethod
    def new_flat(cls, dim: int, n_shards: int, vectors: ExactVectors) -> ShardedIndex:
        shards = [Shard(new_flat(dim), "flat") for _ in range(n_shards)]
        return cls(shards, kind="flat", dim=dim, vectors=vectors)

    @classmethod
    def from_template(
        cls,
        template: faiss.Index,
        n_shards: int,
        vectors: ExactVectors,
        *,
        knobs: SearchKnobs | None = None,
        params: dict[str, Any] | None = None,
    ) -> ShardedIndex:
        """Empty IVF-PQ shards, each a clone of the trained `template`."""
        shards = [Shard(prepare_ivf(faiss.clone_index(template)), "ivfpq") for _ in range(n_shards)]
        return cls(
            shards,
            kind="ivfpq",
            dim=int(template.d),
            vectors=vectors,
            knobs=knobs,
            params=params,
            template=template,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # writes -----------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace vectors by image id (idempotent)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        # Exact vectors first: a search that finds an id can always re-rank it.
        self.vectors.put(ids, vectors)
        owner = shard_of(ids, self.n_shards)
        for s in np.unique(owner):
            mask = owner == s
            self.shards[int(s)].upsert(ids[mask], vectors[mask])

    def remove(self, ids: np.ndarray) -> int:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return 0
        owner = shard_of(ids, self.n_shards)
        return sum(self.shards[int(s)].remove(ids[owner == s]) for s in np.unique(owner))

    # search -----------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        refine: int | None = None,
        selector: faiss.IDSelector | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` (scores, ids) per query; missing results are (-inf, -1)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        nq = len(queries)
        depth = k if self.kind == "flat" else k * (refine or self.knobs.refine or DEFAULT_REFINE)
        depth = max(k, min(depth, self.ntotal))  # more candidates than vectors buys nothing
        nprobe = nprobe or self.default_nprobe
        if self.n_shards == 1:
            scores, ids = self.shards[0].search(queries, depth, nprobe=nprobe, selector=selector)
        else:
            if self.kind != "flat" and self._shared_quantizer:
                # The shards are clones of one trained template, so their coarse quantizer
                # is the same: assign the queries to their lists once, not once per shard.
                coarse, lists = self.shards[0].assign(queries, nprobe)

                def one(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
                    return shard.search_preassigned(
                        queries, depth, lists, coarse, selector=selector
                    )
            else:

                def one(shard: Shard) -> tuple[np.ndarray, np.ndarray]:
                    return shard.search(queries, depth, nprobe=nprobe, selector=selector)

            if nq < _POOL_FROM and self.kind != "flat":
                # A few queries scan a few lists per shard: handing them to the pool costs
                # more than the scans, and concurrent requests already use the cores.
                # (Exact shards scan everything: they stay on the pool.)
                results = [one(s) for s in self.shards]
            else:
                results = [f.result() for f in [self._pool.submit(one, s) for s in self.shards]]
            heap = faiss.ResultHeap(nq, depth, keep_max=True)
            for d, i in results:
                heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(i))
            heap.finalize()
            scores, ids = heap.D, heap.I
        ids = np.where(np.isfinite(scores) & (scores > -1e30), ids, -1)
        if self.kind != "flat":
            scores, ids = self._rerank(queries, ids, k)
        else:
            scores = np.where(ids >= 0, scores, -np.inf)
        return scores[:, :k].astype(np.float32), ids[:, :k]

    def search_subset(
        self, queries: np.ndarray, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-`k` among `ids` only (filtered search over a small subset).

        Flat shards search with an id selector (exact float32 scores, as unfiltered
        searches give); IVF-PQ shards score the subset's exact vectors directly, so a
        filter never loses results to the approximate stage.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        k = max(1, min(k, len(ids)))
        if self.kind == "flat":
            selector = faiss.IDSelectorBatch(ids)
            return self.search(queries, k, selector=selector)
        exact = self.vectors.get(ids)
        # Rows not yet written (an image this replica has not caught up on) read as zeros.
        present = np.abs(exact).sum(axis=1) > 0
        scores = queries @ exact.T
        scores[:, ~present] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, 1)
        found = np.where(np.isfinite(top), ids[order], -1)
        return top.astype(np.float32), found

    @property
    def _shared_quantizer(self) -> bool:
        """Every shard is a plain IVF over one template's coarse centroids."""
        return self.template is not None and all(s.plain_ivf for s in self.shards)

    @property
    def default_nprobe(self) -> int:
        """The configured nprobe, or 1/64 of the lists (at least 16): measured at 1M
        vectors to reach recall@10 >= 0.95 with refine 32 (docs/benchmarks.md)."""
        if self.knobs.nprobe:
            return self.knobs.nprobe
        return min(self.nlist, max(16, self.nlist // 64)) if self.nlist else 16

    @property
    def code_size(self) -> int:
        """Bytes per vector code in the IVF lists (0 for exact shards)."""
        return 0 if self.kind == "flat" else int(self.shards[0]._ivf.code_size)

    @property
    def nlist(self) -> int:
        """Lists per IVF shard (0 for exact shards)."""
        return 0 if self.kind == "flat" else int(self.shards[0]._ivf.nlist)

    def _rerank(
        self, queries: np.ndarray, ids: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        # Bound the exact vectors held at once (batch searches of deep candidate lists).
        step = max(1, _RERANK_ROWS // max(ids.shape[1], 1))
        if len(queries) > step:
            parts = [
                self._rerank(queries[i : i + step], ids[i : i + step], k)
                for i in range(0, len(queries), step)
            ]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        nq, depth = ids.shape
        flat_ids = ids.reshape(-1)
        exact = self.vectors.get(np.where(flat_ids >= 0, flat_ids, 0)).reshape(nq, depth, -1)
        scores = np.matmul(exact, queries[:, :, None])[:, :, 0]  # batched dot products
        scores[ids < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    # persistence ------------------------------------------------------------------------
    def write_shards(self, directory: Path) -> tuple[list[str], int]:
        """Write each shard (and the template) into `directory`.

        Returns:
            The file names and the number of vectors written (each shard is written under
            its read lock, so the count matches the files even while writes go on).
        """
        directory.mkdir(parents=True, exist_ok=True)
        names, written = [], 0
        for n, shard in enumerate(self.shards):
            name = f"shard-{n:02d}.faiss"
            written += _write_counted(shard, directory / name)
            names.append(name)
        if self.template is not None:
            template = self.template
            atomic_write(
                directory / "template.faiss",
                lambda tmp: faiss.write_index(template, str(tmp)),
            )
        return names, written

    @classmethod
    def read_shards(
        cls,
        directory: Path,
        names: list[str],
        *,
        kind: str,
        dim: int,
        vectors: ExactVectors,
        knobs: SearchKnobs | None = None,
        params: dict[str, Any] | None = None,
    ) -> ShardedIndex:
        shards = [Shard.read(directory / name, kind) for name in names]
        template = None
        if kind == "ivfpq" and (directory / "template.faiss").exists():
            template = faiss.read_index(str(directory / "template.faiss"))
        for shard in shards:
            if int(shard.index.d) != dim:
                raise ValueError(f"shard dimension {shard.index.d} != {dim}")
        return cls(
            shards,
            kind=kind,
            dim=dim,
            vectors=vectors,
            knobs=knobs,
            params=params,
            template=template,
        )

    def all_ids(self) -> np.ndarray:
        parts = [s.ids() for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def memory_bytes(self) -> int:
        return sum(s.memory_bytes() for s in self.shards)

    def set_threads(self, n: int) -> None:
        faiss.omp_set_num_threads(max(1, n))


def _write_counted(shard: Shard, path: Path) -> int:
    counts: list[int] = []

    def write(tmp: Path) -> None:
        counts.append(shard.write(tmp))

    atomic_write(path, write)
    return counts[0]
