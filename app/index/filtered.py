"""Filtered nearest-neighbour search that stays exact under ANN.

A filter must never shorten a result list while enough matches exist. Two strategies,
chosen by how many images pass the filter (the caller counts up to `EXACT_FILTER_LIMIT`):

* **Allow-list** (selective filters): the passing image ids come from the database.
  Up to `EXACT_SCAN_LIMIT` of them are scored exactly, every one
  (`ShardedIndex.search_subset`: an id selector on exact shards, the float16 exact
  vectors on IVF-PQ shards; recall 1 by construction). Longer lists are searched by the
  IVF-PQ index with a FAISS id selector (`SearchParameters.sel`), probing more lists
  the rarer the allowed ids are, until enough come back or every list was probed.
* **Accept and deepen** (broad filters): the ANN search runs unfiltered and candidates
  are checked against the filter afterwards; when too few pass, the search is repeated
  deeper (depth from the pass rate seen so far) and wider (more IVF lists) until enough
  pass, the scores fall below a floor, or the whole index has been searched.

Fetching a broad filter's ids (hundreds of thousands) from the database on every query
would cost more than the search; checking a few hundred candidates costs one indexed
query. `vsearch bench filters` measures both against exact filtered search.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from app.index.sharded import ShardedIndex

EXACT_SCAN_LIMIT = 10_000
"""Allow-lists up to this size are scored exactly (every vector read)."""

EXACT_FILTER_LIMIT = 100_000
"""Filters passing at most this many images are searched over their allow-list: exactly
up to `EXACT_SCAN_LIMIT`, above it by the ANN search restricted to the list."""

# Candidates re-ranked per wanted result in deep searches (the first round uses the
# index's own refine factor): deep lists need coverage more than per-rank precision.
_DEEP_REFINE = 4

Accept = Callable[[np.ndarray], np.ndarray]
"""Image ids -> a boolean mask of those passing the filter."""


@dataclass(frozen=True)
class Candidates:
    """Images passing a filter, best first, and whether no further one can exist."""

    scores: np.ndarray
    ids: np.ndarray
    exhausted: bool
    rounds: int = 1


def search_allowed(
    index: ShardedIndex, query: np.ndarray, ids: np.ndarray, n: int | None = None
) -> Candidates:
    """At least `n` images of the allow-list `ids` (all of them when fewer), best first.

    Small lists (or exact shards) are ranked exactly, every vector read. Larger ones on
    IVF-PQ shards are searched by the index with an id selector, so every candidate is
    allowed; the lists probed grow with how rare allowed ids are (1/sqrt of the share),
    doubling while too few come back, and a search of every list that still finds too
    few means none are left. Scores are exact either way (re-ranked).
    """
    if len(ids) == 0:
        return Candidates(np.zeros(0, np.float32), np.zeros(0, np.int64), True)
    if n is None or index.kind == "flat" or len(ids) <= EXACT_SCAN_LIMIT:
        scores, found = index.search_subset(query, ids, len(ids))
        valid = found[0] >= 0
        return Candidates(scores[0][valid], found[0][valid], True)
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    selector = faiss.IDSelectorBatch(ids)
    share = len(ids) / max(index.ntotal, 1)
    nprobe = min(index.nlist, math.ceil(index.default_nprobe / math.sqrt(share)))
    depth = min(max(n, 16), len(ids))
    rounds = 0
    while True:
        rounds += 1
        scores, found = index.search(query.reshape(1, -1), depth, nprobe=nprobe, selector=selector)
        valid = found[0] >= 0
        got = int(valid.sum())
        if got >= depth or nprobe >= index.nlist:
            # Every allowed id was returned, or every list was searched: none is left.
            exhausted = got < depth or depth >= len(ids)
            return Candidates(scores[0][valid], found[0][valid], exhausted, rounds)
        nprobe = min(index.nlist, 2 * nprobe)


def search_accepting(
    index: ShardedIndex,
    query: np.ndarray,
    n: int,
    accept: Accept | None = None,
    *,
    floor: float | None = None,
) -> Candidates:
    """At least `n` images passing `accept` (all images without one), best first, or
    every passing image when fewer exist.

    Stops early when the weakest candidate scores below `floor`: nothing deeper can pass
    a `min_score` either.
    """
    total = index.ntotal
    if total == 0:
        return Candidates(np.zeros(0, np.float32), np.zeros(0, np.int64), True, 0)
    first = depth = min(max(n, 16), total)
    nprobe = index.default_nprobe
    rounds = 0
    while True:
        rounds += 1
        refine = None if depth == first else max(_DEEP_REFINE, index.knobs.refine * first // depth)
        scores, found = index.search(query.reshape(1, -1), depth, nprobe=nprobe, refine=refine)
        valid = found[0] >= 0
        s, f = scores[0][valid], found[0][valid]
        keep = np.ones(len(f), dtype=bool) if accept is None else accept(f)
        passed = int(keep.sum())
        all_lists = index.kind == "flat" or nprobe >= index.nlist
        exhausted = all_lists and (depth >= total or not valid.all())
        below_floor = floor is not None and len(s) > 0 and float(s[-1]) < floor
        if passed >= n or exhausted or below_floor:
            return Candidates(s[keep], f[keep], exhausted, rounds)
        # The pass rate so far predicts how deep n passing candidates lie; 1.5x margin.
        rate = max(passed, 1) / max(len(f), 1)
        depth = min(total, max(2 * depth, math.ceil(1.5 * n / rate)))
        if index.kind != "flat":
            # Deeper results lie in more lists: probe at least 4x the share of the index
            # the depth stands for, and never fewer lists than twice the last round.
            share = math.ceil(4 * index.nlist * depth / total)
            nprobe = min(index.nlist, max(2 * nprobe, share))
