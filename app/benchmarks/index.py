"""`vsearch bench index`: exact search, the service's sharded IVF-PQ, and hnswlib, measured
side by side on the same synthetic vectors and queries.

Each row: `recall_at_10` (10-recall@10 against exact search), `qps_batch1`,
`qps_batch256`, `p50_ms`/`p99_ms` at batch 1, `build_s` (train + add),
`bytes_per_vector_resident` (index data held in RAM) and `bytes_per_vector_file` (on
disk, including the float16 exact-vector file used for re-ranking).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

from app.benchmarks.synthetic import EmbeddingMixture
from app.core.config import IndexSettings
from app.core.files import scratch_directory
from app.index.build import ivfpq_factory, train_template
from app.index.sharded import SearchKnobs, ShardedIndex
from app.index.tuning import tune
from app.index.vectors import ExactVectors

Say = Callable[[str], None]


class VectorSource(Protocol):
    """Where a workload's database vectors come from, in deterministic chunks."""

    dim: int

    def chunk(self, index: int, size: int) -> np.ndarray: ...

    def sample(self, n: int, stream: int = 2) -> np.ndarray: ...


class ArrayVectors:
    """Database vectors from an (n, d) float32 .npy file, e.g. real image embeddings
    (`vsearch bench augmented-embeddings`), read through a memory map. The last
    `held_out` rows are the queries and never enter the database; training samples are
    drawn from the database rows, as the service trains on its own catalogue.

    `images`: the source image of each row. Given, the database also leaves out every
    other view of the query images, so a query is a photo of something the catalogue has
    no photo of (its neighbours are other images), not one more view of a listed image.
    """

    def __init__(self, path: Path, held_out: int, images: np.ndarray | None = None) -> None:
        self.data = np.load(path, mmap_mode="r")
        if self.data.ndim != 2 or len(self.data) <= held_out:
            raise ValueError(f"{path}: need an (n, d) matrix with more than {held_out} rows")
        first_query = len(self.data) - held_out
        keep = np.ones(first_query, dtype=bool)
        if images is not None:
            if len(images) != len(self.data):
                raise ValueError(f"{path}: {len(images)} image numbers for {len(self.data)} rows")
            keep = ~np.isin(images[:first_query], images[first_query:])
        self.rows = np.flatnonzero(keep)
        self.first_query = first_query
        self.n = len(self.rows)
        self.dim = int(self.data.shape[1])

    def chunk(self, index: int, size: int) -> np.ndarray:
        rows = self.rows[index * size : (index + 1) * size]
        return np.ascontiguousarray(self.data[rows], np.float32)

    def sample(self, n: int, stream: int = 2) -> np.ndarray:
        rng = np.random.default_rng(stream)
        rows = np.sort(rng.choice(self.rows, size=min(n, self.n), replace=False))
        return np.ascontiguousarray(self.data[rows], np.float32)

    def queries(self) -> np.ndarray:
        return np.ascontiguousarray(self.data[self.first_query :], np.float32)


@dataclass
class Workload:
    mixture: VectorSource
    n: int
    chunk: int
    queries: np.ndarray
    truth: np.ndarray
    truth_scores: np.ndarray
    near_duplicate: np.ndarray  # which queries are near-duplicates of a database item
    truth_s: float
    sources: np.ndarray  # the database id each near-duplicate query was made from

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for c, start in enumerate(range(0, self.n, self.chunk)):
            size = min(self.chunk, self.n - start)
            yield start, self.mixture.chunk(c, self.chunk)[:size]


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def load_workload(
    path: Path, n_queries: int, chunk: int, say: Say, *, unseen: bool = False
) -> Workload:
    """A workload from a file of real embeddings: its last `n_queries` rows are the
    queries (no planted near-duplicates). `unseen`: leave every view of the query images
    out of the database (needs the `.images.npy` file written beside the vectors)."""
    images = None
    if unseen:
        from app.benchmarks.augmented import images_path

        source_images = images_path(path)
        if not source_images.exists():
            raise ValueError(f"{source_images} not found: it says which image each row is")
        images = np.load(source_images)
    source = ArrayVectors(path, n_queries, images)
    queries = source.queries()
    say(f"exact ground truth over {source.n} vectors from {path.name}")
    started = time.perf_counter()
    truth_scores, truth = _ground_truth(source, source.n, chunk, queries)
    return Workload(
        source,
        source.n,
        chunk,
        queries,
        truth,
        truth_scores,
        np.zeros(len(queries), dtype=bool),
        time.perf_counter() - started,
        np.zeros(0, dtype=np.int64),
    )


def make_workload(n: int, dim: int, n_queries: int, chunk: int, seed: int, say: Say) -> Workload:
    mixture = EmbeddingMixture(dim, seed=seed)
    rng = np.random.default_rng(seed)
    half = n_queries // 2
    sources = np.sort(rng.choice(n, size=half, replace=False))
    fresh = mixture.sample(n_queries - half, stream=5)
    picked = np.zeros((half, dim), dtype=np.float32)
    # Pass 1: the near-duplicate queries need their source rows.
    say("generating queries")
    for start, block in _chunks(mixture, n, chunk):
        inside = (sources >= start) & (sources < start + len(block))
        picked[inside] = block[sources[inside] - start]
    queries = np.concatenate([mixture.near_duplicates(picked), fresh])
    # Pass 2: exact top-10 by streaming the database.
    say("exact ground truth (streamed)")
    started = time.perf_counter()
    truth_scores, truth = _ground_truth(mixture, n, chunk, queries)
    flags = np.zeros(len(queries), dtype=bool)
    flags[:half] = True
    took = time.perf_counter() - started
    return Workload(mixture, n, chunk, queries, truth, truth_scores, flags, took, sources)


def _ground_truth(
    source: VectorSource, n: int, chunk: int, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-10 (scores, ids) of each query, streaming the database in chunks."""
    heap = faiss.ResultHeap(len(queries), 10, keep_max=True)
    for start, block in _chunks(source, n, chunk):
        scores = queries @ block.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10] if block.shape[0] > 10 else None
        if top is None:
            top = np.tile(np.arange(block.shape[0]), (len(queries), 1))
        heap.add_result(
            np.ascontiguousarray(np.take_along_axis(scores, top, 1), dtype=np.float32),
            np.ascontiguousarray(top + start, dtype=np.int64),
        )
    heap.finalize()
    return heap.D, heap.I


def _chunks(mixture: VectorSource, n: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    for c, start in enumerate(range(0, n, chunk)):
        yield start, mixture.chunk(c, chunk)[: min(chunk, n - start)]


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(
        len(set(f[:10].tolist()) & set(t[:10].tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / truth[:, :10].size


def time_searches(
    search: Callable[[np.ndarray, int], np.ndarray], queries: np.ndarray, batch1: int
) -> dict[str, float]:
    search(queries[:4], 10)  # warm
    latencies = []
    for q in queries[:batch1]:
        t0 = time.perf_counter()
        search(q[None, :], 10)
        latencies.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(queries), 256):
        search(queries[i : i + 256], 10)
    batch_s = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {
        "qps_batch1": round(len(latencies) / (lat.sum() / 1000), 1),
        "qps_batch256": round(len(queries) / batch_s, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
    }


def cold_searches(
    search: Callable[[np.ndarray, int], np.ndarray],
    queries: np.ndarray,
    vectors: ExactVectors,
    count: int,
) -> dict[str, float]:
    """Batch-1 QPS with the exact-vector file dropped from the page cache first: each
    re-ranked candidate is then a random read from disk until its page is cached again.
    The file is read back in afterwards, so later rows are measured warm."""
    vectors.evict()
    latencies = []
    for q in queries[-count:]:
        t0 = time.perf_counter()
        search(q[None, :], 10)
        latencies.append(time.perf_counter() - t0)
    lat = np.asarray(latencies) * 1000
    with open(vectors.path, "rb") as fh:  # warm again
        while fh.read(1 << 24):
            pass
    return {
        "cold_qps_batch1": round(len(lat) / (lat.sum() / 1000), 1),
        "cold_p50_ms": round(float(np.percentile(lat, 50)), 3),
        "cold_p99_ms": round(float(np.percentile(lat, 99)), 3),
    }


def quality(found: np.ndarray, w: Workload) -> dict[str, float | None]:
    """10-recall@10 against exact search, and how often the item a near-duplicate query
    was made from is among the 10 results (what duplicate detection needs)."""
    nd = w.near_duplicate
    source_found = [src in row for src, row in zip(w.sources, found[nd, :10].tolist(), strict=True)]
    return {
        "recall_at_10": round(recall_at_10(found, w.truth), 4),
        "near_duplicate_source_in_top10": (
            round(float(np.mean(source_found)), 4) if source_found else None
        ),
    }


def bench_flat(w: Workload, batch1: int, say: Say) -> dict[str, Any]:
    say("flat: exact inner-product search")
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(w.queries.shape[1])
    for _, block in w.chunks():
        index.add(block)
    build = time.perf_counter() - t0

    def search(q: np.ndarray, k: int) -> np.ndarray:
        return index.search(q, k)[1]

    found = search(w.queries, 10)
    row = {"name": "flat", **quality(found, w), **time_searches(search, w.queries, batch1)}
    row.update(
        build_s=round(build, 1),
        bytes_per_vector_resident=4 * index.d,
        bytes_per_vector_file=4 * index.d,
    )
    index.reset()
    return row


@dataclass(frozen=True)
class IvfConfig:
    factory: str
    nprobes: tuple[int, ...]
    refines: tuple[int, ...]
    shards: int | None = None
    """Shards of this index (None: the run's)."""

    @classmethod
    def parse(cls, spec: str, nprobes: tuple[int, ...], refines: tuple[int, ...]) -> IvfConfig:
        """`FACTORY` or `FACTORY@SHARDS` (e.g. `IVF1024,PQ256x4fsr@1`)."""
        factory, _, shards = spec.partition("@")
        if shards and not (shards.isdigit() and int(shards) >= 1):
            raise ValueError(f"{spec!r}: the shard count after @ must be a positive integer")
        return cls(factory, nprobes, refines, int(shards) if shards else None)


def build_sharded(
    w: Workload, config: IvfConfig, shards: int, workdir: Path, train_n: int, say: Say
) -> tuple[ShardedIndex, float, float]:
    sample = w.mixture.sample(train_n, stream=7)
    say(f"{config.factory}: training on {train_n}")
    t0 = time.perf_counter()
    template = train_template(sample, config.factory)
    train_s = time.perf_counter() - t0
    vectors = ExactVectors(workdir / f"vectors-{abs(hash(config.factory))}.f16", w.queries.shape[1])
    index = ShardedIndex.from_template(template, shards, vectors)
    say(f"{config.factory}: adding {w.n}")
    t0 = time.perf_counter()
    for start, block in w.chunks():
        index.upsert(np.arange(start, start + len(block), dtype=np.int64), block)
    add_s = time.perf_counter() - t0
    vectors.flush()
    return index, train_s, add_s


def file_bytes(index: ShardedIndex, workdir: Path) -> int:
    out = workdir / "files"
    names, _ = index.write_shards(out)
    total = sum((out / name).stat().st_size for name in names)
    for path in out.iterdir():
        path.unlink()
    return total + index.vectors.file_bytes()


def bench_ivf(
    w: Workload,
    config: IvfConfig,
    shards: int,
    workdir: Path,
    train_n: int,
    batch1: int,
    say: Say,
    *,
    sq8_variant: bool = True,
    cold: int = 0,
) -> list[dict[str, Any]]:
    """`cold`: also time this many batch-1 queries per row with the exact-vector file
    dropped from the page cache."""
    shards = config.shards or shards
    index, train_s, add_s = build_sharded(w, config, shards, workdir, train_n, say)
    resident = index.memory_bytes() / w.n
    on_disk = file_bytes(index, workdir) / w.n
    rows = []
    label = config.factory.replace(",", "_").replace("IVF", "ivf").replace("PQ", "pq").lower()
    for nprobe in config.nprobes:
        for refine in config.refines:
            knobs = SearchKnobs(nprobe=nprobe, refine=refine)

            def search(q: np.ndarray, k: int, knobs: SearchKnobs = knobs) -> np.ndarray:
                return index.search(q, k, nprobe=knobs.nprobe, refine=knobs.refine)[1]

            found = search(w.queries, 10)
            rows.append(
                {
                    "name": f"{label}_np{nprobe}_refine{refine}_x{shards}",
                    **quality(found, w),
                    **time_searches(search, w.queries, batch1),
                    "build_s": round(train_s + add_s, 1),
                    "train_s": round(train_s, 1),
                    "add_s": round(add_s, 1),
                    "bytes_per_vector_resident": round(resident, 1),
                    "bytes_per_vector_file": round(on_disk, 1),
                    "exact_vectors": "float16 memory-mapped file (page cache)",
                    **(cold_searches(search, w.queries, index.vectors, cold) if cold else {}),
                }
            )
            say(f"{rows[-1]['name']}: recall {rows[-1]['recall_at_10']}")
    if not sq8_variant:
        index.close()
        return rows
    # The alternative home for exact vectors: FAISS's own refine stage, held in RAM.
    assert index.template is not None
    ivf = faiss.clone_index(index.template)
    say(f"{config.factory}+RFlat-SQ8: FAISS IndexRefine with SQ8 in RAM")
    t0 = time.perf_counter()
    sq = faiss.IndexScalarQuantizer(
        ivf.d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    sq.train(w.mixture.sample(min(train_n, 50_000), stream=7))
    refine_index = faiss.IndexRefine(ivf, sq)
    for _, block in w.chunks():
        refine_index.add(block)
    sq_add = time.perf_counter() - t0
    nprobe, refine = config.nprobes[len(config.nprobes) // 2], config.refines[-1]

    # SWIG keeps no reference from the parent params to the child: hold both here, or the
    # IVF parameters are freed and the base search silently runs with nprobe=1.
    ivf_params = faiss.SearchParametersIVF()
    ivf_params.nprobe = nprobe
    hnsw_params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
    hnsw_params.efSearch = max(64, 2 * nprobe)
    if isinstance(faiss.downcast_index(faiss.extract_index_ivf(ivf).quantizer), faiss.IndexHNSW):
        ivf_params.quantizer_params = hnsw_params
    refine_params = faiss.IndexRefineSearchParameters()
    refine_params.k_factor = refine
    refine_params.base_index_params = ivf_params

    def search_sq(q: np.ndarray, k: int) -> np.ndarray:
        return refine_index.search(q, k, params=refine_params)[1]

    found = search_sq(w.queries, 10)
    base_resident = index.memory_bytes() / w.n
    rows.append(
        {
            "name": f"{label}_np{nprobe}_refine{refine}_sq8ram",
            **quality(found, w),
            **time_searches(search_sq, w.queries, batch1),
            "build_s": round(train_s + sq_add, 1),
            "bytes_per_vector_resident": round(base_resident + ivf.d, 1),
            "bytes_per_vector_file": round(base_resident + ivf.d, 1),
            "exact_vectors": "FAISS SQ8 refine in RAM (approximate re-ranking)",
        }
    )
    refine_index.reset()
    index.close()
    gc.collect()
    return rows


def bench_hnswlib(
    w: Workload, m: int, efs: tuple[int, ...], batch1: int, say: Say
) -> list[dict[str, Any]]:
    import hnswlib

    say(f"hnswlib M={m}: building")
    dim = w.queries.shape[1]
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=w.n, M=m, ef_construction=100)
    index.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    for start, block in w.chunks():
        index.add_items(block, np.arange(start, start + len(block)))
    build = time.perf_counter() - t0
    # hnswlib stores the float32 vector plus 2*M links (level 0) per element.
    resident = 4 * dim + 2 * m * 4 + 8 + 4
    rows = []
    for ef in efs:
        index.set_ef(max(ef, 10))

        def search(q: np.ndarray, k: int) -> np.ndarray:
            return index.knn_query(q, k=k)[0].astype(np.int64)

        found = search(w.queries, 10)
        rows.append(
            {
                "name": f"hnswlib_m{m}_ef{ef}",
                **quality(found, w),
                **time_searches(search, w.queries, batch1),
                "build_s": round(build, 1),
                "bytes_per_vector_resident": resident,
                "bytes_per_vector_file": resident,
            }
        )
        say(f"{rows[-1]['name']}: recall {rows[-1]['recall_at_10']}")
    gc.collect()
    return rows


def bench_shipped(
    w: Workload, shards: int, workdir: Path, batch1: int, target: float, say: Say
) -> dict[str, Any]:
    """The index exactly as the service builds it for `w.n` vectors (its factory and
    training sample), then tuned to `target` on a sample of its own vectors (as at every
    rebuild), then measured on the benchmark's queries, which the tuner never saw."""
    settings = IndexSettings()
    if w.n < settings.train_threshold:
        # The service searches exactly below the training threshold: recall 1 by design.
        row = bench_flat(w, batch1, say)
        row["name"] = f"shipped_exact_below_{settings.train_threshold}"
        row["target_recall"] = target
        return row
    factory, params = ivfpq_factory(w.n, w.queries.shape[1], settings)
    train_n = min(w.n, max(params["nlist"] * 40, 20_000))
    index, train_s, add_s = build_sharded(
        w, IvfConfig(factory, (), ()), shards, workdir, train_n, say
    )
    say(f"{factory}: tuning to recall@10 {target}")
    tuned = tune(index, target)
    assert tuned is not None
    index.knobs = SearchKnobs(nprobe=tuned.nprobe, refine=tuned.refine)

    def search(q: np.ndarray, k: int) -> np.ndarray:
        return index.search(q, k)[1]

    found = search(w.queries, 10)
    row = {
        "name": f"shipped_{factory.replace(',', '_').lower()}_tuned_x{shards}",
        **quality(found, w),
        **time_searches(search, w.queries, batch1),
        "target_recall": target,
        "tuned": {
            "nprobe": tuned.nprobe,
            "refine": tuned.refine,
            "recall_on_sample": tuned.recall,
            "recall_lower_bound_on_sample": tuned.recall_lower_bound,
            "reached": tuned.reached,
            "sample": tuned.queries,
            "tuning_s": tuned.took_s,
        },
        "build_s": round(train_s + add_s, 1),
        "bytes_per_vector_resident": round(index.memory_bytes() / w.n, 1),
        "bytes_per_vector_file": round(file_bytes(index, workdir) / w.n, 1),
    }
    say(f"{row['name']}: nprobe {tuned.nprobe} refine {tuned.refine}, recall {row['recall_at_10']}")
    index.close()
    gc.collect()
    return row


def default_configs(n: int, dim: int) -> list[IvfConfig]:
    """The service's codec (8-bit PQ, 64 bytes) across nprobe/refine, and 4-bit fast-scan
    PQ of the same size. (OPQ and 32-byte codes were measured and did not pay.)"""
    code_bytes = IndexSettings().pq_m
    nlist = int(2 ** round(np.log2(max(4 * np.sqrt(n), 16))))
    nlist = max(16, min(nlist, n // 39))
    hnsw = "_HNSW32" if nlist >= 1024 else ""
    probes = tuple(p for p in (nlist // 128, nlist // 64, nlist // 32, nlist // 16) if p >= 1)
    return [
        IvfConfig(f"IVF{nlist}{hnsw},PQ{code_bytes}", probes, (16, 32, 64)),
        IvfConfig(f"IVF{nlist}{hnsw},PQ{2 * code_bytes}x4fsr", probes[1::2], (32, 128)),
    ]


def run_index_benchmark(
    *,
    n: int,
    dim: int = 512,
    n_queries: int = 1000,
    shards: int = 4,
    batch1: int = 200,
    chunk: int = 100_000,
    seed: int = 0,
    flat: bool | None = None,
    hnsw: bool | None = None,
    configs: list[IvfConfig] | None = None,
    train_n: int | None = None,
    workdir: Path | None = None,
    progress: Say | None = None,
    shipped: float | None = None,
    vectors: Path | None = None,
    unseen: bool = False,
    hnsw_ms: tuple[int, ...] = (16, 32),
    hnsw_efs: tuple[int, ...] = (128, 256, 512, 1024),
    sq8: bool | None = None,
    cold: int = 0,
) -> dict[str, Any]:
    """`shipped`: only the service's own index at its defaults, tuned to this recall.
    `vectors`: a file of real embeddings instead of the synthetic mixture (`n` and `dim`
    then come from the file)."""
    say = progress or (lambda _m: None)
    started = time.perf_counter()
    rss0 = rss_bytes()
    if vectors is not None:
        w = load_workload(vectors, n_queries, chunk, say, unseen=unseen)
        n, dim = w.n, int(w.queries.shape[1])
    else:
        w = make_workload(n, dim, n_queries, chunk, seed, say)
    flat = n <= 2_000_000 if flat is None else flat
    hnsw = n <= 2_000_000 if hnsw is None else hnsw
    configs = configs or default_configs(n, dim)
    rows: list[dict[str, Any]] = []
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with scratch_directory(workdir) as tmp:
        if shipped is not None:
            flat = hnsw = False
            configs = []
            rows.append(bench_shipped(w, shards, Path(tmp), batch1, shipped, say))
        if flat:
            rows.append(bench_flat(w, batch1, say))
        for config in configs:
            nlist = int(config.factory.split("IVF")[1].split("_")[0].split(",")[0])
            train = train_n or min(n, max(nlist * 40, 50_000))
            rows += bench_ivf(
                w,
                config,
                shards,
                Path(tmp),
                train,
                batch1,
                say,
                sq8_variant=n <= 2_000_000 if sq8 is None else sq8,
                cold=cold,
            )
        if hnsw:
            for m in hnsw_ms:
                rows += bench_hnswlib(w, m, hnsw_efs, batch1, say)
    return {
        "workload": (
            f"file {vectors.name}" + (", query images left out of the database" if unseen else "")
            if vectors is not None
            else "synthetic clusters"
        ),
        "n": n,
        "dim": dim,
        "queries": n_queries,
        "near_duplicate_queries": int(w.near_duplicate.sum()),
        "shards": shards,
        "threads": faiss.omp_get_max_threads(),
        "ground_truth_s": round(w.truth_s, 1),
        "peak_rss_gb": round(max(rss_bytes("VmHWM"), rss0) / 1e9, 2),
        "total_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
