"""Retrieval metrics in the Products-10K protocol.

- mAP@1000: AP = (1/GTP) * sum over ranks k <= 1000 of P@k * rel@k, GTP = the number of
  gallery items of the query's product (all of them, also those ranked past 1000);
- top-k accuracy: a gallery item of the query's product within the first k;
- delta similarity: cosine to the best true match minus the mean cosine to 20 random
  non-matching gallery items (fixed seed).

Rankings sort by score, highest first, ties broken by gallery order (a stable sort), so
the figures are deterministic. Queries whose product has no gallery item cannot be
answered right; they are left out of every average and counted separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAP_DEPTH = 1000


def rank_gallery(scores: np.ndarray, depth: int = MAP_DEPTH) -> np.ndarray:
    """Gallery indices by descending score (stable on ties), first `depth` per query."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :depth]


def average_precision(relevant: np.ndarray, positives: int, depth: int = MAP_DEPTH) -> float:
    """AP of one ranked relevance vector (True where the item is of the query's product)."""
    if positives == 0:
        return float("nan")
    rel = np.asarray(relevant[:depth], dtype=bool)
    hits = np.cumsum(rel)
    precision = hits / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / positives)


@dataclass
class RetrievalMetrics:
    map_at_1000: float
    top1: float
    top3: float
    top5: float
    delta_similarity: float
    queries: int
    gallery: int
    queries_without_positive: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _mean(values: list[float] | list[bool]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def evaluate_rankings(
    ranked_labels: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    delta: np.ndarray | None = None,
) -> RetrievalMetrics:
    """Metrics from ranked gallery labels (n_queries, depth), one row per query.

    Args:
        ranked_labels: The product label of each ranked gallery item (padding: -1).
        query_labels: The product of each query.
        gallery_labels: The product of each gallery item (for the positive counts).
        delta: Per-query delta similarities, when computed.
    """
    positives_per_label: dict[int, int] = {}
    for label in gallery_labels.tolist():
        positives_per_label[label] = positives_per_label.get(label, 0) + 1
    aps, top1, top3, top5 = [], [], [], []
    without = 0
    for row, label in zip(ranked_labels, query_labels.tolist(), strict=True):
        positives = positives_per_label.get(label, 0)
        if positives == 0:
            without += 1
            continue
        relevant = row == label
        aps.append(average_precision(relevant, positives))
        top1.append(bool(relevant[:1].any()))
        top3.append(bool(relevant[:3].any()))
        top5.append(bool(relevant[:5].any()))
    answered = np.ones(len(query_labels), dtype=bool)
    if without:
        answered = np.asarray([positives_per_label.get(q, 0) > 0 for q in query_labels.tolist()])
    return RetrievalMetrics(
        map_at_1000=_mean(aps),
        top1=_mean(top1),
        top3=_mean(top3),
        top5=_mean(top5),
        delta_similarity=(
            float(np.nanmean(delta[answered]))
            if delta is not None and answered.any()
            else float("nan")
        ),
        queries=len(query_labels),
        gallery=len(gallery_labels),
        queries_without_positive=without,
    )


def delta_similarity(
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    negatives: int = 20,
    seed: int = 0,
) -> np.ndarray:
    """Per query: best true-match cosine minus the mean cosine to random non-matches."""
    rng = np.random.default_rng(seed)
    out = np.full(len(query_labels), np.nan)
    for q, label in enumerate(query_labels.tolist()):
        match = gallery_labels == label
        if not match.any() or match.all():
            continue
        others = np.flatnonzero(~match)
        picked = rng.choice(others, size=min(negatives, len(others)), replace=False)
        out[q] = scores[q, match].max() - scores[q, picked].mean()
    return out


def evaluate_scores(
    scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray
) -> RetrievalMetrics:
    """All metrics from a full query x gallery cosine matrix."""
    order = rank_gallery(scores)
    return evaluate_rankings(
        gallery_labels[order],
        query_labels,
        gallery_labels,
        delta=delta_similarity(scores, query_labels, gallery_labels),
    )


def group_breakdown(
    scores: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    query_groups: np.ndarray,
) -> dict[str, dict[str, float | int]]:
    """The metrics per query group (e.g. Fruit / Vegetables / Packages)."""
    out = {}
    for group in sorted(set(query_groups.tolist())):
        mask = query_groups == group
        out[str(group)] = evaluate_scores(
            scores[mask], query_labels[mask], gallery_labels
        ).as_dict()
    return out
