"""Filtered nearest-neighbour search that stays exact under ANN.

A filter must never shorten a result list while enough matches exist. Two strategies,
chosen by how many images pass the filter (the caller counts up to `EXACT_FILTER_LIMIT`):

* **Allow-list** (selective filters): the passing image ids are scored exactly, every
  one of them (`ShardedIndex.search_subset`: an id selector on exact shards, the float16
  exact vectors on IVF-PQ shards). Recall is 1 by construction, and the cost grows with
  the allow-list, not the catalogue.
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

import numpy as np

from app.index.sharded import ShardedIndex

EXACT_FILTER_LIMIT = 50_000
"""Filters passing at most this many images are searched over their allow-list."""

Accept = Callable[[np.ndarray], np.ndarray]
"""Image ids -> a boolean mask of those passing the filter."""


@dataclass(frozen=True)
class Candidates:
    """Images passing a filter, best first, and whether no further one can exist."""

    scores: np.ndarray
    ids: np.ndarray
    exhausted: bool
    rounds: int = 1


def search_allowed(index: ShardedIndex, query: np.ndarray, ids: np.ndarray) -> Candidates:
    """Every image of the allow-list `ids`, ranked exactly."""
    if len(ids) == 0:
        return Candidates(np.zeros(0, np.float32), np.zeros(0, np.int64), True)
    scores, found = index.search_subset(query, ids, len(ids))
    valid = found[0] >= 0
    return Candidates(scores[0][valid], found[0][valid], True)


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
    depth = min(max(n, 16), total)
    nprobe = index.default_nprobe
    rounds = 0
    while True:
        rounds += 1
        scores, found = index.search(query.reshape(1, -1), depth, nprobe=nprobe)
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
