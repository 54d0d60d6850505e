from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from app.catalogue import repository as repo
from app.catalogue.models import Base, DuplicatePair, utcnow
from app.core.database import Database


def _products(db: Database, n: int) -> list[int]:
    with db.write() as session:
        return [repo.lock_or_create_product(session, f"p{i}")[0].pk for i in range(n)]


def _pairs(db: Database) -> dict[tuple[int, int], tuple[float, int, int]]:
    with db.read() as session:
        rows = session.execute(select(DuplicatePair)).scalars().all()
        return {(r.a_pk, r.b_pk): (round(r.score, 4), r.a_image_id, r.b_image_id) for r in rows}


def _row(a: int, b: int, score: float, images: tuple[int, int], **extra: Any) -> dict[str, Any]:
    return {
        "a_pk": a,
        "b_pk": b,
        "score": score,
        "a_image_id": images[0],
        "b_image_id": images[1],
        "found_at": utcnow(),
        **extra,
    }


def test_upsert_pairs_keeps_the_higher_score_with_its_images(db: Database) -> None:
    p = _products(db, 4)
    with db.write() as session:
        repo.upsert_pairs(session, [_row(p[0], p[1], 0.91, (1, 2)), _row(p[2], p[3], 0.95, (5, 6))])
    with db.write() as session:  # one lower, one higher, one new, in one call
        repo.upsert_pairs(
            session,
            [
                _row(p[0], p[1], 0.85, (3, 4)),
                _row(p[2], p[3], 0.99, (7, 8)),
                _row(p[0], p[3], 0.90, (1, 8)),
            ],
        )

    assert _pairs(db) == {
        (p[0], p[1]): (0.91, 1, 2),
        (p[2], p[3]): (0.99, 7, 8),
        (p[0], p[3]): (0.90, 1, 8),
    }


def test_upsert_pairs_refreshes_found_at_so_a_rescan_keeps_the_pair(db: Database) -> None:
    p = _products(db, 2)
    old = utcnow() - timedelta(days=1)
    with db.write() as session:
        repo.upsert_pairs(session, [{**_row(p[0], p[1], 0.93, (1, 2)), "found_at": old}])
    scan_started = utcnow()
    with db.write() as session:
        repo.upsert_pairs(session, [_row(p[0], p[1], 0.90, (1, 2))])
        removed = repo.delete_pairs_found_before(session, scan_started)

    assert removed == 0
    assert _pairs(db) == {(p[0], p[1]): (0.93, 1, 2)}


def test_many_pairs_in_one_call(db: Database) -> None:
    p = _products(db, 60)
    rows = [
        _row(p[i], p[j], 0.8 + (i + j) / 1000, (i, j)) for i in range(60) for j in range(i + 1, 60)
    ]
    with db.write() as session:
        repo.upsert_pairs(session, rows)

    pairs = _pairs(db)
    assert len(pairs) == len(rows) == 1770
    assert pairs[(p[3], p[7])] == (0.81, 3, 7)


def _stage(db: Database, rows: list[tuple[int, int, float, int, int]]) -> None:
    columns = list(zip(*rows, strict=True))
    with db.write() as session:
        repo.stage_scan_pairs(
            session,
            np.array(columns[0], np.int64),
            np.array(columns[1], np.int64),
            np.array(columns[2], np.float64),
            np.array(columns[3], np.int64),
            np.array(columns[4], np.int64),
        )


@pytest.mark.parametrize("rebuild", [False, True], ids=["in-place", "rebuilt-indexes"])
def test_scan_staging_merges_the_best_row_per_pair(
    db: Database, rebuild: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full scan's rows (binary COPY on PostgreSQL) merge into the pairs table: the best
    row of a pair found twice, an existing pair keeping its higher score, pairs marked
    `different` and pairs of deleted products left out, the staging table emptied (SQLite
    rebuilds the secondary indexes of a large merge: forced here with a threshold of 0)."""
    if rebuild:
        monkeypatch.setattr(repo, "_REBUILD_INDEXES_FROM", 0)
    p = _products(db, 6)
    with db.write() as session:
        repo.upsert_pairs(session, [_row(p[0], p[1], 0.97, (1, 2))])
        repo.set_decision(session, p[2], p[3], "different", None)
    _stage(
        db,
        [
            (p[0], p[1], 0.93, 11, 12),  # lower than the stored pair's 0.97
            (p[0], p[2], 0.91, 1, 3),
            (p[0], p[2], 0.95, 1, 30),  # the same pair, found from p[2]'s side
            (p[2], p[3], 0.99, 3, 4),  # a reviewer said different
        ],
    )
    _stage(db, [(p[4], p[5], 0.9, 5, 6), (p[1], p[4], 0.92, 2, 5)])
    with db.read() as session:
        assert repo.count_scan_pairs(session) == 6
    with db.write() as session:
        session.delete(repo.get_product(session, "p5"))
    moment = utcnow()
    with db.write() as session:
        repo.merge_scan_pairs(session, moment)
        removed = repo.delete_pairs_found_before(session, moment)
        left = repo.count_scan_pairs(session)

    assert removed == 0  # the stored pair was found again: its found_at moved on
    assert left == 0
    assert _pairs(db) == {
        (p[0], p[1]): (0.97, 1, 2),
        (p[0], p[2]): (0.95, 1, 30),
        (p[1], p[4]): (0.92, 2, 5),
    }
    with db.read() as session:
        indexes = {
            ix["name"] for ix in inspect(session.connection()).get_indexes("duplicate_pairs")
        }
    assert {"ix_duplicate_pairs_score", "ix_duplicate_pairs_b"} <= indexes


@pytest.mark.parametrize("rebuild", [False, True], ids=["in-place", "rebuilt"])
def test_a_merged_pairs_table_is_still_the_migrated_one(
    db: Database, rebuild: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large merge rebuilds the pairs table (PostgreSQL swaps in a new one): the same key,
    indexes and foreign keys, names included, as the migrations made, so later migrations
    and the cascade on product deletion still apply; a stored pair wins a tie."""
    if rebuild:
        monkeypatch.setattr(repo, "_REBUILD_INDEXES_FROM", 0)
    p = _products(db, 3)
    with db.write() as session:
        repo.upsert_pairs(session, [_row(p[0], p[1], 0.95, (1, 2))])
    _stage(db, [(p[0], p[1], 0.95, 10, 20), (p[1], p[2], 0.93, 2, 3)])
    with db.write() as session:
        repo.merge_scan_pairs(session, utcnow())
    with db.read() as session:
        drift = compare_metadata(MigrationContext.configure(session.connection()), Base.metadata)

    assert drift == []
    assert _pairs(db) == {(p[0], p[1]): (0.95, 1, 2), (p[1], p[2]): (0.93, 2, 3)}
    with db.write() as session:
        session.delete(repo.get_product(session, "p0"))
    assert _pairs(db) == {(p[1], p[2]): (0.93, 2, 3)}


def test_a_role_that_may_not_create_tables_still_merges(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A service role with rights on the tables but not on the schema (nor owning the pairs
    table) cannot swap a new pairs table in: PostgreSQL's large merge falls back to the
    row-by-row upsert, with the same result."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's table swap")
    monkeypatch.setattr(repo, "_REBUILD_INDEXES_FROM", 0)
    role = f"vs_writer_{uuid.uuid4().hex[:12]}"
    owner = Database(database_url)
    with owner.write() as session:
        for statement in (
            f"CREATE ROLE {role} LOGIN",
            "GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public "
            f"TO {role}",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
        ):
            session.execute(text(statement))
    owner.dispose()
    db = Database(database_url.replace("//postgres@", f"//{role}@", 1))
    try:
        p = _products(db, 3)
        with db.write() as session:
            repo.upsert_pairs(session, [_row(p[0], p[1], 0.95, (1, 2))])
        _stage(db, [(p[0], p[1], 0.97, 10, 20), (p[1], p[2], 0.93, 2, 3), (p[1], p[2], 0.9, 2, 4)])
        with db.write() as session:
            repo.merge_scan_pairs(session, utcnow())
            left = repo.count_scan_pairs(session)

        assert "cannot rebuild duplicate_pairs" in caplog.text
        assert "merging row by row" in caplog.text
        assert left == 0
        assert _pairs(db) == {(p[0], p[1]): (0.97, 10, 20), (p[1], p[2]): (0.93, 2, 3)}
    finally:
        db.dispose()
