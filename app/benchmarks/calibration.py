"""`vsearch bench calibration`: how well calibrated the duplicate probabilities are on real
photos, measured on decisions the calibration never saw.

The grocery-store gallery photos become a catalogue (one product listing per photo; the
fine-grained class is the real product, so two listings of one class are duplicates). The
service embeds them, finds pairs above the floor as it does in production, and a
simulated reviewer decides, from the ground-truth classes, every pair whose two
listings both belong to the first half of the classes. The calibration is fitted on those
decisions by the service itself; it is evaluated on the pairs of the other half (classes
it never saw): expected calibration error (10 equal-width bins), Brier score, and
precision and recall at the `same` tier. Pairs across the halves are left out of both.
"""

from __future__ import annotations

import asyncio
import csv
import tempfile
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import numpy as np

from app.catalogue.calibration import CalibrationPolicy, fit_calibrator
from app.catalogue.service import ImageInput, ProductInput
from app.core.config import Settings

Say = Callable[[str], None]
# `app.services.open_services`, passed in by the CLI (benchmarks sit beside the
# composition root, not above it).
OpenServices = Callable[..., AbstractAsyncContextManager[Any]]


def expected_calibration_error(probability: np.ndarray, same: np.ndarray, bins: int = 10) -> float:
    """Mean |predicted - observed| over equal-width probability bins, weighted by size."""
    which = np.minimum((probability * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += abs(probability[inside].mean() - same[inside].mean()) * inside.mean()
    return float(total)


def reliability_diagram(
    path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, bins: int = 10
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for (label, (probability, same)), marker in zip(curves.items(), "os^", strict=False):
        which = np.minimum((probability * bins).astype(int), bins - 1)
        xs, ys, ns = [], [], []
        for b in range(bins):
            inside = which == b
            if inside.any():
                xs.append(probability[inside].mean())
                ys.append(same[inside].mean())
                ns.append(int(inside.sum()))
        ece = expected_calibration_error(probability, same, bins)
        top.plot(xs, ys, marker=marker, label=f"{label} (ECE {ece:.3f})")
        bottom.hist(probability, bins=edges, alpha=0.5, label=label)
    top.set_ylabel("observed fraction `same` (held-out decisions)")
    top.set_title(title, fontsize=9)
    top.legend(loc="upper left", fontsize=8)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    bottom.set_xlabel("predicted P(same product)")
    bottom.set_ylabel("pairs")
    bottom.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_gallery(dataset: Path, per_class: int) -> list[tuple[str, Path, str, str]]:
    """(listing id, image path, class id, group) for up to `per_class` photos per class."""
    root = dataset / "dataset"
    rows: list[tuple[str, Path, str, str]] = []
    taken: dict[str, int] = {}
    with (dataset / "protocols" / "photos" / "gallery.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            label = row["product_id"]
            if taken.get(label, 0) >= per_class:
                continue
            taken[label] = taken.get(label, 0) + 1
            rows.append(
                (f"photo-{row['seller_img_id']}", root / row["img_path"], label, row["group"])
            )
    return rows


def run_calibration_benchmark(
    *,
    open_services: OpenServices,
    dataset: Path,
    model: Path,
    per_class: int = 15,
    floor: float = 0.5,
    neighbours: int = 20,
    seed: int = 0,
    plot: Path | None = None,
    base: Settings | None = None,
    say: Say = lambda _: None,
) -> dict[str, Any]:
    gallery = read_gallery(dataset, per_class)
    label_of = {listing: label for listing, _, label, _ in gallery}
    classes = sorted({label for _, _, label, _ in gallery}, key=int)
    rng = np.random.default_rng(seed)
    fit_half = set(rng.permutation(classes)[: len(classes) // 2].tolist())

    with tempfile.TemporaryDirectory(prefix="vs-calibration-") as tmp:
        settings = (base or Settings()).model_copy(
            update={
                "model": str(model),
                "data_dir": Path(tmp),
                "database_url": None,
                "warmup": False,
                "duplicates": (base or Settings()).duplicates.model_copy(
                    update={
                        "floor": floor,
                        "neighbours": neighbours,
                        "calibration_refit_every": 10**9,  # one fit, at the end
                    }
                ),
            }
        )
        return asyncio.run(
            _run(open_services, settings, gallery, label_of, fit_half, len(classes), plot, say)
        )


async def _run(
    open_services: OpenServices,
    settings: Settings,
    gallery: list[tuple[str, Path, str, str]],
    label_of: dict[str, str],
    fit_half: set[str],
    n_classes: int,
    plot: Path | None,
    say: Say,
) -> dict[str, Any]:
    async with open_services(settings, tail=False) as services:
        model_id = services.embedder.model_id
        say(f"ingesting {len(gallery)} photos of {n_classes} products with {model_id}")
        products = [
            ProductInput(
                id=listing,
                images=[ImageInput(path=path)],
                title=None,
                category=group,
            )
            for listing, path, _, group in gallery
        ]
        for start in range(0, len(products), 64):
            results = await services.catalogue.upsert_products(products[start : start + 64])
            failed = [r for r in results if r.status == "failed"]
            if failed:
                raise RuntimeError(f"ingest failed: {failed[0].id}: {failed[0].error}")
            say(f"  {min(start + 64, len(products))}/{len(products)}")
        duplicates = services.duplicates
        rows = []
        cursor = None
        while True:
            page, cursor = await asyncio.to_thread(
                duplicates.list_pairs,
                min_score=settings.duplicates.floor,
                limit=1000,
                cursor=cursor,
                category=None,
                undecided=False,
            )
            rows.extend(page)
            if cursor is None:
                break
        fit_rows, eval_rows, cross = [], [], 0
        for r in rows:
            halves = {label_of[r.a] in fit_half, label_of[r.b] in fit_half}
            if halves == {True}:
                fit_rows.append(r)
            elif halves == {False}:
                eval_rows.append(r)
            else:
                cross += 1
        say(
            f"{len(rows)} pairs >= {settings.duplicates.floor}: {len(fit_rows)} to decide, "
            f"{len(eval_rows)} held out, {cross} across the halves left out"
        )

        def review() -> None:
            for r in fit_rows:
                same = label_of[r.a] == label_of[r.b]
                duplicates.decide(r.a, r.b, "same" if same else "different", None)

        await asyncio.to_thread(review)
        calibration = await asyncio.to_thread(duplicates.fit_calibration)
        if calibration.overall is None:
            raise RuntimeError("not enough decisions to calibrate")
        calibrated, assessed = await asyncio.to_thread(duplicates.assess_pairs, eval_rows)
        probability = np.array([p for p, _ in assessed], dtype=np.float64)
        same = np.array([label_of[r.a] == label_of[r.b] for r in eval_rows], dtype=bool)
        predicted_same = np.array([t in ("exact", "same") for _, t in assessed], dtype=bool)
        scores = np.array([r.score for r in eval_rows])

        # The other method on the same decisions, for comparison.
        fit_scores = [r.score for r in fit_rows]
        fit_same = [label_of[r.a] == label_of[r.b] for r in fit_rows]
        other_policy = (
            CalibrationPolicy(min_labels=10, isotonic_labels=10**9)
            if calibration.overall.method == "isotonic"
            else CalibrationPolicy(min_labels=10, isotonic_labels=10)
        )
        other = fit_calibrator(fit_scores, fit_same, other_policy)
        assert other is not None
        other_probability = other.probability(scores)

        eval_classes = {label_of[r.a] for r in eval_rows} | {label_of[r.b] for r in eval_rows}
        sizes: dict[str, int] = {}
        for label in label_of.values():
            if label not in fit_half:
                sizes[label] = sizes.get(label, 0) + 1
        all_same_pairs = sum(n * (n - 1) // 2 for n in sizes.values())
        true_positive = int((predicted_same & same).sum())
        same_probability = settings.duplicates.same_probability
        result: dict[str, Any] = {
            "model_id": services.embedder.model_id,
            "listings": len(gallery),
            "products": n_classes,
            "floor": settings.duplicates.floor,
            "pairs_found": len(rows),
            "fit": {
                "decisions": len(fit_rows),
                "same": int(sum(fit_same)),
                "method": calibration.overall.method,
                "categories_with_own_fit": sorted(calibration.categories),
            },
            "held_out": {
                "pairs": len(eval_rows),
                "same": int(same.sum()),
                "products": len(eval_classes),
                "expected_calibration_error": round(
                    expected_calibration_error(probability, same), 4
                ),
                "brier": round(float(np.mean((probability - same) ** 2)), 4),
                f"expected_calibration_error_{other.method}": round(
                    expected_calibration_error(other_probability, same), 4
                ),
                "same_tier": {
                    "same_probability": same_probability,
                    "pairs": int(predicted_same.sum()),
                    "precision": round(true_positive / max(1, int(predicted_same.sum())), 4),
                    "recall_of_found_pairs": round(true_positive / max(1, int(same.sum())), 4),
                    "recall_of_all_same_pairs": round(true_positive / max(1, all_same_pairs), 4),
                },
                "calibrated": calibrated,
                "at_other_levels": {
                    f"P>={level}": {
                        "pairs": int((probability >= level).sum()),
                        "precision": round(
                            float(same[probability >= level].mean())
                            if (probability >= level).any()
                            else 0.0,
                            4,
                        ),
                        "recall_of_found_pairs": round(
                            float((same & (probability >= level)).sum()) / max(1, int(same.sum())),
                            4,
                        ),
                    }
                    for level in (0.5, 0.7)
                },
            },
            "cross_half_pairs_left_out": cross,
        }
        if plot is not None:
            plot.parent.mkdir(parents=True, exist_ok=True)
            reliability_diagram(
                plot,
                {
                    f"{calibration.overall.method} (the service's)": (probability, same),
                    other.method: (other_probability, same),
                },
                f"Grocery store, {model_id}\n{len(eval_rows)} held-out pairs of "
                f"{len(eval_classes)} unseen products (fit on {len(fit_rows)} decisions\n"
                "on the pairs of the other products)",
            )
            result["plot"] = str(plot)
        return result
