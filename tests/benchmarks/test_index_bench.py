"""`vsearch bench augmented-embeddings` and `vsearch bench index --vectors`: real photos
through a generated model, then the index benchmark on those embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from app.benchmarks.augmented import images_path
from app.benchmarks.index import load_workload

runner = CliRunner()


def invoke(*args: str) -> dict[str, Any] | list[Any]:
    from app.cli import cli

    result = runner.invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    start = min(i for i in (result.stdout.find("{"), result.stdout.find("[")) if i >= 0)
    out: dict[str, Any] | list[Any] = json.loads(result.stdout[start:])
    return out


@pytest.fixture(scope="module")
def embeddings(tiny_model_dir: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("aug") / "views.npy"
    images = dataset / "dataset" / "iconic-images-and-descriptions"
    report = invoke(
        "bench", "augmented-embeddings", "--model", str(tiny_model_dir), "--images",
        str(images), "--out", str(out), "--n", "600", "--device", "cpu", "--batch-size", "16",
    )  # fmt: skip
    return out, report


def test_views_are_unit_embeddings_of_every_image(embeddings: tuple[Path, Any]) -> None:
    out, report = embeddings
    matrix = np.load(out)
    sources = np.load(images_path(out))
    assert matrix.shape == (600, 512)
    assert report["rows"] == 600
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    assert len(np.unique(sources)) == report["images"]  # every image has views
    assert not list(out.parent.glob("*partial*"))
    # Augmented views differ from each other, and views of one image are closer to each
    # other than views of different images, on average over all pairs (even with a random
    # model: crops of one photo share colours and textures).
    cosines = matrix @ matrix.T
    same = sources[:, None] == sources[None, :]
    np.fill_diagonal(same, False)
    different = sources[:, None] != sources[None, :]
    assert cosines[same].max() < 0.99999
    assert cosines[same].mean() > cosines[different].mean() + 0.02


def test_index_benchmark_on_real_embeddings(embeddings: tuple[Path, Any]) -> None:
    out, _ = embeddings
    workload = load_workload(out, 50, 200, lambda _m: None)
    matrix = np.load(out)
    assert workload.n == 550
    np.testing.assert_array_equal(workload.queries, matrix[550:])
    exact = np.argsort(-(matrix[550:] @ matrix[:550].T), axis=1)[:, :10]
    # Ties aside, the streamed ground truth is brute force over the first 550 rows only.
    assert (workload.truth == exact).mean() > 0.99
    assert workload.truth.max() < 550

    unseen = load_workload(out, 50, 200, lambda _m: None, unseen=True)
    sources = np.load(images_path(out))
    database = np.concatenate([block for _, block in unseen.chunks()])
    kept = ~np.isin(sources[:550], sources[550:])
    assert 0 < unseen.n == kept.sum() < 550  # every view of a query image left out
    np.testing.assert_array_equal(database, matrix[:550][kept])
    exact = np.argsort(-(matrix[550:] @ database.T), axis=1)[:, :10]
    assert (unseen.truth == exact).mean() > 0.99

    rows = invoke(
        "bench", "index", "--vectors", str(out), "--queries", "50", "--factory", "IVF8,PQ16",
        "--factory", "IVF8,PQ32x4fsr@1",
        "--nprobe", "8", "--refine", "8", "--hnsw-m", "8", "--hnsw-ef", "64", "--no-sq8",
        "--cold", "10", "--json",
    )  # fmt: skip
    assert isinstance(rows, list)
    by_name = {row["name"]: row for row in rows}
    assert by_name["flat"]["recall_at_10"] == 1.0
    ivf = by_name["ivf8_pq16_np8_refine8_x4"]
    # All 8 lists probed and 80 of 550 candidates re-ranked exactly: near-exact results.
    assert ivf["recall_at_10"] > 0.9
    assert ivf["near_duplicate_source_in_top10"] is None  # no planted duplicates here
    assert ivf["cold_qps_batch1"] > 0
    one_shard = by_name["ivf8_pq32x4fsr_np8_refine8_x1"]  # FACTORY@1: its own shard count
    assert one_shard["recall_at_10"] > 0.9
    assert "hnswlib_m8_ef64" in by_name
