"""One FAISS index holding a hash-slice of the image ids.

FAISS searches may run concurrently, but not alongside add/remove on the same index, so
each shard has a readers-writer lock: many searches, or one writer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np


class RWLock:
    """Writer-preferring readers-writer lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def new_flat(dim: int) -> faiss.Index:
    """An exact inner-product index that keeps external ids (and can reconstruct)."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def prepare_ivf(index: faiss.Index) -> faiss.Index:
    """Give a trained IVF index a hash direct map, so removals are lookups.

    Fast-scan (4-bit PQ) lists are packed in blocks and cannot have one; removing from
    them scans the lists, which `Shard` only does for ids it may actually hold.
    """
    ivf = faiss.extract_index_ivf(index)
    try:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
    except RuntimeError:
        pass
    return index


class Shard:
    def __init__(self, index: faiss.Index, kind: str) -> None:
        self.index: Any = index
        self.kind = kind
        self.lock = RWLock()
        self._ivf: Any = faiss.extract_index_ivf(index) if kind == "ivfpq" else None
        self._hnsw_quantizer = self._ivf is not None and isinstance(
            faiss.downcast_index(self._ivf.quantizer), faiss.IndexHNSW
        )
        # Ids above the largest one ever added cannot be present: new images (the common
        # case) skip removal entirely.
        self._max_id = int(self.ids().max()) if self.ntotal else -1

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def upsert(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add or replace: remove the ids first, so applying twice changes nothing."""
        if len(ids) == 0:
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.lock.write():
            present = self._present(ids)
            if len(present):
                self.index.remove_ids(present)
            self.index.add_with_ids(vectors, ids)
            self._max_id = max(self._max_id, int(ids.max()))

    def _present(self, ids: np.ndarray) -> np.ndarray:
        """Ids that may already be in the shard (only those are removed first). A flat
        shard's removal rewrites its whole array, so it checks each candidate."""
        candidates = ids[ids <= self._max_id]
        if self.kind != "flat" or not len(candidates):
            return candidates
        found = []
        for i in candidates:
            try:
                self.index.reconstruct(int(i))
            except RuntimeError:
                continue
            found.append(i)
        return np.asarray(found, dtype=np.int64)

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        with self.lock.write():
            return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        nprobe: int | None = None,
        selector: faiss.IDSelector | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        params: Any = None
        quantizer_params: Any = None  # held here: SWIG parents do not keep children alive
        if self.kind == "ivfpq":
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe or self._ivf.nprobe
            quantizer_params = self._quantizer_params(params.nprobe)
            if quantizer_params is not None:
                params.quantizer_params = quantizer_params
        elif selector is not None:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        with self.lock.read():
            if self.index.ntotal == 0:
                n = len(queries)
                return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
            scores, ids = self.index.search(queries, k, params=params)
            return scores, ids

    @property
    def plain_ivf(self) -> bool:
        """An IVF index searched as it is (no transform before it): its lists can be
        searched with a coarse assignment computed elsewhere."""
        return self._ivf is not None and not isinstance(self.index, faiss.IndexPreTransform)

    def assign(self, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """The `nprobe` nearest lists of each query, and their coarse scores, as `search`
        finds them (the same quantizer parameters)."""
        params = self._quantizer_params(nprobe)
        with self.lock.read():
            scores, lists = self._ivf.quantizer.search(queries, nprobe, params=params)
        return scores, lists

    def _quantizer_params(self, nprobe: int) -> Any:
        """Search parameters for the coarse quantizer, or None. An HNSW quantizer only
        finds `nprobe` good lists if its beam is at least that wide; its default (16)
        silently caps nprobe."""
        if not self._hnsw_quantizer:
            return None
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(64, 2 * nprobe)
        return params

    def search_preassigned(
        self,
        queries: np.ndarray,
        k: int,
        lists: np.ndarray,
        coarse: np.ndarray,
        *,
        selector: faiss.IDSelector | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search`, given each query's lists (`assign`): shards cloned from one trained
        template share their quantizer, so a batch is assigned once for all of them."""
        n, nprobe = lists.shape
        params: Any = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if selector is not None:
            params.sel = selector
        scores = np.full((n, k), -np.inf, np.float32)
        found = np.full((n, k), -1, np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        coarse = np.ascontiguousarray(coarse, dtype=np.float32)
        with self.lock.read():
            if self.index.ntotal == 0:
                return scores, found
            self._ivf.search_preassigned_c(
                n,
                faiss.swig_ptr(queries),
                k,
                faiss.swig_ptr(lists),
                faiss.swig_ptr(coarse),
                faiss.swig_ptr(scores),
                faiss.swig_ptr(found),
                False,
                params,
            )
        return scores, found

    def ids(self) -> np.ndarray:
        """All ids in the shard (for consistency checks and tests)."""
        with self.lock.read():
            if self.kind == "flat":
                return faiss.vector_to_array(self.index.id_map).astype(np.int64)
            invlists = self._ivf.invlists
            parts = []
            for list_no in range(self._ivf.nlist):
                size = invlists.list_size(list_no)
                if size:
                    ptr = invlists.get_ids(list_no)
                    parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                    invlists.release_ids(list_no, ptr)
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def write(self, path: Path) -> int:
        """Write the index file; returns how many vectors it holds."""
        with self.lock.read():
            faiss.write_index(self.index, str(path))
            return int(self.index.ntotal)

    @classmethod
    def read(cls, path: Path, kind: str) -> Shard:
        index = faiss.read_index(str(path))
        if kind == "ivfpq":
            prepare_ivf(index)
        return cls(index, kind)

    def memory_bytes(self) -> int:
        """Bytes the index's data takes in RAM: codes, ids and coarse centroids."""
        n = self.ntotal
        if self.kind == "flat":
            return n * (4 * self.index.d + 8)
        ivf = self._ivf
        return n * (int(ivf.code_size) + 8) + int(ivf.nlist) * int(ivf.d) * 4
