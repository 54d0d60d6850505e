"""Thumbnails: made at ingest, served with ETags under the read-key rules, and made for
older catalogues by `vsearch thumbnails backfill`."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
from PIL import Image
from sqlalchemy import delete, func, select
from typer.testing import CliRunner

from app.catalogue.models import ImageThumbnail
from app.cli import cli
from app.core.config import Settings
from app.core.database import Database
from tests.conftest import app_client

GROCERY = Path(__file__).resolve().parents[1] / "fixtures" / "grocery"
OATLY = GROCERY / "oatly-natural-oatghurt.jpg"
TROPICANA = GROCERY / "tropicana-apple-juice.jpg"


async def post_photo(client: httpx.AsyncClient, product_id: str, path: Path) -> int:
    image = {"data": base64.b64encode(path.read_bytes()).decode()}
    body = {"products": [{"id": product_id, "title": path.stem, "images": [image]}]}
    response = await client.post("/products", json=body)
    assert response.json()["results"][0]["status"] == "created", response.text
    product = (await client.get(f"/products/{product_id}")).json()
    return int(product["images"][0]["image_id"])


async def test_thumbnail_is_a_small_webp_of_the_photo(db_client: httpx.AsyncClient) -> None:
    image_id = await post_photo(db_client, "oatly", OATLY)

    response = await db_client.get(f"/images/{image_id}/thumbnail")

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    thumb = Image.open(io.BytesIO(response.content))
    original = Image.open(OATLY)
    assert thumb.format == "WEBP"
    # never enlarged, never larger than 256 px, same aspect ratio
    assert max(thumb.size) == min(256, max(original.size))
    assert abs(thumb.width / thumb.height - original.width / original.height) < 0.03


async def test_large_photo_is_scaled_to_256(client: httpx.AsyncClient, dataset: Path) -> None:
    photo = next((dataset / "dataset" / "train" / "Packages").rglob("*.jpg"))
    image_id = await post_photo(client, "photo", photo)
    response = await client.get(f"/images/{image_id}/thumbnail")
    thumb = Image.open(io.BytesIO(response.content))
    original = Image.open(photo)
    assert max(original.size) > 256
    assert max(thumb.size) == 256
    assert abs(thumb.width / thumb.height - original.width / original.height) < 0.03
    assert len(response.content) < len(photo.read_bytes())


async def test_etag_revalidates_with_304(client: httpx.AsyncClient) -> None:
    image_id = await post_photo(client, "oatly", OATLY)
    first = await client.get(f"/images/{image_id}/thumbnail")
    etag = first.headers["etag"]

    again = await client.get(f"/images/{image_id}/thumbnail", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag

    stale = await client.get(f"/images/{image_id}/thumbnail", headers={"If-None-Match": '"x"'})
    assert stale.status_code == 200
    assert stale.content == first.content


async def test_identical_bytes_share_a_thumbnail_and_different_ones_do_not(
    client: httpx.AsyncClient,
) -> None:
    a = await post_photo(client, "a", OATLY)
    b = await post_photo(client, "b", OATLY)  # re-posted bytes: embedding reused, no decode
    c = await post_photo(client, "c", TROPICANA)
    tags = [(await client.get(f"/images/{i}/thumbnail")).headers["etag"] for i in (a, b, c)]
    assert tags[0] == tags[1] != tags[2]


async def test_unknown_image_is_404_in_the_envelope(client: httpx.AsyncClient) -> None:
    response = await client.get("/images/999999/thumbnail")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "thumbnail_not_found"


async def test_read_keys_protect_thumbnails(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": "w-key", "api_keys_read": "r-key"})
    async with app_client(keyed) as client:
        client.headers["X-API-Key"] = "w-key"
        image_id = await post_photo(client, "oatly", OATLY)
        del client.headers["X-API-Key"]
        assert (await client.get(f"/images/{image_id}/thumbnail")).status_code == 401
        ok = await client.get(f"/images/{image_id}/thumbnail", headers={"X-API-Key": "r-key"})
        assert ok.status_code == 200


async def test_thumbnail_route_is_documented(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/images/{image_id}/thumbnail"]["get"]
    assert operation["operationId"] == "get_image_thumbnail"
    assert "image/webp" in operation["responses"]["200"]["content"]
    assert {"304", "404"} <= set(operation["responses"])
    assert operation["responses"]["404"]["x-error-codes"] == ["thumbnail_not_found"]


def test_backfill_makes_missing_thumbnails(tmp_path: Path, tiny_model_dir: Path) -> None:
    listing = tmp_path / "products.csv"
    listing.write_text(f"id,image\noatly,{OATLY}\ntropicana,{TROPICANA}\n")
    db_url = f"sqlite:///{tmp_path / 'c.db'}"
    env = {
        "VS_MODEL": str(tiny_model_dir),
        "VS_DATA_DIR": str(tmp_path / "data"),
        "VS_DATABASE_URL": db_url,
        "VS_PRECISION": "fp32",
        "VS_DEVICE": "cpu",
    }
    runner = CliRunner()
    ingested = runner.invoke(cli, ["ingest", str(listing)], env=env)
    assert ingested.exit_code == 0, (ingested.output, ingested.exception)
    db = Database(db_url)
    try:
        with db.write() as session:  # a catalogue from before thumbnails were made
            session.execute(delete(ImageThumbnail))

        result = runner.invoke(cli, ["thumbnails", "backfill"], env=env)

        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout[result.stdout.index("{") :])
        assert report["thumbnails_made"] == 2
        with db.read() as session:
            assert session.scalar(select(func.count()).select_from(ImageThumbnail)) == 2
        again = runner.invoke(cli, ["thumbnails", "backfill"], env=env)
        assert json.loads(again.stdout[again.stdout.index("{") :])["thumbnails_made"] == 0
    finally:
        db.dispose()
