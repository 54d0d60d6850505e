"""Synthetic embeddings shaped like real product embeddings, generated in chunks.

Uniform noise on the sphere is the wrong test for an ANN index: real catalogues are
clustered (many near-identical listings of popular products), cluster sizes are skewed,
and the spread inside a cluster is anisotropic. Each point here is
`normalise(centre + low-dimensional local variation + small noise)`, with ~20k centres
whose sizes follow a Zipf law; half of the queries are near-duplicates of catalogue items.
Chunks are deterministic, so a 10M-vector stream can be generated twice (once to index,
once for the ground truth) without holding it in memory.
"""

from __future__ import annotations

import numpy as np


class EmbeddingMixture:
    def __init__(
        self,
        dim: int = 512,
        *,
        clusters: int = 20_000,
        zipf: float = 1.0,
        local_dim: int = 8,
        bases: int = 256,
        spread: float = 0.25,
        noise: float = 0.1,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.seed = seed
        self.spread = spread
        self.noise = noise
        centres = rng.normal(size=(clusters, dim)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        weights = 1.0 / np.arange(1, clusters + 1) ** zipf
        self.cumulative = np.cumsum(weights / weights.sum())
        # A shared pool of local subspaces (cluster i uses pool[i % bases]) with decaying
        # scales along their axes: anisotropic spread without 20k x 8 x 512 floats.
        pool = rng.normal(size=(bases, local_dim, dim)).astype(np.float32)
        pool /= np.linalg.norm(pool, axis=2, keepdims=True)
        self.bases = pool
        self.scales = (1.0 / np.sqrt(np.arange(1, local_dim + 1))).astype(np.float32)

    def _points(self, rng: np.random.Generator, n: int) -> np.ndarray:
        labels = np.searchsorted(self.cumulative, rng.random(n))
        labels = np.minimum(labels, len(self.centres) - 1)
        coeffs = rng.normal(size=(n, len(self.scales))).astype(np.float32) * self.scales
        local = np.empty((n, self.dim), dtype=np.float32)
        pool = labels % len(self.bases)
        for b in np.unique(pool):  # one small matmul per subspace, not an (n, k, d) gather
            rows = pool == b
            local[rows] = coeffs[rows] @ self.bases[b]
        noise = rng.normal(size=(n, self.dim)).astype(np.float32) / np.sqrt(self.dim)
        x = self.centres[labels] + self.spread * local + self.noise * noise
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def chunk(self, index: int, size: int) -> np.ndarray:
        """Database vectors [index * size, (index + 1) * size): the same on every call."""
        return self._points(np.random.default_rng((self.seed, 1, index)), size)

    def sample(self, n: int, stream: int = 2) -> np.ndarray:
        """Fresh points from the same distribution (training samples, queries)."""
        return self._points(np.random.default_rng((self.seed, stream)), n)

    def near_duplicates(self, items: np.ndarray, seed: int = 3) -> np.ndarray:
        """Slightly perturbed copies (re-encoded/resized photos of the same listing)."""
        rng = np.random.default_rng((self.seed, seed))
        noise = rng.normal(size=items.shape).astype(np.float32) / np.sqrt(self.dim)
        x = items + 0.08 * noise
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
