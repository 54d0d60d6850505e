"""Search-time quality features: the pure parts, on real vectors and a real decoded photo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.catalogue.rerank import (
    SearchQuality,
    combine_views,
    expand_query,
    mirrored,
    product_scores,
)
from app.imaging.crop import Box, crop
from app.imaging.decode import decode_image
from app.index.vectors import ExactVectors
from tests.images import encode, pattern


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def vectors(tmp_path: Path) -> ExactVectors:
    store = ExactVectors(tmp_path / "v.f16", 8)
    rng = np.random.default_rng(0)
    store.put(np.arange(10), unit(rng.normal(size=(10, 8))))
    return store


def test_expansion_moves_the_query_towards_its_close_neighbours(vectors: ExactVectors) -> None:
    rows = vectors.get(np.arange(10))
    query = unit(rows[0] + 0.3 * rows[1])
    ids = np.asarray([0, 1, 5, -1])
    scores = np.asarray([0.95, 0.5, 0.1, -np.inf], np.float32)

    expanded = expand_query(query, scores, ids, vectors, neighbours=4, alpha=3.0)

    assert np.linalg.norm(expanded) == pytest.approx(1.0, abs=1e-5)
    assert expanded @ rows[0] > query @ rows[0]
    # 0.95**3 = 0.857 against 0.5**3 = 0.125: the close neighbour dominates
    expected = unit(query + 0.95**3 * rows[0] + 0.5**3 * rows[1] + 0.1**3 * rows[5])
    np.testing.assert_allclose(expanded, expected, atol=2e-3)
    np.testing.assert_array_equal(
        expand_query(query, scores, ids, vectors, neighbours=0, alpha=3.0), query
    )


def test_two_views_are_averaged_into_one_unit_vector() -> None:
    a, b = unit(np.asarray([1.0, 0, 0])), unit(np.asarray([0, 1.0, 0]))
    np.testing.assert_allclose(combine_views(np.stack([a, b])), unit(np.asarray([1.0, 1, 0])))
    np.testing.assert_allclose(combine_views(a[None, :]), a)


def test_product_score_blends_the_best_image_with_the_mean_of_the_best(
    vectors: ExactVectors,
) -> None:
    rows = vectors.get(np.arange(10))
    query = rows[0]
    scores = product_scores(query, {7: [0, 1, 2], 8: [3], 9: [99]}, vectors, images=2, weight=0.5)

    cosines = np.sort(rows[[0, 1, 2]] @ query)[::-1]
    assert scores[7] == pytest.approx(0.5 * cosines[0] + 0.5 * cosines[:2].mean(), abs=1e-5)
    assert scores[8] == pytest.approx(float(rows[3] @ query), abs=1e-5)  # one image: its cosine
    assert 9 not in scores  # an image not in the index yet


def test_the_mirrored_box_crops_the_same_pixels_mirrored() -> None:
    photo = pattern(300, 200, seed=7)
    image = decode_image(encode(photo, "PNG"), max_pixels=10**7)
    box = Box(20, 30, 100, 80)

    flipped, flipped_box = mirrored(image, box)

    assert flipped_box == Box(180, 30, 100, 80)
    left = np.asarray(crop(image, box))
    right = np.asarray(crop(flipped, flipped_box))
    np.testing.assert_array_equal(right, left[:, ::-1])


def test_request_switches_override_the_settings() -> None:
    settings = SearchQuality(flip=True, expansion=0)
    assert settings.with_request(flip=None, expand=None) == settings
    assert not settings.with_request(flip=False, expand=None).flip
    assert settings.with_request(flip=None, expand=True).expansion == 3
    assert SearchQuality(expansion=5).with_request(flip=None, expand=False).expansion == 0
    assert not SearchQuality(product_images=5).product_scoring
    assert SearchQuality(product_images=5, product_weight=0.5).product_scoring
