"""Search-time quality: what the service adds on top of one embedding and one index search.

Three features, each switchable (settings `VS_SEARCH__*`, and per request where it costs
the caller latency):

* **Flip test-time augmentation.** The query is embedded twice, as is and mirrored, and
  the two embeddings are averaged. Costs a second image in the same forward pass.
* **Alpha query expansion** (Radenovic et al., "Fine-tuning CNN image retrieval with no
  human annotation", 2018): the query is replaced by
  `normalise(q + sum_i max(s_i, 0)^alpha * x_i)` over its `n` nearest catalogue images and
  the index is searched again. Costs a second index search and `n` vector reads; its gain
  rests on the nearest images being right, so it helps recall more than top-1.
* **Product-level scoring.** A product is scored from all of its images, not only its
  best one: `(1 - w) * best + w * mean(top m)` over the cosines of its images (exact
  vectors). A product whose other photos also look like the query moves up; one lucky
  image of a wrong product counts for less. The score stays a blend of cosines in -1..1.
  Costs one catalogue lookup of the candidates' images and their vector reads.

The functions here are pure (vectors in, vectors or scores out) so that the service's
search path and the measurements in `app/benchmarks/search_quality.py` run the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from app.imaging.crop import Box, original_size
from app.index.vectors import ExactVectors


@dataclass(frozen=True)
class SearchQuality:
    """Which search-time features a search uses (the settings, then per-request changes)."""

    flip: bool = False
    expansion: int = 0
    expansion_alpha: float = 3.0
    product_images: int = 1
    product_weight: float = 0.0
    product_candidates: int = 20

    @property
    def product_scoring(self) -> bool:
        return self.product_images > 1 and self.product_weight > 0

    def with_request(self, *, flip: bool | None, expand: bool | None) -> SearchQuality:
        """Per-request switches: None keeps the setting; `expand=True` with expansion off
        in the settings uses 3 neighbours (the measured choice)."""
        out = self
        if flip is not None:
            out = replace(out, flip=flip)
        if expand is not None:
            out = replace(out, expansion=(self.expansion or 3) if expand else 0)
        return out


def mirrored(image: Image.Image, box: Box | None) -> tuple[Image.Image, Box | None]:
    """The image flipped left-right, and the same crop box on the flipped image.

    Boxes are in pixels of the upright original (`app.imaging.crop`), so the box is
    mirrored about the original's width; the decoded image keeps that size in its info.
    """
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.info = dict(image.info)
    if box is None:
        return flipped, None
    width, _ = original_size(image)
    return flipped, Box(width - box.x - box.w, box.y, box.w, box.h)


def combine_views(views: np.ndarray) -> np.ndarray:
    """One unit vector from several embeddings of the same query (their normalised mean)."""
    mean = np.asarray(views, dtype=np.float32).reshape(-1, views.shape[-1]).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else mean


def expand_query(
    query: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    vectors: ExactVectors,
    *,
    neighbours: int,
    alpha: float,
) -> np.ndarray:
    """Alpha query expansion over the first `neighbours` hits (ids < 0 are skipped).

    Weights are `max(score, 0) ** alpha`: with alpha around 3 a neighbour at cosine 0.9
    weighs 0.73 and one at 0.5 only 0.125, so far neighbours barely move the query.
    """
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    keep = ids[:neighbours] >= 0
    if neighbours <= 0 or not keep.any():
        return q
    found = ids[:neighbours][keep]
    weights = np.clip(scores[:neighbours][keep], 0.0, None) ** alpha
    expanded = q + (weights[:, None] * vectors.get(found)).sum(axis=0)
    norm = float(np.linalg.norm(expanded))
    return expanded / norm if norm > 0 else q


def product_scores(
    query: np.ndarray,
    product_images: Mapping[int, Sequence[int]],
    vectors: ExactVectors,
    *,
    images: int,
    weight: float,
) -> dict[int, float]:
    """Each product's score from its images' exact cosines to the query:
    `(1 - weight) * best + weight * mean(best `images` cosines)`.

    Args:
        query: The (possibly expanded) query, unit length.
        product_images: Product key -> all of its image ids.
        vectors: The index's exact vectors (rows of images not yet indexed read as zero
            and are left out).
        images: How many of a product's best images the mean takes.
        weight: The mean's share; 0 scores by the best image alone.
    """
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    out: dict[int, float] = {}
    for product, ids in product_images.items():
        rows = vectors.get(np.asarray(ids, dtype=np.int64))
        present = np.abs(rows).sum(axis=1) > 0
        if not present.any():
            continue
        cosines = np.sort(rows[present] @ q)[::-1]
        best = float(cosines[0])
        mean = float(cosines[:images].mean())
        out[product] = (1.0 - weight) * best + weight * mean
    return out
