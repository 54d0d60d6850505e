from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from app.index.build import train_template
from app.index.sharded import _POOL_FROM, SearchKnobs, ShardedIndex, shard_of
from app.index.vectors import ExactVectors
from tests.index.vectors import brute_force, clustered, recall_at_k


class TestShardOf:
    def test_stable_and_balanced(self) -> None:
        ids = np.arange(100_000, dtype=np.int64)
        owners = shard_of(ids, 4)
        assert shard_of(np.array([0, 1, 12345]), 4).tolist() == owners[[0, 1, 12345]].tolist()
        counts = np.bincount(owners, minlength=4)
        assert counts.min() > 24_000
        assert counts.max() < 26_000


class TestExactVectors:
    def test_put_get_grow_and_reopen(self, tmp_path: Path) -> None:
        store = ExactVectors(tmp_path / "v.f16", 8)
        vectors = clustered(3, 8)
        store.put(np.array([3, 100_000, 7]), vectors)
        got = store.get(np.array([7, 3, 100_000, 5, 10**9]))
        np.testing.assert_allclose(got[0], vectors[2], atol=1e-3)
        np.testing.assert_allclose(got[1], vectors[0], atol=1e-3)
        np.testing.assert_allclose(got[2], vectors[1], atol=1e-3)
        assert not got[3].any()  # never written
        assert not got[4].any()  # beyond the file
        assert store.file_bytes() < store.capacity * store.row_bytes  # sparse
        store.close()

        again = ExactVectors(tmp_path / "v.f16", 8)
        np.testing.assert_allclose(again.get(np.array([100_000]))[0], vectors[1], atol=1e-3)

    def test_reads_are_the_stored_float16_values_exactly(self, tmp_path: Path) -> None:
        """The float16 -> float32 conversion (done in steps, outside numpy) is exact for
        every value, zero, subnormals and the largest rows included."""
        store = ExactVectors(tmp_path / "v.f16", 512)
        rng = np.random.default_rng(0)
        halves = rng.normal(size=(300, 512)).astype(np.float16)
        halves[0, :8] = [0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504.0, -65504.0, 1e-4]
        store.put(np.arange(300), halves.astype(np.float32))
        ids = rng.permutation(300)
        np.testing.assert_array_equal(store.get(ids), halves[ids].astype(np.float32))

    def test_evict_keeps_every_row(self, tmp_path: Path) -> None:
        store = ExactVectors(tmp_path / "v.f16", 8)
        vectors = clustered(50, 8)
        store.put(np.arange(50), vectors)
        store.evict()
        np.testing.assert_allclose(store.get(np.arange(50)), vectors, atol=1e-3)
        store.put(np.array([60]), vectors[:1])  # still writable
        np.testing.assert_allclose(store.get(np.array([60]))[0], vectors[0], atol=1e-3)


def _flat(tmp_path: Path, dim: int, shards: int = 3) -> ShardedIndex:
    return ShardedIndex.new_flat(dim, shards, ExactVectors(tmp_path / "v.f16", dim))


class TestFlatShards:
    def test_matches_brute_force_exactly(self, tmp_path: Path) -> None:
        x = clustered(3000, 32)
        ids = np.arange(10, 3010, dtype=np.int64)
        index = _flat(tmp_path, 32)
        index.upsert(ids, x)
        queries = clustered(20, 32, seed=9)

        scores, found = index.search(queries, 10)

        truth = brute_force(x, ids, queries, 10)
        assert recall_at_k(found, truth) == 1.0
        np.testing.assert_allclose(
            scores, np.sort(queries @ x.T, axis=1)[:, ::-1][:, :10], atol=1e-5
        )
        assert index.ntotal == 3000
        assert sum(s.ntotal for s in index.shards) == 3000
        assert min(s.ntotal for s in index.shards) > 800

    def test_apply_twice_changes_nothing_and_update_replaces(self, tmp_path: Path) -> None:
        x = clustered(100, 16)
        ids = np.arange(100, dtype=np.int64)
        index = _flat(tmp_path, 16)
        index.upsert(ids, x)
        index.upsert(ids, x)
        assert index.ntotal == 100

        moved = -x[5]
        index.upsert(np.array([5]), moved[None, :])
        scores, found = index.search(moved[None, :], 1)
        assert found[0, 0] == 5
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        assert index.ntotal == 100

        assert index.remove(np.array([5, 6])) == 2
        assert index.remove(np.array([5, 6])) == 0
        assert index.ntotal == 98
        assert 5 not in index.search(moved[None, :], 98)[1]

    def test_fewer_results_than_k(self, tmp_path: Path) -> None:
        index = _flat(tmp_path, 8)
        index.upsert(np.array([1, 2]), clustered(2, 8))
        scores, found = index.search(clustered(1, 8, seed=3), 5)
        assert sorted(found[0, :2].tolist()) == [1, 2]
        assert found[0, 2:].tolist() == [-1, -1, -1]
        assert np.isneginf(scores[0, 2:]).all()


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(20_000, 64, clusters=200, seed=1), np.arange(20_000, dtype=np.int64)


class TestIvfPqShards:
    def test_refined_scores_are_true_cosines_and_recall_is_high(
        self, tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
    ) -> None:
        x, ids = data
        template = train_template(x[:8000], "IVF64,PQ16")
        index = ShardedIndex.from_template(
            template,
            4,
            ExactVectors(tmp_path / "v.f16", 64),
            knobs=SearchKnobs(nprobe=16, refine=8),
        )
        index.upsert(ids, x)
        queries = np.concatenate([clustered(50, 64, clusters=200, seed=7), x[:50]])

        scores, found = index.search(queries, 10)

        truth = brute_force(x, ids, queries, 10)
        assert recall_at_k(found, truth) >= 0.9
        exact = np.einsum("qd,qkd->qk", queries, x[found])
        assert np.abs(scores - exact).max() < 2e-3  # float16 storage precision
        assert (found[50:, 0] == ids[:50]).all()  # near-duplicates come first

    @pytest.mark.parametrize(
        "factory", ["IVF64,PQ16", "IVF64_HNSW32,PQ16", "IVF64,PQ32x4fsr"], ids=str
    )
    def test_queries_assigned_once_find_what_each_shard_finds_itself(
        self, tmp_path: Path, data: tuple[np.ndarray, np.ndarray], factory: str
    ) -> None:
        """Queries are assigned to IVF lists once for all shards (the shards share one
        template's quantizer); without the template each shard assigns them itself.
        Batches go to the shards on the pool, single queries one shard after another.
        All must return the same neighbours, selector included."""
        x, ids = data
        index = ShardedIndex.from_template(
            train_template(x[:8000], factory),
            4,
            ExactVectors(tmp_path / "v.f16", 64),
            knobs=SearchKnobs(nprobe=8, refine=4),
        )
        index.upsert(ids, x)
        queries = np.concatenate([clustered(40, 64, clusters=200, seed=9), x[:40]])
        allowed = faiss.IDSelectorRange(0, 10_000)

        own = ShardedIndex(
            index.shards, kind="ivfpq", dim=64, vectors=index.vectors, knobs=index.knobs
        )
        assert index._shared_quantizer
        assert not own._shared_quantizer

        for selector in (None, allowed):
            scores, found = index.search(queries, 10, selector=selector)
            one_by_one = [index.search(q[None], 10, selector=selector) for q in queries]
            own_scores, own_found = own.search(queries, 10, selector=selector)

            assert len(queries) >= _POOL_FROM
            np.testing.assert_array_equal(found, np.concatenate([f for _, f in one_by_one]))
            np.testing.assert_allclose(
                scores, np.concatenate([s for s, _ in one_by_one]), rtol=1e-5, atol=1e-5
            )
            np.testing.assert_array_equal(found, own_found)
            np.testing.assert_allclose(scores, own_scores, rtol=1e-5, atol=1e-5)
        assert (found < 10_000).all()

    def test_upsert_and_remove(self, tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
        x, ids = data
        template = train_template(x[:8000], "IVF64,PQ16")
        index = ShardedIndex.from_template(template, 2, ExactVectors(tmp_path / "v.f16", 64))
        index.upsert(ids[:1000], x[:1000])
        index.upsert(ids[:1000], x[:1000])
        assert index.ntotal == 1000
        assert index.remove(ids[:10]) == 10
        assert index.ntotal == 990
        assert set(index.all_ids().tolist()) == set(ids[10:1000].tolist())
