"""A review queue of 100,000 pairs pages smoothly: keyset pages cost the same at the end
as at the start, every pair is served exactly once, decided pairs drop out, and the
calibration summary counts what remains."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import insert

from app.catalogue.models import DuplicatePair, Product, utcnow
from app.core.config import Settings
from app.core.database import Database
from tests.conftest import app_client

pytestmark = pytest.mark.slow

PRODUCTS = 460  # 460 * 459 / 2 = 105,570 possible pairs
PAIRS = 100_000


def fill(db: Database) -> None:
    now = utcnow()
    with db.write() as session:
        session.execute(
            insert(Product),
            [
                {
                    "external_id": f"sku-{i:04d}",
                    "title": f"Product {i}",
                    "category": "c",
                    "attributes": {},
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(1, PRODUCTS + 1)
            ],
        )
    rows = []
    for a in range(1, PRODUCTS + 1):
        for b in range(a + 1, PRODUCTS + 1):
            if len(rows) == PAIRS:
                break
            # many ties on purpose: the keyset must order within equal scores
            score = 0.8 + ((a * 7919 + b * 104729) % 2000) / 10_000
            rows.append(
                {
                    "a_pk": a,
                    "b_pk": b,
                    "score": score,
                    "a_image_id": a,
                    "b_image_id": b,
                    "found_at": now,
                }
            )
    with db.write() as session:
        for start in range(0, len(rows), 10_000):
            session.execute(insert(DuplicatePair), rows[start : start + 10_000])


async def test_a_queue_of_100k_pairs_pages_by_keyset(settings: Settings, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'big.db'}"
    async with app_client(settings.model_copy(update={"database_url": url})) as client:
        db = Database(url)
        try:
            fill(db)
        finally:
            db.dispose()

        summary = (await client.get("/duplicates/calibration")).json()
        assert sum(b["pairs"] for b in summary["histogram"]) == PAIRS

        # decide two pairs first: they must not be served
        first = (await client.get("/duplicates", params={"min_score": 0.8, "limit": 2})).json()
        for pair in first["pairs"]:
            body = {"a": pair["a"], "b": pair["b"], "decision": "same"}
            assert (await client.post("/duplicates/decisions", json=body)).status_code == 200
        decided = {(p["a"], p["b"]) for p in first["pairs"]}

        seen: set[tuple[str, str]] = set()
        timings: list[float] = []
        last = (2.0, "", "")
        cursor = None
        while True:
            params = {"min_score": 0.8, "limit": 1000, "undecided": "true"}
            if cursor:
                params["cursor"] = cursor
            started = time.perf_counter()
            response = await client.get("/duplicates", params=params)
            timings.append(time.perf_counter() - started)
            page = response.json()
            for p in page["pairs"]:
                key = (-p["score"], p["a"], p["b"])
                assert key > (-last[0], last[1], last[2])  # strictly in queue order
                last = (p["score"], p["a"], p["b"])
                seen.add((p["a"], p["b"]))
            cursor = page["next_cursor"]
            if not cursor:
                break

        assert len(seen) == PAIRS - 2
        assert not (seen & decided)
        # keyset paging: the last pages cost about what the first ones do (an OFFSET
        # would make them ~100x slower)
        head = sorted(timings[:10])[5]
        tail = sorted(timings[-10:])[5]
        assert tail < head * 3 + 0.05, (head, tail)
        assert max(timings) < 1.0, max(timings)

        after = (await client.get("/duplicates/calibration")).json()
        assert sum(b["pairs"] for b in after["histogram"]) == PAIRS - 2
