"""Calibrated match probabilities: P(same product | score), fitted on review decisions.

A raw cosine means different things per model and per category, so the reviewers'
decisions are turned into probabilities, per model id:

- below `min_labels` decisions (or fewer than 5 of either kind) there is no calibration
  and the API says `calibrated: false`: no invented numbers;
- from `min_labels` up to `isotonic_labels` decisions: Platt scaling, a logistic
  regression on the score (two parameters; stable with few labels);
- from `isotonic_labels` decisions (default 1000): isotonic regression, which follows any
  monotone shape but overfits small samples (Niculescu-Mizil & Caruana, 2005, found it
  better than Platt only past about a thousand calibration examples).

A category with `min_labels` decisions of its own (both products in it) gets its own fit,
used for pairs within that category. Decisions store the score they were made at, so a
pair marked `different` (which leaves the pairs table) still counts; decisions stored
without one, or scored by another model, are scored again from the current embeddings.

Tiers: `exact` for byte-identical images or a score >= `exact_score`; otherwise `same` at
P >= `same_probability`, `similar` below it; no tier but `exact` until calibrated.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np

from app.catalogue import review_repository as review_repo
from app.catalogue.models import utcnow
from app.core.database import Database

LOG = logging.getLogger(__name__)

Tier = Literal["exact", "same", "similar"]
MIN_PER_CLASS = 5
ALL_CATEGORIES = ""


@dataclass(frozen=True)
class CalibrationPolicy:
    min_labels: int = 50
    isotonic_labels: int = 1000
    refit_every: int = 20
    same_probability: float = 0.9
    exact_score: float = 0.995


@dataclass(frozen=True)
class Calibrator:
    """One fitted P(same | score)."""

    category: str
    method: Literal["platt", "isotonic"]
    labels: int
    positives: int
    params: dict[str, Any]
    fitted_at: datetime

    def probability(self, scores: Any) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if self.method == "platt":
            z = self.params["coef"] * s + self.params["intercept"]
            return np.asarray(1.0 / (1.0 + np.exp(-z)))
        x = np.asarray(self.params["x"], dtype=np.float64)
        y = np.asarray(self.params["y"], dtype=np.float64)
        return np.asarray(np.interp(s, x, y))

    def lowest_score_for(self, probability: float, floor: float) -> float | None:
        """The lowest score in [floor, 1] whose probability reaches `probability` (the
        fits are non-decreasing in the score); None when no score does."""
        grid = np.linspace(floor, 1.0, 4001)
        hits = np.nonzero(self.probability(grid) >= probability)[0]
        return float(grid[hits[0]]) if hits.size else None


def fit_calibrator(
    scores: Sequence[float], same: Sequence[bool], policy: CalibrationPolicy, category: str = ""
) -> Calibrator | None:
    """Platt or isotonic by the label count; None below the minimum."""
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    positives = int(y.sum())
    if (
        len(x) < policy.min_labels
        or positives < MIN_PER_CLASS
        or len(x) - positives < MIN_PER_CLASS
    ):
        return None
    params: dict[str, Any]
    if len(x) >= policy.isotonic_labels:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(x, y.astype(np.float64))
        params = {
            "x": [float(v) for v in iso.X_thresholds_],
            "y": [float(v) for v in iso.y_thresholds_],
        }
        method: Literal["platt", "isotonic"] = "isotonic"
    else:
        from sklearn.linear_model import LogisticRegression

        # Nearly unregularised: scores span a narrow range (say 0.8-1.0), where the
        # default penalty would flatten the slope towards the base rate.
        model = LogisticRegression(C=1e6, max_iter=1000)
        model.fit(x.reshape(-1, 1), y)
        params = {"coef": float(model.coef_[0][0]), "intercept": float(model.intercept_[0])}
        method = "platt"
    return Calibrator(category, method, len(x), positives, params, utcnow())


@dataclass
class Calibration:
    """The fits of one model: over all categories, and per category where possible."""

    model_id: str
    overall: Calibrator | None
    categories: dict[str, Calibrator] = field(default_factory=dict)
    labels: int = 0

    @property
    def calibrated(self) -> bool:
        return self.overall is not None

    def for_pair(self, category_a: str | None, category_b: str | None) -> Calibrator | None:
        if category_a is not None and category_a == category_b:
            own = self.categories.get(category_a)
            if own is not None:
                return own
        return self.overall

    def all(self) -> list[Calibrator]:
        return [c for c in (self.overall, *self.categories.values()) if c is not None]


class CalibrationService:
    """Fits, stores and serves the calibration of the current model's scores."""

    def __init__(self, db: Database, policy: CalibrationPolicy, *, cache_s: float = 10.0) -> None:
        self.db = db
        self.policy = policy
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Calibration]] = {}
        self._tried: dict[str, int] = {}  # label count at the last fit attempt
        self._fitting = threading.Lock()

    # reading ----------------------------------------------------------------------------
    def current(self, model_id: str) -> Calibration:
        """The stored fits (cached briefly: other replicas' refits show within seconds)."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(model_id)
            if cached is not None and now - cached[0] < self.cache_s:
                return cached[1]
        with self.db.read() as session:
            rows = review_repo.calibrations(session, model_id)
            labels = review_repo.count_decisions(session)
        calibration = Calibration(model_id, None, labels=labels)
        for row in rows:
            fitted = Calibrator(
                row.category,
                "isotonic" if row.method == "isotonic" else "platt",
                row.labels,
                row.positives,
                dict(row.params),
                row.fitted_at,
            )
            if row.category == ALL_CATEGORIES:
                calibration.overall = fitted
            else:
                calibration.categories[row.category] = fitted
        with self._lock:
            self._cache[model_id] = (now, calibration)
        return calibration

    def tier(self, probability: float | None, exact: bool) -> Tier | None:
        if exact:
            return "exact"
        if probability is None:
            return None
        return "same" if probability >= self.policy.same_probability else "similar"

    # fitting ----------------------------------------------------------------------------
    def fit(self, model_id: str) -> Calibration:
        """Fit on every decision (scoring those stored without a score by this model)."""
        with self.db.read() as session:
            decisions = review_repo.labelled_decisions(session)
            missing = [(a, b) for a, b, _, s, m, _, _ in decisions if s is None or m != model_id]
            vectors = review_repo.product_vectors(session, [pk for p in missing for pk in p])
        rescored = {(a, b): pair_score(vectors[a], vectors[b]) for a, b in missing}
        if rescored:
            with self.db.write() as session:
                for (a, b), score in rescored.items():
                    review_repo.set_decision_score(session, a, b, score, model_id)
        scores: list[float] = []
        same: list[bool] = []
        by_category: dict[str, tuple[list[float], list[bool]]] = {}
        for a, b, decision, score, _, cat_a, cat_b in decisions:
            value = rescored.get((a, b), score)
            if value is None:  # a product without images: nothing to learn from
                continue
            scores.append(value)
            same.append(decision == "same")
            if cat_a is not None and cat_a == cat_b:
                xs, ys = by_category.setdefault(cat_a, ([], []))
                xs.append(value)
                ys.append(decision == "same")
        overall = fit_calibrator(scores, same, self.policy)
        categories: dict[str, Calibrator] = {}
        if overall is not None:
            for category, (xs, ys) in by_category.items():
                own = fit_calibrator(xs, ys, self.policy, category)
                if own is not None:
                    categories[category] = own
        rows = [
            {
                "category": c.category,
                "method": c.method,
                "labels": c.labels,
                "positives": c.positives,
                "params": c.params,
                "fitted_at": c.fitted_at,
            }
            for c in ([overall] if overall else []) + list(categories.values())
        ]
        with self.db.write() as session:
            review_repo.replace_calibrations(session, model_id, rows)
        calibration = Calibration(model_id, overall, categories, labels=len(decisions))
        with self._lock:
            self._cache[model_id] = (time.monotonic(), calibration)
        LOG.info(
            "calibration of %s: %s on %d decisions, %d categories of their own",
            model_id,
            overall.method if overall else "not enough decisions",
            len(scores),
            len(categories),
        )
        return calibration

    def maybe_refit(self, model_id: str) -> None:
        """Refit once enough new decisions came in since the last fit: `refit_every`, or
        5% of the decisions when that is more (a fit reads them all). One fit at a time
        per process; a failed refit is logged and never fails the decision that asked
        for it (another replica may be fitting the same rows)."""
        with self.db.read() as session:
            labels = review_repo.count_decisions(session)
        if labels < self.policy.min_labels:
            return
        tried = self._tried.get(model_id)
        if tried is None:
            current = self.current(model_id)
            tried = current.overall.labels if current.overall is not None else 0
        due = max(self.policy.refit_every, labels // 20)
        if tried and abs(labels - tried) < due:
            return
        if not self._fitting.acquire(blocking=False):
            return  # a fit is running; it or the next decision will catch up
        try:
            self._tried[model_id] = labels
            self.fit(model_id)
        except Exception:  # noqa: BLE001 - the decision is stored; the fit can wait
            LOG.exception("refitting the calibration of %s failed", model_id)
        finally:
            self._fitting.release()


def pair_score(a: Sequence[bytes], b: Sequence[bytes]) -> float | None:
    """A pair's score as the duplicates scan defines it: the best cosine between any image
    of one product and any image of the other."""
    if not a or not b:
        return None
    va = np.stack([np.frombuffer(e, dtype=np.float32) for e in a])
    vb = np.stack([np.frombuffer(e, dtype=np.float32) for e in b])
    return min(float((va @ vb.T).max()), 1.0)
