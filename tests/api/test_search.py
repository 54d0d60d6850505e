from __future__ import annotations

import base64
import threading
import time
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from tests.conftest import app_client
from tests.httpserver import body, serve
from tests.images import encode, pattern


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg(seed: int, size: tuple[int, int] = (120, 100)) -> bytes:
    return encode(pattern(*size, seed=seed), "JPEG", quality=92)


async def index(client: httpx.AsyncClient, products: list[dict[str, Any]]) -> None:
    response = await client.post("/products", json={"products": products})
    assert response.status_code == 200
    assert all(r["status"] != "failed" for r in response.json()["results"]), response.json()


def catalogue(n: int = 8) -> list[dict[str, Any]]:
    return [
        {
            "id": f"sku-{i}",
            "title": f"product {i}",
            "category": "even" if i % 2 == 0 else "odd",
            "images": [{"data": b64(jpeg(i))}],
        }
        for i in range(n)
    ]


async def search_json(client: httpx.AsyncClient, **payload: Any) -> httpx.Response:
    return await client.post("/search", json=payload)


class TestSearch:
    async def test_the_same_image_finds_its_product_first(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await index(db_client, catalogue())
        response = await search_json(db_client, image=b64(jpeg(3)), k=5)
        body = response.json()
        assert response.status_code == 200
        assert body["results"][0]["id"] == "sku-3"
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert body["results"][0]["title"] == "product 3"
        assert len(body["results"]) == 5
        assert [r["score"] for r in body["results"]] == sorted(
            (r["score"] for r in body["results"]), reverse=True
        )
        assert body["model_id"].startswith("tiny@")
        assert body["took_ms"] > 0

    async def test_one_entry_per_product_best_image_wins(
        self, db_client: httpx.AsyncClient
    ) -> None:
        products = catalogue(6)
        products[0]["images"] += [{"data": b64(jpeg(3, (118, 100)))}, {"data": b64(jpeg(40))}]
        await index(db_client, products)
        got = (await search_json(db_client, image=b64(jpeg(3)), k=6)).json()["results"]
        ids = [r["id"] for r in got]
        assert len(ids) == len(set(ids)) == 6
        owner = next(r for r in got if r["id"] == "sku-0")
        stored = (await db_client.get("/products/sku-0")).json()["images"]
        assert owner["image_id"] == stored[1]["image_id"]  # its near-copy of image 3

    async def test_category_filter_is_exact_and_complete(
        self, db_client: httpx.AsyncClient
    ) -> None:
        await index(db_client, catalogue(10))
        got = (
            await search_json(db_client, image=b64(jpeg(3)), k=5, filters={"category": "even"})
        ).json()["results"]
        assert len(got) == 5  # every even product, though odd sku-3 is the nearest
        assert {r["category"] for r in got} == {"even"}
        none = await search_json(db_client, image=b64(jpeg(3)), filters={"category": "nope"})
        assert none.json()["results"] == []

    async def test_min_score_and_k(self, db_client: httpx.AsyncClient) -> None:
        await index(db_client, catalogue())
        got = (await search_json(db_client, image=b64(jpeg(5)), k=8, min_score=0.99)).json()
        assert [r["id"] for r in got["results"]] == ["sku-5"]

    async def test_read_your_writes_and_deletes(self, db_client: httpx.AsyncClient) -> None:
        await index(db_client, catalogue(3))
        await index(db_client, [{"id": "new", "images": [{"data": b64(jpeg(77))}]}])
        assert (await search_json(db_client, image=b64(jpeg(77)), k=1)).json()["results"][0][
            "id"
        ] == "new"
        await db_client.delete("/products/new")
        after = (await search_json(db_client, image=b64(jpeg(77)), k=5)).json()["results"]
        assert "new" not in [r["id"] for r in after]

    async def test_multipart_with_box_forms(self, db_client: httpx.AsyncClient) -> None:
        crop = pattern(120, 100, seed=6).crop((20, 10, 100, 90))
        await index(
            db_client,
            catalogue(4) + [{"id": "crop", "images": [{"data": b64(encode(crop, "PNG"))}]}],
        )
        query = encode(pattern(120, 100, seed=6), "PNG")
        files = {"image": ("q.png", query, "image/png")}
        one = await db_client.post("/search", files=files, data={"bbox": "20,10,80,80", "k": "2"})
        four = await db_client.post(
            "/search",
            files=files,
            data={"bbox_x": "20", "bbox_y": "10", "bbox_w": "80", "bbox_h": "80", "k": "2"},
        )
        assert one.status_code == 200
        assert one.json()["results"][0]["id"] == "crop"
        assert one.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert four.json()["results"] == one.json()["results"]

    async def test_by_url(self, db_client: httpx.AsyncClient) -> None:
        await index(db_client, catalogue(4))
        with serve({"/q.jpg": body(jpeg(2))}) as server:
            got = await search_json(db_client, image_url=server.url("/q.jpg"), k=1)
        assert got.json()["results"][0]["id"] == "sku-2"

    async def test_empty_catalogue(self, client: httpx.AsyncClient) -> None:
        got = await search_json(client, image=b64(jpeg(1)))
        assert got.status_code == 200
        assert got.json()["results"] == []


class TestSearchErrors:
    @pytest.mark.parametrize(
        ("payload", "code"),
        [
            ({"image": b64(b"not an image")}, "image_undecodable"),
            ({"image": "***"}, "image_undecodable"),
            ({"image": b64(jpeg(1)), "bbox": {"x": 100, "y": 0, "w": 50, "h": 10}}, "invalid_box"),
            ({}, "invalid_request"),
            ({"image": b64(jpeg(1)), "image_url": "https://example.com/a.jpg"}, "invalid_request"),
            ({"image": b64(jpeg(1)), "k": 0}, "invalid_request"),
            ({"image": b64(jpeg(1)), "k": 1001}, "invalid_request"),
        ],
    )
    async def test_bad_input_is_422(
        self, client: httpx.AsyncClient, payload: dict[str, Any], code: str
    ) -> None:
        response = await search_json(client, **payload)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == code

    async def test_private_url_is_not_allowed(self, settings: Settings) -> None:
        settings = settings.model_copy(update={"allow_private_urls": False})
        with serve({"/q.jpg": body(jpeg(1))}) as server:
            async with app_client(settings) as c:
                response = await search_json(c, image_url=server.url("/q.jpg"))
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "url_not_allowed"
        assert server.connections == 0

    async def test_oversized_image_is_413(self, settings: Settings) -> None:
        image = settings.image.model_copy(update={"max_bytes": 1000})
        async with app_client(settings.model_copy(update={"image": image})) as c:
            response = await search_json(c, image=b64(jpeg(1, (300, 300))))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "image_too_large"

    async def test_multipart_without_image(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/search", data={"k": "3"}, files={"x": ("a", b"1")})
        assert response.status_code == 422

    async def test_full_queue_answers_503_with_retry_after(self, settings: Settings) -> None:
        # Two images in flight fill it: one in the forward pass, one queued.
        batch = settings.batch.model_copy(update={"max_size": 1, "queue_size": 2})
        async with app_client(settings.model_copy(update={"batch": batch})) as c:
            worker = c.app.state.vs.services.worker  # type: ignore[attr-defined]
            gate, entered = threading.Event(), threading.Event()
            forward = worker.embedder.forward

            def slow_forward(batch):  # type: ignore[no-untyped-def]
                entered.set()
                gate.wait(10)
                return forward(batch)

            worker.embedder.forward = slow_forward
            tensor = worker.embedder.preprocess(pattern(seed=1))
            try:
                busy = worker.submit_tensor(tensor)  # taken by the model, held at the gate
                assert entered.wait(5)
                queued = worker.submit_tensor(tensor)  # fills the capacity
                started = time.perf_counter()
                response = await search_json(c, image=b64(jpeg(3)))
                elapsed = time.perf_counter() - started
            finally:
                gate.set()
                worker.embedder.forward = forward
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            assert elapsed < 2  # refused at once, not queued
            assert busy.result(5).shape == (512,)
            assert queued.result(5).shape == (512,)
            after = await search_json(c, image=b64(jpeg(3)))
            assert after.status_code == 200
            metrics = (await c.get("/metrics")).text
            assert "vsearch_admission_rejected_requests_total 1.0" in metrics
            assert "vsearch_admission_in_flight_images 0.0" in metrics


async def test_scores_stay_within_minus_one_and_one(client: httpx.AsyncClient) -> None:
    await index(client, catalogue(4))
    for seed in range(4):
        response = await search_json(client, image=b64(jpeg(seed)), k=4)
        scores = [hit["score"] for hit in response.json()["results"]]
        assert scores[0] >= 0.99  # the same image first
        assert all(-1.0 <= s <= 1.0 for s in scores), scores
