"""IndexService against an in-memory feed: its contract with a `ChangeFeed` and an
`EmbeddingSource`, without a database (tests/index/test_lifecycle.py runs the same service
on the catalogue's SQLite and Postgres feeds)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from app.core.config import IndexSettings
from app.index.feed import Watermark
from app.index.lifecycle import IndexService
from app.index.sharded import ShardedIndex
from app.index.store import read_manifest
from tests.index.memory import MemoryCatalogue
from tests.index.vectors import clustered

MODEL = "memory-model@0"
DIM = 32


def service(
    catalogue: MemoryCatalogue, directory: Path, *, model_id: str = MODEL, **overrides: object
) -> IndexService:
    settings = IndexSettings(**{"shards": 3, "train_threshold": 10**9, **overrides})
    index = IndexService(
        feed=catalogue,
        source=catalogue,
        directory=directory,
        model_id=model_id,
        dim=DIM,
        settings=settings,
    )
    index.open()
    return index


def ids_of(index: IndexService) -> list[int]:
    return sorted(index.index.all_ids().tolist())


def nearest(index: IndexService, vector: np.ndarray) -> tuple[int, float]:
    scores, found = index.index.search(vector[None, :], 1)
    return int(found[0, 0]), float(scores[0, 0])


@pytest.fixture
def catalogue() -> MemoryCatalogue:
    return MemoryCatalogue(MODEL)


class TestCatchUp:
    def test_changes_are_applied_in_order(self, catalogue: MemoryCatalogue, tmp_path: Path) -> None:
        index = service(catalogue, tmp_path)
        first, second = clustered(2, DIM, seed=1)
        catalogue.write({1: first, 2: first, 3: first})
        catalogue.write({1: second}, deletes=[2])  # re-embed 1, delete 2

        assert index.catch_up() == 5
        assert ids_of(index) == [1, 3]
        assert nearest(index, second) == (1, pytest.approx(1.0, abs=1e-5))
        assert index.watermark == Watermark(seq=5)
        assert index.catch_up() == 0

    def test_a_change_committed_late_is_not_skipped(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        index = service(catalogue, tmp_path)
        slow = catalogue.transaction()
        slow.upsert(10, clustered(1, DIM, seed=2)[0])  # takes seq 1, commits last
        catalogue.write({11: clustered(1, DIM, seed=3)[0]})  # seq 2, committed first

        index.catch_up()
        assert ids_of(index) == [11]
        assert index.watermark == Watermark(seq=0)  # seq 1 is still in flight
        slow.commit()
        index.catch_up()

        assert ids_of(index) == [10, 11]
        assert index.watermark == Watermark(seq=2)
        assert index.describe()["catchup_lag"] == 0

    def test_direct_apply_then_replay_keeps_one_copy(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        """The writer applies its commit at once; the tail replays the same change later."""
        index = service(catalogue, tmp_path)
        vector = clustered(1, DIM, seed=4)[0]
        catalogue.write({5: vector})
        index.apply([(5, vector)], [])
        index.apply([(5, vector)], [])  # a retried apply

        assert index.catch_up() == 1
        assert index.index.ntotal == 1
        assert nearest(index, vector) == (5, pytest.approx(1.0, abs=1e-5))

    def test_remove_then_add_replayed_twice_ends_present_once(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        index = service(catalogue, tmp_path)
        old, new = clustered(2, DIM, seed=5)
        catalogue.write({7: old})
        catalogue.write(deletes=[7])
        catalogue.write({7: new})
        index.catch_up()
        index.apply([], [7])  # a stale delete arriving late through the direct path
        assert index.catch_up() == 0
        assert ids_of(index) == []

        index._cursor = type(index._cursor)()  # forget progress: replay everything
        assert index.catch_up() == 3

        assert index.index.ntotal == 1
        assert nearest(index, new) == (7, pytest.approx(1.0, abs=1e-5))


class TestFiles:
    def test_watermark_is_saved_in_the_manifest(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        index = service(catalogue, tmp_path)
        catalogue.write(dict(enumerate(clustered(20, DIM), start=1)))
        index.catch_up()
        manifest = index.save()

        assert read_manifest(tmp_path) == manifest
        assert manifest.watermark == index.watermark == Watermark(seq=20)
        assert manifest.ntotal == 20
        index.close()

    def test_reopen_loads_the_files_and_replays_only_what_is_new(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        vectors = clustered(30, DIM, seed=6)
        catalogue.write(dict(enumerate(vectors[:25], start=1)))
        index = service(catalogue, tmp_path)
        index.close(save=True)

        catalogue.write(dict(enumerate(vectors[25:], start=26)), deletes=[1, 2])  # while down
        reads = catalogue.reads
        again = service(catalogue, tmp_path)

        assert again.stats.rebuilds == 0
        assert again.stats.applied_changes == 7  # 5 upserts and 2 deletes, not all 32
        assert catalogue.reads == reads + 1
        assert ids_of(again) == list(range(3, 31))
        assert again.index.search(vectors[2:5], 1)[1][:, 0].tolist() == [3, 4, 5]
        again.close()

    def test_an_index_of_another_model_is_rebuilt(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        catalogue.write(dict(enumerate(clustered(10, DIM), start=1)))
        other = service(catalogue, tmp_path, model_id="another-model@1")
        assert ids_of(other) == []  # the source holds none of its embeddings
        other.close(save=True)

        index = service(catalogue, tmp_path)

        assert index.stats.rebuilds == 1
        assert ids_of(index) == list(range(1, 11))
        index.close()


class TestRebuild:
    def test_changes_during_a_rebuild_are_in_the_swapped_generation(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        vectors = clustered(40, DIM, seed=7)
        catalogue.write(dict(enumerate(vectors[:30], start=1)))
        index = service(catalogue, tmp_path)
        swapped: list[ShardedIndex] = []
        index.on_swap.append(swapped.append)
        live = index.index
        generation = index.stats.generation

        def meanwhile(done: int, total: int) -> None:
            # Commits after the rebuild took its position, while it streams the source.
            catalogue.write(dict(enumerate(vectors[30:], start=31)), deletes=[1])
            assert index.index is live  # searches still use the old generation

        index.rebuild(reason="test", progress=meanwhile)

        assert swapped == [index.index]
        assert index.index is not live
        assert ids_of(index) == list(range(2, 41))
        assert index.stats.generation == generation + 1
        assert read_manifest(tmp_path).watermark == index.watermark == Watermark(seq=41)  # type: ignore[union-attr]
        index.close()

    def test_training_threshold_switches_to_ivfpq(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        vectors = clustered(3000, DIM, clusters=40, seed=8)
        catalogue.write(dict(enumerate(vectors, start=1)))
        index = service(catalogue, tmp_path, train_threshold=2500, nlist=16, pq_m=16, refine=8)
        index.wait_for_retraining()

        described = index.describe()
        assert described["kind"] == "ivfpq"
        assert described["trained"] is True
        assert sum(described["shards"]) == described["ntotal"] == 3000
        assert read_manifest(tmp_path).trained_at_n == 3000  # type: ignore[union-attr]
        assert nearest(index, vectors[0])[0] == 1
        index.close()


class TestReplicas:
    def test_replay_hooks_hear_only_what_arrived_by_the_feed(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        """Images this process published itself are not announced again; images another
        writer committed are, once, and deleted ones never."""
        index = service(catalogue, tmp_path)
        heard: list[list[int]] = []
        index.on_replay.append(heard.append)
        own, theirs, gone = clustered(3, DIM, seed=20)
        catalogue.write({1: own})
        index.apply([(1, own)], [])  # this replica's write, published after commit
        catalogue.write({2: theirs, 3: gone})  # another replica's writes
        catalogue.write(deletes=[3])

        index.catch_up()
        index.catch_up()

        assert heard == [[2]]
        assert ids_of(index) == [1, 2]

    def test_a_failing_hook_does_not_stop_the_catch_up(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        index = service(catalogue, tmp_path)

        def broken(_ids: list[int]) -> None:
            raise RuntimeError("hook failed")

        index.on_replay.append(broken)
        catalogue.write({7: clustered(1, DIM, seed=21)[0]})

        assert index.catch_up() == 1
        assert ids_of(index) == [7]
        assert index.catch_up() == 0

    def test_wake_catches_up_before_the_interval(
        self, catalogue: MemoryCatalogue, tmp_path: Path
    ) -> None:
        index = service(catalogue, tmp_path, catchup_interval_s=3600)
        index.start_tailing()
        try:
            catalogue.write({8: clustered(1, DIM, seed=22)[0]})
            started = time.monotonic()
            index.wake()
            while ids_of(index) != [8]:
                assert time.monotonic() - started < 5, "the wake was not heard"
                time.sleep(0.01)
        finally:
            index.close(save=False)
