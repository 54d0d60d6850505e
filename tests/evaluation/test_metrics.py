"""The metrics against an independent, loop-by-loop computation of the same definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.evaluation.metrics import average_precision, evaluate_scores


def reference_metrics(
    scores: np.ndarray, q_labels: list[int], g_labels: list[int]
) -> dict[str, float]:
    aps, tops = [], {1: [], 3: [], 5: []}
    for q, label in enumerate(q_labels):
        gtp = g_labels.count(label)
        if gtp == 0:
            continue
        # ties: the earlier gallery item first
        ranked = sorted(range(len(g_labels)), key=lambda j: (-scores[q][j], j))[:1000]
        hits, total = 0, 0.0
        for k, j in enumerate(ranked, start=1):
            if g_labels[j] == label:
                hits += 1
                total += hits / k
        aps.append(total / gtp)
        for t in tops:
            tops[t].append(any(g_labels[j] == label for j in ranked[:t]))
    return {
        "map_at_1000": sum(aps) / len(aps),
        "top1": sum(tops[1]) / len(tops[1]),
        "top3": sum(tops[3]) / len(tops[3]),
        "top5": sum(tops[5]) / len(tops[5]),
    }


class TestAveragePrecision:
    def test_textbook_case(self) -> None:
        # relevant at ranks 1 and 3 of 2 positives: (1/1 + 2/3) / 2
        assert average_precision(np.array([1, 0, 1, 0], bool), 2) == pytest.approx((1 + 2 / 3) / 2)

    def test_positives_ranked_past_the_depth_count_in_gtp(self) -> None:
        relevant = np.zeros(1200, bool)
        relevant[[0, 1100]] = True
        assert average_precision(relevant, 2) == pytest.approx(0.5)

    def test_no_positive(self) -> None:
        assert math.isnan(average_precision(np.zeros(3, bool), 0))


class TestEvaluateScores:
    def test_matches_the_reference_on_random_data(self) -> None:
        rng = np.random.default_rng(0)
        g_labels = rng.integers(0, 15, size=120)
        q_labels = rng.integers(0, 15, size=60)
        scores = rng.normal(size=(60, 120)).round(1)  # rounding makes many ties
        got = evaluate_scores(scores, q_labels, g_labels).as_dict()
        want = reference_metrics(scores.tolist(), q_labels.tolist(), g_labels.tolist())
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6), key

    def test_ties_break_by_gallery_order(self) -> None:
        scores = np.array([[0.5, 0.5, 0.5]])
        first = evaluate_scores(scores, np.array([1]), np.array([1, 2, 2]))
        last = evaluate_scores(scores, np.array([1]), np.array([2, 2, 1]))
        assert first.top1 == 1.0
        assert last.top1 == 0.0
        assert last.map_at_1000 == pytest.approx(1 / 3)

    def test_queries_without_a_positive_are_counted_not_averaged(self) -> None:
        scores = np.array([[0.9, 0.1], [0.2, 0.8]])
        metrics = evaluate_scores(scores, np.array([0, 7]), np.array([0, 1]))
        assert metrics.queries == 2
        assert metrics.queries_without_positive == 1
        assert metrics.map_at_1000 == 1.0
        assert metrics.top1 == 1.0

    def test_delta_similarity(self) -> None:
        scores = np.array([[0.9, 0.1, 0.3]])
        metrics = evaluate_scores(scores, np.array([0]), np.array([0, 1, 2]))
        assert metrics.delta_similarity == pytest.approx(0.9 - 0.2)
