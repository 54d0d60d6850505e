"""IVF-PQ codes: the FAISS factory string for a catalogue size, and template training.

Pure FAISS, no database: the service's rebuilds, the evaluation and the benchmarks all
train their templates here, so they measure the codes the service serves.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from app.core.config import IndexSettings


def ivfpq_factory(n: int, dim: int, settings: IndexSettings) -> tuple[str, dict[str, Any]]:
    """The FAISS factory string for `n` vectors, and the parameters recorded with it."""
    nlist = settings.nlist or int(2 ** round(math.log2(max(4 * math.sqrt(n), 16))))
    nlist = max(1, min(nlist, n // 39 or 1))  # FAISS wants >= 39 training points per list
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 4096 else f"IVF{nlist}"
    code_bytes = settings.pq_m
    if settings.fast_scan and n >= 1000 and dim % (2 * code_bytes) == 0:
        # 4-bit codes: two sub-quantizers per byte, scanned with SIMD lookups.
        m, nbits, pq = 2 * code_bytes, 4, f"PQ{2 * code_bytes}x4fsr"
    else:
        m = code_bytes
        while dim % m:
            m -= 1
        # 8-bit codes need 256 training points per sub-quantizer; tiny sets get fewer bits.
        nbits = max(1, min(8, int(math.log2(max(n, 2)))))
        pq = f"PQ{m}" if nbits == 8 else f"PQ{m}x{nbits}"
    prefix = f"OPQ{m}," if settings.opq else ""
    params = {"nlist": nlist, "pq_m": m, "pq_bits": nbits, "opq": settings.opq}
    return f"{prefix}{coarse},{pq}", params


def train_template(sample: np.ndarray, factory: str) -> faiss.Index:
    """A trained, empty inner-product index of `factory`: the template every shard clones."""
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.verbose = False
    ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        # On by default from the factory; it costs most of the training time and only
        # serves polysemous filtering, which these indexes do not use.
        ivf.do_polysemous_training = False
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index
