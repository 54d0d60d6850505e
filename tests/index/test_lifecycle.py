from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete

from app.catalogue import repository as repo
from app.catalogue.feed import CatalogueEmbeddings, change_feed
from app.catalogue.models import ProductImage
from app.core.config import IndexSettings
from app.core.database import Database
from app.index.feed import FeedCursor
from app.index.lifecycle import IndexService
from app.index.store import generation_dir, read_manifest
from tests.index.vectors import brute_force, clustered, recall_at_k

MODEL = "test-model@0"
DIM = 32


def add_images(db: Database, vectors: np.ndarray, product: str = "p") -> list[int]:
    """Write images straight into the catalogue (as the ingest service does)."""
    with db.write() as session:
        row, _ = repo.lock_or_create_product(session, product)
        ids = []
        for i, v in enumerate(vectors):
            image = repo.add_image(
                session,
                product_pk=row.pk,
                position=i,
                sha256=f"{product}-{i}",
                width=1,
                height=1,
                embedding=np.asarray(v, np.float32).tobytes(),
                model_id=MODEL,
            )
            ids.append(image.id)
        repo.log_changes(session, ids, repo.OP_UPSERT)
    return ids


def delete_images(db: Database, ids: list[int]) -> None:
    with db.write() as session:
        repo.delete_images(session, ids)


def service(db: Database, root: Path, **overrides: object) -> IndexService:
    settings = IndexSettings(**{"shards": 3, "train_threshold": 10**9, **overrides})  # type: ignore[arg-type]
    index = IndexService(
        feed=change_feed(db),
        source=CatalogueEmbeddings(db),
        directory=root,
        model_id=MODEL,
        dim=DIM,
        settings=settings,
    )
    index.open()
    return index


class TestCatchUp:
    def test_changes_written_by_others_are_applied(self, db: Database, tmp_path: Path) -> None:
        index = service(db, tmp_path / "index")
        ids = add_images(db, clustered(50, DIM))

        assert index.catch_up() == 50
        assert sorted(index.index.all_ids().tolist()) == ids
        assert index.catch_up() == 0  # nothing new

        delete_images(db, ids[:10])
        index.catch_up()
        assert sorted(index.index.all_ids().tolist()) == ids[10:]
        index.close()

    def test_replaying_the_same_rows_twice_changes_nothing(
        self, db: Database, tmp_path: Path
    ) -> None:
        index = service(db, tmp_path / "index")
        vectors = clustered(20, DIM)
        ids = add_images(db, vectors)
        index.catch_up()
        index._cursor = FeedCursor()  # forget progress: replay everything
        index.catch_up()
        assert sorted(index.index.all_ids().tolist()) == ids
        scores, found = index.index.search(vectors[:1], 1)
        assert found[0, 0] == ids[0]
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        index.close()


class TestRestart:
    def test_restart_loads_the_generation_and_catches_up(
        self, db: Database, tmp_path: Path
    ) -> None:
        first = add_images(db, clustered(30, DIM, seed=1), "a")
        index = service(db, tmp_path / "index")
        index.close(save=True)
        generation = read_manifest(tmp_path / "index").generation  # type: ignore[union-attr]

        second = add_images(db, clustered(5, DIM, seed=2), "b")  # while "down"
        delete_images(db, first[:3])
        again = service(db, tmp_path / "index")

        assert again.stats.rebuilds == 0  # loaded, not rebuilt
        assert again.stats.generation == generation
        assert sorted(again.index.all_ids().tolist()) == sorted(first[3:] + second)
        again.close()

    def test_torn_shard_file_is_rebuilt_with_a_log_line(
        self, db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        ids = add_images(db, clustered(40, DIM))
        index = service(db, tmp_path / "index")
        index.close(save=True)
        manifest = read_manifest(tmp_path / "index")
        assert manifest is not None
        shard = generation_dir(tmp_path / "index", manifest.generation) / manifest.shards[1]
        shard.write_bytes(shard.read_bytes()[:100])

        with caplog.at_level(logging.WARNING):
            again = service(db, tmp_path / "index")

        assert again.stats.rebuilds == 1
        assert any("could not be loaded" in r.getMessage() for r in caplog.records)
        assert sorted(again.index.all_ids().tolist()) == ids
        again.close()

    def test_missing_manifest_or_other_model_rebuilds(self, db: Database, tmp_path: Path) -> None:
        ids = add_images(db, clustered(10, DIM))
        index = service(db, tmp_path / "index")
        index.close(save=True)
        (tmp_path / "index" / "manifest.json").unlink()
        again = service(db, tmp_path / "index")
        assert again.stats.rebuilds == 1
        again.close(save=True)

        manifest = read_manifest(tmp_path / "index")
        assert manifest is not None
        manifest.model_id = "another-model@1"
        (tmp_path / "index" / "manifest.json").write_text(manifest.to_json())
        third = service(db, tmp_path / "index")
        assert third.stats.rebuilds == 1
        assert sorted(third.index.all_ids().tolist()) == ids
        third.close()

    def test_crash_between_files_and_manifest_keeps_the_old_generation(
        self, db: Database, tmp_path: Path
    ) -> None:
        ids = add_images(db, clustered(10, DIM))
        index = service(db, tmp_path / "index")
        index.close(save=True)
        live = read_manifest(tmp_path / "index")
        assert live is not None
        # A new generation's files written, the process killed before the manifest:
        stray = generation_dir(tmp_path / "index", live.generation + 1)
        stray.mkdir()
        (stray / "shard-00.faiss").write_bytes(b"half")

        again = service(db, tmp_path / "index")

        assert again.stats.rebuilds == 0
        assert sorted(again.index.all_ids().tolist()) == ids
        again.close()


class TestLifecycle:
    def test_training_threshold_switches_to_ivfpq_in_the_background(
        self, db: Database, tmp_path: Path
    ) -> None:
        vectors = clustered(3000, DIM, clusters=40)
        index = service(db, tmp_path / "index", train_threshold=2500, nlist=16, pq_m=16, refine=8)
        ids = add_images(db, vectors[:2000])
        index.catch_up()
        assert not index.maybe_retrain(background=True)  # below the threshold
        more = add_images(db, vectors[2000:], "q")
        index.catch_up()

        assert index.maybe_retrain(background=True)
        searches_during = []
        while index._retrain is not None and index._retrain.is_alive():
            searches_during.append(index.index.search(vectors[:2], 5)[1][0, 0])
        index.wait_for_retraining()

        assert index.index.kind == "ivfpq"
        assert index.index.ntotal == 3000
        assert all(found == ids[0] for found in searches_during), [
            int(f) for f in searches_during if f != ids[0]
        ]
        manifest = read_manifest(tmp_path / "index")
        assert manifest is not None
        assert manifest.kind == "ivfpq"
        assert manifest.trained_at_n == 3000
        assert sorted(index.index.all_ids().tolist()) == sorted(ids + more)
        index.close()

    def test_incremental_and_rebuilt_indexes_agree(self, db: Database, tmp_path: Path) -> None:
        vectors = clustered(4000, DIM, clusters=40, seed=3)
        settings = {"train_threshold": 1000, "nlist": 16, "pq_m": 16, "nprobe": 16, "refine": 10}
        ids = add_images(db, vectors[:1500])
        incremental = service(db, tmp_path / "a", **settings)  # trains at open
        ids += add_images(db, vectors[1500:], "more")
        incremental.catch_up()
        rebuilt = service(db, tmp_path / "b", **settings)
        queries = clustered(200, DIM, clusters=40, seed=4)

        a = incremental.index.search(queries, 10)[1]
        b = rebuilt.index.search(queries, 10)[1]

        assert incremental.index.kind == rebuilt.index.kind == "ivfpq"
        assert incremental.index.ntotal == rebuilt.index.ntotal == 4000
        assert recall_at_k(a, b) >= 0.99
        assert recall_at_k(b, brute_force(vectors, np.asarray(ids), queries, 10)) >= 0.9
        incremental.close()
        rebuilt.close()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
class TestLateCommitsOnPostgres:
    def test_a_lower_seq_committed_last_is_not_skipped(self, db: Database, tmp_path: Path) -> None:
        index = service(db, tmp_path / "index")
        early_has_seq = threading.Event()
        late_committed = threading.Event()
        vectors = clustered(2, DIM)
        results: dict[str, list[int]] = {}

        def slow_writer() -> None:  # takes the lower seq, commits last
            with db.write() as session:
                row, _ = repo.lock_or_create_product(session, "slow")
                image = repo.add_image(
                    session,
                    product_pk=row.pk,
                    position=0,
                    sha256="s",
                    width=1,
                    height=1,
                    embedding=vectors[0].tobytes(),
                    model_id=MODEL,
                )
                repo.log_changes(session, [image.id], repo.OP_UPSERT)
                results["slow"] = [image.id]
                early_has_seq.set()
                late_committed.wait(10)

        writer = threading.Thread(target=slow_writer)
        writer.start()
        early_has_seq.wait(10)
        results["fast"] = add_images(db, vectors[1:], "fast")  # higher seq, commits first

        index.catch_up()
        assert index.index.all_ids().tolist() == results["fast"]
        late_committed.set()
        writer.join()
        index.catch_up()

        assert sorted(index.index.all_ids().tolist()) == sorted(results["fast"] + results["slow"])
        index.close()

    def test_randomised_interleavings_miss_nothing(self, db: Database, tmp_path: Path) -> None:
        index = service(db, tmp_path / "index")
        rng = np.random.default_rng(0)
        committed: list[int] = []
        lock = threading.Lock()

        def writer(n: int) -> None:
            for j in range(8):
                with db.write() as session:
                    row, _ = repo.lock_or_create_product(session, f"w{n}-{j}")
                    image = repo.add_image(
                        session,
                        product_pk=row.pk,
                        position=0,
                        sha256=f"{n}-{j}",
                        width=1,
                        height=1,
                        embedding=clustered(1, DIM, seed=n * 100 + j)[0].tobytes(),
                        model_id=MODEL,
                    )
                    repo.log_changes(session, [image.id], repo.OP_UPSERT)
                    threading.Event().wait(float(rng.uniform(0, 0.02)))
                with lock:
                    committed.append(image.id)

        stop = threading.Event()

        def tail() -> None:
            while not stop.is_set():
                index.catch_up()

        tailer = threading.Thread(target=tail)
        tailer.start()
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        stop.set()
        tailer.join()
        index.catch_up()

        assert sorted(index.index.all_ids().tolist()) == sorted(committed)
        assert len(committed) == 48
        index.close()


def test_deleted_rows_disappear_even_without_a_change_row(db: Database, tmp_path: Path) -> None:
    """A rebuild reflects the table, not the log: rows deleted behind the log's back go."""
    ids = add_images(db, clustered(5, DIM))
    with db.write() as session:
        session.execute(delete(ProductImage).where(ProductImage.id == ids[0]))
    index = service(db, tmp_path / "index")
    assert sorted(index.index.all_ids().tolist()) == ids[1:]
    index.close()
