"""Filtered search stays exact under ANN: neither strategy returns a short list while
enough images pass, on exact and IVF-PQ shards."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from app.index.build import train_template
from app.index.filtered import EXACT_SCAN_LIMIT, search_accepting, search_allowed
from app.index.sharded import SearchKnobs, ShardedIndex
from app.index.vectors import ExactVectors
from tests.index.vectors import brute_force, clustered


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(20_000, 64, clusters=200, seed=3), np.arange(20_000, dtype=np.int64)


@pytest.fixture(scope="module", params=["flat", "ivfpq"])
def index(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    data: tuple[np.ndarray, np.ndarray],
) -> Iterator[ShardedIndex]:
    """Built once per kind: the tests only search."""
    x, ids = data
    vectors = ExactVectors(tmp_path_factory.mktemp("filtered") / "v.f16", 64)
    if request.param == "flat":
        built = ShardedIndex.new_flat(64, 3, vectors)
    else:
        template = train_template(x[:10_000], "IVF64,PQ16")
        built = ShardedIndex.from_template(
            template, 3, vectors, knobs=SearchKnobs(nprobe=16, refine=8)
        )
    built.upsert(ids, x)
    yield built
    built.close()


class TestFilteredSearch:
    def test_allow_list_is_exact(
        self, index: ShardedIndex, data: tuple[np.ndarray, np.ndarray]
    ) -> None:
        x, ids = data
        allowed = np.random.default_rng(0).choice(ids, 300, replace=False)
        query = clustered(1, 64, clusters=200, seed=9)[0]
        found = search_allowed(index, query, allowed)
        assert found.exhausted
        assert len(found.ids) == 300
        truth = brute_force(x[allowed], allowed, query[None, :], 10)[0]
        # IVF-PQ shards score the float16 exact vectors: a near tie may swap at rank 10.
        same = len(set(found.ids[:10].tolist()) & set(truth.tolist()))
        assert same == 10 if index.kind == "flat" else same >= 9

    def test_long_allow_lists_go_through_the_index_with_a_selector(
        self, index: ShardedIndex, data: tuple[np.ndarray, np.ndarray]
    ) -> None:
        x, ids = data
        assert len(ids) * 0.6 > EXACT_SCAN_LIMIT
        allowed = np.random.default_rng(2).choice(ids, int(len(ids) * 0.6), replace=False)
        mask = np.isin(ids, allowed)
        recalls, baseline = [], []
        for query in clustered(10, 64, clusters=200, seed=13):
            found = search_allowed(index, query, allowed, 40)
            assert len(found.ids) >= 40
            assert mask[found.ids].all()
            truth = brute_force(x[mask], ids[mask], query[None, :], 10)[0]
            recalls.append(len(set(found.ids[:10].tolist()) & set(truth.tolist())) / 10)
            plain = search_accepting(index, query, 10)
            exact = brute_force(x, ids, query[None, :], 10)[0]
            baseline.append(len(set(plain.ids[:10].tolist()) & set(exact.tolist())) / 10)
        assert np.mean(recalls) >= np.mean(baseline) - 0.05

    @pytest.mark.parametrize("fraction", [0.002, 0.05, 0.5])
    def test_accept_and_deepen_never_returns_a_short_list(
        self, index: ShardedIndex, data: tuple[np.ndarray, np.ndarray], fraction: float
    ) -> None:
        """Never short, and the filter costs no recall: filtered results are as close
        to exact filtered search as unfiltered ANN results are to exact search."""
        x, ids = data
        mask = np.zeros(len(ids), dtype=bool)
        mask[np.random.default_rng(1).choice(len(ids), int(fraction * len(ids)), False)] = True
        queries = clustered(10, 64, clusters=200, seed=11)
        recalls, baseline = [], []
        for query in queries:
            plain = search_accepting(index, query, 10)
            exact = brute_force(x, ids, query[None, :], 10)[0]
            baseline.append(len(set(plain.ids[:10].tolist()) & set(exact.tolist())) / 10)
            found = search_accepting(index, query, 10, lambda i: mask[i])
            assert len(found.ids) >= 10  # 40+ images pass: never short
            assert mask[found.ids].all()
            truth = brute_force(x[mask], ids[mask], query[None, :], 10)[0]
            recalls.append(len(set(found.ids[:10].tolist()) & set(truth.tolist())) / 10)
        if index.kind == "flat":
            assert np.mean(recalls) == 1.0
        assert np.mean(recalls) >= np.mean(baseline) - 0.05

    def test_fewer_passing_than_wanted_returns_all_of_them(
        self, index: ShardedIndex, data: tuple[np.ndarray, np.ndarray]
    ) -> None:
        x, ids = data
        chosen = np.asarray([5, 17_000, 19_999])
        found = search_accepting(index, x[0], 10, lambda i: np.isin(i, chosen))
        assert found.exhausted
        assert sorted(found.ids.tolist()) == sorted(chosen.tolist())

    def test_floor_stops_the_deepening(
        self, index: ShardedIndex, data: tuple[np.ndarray, np.ndarray]
    ) -> None:
        x, ids = data
        found = search_accepting(index, x[0], 10, lambda i: i == 123, floor=0.99)
        assert found.rounds == 1
        assert found.ids.tolist() == []
