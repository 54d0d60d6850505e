"""Search-time quality features through POST /search: flip TTA, query expansion and
product-level scoring, switched by settings and per request."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from PIL import Image, ImageOps

from app.core.config import Settings
from tests.conftest import app_client
from tests.images import encode, pattern


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg(image: Image.Image) -> str:
    return b64(encode(image, "JPEG", quality=92))


async def index(client: httpx.AsyncClient, products: list[dict[str, Any]]) -> None:
    response = await client.post("/products", json={"products": products})
    assert response.status_code == 200
    assert all(r["status"] != "failed" for r in response.json()["results"]), response.json()


def product(pid: str, *images: Image.Image) -> dict[str, Any]:
    return {"id": pid, "images": [{"data": jpeg(image)} for image in images]}


def score_of(body: dict[str, Any], pid: str) -> float:
    return float(next(hit["score"] for hit in body["results"] if hit["id"] == pid))


async def test_flip_brings_a_mirrored_photo_closer(client: httpx.AsyncClient) -> None:
    photo = pattern(160, 120, seed=11)
    await index(
        client,
        [product("shelf", photo)]
        + [product(f"other-{s}", pattern(160, 120, seed=s)) for s in range(4)],
    )
    query = jpeg(ImageOps.mirror(photo))

    plain = (await client.post("/search", json={"image": query, "k": 5})).json()
    flipped = (await client.post("/search", json={"image": query, "k": 5, "flip": True})).json()
    form = await client.post(
        "/search",
        files={"image": ("q.jpg", base64.b64decode(query))},
        data={"k": "5", "flip": "true"},
    )

    # one of the two views is the catalogue photo itself
    assert score_of(flipped, "shelf") > score_of(plain, "shelf")
    assert form.status_code == 200
    assert score_of(form.json(), "shelf") == pytest.approx(score_of(flipped, "shelf"), abs=1e-4)


async def test_product_scoring_prefers_a_product_whose_photos_all_match(
    settings: Settings,
) -> None:
    query = pattern(160, 120, seed=3)
    near = [query.resize((158 - 2 * i, 120)) for i in range(3)]  # near copies of the query
    unrelated = [pattern(160, 120, seed=s) for s in (40, 41)]
    catalogue = [product("lucky", query, *unrelated), product("steady", *near)] + [
        product(f"other-{s}", pattern(160, 120, seed=s)) for s in range(20, 24)
    ]

    async def top(s: Settings) -> list[dict[str, Any]]:
        async with app_client(s) as client:
            await index(client, catalogue)
            response = await client.post("/search", json={"image": jpeg(query), "k": 3})
            assert response.status_code == 200
            return list(response.json()["results"])

    best_image = await top(
        settings.model_copy(
            update={"search": settings.search.model_copy(update={"product_weight": 0.0})}
        )
    )
    by_product = await top(  # the defaults: best image and the mean of the best 10
        settings.model_copy(update={"data_dir": settings.data_dir.parent / "other"})
    )

    assert best_image[0]["id"] == "lucky"  # its one exact copy wins on the best image
    assert best_image[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert by_product[0]["id"] == "steady"
    assert by_product[0]["score"] >= by_product[1]["score"]
    lucky = next(hit for hit in by_product if hit["id"] == "lucky")
    assert lucky["score"] < 1.0  # pulled down by its two unrelated photos


async def test_expansion_per_request_keeps_the_exact_match_first(
    client: httpx.AsyncClient,
) -> None:
    photos = [pattern(160, 120, seed=s) for s in range(6)]
    await index(client, [product(f"sku-{n}", p) for n, p in enumerate(photos)])

    for n, photo in enumerate(photos):
        body = (
            await client.post("/search", json={"image": jpeg(photo), "k": 3, "expand": True})
        ).json()
        assert body["results"][0]["id"] == f"sku-{n}"
        assert all(-1.0 <= hit["score"] <= 1.0 for hit in body["results"])


async def test_switches_are_booleans(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/search", json={"image": jpeg(pattern(seed=1)), "flip": "sometimes"}
    )
    assert response.status_code == 422
    assert "flip" in response.json()["error"]["message"]
