from __future__ import annotations

from pathlib import Path

from app.benchmarks.duplicates import run_duplicates_benchmark


def test_scan_benchmark_finds_every_planted_pair(database_url: str, tmp_path: Path) -> None:
    """The benchmark's whole path on each database: fill, index, scan (staged rows, COPY
    on PostgreSQL, one merge), and every planted near-duplicate found by the exact index
    a small catalogue gets."""
    result = run_duplicates_benchmark(
        n=3000, batch=500, database_url=database_url, workdir=tmp_path
    )

    report = result["scan_report"]
    assert result["database"] == database_url.split(":", 1)[0].split("+", 1)[0]
    assert result["index"] == "flat"
    assert result["planted_near_duplicates"] == 30
    assert result["planted_recall"] == 1.0
    assert result["pairs_found"] == report["pairs"] > 30
    # a pair is found from both of its products, in two batches: more rows staged than kept
    assert report["pairs_staged"] > report["pairs"]
    assert report["images"] == 3000
    assert set(report["phases_s"]) == {"read", "knn", "pairs", "write", "write_wait", "merge"}
