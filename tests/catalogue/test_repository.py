from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select

from app.catalogue import repository as repo
from app.catalogue.models import DuplicatePair, utcnow
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
