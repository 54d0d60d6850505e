"""Fitting P(same | score): no numbers without enough labels, Platt while labels are
few, isotonic past the documented count, and probabilities that match the label rates."""

from __future__ import annotations

import numpy as np

from app.catalogue.calibration import CalibrationPolicy, fit_calibrator

POLICY = CalibrationPolicy(min_labels=50, isotonic_labels=1000)


def labelled(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores in [0.8, 1] with labels drawn from a known P(same | score)."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.8, 1.0, n)
    truth = 1 / (1 + np.exp(-(scores - 0.9) * 60))
    return scores, rng.uniform(size=n) < truth, truth


def test_too_few_labels_give_no_calibration() -> None:
    scores, same, _ = labelled(49)
    assert fit_calibrator(scores, same, POLICY) is None


def test_one_kind_of_label_gives_no_calibration() -> None:
    scores = np.linspace(0.8, 1.0, 200)
    assert fit_calibrator(scores, np.ones(200, dtype=bool), POLICY) is None
    few_different = np.arange(200) >= 4  # 4 `different`: fewer than 5 of that kind
    assert fit_calibrator(scores, few_different, POLICY) is None


def test_platt_while_labels_are_few_and_it_follows_the_truth() -> None:
    scores, same, _ = labelled(300)
    fitted = fit_calibrator(scores, same, POLICY)
    assert fitted is not None
    assert fitted.method == "platt"
    assert fitted.labels == 300
    grid = np.linspace(0.8, 1.0, 81)
    p = fitted.probability(grid)
    assert np.all(np.diff(p) >= 0)
    truth = 1 / (1 + np.exp(-(grid - 0.9) * 60))
    assert np.abs(p - truth).max() < 0.15
    assert fitted.lowest_score_for(0.5, 0.8) is not None
    assert abs(fitted.lowest_score_for(0.5, 0.8) - 0.9) < 0.02  # type: ignore[operator]


def test_isotonic_past_the_documented_count() -> None:
    scores, same, _ = labelled(3000, seed=1)
    fitted = fit_calibrator(scores, same, POLICY)
    assert fitted is not None
    assert fitted.method == "isotonic"
    grid = np.linspace(0.8, 1.0, 81)
    p = fitted.probability(grid)
    assert np.all(np.diff(p) >= -1e-12)
    # calibrated on held-out labels: the mean probability per bin matches the rate
    test_scores, test_same, _ = labelled(3000, seed=2)
    predicted = fitted.probability(test_scores)
    bins = np.digitize(predicted, np.linspace(0, 1, 11)[1:-1])
    ece = sum(
        abs(predicted[bins == b].mean() - test_same[bins == b].mean()) * (bins == b).mean()
        for b in range(10)
        if (bins == b).any()
    )
    assert ece < 0.05


def test_a_category_with_its_own_fit_uses_it() -> None:
    """Scores mean more in one category than another: its pairs get its own curve."""
    from app.catalogue.calibration import Calibration

    scores, same, _ = labelled(400, seed=3)
    overall = fit_calibrator(scores, same, POLICY)
    # in "produce", photos of different products look alike: the same score is weaker
    shifted = fit_calibrator(scores + 0.03, same, POLICY, category="produce")
    assert overall is not None
    assert shifted is not None
    calibration = Calibration("m", overall, {"produce": shifted})

    assert calibration.for_pair("produce", "produce") is shifted
    assert calibration.for_pair("produce", "dairy") is overall
    assert calibration.for_pair(None, None) is overall
    assert calibration.for_pair("dairy", "dairy") is overall  # no fit of its own
    assert shifted.probability(0.9) < overall.probability(0.9)
