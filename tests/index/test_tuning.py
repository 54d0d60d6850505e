"""Search parameters tuned to a target recall, checked against an independent brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.core.database import Database
from app.index.build import train_template
from app.index.sharded import ShardedIndex
from app.index.tuning import tune
from app.index.vectors import ExactVectors
from tests.index.test_lifecycle import DIM, add_images, service
from tests.index.vectors import brute_force, clustered, recall_at_k


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardedIndex, np.ndarray]:
    x = clustered(20_300, 64, clusters=200, seed=1)  # the last 300 are held out
    template = train_template(x[:8000], "IVF128,PQ8")
    built = ShardedIndex.from_template(
        template, 3, ExactVectors(tmp_path_factory.mktemp("tune") / "v.f16", 64)
    )
    built.upsert(np.arange(20_000, dtype=np.int64), x[:20_000])
    return built, x


def independent_recall(index: ShardedIndex, x: np.ndarray, nprobe: int, refine: int) -> float:
    """recall@10 of the given parameters on held-out vectors of the same catalogue."""
    queries = x[20_000:]
    truth = brute_force(x[:20_000], np.arange(20_000), queries, 10)
    found = index.search(queries, 10, nprobe=nprobe, refine=refine)[1]
    return recall_at_k(found, truth)


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_the_chosen_parameters_reach_the_target_on_fresh_queries(
    index: tuple[ShardedIndex, np.ndarray], target: float
) -> None:
    built, x = index
    tuned = tune(built, target)
    assert tuned is not None
    assert tuned.reached
    assert tuned.recall >= tuned.recall_lower_bound >= target
    assert tuned.ntotal == 20_000
    assert tuned.queries == 512
    # The sample's estimate holds on other queries (within sampling error).
    assert independent_recall(built, x, tuned.nprobe, tuned.refine) >= target - 0.03
    # Cheapest: half the lists at the same re-ranking depth no longer reach the target.
    if tuned.nprobe > 4:
        lower = tune(built, target, fixed_nprobe=tuned.nprobe // 2, fixed_refine=tuned.refine)
        assert lower is not None
        assert not lower.reached
        assert lower.recall_lower_bound < target


def test_a_higher_target_costs_more_search(index: tuple[ShardedIndex, np.ndarray]) -> None:
    built, _ = index
    low, high = tune(built, 0.7), tune(built, 0.97)
    assert low is not None
    assert high is not None
    assert (high.nprobe, high.refine) != (low.nprobe, low.refine)
    assert high.nprobe * high.refine > low.nprobe * low.refine
    assert high.recall > low.recall


def test_an_unreachable_target_keeps_the_most_accurate_and_says_so(
    index: tuple[ShardedIndex, np.ndarray],
) -> None:
    built, _ = index
    tuned = tune(built, 1.0, fixed_refine=4)  # 40 re-ranked candidates never catch all
    assert tuned is not None
    assert not tuned.reached
    assert tuned.recall < 1.0
    assert tuned.refine == 4


def test_the_service_tunes_after_training_and_shows_it(db: Database, tmp_path: Path) -> None:
    vectors = clustered(3000, DIM, clusters=40)
    index = service(db, tmp_path / "index", train_threshold=2500, nlist=16, pq_m=8)
    add_images(db, vectors)
    index.catch_up()
    assert index.maybe_retrain(background=False)  # the new generation is tuned at once
    index.wait_for_tuning()
    described = index.describe()
    assert described["tuning"]["target"] == 0.95
    assert described["tuning"]["ntotal"] == 3000
    assert described["search"] == {
        "nprobe": described["tuning"]["nprobe"],
        "refine": described["tuning"]["refine"],
    }
    assert index.index.knobs.refine == described["tuning"]["refine"]
    # Grown by less than retune_growth: no new measurement.
    assert not index.maybe_tune(background=False)
    index.close()


def test_metrics_show_the_parameters_and_measured_recall(db: Database, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from app.api.observability import _search_metrics

    index = service(db, tmp_path / "index", train_threshold=2500, nlist=16, pq_m=8)
    add_images(db, clustered(3000, DIM, clusters=40))
    index.catch_up()
    index.maybe_retrain(background=False)
    index.wait_for_tuning()
    described = index.describe()
    index.close()

    class Search(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return _search_metrics(described)

    registry = CollectorRegistry()
    registry.register(Search())
    text = generate_latest(registry).decode()
    tuning = described["tuning"]
    assert f"vsearch_index_search_nprobe {float(tuning['nprobe'])}" in text
    assert f"vsearch_index_search_refine {float(tuning['refine'])}" in text
    assert f'vsearch_index_recall{{k="10"}} {tuning["recall"]}' in text
    assert "vsearch_index_recall_target 0.95" in text
