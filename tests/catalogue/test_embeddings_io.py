"""`vsearch embeddings export/import`: Parquet round trips between real catalogues (SQLite
and PostgreSQL), searched through the real app afterwards."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.catalogue.models import ChangeLog, ProductImage
from app.cli import cli
from app.core.config import Settings
from app.core.database import Database
from tests.conftest import app_client, new_postgres_database
from tests.images import encode, pattern

runner = CliRunner()
IMAGES = {f"sku-{i}": encode(pattern(seed=i), "PNG") for i in range(4)}


@pytest.fixture
def fresh_url(
    database_url: str, tmp_path: Path, sqlite_template: Path, request: pytest.FixtureRequest
) -> str:
    """A second empty catalogue of the same kind as `database_url`."""
    if database_url.startswith("sqlite"):
        path = tmp_path / "fresh.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))


def env_for(settings: Settings, url: str, data_dir: Path) -> dict[str, str]:
    return {
        "VS_MODEL": settings.model,
        "VS_DATA_DIR": str(data_dir),
        "VS_DATABASE_URL": url,
        "VS_PRECISION": "fp32",
        "VS_DEVICE": "cpu",
    }


def last_json(output: str) -> dict[str, object]:
    return json.loads(output[output.index("{") :])  # type: ignore[no-any-return]


async def fill(settings: Settings) -> None:
    async with app_client(settings) as client:
        products = [
            {
                "id": sku,
                "title": f"title {sku}",
                "category": "shelf-a" if n % 2 else "shelf-b",
                "attributes": {"n": n},
                "images": [{"data": base64.b64encode(data).decode()}],
            }
            for n, (sku, data) in enumerate(IMAGES.items())
        ]
        response = await client.post("/products", json={"products": products})
        assert response.status_code == 200, response.text


async def search(settings: Settings, image: bytes) -> list[dict[str, object]]:
    async with app_client(settings) as client:
        body = {"image": base64.b64encode(image).decode(), "k": 4}
        response = await client.post("/search", json=body)
        assert response.status_code == 200, response.text
        return response.json()["results"]  # type: ignore[no-any-return]


def counts(url: str) -> tuple[int, int]:
    db = Database(url)
    with db.read() as session:
        images = session.scalar(select(func.count()).select_from(ProductImage))
        changes = session.scalar(select(func.count()).select_from(ChangeLog))
    db.dispose()
    return int(images or 0), int(changes or 0)


def write_rows(path: Path, rows: list[dict[str, object]], dim: int = 512) -> None:
    """A Parquet file as an outside producer would write it (its own column order)."""
    table = pa.table(
        {
            "product_id": [r["product_id"] for r in rows],
            "model_id": [r["model_id"] for r in rows],
            "vector": pa.array([r["vector"] for r in rows], pa.list_(pa.float32(), dim)),
            "image_sha256": [r.get("image_sha256") for r in rows],
            "source": [r.get("source") for r in rows],
            "title": [r.get("title") for r in rows],
        }
    )
    pq.write_table(table, path)


def unit(seed: int, dim: int = 512) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()  # type: ignore[no-any-return]


async def test_round_trip_into_a_fresh_catalogue_then_search_finds_the_products(
    db_settings: Settings, fresh_url: str, tmp_path: Path
) -> None:
    await fill(db_settings)
    exported = tmp_path / "emb.parquet"
    source_env = env_for(db_settings, str(db_settings.database_url), db_settings.data_dir)
    result = runner.invoke(cli, ["embeddings", "export", str(exported)], env=source_env)
    assert result.exit_code == 0, result.output
    assert last_json(result.stdout)["rows"] == len(IMAGES)
    table = pq.read_table(exported)
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 512)
    keys = dict(
        zip(*table.select(["product_id", "image_sha256"]).to_pydict().values(), strict=True)
    )
    assert keys == {sku: hashlib.sha256(data).hexdigest() for sku, data in IMAGES.items()}

    fresh_dir = tmp_path / "fresh-data"
    fresh_env = env_for(db_settings, fresh_url, fresh_dir)
    failures = tmp_path / "failures.jsonl"
    args = ["embeddings", "import", str(exported), "--failures", str(failures)]
    result = runner.invoke(cli, args, env=fresh_env)
    assert result.exit_code == 0, result.output
    report = last_json(result.stdout)
    assert report["products"] == {"created": 4, "updated": 0, "unchanged": 0, "failed": 0}
    assert not failures.exists()

    # A new Settings, not model_copy: that would keep the source's cached database URL.
    fresh = Settings.model_validate(
        {**db_settings.model_dump(), "database_url": fresh_url, "data_dir": fresh_dir}
    )
    for sku, data in IMAGES.items():
        hits = await search(fresh, data)
        assert hits[0]["id"] == sku, hits
        assert hits[0]["title"] == f"title {sku}"
        assert float(hits[0]["score"]) > 0.99  # type: ignore[arg-type]
    async with app_client(fresh) as client:
        product = (await client.get("/products/sku-1")).json()
    assert product["category"] == "shelf-a"
    assert product["attributes"] == {"n": 1}

    # Idempotent: the same file again changes nothing, not even the change log.
    before = counts(fresh_url)
    result = runner.invoke(cli, args, env=fresh_env)
    assert result.exit_code == 0, result.output
    assert last_json(result.stdout)["products"]["unchanged"] == 4  # type: ignore[index]
    assert counts(fresh_url) == before

    # Other vectors for one product replace its image, as a new POST would.
    rows = table.to_pylist()
    rows[0]["vector"] = unit(99)
    changed = tmp_path / "changed.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), changed)
    result = runner.invoke(cli, ["embeddings", "import", str(changed)], env=fresh_env)
    assert result.exit_code == 0, result.output
    report = last_json(result.stdout)
    assert report["products"]["updated"] == 1  # type: ignore[index]
    assert (report["images_added"], report["images_deleted"]) == (1, 1)
    images, changes = counts(fresh_url)
    assert images == before[0]
    assert changes == before[1] + 2  # one upsert and one delete in the change log


def test_a_file_of_another_model_is_refused(db_settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "other.parquet"
    write_rows(
        path,
        [{"product_id": "x", "model_id": "someone-else@1", "vector": unit(1), "source": "a.jpg"}],
    )
    env = env_for(db_settings, str(db_settings.database_url), db_settings.data_dir)
    result = runner.invoke(cli, ["embeddings", "import", str(path)], env=env)
    assert result.exit_code == 1
    assert "someone-else@1" in result.output
    assert "model" in result.output
    assert counts(str(db_settings.database_url)) == (0, 0)


def test_bad_rows_go_to_the_failures_file_and_the_rest_is_imported(
    db_settings: Settings, tmp_path: Path
) -> None:
    env = env_for(db_settings, str(db_settings.database_url), db_settings.data_dir)
    # The catalogue's model id: the same model the service loads.
    from app.inference.runtime import load_model

    model_id = load_model(db_settings.model, device="cpu", precision="fp32").model_id
    nan = unit(3)
    nan[7] = float("nan")
    rows: list[dict[str, object]] = [
        {"product_id": "good-1", "model_id": model_id, "vector": unit(1), "source": "1.jpg"},
        {
            "product_id": "good-2",
            "model_id": model_id,
            "vector": unit(2),
            "image_sha256": "ab" * 32,
        },
        {"product_id": "nan", "model_id": model_id, "vector": nan, "source": "3.jpg"},
        {"product_id": "bad-sha", "model_id": model_id, "vector": unit(4), "image_sha256": "zz"},
        # A product with one bad image of two is not imported at all.
        {"product_id": "half", "model_id": model_id, "vector": unit(5), "source": "5.jpg"},
        {"product_id": "half", "model_id": model_id, "vector": unit(6)},
    ]
    path = tmp_path / "mixed.parquet"
    write_rows(path, rows)
    failures = tmp_path / "bad.jsonl"
    result = runner.invoke(
        cli, ["embeddings", "import", str(path), "--failures", str(failures)], env=env
    )
    assert result.exit_code == 2, result.output
    report = last_json(result.stdout)
    assert report["products"] == {"created": 2, "updated": 0, "unchanged": 0, "failed": 3}
    bad = [json.loads(line) for line in failures.read_text().splitlines()]
    assert [(b["row"], b["product_id"]) for b in bad] == [(2, "nan"), (3, "bad-sha"), (5, "half")]
    assert "finite" in bad[0]["error"]
    assert "64 hexadecimal" in bad[1]["error"]
    assert "image_sha256 or source" in bad[2]["error"]
    assert counts(str(db_settings.database_url)) == (2, 2)


def test_an_interrupted_import_resumes_after_its_last_committed_batch(
    settings: Settings, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    env = env_for(settings, url, tmp_path / "data")
    from app.inference.runtime import load_model

    model_id = load_model(settings.model, device="cpu", precision="fp32").model_id
    rows: list[dict[str, object]] = [
        {"product_id": f"p{i}", "model_id": model_id, "vector": unit(i), "source": f"{i}.jpg"}
        for i in range(6)
    ]
    path = tmp_path / "six.parquet"
    write_rows(path, rows)
    # What an import stopped after its first batch (of 4 rows) leaves behind.
    stat = path.stat()
    state = {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "embeddings-import.json").write_text(json.dumps({**state, "rows_done": 4}))

    result = runner.invoke(cli, ["embeddings", "import", str(path), "--batch", "4"], env=env)

    assert result.exit_code == 0, result.output
    report = last_json(result.stdout)
    assert report["resumed_at_row"] == 4
    assert report["products"]["created"] == 2  # type: ignore[index]
    assert counts(url)[0] == 2
    assert not (tmp_path / "data" / "embeddings-import.json").exists()
    # Importing the whole file again: the two already there stay unchanged.
    result = runner.invoke(cli, ["embeddings", "import", str(path), "--restart"], env=env)
    assert last_json(result.stdout)["products"] == {
        "created": 4,
        "updated": 0,
        "unchanged": 2,
        "failed": 0,
    }
