"""`vsearch ingest --engine ray` against plain `vsearch ingest`, on a real local Ray
instance (skipped when the `ray` extra is not installed)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from app.catalogue.models import Product, ProductImage
from app.cli import cli
from app.core.database import Database
from tests.images import encode, pattern

ray = pytest.importorskip("ray")

runner = CliRunner()
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "grocery"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module (the command reuses a running one), shut
    down at the end. Logical CPU slots above the cores: see RayOptions."""
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _catalogue(tmp_path: Path) -> Path:
    """A CSV of two real photos, six generated images and one missing file; the product
    `two` has two images (adjacent rows)."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for photo in sorted(FIXTURES.glob("*.jpg")):
        rows.append({"id": photo.stem, "image": str(photo), "title": photo.stem})
    for n in range(6):
        (images / f"g{n}.jpg").write_bytes(encode(pattern(120, 90, seed=n)))
        pid = "two" if n in (4, 5) else f"generated-{n}"
        rows.append({"id": pid, "image": f"images/g{n}.jpg", "title": pid})
    rows.append({"id": "missing", "image": "images/nowhere.jpg", "title": "missing"})
    path = tmp_path / "catalogue.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _ingest(csv_path: Path, env: dict[str, str], *extra: str) -> tuple[int, dict[str, object]]:
    failures = csv_path.parent / "failures.jsonl"
    result = runner.invoke(
        cli,
        ["ingest", str(csv_path), "--json", "--failures", str(failures), *extra],
        env=env,
        catch_exceptions=False,
    )
    return result.exit_code, json.loads(result.stdout[result.stdout.index("{") :])


def _vectors(database_url: str) -> dict[tuple[str, int], np.ndarray]:
    db = Database(database_url)
    with db.read() as session:
        rows = session.execute(
            select(Product.external_id, ProductImage.position, ProductImage.embedding).join(
                ProductImage, ProductImage.product_pk == Product.pk
            )
        ).all()
    db.dispose()
    return {(pid, pos): np.frombuffer(e, dtype=np.float32) for pid, pos, e in rows}


@pytest.mark.slow
def test_ray_ingest_matches_plain_ingest_and_resumes(
    local_ray: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    csv_path = _catalogue(tmp_path)
    env = {
        "VS_MODEL": str(tiny_model_dir),
        "VS_PRECISION": "fp32",
        "VS_DEVICE": "cpu",
    }
    plain_url = f"sqlite:///{tmp_path / 'plain.db'}"
    ray_url = f"sqlite:///{tmp_path / 'ray.db'}"
    plain_env = {**env, "VS_DATA_DIR": str(tmp_path / "plain"), "VS_DATABASE_URL": plain_url}
    ray_env = {**env, "VS_DATA_DIR": str(tmp_path / "ray"), "VS_DATABASE_URL": ray_url}

    code, plain = _ingest(csv_path, plain_env)
    assert code == 2  # the missing file
    code, first = _ingest(csv_path, ray_env, "--engine", "ray", "--ray-batch-size", "4")

    assert code == 2
    assert first["engine"] == "ray"
    for key in ("products", "images", "created", "failed"):
        assert first[key] == plain[key], key
    assert (first["created"], first["failed"], first["images"]) == (7, 1, 8)
    failure = json.loads((tmp_path / "failures.jsonl").read_text())
    assert failure["id"] == "missing"
    assert failure["error"]["code"] == "image_undecodable"
    # The same model and preprocessing: the same vectors as the service computes.
    theirs, ours = _vectors(plain_url), _vectors(ray_url)
    assert theirs.keys() == ours.keys()
    assert len(ours) == 8
    for key, vector in ours.items():
        assert float(vector @ theirs[key]) > 0.9999, key

    code, again = _ingest(csv_path, ray_env, "--engine", "ray", "--ray-batch-size", "4")

    assert code == 2
    assert (again["unchanged"], again["created"], again["updated"]) == (7, 0, 0)
    assert (again["images_embedded"], again["images_reused"]) == (0, 8)
    after = _vectors(ray_url)
    assert after.keys() == ours.keys()
    assert all(np.array_equal(vector, ours[key]) for key, vector in after.items())
    # Searchable through the index the command kept in its data directory.
    manifest = json.loads((tmp_path / "ray" / "index" / "manifest.json").read_text())
    assert manifest["ntotal"] == 8
