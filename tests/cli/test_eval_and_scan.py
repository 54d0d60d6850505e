from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import cli
from tests.images import encode, pattern

runner = CliRunner()


@pytest.mark.slow
def test_eval_prints_the_metrics_as_json(
    tiny_model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    protocol = dataset / "protocols" / "iconic"
    # A small protocol: the gallery and the first 200 queries.
    queries = tmp_path / "queries.csv"
    lines = (protocol / "queries.csv").read_text().splitlines()
    queries.write_text("\n".join(lines[:201]) + "\n")
    submission = tmp_path / "submission.json"
    result = runner.invoke(
        cli,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--gallery",
            str(protocol / "gallery.csv"),
            "--queries",
            str(queries),
            "--images-root",
            str(dataset / "dataset"),
            "--index",
            "--submission",
            str(submission),
            "--per-query",
            str(tmp_path / "per-query.jsonl"),
            "--hardest",
            str(tmp_path / "hardest.png"),
            "--hardest-count",
            "5",
            "--precision",
            "fp32",
            "--json",
        ],
        env={"VS_INDEX__SHARDS": "2"},
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("map_at_1000", "top1", "top3", "top5", "delta_similarity", "queries", "gallery"):
        assert key in metrics
    assert metrics["queries"] == 200
    assert metrics["gallery"] == 81
    assert 0 <= metrics["top1"] <= metrics["top3"] <= metrics["top5"] <= 1
    assert set(metrics["groups"]) <= {"Fruit", "Vegetables", "Packages"}
    assert "map_at_1000" in metrics["index"]
    ranking = json.loads(submission.read_text())
    assert len(ranking) == 200
    assert all(len(row) == 81 for row in ranking.values())
    rows = [json.loads(line) for line in (tmp_path / "per-query.jsonl").read_text().splitlines()]
    assert len(rows) == 200
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(metrics["top1"])
    wrong = sum(not r["correct"] for r in rows)
    assert sum(c["queries"] for c in metrics["confusions"]) <= wrong
    assert metrics["confusions"] == sorted(metrics["confusions"], key=lambda c: -c["queries"])
    assert metrics["hardest_sheet"]["queries"] == 5
    assert Image.open(tmp_path / "hardest.png").format == "PNG"


def test_duplicates_scan_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    source = pattern(160, 120, seed=4)
    (images / "a.png").write_bytes(encode(source, "PNG"))
    (images / "b.jpg").write_bytes(encode(source, "JPEG", quality=70))
    (images / "c.jpg").write_bytes(encode(pattern(160, 120, seed=5), "JPEG"))
    listing = tmp_path / "p.csv"
    listing.write_text("id,image\na,imgs/a.png\nb,imgs/b.jpg\nc,imgs/c.jpg\n")
    env = {
        "VS_MODEL": str(tiny_model_dir),
        "VS_DATA_DIR": str(tmp_path / "data"),
        "VS_PRECISION": "fp32",
    }
    assert runner.invoke(cli, ["ingest", str(listing)], env=env).exit_code == 0

    result = runner.invoke(cli, ["duplicates", "scan", "--batch", "2"], env=env)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["images"] == 3
    assert report["pairs"] == 1


def test_duplicates_benchmark_finds_every_planted_pair(tmp_path: Path) -> None:
    workdir = tmp_path / "not-yet-there"

    result = runner.invoke(cli, ["bench", "duplicates", "--n", "3000", "--workdir", str(workdir)])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["n"] == 3000
    assert report["planted_near_duplicates"] == 30
    assert report["planted_recall"] == 1.0
    assert report["pairs_found"] >= report["planted_found"]
    assert report["scan_report"]["images"] == 3000
    assert list(workdir.iterdir()) == []  # the temporary catalogue is cleaned up
