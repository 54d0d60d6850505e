from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.catalogue.models import Product, ProductImage
from app.cli import cli
from app.core.database import Database
from tests.images import encode, pattern

runner = CliRunner()


def _env(tiny_model_dir: Path, data_dir: Path, database_url: str) -> dict[str, str]:
    return {
        "VS_MODEL": str(tiny_model_dir),
        "VS_DATA_DIR": str(data_dir),
        "VS_DATABASE_URL": database_url,
        "VS_PRECISION": "fp32",
        "VS_DEVICE": "cpu",
    }


def _counts(database_url: str) -> tuple[int, int]:
    db = Database(database_url)
    with db.read() as session:
        products = session.scalar(select(func.count()).select_from(Product))
        images = session.scalar(select(func.count()).select_from(ProductImage))
    db.dispose()
    return int(products or 0), int(images or 0)


class TestIngestCsv:
    def test_ingest_resume_and_failures(
        self, tmp_path: Path, tiny_model_dir: Path, database_url: str
    ) -> None:
        images = tmp_path / "imgs"
        images.mkdir()
        for i in range(6):
            pattern(seed=i).save(images / f"{i}.jpg")
        (images / "broken.jpg").write_bytes(b"not a jpeg")
        rows = [
            {"id": "a", "image": "imgs/0.jpg", "title": "A", "category": "x"},
            {"id": "a", "image": "imgs/1.jpg", "title": "A", "category": "x"},
            {"id": "b", "image": "imgs/2.jpg|imgs/3.jpg", "title": "B", "category": "y"},
            {"id": "c", "image": "imgs/broken.jpg", "title": "C", "category": "y"},
            {"id": "d", "image": "imgs/4.jpg", "title": "D", "category": "y"},
        ]
        listing = tmp_path / "products.csv"
        with listing.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["id", "image", "title", "category"])
            writer.writeheader()
            writer.writerows(rows)
        failures = tmp_path / "failures.jsonl"
        env = _env(tiny_model_dir, tmp_path / "data", database_url)
        args = ["ingest", str(listing), "--json", "--failures", str(failures)]

        first = runner.invoke(cli, args, env=env)

        assert first.exit_code == 2, first.output  # one product failed
        summary = json.loads(first.stdout[first.stdout.index("{") :])
        assert summary["products"] == 4
        assert summary["created"] == 3
        assert summary["failed"] == 1
        assert summary["images"] == 5
        assert summary["images_embedded"] == 5
        assert 0.0 <= summary["share_outside_model"] <= 1.0
        failed = [json.loads(line) for line in failures.read_text().splitlines()]
        assert [f["id"] for f in failed] == ["c"]
        assert failed[0]["error"]["code"] == "image_undecodable"
        assert _counts(database_url) == (3, 5)

        # Resume: the broken image is fixed, everything else is unchanged and not re-embedded.
        pattern(seed=9).save(images / "broken.jpg")
        second = runner.invoke(cli, args, env=env)

        assert second.exit_code == 0, second.output
        summary = json.loads(second.stdout[second.stdout.index("{") :])
        assert summary["unchanged"] == 3
        assert summary["created"] == 1
        assert summary["images_embedded"] == 1
        assert not failures.exists()
        assert _counts(database_url) == (4, 6)

    @pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
    def test_unreadable_rows_fail_alone_with_their_line(
        self, tmp_path: Path, tiny_model_dir: Path, database_url: str
    ) -> None:
        for i in range(3):
            pattern(seed=i).save(tmp_path / f"{i}.jpg")
        listing = tmp_path / "products.csv"
        listing.write_text(
            "id,image,labels,bbox_x,bbox_y,bbox_w,bbox_h\n"
            "good,0.jpg,brand=Acme,,,,\n"
            "bad-box,1.jpg,,left,0,10,10\n"
            "bad-labels,2.jpg,no-equals,,,,\n"
            "also-good,2.jpg,,,,,\n"
        )
        failures = tmp_path / "failures.jsonl"
        env = _env(tiny_model_dir, tmp_path / "data", database_url)
        args = ["ingest", str(listing), "--json", "--failures", str(failures)]

        result = runner.invoke(cli, args, env=env)

        assert result.exit_code == 2, result.output
        summary = json.loads(result.stdout[result.stdout.index("{") :])
        assert (summary["products"], summary["created"], summary["failed"]) == (4, 2, 2)
        failed = [json.loads(line) for line in failures.read_text().splitlines()]
        assert [(f["line"], f["error"]["code"]) for f in failed] == [
            (3, "invalid_request"),
            (4, "invalid_request"),
        ]
        assert "no-equals" in failed[1]["error"]["message"]
        assert _counts(database_url) == (2, 2)

    def test_products_10k_columns_with_boxes(
        self, tmp_path: Path, tiny_model_dir: Path, database_url: str
    ) -> None:
        pattern(100, 80, seed=1).save(tmp_path / "q.jpg")
        listing = tmp_path / "gallery.csv"
        listing.write_text(
            "seller_img_id,img_path,bbox_x,bbox_y,bbox_w,bbox_h,product_id\n7,q.jpg,10,10,50,40,3\n"
        )
        env = _env(tiny_model_dir, tmp_path / "data", database_url)
        result = runner.invoke(
            cli,
            [
                "ingest",
                str(listing),
                "--id-column",
                "seller_img_id",
                "--image-column",
                "img_path",
                "--title-column",
                "product_id",
                "--json",
            ],
            env=env,
        )
        assert result.exit_code == 0, result.output
        db = Database(database_url)
        with db.read() as session:
            image = session.scalars(select(ProductImage)).one()
            product = session.scalars(select(Product)).one()
        db.dispose()
        assert product.external_id == "7"
        assert product.title == "3"
        assert image.box == [10, 10, 50, 40]


class TestIngestJsonl:
    @pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
    def test_jsonl_with_paths_and_data(
        self, tmp_path: Path, tiny_model_dir: Path, database_url: str
    ) -> None:
        pattern(seed=1).save(tmp_path / "a.png")
        data = base64.b64encode(encode(pattern(seed=2), "WEBP")).decode()
        lines = [
            {"id": "p1", "title": "one", "images": [{"path": "a.png"}]},
            {"id": "p2", "attributes": {"k": 1}, "images": [{"data": data}]},
        ]
        listing = tmp_path / "products.jsonl"
        listing.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        env = _env(tiny_model_dir, tmp_path / "data", database_url)
        result = runner.invoke(cli, ["ingest", str(listing), "--json"], env=env)
        assert result.exit_code == 0, result.output
        assert _counts(database_url) == (2, 2)


def test_parquet_reads_as_the_same_products_as_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from app.catalogue.ingest import read_products

    csv_path = tmp_path / "products.csv"
    csv_path.write_text(
        "id,image,title,category,bbox_x,bbox_y,bbox_w,bbox_h\n"
        "a,a1.jpg,Apple,fruit,1,2,30,40\n"
        "a,a2.jpg,Apple,fruit,,,,\n"
        "b,https://example.com/b.jpg|b2.jpg,Bread,bakery,,,,\n"
    )
    table = pa.table(
        {
            "id": ["a", "a", "b"],
            "image": [["a1.jpg"], ["a2.jpg"], ["https://example.com/b.jpg", "b2.jpg"]],
            "title": ["Apple", "Apple", "Bread"],
            "category": ["fruit", "fruit", "bakery"],
            "bbox_x": [1.0, None, None],
            "bbox_y": [2.0, None, None],
            "bbox_w": [30.0, None, None],
            "bbox_h": [40.0, None, None],
        }
    )
    parquet_path = tmp_path / "products.parquet"
    pq.write_table(table, parquet_path)

    from_csv = list(read_products(csv_path))
    from_parquet = list(read_products(parquet_path))

    assert from_parquet == from_csv
    assert [p.id for p in from_parquet] == ["a", "b"]
    assert [len(p.images) for p in from_parquet] == [2, 2]
    assert from_parquet[1].images[0].url == "https://example.com/b.jpg"


class TestIngestLabelsAndSets:
    def test_csv_and_jsonl_carry_labels_and_sets(
        self, tmp_path: Path, tiny_model_dir: Path, database_url: str
    ) -> None:
        from app.catalogue import repository as repo

        pattern(100, 80, seed=1).save(tmp_path / "a.jpg")
        pattern(100, 80, seed=2).save(tmp_path / "b.jpg")
        listing = tmp_path / "products.csv"
        listing.write_text(
            'id,image,labels,sets\nc1,a.jpg,"color=red,color=blue,brand=Acme",feed|catalogue\n'
        )
        jsonl = tmp_path / "more.jsonl"
        record = {"id": "j1", "labels": {"fat": ["whole"]}, "sets": ["feed"]}
        jsonl.write_text(json.dumps({**record, "images": [{"path": "b.jpg"}]}) + "\n")
        env = _env(tiny_model_dir, tmp_path / "data", database_url)
        for path in (listing, jsonl):
            result = runner.invoke(cli, ["ingest", str(path), "--json"], env=env)
            assert result.exit_code == 0, result.output
        db = Database(database_url)
        with db.read() as session:
            pks = {p.external_id: p.pk for p in session.scalars(select(Product))}
            labels = repo.labels_of(session, list(pks.values()))
            sets = repo.sets_of(session, list(pks.values()))
        db.dispose()
        assert labels[pks["c1"]] == {"brand": ["Acme"], "color": ["blue", "red"]}
        assert sets[pks["c1"]] == ["catalogue", "feed"]
        assert labels[pks["j1"]] == {"fat": ["whole"]}
        assert sets[pks["j1"]] == ["feed"]
