"""`vsearch bench search-quality` and `search-latency` on small real inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli

runner = CliRunner()


@pytest.mark.slow
def test_search_quality_runs_every_configuration_through_the_service(
    tiny_model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    protocol = dataset / "protocols" / "iconic"
    queries = tmp_path / "queries.csv"
    lines = (protocol / "queries.csv").read_text().splitlines()
    queries.write_text("\n".join(lines[:1] + lines[1::200]) + "\n")  # 13 queries
    result = runner.invoke(
        cli,
        [
            "bench",
            "search-quality",
            "--model",
            str(tiny_model_dir),
            "--gallery",
            str(protocol / "gallery.csv"),
            "--queries",
            str(queries),
            "--images-root",
            str(dataset / "dataset"),
            "--precision",
            "fp32",
            "--k",
            "10",
            "--workdir",
            str(tmp_path),
        ],
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gallery_products"] == 81
    assert report["queries"] == 13
    rows = report["configs"]
    assert rows["flip"]["flip"] is True
    for row in rows.values():
        assert 0 <= row["top1"] <= row["top3"] <= row["top5"] <= 1
        assert row["top1"] <= row["mrr_at_10"] <= row["top5"] + 1e-9 or row["top5"] < 1
        assert row["search_ms_p50"] > 0
    # one image per product: product-level scoring cannot change the order
    baseline = rows["best image (baseline)"]
    assert rows["product m=5 w=0.5"]["mrr_at_10"] == baseline["mrr_at_10"]


def test_search_latency_times_each_feature_on_an_ivfpq_index(tmp_path: Path) -> None:
    result = runner.invoke(
        cli,
        ["bench", "search-latency", "--n", "4000", "--queries", "20", "--workdir", str(tmp_path)],
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["index"]
    assert report["factory"].startswith("IVF")
    assert set(report["rows"]) == {
        "best image (baseline)",
        "alpha-QE n=3",
        "product scoring, 20 candidates x 8 images",
    }
    assert all(row["p99_ms"] >= row["p50_ms"] > 0 for row in report["rows"].values())
