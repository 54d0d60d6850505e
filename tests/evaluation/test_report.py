"""Per-query results, confusion summary and the hardest-queries sheet, on real photos."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.evaluation.protocols import Item
from app.evaluation.report import (
    confusion_summary,
    hardest_queries_sheet,
    query_results,
    write_query_results,
)
from tests.images import encode, pattern


@pytest.fixture
def items(tmp_path: Path) -> tuple[list[Item], list[Item]]:
    paths = []
    for n in range(7):
        path = tmp_path / f"{n}.jpg"
        path.write_bytes(encode(pattern(120 + 10 * n, 90, seed=n), "JPEG"))
        paths.append(path)
    gallery = [Item(f"g{n}", paths[n], label) for n, label in enumerate("aabbc")]
    queries = [Item("q0", paths[5], "a"), Item("q1", paths[6], "b")]
    return gallery, queries


def test_a_query_answered_by_another_product_is_counted_against_the_pair(
    items: tuple[list[Item], list[Item]],
) -> None:
    gallery, queries = items
    # q0 (product a): b's image first, then a's; q1 (product b): right at once.
    scores = np.asarray([[0.6, 0.2, 0.9, 0.1, 0.3], [0.1, 0.2, 0.8, 0.7, 0.3]])

    results = query_results(scores, queries, gallery)

    assert [r.correct for r in results] == [False, True]
    assert results[0].first_positive_rank == 2
    assert results[0].predicted_product_id == "b"
    assert results[0].margin == pytest.approx(0.6 - 0.9)
    assert results[0].average_precision == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert results[0].top_gallery_ids == ["g2", "g0", "g4", "g1", "g3"]
    assert results[1].average_precision == pytest.approx(1.0)
    confusions = confusion_summary(results, gallery)
    assert confusions == [
        {
            "product_id": "a",
            "confused_with": "b",
            "queries": 1,
            "share_of_product": 1.0,
            "product_image": str(gallery[0].path),
            "confused_with_image": str(gallery[2].path),
        }
    ]


def test_results_are_written_as_json_lines_or_csv(
    items: tuple[list[Item], list[Item]], tmp_path: Path
) -> None:
    gallery, queries = items
    results = query_results(np.asarray([[0.6, 0.2, 0.9, 0.1, 0.3]] * 2), queries, gallery)

    write_query_results(results, tmp_path / "r.jsonl")
    write_query_results(results, tmp_path / "r.csv")

    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in rows] == ["q0", "q1"]
    assert rows[1]["correct"] is True
    table = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert table[0]["top_gallery_ids"] == "g2|g0|g4|g1|g3"
    assert float(table[0]["margin"]) == pytest.approx(-0.3)


def test_the_sheet_shows_the_hardest_query_first(
    items: tuple[list[Item], list[Item]], tmp_path: Path
) -> None:
    gallery, queries = items
    scores = np.asarray([[0.6, 0.2, 0.9, 0.1, 0.3], [0.1, 0.2, 0.8, 0.7, 0.3]])
    results = query_results(scores, queries, gallery)

    drawn = hardest_queries_sheet(results, queries, gallery, tmp_path / "h.png", side=64)

    assert drawn == 2
    sheet = Image.open(tmp_path / "h.png")
    assert sheet.format == "PNG"
    # one row per query; query, five results and the true match per row
    assert sheet.height > 2 * 64
    assert sheet.width > 7 * 64
    # the first row's first result is another product: its frame is red
    red = sheet.convert("RGB").getpixel((8 + 72 + 1, 8 + 10))
    assert red[0] > 150
    assert red[1] < 100
