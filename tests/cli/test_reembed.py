from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from app.catalogue.models import ProductImage
from app.cli import cli
from app.core.database import Database
from app.inference.builders import init_random
from app.inference.runtime import load_model
from tests.conftest import app_client
from tests.images import encode, pattern

runner = CliRunner()


def test_switching_models_and_reembedding(
    tiny_model_dir: Path, tmp_path: Path, settings: object
) -> None:
    for i in range(3):
        pattern(seed=i).save(tmp_path / f"{i}.png")
    listing = tmp_path / "p.csv"
    listing.write_text("id,image\n" + "".join(f"p{i},{i}.png\n" for i in range(3)))
    db_url = f"sqlite:///{tmp_path / 'c.db'}"
    env = {
        "VS_MODEL": str(tiny_model_dir),
        "VS_DATA_DIR": str(tmp_path / "data"),
        "VS_DATABASE_URL": db_url,
        "VS_PRECISION": "fp32",
    }
    assert runner.invoke(cli, ["ingest", str(listing)], env=env).exit_code == 0
    upload = base64.b64encode(encode(pattern(seed=9), "PNG")).decode()

    async def post_upload() -> None:
        app_settings = settings.model_copy(update={"database_url": db_url})  # type: ignore[attr-defined]
        async with app_client(app_settings) as client:
            body = {"products": [{"id": "up", "images": [{"data": upload}]}]}
            assert (await client.post("/products", json=body)).status_code == 200

    asyncio.run(post_upload())

    other = init_random(tmp_path / "other", backbone="convnext_atto", input_size=64, seed=7)
    env2 = {**env, "VS_MODEL": str(other)}
    refused = runner.invoke(cli, ["ingest", str(listing)], env=env2)
    assert refused.exit_code != 0
    assert "another model" in str(refused.exception)
    # reindex never embeds: it rebuilds from the catalogue's own embeddings without
    # loading any model, so a missing VS_MODEL does not matter to it.
    no_model = {**env, "VS_MODEL": str(tmp_path / "no-such-model")}
    rebuilt = runner.invoke(cli, ["reindex"], env=no_model)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.stdout[rebuilt.stdout.index("{") :])["ntotal"] == 4

    result = runner.invoke(cli, ["reembed"], env=env2)

    assert result.exit_code == 2  # the uploaded image cannot be re-read
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["reembedded"] == 3
    assert report["unrecoverable_uploads"] == 1
    new_id = load_model(other, device="cpu", precision="fp32").model_id
    db = Database(db_url)
    with db.read() as session:
        models = {i.sha256[:8]: i.model_id for i in session.scalars(select(ProductImage))}
    db.dispose()
    assert sorted(models.values()).count(new_id) == 3
